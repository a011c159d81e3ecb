"""Reconstruction-network training (``vist3a_rt.training.recon``) on synthetic Gaussian scenes.

The ground truth is a small scene of coloured Gaussian blobs over a flat "floor", rendered by
the reference rasterizer at orbit cameras (RGB, depth = accumulated depth / alpha, cameras).
"""

from __future__ import annotations

import math

import pytest
import torch

from vist3a_rt.decoder.config import DecoderConfig
from vist3a_rt.decoder.gaussians import GaussianParams, build_covariance
from vist3a_rt.decoder.geometry import decode_pose_encoding, normalize_intrinsics, quaternion_to_matrix
from vist3a_rt.decoder.network import DecoderOutput, ReconstructionModel, StitchedDecoder
from vist3a_rt.errors import Vist3AInputError
from vist3a_rt.rendering.reference import RasterConfig, quat_to_rotmat, rasterize_gaussians
from vist3a_rt.scene.cameras import Camera
from vist3a_rt.testing.tiny_model import tiny_decoder_config
from vist3a_rt.training.recon import (
    Clip, ReconSettings, ReconTrainer, Views, align_to_first_camera, camera_loss, depth_loss,
    encode_pose_encoding, evaluate, make_targets, matrix_to_quaternion, nano_decoder_config, recon_losses, ssim)

SIZE = 28  # 2 x 2 patches of 14 px
INPUT_ANGLES = (0.0, 25.0, 50.0)
NOVEL_ANGLES = (12.0, 37.0)

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------------- synthetic world


def synthetic_scene(seed: int = 0) -> dict[str, torch.Tensor]:
    """Coloured blobs around the origin over a floor of flat Gaussians at y = +0.6 (y is down)."""
    g = torch.Generator().manual_seed(seed)
    palette = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.3, 0.9], [0.1, 0.8, 0.2], [0.9, 0.8, 0.1]])
    blobs = 48
    means = torch.randn(blobs, 3, generator=g) * 0.35
    colours = palette[torch.randint(0, 4, (blobs,), generator=g)]
    scales = torch.rand(blobs, 3, generator=g) * 0.08 + 0.08
    xs = torch.linspace(-1.6, 1.6, 17)
    floor = torch.stack(torch.meshgrid(xs, xs, indexing="ij"), -1).reshape(-1, 2)
    floor_means = torch.stack([floor[:, 0], torch.full_like(floor[:, 0], 0.6), floor[:, 1]], -1)
    checker = ((torch.arange(17)[:, None] + torch.arange(17)[None]) % 2).reshape(-1, 1).float()
    floor_colours = 0.35 + 0.3 * checker.expand(-1, 3)
    floor_scales = torch.tensor([0.12, 0.01, 0.12]).expand(len(floor), 3)
    colours = torch.cat([colours, floor_colours])
    n = len(colours)
    return {"means": torch.cat([means, floor_means]), "scales": torch.cat([scales, floor_scales]),
            "quats": torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)
            * torch.cat([torch.ones(blobs), torch.zeros(len(floor))])[:, None]
            + torch.cat([torch.zeros(blobs), torch.ones(len(floor))])[:, None] * torch.tensor([1.0, 0, 0, 0]),
            "opacities": torch.full((n,), 0.95), "sh": ((colours - 0.5) / 0.28209479177387814)[:, None, :]}


def orbit(angles_deg, radius: float = 3.0, height: float = -1.2, size: int = SIZE):
    cams = [Camera.look_at((radius * math.sin(math.radians(a)), height, -radius * math.cos(math.radians(a))),
                           (0.0, 0.0, 0.0), fov_y_deg=55.0, width=size, height=size) for a in angles_deg]
    return torch.stack([c.camtoworld for c in cams]), torch.stack([c.K for c in cams])


def render_gt(scene, camtoworld, K, size: int = SIZE, raster: RasterConfig = RasterConfig()):
    """frames [3, V, H, W] in [-1, 1] and depth [V, H, W] (0 where alpha < 0.5)."""
    frames, depths = [], []
    for c2w, k in zip(camtoworld, K):
        out = rasterize_gaussians(scene["means"], scene["quats"], scene["scales"], scene["opacities"], scene["sh"],
                                  torch.linalg.inv(c2w), k, size, size, torch.ones(3), raster)
        frames.append(out.color.permute(2, 0, 1) * 2 - 1)
        alpha = out.alpha[..., 0]
        depths.append(torch.where(alpha > 0.5, out.depth[..., 0] / alpha.clamp_min(1e-6), torch.zeros_like(alpha)))
    return torch.stack(frames, dim=1), torch.stack(depths)


@pytest.fixture(scope="module")
def world():
    scene = synthetic_scene()
    c2w, K = orbit(INPUT_ANGLES)
    # move the whole world off the first camera's frame, so alignment has something to do
    shift = torch.eye(4)
    shift[:3, :3] = quat_to_rotmat(torch.tensor([[0.9, 0.2, -0.3, 0.1]]))[0]
    shift[:3, 3] = torch.tensor([0.5, -0.2, 1.0])
    scene = {**scene, "means": scene["means"] @ shift[:3, :3].T + shift[:3, 3],
             "quats": _rotate_quats(scene["quats"], shift[:3, :3])}
    c2w = shift @ c2w
    frames, depth = render_gt(scene, c2w, K)
    novel_c2w, novel_K = orbit(NOVEL_ANGLES)
    novel_c2w = shift @ novel_c2w
    novel_frames, _ = render_gt(scene, novel_c2w, novel_K)
    return {"scene": scene, "clip": Clip(frames, depth, c2w, K), "novel": Views(novel_frames, novel_c2w, novel_K)}


def _rotate_quats(quats: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:  # w-first in and out
    xyzw = matrix_to_quaternion(rotation @ quat_to_rotmat(quats))
    return torch.cat([xyzw[:, 3:], xyzw[:, :3]], dim=-1)


def small_config() -> DecoderConfig:
    data = tiny_decoder_config(embed_dim=16).to_dict()
    data["anysplat"]["encoder_cfg"]["intermediate_layer_idx"] = [0, 1, 2, 3]
    data["architecture_constants"].update(agg_depth=4, stitched_intermediate_layer_idx=[0, 1, 2, 3],
                                          cam_trunk_depth=1, cam_num_iterations=2)
    return DecoderConfig.from_dict(data)


# ---------------------------------------------------------------------------- pose encoding


def test_pose_encoding_round_trips_with_decode():
    g = torch.Generator().manual_seed(1)
    quats = torch.nn.functional.normalize(torch.randn(2, 5, 4, generator=g), dim=-1)
    quats = torch.where(quats[..., 3:] < 0, -quats, quats)  # the encoder's w >= 0 convention
    encoding = torch.cat([torch.randn(2, 5, 3, generator=g), quats,
                          0.4 + 1.5 * torch.rand(2, 5, 2, generator=g)], dim=-1)
    w2c, K = decode_pose_encoding(encoding, (30, 40))
    again = encode_pose_encoding(w2c, K, (30, 40))
    torch.testing.assert_close(again, encoding, atol=2e-5, rtol=0)
    w2c_again, K_again = decode_pose_encoding(again, (30, 40))
    torch.testing.assert_close(w2c_again, w2c, atol=2e-5, rtol=0)
    torch.testing.assert_close(K_again, K, atol=1e-4, rtol=1e-6)


def test_matrix_to_quaternion_handles_every_branch():
    angles = torch.tensor([0.0, 1.0, math.pi - 1e-3, math.pi])  # incl. 180° turns (w = 0)
    axes = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]]), dim=-1)
    xyzw = torch.cat([axes * torch.sin(angles / 2)[:, None], torch.cos(angles / 2)[:, None]], dim=-1)
    rotations = quaternion_to_matrix(xyzw)
    torch.testing.assert_close(quaternion_to_matrix(matrix_to_quaternion(rotations)), rotations, atol=1e-6, rtol=0)
    assert (matrix_to_quaternion(rotations)[:, 3] >= 0).all()


# ---------------------------------------------------------------------------- alignment


def test_alignment_puts_camera_zero_at_identity(world):
    clip = world["clip"]
    c2w, depth, _, scale = align_to_first_camera(clip.camtoworld[None], clip.depth[None], clip.K[None], "metric")
    torch.testing.assert_close(c2w[0, 0], torch.eye(4), atol=1e-5, rtol=0)
    assert scale.item() == 1.0 and torch.equal(depth, clip.depth[None])
    c2w_n, depth_n, _, scale_n = align_to_first_camera(clip.camtoworld[None], clip.depth[None], clip.K[None],
                                                       "normalized")
    torch.testing.assert_close(c2w_n[..., :3, 3] * scale_n, c2w[..., :3, 3], atol=1e-5, rtol=1e-5)
    assert 2.0 < scale_n.item() < 4.0  # blobs and floor about 3 units from the camera
    torch.testing.assert_close(depth_n * scale_n, depth, atol=1e-5, rtol=1e-5)
    with pytest.raises(Vist3AInputError, match="scale mode"):
        align_to_first_camera(clip.camtoworld[None], clip.depth[None], clip.K[None], "relative")


# ---------------------------------------------------------------------------- loss terms


def perfect_prediction(world, scale_mode: str) -> tuple[DecoderOutput, object]:
    """A DecoderOutput carrying the true scene and cameras, expressed in the network's frame."""
    clip, scene = world["clip"], world["scene"]
    targets = make_targets(clip.frames[None], clip.depth[None], clip.camtoworld[None], clip.K[None], scale_mode)
    anchor, s = targets.anchor[0], targets.scale[0]
    wxyz = _rotate_quats(scene["quats"], anchor[:3, :3])
    xyzw = torch.cat([wxyz[:, 1:], wxyz[:, :1]], dim=-1)
    means = (scene["means"] @ anchor[:3, :3].T + anchor[:3, 3]) / s
    scales = scene["scales"] / s
    gaussians = GaussianParams(means=means[None], covariances=build_covariance(scales, xyzw)[None],
                               harmonics=scene["sh"].transpose(-1, -2)[None], opacities=scene["opacities"][None],
                               scales=scales[None], rotations=xyzw[None])
    T, H, W = clip.depth.shape
    output = DecoderOutput(
        gaussians=gaussians, extrinsics=targets.camtoworld, intrinsics=normalize_intrinsics(targets.K, (H, W)),
        depth=torch.where(targets.valid, targets.depth, torch.ones_like(targets.depth))[..., None],
        depth_conf=torch.ones(1, T, H, W), conf_valid_mask=torch.ones(1, T, H, W, dtype=torch.bool),
        pose_encodings=[targets.pose_encoding] * 3, scene_scale=torch.tensor(1.0), num_gaussians=[len(means)],
        image_size=(H, W))
    return output, targets


@pytest.mark.parametrize("scale_mode", ["metric", "normalized"])
def test_every_loss_vanishes_on_a_perfect_prediction(world, scale_mode):
    output, targets = perfect_prediction(world, scale_mode)
    settings = ReconSettings(scale=scale_mode, render_scale=1.0, raster=RasterConfig(),
                             weights={"ssim": 1.0, "rgb_self": 1.0})
    losses = recon_losses(output, targets, settings, torch.ones(3), views=[torch.arange(3)])
    for name in ("translation", "rotation", "fov", "camera", "depth"):
        assert losses[name].item() < 1e-5, (name, losses[name].item())
    # Re-rendering the true scene in another frame: rounding only, but a rounding can move a
    # Gaussian's integer radius and so the tiles it is seen in (gsplat's tile quirk): >= 50 dB.
    for name in ("rgb", "rgb_self"):
        assert losses[name].item() < 1e-5, (name, losses[name].item())
    assert losses["ssim"].item() < 5e-3  # the same few pixels, in near-flat windows
    assert losses["total"].item() < 1e-2


def test_loss_terms_react_to_errors(world):
    output, targets = perfect_prediction(world, "metric")
    settings = ReconSettings(render_scale=1.0, raster=RasterConfig())
    moved = output.gaussians.means + torch.tensor([0.05, 0.0, 0.0])
    output.gaussians = GaussianParams(**{**vars(output.gaussians), "means": moved})
    assert recon_losses(output, targets, settings, torch.ones(3), [torch.arange(3)])["rgb"].item() > 1e-4

    pose = targets.pose_encoding
    flipped = torch.cat([pose[..., :3], -pose[..., 3:7], pose[..., 7:]], dim=-1)  # same rotation
    assert camera_loss([flipped], pose)["camera"].item() < 1e-6
    assert camera_loss([pose + 0.1], pose)["camera"].item() > 0.05

    depth, valid = targets.depth, targets.valid
    assert depth_loss(depth, depth, valid).item() == 0.0
    torch.testing.assert_close(depth_loss(2 * depth + ~valid, depth, valid), torch.tensor(math.log(2.0)))
    assert depth_loss(2 * depth + ~valid, depth, valid, "scale_invariant").item() < 1e-6
    images = targets.images[0]
    assert ssim(images, images).item() == pytest.approx(1.0, abs=1e-6)
    assert ssim(images, images.flip(-1)).item() < 0.9


def test_settings_and_inputs_are_checked(world):
    with pytest.raises(Vist3AInputError, match="unknown loss weights"):
        ReconSettings(weights={"lpips": 1.0})
    with pytest.raises(Vist3AInputError, match="depth_mode"):
        ReconSettings(depth_mode="l2")
    clip = world["clip"]
    with pytest.raises(Vist3AInputError, match=r"camtoworld must be \[1, 3, 4, 4\]"):
        make_targets(clip.frames[None], clip.depth[None], clip.camtoworld[None, :2], clip.K[None], "metric")


# ---------------------------------------------------------------------------- training and evaluation


def test_training_overfits_a_clip_and_novel_view_psnr_rises(world):
    torch.manual_seed(0)
    model = ReconstructionModel(small_config())
    clip, novel = world["clip"], world["novel"]
    before = evaluate(model, [clip], novel_views=[novel], input_views=True)
    assert math.isfinite(before["psnr"]) and before["num_clips"] == 1
    trainer = ReconTrainer(model, ReconSettings(lr=3e-3, weight_decay=0.0, views_per_step=2))
    history = [trainer.step(clip.frames, clip.depth, clip.camtoworld, clip.K)["total"] for _ in range(40)]
    assert all(math.isfinite(v) for v in history)
    assert sum(history[-5:]) / 5 < 0.5 * history[0], history
    after = evaluate(model, [(clip.frames, clip.depth, clip.camtoworld, clip.K)],
                     novel_views=[(novel.frames, novel.camtoworld, novel.K)], input_views=True)
    assert math.isfinite(after["psnr"]) and after["psnr"] > before["psnr"] + 1.0, (before, after)
    assert after["depth_abs_rel"] < before["depth_abs_rel"]
    assert model.training  # evaluate restores the mode


def test_step_accepts_novel_views_and_batches(world):
    torch.manual_seed(0)
    model = ReconstructionModel(small_config())
    clip, novel = world["clip"], world["novel"]
    trainer = ReconTrainer(model, ReconSettings(views_per_step=1, novel_views_per_step=1, weights={"rgb_self": 0.0}))
    batch = [torch.stack([x, x]) for x in (clip.frames, clip.depth, clip.camtoworld, clip.K)]
    novel_batch = Views(*(torch.stack([x, x]) for x in (novel.frames, novel.camtoworld, novel.K)))
    losses = trainer.step(*batch, novel=novel_batch)
    assert {"total", "rgb", "depth", "camera", "translation", "rotation", "fov"} <= set(losses)
    assert "rgb_self" not in losses and all(math.isfinite(v) for v in losses.values())
    assert trainer.global_step == 1


def test_frame_subsets_keep_the_anchor_and_render_every_skips_renders(world, monkeypatch):
    torch.manual_seed(0)
    model = ReconstructionModel(small_config())
    clip = world["clip"]
    seen = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda frames: seen.append(frames.clone()) or forward(frames))
    trainer = ReconTrainer(model, ReconSettings(frames_per_step=(2, 2), render_every=2, views_per_step=1))
    losses = [trainer.step(clip.frames, clip.depth, clip.camtoworld, clip.K) for _ in range(4)]
    assert all(f.shape[2] == 2 and torch.equal(f[0, :, 0], clip.frames[:, 0]) for f in seen)  # frame 0 first
    assert {tuple(f[0, 0, 1, 0, :3].tolist()) for f in seen} <= {tuple(clip.frames[0, i, 0, :3].tolist()) for i in (1, 2)}
    assert ["rgb" in row for row in losses] == [True, False, True, False]
    with pytest.raises(Vist3AInputError, match="frames_per_step"):
        ReconSettings(frames_per_step=(1, 3))
    with pytest.raises(Vist3AInputError, match="render_every"):
        ReconSettings(render_every=0)


def test_fov_straight_through_keeps_outputs_and_revives_dead_fovs(world):
    torch.manual_seed(0)
    model = ReconstructionModel(small_config())
    head = model.encoder.camera_head
    with torch.no_grad():  # push every field of view below zero: the plain ReLU has no gradient there
        head.pose_branch.fc2.bias[7:] = -5.0
    frames = world["clip"].frames[None]
    grads = {}
    for straight in (False, True):
        head.fov_straight_through = straight
        model.zero_grad()
        output = model(frames)
        assert torch.all(output.pose_encodings[-1][..., 7:] == 0)  # the forward value is the ReLU's either way
        output.pose_encodings[-1][..., 7:].sub(0.8).abs().sum().backward()
        grads[straight] = float(head.pose_branch.fc2.bias.grad[7:].abs().sum())
    assert grads[False] == 0.0 and grads[True] > 0.0


# ---------------------------------------------------------------------------- the nano network


def test_nano_config_sizes_and_resolution_chain():
    config = nano_decoder_config()
    assert DecoderConfig.from_dict(config.to_dict()) == config
    arch = config.architecture
    assert (arch.embed_dim, arch.agg_depth, arch.dino_depth, arch.img_size) == (64, 8, 4, 84)
    assert max(arch.stitched_intermediate_layer_idx) < arch.agg_depth
    assert config.encoder.intermediate_layer_idx == arch.stitched_intermediate_layer_idx
    stitched = StitchedDecoder(config)
    latent_hw = config.resolutions.vae_resolution // 8
    assert stitched.frame_size((latent_hw, latent_hw)) == (84, 84) == (config.resolutions.feedforward_resolution,) * 2
    model = ReconstructionModel(config)
    assert 2.0e6 < sum(p.numel() for p in model.parameters()) < 3.0e6
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 2, 84, 84))
    assert out.depth.shape == (1, 2, 84, 84, 1) and out.means.shape == (1, 2 * 84 * 84, 3)
