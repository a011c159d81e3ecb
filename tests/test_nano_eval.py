"""``vist3a-rt eval``: the colour/shape checker on exact world renders, every report section on a
tiny random model, the layer-search table, the CLI's files and its errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vist3a_rt.cli import main
from vist3a_rt.evaluation import (AttributeChecker, CheckerSettings, EvalSettings, parse_world_prompt, run_eval,
                                  validate_checker, write_report)
from vist3a_rt.evaluation.clips import heldout_clips
from vist3a_rt.evaluation.model import load_eval_model
from vist3a_rt.evaluation.world_eval import layer_search_table, reconstruction_section
from vist3a_rt.testing import write_tiny_model
from vist3a_rt.training.recon import evaluate
from vist3a_rt.training.world import sample_scene

pytestmark = pytest.mark.usefixtures("single_thread")
SMALL_CHECKER = CheckerSettings(bank_scenes=16)
RECON_KEYS = {"psnr", "depth_abs_rel", "depth_delta1", "translation_error", "rotation_error_deg", "fov_error_deg"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("models") / "model", seed=3)


@pytest.fixture(scope="module")
def report(tiny_model):
    settings = EvalSettings(model=str(tiny_model), clips=2, prompts=2, steps=2, checker=SMALL_CHECKER)
    return run_eval(settings)


def _finite_numbers(tree) -> bool:
    if isinstance(tree, dict):
        return all(_finite_numbers(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(_finite_numbers(v) for v in tree)
    if isinstance(tree, bool) or not isinstance(tree, (int, float)):
        return tree is not None
    return math.isfinite(tree)


# ---------------------------------------------------------------------------- the checker


def test_parse_world_prompt_reads_every_object_of_a_caption():
    for seed in range(60):
        scene = sample_scene(seed, "heldout" if seed % 2 else "train")
        parsed = {(o.colour, o.shape) for o in parse_world_prompt(scene.caption)}
        assert parsed == {(o.colour, o.shape) for o in scene.objects}, scene.caption
    with pytest.raises(ValueError, match="names no coloured object"):
        parse_world_prompt("a wooden cabin in the snow")


def test_checker_passes_exact_renders_and_fails_wrong_prompts():
    # at nano's network size (84 px); measured: colour 100%, both 95.8%
    checker = AttributeChecker.build(84, settings=CheckerSettings(bank_scenes=32))
    result = validate_checker(checker, list(range(48)))
    assert result["ground_truth"]["colour"] >= 0.95 and result["ground_truth"]["both"] >= 0.9
    assert result["wrong_prompt"]["both"] <= 0.1 and result["wrong_prompt"]["colour"] <= 0.1
    assert result["wrong_shapes"]["colour"] >= 0.95 and result["wrong_shapes"]["shape"] <= 0.1


def test_checker_refuses_images_of_another_size():
    checker = AttributeChecker.build(32, settings=CheckerSettings(bank_scenes=4))
    with pytest.raises(ValueError, match="the checker's size"):
        checker.check(torch.zeros(2, 3, 48, 48), parse_world_prompt("a red cube"))


# ---------------------------------------------------------------------------- sections on the tiny model


def test_world_sections_give_finite_numbers(report):
    sections = report["sections"]
    for name in ("reconstruction", "stitched"):
        assert sections[name]["num_clips"] == 2 and len(sections[name]["per_clip"]) == 2
        assert RECON_KEYS <= set(sections[name]["metrics"]) and _finite_numbers(sections[name]["metrics"])
    stitched = sections["stitched"]
    assert "psnr_world_frames" in stitched["metrics"] and math.isfinite(stitched["psnr_gap_db"])
    assert stitched["psnr_gap_db"] == pytest.approx(sections["reconstruction"]["metrics"]["psnr"]
                                                    - stitched["metrics"]["psnr"])
    assert stitched["layer_search"]["present"] is False and "absent" in stitched["layer_search"]["note"]
    levels = sections["robustness"]["levels"]
    assert [row["level"] for row in levels] == [0.0, 0.1, 0.25, 0.5]
    assert all(set(row) == {"level", "psnr_stitched", "psnr_decode_then_reconstruct", "advantage_db"}
               and _finite_numbers(row) for row in levels)
    assert levels[0]["psnr_stitched"] == pytest.approx(stitched["metrics"]["psnr"])


def test_prompt_sections_give_verdicts_and_finite_numbers(report):
    faithfulness, consistency = report["sections"]["faithfulness"], report["sections"]["consistency"]
    assert faithfulness["num_prompts"] == 2 and len(faithfulness["prompts"]) == 2
    for source in ("render", "frames"):
        assert set(faithfulness["rates"][source]) == {"colour", "shape", "both", "num_prompts"}
        assert _finite_numbers(faithfulness["rates"][source])
    prompt = faithfulness["prompts"][0]
    assert prompt["seed"] == 0 and {"colour", "shape", "both", "objects"} <= set(prompt["render"])
    assert [o["colour"] for o in prompt["render"]["objects"]] == [o.colour for o in parse_world_prompt(prompt["prompt"])]
    assert faithfulness["checker_validation"]["ground_truth"]["num_prompts"] == 2
    assert _finite_numbers(consistency) and consistency["num_prompts"] == 2
    assert set(report["timings"]) >= {"load_model", "reconstruction", "stitched", "robustness", "generation", "total"}
    assert report["command"].startswith("vist3a-rt eval --model ")


def test_reconstruction_scores_match_recon_evaluate(tiny_model):
    model = load_eval_model(tiny_model)
    clips = heldout_clips(model.sizes, 1, seed=3)
    ours = reconstruction_section(model, clips)["metrics"]
    reference = evaluate(model.reconstruction, [c.clip for c in clips], [c.novel for c in clips])
    for key in RECON_KEYS:  # the same protocol; only the rasterizer differs (C++ vs the torch reference)
        assert ours[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-4), key


def test_layer_search_table_is_read_from_beside_the_weights(tmp_path):
    from vist3a_rt.training.layer_search import LayerSearchFeatures, layer_search

    generator = torch.Generator().manual_seed(0)
    features = LayerSearchFeatures(latents=torch.randn(2, 16, 2, 4, 4, generator=generator),
                                   blocks={f"enc_blocks_{k}": torch.randn(2, 5, 4, 8, generator=generator)
                                           for k in (1, 2)}, grid=(2, 2))
    result = layer_search(features, "conv3d_k1x3x3_o8_s1x2x2_p0x1x1", padding="consistent")
    (tmp_path / "layer_search.json").write_text(json.dumps(result.to_dict()))
    table = layer_search_table(tmp_path / "layer_search.json")
    assert table["present"] and table["best_block"] == result.best.block
    assert [r["block"] for r in table["ranking"]] == [f.block for f in result.ranking]
    (tmp_path / "layer_search.json").write_text("{}")
    with pytest.raises(ValueError, match="not a layer-search table"):
        layer_search_table(tmp_path / "layer_search.json")


# ---------------------------------------------------------------------------- the CLI and the files


def test_cli_writes_both_reports_with_a_baseline(tiny_model, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "--model", str(tiny_model), "--baseline", str(tiny_model), "--clips", "1", "--prompts", "1",
            "--steps", "1", "--out", str(out)]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    assert set(report["sections"]) == {"reconstruction", "stitched", "robustness", "faithfulness", "consistency",
                                       "comparison"}
    rows = report["sections"]["comparison"]["rows"]
    assert [r["metric"] for r in rows] == ["colour", "shape", "both", "consistency_psnr"]
    assert all(r["delta"] == 0 for r in rows)  # the same model on the same prompts and seeds
    markdown = (out / "report.md").read_text()
    for title in ("## 1. Reconstruction", "## 2. Stitched", "### Layer search", "## 3. Robustness",
                  "## 4. Faithfulness", "## 5. 3D consistency", "## 6. Comparison", "## Timings"):
        assert title in markdown
    assert report["command"] in markdown


@pytest.mark.parametrize("args, message", [
    (["--model", "{missing}"], "model folder not found"),
    (["--model", "{model}", "--baseline", "{missing}"], "model folder not found"),
    (["--model", "{model}", "--clips", "-1"], "clips must be an int >= 0"),
    (["--model", "{model}", "--steps", "0"], "steps must be an int >= 1"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(tiny_model, tmp_path, capsys, args, message):
    out = tmp_path / "eval"
    values = {"missing": str(tmp_path / "no-such-model"), "model": str(tiny_model)}
    assert main(["eval", *(a.format(**values) for a in args), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_write_report_leaves_earlier_files_whole_when_it_fails(report, tmp_path):
    write_report(report, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    broken = {**report, "sections": {**report["sections"], "stitched": {}}}  # cannot be rendered
    with pytest.raises(KeyError):
        write_report(broken, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with pytest.raises(ValueError, match="not a folder"):
        write_report(report, tmp_path / "report.json")
