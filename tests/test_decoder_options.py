"""Encoder options beyond the fixtures' settings, checked against their official definitions
computed from the plain forward: render_conf (quantile mask) and opacity_conf."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import fixture_dir
import vist3a_rt as vr


@pytest.fixture(scope="module")
def setup():
    folder = fixture_dir("anysplat_stitched_tiny")
    config = json.loads((folder / "config.json").read_text())
    io = load_file(str(folder / "io_stitched.safetensors"))
    return folder, config, (io["inputs.latent"], io["inputs.feedforward_image"])


def _run(setup, **encoder_overrides):
    folder, config, inputs = setup
    config = json.loads(json.dumps(config))
    config["anysplat"]["encoder_cfg"].update(encoder_overrides)
    decoder = vr.load_stitched_decoder(config, folder / "anysplat_base.safetensors", folder / "stitched_checkpoint.pth")
    with torch.no_grad():
        return decoder(*inputs)


def test_render_conf_keeps_pixels_above_the_confidence_quantile(setup):
    plain, masked = _run(setup), _run(setup, render_conf=True, conf_threshold=0.3)
    threshold = torch.quantile(plain.depth_conf.flatten(0, 1), 0.3)
    mask = plain.depth_conf > threshold
    assert torch.equal(masked.conf_valid_mask, mask)
    assert masked.num_gaussians == [int(mask.sum())]
    torch.testing.assert_close(masked.means[0], plain.means[0][mask.flatten()], atol=0, rtol=0)


def test_opacity_conf_scales_opacity_by_confidence(setup):
    plain, weighted = _run(setup), _run(setup, opacity_conf=True, conf_threshold=0.1)
    shift = torch.quantile(plain.depth_conf, 0.1)
    expected = plain.opacities * torch.sigmoid(plain.depth_conf - shift).flatten(1)
    torch.testing.assert_close(weighted.opacities, expected, atol=1e-7, rtol=1e-6)


def test_opacity_conf_with_voxelize_is_a_config_error(setup):
    folder, config, _ = setup
    config = json.loads(json.dumps(config))
    config["anysplat"]["encoder_cfg"].update(opacity_conf=True, voxelize=True)
    with pytest.raises(vr.ConfigError, match="opacity_conf"):
        vr.DecoderConfig.load(config)


@pytest.mark.parametrize("section, key, value, match", [
    ("architecture_fixed", "aa_order", ["global", "frame"], "aa_order"),
    ("architecture_fixed", "aa_block_size", 2, "aa_block_size"),
    ("architecture_fixed", "dino_interpolate_antialias", False, "antialias"),
    ("architecture_fixed", "gs_head", {"output_dim": 50, "raw_gs_dim": 49}, "gs_head"),
])
def test_unsupported_structure_is_refused(setup, section, key, value, match):
    _, config, _ = setup
    config = json.loads(json.dumps(config))
    config[section][key] = value
    with pytest.raises(vr.ConfigError, match=match):
        vr.DecoderConfig.load(config)
