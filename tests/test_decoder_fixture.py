"""The public decoder API end to end against the official golden fixtures.

Everything goes through ``vr.load_stitched_decoder`` / ``vr.load_reconstruction_model`` and
the returned modules, exactly as a user would call them. Tolerances are the fixture READMEs':
``anysplat_stitched_tiny`` atol 1e-5 + rtol 1e-4, ``e2e_tiny`` atol 5e-5 + rtol 1e-4, scales
and covariances (about 1e-3 and 1e-7 in size) relative to 1e-4 of their largest value, counts
and the boolean mask exact.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import vist3a_rt as vr
from conftest import fixture_dir

ATOL, RTOL = 1e-5, 1e-4
E2E_ATOL = 5e-5
GAUSSIAN_FIELDS = ("means", "covariances", "harmonics", "opacities", "scales", "rotations")
RELATIVE_FIELDS = ("covariances", "scales")  # tiny values: compared relative to their max
NUM_PIXELS = 13 * 42 * 42  # one Gaussian per feed-forward pixel without voxelization
NUM_VOXELS = 2198  # io_stitched_voxelized's count
# bfloat16 vs the float32 golden, measured max: means 0.024 abs (1.5% of max |mean|), covariances 1.7%,
# harmonics 0.66%, opacities 0.72%, scales 0.48%, rotations 0.69% of max; extrinsics 0.012,
# intrinsics 0.0094, depth 0.0026. Allowed: about 2-3x that (bf16 keeps 8 mantissa bits, and the error
# accumulates over 2 DINO blocks, 48 aggregator blocks and the heads).
BF16_RELATIVE = {"means": 3e-2, "covariances": 4e-2, "harmonics": 2e-2, "opacities": 2e-2, "scales": 2e-2,
                 "rotations": 2e-2}  # of the largest |fp32 value|
BF16_ATOL = {"extrinsics": 3e-2, "intrinsics": 3e-2, "depth": 1e-2}


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, *, atol: float = ATOL,
                   relative: bool = False) -> None:
    """Same shape; within atol + rtol·|expected| (atol = 1e-4·max|expected| when ``relative``)."""
    assert tuple(actual.shape) == tuple(expected.shape)
    if relative:
        atol = RTOL * expected.abs().max().item()
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=RTOL)


def run(model, *inputs):
    with torch.no_grad():
        return model(*inputs)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny():
    folder = fixture_dir("anysplat_stitched_tiny")
    return {"folder": folder, "config": json.loads((folder / "config.json").read_text()),
            "base": folder / "anysplat_base.safetensors",
            "io": load_file(str(folder / "io_stitched.safetensors"))}


@pytest.fixture(scope="module", params=["stitched_checkpoint.pth", "stitched_checkpoint.safetensors"])
def decoder(request, tiny):
    return vr.load_stitched_decoder(tiny["config"], tiny["base"], tiny["folder"] / request.param)


@pytest.fixture(scope="module")
def outputs(decoder, tiny):
    io = tiny["io"]
    return run(decoder, io["inputs.latent"], io["inputs.feedforward_image"])


@pytest.fixture(scope="module")
def fp32_outputs(tiny):
    """Outputs of the .pth-loaded float32 decoder (for the scene / camera / bf16 checks)."""
    model = vr.load_stitched_decoder(tiny["config"], tiny["base"], tiny["folder"] / "stitched_checkpoint.pth")
    return run(model, tiny["io"]["inputs.latent"], tiny["io"]["inputs.feedforward_image"])


# --------------------------------------------------------------------------- stitched forward


@pytest.mark.parametrize("field", GAUSSIAN_FIELDS)
def test_stitched_gaussians_match_official(outputs, tiny, field):
    assert_matches(getattr(outputs.gaussians, field), tiny["io"][f"outputs.gaussians.{field}"],
                   relative=field in RELATIVE_FIELDS)


def test_stitched_counts_exact(outputs, tiny):
    assert outputs.num_gaussians == [NUM_PIXELS]
    assert outputs.means.shape[1] == NUM_PIXELS
    assert outputs.image_size == (42, 42)
    assert outputs.voxelize_ratio == tiny["io"]["outputs.infos.voxelize_ratio"].item() == 1.0


def test_stitched_cameras_match_official(outputs, tiny):
    io = tiny["io"]
    assert_matches(outputs.extrinsics, io["outputs.pred_context_pose.extrinsic"])
    assert_matches(outputs.intrinsics, io["outputs.pred_context_pose.intrinsic"])


def test_stitched_depth_match_official(outputs, tiny):
    io = tiny["io"]
    assert_matches(outputs.depth, io["outputs.depth_dict.depth"])
    assert_matches(outputs.depth_conf, io["intermediate.depth_conf"])
    expected_mask = io["outputs.depth_dict.conf_valid_mask"]
    assert outputs.conf_valid_mask.dtype == torch.bool
    assert torch.equal(outputs.conf_valid_mask, expected_mask)


def test_stitched_pose_encodings_match_official(outputs, tiny):
    io = tiny["io"]
    assert len(outputs.pose_encodings) == 4  # one per camera-head refinement iteration
    for i, pose in enumerate(outputs.pose_encodings):
        assert_matches(pose, io[f"outputs.pred_pose_enc_list.{i}"])
    assert_matches(outputs.pose_encodings[-1], io["outputs.last_pred_pose_enc"])


def test_stitched_scene_scale_matches_official(outputs, tiny):
    assert_matches(outputs.scene_scale.reshape(1), tiny["io"]["outputs.infos.scene_scale"])


def test_stitch_tokens_and_upsampled_latent_match_official(decoder, tiny):
    io = tiny["io"]
    with torch.no_grad():
        assert_matches(decoder.stitching_layer.upsample(io["inputs.latent"]), io["intermediate.upsampled_latent"])
        assert_matches(decoder.stitch_tokens(io["inputs.latent"]), io["stitch_tokens"])


# --------------------------------------------------------------------------- voxelized variant


@pytest.fixture(scope="module")
def voxelized(tiny):
    config = json.loads(json.dumps(tiny["config"]))
    config["anysplat"]["encoder_cfg"].update(voxelize=True, voxel_size=0.05)
    model = vr.load_stitched_decoder(config, tiny["base"], tiny["folder"] / "stitched_checkpoint.pth")
    expected = load_file(str(tiny["folder"] / "io_stitched_voxelized.safetensors"))
    return run(model, tiny["io"]["inputs.latent"], tiny["io"]["inputs.feedforward_image"]), expected


@pytest.mark.parametrize("field", GAUSSIAN_FIELDS)
def test_voxelized_gaussians_match_official(voxelized, field):
    out, expected = voxelized
    assert_matches(getattr(out.gaussians, field), expected[f"outputs.gaussians.{field}"],
                   relative=field in RELATIVE_FIELDS)


def test_voxelized_counts_and_infos(voxelized):
    out, expected = voxelized
    assert out.num_gaussians == [NUM_VOXELS]
    assert out.voxelize_ratio == pytest.approx(expected["outputs.infos.voxelize_ratio"].item(), rel=1e-12)
    assert out.voxelize_ratio == pytest.approx(NUM_VOXELS / NUM_PIXELS, rel=1e-12)
    assert_matches(out.scene_scale.reshape(1), expected["outputs.infos.scene_scale"])


# --------------------------------------------------------------------------- e2e_tiny model folder


@pytest.fixture(scope="module")
def e2e():
    folder = fixture_dir("e2e_tiny")
    model = folder / "model"
    decoder = vr.load_stitched_decoder(model / "vist3a.json", model / "anysplat", model / "anysplat_stitched.pth")
    golden = load_file(str(folder / "golden.safetensors"))
    out = run(decoder, golden["intermediate.denormalized_latents"], golden["intermediate.feedforward_image"])
    return out, golden


@pytest.mark.parametrize("field", GAUSSIAN_FIELDS)
def test_e2e_model_folder_gaussians_match_golden(e2e, field):
    out, golden = e2e
    assert_matches(getattr(out.gaussians, field), golden[f"outputs.gaussians.{field}"], atol=E2E_ATOL,
                   relative=field in RELATIVE_FIELDS)


def test_e2e_model_folder_cameras_and_depth_match_golden(e2e):
    out, golden = e2e
    assert out.num_gaussians == [NUM_PIXELS]
    assert_matches(out.extrinsics, golden["outputs.extrinsic"], atol=E2E_ATOL)
    assert_matches(out.intrinsics, golden["outputs.intrinsic"], atol=E2E_ATOL)
    assert_matches(out.depth, golden["outputs.depth"], atol=E2E_ATOL)


@pytest.fixture
def released_folder(tmp_path):
    """A copy of e2e_tiny/model/anysplat/: the AnySplat hub config.json + model.safetensors only."""
    source = fixture_dir("e2e_tiny") / "model" / "anysplat"
    folder = tmp_path / "anysplat"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(source / name, folder / name)
    return folder


def test_released_folder_without_config_needs_architecture_constants(released_folder):
    """config=None takes the official full-size architecture and LoRA spec (24 DINO blocks,
    width 1024, r64): the tiny checkpoint's LoRA modules cannot match, and the error names them."""
    ckpt = fixture_dir("e2e_tiny") / "model" / "anysplat_stitched.pth"
    with pytest.raises(vr.CheckpointError, match=r"LoRA modules .*do not match.*missing.*patch_embed\.blocks\.\d+"):
        vr.load_stitched_decoder(None, released_folder, ckpt)
    with pytest.raises(vr.CheckpointError, match=r"do not match the model built from the config.*"
                                                 r"missing.*encoder\.aggregator\.patch_embed\.blocks\.\d+"):
        vr.load_reconstruction_model(None, released_folder)


def test_released_folder_with_official_widths_names_the_shape_mismatch(released_folder):
    """With the DINO depth right but the widths left at the official values, the first
    mismatching tensor is named with both shapes."""
    config = {"architecture_constants": {"dino_depth": 4}}  # encoder_cfg comes from the folder
    with pytest.raises(vr.CheckpointError, match=r"encoder\.aggregator\.\S+: the file has shape \[.*32\], "
                                                 r"the config gives \[.*1024\]"):
        vr.load_reconstruction_model(config, released_folder)


# --------------------------------------------------------------------------- unstitched AnySplat


@pytest.fixture(scope="module")
def reconstruction(tiny):
    model = vr.load_reconstruction_model(tiny["config"], tiny["base"])
    search = load_file(str(tiny["folder"] / "io_layer_search.safetensors"))
    video = search["videos.feedforward_image_uint8"][:1].to(torch.float32) / 127.5 - 1  # [1, 3, 13, 42, 42]
    return model, video, search


def test_reconstruction_block_outputs_match_layer_search_hooks(reconstruction):
    model, video, search = reconstruction
    with torch.no_grad():
        blocks = model.block_outputs(video)
    assert len(blocks) == 4  # the tiny DINO's depth
    for j, block in enumerate(blocks, start=1):
        assert_matches(block, search[f"features_fp32_full_video0.enc_blocks_{j}"], atol=1e-5)


def test_reconstruction_forward_is_finite(reconstruction):
    model, video, _ = reconstruction
    out = run(model, video)
    assert out.num_gaussians == [NUM_PIXELS]
    assert out.means.shape == (1, NUM_PIXELS, 3)
    assert out.extrinsics.shape == (1, 13, 4, 4) and out.depth.shape == (1, 13, 42, 42, 1)
    for name in (*GAUSSIAN_FIELDS, "extrinsics", "intrinsics", "depth", "depth_conf"):
        assert torch.isfinite(getattr(out, name)).all(), name


# --------------------------------------------------------------------------- scene and cameras


def test_to_scene_reorders_the_official_layout(fp32_outputs):
    # the reordering is checked against our own output (its closeness to the golden is tested above)
    g = fp32_outputs.gaussians
    scene = fp32_outputs.to_scene()
    assert len(scene) == NUM_PIXELS
    xyzw = g.rotations[0]
    # to_scene re-normalises the (already unit) quaternions: at most a last-bit change
    torch.testing.assert_close(scene.rotations, torch.cat([xyzw[:, 3:], xyzw[:, :3]], dim=-1), atol=1e-6, rtol=0)
    assert torch.equal(scene.sh, g.harmonics[0].transpose(-1, -2))
    assert scene.sh_degree == 4
    assert torch.equal(scene.means, g.means[0])
    assert torch.equal(scene.scales, g.scales[0])
    assert torch.equal(scene.opacities, g.opacities[0])


def test_cameras_are_pixel_intrinsics_and_camera_to_world(fp32_outputs, tiny):
    io = tiny["io"]
    cameras = fp32_outputs.cameras()
    H, W = 42, 42
    assert (len(cameras), cameras.width, cameras.height) == (13, W, H)
    normalized = io["outputs.pred_context_pose.intrinsic"][0]
    torch.testing.assert_close(cameras.K[:, 0, 0], normalized[:, 0, 0] * W)
    torch.testing.assert_close(cameras.K[:, 1, 1], normalized[:, 1, 1] * H)
    torch.testing.assert_close(cameras.K[:, :2, 2], torch.full((13, 2), W / 2))
    torch.testing.assert_close(cameras.camtoworld, io["outputs.pred_context_pose.extrinsic"][0])
    # geometric check: the means (unprojected depth) project back to their own pixel at their depth
    means = io["outputs.gaussians.means"][0].reshape(13, H * W, 3)
    world = torch.cat([means, torch.ones_like(means[..., :1])], dim=-1).double()
    cam = (torch.linalg.inv(cameras.camtoworld.double()) @ world.transpose(1, 2)).transpose(1, 2)[..., :3]
    torch.testing.assert_close(cam[..., 2], io["outputs.depth_dict.depth"][0].reshape(13, H * W).double(),
                               atol=1e-5, rtol=1e-5)
    pixels = (cameras.K.double() @ cam.transpose(1, 2)).transpose(1, 2)
    pixels = pixels[..., :2] / pixels[..., 2:]
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    expected = torch.stack([u, v], dim=-1).reshape(1, H * W, 2).expand(13, -1, -1)
    torch.testing.assert_close(pixels, expected, atol=1e-3, rtol=0)


def test_scene_survives_ply_round_trip(fp32_outputs, tmp_path):
    scene = fp32_outputs.to_scene()
    scene.save_ply(tmp_path / "scene.ply", sh_degree=4)
    loaded = vr.GaussianScene.load_ply(tmp_path / "scene.ply")
    assert len(loaded) == NUM_PIXELS and loaded.sh_degree == 4
    for name in ("means", "rotations", "sh", "opacities"):  # opacities here are in [0.37, 0.47]: exact
        assert torch.equal(getattr(loaded, name), getattr(scene, name)), name
    # log-encoded scales of ~1e-3: within (|log s| + 1) * 2^-24 relative (ply.py)
    torch.testing.assert_close(loaded.scales, scene.scales, atol=0, rtol=1e-6)


# --------------------------------------------------------------------------- bfloat16


@pytest.fixture(scope="module")
def bf16_decoder(tiny):
    return vr.load_stitched_decoder(tiny["config"], tiny["base"], tiny["folder"] / "stitched_checkpoint.pth",
                                    dtype=torch.bfloat16)


def test_bf16_parameters_are_bf16(bf16_decoder):
    assert {p.dtype for p in bf16_decoder.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in bf16_decoder.buffers() if b.is_floating_point()} <= {torch.bfloat16}


def test_bf16_forward_close_to_fp32(bf16_decoder, fp32_outputs, tiny):
    io = tiny["io"]
    out = run(bf16_decoder, io["inputs.latent"], io["inputs.feedforward_image"])
    assert out.num_gaussians == [NUM_PIXELS]
    for field in GAUSSIAN_FIELDS:
        actual, reference = getattr(out.gaussians, field), getattr(fp32_outputs.gaussians, field)
        assert actual.dtype == torch.bfloat16, field
        assert torch.isfinite(actual).all(), field
        atol = BF16_RELATIVE[field] * reference.abs().max().item()
        torch.testing.assert_close(actual.float(), reference, atol=atol, rtol=0, msg=lambda m, f=field: f"{f}: {m}")
    for name, atol in BF16_ATOL.items():
        actual, reference = getattr(out, name), getattr(fp32_outputs, name)
        assert torch.isfinite(actual).all(), name
        torch.testing.assert_close(actual.float(), reference, atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    scene = out.to_scene()
    assert scene.dtype == torch.float32 and len(scene) == NUM_PIXELS
