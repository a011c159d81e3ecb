"""Bad inputs, files and configs give precise errors at the decoder's public boundary.

Every error is a ``vr.Vist3AInputError`` (``CheckpointError`` for files, ``ConfigError`` for
settings) and its message names the offending thing: the key, the shape, the field or the file.
Modified files are written to tmp_path from the ``anysplat_stitched_tiny`` originals.
"""

from __future__ import annotations

import argparse
import collections
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import vist3a_rt as vr
from conftest import fixture_dir

STITCHED_KEYS = ("lora", "stitching_layer", "mask_token", "cls_token", "register_tokens")


@pytest.fixture(scope="module")
def tiny():
    folder = fixture_dir("anysplat_stitched_tiny")
    io = load_file(str(folder / "io_stitched.safetensors"))
    return {"config": json.loads((folder / "config.json").read_text()),
            "base": folder / "anysplat_base.safetensors", "ckpt": folder / "stitched_checkpoint.pth",
            "latent": io["inputs.latent"], "frames": io["inputs.feedforward_image"]}


@pytest.fixture(scope="module")
def decoder(tiny):
    return vr.load_stitched_decoder(tiny["config"], tiny["base"], tiny["ckpt"])


@pytest.fixture(scope="module")
def checkpoint(tiny):
    """The official checkpoint dict; tests copy before modifying."""
    return torch.load(tiny["ckpt"], map_location="cpu", weights_only=True)


def config_copy(tiny) -> dict:
    return json.loads(json.dumps(tiny["config"]))


def load_with(tiny, *, config=None, base=None, ckpt=None, **kwargs):
    return vr.load_stitched_decoder(config_copy(tiny) if config is None else config,
                                    tiny["base"] if base is None else base,
                                    tiny["ckpt"] if ckpt is None else ckpt, **kwargs)


def saved(obj, path):
    torch.save(obj, path)
    return path


# --------------------------------------------------------------------------- forward inputs


def test_wrong_latent_channels(decoder, tiny):
    with pytest.raises(vr.Vist3AInputError, match=r"latent must be \[B, 16, .*got \[1, 8, 4, 6, 6\]"):
        decoder(tiny["latent"][:, :8], tiny["frames"])


def test_latent_frames_batch_mismatch(decoder, tiny):
    with pytest.raises(vr.Vist3AInputError, match=r"batch mismatch: latent has 2, frames 1"):
        decoder(tiny["latent"].expand(2, -1, -1, -1, -1), tiny["frames"])


def test_frame_count_must_follow_temporal_compression(decoder, tiny):
    with pytest.raises(vr.Vist3AInputError, match=r"4 latent frames decode to 13 video frames, but frames has 12"):
        decoder(tiny["latent"], tiny["frames"][:, :, :12])


@pytest.mark.parametrize("take, shape", [(lambda x: x[:, :, 0], r"\[1, 3, 42, 42\]"),
                                         (lambda x: x[:, :2], r"\[1, 2, 13, 42, 42\]")],
                         ids=["4d", "2-channels"])
def test_frames_layout(decoder, tiny, take, shape):
    with pytest.raises(vr.Vist3AInputError, match=r"frames must be \[B, 3, T, H, W\].*got " + shape):
        decoder(tiny["latent"], take(tiny["frames"]))


def test_frames_out_of_range(decoder, tiny):
    with pytest.raises(vr.Vist3AInputError, match=r"frames must lie in \[-1, 1\], got values in \[-2, 2\]"):
        decoder(tiny["latent"], tiny["frames"] * 2)


def test_frame_size_not_multiple_of_patch(decoder, tiny):
    with pytest.raises(vr.Vist3AInputError, match=r"frame size 40x40 .*multiple of the patch size 14"):
        decoder(tiny["latent"], tiny["frames"][..., :40, :40])


def test_latent_grid_vs_frame_grid(decoder, tiny):
    frames = torch.nn.functional.pad(tiny["frames"], (0, 14, 0, 14))  # 56x56 px: 4x4 patches
    with pytest.raises(vr.Vist3AInputError, match=r"latent \[6, 6\] gives a 3x3 token grid but frames "
                                                  r"\[56, 56\] give 4x4 patches"):
        decoder(tiny["latent"], frames)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_latent(decoder, tiny, value):
    latent = tiny["latent"].clone()
    latent[0, 3, 1, 2, 2] = value
    with pytest.raises(vr.Vist3AInputError, match=r"latent contains NaN"):
        decoder(latent, tiny["frames"])


def test_nan_in_frames(decoder, tiny):
    frames = tiny["frames"].clone()
    frames[0, 1, 5, 7, 7] = float("nan")
    with pytest.raises(vr.Vist3AInputError, match=r"frames contains NaN"):
        decoder(tiny["latent"], frames)


# --------------------------------------------------------------------------- files


def test_missing_stitched_checkpoint(tiny, tmp_path):
    with pytest.raises(vr.CheckpointError, match=r"stitched checkpoint not found: .*absent\.pth"):
        load_with(tiny, ckpt=tmp_path / "absent.pth")


def test_missing_base_weights(tiny, tmp_path):
    with pytest.raises(vr.CheckpointError, match=r"AnySplat weights not found: .*absent\.safetensors"):
        load_with(tiny, base=tmp_path / "absent.safetensors")


def test_released_folder_without_weights(tiny, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny["config"]["anysplat"]))
    with pytest.raises(vr.CheckpointError, match=r"has no model\.safetensors"):
        load_with(tiny, base=tmp_path)


@pytest.mark.parametrize("key", STITCHED_KEYS)
def test_checkpoint_missing_top_level_key(tiny, checkpoint, tmp_path, key):
    broken = {k: v for k, v in checkpoint.items() if k != key}
    with pytest.raises(vr.CheckpointError, match=rf"not an official stitched checkpoint: missing \['{key}'\]"):
        load_with(tiny, ckpt=saved(broken, tmp_path / "ckpt.pth"))


def test_checkpoint_extra_top_level_key(tiny, checkpoint, tmp_path):
    broken = {**checkpoint, "optimizer": torch.zeros(3)}
    with pytest.raises(vr.CheckpointError, match=r"unexpected \['optimizer'\]"):
        load_with(tiny, ckpt=saved(broken, tmp_path / "ckpt.pth"))


def test_lora_missing_one_lora_B(tiny, checkpoint, tmp_path):
    name = "encoder.aggregator.frame_blocks.1.attn.qkv"
    lora = {k: v for k, v in checkpoint["lora"].items() if k != f"{name}.lora_B"}
    assert len(lora) == len(checkpoint["lora"]) - 1
    with pytest.raises(vr.CheckpointError, match=re.escape(f"'{name}.lora_B'")):
        load_with(tiny, ckpt=saved({**checkpoint, "lora": lora}, tmp_path / "ckpt.pth"))


def test_lora_extra_module(tiny, checkpoint, tmp_path):
    """LoRA for a DINO block this cut does not have (the stitched tiny model keeps blocks 0 and 1)."""
    src, extra = "encoder.aggregator.patch_embed.blocks.1.attn.qkv", "encoder.aggregator.patch_embed.blocks.2.attn.qkv"
    lora = dict(checkpoint["lora"])
    lora.update({f"{extra}.{kind}": lora[f"{src}.{kind}"].clone() for kind in ("lora_A", "lora_B")})
    with pytest.raises(vr.CheckpointError, match=r"0 missing.*1 unexpected.*" + re.escape(extra)):
        load_with(tiny, ckpt=saved({**checkpoint, "lora": lora}, tmp_path / "ckpt.pth"))


@pytest.mark.parametrize("spec", ["r8,a8,d0.0,f0", "r2,a8,d0.0,f0"], ids=["spec-rank-above", "spec-rank-divides"])
def test_lora_rank_disagrees_with_spec(tiny, spec):
    """The checkpoint's rank is 4. The official loader fails on any other r (size mismatch when
    loading lora_A/B into the spec's modules); r2 must not be merged with scaling a/r = 4."""
    config = config_copy(tiny)
    config["stitching"]["lora_config"] = spec
    r = spec.split(",")[0][1:]
    with pytest.raises(vr.CheckpointError, match=rf"LoRA of 'encoder\.[\w.]+'.*r={r}\b"):
        load_with(tiny, config=config)


def test_truncated_pth(tiny, tmp_path):
    data = tiny["ckpt"].read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(vr.CheckpointError, match=r"truncated\.pth.*(truncated|corrupt)"):
        load_with(tiny, ckpt=tmp_path / "truncated.pth")


@pytest.mark.parametrize("damage", ["truncated", "corrupt-header"])
def test_damaged_base_safetensors(tiny, tmp_path, damage):
    data = tiny["base"].read_bytes()
    data = data[: len(data) // 2] if damage == "truncated" else b"\x40\x00\x00\x00\x00\x00\x00\x00" + b"{" * 64
    path = tmp_path / f"{damage}.safetensors"
    path.write_bytes(data)
    with pytest.raises(vr.CheckpointError, match=re.escape(path.name)):
        load_with(tiny, base=path)


def _tripwire():  # would run only if a pickle were loaded with arbitrary code allowed
    TRIPPED.append(True)
    return {}


TRIPPED: list = []


class _Tripwire:
    def __reduce__(self):
        return (_tripwire, ())


class _ConfigDict(collections.OrderedDict):
    pass


@pytest.mark.parametrize("make", [lambda ck: {**ck, "args": argparse.Namespace(lr=1e-4)},
                                  lambda ck: _ConfigDict(ck),
                                  lambda ck: {**ck, "stitching_layer": {**ck["stitching_layer"], "hook": _Tripwire()}}],
                         ids=["namespace", "ordereddict-subclass", "reduce-callable"])
def test_pickle_with_non_tensor_objects_is_refused(tiny, checkpoint, tmp_path, make):
    path = saved(make(checkpoint), tmp_path / "pickled.pth")
    with pytest.raises(vr.CheckpointError, match=r"pickled\.pth.*non-tensor"):
        load_with(tiny, ckpt=path)
    assert not TRIPPED  # weights_only=True refused the global: nothing in the file ran


def test_foreign_safetensors_as_base(tiny, tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"text_model.embed.weight": torch.randn(4, 8), "lm_head.bias": torch.randn(4)}, str(path))
    with pytest.raises(vr.CheckpointError, match=r"foreign\.safetensors does not look like AnySplat.*"
                                                 r"encoder\.aggregator"):
        load_with(tiny, base=path)


def test_base_missing_one_tensor(tiny, tmp_path):
    name = "encoder.aggregator.frame_blocks.13.ls2.gamma"
    state = load_file(str(tiny["base"]))
    del state[name]
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    with pytest.raises(vr.CheckpointError, match=r"1 missing.*" + re.escape(name)):
        load_with(tiny, base=path)


def test_stitching_conv_shape_disagrees_with_spec(tiny, checkpoint, tmp_path):
    conv = {"weight": torch.zeros(32, 16, 3, 3, 3), "bias": torch.zeros(32)}  # spec says k5x3x3
    with pytest.raises(vr.CheckpointError, match=r"stitching_layer\.weight: the file has shape \[32, 16, 3, 3, 3\], "
                                                 r"the config gives \[32, 16, 5, 3, 3\]"):
        load_with(tiny, ckpt=saved({**checkpoint, "stitching_layer": conv}, tmp_path / "ckpt.pth"))


# --------------------------------------------------------------------------- config


def test_malformed_conv_spec(tiny):
    config = config_copy(tiny)
    config["stitching"]["stitching_layer_config"] = "conv3d_kAx3_o32"
    with pytest.raises(vr.ConfigError, match=r"bad conv spec 'conv3d_kAx3_o32'"):
        load_with(tiny, config=config)


def test_conv_spec_out_channels_differ_from_embed_dim(tiny):
    config = config_copy(tiny)
    config["stitching"]["stitching_layer_config"] = "conv3d_k5x3x3_o64_s1x2x2_p2x1x1"
    with pytest.raises(vr.ConfigError, match=r"conv3d_k5x3x3_o64_s1x2x2_p2x1x1.* 64 channels .*width is 32"):
        load_with(tiny, config=config)


def test_unknown_encoder_cfg_key(tiny):
    config = config_copy(tiny)
    config["anysplat"]["encoder_cfg"]["voxelise"] = True
    with pytest.raises(vr.ConfigError, match=r"unknown keys in config section 'anysplat\.encoder_cfg': \['voxelise'\]"):
        load_with(tiny, config=config)


def test_config_file_not_json(tiny, tmp_path):
    path = tmp_path / "vist3a.json"
    path.write_text("stitching:\n  lora_config: r4\n")  # YAML, not JSON
    with pytest.raises(vr.ConfigError, match=r"vist3a\.json is not valid JSON"):
        load_with(tiny, config=path)


def test_missing_config_file(tiny, tmp_path):
    with pytest.raises(vr.ConfigError, match=r"decoder config not found: .*absent\.json"):
        load_with(tiny, config=tmp_path / "absent.json")


def test_unsupported_dtype(tiny):
    with pytest.raises(vr.ConfigError, match=r"dtype must be one of .*got torch\.int8"):
        load_with(tiny, dtype=torch.int8)
