"""DINO, aggregator, camera head and stitching layer against the official tiny golden data.

Fixture: ../shared/fixtures/anysplat_stitched_tiny (official VIST3A code on CPU, float32).
"""

import json

import pytest
import torch
from conftest import fixture_dir

from vist3a_rt.checkpoints.lora import lora_module_names, merge_lora, parse_lora_spec
from vist3a_rt.checkpoints.official import (cut_base_state, read_anysplat_base, read_safetensors,
                                            read_stitched_checkpoint, replace_dino_tokens)
from vist3a_rt.decoder.aggregator import Aggregator
from vist3a_rt.decoder.camera_head import CameraHead
from vist3a_rt.decoder.dino import DinoVisionTransformer
from vist3a_rt.decoder.layers import RotaryPositionEmbedding2D, grid_positions
from vist3a_rt.decoder.stitching import ConvSpec, StitchingLayer, parse_conv_spec
from vist3a_rt.errors import ConfigError, Vist3AInputError

NAME = "anysplat_stitched_tiny"
STITCH_INDEX = 2
TINY = dict(embed_dim=32, num_heads=4, dino_depth=4, dino_num_heads=4)  # config.json architecture_constants


def _sub(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _assert_close(actual, expected, name, atol=1e-5, rtol=1e-4):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def fixture():
    return fixture_dir(NAME)


@pytest.fixture(scope="module")
def base(fixture):
    return read_anysplat_base(fixture / "anysplat_base.safetensors")


@pytest.fixture(scope="module")
def checkpoint(fixture):
    return read_stitched_checkpoint(fixture / "stitched_checkpoint.pth")


@pytest.fixture(scope="module")
def stitched_state(base, checkpoint):
    state = replace_dino_tokens(cut_base_state(base, STITCH_INDEX), checkpoint)
    return merge_lora(state, checkpoint["lora"], parse_lora_spec("r4,a8,d0.0,f0"),
                      lora_module_names(checkpoint["lora"]))


@pytest.fixture(scope="module")
def stitched_modules(stitched_state, checkpoint):
    aggregator = Aggregator(**TINY, dino_first_block=STITCH_INDEX).eval()
    aggregator.load_state_dict(_sub(stitched_state, "encoder.aggregator."), strict=True)
    camera_head = CameraHead(dim_in=64).eval()
    camera_head.load_state_dict(_sub(stitched_state, "encoder.camera_head."), strict=True)
    stitching = StitchingLayer("conv3d_k5x3x3_o32_s1x2x2_p2x1x1", in_channels=16).eval()
    stitching.load_state_dict(checkpoint["stitching_layer"], strict=True)
    return stitching, aggregator, camera_head


# --- 1. unstitched DINO: layer-search features ---------------------------------------------

@pytest.fixture(scope="module")
def unstitched_aggregator(base):
    aggregator = Aggregator(**TINY).eval()
    aggregator.load_state_dict(_sub(base, "encoder.aggregator."), strict=True)
    return aggregator


@pytest.fixture(scope="module")
def layer_search_features(fixture, unstitched_aggregator):
    io = read_safetensors(fixture / "io_layer_search.safetensors")
    videos = io["videos.feedforward_image_uint8"]  # [V, 3, T, H, W]
    outputs = []
    with torch.no_grad():
        for batch in videos.split(3):  # the official run used batches of 3 videos
            model_input = batch.float() / 127.5 - 1
            images = ((model_input + 1) / 2).permute(0, 2, 1, 3, 4)  # [B, T, 3, H, W] in [0, 1]
            outputs.append(unstitched_aggregator.dino_block_outputs(images))
    return io, [torch.cat(per_block) for per_block in zip(*outputs)]


def test_dino_block_outputs_match_fp32_hook(layer_search_features):
    io, blocks = layer_search_features
    assert len(blocks) == 4
    for j, block in enumerate(blocks, start=1):
        _assert_close(block[:1], io[f"features_fp32_full_video0.enc_blocks_{j}"], f"enc_blocks_{j}")


def test_dino_block_outputs_match_fp16_features(layer_search_features):
    io, blocks = layer_search_features
    for j, block in enumerate(blocks, start=1):
        ours = block[:, :, 5:].half()  # prefix (cls + 4 registers) removed, stored as float16
        expected = io[f"features.enc_blocks_{j}"]
        ulp = torch.finfo(torch.float16).eps * expected.float().abs().clamp(min=2 ** -14)
        assert ours.shape == expected.shape
        assert ((ours.float() - expected.float()).abs() <= ulp).all(), f"enc_blocks_{j} off by more than 1 ulp"


def test_unstitched_aggregator_runs(unstitched_aggregator):
    images = torch.rand(1, 2, 3, 28, 42)
    with torch.no_grad():
        taps, patch_start_idx = unstitched_aggregator(images)
    assert patch_start_idx == 5
    assert [tuple(t.shape) for t in taps] == [(1, 2, 5 + 2 * 3, 64)] * 4


# --- 2. stitched forward: stitching layer -> DINO tail -> aggregator -> camera head -----------

@pytest.fixture(scope="module")
def stitched_run(fixture, stitched_modules):
    io = read_safetensors(fixture / "io_stitched.safetensors")
    stitching, aggregator, camera_head = stitched_modules
    with torch.no_grad():
        upsampled = stitching.upsample(io["inputs.latent"])
        tokens = stitching(io["inputs.latent"])  # [B, E, T, h, w]
        B, E, S, h, w = tokens.shape
        patch_tokens = tokens.permute(0, 2, 3, 4, 1).reshape(B, S, h * w, E)  # row-major grid
        dino = aggregator.patch_embed(patch_tokens.flatten(0, 1), (h, w))
        taps, patch_start_idx = aggregator.aggregate(aggregator.drop_dino_prefix(dino).unflatten(0, (B, S)), (h, w))
        poses = camera_head(taps[-1])
        taps_direct, _ = aggregator.forward_stitched(patch_tokens, (h, w))
    return io, dict(upsampled=upsampled, tokens=tokens, dino=dino, taps=taps, poses=poses,
                    patch_start_idx=patch_start_idx, taps_direct=taps_direct)


def test_stitching_layer_matches(stitched_run):
    io, out = stitched_run
    _assert_close(out["upsampled"], io["intermediate.upsampled_latent"], "upsampled_latent")
    _assert_close(out["tokens"], io["stitch_tokens"], "stitch_tokens")


def test_stitched_dino_matches(stitched_run):
    io, out = stitched_run
    _assert_close(out["dino"], io["intermediate.dino_final_norm_tokens"], "dino_final_norm_tokens")


def test_aggregator_matches(stitched_run):
    io, out = stitched_run
    assert out["patch_start_idx"] == 5 and len(out["taps"]) == 4
    for i, tap in enumerate(out["taps"]):
        _assert_close(tap, io[f"intermediate.aggregated_tokens.{i}"], f"aggregated_tokens.{i}")
        assert torch.equal(tap, out["taps_direct"][i])


def test_camera_head_matches(stitched_run):
    io, out = stitched_run
    assert len(out["poses"]) == 4
    for i, pose in enumerate(out["poses"]):
        _assert_close(pose, io[f"outputs.pred_pose_enc_list.{i}"], f"pred_pose_enc_list.{i}")


def test_linear_and_conv_modules_are_the_official_lora_targets(fixture, stitched_modules):
    _, aggregator, camera_head = stitched_modules
    ours = {f"encoder.{prefix}.{name}" for prefix, module in (("aggregator", aggregator), ("camera_head", camera_head))
            for name, sub in module.named_modules() if isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d))}
    config = json.loads((fixture / "config.json").read_text())
    official = {n for n in config["stitching"]["lora_module_names"]
                if n.startswith(("encoder.aggregator.", "encoder.camera_head."))}
    assert ours == official


def test_stitched_dino_has_no_patch_conv(stitched_modules):
    dino = stitched_modules[1].patch_embed
    assert not hasattr(dino, "patch_embed") and len(dino.blocks) == 2
    with pytest.raises(RuntimeError, match="no patch conv"):
        dino.embed_images(torch.zeros(1, 3, 42, 42))


# --- shapes and small pieces ---------------------------------------------------------------

def test_token_shape_errors():
    dino = DinoVisionTransformer(embed_dim=32, depth=2, num_heads=4)
    with pytest.raises(Vist3AInputError, match=r"\[N, 3\*3, 32\]"):
        dino(torch.zeros(2, 8, 32), (3, 3))
    with pytest.raises(Vist3AInputError, match="multiples of 14"):
        dino.forward_images(torch.zeros(1, 3, 40, 42))
    aggregator = Aggregator(embed_dim=32, depth=2, num_heads=4, dino_depth=2, dino_num_heads=4,
                            intermediate_layer_idx=(0,))
    assert aggregator.tapped_layers == (0, 1)  # the last layer is always tapped (camera head)
    with pytest.raises(Vist3AInputError, match=r"images \[B, S, 3, H, W\]"):
        aggregator(torch.zeros(2, 3, 28, 28))
    with pytest.raises(Vist3AInputError, match="patch tokens"):
        aggregator.forward_stitched(torch.zeros(2, 9, 32), (3, 3))
    with pytest.raises(ValueError, match="outside"):
        Aggregator(embed_dim=32, depth=2, num_heads=4, dino_depth=2, dino_num_heads=4, intermediate_layer_idx=(2,))
    with pytest.raises(Vist3AInputError, match="camera head expects"):
        CameraHead(dim_in=64)(torch.zeros(1, 2, 5, 32))


def test_grid_positions_layout():
    pos = grid_positions(2, 3, num_special=2)
    assert pos.tolist() == [[0, 0], [0, 0], [1, 1], [1, 2], [1, 3], [2, 1], [2, 2], [2, 3]]
    assert grid_positions(1, 2).tolist() == [[0, 0], [0, 1]]


def test_rope_is_identity_at_origin_and_preserves_norm():
    rope = RotaryPositionEmbedding2D(100)
    x = torch.randn(2, 3, 5, 8)
    assert torch.equal(rope(x, torch.zeros(2, 5, 2, dtype=torch.long)), x)
    pos = torch.randint(0, 9, (2, 5, 2))
    torch.testing.assert_close(rope(x, pos).norm(dim=-1), x.norm(dim=-1))


# --- 3. conv-spec grammar and the stitching layer ------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("conv3d_k5x3x3_o1024_s1x2x2_p2x1x1", ConvSpec(3, 1024, (5, 3, 3), (1, 2, 2), (2, 1, 1), (1, 1, 1))),
    ("conv2d_k3_o64", ConvSpec(2, 64, (3, 3), (1, 1), (0, 0), (1, 1))),
    ("CONV3D_K3X3X3_O32_S2_P1", ConvSpec(3, 32, (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1))),
    ("conv1d_k7_o8_d2", ConvSpec(1, 8, (7,), (1,), (0,), (2,))),
    ("conv3d_k1_o4_p0", ConvSpec(3, 4, (1, 1, 1), (1, 1, 1), (0, 0, 0), (1, 1, 1))),
])
def test_parse_conv_spec(text, expected):
    spec = parse_conv_spec(text)
    assert spec == expected
    assert parse_conv_spec(spec.text) == spec


@pytest.mark.parametrize("text, message", [
    ("conv4d_k3_o8", "bad conv spec"),
    ("conv3d_o8", "bad conv spec"),
    ("conv3d_k3", "bad conv spec"),
    ("conv3d_k3_o8_p1_s2", "bad conv spec"),  # fields out of order
    ("conv3d_k3_o8_", "bad conv spec"),
    (" conv3d_k3_o8", "bad conv spec"),
    ("conv3d_k3x3_o8", "has 2 entries, a conv3d needs 1 or 3"),
    ("conv2d_k3x3x3_o8", "has 3 entries, a conv2d needs 1 or 2"),
    ("conv3d_k3xx3_o8", "kernel_size '3xx3' must be an int"),
    ("conv3d_k0_o8", "kernel_size entries must be >= 1"),
    ("conv3d_k3_o0", "out channels must be positive"),
    ("conv3d_k3_o8_s1x0x1", "stride entries must be >= 1"),
    ("conv3d_k3_o8_d0", "dilation entries must be >= 1"),
])
def test_parse_conv_spec_rejects(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_conv_spec(text)


def test_parse_conv_spec_rejects_non_string():
    with pytest.raises(ConfigError, match="must be a string"):
        parse_conv_spec(3)


def test_stitching_layer_shapes_and_errors():
    layer = StitchingLayer("conv3d_k5x3x3_o32_s1x2x2_p2x1x1", in_channels=16)
    assert set(layer.state_dict()) == {"weight", "bias"}
    assert layer.padding_mode == "replicate"
    assert layer(torch.randn(2, 16, 4, 6, 8)).shape == (2, 32, 13, 3, 4)
    assert layer(torch.randn(1, 16, 1, 4, 4)).shape == (1, 32, 1, 2, 2)
    with pytest.raises(Vist3AInputError, match=r"\[B, 16, T_lat, h, w\], got \[1, 8, 4, 6, 6\]"):
        layer(torch.randn(1, 8, 4, 6, 6))
    with pytest.raises(Vist3AInputError, match=r"got \[16, 4, 6, 6\]"):
        layer(torch.randn(16, 4, 6, 6))
    with pytest.raises(Vist3AInputError, match="empty latent"):
        layer(torch.randn(1, 16, 0, 6, 6))
    with pytest.raises(ConfigError, match="needs a conv3d spec"):
        StitchingLayer("conv2d_k3_o8")
