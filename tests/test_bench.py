"""``vist3a-rt bench`` on a tiny random model, and the pieces it is built from.

The end-to-end run uses torch (the baseline, always measured) and tensorrt, which cannot run on
a model folder (it needs an exported bundle, and tensorrt and a GPU): its row must say why.
Torch against its own reference generation (same prompt, seed, settings) must agree exactly.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from vist3a_rt.bench import BenchSettings
from vist3a_rt.bench.agreement import psnr, tensor_agreement
from vist3a_rt.bench.flops import count_flops, matmul_rate
from vist3a_rt.bench.stages import STAGES
from vist3a_rt.bench.stats import summarize
from vist3a_rt.cli import main
from vist3a_rt.errors import Vist3AInputError
from vist3a_rt.testing import write_tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


# --- the pieces ----------------------------------------------------------------------------------


def test_summary_statistics():
    assert summarize([5.0, 1.0, 4.0, 2.0, 3.0]) == {"median": 3.0, "q1": 2.0, "q3": 4.0, "min": 1.0, "max": 5.0,
                                                     "n": 5}
    assert summarize([0.25]) == {"median": 0.25, "q1": 0.25, "q3": 0.25, "min": 0.25, "max": 0.25, "n": 1}
    with pytest.raises(ValueError):
        summarize([])


def test_agreement_measures():
    reference = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    assert tensor_agreement(reference.clone(), reference) == {"max_abs": 0.0, "max_rel": 0.0}
    assert tensor_agreement(reference + torch.tensor([[0.0, 0.0], [0.0, 0.2]]), reference) == \
        pytest.approx({"max_abs": 0.2, "max_rel": 0.05})
    image = torch.zeros(4, 4, 3)
    assert psnr(image, image) == math.inf
    assert psnr(image + 0.1, image) == pytest.approx(20.0)  # mse 0.01 at peak 1
    with pytest.raises(ValueError, match="image shapes differ"):
        psnr(image, image[:2])


def test_flop_counts_follow_the_formulas():
    linear = torch.nn.Linear(5, 7)
    assert count_flops(linear, torch.randn(3, 5))[0] == 2 * 3 * 5 * 7
    q, k, v = torch.randn(2, 3, 16, 8), torch.randn(2, 3, 20, 8), torch.randn(2, 3, 20, 8)
    total, by_op = count_flops(F.scaled_dot_product_attention, q, k, v)
    assert total == 2 * (2 * 2 * 3 * 16 * 20 * 8)  # QK^T and PV, 2 FLOPs per multiply-add
    assert len(by_op) == 1  # the CPU attention kernel, which torch's own table lacks


def test_matmul_rate_is_measured():
    rate = matmul_rate("cpu", size=64, repeats=2)
    assert rate["seconds"]["n"] == 2 and rate["gflops"] > 0 and math.isfinite(rate["gflops"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(backends=("torch", "tvm")), r"unknown backends \['tvm'\]"),
    (dict(repeats=0), "repeats must be an integer >= 1, got 0"),
    (dict(warmup=-1), "warmup must be an integer >= 0"),
    (dict(steps=True), "steps must be an integer >= 1, got True"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(Vist3AInputError, match=message):
        BenchSettings(**kwargs)


def test_bad_cli_input_exits_2(capsys):
    assert main(["bench", "--repeats", "0"]) == 2
    assert "repeats must be an integer >= 1" in capsys.readouterr().err
    assert main(["bench", "--backends", " , "]) == 2


def test_torch_always_runs_first_as_the_baseline():
    assert BenchSettings(backends=("tensorrt", "onnxruntime", "tensorrt")).ordered_backends == \
        ["torch", "tensorrt", "onnxruntime"]


# --- end to end on a tiny model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    model = write_tiny_model(root / "model")
    args = ["bench", "--model", str(model), "--backends", "torch,tensorrt", "--repeats", "2", "--warmup", "1",
            "--steps", "2", "--threads", "1", "--preview-frames", "2", "--preview-size", "32",
            "--json", str(root / "bench.json")]
    return args, root / "bench.json"


@pytest.fixture(scope="module")
def bench_output(bench_run):
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(bench_run[0])
    return code, out.getvalue(), err.getvalue(), bench_run[1]


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_report_keys_and_numbers(bench_output):
    code, _, err, path = bench_output
    assert code == 0, err
    report = json.loads(path.read_text())
    assert set(report) == {"format", "version", "settings", "machine", "matmul", "denoiser_flops", "backends",
                           "bench_peak_rss_mib"}
    assert [row["backend"] for row in report["backends"]] == ["torch", "tensorrt"]
    torch_row = report["backends"][0]
    assert torch_row["status"] == "ok" and _positive(torch_row["load_s"])
    assert set(torch_row["stages"]) == {*STAGES, "denoiser_forward"}
    for stage, stats in torch_row["stages"].items():
        assert stats["n"] == 2, stage
        assert all(_positive(stats[k]) for k in ("median", "q1", "q3", "min", "max")), (stage, stats)
        assert stats["min"] <= stats["q1"] <= stats["median"] <= stats["q3"] <= stats["max"], stage
    stages = torch_row["stages"]
    assert stages["e2e_with_preview"]["median"] > stages["e2e_no_preview"]["median"] > stages["generate"]["median"]
    flops = report["denoiser_flops"]
    assert _positive(flops["per_step"]) and flops["cfg_batch"] == 2
    assert any("attention" in op for op in flops["by_op"])
    assert _positive(report["matmul"]["gflops"])
    assert all(_positive(v) for v in torch_row["denoiser"].values())
    assert torch_row["speedup_vs_torch"] == {"denoise_step": 1.0, "generate": 1.0, "e2e_no_preview": 1.0}
    cold = torch_row["cold_start"]
    assert all(_positive(cold[k]) for k in ("import_s", "load_s", "first_step_s", "peak_rss_mib")), cold
    assert cold["first_step_s"] > cold["import_s"] + cold["load_s"] * 0.99
    assert _positive(report["bench_peak_rss_mib"])


def test_torch_agrees_exactly_with_its_reference(bench_output):
    agreement = json.loads(bench_output[3].read_text())["backends"][0]["agreement"]
    assert agreement["latents_max_abs"] == 0.0 and agreement["latents_max_rel"] == 0.0
    assert agreement["render_exact"] is True and agreement["render_psnr_db"] is None
    assert agreement["gaussians"] == agreement["reference_gaussians"] > 0


def test_unavailable_backend_gets_a_row_saying_why(bench_output):
    _, table, _, path = bench_output
    row = json.loads(path.read_text())["backends"][1]
    assert row["backend"] == "tensorrt" and row["status"] == "unavailable"
    assert isinstance(row["reason"], str) and row["reason"]
    assert f"tensorrt (unavailable): {row['reason']}" in table


def test_table_prints_stages_with_units(bench_output):
    table = bench_output[1]
    for label in ("ms: median [min-max]", "one denoising step", "stitched 3D decode", "render (1 preview frame)",
                  "end to end, with preview", "latents vs torch: max abs / rel", "cold start to 1st step (s)",
                  "GFLOP/s"):
        assert label in table, label
    assert "identical" in table
