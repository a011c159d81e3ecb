"""Layer search against the official golden run (``anysplat_stitched_tiny/io_layer_search``).

From the stored float16 latents and features the fits must match the official
``fit_conv3d_streaming`` (README: about 1e-6 relative on the ridge weights), the per-block MSEs
``config.json`` ``layer_search.mse`` (1e-6 relative) and the winner. End to end, our
unstitched network and the Wan VAE adapter must reproduce the stored features and latents.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import fixture_dir
from vist3a_rt.decoder.loading import load_reconstruction_model
from vist3a_rt.decoder.stitching import StitchingLayer, parse_conv_spec
from vist3a_rt.errors import ConfigError, Vist3AInputError
from vist3a_rt.training.adapters import AnySplatFeatureSource, PrecomputedLatentSource, WanLatentSource
from vist3a_rt.training.cli import train
from vist3a_rt.training.layer_search import (LayerSearchFeatures, capture_features, conv3d_patches, layer_search,
                                             video_batches)

BLOCKS = ("enc_blocks_1", "enc_blocks_2", "enc_blocks_3", "enc_blocks_4")
FIT_RTOL = 1e-6  # of the largest |weight| / |bias| (README)
MSE_RTOL = 1e-6
VAE_SEED = 1238  # the global seed the official run set right before extraction


@pytest.fixture(scope="module")
def golden(single_thread):
    folder = fixture_dir("anysplat_stitched_tiny")
    config = json.loads((folder / "config.json").read_text())
    return {"folder": folder, "config": config, "spec": config["stitching"]["stitching_layer_config"],
            "file": folder / "io_layer_search.safetensors",
            "io": load_file(str(folder / "io_layer_search.safetensors"))}


@pytest.fixture(scope="module")
def features(golden):
    return LayerSearchFeatures.load(golden["file"])


@pytest.fixture(scope="module")
def official(golden, features):
    return layer_search(features, golden["spec"], batch_size=3)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


# --------------------------------------------------------------------------- the official numbers


def test_features_file_reads_the_official_layout(golden, features):
    assert features.grid == (3, 3) and tuple(features.blocks) == BLOCKS
    assert features.latents.dtype == torch.float16 and features.num_videos == 21


@pytest.mark.parametrize("block", BLOCKS)
def test_fit_reproduces_the_official_conv(golden, official, block):
    fit = next(f for f in official.fits if f.block == block)
    assert relative_error(fit.weight, golden["io"][f"fit.{block}.weight"]) <= FIT_RTOL
    assert relative_error(fit.bias, golden["io"][f"fit.{block}.bias"]) <= FIT_RTOL


def test_mse_and_winner_match_the_official_search(golden, official):
    expected = golden["config"]["layer_search"]
    for fit in official.fits:
        assert fit.mse == pytest.approx(expected["mse"][fit.block], rel=MSE_RTOL)
    assert official.best.block == expected["best_block"] == "enc_blocks_4"
    assert [f.block for f in official.ranking] == sorted(BLOCKS, key=expected["mse"].get)


def test_streaming_equals_one_shot(golden, features, official):
    one_shot = layer_search(features, golden["spec"], batch_size=features.num_videos)
    for streamed, whole in zip(official.fits, one_shot.fits):
        torch.testing.assert_close(streamed.weight, whole.weight, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(streamed.bias, whole.bias, rtol=1e-6, atol=1e-7)
        assert streamed.mse == pytest.approx(whole.mse, rel=1e-9)


def test_consistent_padding_is_labelled_and_scores_lower(golden, features, official):
    consistent = layer_search(features, golden["spec"], padding="consistent")
    table = consistent.to_dict()
    assert table["padding"] == {"mode": "consistent", "fit": "replicate", "evaluation": "replicate"}
    assert official.to_dict()["padding"] == {"mode": "official", "fit": "zeros", "evaluation": "replicate"}
    assert "padding consistent" in consistent.table()
    for fit, off in zip(consistent.fits, official.fits):
        assert fit.mse <= off.mse and fit.mse != off.mse
        assert fit.fit_mse == pytest.approx(fit.mse, rel=1e-4)  # the fit and the evaluation agree now


def test_float32_storage_scores_through_the_stitching_layer(golden, features):
    """With float32 storage the evaluation is exactly ``StitchingLayer(latents)``."""
    fp32 = LayerSearchFeatures(features.latents.float(), {"enc_blocks_4": features.blocks["enc_blocks_4"].float()},
                               features.grid)
    fit = layer_search(fp32, golden["spec"]).fits[0]
    layer = StitchingLayer(golden["spec"])
    layer.load_state_dict(fit.state_dict())
    with torch.no_grad():
        pred = layer(fp32.latents)
    target = fp32.blocks["enc_blocks_4"].unflatten(2, (3, 3)).permute(0, 4, 1, 2, 3)
    assert fit.mse == pytest.approx((pred - target).double().square().mean().item(), rel=1e-9)


@pytest.mark.parametrize("spec", ["conv3d_k5x3x3_o8_s1x2x2_p2x1x1", "conv3d_k3x2x3_o4_s2x1x2_p1x0x2_d1x2x1"])
@pytest.mark.parametrize("mode", ["zeros", "replicate"])
def test_patches_times_weight_is_the_conv(spec, mode):
    parsed = parse_conv_spec(spec)
    conv = torch.nn.Conv3d(5, parsed.out_channels, parsed.kernel_size, parsed.stride, parsed.padding,
                           parsed.dilation, padding_mode=mode, dtype=torch.float64)
    x = torch.randn(2, 5, 7, 8, 9, dtype=torch.float64)
    with torch.no_grad():
        expected = conv(x).permute(0, 2, 3, 4, 1).reshape(-1, parsed.out_channels)
    patches = conv3d_patches(x, parsed, mode)
    torch.testing.assert_close(patches @ conv.weight.reshape(parsed.out_channels, -1).T + conv.bias, expected)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def anysplat(golden):
    folder = golden["folder"]
    return AnySplatFeatureSource(load_reconstruction_model(folder / "config.json",
                                                           folder / "anysplat_base.safetensors"))


@pytest.fixture(scope="module")
def wan_vae(golden):
    from diffusers import AutoencoderKLWan

    raw = json.loads((golden["folder"] / "wan_vae_config.json").read_text())
    vae = AutoencoderKLWan(**{k: v for k, v in raw.items() if not k.startswith("_")})
    vae.load_state_dict(load_file(str(golden["folder"] / "wan_vae.safetensors")))
    return vae


def test_network_features_match_the_official_hooks(golden, anysplat):
    io = golden["io"]
    videos = io["videos.feedforward_image_uint8"]
    captured = capture_features(PrecomputedLatentSource(io["features.vae_latents_fp16"]), anysplat,
                                video_batches(videos, batch_size=3), feature_dtype=torch.float32)
    assert captured.grid == (3, 3) and tuple(captured.blocks) == BLOCKS
    for block in BLOCKS:
        stored = io[f"features.{block}"].float()
        ulp = torch.finfo(torch.float16).eps * stored.abs().clamp_min(2 ** -14)  # float16 spacing
        assert ((captured.blocks[block] - stored).abs() <= ulp).all()  # within fp16 rounding
    with torch.no_grad():
        full = anysplat.model.block_outputs(videos[:1].float() / 127.5 - 1)
    for block, out in zip(BLOCKS, full):
        torch.testing.assert_close(out, io[f"features_fp32_full_video0.{block}"], atol=1e-5, rtol=1e-4)


def test_wan_latents_match_the_official_posterior_and_sample(golden, wan_vae):
    io = golden["io"]
    source = WanLatentSource(wan_vae)
    vae_videos = io["videos.vae_image_uint8"]
    means, stds = zip(*(source.posterior(v) for v, _ in video_batches(vae_videos, batch_size=7)))
    mean, std = torch.cat(means), torch.cat(stds)
    torch.testing.assert_close(mean, io["vae.latent_mean"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(std, io["vae.latent_std"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mean + std * io["vae.eps"], io["vae.latent_sample_fp32"], atol=1e-5, rtol=1e-4)


def test_capture_end_to_end_reproduces_the_official_search(golden, anysplat, wan_vae):
    """Both adapters, batches of 3, the generator seeded as the official global RNG was: the
    latents and features, stored in float16 as the official run stores them, give its search."""
    io = golden["io"]
    latent_source = WanLatentSource(wan_vae, torch.Generator().manual_seed(VAE_SEED))
    captured = capture_features(latent_source, anysplat, video_batches(
        io["videos.vae_image_uint8"], io["videos.feedforward_image_uint8"], batch_size=3),
        feature_dtype=torch.float32)
    torch.testing.assert_close(captured.latents, io["vae.latent_sample_fp32"], atol=1e-5, rtol=1e-4)
    fp16 = LayerSearchFeatures(captured.latents.half(), {b: f.half() for b, f in captured.blocks.items()},
                               captured.grid)
    flips = {"latents": (fp16.latents != io["features.vae_latents_fp16"]).sum().item()}
    flips |= {b: (fp16.blocks[b] != io[f"features.{b}"]).sum().item() for b in BLOCKS}
    assert max(flips.values()) <= 60, flips  # README: 51 single-ulp flips from a thread-count change alone
    result = layer_search(fp16, golden["spec"])
    assert result.best.block == "enc_blocks_4"
    rel = 1e-6 if not any(flips.values()) else 1e-4
    for fit in result.fits:
        assert fit.mse == pytest.approx(golden["config"]["layer_search"]["mse"][fit.block], rel=rel)


# --------------------------------------------------------------------------- CLI


def test_cli_layer_search_from_features(golden, tmp_path):
    out = tmp_path / "search"
    run = CliRunner().invoke(train, ["layer-search", "--features", str(golden["file"]), "--out", str(out),
                                     "--blocks", "enc_blocks_2,enc_blocks_4"], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    assert "enc_blocks_4" in run.output and "padding official" in run.output
    table = json.loads((out / "layer_search.json").read_text())
    assert table["best_block"] == "enc_blocks_4" and table["block_keys"] == ["enc_blocks_2", "enc_blocks_4"]
    assert table["conv_spec"] == parse_conv_spec(golden["spec"]).text  # the default: official k/s/p at width 32
    assert table["mse"]["enc_blocks_4"] == pytest.approx(golden["config"]["layer_search"]["mse"]["enc_blocks_4"],
                                                         rel=MSE_RTOL)
    layer = StitchingLayer(golden["spec"])
    layer.load_state_dict(load_file(str(out / "stitching_init.safetensors")))
    assert relative_error(layer.weight.detach(), golden["io"]["fit.enc_blocks_4.weight"]) <= FIT_RTOL
    fits = load_file(str(out / "fits.safetensors"))
    assert set(fits) == {f"fit.enc_blocks_{j}.{k}" for j in (2, 4) for k in ("weight", "bias")}


def test_cli_layer_search_from_videos(golden, wan_vae, tmp_path):
    io = golden["io"]
    wan_vae.save_pretrained(tmp_path / "vae")
    videos = tmp_path / "videos.safetensors"
    save_file({k: io[k][:6].contiguous() for k in ("videos.vae_image_uint8", "videos.feedforward_image_uint8")},
              str(videos))
    folder = golden["folder"]
    args = ["layer-search", "--model-config", str(folder / "config.json"), "--base-weights",
            str(folder / "anysplat_base.safetensors"), "--videos", str(videos), "--vae", str(tmp_path / "vae"),
            "--seed", str(VAE_SEED), "--blocks", "enc_blocks_1,enc_blocks_4", "--padding", "consistent",
            "--save-features", str(tmp_path / "features.safetensors"), "--out", str(tmp_path / "out")]
    run = CliRunner().invoke(train, args, catch_exceptions=False)
    assert run.exit_code == 0, run.output
    saved = LayerSearchFeatures.load(tmp_path / "features.safetensors")
    assert tuple(saved.blocks) == ("enc_blocks_1", "enc_blocks_4") and saved.num_videos == 6
    torch.testing.assert_close(saved.blocks["enc_blocks_4"], io["features.enc_blocks_4"][:6], atol=2e-3, rtol=0)
    table = json.loads((tmp_path / "out" / "layer_search.json").read_text())
    assert table["padding"]["mode"] == "consistent" and table["num_videos"] == 6


# --------------------------------------------------------------------------- bad input


def test_unknown_block_is_named(golden, features):
    with pytest.raises(Vist3AInputError, match=r"unknown block\(s\) \['enc_blocks_7'\]; available: enc_blocks_1"):
        layer_search(features, golden["spec"], blocks=["enc_blocks_1", "enc_blocks_7"])


def test_malformed_conv_spec(features):
    with pytest.raises(ConfigError, match="bad conv spec 'conv3d_k5x3_o32'"):
        layer_search(features, "conv3d_k5x3_o32")
    with pytest.raises(Vist3AInputError, match="has 1024 output channels but the features of enc_blocks_1 "
                                               "have width 32"):
        layer_search(features, "conv3d_k5x3x3_o1024_s1x2x2_p2x1x1")
    with pytest.raises(Vist3AInputError, match=r"to a 13x6x6 \(frames x rows x cols\) grid, but the features"):
        layer_search(features, "conv3d_k5x3x3_o32_p2x1x1")
    with pytest.raises(Vist3AInputError, match="fits a Conv3d"):
        layer_search(features, "conv2d_k3_o32")


def test_mismatched_feature_and_latent_counts(features):
    with pytest.raises(Vist3AInputError, match="features enc_blocks_1 hold 20 videos but there are 21 latents"):
        LayerSearchFeatures(features.latents, {"enc_blocks_1": features.blocks["enc_blocks_1"][:20]}, (3, 3))
    with pytest.raises(Vist3AInputError, match="21 VAE videos but 20 feed-forward videos"):
        next(video_batches(torch.zeros(21, 3, 5, 8, 8, dtype=torch.uint8),
                           torch.zeros(20, 3, 5, 8, 8, dtype=torch.uint8)))


def test_bad_settings(golden, features):
    with pytest.raises(Vist3AInputError, match="padding must be one of"):
        layer_search(features, golden["spec"], padding="zeros")
    with pytest.raises(Vist3AInputError, match="ridge must be a finite number >= 0"):
        layer_search(features, golden["spec"], ridge=-1.0)
    with pytest.raises(Vist3AInputError, match="batch_size must be a positive integer"):
        layer_search(features, golden["spec"], batch_size=0)


def test_cli_rejects_mixed_and_missing_inputs(golden, tmp_path):
    runner = CliRunner()
    mixed = runner.invoke(train, ["layer-search", "--features", str(golden["file"]), "--vae", str(tmp_path),
                                  "--out", str(tmp_path / "o")])
    assert isinstance(mixed.exception, Vist3AInputError) and "drop --vae" in str(mixed.exception)
    missing = runner.invoke(train, ["layer-search", "--videos", str(golden["file"]), "--out", str(tmp_path / "o")])
    assert isinstance(missing.exception, Vist3AInputError)
    assert "missing: --base-weights, --vae" in str(missing.exception)
    absent = runner.invoke(train, ["layer-search", "--features", str(tmp_path / "nope.safetensors"),
                                   "--out", str(tmp_path / "o")])
    assert isinstance(absent.exception, Vist3AInputError) and "features file not found" in str(absent.exception)
