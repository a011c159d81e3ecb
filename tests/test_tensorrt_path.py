"""The TensorRT path: engine build (``vist3a_rt.export.tensorrt_build``) and backend
(``vist3a_rt.backends.tensorrt_backend``).

Everything that does not need TensorRT runs everywhere: optimization profiles from export
contracts checked against ONNX graphs (synthetic ones, and the tiny model's exported denoiser),
engine names, the skip-or-rebuild decision over build records, dtype tables, and the errors
raised where tensorrt or CUDA is missing. The skip tests write plan files that are not engines
(they test the file logic; nothing deserializes them). Building and running real engines needs
tensorrt and an NVIDIA GPU and skips without them, saying which is missing.

Tolerance of an engine against eager torch (same inputs), per output, relative to the largest
magnitude of the torch output: fp32 engines 5e-3 (TensorRT uses TF32 matmuls by default), fp16
engines 3e-2. A CUDA graph replay must equal the eager run of the same engine exactly.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import types

import pytest
import torch

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install 'vist3a-rt[onnx]')")

from onnx import TensorProto, helper  # noqa: E402

from vist3a_rt.backends import BackendUnavailableError  # noqa: E402
from vist3a_rt.backends.tensorrt_backend import (CUDA_MISSING, TENSORRT_MISSING, TORCH_TO_TRT,  # noqa: E402
                                                 TRT_TO_TORCH, EngineRecord, EngineTarget, TensorRTBackend,
                                                 engine_file_name, find_engines, gpu_slug, import_tensorrt,
                                                 require_cuda, timing_cache_file_name, torch_dtype)
from vist3a_rt.errors import Vist3AInputError  # noqa: E402
from vist3a_rt.export.spec import Axis, ExportContract, Profile, TensorSpec  # noqa: E402
from vist3a_rt.export.tensorrt_build import (PRECISION_FLAGS, GraphInput, bundle_stages, build_engines,  # noqa: E402
                                             engine_status, onnx_graph_inputs, onnx_sha256, plan_engine_steps,
                                             profile_shapes)

H100 = EngineTarget("NVIDIA H100 80GB HBM3", (9, 0), "10.3.0.26")
TOLERANCE = {"fp32": 5e-3, "fp16": 3e-2}


def _tensorrt_and_cuda():
    """Skip (naming what is missing) unless tensorrt imports and a CUDA GPU is visible."""
    trt = pytest.importorskip("tensorrt", reason=TENSORRT_MISSING)
    if not torch.cuda.is_available():
        pytest.skip(CUDA_MISSING)
    return trt


# --- a toy contract and matching ONNX graphs -----------------------------------------------------


def toy_contract(*, ids_static: bool = False) -> ExportContract:
    """x [batch, 4, 2·rows] float32, ids [batch, 8] int64 (or a fixed [3, 8]) -> y like x."""
    rows = Axis("rows", 2, label="height")
    ids_axes = (3, 8) if ids_static else (Axis("batch"), 8)
    return ExportContract(
        "toy",
        inputs=(TensorSpec("x", (Axis("batch"), 4, rows)),
                TensorSpec("ids", ids_axes, torch.int64, "integers", 0, 10)),
        outputs=(TensorSpec("y", (Axis("batch"), 4, rows)),),
        profile=Profile({"batch": 1, "rows": 1}, {"batch": 2, "rows": 3}, {"batch": 4, "rows": 6}))


def toy_onnx(path, *, x_dims=("batch", 4, "height"), ids_dims=("batch", 8), ids_type=TensorProto.INT64,
             names=("x", "ids"), external_data: bool = False):
    """A one-node graph (y = x + w) with the given input dims (strings are symbolic)."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], torch.tensor([0.5]).numpy().tobytes(), raw=True)
    graph = helper.make_graph(
        [helper.make_node("Add", [names[0], "w"], ["y"])], "toy",
        [helper.make_tensor_value_info(names[0], TensorProto.FLOAT, list(x_dims)),
         helper.make_tensor_value_info(names[1], ids_type, list(ids_dims))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x_dims))], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    if external_data:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


# --- profiles from contracts, checked against the graph ------------------------------------------


def test_profile_from_contract_and_graph(tmp_path):
    graph = onnx_graph_inputs(toy_onnx(tmp_path / "toy.onnx"))
    assert graph == [GraphInput("x", "float32", (None, 4, None)), GraphInput("ids", "int64", (None, 8))]
    assert profile_shapes(toy_contract(), graph) == {
        "x": ((1, 4, 2), (2, 4, 6), (4, 4, 12)),  # the height axis is 2·rows
        "ids": ((1, 8), (2, 8), (4, 8)),
    }


def test_static_inputs_get_no_profile_entry(tmp_path):
    graph = onnx_graph_inputs(toy_onnx(tmp_path / "toy.onnx", ids_dims=(3, 8)))
    assert set(profile_shapes(toy_contract(ids_static=True), graph)) == {"x"}


def test_initializers_listed_as_inputs_are_not_graph_inputs(tmp_path):
    path = toy_onnx(tmp_path / "toy.onnx")
    model = onnx.load(str(path))
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [1]))  # old exporters did this
    onnx.save_model(model, str(path))
    assert [g.name for g in onnx_graph_inputs(path)] == ["x", "ids"]


@pytest.mark.parametrize("graph_kwargs, message", [
    (dict(names=("x", "input_ids")), r"inputs are \['input_ids', 'x'\], its contract's are \['ids', 'x'\]"),
    (dict(ids_type=TensorProto.INT32), "'ids' is int32, the contract says int64"),
    (dict(x_dims=("batch", 4)), "'x' has rank 2, the contract's shapes have rank 3"),
    (dict(x_dims=("batch", 5, "height")), r"'x' fixes axis 1 at 5, but the contract's profile gives"),
    (dict(x_dims=(2, 4, "height")), r"fixes axis 0 at 2, .*'min': 1, 'opt': 2, 'max': 4"),
])
def test_graph_that_contradicts_the_contract_is_refused(tmp_path, graph_kwargs, message):
    graph = onnx_graph_inputs(toy_onnx(tmp_path / "toy.onnx", **graph_kwargs))
    with pytest.raises(Vist3AInputError, match=message):
        profile_shapes(toy_contract(), graph)


def test_onnx_hash_covers_external_data(tmp_path):
    path = toy_onnx(tmp_path / "toy.onnx", external_data=True)
    data = tmp_path / "toy.onnx.data"
    assert data.is_file()
    before = onnx_sha256(path)
    assert onnx_sha256(path) == before
    data.write_bytes(data.read_bytes()[:-1] + b"\x01")
    assert onnx_sha256(path) != before
    data.unlink()
    with pytest.raises(Vist3AInputError, match="refers to external data toy.onnx.data, which is missing"):
        onnx_sha256(path)


# --- names, tables, precise errors ---------------------------------------------------------------


def test_engine_names_carry_gpu_capability_precision_and_tensorrt_version():
    assert engine_file_name("denoiser", H100, "fp16") == "denoiser.h100-80gb-hbm3.sm90.fp16.trt10.3.plan"
    ada = EngineTarget("NVIDIA GeForce RTX 4090", [8, 9], "10.12.0")
    assert engine_file_name("vae_decoder", ada, "bf16") == "vae_decoder.geforce-rtx-4090.sm89.bf16.trt10.12.plan"
    assert timing_cache_file_name(H100) == "timing_cache.h100-80gb-hbm3.sm90.trt10.3.bin"
    assert gpu_slug("Tesla T4") == "tesla-t4"


@pytest.mark.parametrize("call, message", [
    (lambda: engine_file_name("denoiser", H100, "int8"), "engine precision must be one of"),
    (lambda: engine_file_name("Denoiser/x", H100, "fp16"), "must be lower case letters"),
    (lambda: gpu_slug("--"), "no letters or digits"),
    (lambda: EngineTarget("NVIDIA A100", (8, 0), "ten"), "not of the form MAJOR.MINOR"),
])
def test_naming_errors(call, message):
    with pytest.raises(Vist3AInputError, match=message):
        call()


def test_find_engines_picks_this_gpu_and_precision(tmp_path):
    for name in ("denoiser.h100-80gb-hbm3.sm90.fp16.trt10.3.plan", "text_encoder.h100-80gb-hbm3.sm90.fp16.trt10.3.plan",
                 "denoiser.h100-80gb-hbm3.sm90.bf16.trt10.3.plan", "denoiser.a100-sxm4-40gb.sm80.fp16.trt10.3.plan",
                 "denoiser.h100-80gb-hbm3.sm90.fp16.trt10.4.plan",
                 "denoiser.h100-80gb-hbm3.sm90.fp16.trt10.3.plan.json"):
        (tmp_path / name).write_bytes(b"")
    found = find_engines(tmp_path, H100, "fp16")
    assert {stage: plan.name for stage, plan in found.items()} == {
        "denoiser": "denoiser.h100-80gb-hbm3.sm90.fp16.trt10.3.plan",
        "text_encoder": "text_encoder.h100-80gb-hbm3.sm90.fp16.trt10.3.plan"}
    assert find_engines(tmp_path / "absent", H100, "fp16") == {}


def test_dtype_tables():
    assert torch_dtype("HALF") is torch.float16
    assert torch_dtype("DataType.BF16") is torch.bfloat16  # str() of the pybind11 enum member
    assert torch_dtype(types.SimpleNamespace(name="INT64")) is torch.int64  # the member's .name
    assert all(torch_dtype(name) is dtype and TORCH_TO_TRT[dtype] == name for name, dtype in TRT_TO_TORCH.items())
    with pytest.raises(Vist3AInputError, match=r"TensorRT data type FP8 has no torch tensor binding.*'BF16'"):
        torch_dtype("FP8")
    assert PRECISION_FLAGS == {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",)}


def test_without_tensorrt_every_entry_point_says_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as if not installed, even where it is
    for call in (import_tensorrt, lambda: TensorRTBackend({"denoiser": tmp_path / "x.plan"}),
                 lambda: TensorRTBackend.from_bundle(tmp_path), lambda: build_engines(tmp_path)):
        with pytest.raises(BackendUnavailableError) as caught:
            call()
        assert str(caught.value) == "tensorrt is not installed (pip install tensorrt-cu12; needs an NVIDIA GPU)"


def test_without_cuda_the_backend_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="needs an NVIDIA GPU, and torch.cuda.is_available"):
        require_cuda()


def test_record_round_trips_through_json(tmp_path):
    record = EngineRecord(stage="toy", plan_file="toy.plan", plan_bytes=3, onnx_file="toy.onnx", onnx_sha256="ab",
                          precision="fp16", target=H100, profile={"x": [[1, 4, 2], [2, 4, 6], [4, 4, 12]]},
                          contract=toy_contract().to_dict(), workspace_bytes=None, build_seconds=1.5)
    plan = tmp_path / "toy.plan"
    assert record.write(plan) == tmp_path / "toy.plan.json"
    assert EngineRecord.load(plan) == record
    assert EngineRecord.load(plan).export_contract() == toy_contract()
    (tmp_path / "toy.plan.json").write_text("{")
    with pytest.raises(Vist3AInputError, match="toy.plan.json is unreadable"):
        EngineRecord.load(plan)


# --- a real exported stage: the tiny model's denoiser --------------------------------------------


@pytest.fixture(scope="module")
def exported_bundle(tmp_path_factory):
    """A bundle folder holding the tiny model's denoiser as exported by ``export_onnx``."""
    pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install 'vist3a-rt[onnx]')")
    from vist3a_rt.export.contracts import denoiser_stage
    from vist3a_rt.export.onnx_export import export_onnx
    from vist3a_rt.generator import WanGenerator
    from vist3a_rt.testing import write_tiny_model

    root = tmp_path_factory.mktemp("trt")
    model = write_tiny_model(root / "model")
    transformer = WanGenerator.from_folder(model / "wan", model / "lora").transformer
    stage = denoiser_stage(transformer, latent_frames=2, latent_height=4, latent_width=4, text_tokens=8)
    export_onnx(stage, root / "bundle" / "onnx")
    return root / "bundle", stage


@pytest.fixture
def bundle(exported_bundle, tmp_path):
    """A private copy (tests change files in it)."""
    shutil.copytree(exported_bundle[0], tmp_path / "bundle")
    return tmp_path / "bundle"


def test_exported_stage_profile_matches_its_contract(bundle, exported_bundle):
    (stage,) = bundle_stages(bundle)
    contract = exported_bundle[1].contract
    assert stage.stage == "denoiser" and stage.contract == contract
    profile = profile_shapes(stage.contract, onnx_graph_inputs(stage.onnx))
    assert profile == contract.profile_shapes()  # every input has the dynamic batch axis
    assert profile["latents"] == ((1, 16, 1, 2, 2), (2, 16, 2, 4, 4), (8, 16, 4, 8, 8))


def test_build_plan_names_engines_and_skips_valid_ones(bundle):
    (step,) = plan_engine_steps(bundle, H100, "fp16")
    assert step.plan == bundle / "engines" / "denoiser.h100-80gb-hbm3.sm90.fp16.trt10.3.plan"
    assert (step.up_to_date, step.reason) == (False, "no engine yet")
    assert step.expected.onnx_sha256 == onnx_sha256(step.stage.onnx)

    # What the builder leaves behind: the plan, then its record (the bytes here are no engine).
    step.plan.parent.mkdir()
    step.plan.write_bytes(b"plan bytes")
    dataclasses.replace(step.expected, plan_bytes=10, build_seconds=2.0).write(step.plan)
    (again,) = plan_engine_steps(bundle, H100, "fp16")
    assert (again.up_to_date, again.reason) == (True, "valid engine exists")
    assert not plan_engine_steps(bundle, H100, "fp16", force=True)[0].up_to_date

    newer = EngineTarget(H100.gpu_name, (9, 0), "10.3.1")  # same file name, other TensorRT build
    assert engine_status(step.plan, dataclasses.replace(step.expected, target=newer)) == (
        False, "built with TensorRT 10.3.0.26, this is 10.3.1")
    assert plan_engine_steps(bundle, H100, "fp16", workspace_bytes=2**30)[0].reason == \
        "workspace bytes changed since the engine was built"

    step.plan.write_bytes(b"plan")  # a torn write
    assert plan_engine_steps(bundle, H100, "fp16")[0].reason == \
        "plan is 4 bytes, its record says 10 (incomplete write?)"


def test_changed_onnx_means_rebuild(bundle):
    (step,) = plan_engine_steps(bundle, H100, "fp16")
    step.plan.parent.mkdir()
    step.plan.write_bytes(b"plan bytes")
    dataclasses.replace(step.expected, plan_bytes=10).write(step.plan)
    model = onnx.load(str(step.stage.onnx))
    model.doc_string = "edited"
    onnx.save_model(model, str(step.stage.onnx))
    assert plan_engine_steps(bundle, H100, "fp16")[0].reason == "onnx sha256 changed since the engine was built"


def test_bundle_stages_from_manifest_or_sidecars(bundle):
    (stage,) = bundle_stages(bundle)
    (bundle / "manifest.json").write_text(json.dumps({"stages": {"denoiser": {"onnx": f"onnx/{stage.onnx.name}"}}}))
    assert bundle_stages(bundle) == [stage]
    entry = {"onnx": f"onnx/{stage.onnx.name}", "contract": stage.contract.to_dict()}  # the bundle manifest's form
    (bundle / "manifest.json").write_text(json.dumps({"format": "vist3a-rt/bundle", "stages": {"denoiser": entry}}))
    assert bundle_stages(bundle) == [stage]
    (bundle / "manifest.json").write_text(json.dumps({"stages": {"text_encoder": {"onnx": f"onnx/{stage.onnx.name}"}}}))
    with pytest.raises(Vist3AInputError, match="is an export of stage 'denoiser', listed as 'text_encoder'"):
        bundle_stages(bundle)
    (bundle / "manifest.json").write_text(json.dumps({"stages": {"denoiser": {"onnx": "onnx/gone.onnx"}}}))
    with pytest.raises(Vist3AInputError, match="stage 'denoiser': ONNX file not found"):
        bundle_stages(bundle)
    (bundle / "manifest.json").unlink()
    sidecar = stage.onnx.with_suffix(".json")
    shutil.copy(sidecar, sidecar.with_name("denoiser.fp32.0000000000000000.json"))
    with pytest.raises(Vist3AInputError, match="several exports of one stage"):
        bundle_stages(bundle)
    with pytest.raises(Vist3AInputError, match="has no exported ONNX stages"):
        bundle_stages(bundle / "onnx")
    sidecar.with_name("denoiser.fp32.0000000000000000.json").unlink()
    with pytest.raises(Vist3AInputError, match=r"the bundle has no stages \['vae'\]; it has \['denoiser'\]"):
        plan_engine_steps(bundle, H100, stages=["vae"])


# --- with TensorRT and a GPU ---------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_matches_torch_and_graph_replay_matches_eager(bundle, exported_bundle, precision):
    _tensorrt_and_cuda()
    from vist3a_rt.backends.tensorrt_backend import TensorRTStage

    (built,) = build_engines(bundle, precision)
    assert not built.skipped and built.plan.is_file() and built.record.plan_bytes == built.plan.stat().st_size
    assert build_engines(bundle, precision)[0].skipped
    stage = exported_bundle[1]
    eager = TensorRTStage(built.plan)
    graphed = TensorRTStage(built.plan, cuda_graph=True)
    for point in ("opt", {"batch": 1, "latent_frames": 3}, "opt"):  # the second call recaptures, the third too
        inputs = stage.contract.sample_inputs(point, seed=1)
        reference = stage.reference(inputs)
        cuda_inputs = {name: t.cuda() for name, t in inputs.items()}
        got = eager(cuda_inputs)
        replayed = graphed(cuda_inputs)
        for name, expected in reference.items():
            error = (got[name].float().cpu() - expected).abs().max().item()
            assert error <= TOLERANCE[precision] * expected.abs().max().item(), (name, point, error)
            assert torch.equal(replayed[name], got[name])


def test_engine_refuses_shapes_outside_its_profile(bundle, exported_bundle):
    _tensorrt_and_cuda()
    (built,) = build_engines(bundle, "fp32")
    backend = TensorRTBackend({"denoiser": built.plan})
    inputs = exported_bundle[1].contract.sample_inputs("max")  # batch 8, the profile's max
    inputs = {name: torch.cat([t, t[:1]]).cuda() for name, t in inputs.items()}  # batch 9
    with pytest.raises(Vist3AInputError, match="batch = 9 is outside the exported profile"):
        backend.run("denoiser", inputs)
