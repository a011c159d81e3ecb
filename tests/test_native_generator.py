"""The native Wan generator (``impl="native"``: no diffusers, transformers or peft) end to end: the
official goldens (../shared/fixtures/e2e_tiny), the LoRA merge against PEFT's, the embedded nano model
against the diffusers implementation on the same seed, and a fresh process that never imports the
libraries. Tolerances as in test_generator_e2e.py / test_native_wan.py.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from vist3a_rt.errors import CheckpointError, Vist3AInputError
from vist3a_rt.generator import WanGenerator
from vist3a_rt.generator.loading import resolve_impl
from vist3a_rt.generator.native.loading import load_transformer

pytestmark = pytest.mark.usefixtures("single_thread")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


@pytest.fixture(scope="module")
def e2e():
    from conftest import fixture_dir
    from safetensors.torch import load_file

    root = fixture_dir("e2e_tiny")
    return root, json.loads((root / "settings.json").read_text()), load_file(root / "golden.safetensors")


def test_native_generator_reproduces_official_goldens(e2e):
    from vist3a_rt.generator import OFFICIAL_NEGATIVE_PROMPT, wrap_prompt
    from vist3a_rt.generator.sampling import predict_velocity
    from vist3a_rt.generator.text import tokenize

    root, settings, golden = e2e
    generator = WanGenerator.from_folder(root / "model" / "wan", root / "model" / "lora", impl="native")
    ids, mask = tokenize(generator.components.tokenizer, [settings["wrapped_prompt"]])
    assert torch.equal(ids, golden["intermediate.prompt_input_ids"]) and torch.equal(
        mask, golden["intermediate.prompt_attention_mask"])
    embeds = generator.encode_prompt([wrap_prompt(settings["prompt"])]), generator.encode_prompt(
        [OFFICIAL_NEGATIVE_PROMPT])
    torch.testing.assert_close(embeds[0], golden["intermediate.prompt_embeds"], atol=1e-5, rtol=0)
    torch.testing.assert_close(embeds[1], golden["intermediate.negative_prompt_embeds"], atol=1e-5, rtol=0)
    with torch.no_grad():
        cond, uncond = predict_velocity(generator.transformer, golden["inputs.noise"],
                                        golden["intermediate.scheduler_timesteps"][0], torch.cat(embeds)).chunk(2)
    torch.testing.assert_close(cond, golden["intermediate.step0.noise_pred_cond"], atol=1e-5, rtol=0)
    torch.testing.assert_close(uncond, golden["intermediate.step0.noise_pred_uncond"], atol=1e-5, rtol=0)
    final = generator.sample(*embeds, num_frames=settings["num_frames"], height=settings["height"],
                             width=settings["width"], num_steps=settings["num_inference_steps"],
                             guidance_scale=settings["guidance_scale"], flow_shift=settings["flow_shift"],
                             latents=golden["inputs.noise"])
    torch.testing.assert_close(final, golden["intermediate.final_latents"], atol=1e-4, rtol=1e-4)
    frames = generator.decode(generator.denormalize(final))
    torch.testing.assert_close(frames, golden["intermediate.decoded_frames"], atol=5e-4, rtol=0)


def test_native_lora_merge_equals_peft_merge(e2e):
    root = e2e[0]
    wan, lora = root / "model" / "wan", root / "model" / "lora"
    native = WanGenerator.from_folder(wan, lora, impl="native").transformer.state_dict()
    library = WanGenerator.from_folder(wan, lora, impl="diffusers").transformer.state_dict()
    plain = load_transformer(wan / "transformer").state_dict()
    assert set(native) == set(library)
    for name in native:
        torch.testing.assert_close(native[name], library[name], atol=1e-6, rtol=1e-6)
    assert (native["blocks.0.attn1.to_q.weight"] - plain["blocks.0.attn1.to_q.weight"]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def nano_runs():
    import vist3a_rt as vr

    settings = dict(seed=0, num_steps=3)
    runs = {}
    for impl in ("native", "diffusers"):
        model = vr.Vist3A.load("nano", wan_impl=impl)
        assert model.generator.impl == impl
        runs[impl] = model.generate("a red cube left of a blue sphere", **settings)
    return runs


def test_nano_generate_native_equals_diffusers(nano_runs):
    native, library = nano_runs["native"], nano_runs["diffusers"]
    assert relative_error(native.latents, library.latents) <= 1e-5
    assert (native.frames - library.frames).abs().max() <= 1e-4  # frames in [-1, 1]
    assert len(native.scene) == len(library.scene)
    assert relative_error(native.scene.means, library.scene.means) <= 1e-4


def test_native_path_imports_no_library(tmp_path):
    """A fresh process: load nano, generate once; diffusers, transformers and peft never imported."""
    script = ("import sys, vist3a_rt as vr\n"
              "vr.Vist3A.load('nano', wan_impl='native').generate('a red cube', seed=0, num_steps=1)\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers', 'peft')))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("VIST3A_WAN_IMPL", None)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_bad_lora_for_native(e2e, tmp_path):
    root = e2e[0]
    lora = tmp_path / "lora"
    shutil.copytree(root / "model" / "lora", lora)
    config = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CheckpointError, match=r"sets \['use_dora'\].*impl='diffusers'"):
        WanGenerator.from_folder(root / "model" / "wan", lora, impl="native")
    (lora / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["attn3.to_q"]}))
    with pytest.raises(CheckpointError, match=r"\['attn3.to_q'\] do not exist"):
        WanGenerator.from_folder(root / "model" / "wan", lora, impl="native")
    (lora / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    with pytest.raises(CheckpointError, match="rank 4 in adapter_config.json"):
        WanGenerator.from_folder(root / "model" / "wan", lora, impl="native")


# --- choosing the implementation -------------------------------------------------------------------


def test_resolve_impl(monkeypatch):
    monkeypatch.delenv("VIST3A_WAN_IMPL", raising=False)
    assert resolve_impl(None) == "diffusers" and resolve_impl(None, default="native") == "native"
    monkeypatch.setenv("VIST3A_WAN_IMPL", "native")
    assert resolve_impl(None) == "native" and resolve_impl("diffusers") == "diffusers"
    monkeypatch.setenv("VIST3A_WAN_IMPL", "onnx")
    with pytest.raises(Vist3AInputError, match="unknown Wan implementation 'onnx'"):
        resolve_impl(None)


@pytest.mark.parametrize("argv, environment, expected", [
    ([], None, "native"), (["--wan-impl", "diffusers"], None, "diffusers"), ([], "diffusers", "diffusers"),
    (["--wan-impl", "native"], "diffusers", "native"),
])
def test_cli_generate_picks_the_implementation(monkeypatch, tmp_path, argv, environment, expected):
    from click.testing import CliRunner

    from vist3a_rt.cli import cli
    from vist3a_rt.pipeline import Vist3A

    class Stop(Exception):
        pass

    def fake_load(*args, wan_impl=None, **kwargs):
        raise Stop(wan_impl)

    monkeypatch.setattr(Vist3A, "load", fake_load)
    env = {"VIST3A_WAN_IMPL": environment} if environment else {}
    monkeypatch.delenv("VIST3A_WAN_IMPL", raising=False)
    result = CliRunner().invoke(cli, ["generate", "a red cube", "--out", str(tmp_path / "out"), *argv], env=env)
    assert isinstance(result.exception, Stop) and result.exception.args == (expected,)
