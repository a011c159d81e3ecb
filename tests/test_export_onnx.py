"""ONNX export of every stage of a tiny official-layout model, run through onnxruntime against
eager torch, at the profile's opt sizes and at other sizes inside the profile.

Tolerance, fp32, per output: max |onnxruntime − torch| <= 1e-4 · max |torch| (relative to the
output's largest magnitude), on identical inputs. The torch side is the pipeline's own code
(``encode_tokens``, the diffusers transformer, ``latents.decode``, ``StitchedDecoder.forward``),
not the export wrappers.

The stitched decoder is the tiny model's, cut to 4 aggregator rounds and one camera-head pass
(its weights are the tiny model's own for every module it keeps): the dynamo exporter needs
minutes for the full 24-round aggregator on a 2-core machine, and more rounds add no new ops.
The VAE is exported for 2 latent frames (the frame loop is unrolled; 2 frames cover both the
first-chunk and the cached path). Each stage is exported once per module (~1 min in all).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import pytest
import torch

for _module in ("onnx", "onnxruntime", "onnxscript"):
    pytest.importorskip(_module, reason=f"{_module} is not installed (pip install 'vist3a-rt[onnx]' onnxscript)")

import onnx  # noqa: E402
from torch import nn  # noqa: E402

from vist3a_rt.backends import Backend, BackendUnavailableError, OnnxRuntimeBackend  # noqa: E402
from vist3a_rt.backends.onnxruntime_backend import choose_providers, import_onnxruntime, physical_cores  # noqa: E402
from vist3a_rt.decoder import StitchedDecoder, load_stitched_decoder  # noqa: E402
from vist3a_rt.errors import Vist3AInputError  # noqa: E402
from vist3a_rt.export.contracts import (Axis, ExportContract, ExportStage, ExportUnsupportedError, Profile,  # noqa: E402
                                        TensorSpec, denoiser_stage, stitched_decoder_stage, text_encoder_stage,
                                        vae_decoder_stage)
from vist3a_rt.export.onnx_export import OnnxArtifact, artifact_key, export_onnx  # noqa: E402
from vist3a_rt.generator import WanGenerator  # noqa: E402
from vist3a_rt.generator.latents import decode  # noqa: E402
from vist3a_rt.generator.text import encode_tokens  # noqa: E402
from vist3a_rt.testing import write_tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

RTOL = 1e-4  # of the reference output's max magnitude
# Other sizes inside each default profile, away from the opt and trace sizes.
OTHER_SIZES = {
    "text_encoder": {"batch": 3},
    "denoiser": {"batch": 1, "latent_frames": 2, "patch_rows": 2, "patch_cols": 4},
    "vae_decoder": {"batch": 3},
    "stitched_decoder": {"batch": 3, "latent_frames": 2},
}


# --- fixtures: one tiny model, each stage exported once ------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def generator(tiny):
    return WanGenerator.from_folder(tiny / "wan", tiny / "lora")


@pytest.fixture(scope="module")
def decoder(tiny):
    """The tiny model's stitched decoder cut to 4 aggregator rounds and 1 camera-head pass."""
    full = load_stitched_decoder(tiny / "vist3a.json", tiny / "anysplat", tiny / "anysplat_stitched.pth")
    config = dataclasses.replace(full.config, architecture=dataclasses.replace(
        full.config.architecture, agg_depth=4, stitched_intermediate_layer_idx=[0, 1, 2, 3], cam_trunk_depth=1,
        cam_num_iterations=1))
    cut = StitchedDecoder(config).eval()
    missing, _ = cut.load_state_dict(full.state_dict(), strict=False)
    assert not missing
    return cut


@pytest.fixture(scope="module")
def stages(generator, decoder):
    return {"text_encoder": text_encoder_stage(generator.text_encoder.text_encoder),
            "denoiser": denoiser_stage(generator.transformer, latent_frames=4, latent_height=6, latent_width=6),
            "vae_decoder": vae_decoder_stage(generator.vae, latent_frames=2, latent_height=6, latent_width=6),
            "stitched_decoder": stitched_decoder_stage(decoder)}


@pytest.fixture(scope="module")
def artifacts(stages, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    return {name: export_onnx(stage, out) for name, stage in stages.items()}


@pytest.fixture(scope="module")
def backend(artifacts):
    return OnnxRuntimeBackend(artifacts, cache_dir=None)  # sessions on the graphs themselves


def torch_reference(name: str, stage: ExportStage, inputs: dict) -> dict:
    """The pipeline's own torch code for a stage (not the export wrapper)."""
    module = stage.module
    with torch.inference_mode():
        if name == "text_encoder":
            return {"embeddings": encode_tokens(module.text_encoder, inputs["input_ids"], inputs["attention_mask"])}
        if name == "denoiser":
            return {"velocity": module.transformer(hidden_states=inputs["latents"], timestep=inputs["timestep"],
                                                   encoder_hidden_states=inputs["encoder_hidden_states"],
                                                   return_dict=False)[0]}
        if name == "vae_decoder":
            return {"frames": decode(module.vae, inputs["latents"])}
        out = module.decoder(inputs["latent"], inputs["frames"])
        return {k: getattr(out, k) for k in stage.contract.output_names}


# --- every stage: onnxruntime == torch ---------------------------------------------------------


def test_every_stage_exports_with_dynamo(artifacts):
    for name, artifact in artifacts.items():
        assert (artifact.exporter, artifact.fallback_reason) == ("dynamo", None), name
        assert artifact.path.is_file() and artifact.sidecar.is_file() and artifact.external_data is None


@pytest.mark.parametrize("point", ["opt", "other"])
@pytest.mark.parametrize("name", list(OTHER_SIZES))
def test_onnxruntime_matches_torch(name, point, stages, backend):
    contract = stages[name].contract
    sizes = contract.profile.sizes("opt" if point == "opt" else OTHER_SIZES[name])
    if point == "other":  # the graph must be used at sizes it was not traced at
        assert all(sizes[d] != contract.profile.trace_sizes()[d] for d in contract.profile.dynamic_dims)
    inputs = contract.sample_inputs(sizes, seed=3)
    expected = torch_reference(name, stages[name], inputs)
    got = backend.run(name, inputs)
    assert list(got) == contract.output_names
    for key, shape in contract.shape_dict(sizes).items():
        if key in got:
            assert tuple(got[key].shape) == tuple(expected[key].shape) == shape, key
            error = (got[key] - expected[key]).abs().max() / expected[key].abs().max()
            assert error <= RTOL, f"{name}.{key}: relative error {error:.2e}"


def test_outside_the_profile_is_refused(stages, backend):
    contract = stages["stitched_decoder"].contract
    inputs = contract.sample_inputs({"latent_frames": 2})
    inputs["latent"] = torch.cat([inputs["latent"]] * 5, dim=2)  # 10 latent frames, profile max 8
    inputs["frames"] = torch.zeros(1, 3, 37, 42, 42)
    with pytest.raises(Vist3AInputError, match="latent_frames = 10 is outside the exported profile"):
        backend.run("stitched_decoder", inputs)
    bad = contract.sample_inputs()
    bad["frames"] = bad["frames"][:, :, :12]
    with pytest.raises(Vist3AInputError, match="'frames' axis 2 is 12, expected 4\\*latent_frames-3"):
        backend.run("stitched_decoder", bad)


# --- the graphs follow their contracts -----------------------------------------------------------


def _dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_graph_io_follows_the_contract(artifacts):
    for name, artifact in artifacts.items():
        model = onnx.load(str(artifact.path), load_external_data=False)
        contract = artifact.contract
        assert [i.name for i in model.graph.input] == contract.input_names
        assert [o.name for o in model.graph.output] == contract.output_names
        opt = contract.profile.sizes("opt")
        for value, spec in zip([*model.graph.input, *model.graph.output], [*contract.inputs, *contract.outputs]):
            dynamic = contract.dynamic_axes().get(spec.name, {})
            expected = [dynamic.get(i, size) for i, size in enumerate(spec.shape(opt))]
            assert _dims(value) == expected, (name, spec.name)
        assert len(model.graph.value_info) > 0  # shape inference ran
        assert {op.domain: op.version for op in model.opset_import}[""] == artifact.opset


def test_contract_names_axes_and_profiles(stages):
    denoiser = stages["denoiser"].contract
    assert denoiser.input_names == ["latents", "timestep", "encoder_hidden_states"]
    assert denoiser.output_names == ["velocity"]
    assert denoiser.dynamic_axes()["latents"] == {0: "batch", 2: "latent_frames", 3: "latent_height",
                                                  4: "latent_width"}
    assert denoiser.profile_shapes()["latents"] == ((1, 16, 1, 2, 2), (2, 16, 4, 6, 6), (8, 16, 8, 12, 12))
    assert denoiser.shape_dict()["encoder_hidden_states"] == (2, 512, 32)
    text = stages["text_encoder"].contract
    assert text.dynamic_axes() == {"input_ids": {0: "batch"}, "attention_mask": {0: "batch"},
                                   "embeddings": {0: "batch"}}
    vae = stages["vae_decoder"].contract
    assert vae.shape_dict({"batch": 3}) == {"latents": (3, 16, 2, 6, 6), "frames": (3, 3, 5, 48, 48)}
    stitched = stages["stitched_decoder"].contract
    assert stitched.input_names == ["latent", "frames"]
    assert stitched.output_names == ["means", "scales", "rotations", "harmonics", "opacities", "extrinsics",
                                     "intrinsics", "depth", "depth_conf"]
    assert stitched.dynamic_axes()["frames"] == {0: "batch", 2: "frames"}
    assert stitched.shape_dict({"latent_frames": 2})["harmonics"] == (1, 5 * 42 * 42, 3, 25)
    for contract in (denoiser, text, vae, stitched):
        assert ExportContract.from_dict(contract.to_dict()) == contract


def test_profile_rules():
    profile = Profile({"batch": 1, "frames": 1}, {"batch": 1, "frames": 4}, {"batch": 4, "frames": 8})
    assert profile.dynamic_dims == ("batch", "frames")
    assert profile.trace_sizes() == {"batch": 2, "frames": 4}  # >= 2 and distinct: no 0/1 specialization
    assert Profile({"a": 2}, {"a": 2}, {"a": 3}).trace_sizes() == {"a": 2}
    assert Profile.static({"a": 5}).dynamic_dims == ()
    with pytest.raises(Vist3AInputError, match="min <= opt <= max"):
        Profile({"batch": 2}, {"batch": 1}, {"batch": 4})
    with pytest.raises(Vist3AInputError, match="frames = 9 is outside"):
        profile.sizes({"frames": 9})
    axis = Axis("latent_frames", 4, -3, label="frames")
    assert (axis.name, axis.to_text(), Axis.parse(axis.to_text())) == ("frames", "frames=4*latent_frames-3", axis)


# --- the cache, refusals, fallbacks ----------------------------------------------------------------


def test_second_export_is_a_no_op(stages, artifacts):
    first = artifacts["denoiser"]
    stamp = first.path.stat().st_mtime_ns
    start = time.perf_counter()
    again = export_onnx(stages["denoiser"], first.path.parent)
    assert again.skipped and time.perf_counter() - start < 5.0
    assert (again.path, again.key, again.exporter) == (first.path, first.key, first.exporter)
    assert first.path.stat().st_mtime_ns == stamp
    assert OnnxArtifact.load(first.path).key == first.key


def test_key_covers_profile_and_precision(generator, stages):
    stage = stages["text_encoder"]
    wider = text_encoder_stage(generator.text_encoder.text_encoder,
                               profile=Profile({"batch": 1}, {"batch": 1}, {"batch": 8}))
    assert artifact_key(wider) != artifact_key(stage) == artifact_key(stage)
    assert artifact_key(stage, opset=18) != artifact_key(stage)
    with pytest.raises(Vist3AInputError, match="precision 'fp16' cannot be exported yet"):
        export_onnx(stage, "unused", precision="fp16")


def test_voxelizing_decoder_is_refused(decoder, monkeypatch):
    monkeypatch.setattr(decoder.config.encoder, "voxelize", True)
    with pytest.raises(ExportUnsupportedError, match="voxelize"):
        stitched_decoder_stage(decoder)
    monkeypatch.setattr(decoder.config.encoder, "voxelize", False)
    monkeypatch.setattr(decoder.config.encoder, "render_conf", True)
    with pytest.raises(ExportUnsupportedError, match="render_conf"):
        stitched_decoder_stage(decoder)


class _Branchy(nn.Module):
    """Python control flow on a tensor value: torch.export refuses it, TorchScript traces one branch."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x) if bool(x.sum() > -1e9) else -x


def _toy_stage(module: nn.Module) -> ExportStage:
    contract = ExportContract("toy", inputs=(TensorSpec("x", (Axis("batch"), 4)),),
                              outputs=(TensorSpec("y", (Axis("batch"), 4)),),
                              profile=Profile({"batch": 1}, {"batch": 2}, {"batch": 6}))
    return ExportStage(contract, module)


def test_torchscript_fallback_is_recorded(tmp_path):
    stage = _toy_stage(_Branchy())
    with pytest.warns(torch.jit.TracerWarning):
        artifact = export_onnx(stage, tmp_path)
    assert artifact.exporter == "torchscript" and artifact.fallback_reason  # why dynamo was not used
    assert OnnxArtifact.load(artifact.path).exporter == "torchscript"
    x = torch.randn(5, 4)
    got = OnnxRuntimeBackend({"toy": artifact}).run("toy", {"x": x})["y"]
    torch.testing.assert_close(got, stage.reference({"x": x})["y"], rtol=1e-5, atol=1e-6)


def test_external_data_and_a_damaged_artifact(tmp_path):
    stage = _toy_stage(nn.Sequential(nn.Linear(4, 64), nn.GELU(), nn.Linear(64, 4)))
    artifact = export_onnx(stage, tmp_path, external_data_threshold=0)
    assert artifact.exporter == "dynamo" and artifact.external_data.is_file()
    x = torch.randn(3, 4)
    got = OnnxRuntimeBackend({"toy": artifact.path}).run("toy", {"x": x})["y"]  # a path: contract from the sidecar
    torch.testing.assert_close(got, stage.reference({"x": x})["y"], rtol=1e-5, atol=1e-6)
    assert export_onnx(stage, tmp_path, external_data_threshold=0).skipped
    artifact.external_data.write_bytes(b"truncated")
    assert not export_onnx(stage, tmp_path, external_data_threshold=0).skipped


# --- the backend -----------------------------------------------------------------------------------


def test_backend_protocol_and_session_options(backend):
    assert isinstance(backend, Backend)
    assert backend.stages == tuple(OTHER_SIZES)
    assert backend.providers == ["CPUExecutionProvider"]
    options = backend.stage("denoiser").session.get_session_options()
    ort = import_onnxruntime()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.intra_op_num_threads == physical_cores() <= (os.cpu_count() or 1)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_optimized_graphs_are_cached(artifacts, stages, backend, tmp_path, monkeypatch):
    """The second backend loads the optimized graphs the first saved; outputs are bit-identical."""
    first = OnnxRuntimeBackend(artifacts, cache_dir=tmp_path)
    entries = sorted(tmp_path.iterdir())
    assert len(entries) == len(artifacts) and all(not p.name.startswith(".") for p in entries)
    second = OnnxRuntimeBackend(artifacts, cache_dir=tmp_path)
    ort = import_onnxruntime()
    for name in artifacts:
        stage = second.stage(name)
        assert stage.cached_graph in entries and first.stage(name).cached_graph == stage.cached_graph
        level = stage.session.get_session_options().graph_optimization_level
        assert level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # optimized once, by the first
        inputs = stages[name].contract.sample_inputs("opt", seed=3)
        expected = backend.run(name, inputs)
        for key, value in second.run(name, inputs).items():
            assert torch.equal(value, expected[key]), (name, key)
    damaged = second.stage("denoiser").cached_graph
    damaged.write_bytes(b"not a graph")
    assert OnnxRuntimeBackend({"denoiser": artifacts["denoiser"]}, cache_dir=tmp_path).stage("denoiser").cached_graph
    assert damaged.stat().st_size > 100  # rebuilt
    monkeypatch.setenv("VIST3A_CACHE_DIR", "")
    assert OnnxRuntimeBackend({"denoiser": artifacts["denoiser"]}).stage("denoiser").cached_graph is None
    monkeypatch.setenv("VIST3A_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert OnnxRuntimeBackend({"denoiser": artifacts["denoiser"]}).stage("denoiser").cached_graph.parent == \
        tmp_path / "elsewhere" / "onnxruntime"


def test_backend_input_errors(stages, backend):
    inputs = stages["text_encoder"].contract.sample_inputs()
    with pytest.raises(Vist3AInputError, match="no stage 'render'"):
        backend.run("render", inputs)
    with pytest.raises(Vist3AInputError, match="takes inputs"):
        backend.run("text_encoder", {"input_ids": inputs["input_ids"]})
    with pytest.raises(Vist3AInputError, match="'input_ids' must be a torch.int64 tensor, got torch.int32"):
        backend.run("text_encoder", {**inputs, "input_ids": inputs["input_ids"].int()})


def test_missing_onnxruntime_and_cuda_are_explained(monkeypatch):
    if "CUDAExecutionProvider" not in import_onnxruntime().get_available_providers():
        with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider.*vist3a-rt\\[gpu\\]"):
            choose_providers("cuda")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(BackendUnavailableError, match="pip install 'vist3a-rt\\[onnx\\]'"):
        import_onnxruntime()
