"""``Vist3A`` end to end on the official-layout tiny model: prompt + stored initial noise →
the official inference's final latents, feed-forward frames and Gaussians."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import fixture_dir
import vist3a_rt as vr

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def e2e():
    folder = fixture_dir("e2e_tiny")
    return {"folder": folder, "settings": json.loads((folder / "settings.json").read_text()),
            "golden": load_file(str(folder / "golden.safetensors")),
            "no_lora": load_file(str(folder / "golden_no_lora.safetensors"))}


@pytest.fixture(scope="module")
def model(e2e):
    return vr.Vist3A.load(e2e["folder"] / "model")


def _generate(model, e2e):
    s = e2e["settings"]
    return model.generate(s["prompt"], latents=e2e["golden"]["inputs.noise"], num_steps=s["num_inference_steps"],
                          guidance_scale=s["guidance_scale"], num_frames=s["num_frames"], height=s["height"],
                          width=s["width"])


@pytest.fixture(scope="module")
def result(model, e2e):
    return _generate(model, e2e)


def test_defaults_come_from_the_model_config(model, e2e):
    s = e2e["settings"]
    assert (model.defaults.num_frames, model.defaults.height, model.defaults.width) == (13, 48, 48)
    assert (model.defaults.num_steps, model.defaults.guidance_scale, model.defaults.flow_shift) == (
        s["num_inference_steps"], s["guidance_scale"], s["flow_shift"])


def test_final_latents_match_official(result, e2e):
    torch.testing.assert_close(result.latents, e2e["golden"]["intermediate.final_latents"], atol=1e-4, rtol=1e-4)


def test_feedforward_frames_match_official(result, e2e):
    torch.testing.assert_close(result.frames, e2e["golden"]["intermediate.feedforward_image"], atol=5e-4, rtol=0)


@pytest.mark.parametrize("field", ["means", "opacities", "scales", "rotations", "sh"])
def test_gaussians_match_official(result, e2e, field):
    g = e2e["golden"]
    assert len(result.scene) == 13 * 42 * 42
    xyzw = g["outputs.gaussians.rotations"][0]
    expected = {"means": g["outputs.gaussians.means"][0], "opacities": g["outputs.gaussians.opacities"][0],
                "scales": g["outputs.gaussians.scales"][0], "rotations": torch.cat([xyzw[:, 3:], xyzw[:, :3]], -1),
                "sh": g["outputs.gaussians.harmonics"][0].transpose(-1, -2)}[field]
    actual = getattr(result.scene, field)
    if field == "scales":  # tiny values: compare relative to their size (fixture README)
        torch.testing.assert_close(actual, expected, atol=1e-4 * expected.abs().max().item(), rtol=1e-4)
    else:
        torch.testing.assert_close(actual, expected, atol=5e-5, rtol=1e-4)


def test_cameras_match_official(result, e2e):
    g = e2e["golden"]
    torch.testing.assert_close(result.cameras.camtoworld, g["outputs.extrinsic"][0], atol=5e-5, rtol=1e-4)
    K = g["outputs.intrinsic"][0] * torch.tensor([42.0, 42.0, 1.0])[:, None]
    torch.testing.assert_close(result.cameras.K, K, atol=5e-4, rtol=1e-4)


def test_without_lora_matches_the_no_lora_golden(e2e):
    model = vr.Vist3A.load(e2e["folder"] / "model", use_lora=False)
    result = _generate(model, e2e)
    torch.testing.assert_close(result.latents, e2e["no_lora"]["intermediate.final_latents"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.scene.means, e2e["no_lora"]["outputs.gaussians.means"][0], atol=5e-5, rtol=1e-4)


def test_timings_cover_every_stage(result):
    assert {"text", "denoise", "vae_decode", "decode_3d", "total"} <= set(result.timings)
    assert all(v >= 0 for v in result.timings.values())
