"""The pure-torch Wan VAE decoder (vist3a_rt/generator/native/vae.py) against diffusers'
AutoencoderKLWan.decode: tiny random VAEs, the embedded nano VAE, the e2e_tiny golden frames;
one-pass and chunked decoding; loading from a full VAE file; precise errors.

Tolerances. float32: max |native - diffusers| / max |diffusers| <= 1e-5 (the one-pass decode runs
each convolution over more frames than diffusers' per-frame calls, so rounding differs; measured
1e-6 on nano, 6e-6 on the golden frames). float64 (diffusers' float32 round trip in its
upsampler switched off): <= 1e-12, i.e. the same computation. bfloat16: the rule of STYLE.md --
the error against the float32 reference is at most 2x diffusers' own bfloat16 error.
"""

import json
import subprocess
import sys

import pytest
import torch
from conftest import fixture_dir
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders import autoencoder_kl_wan
from torch import nn

from vist3a_rt.errors import CheckpointError, ConfigError, Vist3AInputError
from vist3a_rt.generator import latents as latent_ops
from vist3a_rt.generator.native.vae import WanVAEConfig, WanVAEDecoder, build_native_vae

FP32_RELATIVE = 1e-5
TINY_CONFIGS = {
    # the repo's tiny Wan VAE (tiny_model.py): 4 stages, time doubled twice
    "wan21": {"base_dim": 4, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1,
              "temperal_downsample": [False, True, True]},
    # other shapes of the same family: 3 stages, time doubled in the last up block, two residual
    # blocks per stage, a decoder width apart from the encoder's
    "other": {"base_dim": 4, "decoder_base_dim": 6, "z_dim": 4, "dim_mult": [1, 2, 2], "num_res_blocks": 2,
              "temperal_downsample": [True, False], "scale_factor_spatial": 4, "scale_factor_temporal": 2,
              "latents_mean": [0.1, -0.2, 0.3, 0.0], "latents_std": [1.5, 0.5, 2.0, 1.0]},
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def tiny_vae(name: str) -> AutoencoderKLWan:
    torch.manual_seed(7)
    vae = AutoencoderKLWan(**TINY_CONFIGS[name]).eval()
    with torch.no_grad():  # gains away from 1 and biases away from their init: every tensor matters
        for parameter in vae.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return vae


def native_of(vae: AutoencoderKLWan, dtype: torch.dtype | None = None) -> WanVAEDecoder:
    return build_native_vae(dict(vae.config), vae.state_dict(), dtype=dtype)


def diffusers_decode(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(latents).sample


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny(request):
    vae = tiny_vae(request.param)
    return vae, native_of(vae)


@pytest.fixture(scope="module")
def nano():
    from vist3a_rt.models import embedded_model_dir

    folder = embedded_model_dir("nano") / "wan" / "vae"
    if not (folder / "diffusion_pytorch_model.safetensors").is_file():
        pytest.skip(f"the embedded nano model is not installed ({folder})")
    return folder


def load_folder(folder, dtype=None) -> WanVAEDecoder:
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    return build_native_vae(config, load_file(folder / "diffusion_pytorch_model.safetensors"), dtype=dtype)


# --------------------------------------------------------------------------- agreement with diffusers


@pytest.mark.parametrize("frames", [1, 2, 3])
@pytest.mark.parametrize("chunk_frames", [None, 1, 2])
def test_tiny_matches_diffusers(tiny, frames, chunk_frames):
    vae, native = tiny
    torch.manual_seed(frames)
    latents = 2 * torch.randn(2, vae.config.z_dim, frames, 3, 4)
    expected = diffusers_decode(vae, latents)
    got = native.decode(latents, chunk_frames=chunk_frames).sample
    temporal, spatial = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    assert got.shape == expected.shape == (2, 3, 1 + temporal * (frames - 1), 3 * spatial, 4 * spatial)
    assert relative_error(got, expected) <= FP32_RELATIVE


def test_one_pass_is_the_frame_loop_in_float64(monkeypatch):
    """In float64 the two decodes agree to ~1e-15: the one-pass decode is the same computation,
    not an approximation. (diffusers' upsampler rounds through float32; that is switched off.)"""
    monkeypatch.setattr(autoencoder_kl_wan.WanUpsample, "forward", nn.Upsample.forward)
    vae = tiny_vae("wan21").double()
    native = native_of(vae)
    latents = 3 * torch.randn(1, 16, 4, 3, 3, dtype=torch.float64)
    expected = diffusers_decode(vae, latents)
    for chunk_frames in (None, 1, 3):
        assert relative_error(native.decode(latents, chunk_frames=chunk_frames).sample, expected) <= 1e-12


def test_nano_matches_diffusers_float32(nano):
    vae, native = AutoencoderKLWan.from_pretrained(nano).eval(), load_folder(nano)
    torch.manual_seed(0)
    latents = 2 * torch.randn(1, 16, 4, 12, 12)  # the nano shape: 13 frames of 96 x 96
    expected = diffusers_decode(vae, latents)
    got = native.decode(latents).sample
    assert got.shape == (1, 3, 13, 96, 96)
    assert relative_error(got, expected) <= FP32_RELATIVE


def test_nano_bfloat16_within_twice_diffusers_error(nano):
    vae = AutoencoderKLWan.from_pretrained(nano).eval()
    torch.manual_seed(1)
    latents = 2 * torch.randn(1, 16, 2, 6, 6)
    reference = diffusers_decode(vae, latents)
    diffusers_bf16 = diffusers_decode(AutoencoderKLWan.from_pretrained(nano, torch_dtype=torch.bfloat16).eval(),
                                      latents.bfloat16())
    native_bf16 = load_folder(nano, dtype=torch.bfloat16).decode(latents.bfloat16()).sample
    assert native_bf16.dtype == torch.bfloat16
    assert relative_error(native_bf16, reference) <= 2 * relative_error(diffusers_bf16, reference)


def test_golden_decoded_frames():
    """The official procedure's decoded frames (e2e_tiny README step 10) from its de-normalised latents."""
    from safetensors.torch import load_file

    root = fixture_dir("e2e_tiny")
    golden = load_file(root / "golden.safetensors")
    native = load_folder(root / "model" / "wan" / "vae")
    frames = native.decode(golden["intermediate.denormalized_latents"]).sample
    assert relative_error(frames, golden["intermediate.decoded_frames"]) <= FP32_RELATIVE


# --------------------------------------------------------------------------- the runtime's interface


def test_drop_in_for_latents_decode_and_config(tmp_path):
    """latents.py's decode / denormalize / latent_shape take the native VAE as they take diffusers'."""
    from safetensors.torch import load_file

    vae = tiny_vae("wan21")
    vae.save_pretrained(tmp_path)  # the full VAE file: encoder tensors too
    config = json.loads((tmp_path / "config.json").read_text())
    native = build_native_vae(config, load_file(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert native.config.z_dim == 16 and native.dtype == torch.float32
    assert dict(native.config) == {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    assert latent_ops.latent_shape(native.config, 1, 13, 96, 96) == latent_ops.latent_shape(vae.config, 1, 13, 96, 96)
    raw = torch.randn(1, 16, 2, 3, 3)
    latents = latent_ops.denormalize(raw, native.config)
    assert torch.equal(latents, latent_ops.denormalize(raw, vae.config))
    expected = latent_ops.decode(vae, latents)
    assert relative_error(latent_ops.decode(native, latents), expected) <= FP32_RELATIVE
    assert torch.equal(native.decode(latents, return_dict=False)[0], native(latents))


def test_weights_are_assigned_not_copied():
    vae = tiny_vae("wan21")
    state = vae.state_dict()
    native = native_of(vae)
    assert native.decoder.conv_in.weight.data_ptr() == state["decoder.conv_in.weight"].data_ptr()
    assert not any(p.requires_grad for p in native.parameters()) and not native.training
    assert set(native.state_dict()) == {k for k in state if k.startswith(("decoder.", "post_quant_conv."))}


def test_module_imports_without_diffusers():
    code = ("import sys, vist3a_rt.generator.native.vae; "
            "assert not any(m.split('.')[0] in ('diffusers', 'transformers') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- errors


def test_missing_and_unexpected_keys_are_named():
    vae = tiny_vae("wan21")
    state = dict(vae.state_dict())
    del state["decoder.up_blocks.1.upsamplers.0.time_conv.weight"]
    state["decoder.up_blocks.9.resnets.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"1 of \d+ expected keys missing: "
                                              r"decoder\.up_blocks\.1\.upsamplers\.0\.time_conv\.weight; "
                                              r"1 unexpected keys: decoder\.up_blocks\.9\.resnets\.0\.conv1\.weight"):
        build_native_vae(dict(vae.config), state)


def test_weights_of_another_config():
    vae = tiny_vae("wan21")
    wider = {**dict(vae.config), "base_dim": 8}
    with pytest.raises(CheckpointError, match=r"wrong shape: decoder\.conv_in\.weight \[16, 16, 3, 3, 3\] "
                                              r"\(expected \[32, 16, 3, 3, 3\]\)"):
        build_native_vae(wider, vae.state_dict())
    deeper = {**dict(vae.config), "num_res_blocks": 2}
    with pytest.raises(CheckpointError, match=r"num_res_blocks 2\): \d+ of \d+ expected keys missing: "
                                              r"decoder\.up_blocks\.0\.resnets\.2\.norm1\.gamma"):
        build_native_vae(deeper, vae.state_dict())
    with pytest.raises(CheckpointError, match="expected keys missing"):
        build_native_vae(dict(vae.config), {"encoder.conv_in.weight": torch.zeros(1)})


def test_mixed_weight_dtypes_need_a_cast():
    vae = tiny_vae("wan21")
    state = dict(vae.state_dict())
    state["decoder.conv_out.bias"] = state["decoder.conv_out.bias"].bfloat16()
    with pytest.raises(CheckpointError, match=r"one floating dtype \(pass dtype= to cast\)"):
        build_native_vae(dict(vae.config), state)
    assert build_native_vae(dict(vae.config), state, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("shape, message", [
    ((16, 2, 3, 3), r"\[B, 16, F, h, w\] with every size >= 1, got shape \[16, 2, 3, 3\]"),
    ((1, 4, 2, 3, 3), r"got shape \[1, 4, 2, 3, 3\]"),
    ((1, 16, 0, 3, 3), r"got shape \[1, 16, 0, 3, 3\]"),
])
def test_bad_latent_shapes(shape, message):
    native = native_of(tiny_vae("wan21"))
    with pytest.raises(Vist3AInputError, match=message):
        native.decode(torch.zeros(shape))


def test_bad_latent_dtype_and_chunking():
    native = native_of(tiny_vae("wan21"))
    with pytest.raises(Vist3AInputError, match=r"latents are torch\.float64 but the VAE weights are torch\.float32"):
        native.decode(torch.zeros(1, 16, 1, 2, 2, dtype=torch.float64))
    with pytest.raises(Vist3AInputError, match="chunk_frames must be a positive integer or None, got 0"):
        native.decode(torch.zeros(1, 16, 1, 2, 2), chunk_frames=0)


@pytest.mark.parametrize("change, message", [
    ({"is_residual": True}, r"Wan 2\.2 VAE layout"),
    ({"patch_size": 2}, r"Wan 2\.2 VAE layout"),
    ({"_class_name": "AutoencoderKL"}, r"for 'AutoencoderKL', expected 'AutoencoderKLWan'"),
    ({"clip_output": True}, r"unknown AutoencoderKLWan config field\(s\): \['clip_output'\]"),
    ({"latents_mean": [0.0] * 4}, "latents_mean has 4 entries, z_dim is 16"),
    ({"temperal_downsample": [True, True]}, r"temperal_downsample needs 3 entries"),
    ({"scale_factor_temporal": 8}, "scale factors .* give spatial 8, temporal 4"),
])
def test_bad_configs(change, message):
    config = {**dict(tiny_vae("wan21").config), **change}
    with pytest.raises(ConfigError, match=message):
        WanVAEConfig.from_dict(config)


def test_config_without_latent_statistics():
    config = {k: v for k, v in dict(tiny_vae("wan21").config).items() if k != "latents_std"}
    with pytest.raises(ConfigError, match=r"lacks \['latents_std'\]"):
        WanVAEConfig.from_dict(config)
