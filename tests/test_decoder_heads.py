"""Depth head, Gaussian head, camera geometry and Gaussian adapter against the official golden data.

Inputs are the fixture's aggregator taps and image; weights are the official base with the
stitched checkpoint's LoRA merged. Tolerances are the fixture README's.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import fixture_dir
from vist3a_rt.checkpoints.lora import lora_module_names, merge_lora, parse_lora_spec
from vist3a_rt.checkpoints.official import cut_base_state, read_anysplat_base, read_stitched_checkpoint, replace_dino_tokens
from vist3a_rt.decoder.dpt import DPTHead, GaussianParamHead
from vist3a_rt.decoder.gaussians import GaussianAdapter, gaussians_from_pixels, pad_tensor_list, scene_scale, voxelize
from vist3a_rt.decoder.geometry import camera_to_world, decode_pose_encoding, normalize_intrinsics, unproject_depth

ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def fixture():
    folder = fixture_dir("anysplat_stitched_tiny")
    config = json.loads((folder / "config.json").read_text())
    base = read_anysplat_base(folder / "anysplat_base.safetensors")
    ck = read_stitched_checkpoint(folder / "stitched_checkpoint.pth")
    state = replace_dino_tokens(cut_base_state(base, 2), ck)
    state = merge_lora(state, ck["lora"], parse_lora_spec(config["stitching"]["lora_config"]),
                       lora_module_names(ck["lora"]))
    return {"config": config, "state": state, "io": load_file(str(folder / "io_stitched.safetensors")),
            "voxel": load_file(str(folder / "io_stitched_voxelized.safetensors"))}


def _sub_state(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _heads(fixture):
    arch = fixture["config"]["architecture_constants"]
    dim_in = 2 * arch["embed_dim"]
    depth = DPTHead(dim_in, arch["patch_size"], features=arch["dpt_features"], out_channels=arch["dpt_out_channels"])
    gs = GaussianParamHead(dim_in, arch["patch_size"], features=arch["gs_features"],
                           out_channels=arch["gs_out_channels"], head_features_1=arch["gs_head_features_1"],
                           head_features_2=arch["gs_head_features_2"])
    depth.load_state_dict(_sub_state(fixture["state"], "encoder.depth_head."), strict=True)
    gs.load_state_dict(_sub_state(fixture["state"], "encoder.gaussian_param_head."), strict=True)
    return depth.eval(), gs.eval()


def _close(actual, expected, relative=False):
    expected = expected.reshape(actual.shape).to(actual.dtype)
    atol = RTOL * expected.abs().max().item() if relative else ATOL
    torch.testing.assert_close(actual, expected, atol=atol, rtol=RTOL)


@pytest.fixture(scope="module")
def forward(fixture):
    """The decoder tail of the official stitched forward, from the aggregator taps onwards."""
    io = fixture["io"]
    tokens = [io[f"intermediate.aggregated_tokens.{i}"] for i in range(4)]
    images = ((io["inputs.feedforward_image"] + 1) / 2).permute(0, 2, 1, 3, 4)  # [B, S, 3, H, W]
    hw = tuple(images.shape[-2:])
    depth_head, gs_head = _heads(fixture)
    with torch.no_grad():
        depth, depth_conf = depth_head(tokens, images)
        extrinsics, intrinsics = decode_pose_encoding(io["outputs.last_pred_pose_enc"], hw)
        points = unproject_depth(depth, extrinsics, intrinsics)
        head_out = gs_head(tokens, images)
    return dict(images=images, hw=hw, depth=depth, depth_conf=depth_conf, extrinsics=extrinsics,
                intrinsics=intrinsics, points=points, head_out=head_out)


def test_modules_mirror_official_tree(fixture):
    depth_head, gs_head = _heads(fixture)
    lora_targets = {n for n in fixture["config"]["stitching"]["lora_module_names"]
                    if n.startswith(("encoder.depth_head.", "encoder.gaussian_param_head."))}
    ours = {f"encoder.{head}.{name}" for head, module in (("depth_head", depth_head), ("gaussian_param_head", gs_head))
            for name, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert ours == lora_targets


def test_depth_head(fixture, forward):
    assert forward["depth"].shape == (1, 13, 42, 42, 1) and forward["depth_conf"].shape == (1, 13, 42, 42)
    _close(forward["depth"], fixture["io"]["outputs.depth_dict.depth"])
    _close(forward["depth_conf"], fixture["io"]["intermediate.depth_conf"])


def test_context_cameras(fixture, forward):
    io = fixture["io"]
    _close(camera_to_world(forward["extrinsics"]), io["outputs.pred_context_pose.extrinsic"])
    _close(normalize_intrinsics(forward["intrinsics"], forward["hw"]), io["outputs.pred_context_pose.intrinsic"])


def _check_gaussians(gaussians, expected):
    for name in ("means", "harmonics", "opacities", "rotations"):
        _close(getattr(gaussians, name), expected[f"outputs.gaussians.{name}"])
    for name in ("scales", "covariances"):
        _close(getattr(gaussians, name), expected[f"outputs.gaussians.{name}"], relative=True)


def test_pixel_gaussians(fixture, forward):
    io = fixture["io"]
    assert forward["head_out"].shape == (1, 13, 84, 42, 42)
    gaussians = gaussians_from_pixels(forward["head_out"], forward["points"], GaussianAdapter(sh_degree=4))
    assert gaussians.means.shape == io["outputs.gaussians.means"].shape  # exact count: 22932
    _check_gaussians(gaussians, io)
    _close(scene_scale(forward["points"]), io["outputs.infos.scene_scale"])
    num_pixels = forward["points"][0, ..., 0].numel()
    assert gaussians.means.shape[1] / num_pixels == io["outputs.infos.voxelize_ratio"].item()


def test_voxelized_gaussians(fixture, forward):
    expected = fixture["voxel"]
    voxel_size = fixture["config"]["voxelized_variant"]["voxel_size"]
    gaussians = gaussians_from_pixels(forward["head_out"], forward["points"], GaussianAdapter(sh_degree=4),
                                      voxel_size=voxel_size)
    assert gaussians.means.shape == expected["outputs.gaussians.means"].shape  # 2198 voxels
    _check_gaussians(gaussians, expected)
    num_pixels = forward["points"][0, ..., 0].numel()
    assert gaussians.means.shape[1] / num_pixels == pytest.approx(expected["outputs.infos.voxelize_ratio"].item())


def test_voxelize_and_padding_semantics():
    points = torch.tensor([[0.01, 0.0, 0.0], [0.02, 0.0, 0.0], [1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    features = torch.arange(8.0).view(4, 2)
    conf = torch.tensor([0.0, 0.0, 5.0, 1.0])
    fused_points, fused_features = voxelize(points, features, conf, voxel_size=0.5)
    # voxels sorted lexicographically: x-id -2, 0, 2; the two points at id 0 weigh 1/2 each
    torch.testing.assert_close(fused_points[:, 0], torch.tensor([-1.0, 0.015, 1.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(fused_features[1], torch.tensor([1.0, 2.0]), atol=1e-5, rtol=0)
    padded = pad_tensor_list([torch.ones(2, 3), torch.ones(1, 3)], value=-7.0)
    assert padded.shape == (2, 2, 3) and padded[1, 1].eq(-7.0).all()


def test_batch_of_two_and_padding(fixture, forward):
    depth_head, gs_head = _heads(fixture)
    io = fixture["io"]
    tokens = [torch.cat([io[f"intermediate.aggregated_tokens.{i}"]] * 2) for i in range(4)]
    images = torch.cat([forward["images"]] * 2)
    with torch.no_grad():
        depth, _ = depth_head(tokens, images)
        head_out = gs_head(tokens, images)
    torch.testing.assert_close(depth[1:], forward["depth"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(head_out[1:], forward["head_out"], atol=ATOL, rtol=RTOL)
    points = torch.cat([forward["points"], forward["points"] * 0.5])  # coarser scene -> fewer voxels
    gaussians = gaussians_from_pixels(head_out, points, GaussianAdapter(sh_degree=4), voxel_size=0.05)
    count_1 = int((gaussians.means[1, :, 0] > -1e4).sum())
    assert count_1 < gaussians.means.shape[1] == fixture["voxel"]["outputs.gaussians.means"].shape[1]
    assert gaussians.opacities[1, count_1:].eq(0).all() and gaussians.means[1, count_1:].eq(-1e4).all()


def test_official_sizes_build():
    official = dict(features=256, out_channels=(256, 512, 1024, 1024))
    with torch.device("meta"):
        depth_head, gs_head = DPTHead(2048, **official), GaussianParamHead(2048, **official)
    assert depth_head.scratch.output_conv2[0].weight.shape == (32, 128, 3, 3)
    assert gs_head.scratch.output_conv2[0].weight.shape == (128, 128, 3, 3)
    assert gs_head.scratch.output_conv2[2].weight.shape == (84, 128, 1, 1)
    assert gs_head.input_merger[0].weight.shape == (128, 3, 7, 7)
