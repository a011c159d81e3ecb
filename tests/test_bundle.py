"""Bundles: ``export_bundle`` / ``vist3a-rt export``, and generating from a bundle.

The source is the tiny official-layout model with its stitched decoder cut to 4 aggregator rounds
and one camera-head pass (as in ``test_export_onnx``: the full 24-round decoder takes minutes to
export on a 2-core machine and adds no new ops). The module exports it once (~1-2 min: the
stitched decoder's ONNX export dominates); every other export below reuses that bundle's valid
steps, so it only converts or re-exports what it must.

Tolerances, fp32: each stage's onnxruntime output within 1e-4 of eager torch relative to the
output's largest magnitude; ``generate`` through the bundle: latents within 1e-4 (relative) of the
torch pipeline's, a rendered view within 40 dB PSNR; the samplers within 1e-5 of diffusers'.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

for _module in ("onnx", "onnxruntime", "onnxscript"):
    pytest.importorskip(_module, reason=f"{_module} is not installed (pip install 'vist3a-rt[onnx]')")
pytest.importorskip("diffusers")

import onnx  # noqa: E402

from vist3a_rt import Vist3A, render  # noqa: E402
from vist3a_rt.bundle import is_bundle, read_manifest  # noqa: E402
from vist3a_rt.bundle import context as text_context  # noqa: E402
from vist3a_rt.bundle.format import FORMAT, FORMAT_VERSION, STAGES, sha256_file  # noqa: E402
from vist3a_rt.bundle.pipeline import BundlePipeline  # noqa: E402
from vist3a_rt.bundle.samplers import make_sampler  # noqa: E402
from vist3a_rt.bundle.text import BundleTokenizer, clean_prompt  # noqa: E402
from vist3a_rt.cli import main  # noqa: E402
from vist3a_rt.errors import CheckpointError, Vist3AInputError  # noqa: E402
from vist3a_rt.export.bundle import export_bundle  # noqa: E402
from vist3a_rt.export.onnx_export import OnnxArtifact  # noqa: E402
from vist3a_rt.export.spec import ExportContract  # noqa: E402
from vist3a_rt.generator.latents import decode  # noqa: E402
from vist3a_rt.generator.sampling import (apply_guidance, denoise, guidance_context, initial_noise,  # noqa: E402
                                          make_scheduler, predict_velocity)
from vist3a_rt.generator.text import OFFICIAL_NEGATIVE_PROMPT, encode_tokens, tokenize, wrap_prompt  # noqa: E402
from vist3a_rt.generator.text import clean_prompt as diffusers_clean  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

STAGE_RTOL = 1e-4
PROMPT = "a red cube on a blue sphere"


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a - b) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


# --- fixtures: the source, its bundle, both pipelines ------------------------------------------------


def write_reduced_tiny_model(path: Path) -> Path:
    """The tiny model with a 4-round aggregator and one camera-head pass (its own weights)."""
    from vist3a_rt.testing import tiny_model

    full = tiny_model.tiny_decoder_config

    def reduced(**sizes):
        cfg = full(**sizes)
        taps = [0, 1, 2, 3]
        return dataclasses.replace(
            cfg, encoder=dataclasses.replace(cfg.encoder, intermediate_layer_idx=taps),
            architecture=dataclasses.replace(cfg.architecture, agg_depth=4, stitched_intermediate_layer_idx=taps,
                                             cam_trunk_depth=1, cam_num_iterations=1))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiny_model, "tiny_decoder_config", reduced)
        return tiny_model.write_tiny_model(path)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_reduced_tiny_model(tmp_path_factory.mktemp("source") / "model")


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    return export_bundle(source, tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture(scope="module")
def bundle(exported) -> Path:
    return exported.bundle


@pytest.fixture(scope="module")
def reference(source):
    return Vist3A.load(source)


@pytest.fixture(scope="module")
def runtime(bundle):
    return BundlePipeline.load(bundle, intra_op_threads=1)


def copy_of(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    return target


# --- the manifest --------------------------------------------------------------------------------


def test_manifest_describes_the_bundle(exported, bundle, source, reference):
    manifest = read_manifest(bundle)
    assert is_bundle(bundle) and manifest["format"] == FORMAT and manifest["format_version"] == FORMAT_VERSION == 2
    assert (manifest["family"], manifest["precision"]) == ("wan-anysplat", "fp32")
    assert set(manifest["stage_precisions"].values()) == {"fp32"}
    assert manifest["source"]["files"] == {str(p.relative_to(source)): sha256_file(p)
                                          for p in sorted(source.rglob("*")) if p.is_file()}
    tools = manifest["created_with"]
    assert {"torch", "onnx", "onnxruntime", "vist3a-rt", "git_commit"} <= set(tools)
    assert tools["torch"] != "absent" and tools["onnxruntime"] != "absent"
    # every artifact is there with its recorded hash; every file of the bundle is an artifact
    files = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()} - {"manifest.json"}
    assert files == set(manifest["artifacts"])
    for name, entry in manifest["artifacts"].items():
        assert sha256_file(bundle / name) == entry["sha256"] and len(entry["key"]) == 64, name
    # stages: graphs, contracts, profiles
    assert list(manifest["stages"]) == list(STAGES)
    for name, stage in manifest["stages"].items():
        contract = ExportContract.from_dict(stage["contract"])
        assert contract.stage == name and stage["exporter"] == "dynamo" and stage["precision"] == "fp32"
        graph = onnx.load(str(bundle / stage["onnx"]), load_external_data=False)
        assert [i.name for i in graph.graph.input] == contract.input_names
        assert OnnxArtifact.load(bundle / stage["onnx"]).key == stage["key"]
    denoiser = ExportContract.from_dict(manifest["stages"]["denoiser"]["contract"])
    assert denoiser.profile_shapes()["latents"] == ((1, 16, 4, 6, 6), (2, 16, 4, 6, 6), (8, 16, 4, 6, 6))
    assert denoiser.input_names == ["latents", "timestep", "context", "context_log_counts"]
    assert set(denoiser.profile.dynamic_dims) == {"batch", "text_keys"}  # latent sizes static, as the VAE's
    # what the runtime needs besides the graphs
    generation = manifest["generation"]
    assert generation["latent_shape"] == [1, 16, 4, 6, 6] and generation["frame_size"] == [42, 42]
    assert (generation["defaults"]["num_frames"], generation["max_sequence_length"]) == (13, 512)
    vae = reference.generator.vae.config
    assert manifest["latents"]["mean"] == list(vae.latents_mean) and manifest["latents"]["std"] == list(vae.latents_std)
    assert manifest["configs"]["stitched_decoder"] == reference.decoder.config.to_dict()
    assert manifest["classes"]["transformer"] == "diffusers.WanTransformer3DModel"
    assert manifest["negative_prompt"]["text"] == OFFICIAL_NEGATIVE_PROMPT
    scheduler = json.loads((bundle / manifest["scheduler"]).read_text())
    assert scheduler["_class_name"] == "UniPCMultistepScheduler"
    steps = ", ".join(f"{s.name} {s.seconds:.1f} s" for s in exported.steps)
    print(f"\nexport: {manifest['export']['seconds']:.1f} s; {steps}")


# --- every stage: onnxruntime == torch -----------------------------------------------------------------


@pytest.fixture(scope="module")
def on_torch(bundle):
    """The bundle on the torch backend: the library classes the export was made from."""
    return Vist3A.load(bundle, backend="torch")


def torch_stage(reference, name: str, inputs: dict, on_torch) -> dict:
    """The torch pipeline's own code for a stage (the denoiser's two graphs: their modules on the
    exported diffusers transformer; ``test_the_split_denoiser_is_the_transformer`` checks the
    pair against the pipeline's transformer)."""
    from vist3a_rt.export.denoiser_split import DenoiserContext, DenoiserStep

    generator = reference.generator
    with torch.inference_mode():
        if name == "text_encoder":
            return {"embeddings": encode_tokens(generator.components.text_encoder, inputs["input_ids"],
                                                inputs["attention_mask"])}
        if name == "denoiser_context":
            return {"context": DenoiserContext(on_torch.generator.transformer)(inputs["encoder_hidden_states"])}
        if name == "denoiser":
            return {"velocity": DenoiserStep(on_torch.generator.transformer)(*inputs.values())}
        if name == "vae_decoder":
            return {"frames": decode(generator.vae, inputs["latents"])}
        out = reference.decoder(inputs["latent"], inputs["frames"])
        return {k: getattr(out, k) for k in ("means", "scales", "rotations", "harmonics", "opacities", "extrinsics",
                                             "intrinsics", "depth", "depth_conf")}


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_matches_torch(name, runtime, reference, on_torch):
    contract = ExportContract.from_dict(runtime.manifest["stages"][name]["contract"])
    inputs = contract.sample_inputs("opt", seed=7)
    expected = torch_stage(reference, name, inputs, on_torch)
    got = runtime.backend.run(name, inputs)
    errors = {key: relative_error(got[key], expected[key]) for key in expected}
    print(f"\n{name}: " + ", ".join(f"{k} {e:.1e}" for k, e in errors.items()))
    assert max(errors.values()) <= STAGE_RTOL, errors


def test_the_split_denoiser_is_the_transformer(runtime, reference):
    """Trimmed text → context graph → step graph == the transformer on the padded embeddings."""
    from vist3a_rt.bench.agreement import denoiser_split_agreement

    error = denoiser_split_agreement(runtime, reference)
    print(f"\nsplit denoiser vs transformer: {error:.1e}")
    assert error <= STAGE_RTOL


@pytest.mark.parametrize("lengths, total", [((3, 5), 9), ((9, 4), 9), ((8, 2), 9), ((0, 0), 4), ((1,), 6)])
def test_trimmed_keys_with_log_counts_are_full_attention(lengths, total):
    """Attention over every padded position == over the trimmed ones with their log counts."""
    generator = torch.Generator().manual_seed(sum(lengths) + total)
    rows = [torch.cat([torch.randn(1, n, 8, generator=generator), torch.zeros(1, total - n, 8)], dim=1)
            for n in lengths]
    key_of, value_of = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)  # zero rows → one shared key and value
    query = torch.randn(len(rows), 2, 5, 8, generator=generator)
    with torch.no_grad():
        full = torch.cat(rows)
        attention = torch.nn.functional.scaled_dot_product_attention
        expected = attention(query, key_of(full)[:, None], value_of(full)[:, None])
        parts = []
        for row in rows:
            trimmed, used = text_context.trim(row)
            assert used == int(row.ne(0).any(-1).sum()) and trimmed.shape[1] == min(used + 1, total)
            parts.append((torch.cat([key_of(trimmed), value_of(trimmed)], dim=-1), used))
        joined, log_counts = text_context.join(parts, total)
        keys, values = joined[..., :8], joined[..., 8:]
        got = attention(query, keys[:, None], values[:, None], attn_mask=log_counts[None, :])
    assert keys.shape[1] == min(max(lengths) + 1, total) == len(log_counts)
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-5)


def test_each_prompt_context_is_computed_once(runtime):
    calls = []
    run = runtime.backend.run
    runtime.backend.run = lambda stage, inputs: (calls.append(stage), run(stage, inputs))[1]
    try:
        runtime.generate("a green cone", num_steps=2)
        runtime.generate("a green cone", num_steps=2)
    finally:
        runtime.backend.run = run
    assert calls.count("denoiser_context") <= 2 and calls.count("text_encoder") <= 2  # the negative: once at most
    assert calls.count("denoiser") == 4


# --- generate through the bundle ---------------------------------------------------------------------


def test_generate_matches_the_torch_pipeline(runtime, reference):
    expected = reference.generate(PROMPT, seed=3, num_steps=4)
    got = runtime.generate(PROMPT, seed=3, num_steps=4)
    assert got.settings["backend"] == "onnxruntime" and set(got.timings) == set(expected.timings)
    latent_error = relative_error(got.latents, expected.latents)
    assert latent_error <= 1e-4
    assert relative_error(got.frames, expected.frames) <= 2e-3
    assert len(got.scene) == len(expected.scene)
    assert torch.allclose(got.cameras.camtoworld, expected.cameras.camtoworld, atol=1e-4)
    values = []
    for view in (0, 6):
        camera = expected.cameras[view]
        values.append(psnr(render(got.scene, camera, backend="torch").color,
                           render(expected.scene, camera, backend="torch").color))
    print(f"\nlatents {latent_error:.1e}, preview PSNR {[round(v, 1) for v in values]} dB")
    assert min(values) >= 40.0


def test_other_settings_match_too(runtime, reference):
    """Euler, no guidance (no negative prompt), a custom negative prompt, no template, explicit latents."""
    cases = [{"sampler": "euler", "guidance_scale": 1.0}, {"negative_prompt": "blurry", "use_prompt_template": False}]
    for settings in cases:
        noise = torch.randn(1, 16, 4, 6, 6, generator=torch.Generator().manual_seed(11))
        expected = reference.generate(PROMPT, latents=noise, num_steps=3, **settings)
        got = runtime.generate(PROMPT, latents=noise, num_steps=3, **settings)
        assert relative_error(got.latents, expected.latents) <= 1e-4, settings


def test_the_cached_negative_prompt_is_the_encoders(runtime):
    cached = runtime.encode_prompt(OFFICIAL_NEGATIVE_PROMPT, allow_empty=True)
    runtime._cache.clear()
    fresh = runtime.encode_prompt(OFFICIAL_NEGATIVE_PROMPT, allow_empty=True)
    assert relative_error(cached, fresh) <= STAGE_RTOL


def test_sizes_fixed_by_the_export_are_enforced(runtime):
    with pytest.raises(Vist3AInputError, match="exported for 13 frames of 48x48 px, got 9 frames"):
        runtime.generate(PROMPT, num_frames=9)
    with pytest.raises(Vist3AInputError, match="the prompt is empty"):
        runtime.generate("  ")
    with pytest.raises(Vist3AInputError, match="unknown generation settings"):
        runtime.generate(PROMPT, steps=3)


def test_vist3a_load_picks_the_bundle_backends(bundle, source, reference):
    assert isinstance(Vist3A.load(bundle), BundlePipeline)  # auto: onnxruntime, installed here
    on_torch = Vist3A.load(bundle, backend="torch")
    assert isinstance(on_torch, Vist3A)
    expected = reference.generate(PROMPT, seed=2, num_steps=2)
    got = on_torch.generate(PROMPT, seed=2, num_steps=2)
    assert torch.equal(got.latents, expected.latents) and torch.equal(got.scene.means, expected.scene.means)
    with pytest.raises(Vist3AInputError, match="backend 'tensorrt' cannot run a bundle yet"):
        Vist3A.load(bundle, backend="tensorrt")
    with pytest.raises(Vist3AInputError, match="needs an exported bundle"):
        Vist3A.load(source, backend="onnxruntime")
    with pytest.raises(Vist3AInputError, match="explicit paths"):
        Vist3A.load(bundle, wan=source / "wan")


def test_bundle_path_imports_no_diffusers_or_transformers(bundle):
    script = (f"import sys, torch\ntorch.set_num_threads(1)\nfrom vist3a_rt import Vist3A\n"
              f"model = Vist3A.load({str(bundle)!r}, backend='onnxruntime')\n"
              f"result = model.generate('a red cube', num_steps=2)\nassert len(result.scene) > 0\n"
              "print('LEAKED', sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'transformers', 'peft'}))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LEAKED []" in done.stdout


# --- the pieces of the runtime against the torch path's ---------------------------------------------------


ODD_PROMPTS = ["a red cube", wrap_prompt(PROMPT), OFFICIAL_NEGATIVE_PROMPT, "", "   ", "UPPER case, punct!?;:",
               "Ünïcödé café ﬁ ½ 東京 🙂 &amp;amp; <b>tag</b>\t\n new\x1cline\u00a0nbsp\u2003em\u200bzw",
               " ".join(["red cube"] * 300), "x" * 2000, "</s> <pad> <unk> inside", "  multiple   spaces  "]


def test_tokenizer_matches_transformers(source):
    import warnings

    from transformers import AutoTokenizer

    folder = source / "wan" / "tokenizer"
    expected_tokenizer, ours = AutoTokenizer.from_pretrained(folder, local_files_only=True), BundleTokenizer(folder)
    assert ours.unk_token_id == expected_tokenizer.unk_token_id
    for prompt in ODD_PROMPTS:
        cleaned = clean_prompt(prompt)
        assert cleaned == diffusers_clean(prompt), prompt
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # both warn alike about truncated prompts
            ids, mask = ours.encode([cleaned], 512)
            expected_ids, expected_mask = tokenize(expected_tokenizer, [cleaned], 512)
        assert torch.equal(ids, expected_ids) and torch.equal(mask, expected_mask), prompt
        assert ours(cleaned, add_special_tokens=False).input_ids == \
            expected_tokenizer(cleaned, add_special_tokens=False).input_ids


@pytest.mark.parametrize("sampler, config", [("unipc", {}), ("unipc", {"solver_order": 3}),
                                             ("unipc", {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
                                             ("euler", {})])
def test_samplers_match_diffusers(sampler, config, reference):
    generator = reference.generator
    base = {**generator.components.scheduler_config, **config}
    cond, uncond = generator.encode_prompt([PROMPT]), generator.encode_prompt([OFFICIAL_NEGATIVE_PROMPT])
    noise = initial_noise((1, 16, 4, 6, 6), 5, "cpu")
    expected = denoise(generator.transformer, make_scheduler(sampler, 3.0, base), noise, cond, uncond,
                       num_steps=7, guidance_scale=4.0)
    ours, latents = make_sampler(sampler, 7, 3.0, base), noise
    context = guidance_context(cond, uncond, 4.0)
    with torch.no_grad():
        for t in ours.timesteps:
            velocity = predict_velocity(generator.transformer, latents, t, context)
            latents = ours.step(apply_guidance(velocity, 1, 4.0), latents)
    assert relative_error(latents, expected) <= 1e-5


def test_sampler_refuses_what_it_does_not_implement():
    with pytest.raises(Vist3AInputError, match="use_karras_sigmas"):
        make_sampler("unipc", 4, 5.0, {"_class_name": "UniPCMultistepScheduler", "use_karras_sigmas": True})
    with pytest.raises(Vist3AInputError, match="unknown sampler 'ddim'"):
        make_sampler("ddim", 4, 5.0)


# --- re-exporting --------------------------------------------------------------------------------------


def test_second_export_reexports_nothing(source, bundle, tmp_path):
    target = copy_of(bundle, tmp_path)
    inodes = lambda: {p.relative_to(target): p.stat().st_ino for p in target.rglob("*")  # noqa: E731
                      if p.is_file() and p.name != "manifest.json"}
    before = inodes()
    start = time.perf_counter()
    report = export_bundle(source, target)
    seconds = time.perf_counter() - start
    assert report.made == [] and len(report.steps) == 12  # 4 weights, tokenizer, scheduler, negative, 5 graphs
    assert inodes() == before  # the same files (hard-linked), not rewritten
    assert seconds < 60  # loading the source and hashing; the first export took minutes
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_a_corrupted_artifact_is_reexported(source, bundle, tmp_path):
    target = copy_of(bundle, tmp_path)
    manifest = read_manifest(target)
    graph = target / manifest["stages"]["text_encoder"]["onnx"]
    weights = target / "weights" / "vae.safetensors"
    for path in (graph, weights):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
        path.write_bytes(bytes(data))
    report = export_bundle(source, target)
    assert sorted(report.made) == ["onnx/text_encoder", "weights/vae"]
    manifest = read_manifest(target)
    for name, entry in manifest["artifacts"].items():
        assert sha256_file(target / name) == entry["sha256"], name


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_bundles(precision, source, bundle, tmp_path):
    """Onto a copy of the fp32 bundle: the reduced stages are converted from its fp32 graphs."""
    target = copy_of(bundle, tmp_path)
    report = export_bundle(source, target, precision=precision)
    reduced = {"fp16": ["denoiser", "stitched_decoder"], "bf16": ["text_encoder", "denoiser", "stitched_decoder"]}
    components = {"denoiser": "transformer", "stitched_decoder": "stitched_decoder", "text_encoder": "text_encoder"}
    assert sorted(report.made) == sorted([f"onnx/{s}" for s in reduced[precision]] +
                                         [f"weights/{components[s]}" for s in reduced[precision]])
    manifest = read_manifest(target)
    assert manifest["precision"] == precision
    element = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}[precision]
    for name, stage in manifest["stages"].items():
        graph = onnx.load(str(target / stage["onnx"]))
        onnx.checker.check_model(graph, full_check=True)
        floats = {init.data_type for init in graph.graph.initializer} - {onnx.TensorProto.INT64,
                                                                          onnx.TensorProto.BOOL}
        io = {v.type.tensor_type.elem_type for v in [*graph.graph.input, *graph.graph.output]}
        assert io <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}, name  # I/O stays float32
        if name in reduced[precision]:
            assert stage["precision"] == precision and element in floats and onnx.TensorProto.FLOAT not in floats
        else:
            assert stage["precision"] == "fp32" and floats == {onnx.TensorProto.FLOAT}, name
    from vist3a_rt.bundle.weights import load_state

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert load_state(target / "weights" / "transformer.safetensors")["proj_out.weight"].dtype == dtype
    assert load_state(target / "weights" / "vae.safetensors")["post_quant_conv.weight"].dtype == torch.float32


# --- the command and its refusals ---------------------------------------------------------------------


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_cli_refuses_bad_sources_without_writing(tmp_path, bundle, capsys):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    cases = [(tmp_path / "missing", "model folder not found"), (tmp_path / "empty", "is missing"),
             (bundle, "already an exported bundle")]
    for bad, message in cases:
        assert main(["export", "--checkpoint", str(bad), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert _entries(tmp_path) == ["empty"]


def test_cli_refuses_unusable_destinations(tmp_path, source, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cases = [(blocker / "bundle", "not a writable directory"), (blocker, "exists and is not a directory"),
             (foreign, "not a vist3a-rt bundle"), (source / "bundle", "must not contain each other")]
    for out, message in cases:
        assert main(["export", "--checkpoint", str(source), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert _entries(tmp_path) == ["a_file", "foreign"] and _entries(foreign) == ["notes.txt"]
    assert main(["export", "--checkpoint", str(source), "--out", str(tmp_path / "b"), "--precision", "int8"]) == 2


def test_a_failed_export_leaves_nothing(source, tmp_path, monkeypatch):
    from vist3a_rt.export import bundle as exporter

    def fail(self):
        raise RuntimeError("simulated failure mid-export")

    monkeypatch.setattr(exporter._BundleWriter, "negative_prompt", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        export_bundle(source, tmp_path / "deep" / "bundle")
    assert _entries(tmp_path / "deep") == []


def test_cli_tensorrt_backend_writes_the_bundle_then_explains(source, bundle, tmp_path, capsys):
    target = copy_of(bundle, tmp_path)
    code = main(["export", "--checkpoint", str(source), "--out", str(target), "--backend", "tensorrt"])
    err = capsys.readouterr().err
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert code == 2 and "TensorRT is not installed here" in err and "ONNX bundle" in err
        assert is_bundle(target)
    else:
        pytest.skip("tensorrt is installed: engine builds are tested with the TensorRT path")


def test_embedded_nano_source_when_not_installed(tmp_path, monkeypatch):
    import vist3a_rt.models as models

    monkeypatch.setattr(models, "embedded_model_dir", lambda name="nano": tmp_path / "no-package" / name)
    with pytest.raises(CheckpointError, match="embedded model 'nano' is not installed"):
        export_bundle("nano", tmp_path / "nano_bundle")
    assert _entries(tmp_path) == []  # nothing written


# --- the bench on a bundle: onnxruntime rows with per-stage agreement ------------------------------------


def test_bench_checks_every_stage_of_a_bundle(bundle):
    from vist3a_rt.bench import BenchSettings, format_report, run_bench

    settings = BenchSettings(model=str(bundle), backends=("torch", "onnxruntime"), repeats=1, warmup=0, steps=2,
                             threads=(1,), cold_start=False, preview_frames=2, preview_size=32)
    report = run_bench(settings)
    torch_row, ort_row = report["backends"]
    assert (torch_row["backend"], ort_row["backend"], ort_row["status"]) == ("torch", "onnxruntime", "ok")
    assert torch_row["threads"] == ort_row["threads"] == 1
    stages = ort_row["agreement"]["stages"]
    assert list(stages) == [*STAGES, "denoiser_split"]
    assert max(max(errors.values()) for errors in stages.values()) <= STAGE_RTOL, stages
    assert ort_row["agreement"]["latents_max_rel"] <= 1e-4 and ort_row["agreement"]["render_psnr_db"] >= 40.0
    table = format_report(report)
    assert "onnxruntime (1 thr)" in table and "denoiser_split vs torch: max rel" in table
    assert "load average" in table


def test_scene_of_tolerates_an_opacity_an_ulp_above_one():
    # onnxruntime's sigmoid returned 1.0000001 for a nano Gaussian at 2 threads; the scene refuses > 1
    from vist3a_rt.bundle.pipeline import scene_of

    n = 4
    output = {"means": torch.zeros(1, n, 3), "scales": torch.full((1, n, 3), 0.1),
              "rotations": torch.tensor([[0.0, 0.0, 0.0, 1.0]]).expand(1, n, 4),
              "harmonics": torch.zeros(1, n, 3, 1),
              "opacities": torch.tensor([[0.0, 0.5, 1.0, 1.0000001]])}
    scene = scene_of(output)
    assert float(scene.opacities.max()) == 1.0 and float(scene.opacities.min()) == 0.0
