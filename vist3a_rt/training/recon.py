"""``recon``: train the AnySplat-architecture reconstruction network from scratch on rendered views.

AnySplat's recipe (render the predicted Gaussians into the input views; supervise depth and
cameras) with the ground truth a procedural world gives: per clip, frames [3, T, H, W] in
[-1, 1], depth [T, H, W], camera-to-world [T, 4, 4] and pixel intrinsics [T, 3, 3]
(OpenCV axes, the decoder's convention).

Ground-truth frame (``align_to_first_camera``). The network's world is its first camera's:
VGGT/AnySplat predict frame 0 at the identity. The ground truth is brought there by
``c2w_i ← c2w_0⁻¹ · c2w_i`` (depth is per camera and does not change). Scale, ``ReconSettings.scale``:

* ``"metric"`` (default): world units are kept. The nano world knows true scale (fixed orbit
  radius, fixed object sizes), so absolute scale is learnable and every output — depth,
  translations, Gaussians — stays in world units.
* ``"normalized"``: VGGT's convention for data without true scale: translations and depth are
  divided by the mean distance of the ground-truth points (unprojected valid depth, first-camera
  frame) from the origin — the statistic the decoder reports as ``scene_scale``.

Novel views are aligned with the same anchor camera and scale.

Losses (``ReconSettings.weights``; defaults in ``DEFAULT_WEIGHTS``), ``total`` = weighted sum:

``rgb``       MSE of the predicted Gaussians rendered at the aligned GT cameras of a random subset
              of input views (``views_per_step``) and of given novel views (``novel_views_per_step``),
              against the frames in [0, 1] resized to ``render_scale``. Default 1.0.
``rgb_self``  The same at the *predicted* cameras of the input views (AnySplat's self-consistency;
              what the runtime's previews show). Default 0.5.
``ssim``      1 − SSIM-lite (7×7 box window) on every rendered pair above. Default 0 (off).
``depth``     ``depth_mode="log_l1"`` (default): mean |log d̂ − log d| over valid pixels (d > 0 and
              finite), relative error with the same weight near and far; ``"scale_invariant"``:
              the same after removing the clip's mean log ratio (a global scale costs nothing).
              Default 1.0.
``camera``    VGGT's camera loss on the pose encoding [T (3), quaternion xyzw (4), fov_h, fov_w]:
              L1 on T + L1 on the quaternion (sign-invariant: min over ±q) + 0.5 · L1 on the FoVs,
              every refinement iteration i of n weighted 0.6^(n−1−i), averaged over iterations.
              The GT encoding is ``encode_pose_encoding`` of the aligned cameras. Default 1.0.
``opacity``   Mean opacity (a sparsity prior). Default 0 (off).

Rendering uses the differentiable reference rasterizer (``rendering.reference``), one view
at a time, at ``render_scale`` of the frame size (the intrinsics scaled with it) and with
``raster`` settings: tile size 8 by default (about 2x faster on CPU than gsplat's 16 here; the
images differ only where gsplat's tile rule lets a pixel outside a Gaussian's 3-sigma radius
see it, at alpha <= 1.1%). Evaluation renders with the official settings at full size. The
decoder unprojects pixel (u, v) at integer coordinates while the rasterizer samples pixel
centres (official behaviour), so a perfect depth and camera still render half a pixel off: a
small floor under ``rgb`` that the fixed principal point cannot remove.

``evaluate`` reconstructs each clip from its input frames and reports novel-view PSNR at
held-out GT cameras (same alignment), depth and camera errors.

``nano_decoder_config()`` sizes the network for VIST3A-nano; see its docstring for the
choice and measured times.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..decoder.config import DecoderConfig, EncoderConfig
from ..decoder.geometry import FOCAL_EPS, unproject_depth
from ..decoder.network import DecoderOutput, ReconstructionModel
from ..errors import Vist3AInputError
from ..rendering.reference import RasterConfig, rasterize_gaussians

DEFAULT_WEIGHTS = {"rgb": 1.0, "rgb_self": 0.5, "ssim": 0.0, "depth": 1.0, "camera": 1.0, "opacity": 0.0}
CAMERA_TERM_WEIGHTS = {"translation": 1.0, "rotation": 1.0, "fov": 0.5}  # VGGT's
CAMERA_ITERATION_GAMMA = 0.6  # VGGT: later refinement iterations weigh more
NANO_TAPS = [1, 3, 5, 7]  # the official [4, 11, 17, 23] of 24 layers, scaled to 8
# The stitch stage's LoRA: the official alpha / rank ratio (32 / 64) at rank 16. At width 64 the
# official rank 64 would carry more parameters than the weights it adapts (15 MB of the 40 MB budget).
NANO_LORA = "r16,a8,d0.0,f0"


# ---------------------------------------------------------------------------- the nano network


def nano_decoder_config(stitching_location: str = "enc_blocks_2") -> DecoderConfig:
    """AnySplat-architecture sizes for VIST3A-nano: 84×84 input, 13 frames, 2.42 M parameters.

    Sizes: width 64, DINO 4 blocks and aggregator 8 (frame + global) blocks with 4 heads each
    (camera head 4 heads on 2E = 128), DPT and Gaussian heads 32 features over [16, 32, 64, 64]
    channels (Gaussian head 16 + 16), SH degree 4 as official. Resolution chain: the video
    VAE's 96 px frames → 12×12 latents (8×) → the stitching conv's stride 2 → a 6×6 token grid
    → 84 px at 14 px per patch; ``img_size`` 84 so DINO's position table is used un-resized.
    Stitched at ``stitching_location`` (default ``enc_blocks_2``: half the DINO blocks stay in
    the stitched tail; the recipe uses layer search's pick). Taps
    [1, 3, 5, 7]: the official [4, 11, 17, 23] need an aggregator depth of 24, so both
    ``intermediate_layer_idx`` and ``stitched_intermediate_layer_idx`` are set to the official
    ones' positions scaled to 8 layers. Per-pixel Gaussians (no voxelization): a fixed count
    of 13·84² = 91,728, the same in training and at run time. Stitching LoRA ``NANO_LORA``.

    Measured (torch 2.13, this 2-core CPU, one clip [1, 3, 13, 84, 84], float32): forward
    without grad 144 ms (2 threads) / 242 ms (1 thread); forward + backward 367 / 572 ms.
    The 64-feature DPT variant ([32, 64, 128, 128]) cost 3.89 M parameters and 511 / 856 ms for
    little expected gain at 84 px, so the smaller heads were kept (9.7 MB of float32 weights).
    A ``ReconTrainer`` step (2 threads, default settings) adds the renders: 2 views of the
    91,728 Gaussians at 42 px, forward + backward, take 0.85-1.1 s per camera set once the
    scene is in view (tile 8; 1.9 s with gsplat's tile 16; 1.1-1.5 s at the full 84 px), so a
    step is about 2.4 s with ``rgb`` + ``rgb_self``, 1.4 s with ``rgb`` alone, 0.3 s with no
    rendering (timed on a shared machine under load; minima of 3-4 runs).
    """
    return _small_decoder_config(width=64, dino_depth=4, agg_depth=8, heads=4, dpt=(32, [16, 32, 64, 64]),
                                 gs_head=16, taps=NANO_TAPS, video=96, network=84, frames=13,
                                 stitching_location=stitching_location, lora=NANO_LORA)


def micro_decoder_config(stitching_location: str = "enc_blocks_1") -> DecoderConfig:
    """The same architecture at test size (the ``"micro"`` video preset: 5 frames × 32² → 2×2
    tokens → 28 px input): width 16, DINO 2, aggregator 4."""
    return _small_decoder_config(width=16, dino_depth=2, agg_depth=4, heads=2, dpt=(8, [4, 8, 16, 16]),
                                 gs_head=4, taps=[0, 1, 2, 3], video=32, network=28, frames=5,
                                 stitching_location=stitching_location, lora="r4,a2,d0.0,f0")


def _small_decoder_config(*, width: int, dino_depth: int, agg_depth: int, heads: int, dpt: tuple[int, list[int]],
                          gs_head: int, taps: list[int], video: int, network: int, frames: int,
                          stitching_location: str, lora: str) -> DecoderConfig:
    encoder = EncoderConfig(voxelize=False, intermediate_layer_idx=list(taps))
    features, channels = dpt
    return DecoderConfig.from_dict({
        "anysplat": {"encoder_cfg": dataclasses.asdict(encoder),
                     "decoder_cfg": {"name": "splatting_cuda", "background_color": [1.0, 1.0, 1.0],
                                     "make_scale_invariant": False}},
        "architecture_constants": {
            "img_size": network, "patch_size": 14, "embed_dim": width, "agg_depth": agg_depth,
            "agg_num_heads": heads, "dino_depth": dino_depth, "dino_num_heads": heads, "cam_num_heads": heads,
            "dpt_features": features, "dpt_out_channels": list(channels), "gs_features": features,
            "gs_out_channels": list(channels), "gs_head_features_1": gs_head, "gs_head_features_2": gs_head,
            "stitched_intermediate_layer_idx": list(taps)},
        "stitching": {"stitching_layer_location": stitching_location,
                      "stitching_layer_config": f"conv3d_k5x3x3_o{width}_s1x2x2_p2x1x1",
                      "lora_config": lora},
        "resolutions": {"vae_resolution": video, "feedforward_resolution": network, "num_frames": frames,
                        "latent_frames": (frames - 1) // 4 + 1, "latent_channels": 16},
    })


# ---------------------------------------------------------------------------- pose encoding (inverse)


def matrix_to_quaternion(rotation: Tensor) -> Tensor:  # [..., 3, 3] -> [..., 4] xyzw, w >= 0
    """Rotation matrices to unit quaternions, scalar last, standardised to w >= 0.

    Numerically safe everywhere: of the four closed forms the one with the largest divisor is used.
    """
    m = rotation
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    q_abs = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22,
                         1 - m00 + m11 - m22, 1 - m00 - m11 + m22], dim=-1).clamp_min(0).sqrt()  # |w|,|x|,|y|,|z| ·2
    candidates = torch.stack([  # row r: the quaternion (w, x, y, z) · 2·q_abs[r]
        torch.stack([q_abs[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], dim=-1),
        torch.stack([m21 - m12, q_abs[..., 1] ** 2, m10 + m01, m02 + m20], dim=-1),
        torch.stack([m02 - m20, m10 + m01, q_abs[..., 2] ** 2, m12 + m21], dim=-1),
        torch.stack([m10 - m01, m20 + m02, m21 + m12, q_abs[..., 3] ** 2], dim=-1),
    ], dim=-2) / (2 * q_abs[..., None].clamp_min(0.1))
    best = q_abs.argmax(dim=-1)[..., None, None].expand(*q_abs.shape[:-1], 1, 4)
    wxyz = F.normalize(candidates.gather(-2, best).squeeze(-2), dim=-1)
    wxyz = torch.where(wxyz[..., :1] < 0, -wxyz, wxyz)
    return torch.cat([wxyz[..., 1:], wxyz[..., :1]], dim=-1)


def encode_pose_encoding(extrinsics: Tensor,  # [B, S, 3|4, 4] camera-from-world
                         intrinsics: Tensor,  # [B, S, 3, 3] pixels
                         image_hw: tuple[int, int]) -> Tensor:  # -> [B, S, 9]
    """The inverse of ``geometry.decode_pose_encoding``: [T, quaternion xyzw, fov_h, fov_w].

    Exact inverse, so the encoding of a camera decodes back to it: the FoV undoes decode's
    ``FOCAL_EPS`` (tan(fov/2) = (H/2)/f − eps; VGGT's own encoder leaves the eps in, a 0.1%
    focal offset). The principal point is not encoded (decode puts it at the image centre).
    """
    if extrinsics.dim() != 4 or extrinsics.shape[-2:] not in ((3, 4), (4, 4)):
        raise Vist3AInputError(f"extrinsics must be [B, S, 3|4, 4], got {list(extrinsics.shape)}")
    if intrinsics.shape != extrinsics.shape[:2] + (3, 3):
        raise Vist3AInputError(f"intrinsics must be [B, S, 3, 3] matching extrinsics "
                               f"{list(extrinsics.shape)}, got {list(intrinsics.shape)}")
    height, width = image_hw
    quaternion = matrix_to_quaternion(extrinsics[..., :3, :3])
    fov_h = 2 * torch.atan((height / 2.0) / intrinsics[..., 1, 1] - FOCAL_EPS)
    fov_w = 2 * torch.atan((width / 2.0) / intrinsics[..., 0, 0] - FOCAL_EPS)
    return torch.cat([extrinsics[..., :3, 3], quaternion, fov_h[..., None], fov_w[..., None]], dim=-1)


# ---------------------------------------------------------------------------- ground truth


@dataclass
class Clip:
    """One clip's input views and ground truth (the world's output)."""

    frames: Tensor  # [3, T, H, W] in [-1, 1]
    depth: Tensor  # [T, H, W] camera-space z; <= 0 or non-finite = no ground truth
    camtoworld: Tensor  # [T, 4, 4]
    K: Tensor  # [T, 3, 3] pixels (for H x W)


@dataclass
class Views:
    """Extra views of the same scene (held out from the input): frames and GT cameras."""

    frames: Tensor  # [3, V, H', W'] in [-1, 1]
    camtoworld: Tensor  # [V, 4, 4], the clip's world frame
    K: Tensor  # [V, 3, 3] pixels (for H' x W')


@dataclass
class Targets:
    """A batch's ground truth in the network's frame (first camera, ``scale`` applied)."""

    images: Tensor  # [B, T, 3, H, W] in [0, 1]
    depth: Tensor  # [B, T, H, W], divided by scale
    valid: Tensor  # [B, T, H, W] bool
    camtoworld: Tensor  # [B, T, 4, 4] relative to camera 0, translations divided by scale
    K: Tensor  # [B, T, 3, 3] pixels
    pose_encoding: Tensor  # [B, T, 9]
    anchor: Tensor  # [B, 4, 4] world-to-camera-0 of the original frame
    scale: Tensor  # [B]


def _valid_depth(depth: Tensor) -> Tensor:
    return torch.isfinite(depth) & (depth > 0)


def align_to_first_camera(camtoworld: Tensor,  # [B, T, 4, 4]
                          depth: Tensor,  # [B, T, H, W]
                          K: Tensor,  # [B, T, 3, 3] pixels
                          scale_mode: str = "metric") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(camtoworld relative to camera 0 and scaled, scaled depth, anchor w2c_0 [B,4,4], scale [B])."""
    anchor = torch.linalg.inv(camtoworld[:, 0])
    relative = anchor[:, None] @ camtoworld
    if scale_mode == "metric":
        scale = camtoworld.new_ones(len(camtoworld))
    elif scale_mode == "normalized":
        scale = _mean_point_distance(relative, depth, K)
    else:
        raise Vist3AInputError(f"scale mode must be 'metric' or 'normalized', got {scale_mode!r}")
    relative = relative.clone()
    relative[..., :3, 3] = relative[..., :3, 3] / scale[:, None, None]
    valid = _valid_depth(depth)
    scaled = torch.where(valid, depth / scale[:, None, None, None], torch.zeros_like(depth))
    return relative, scaled, anchor, scale


def _mean_point_distance(relative: Tensor, depth: Tensor, K: Tensor) -> Tensor:  # -> [B]
    valid = _valid_depth(depth)
    if not valid.flatten(1).any(1).all():
        raise Vist3AInputError("a clip has no valid depth: 'normalized' scale needs some")
    w2c = torch.linalg.inv(relative)[..., :3, :]
    points = unproject_depth(torch.where(valid, depth, torch.zeros_like(depth)), w2c, K)
    distance = torch.where(valid, points.norm(dim=-1), torch.zeros_like(depth))
    return (distance.flatten(1).sum(1) / valid.flatten(1).sum(1)).clamp_min(1e-8)


def align_views(camtoworld: Tensor, anchor: Tensor, scale: Tensor) -> Tensor:
    """Other cameras [B, V, 4, 4] of the same clips into the aligned frame (anchor [B,4,4], scale [B])."""
    relative = anchor[:, None] @ camtoworld
    relative = relative.clone()
    relative[..., :3, 3] = relative[..., :3, 3] / scale[:, None, None]
    return relative


def make_targets(frames: Tensor, depth: Tensor, camtoworld: Tensor, K: Tensor, scale_mode: str) -> Targets:
    """Batched inputs (see ``ReconTrainer.step``) -> ``Targets``."""
    _check_batch(frames, depth, camtoworld, K)
    c2w, scaled, anchor, scale = align_to_first_camera(camtoworld.float(), depth.float(), K.float(), scale_mode)
    hw = tuple(frames.shape[-2:])
    pose = encode_pose_encoding(torch.linalg.inv(c2w), K.float(), hw)
    return Targets(images=(frames.float().transpose(1, 2) + 1) / 2, depth=scaled, valid=_valid_depth(depth),
                   camtoworld=c2w, K=K.float(), pose_encoding=pose, anchor=anchor, scale=scale)


def _check_batch(frames: Tensor, depth: Tensor, camtoworld: Tensor, K: Tensor) -> None:
    if frames.dim() != 5 or frames.shape[1] != 3:
        raise Vist3AInputError(f"frames must be [B, 3, T, H, W] in [-1, 1], got {list(frames.shape)}")
    B, _, T, H, W = frames.shape
    for name, value, shape in (("depth", depth, (B, T, H, W)), ("camtoworld", camtoworld, (B, T, 4, 4)),
                               ("K", K, (B, T, 3, 3))):
        if tuple(value.shape) != shape:
            raise Vist3AInputError(f"{name} must be {list(shape)} to match frames {list(frames.shape)}, "
                                   f"got {list(value.shape)}")
    if not (torch.isfinite(camtoworld).all() and torch.isfinite(K).all()):
        raise Vist3AInputError("camtoworld and K must be finite")


# ---------------------------------------------------------------------------- loss terms


def camera_loss(pose_encodings: Sequence[Tensor],  # iterations x [B, T, 9]
                target: Tensor,  # [B, T, 9]
                ) -> dict[str, Tensor]:
    """VGGT's camera loss (see the module docstring): the three terms and their weighted sum ``camera``."""
    n = len(pose_encodings)
    terms = {name: target.new_zeros(()) for name in CAMERA_TERM_WEIGHTS}
    for i, prediction in enumerate(pose_encodings):
        weight = CAMERA_ITERATION_GAMMA ** (n - 1 - i) / n
        q, q_gt = prediction[..., 3:7], target[..., 3:7]
        rotation = torch.minimum((q - q_gt).abs().sum(-1), (q + q_gt).abs().sum(-1)).mean() / 4
        terms["translation"] = terms["translation"] + weight * F.l1_loss(prediction[..., :3], target[..., :3])
        terms["rotation"] = terms["rotation"] + weight * rotation
        terms["fov"] = terms["fov"] + weight * F.l1_loss(prediction[..., 7:], target[..., 7:])
    terms["camera"] = sum(CAMERA_TERM_WEIGHTS[name] * terms[name] for name in CAMERA_TERM_WEIGHTS)
    return terms


def depth_loss(prediction: Tensor,  # [B, T, H, W] (or [..., 1]) positive
               target: Tensor,  # [B, T, H, W]
               valid: Tensor,  # [B, T, H, W] bool
               mode: str = "log_l1") -> Tensor:
    """Log-depth L1 over valid pixels; ``scale_invariant`` removes each clip's mean log ratio first."""
    if prediction.dim() == 5:
        prediction = prediction.squeeze(-1)
    if mode not in ("log_l1", "scale_invariant"):
        raise Vist3AInputError(f"depth mode must be 'log_l1' or 'scale_invariant', got {mode!r}")
    if not valid.any():
        return prediction.sum() * 0.0
    ratio = torch.log(prediction.clamp_min(1e-6)) - torch.log(torch.where(valid, target, torch.ones_like(target)))
    ratio = torch.where(valid, ratio, torch.zeros_like(ratio))
    counts = valid.flatten(1).sum(1).clamp_min(1)
    if mode == "scale_invariant":
        mean = ratio.flatten(1).sum(1) / counts
        ratio = torch.where(valid, ratio - mean[:, None, None, None], ratio)
    return ratio.abs().sum() / valid.sum()


def ssim(a: Tensor, b: Tensor, window: int = 7) -> Tensor:  # [N, 3, H, W] each in [0, 1] -> []
    """SSIM-lite: box-window local statistics (edge-replicated borders), the standard constants, mean over pixels."""
    pad = window // 2
    a, b = (F.pad(x, (pad,) * 4, mode="replicate") for x in (a, b))
    mean = lambda x: F.avg_pool2d(x, window, stride=1)  # noqa: E731
    mu_a, mu_b = mean(a), mean(b)
    var_a, var_b = mean(a * a) - mu_a ** 2, mean(b * b) - mu_b ** 2
    cov = mean(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return value.mean()


def opacity_loss(output: DecoderOutput) -> Tensor:
    return torch.stack([output.opacities[b, :n].mean() for b, n in enumerate(output.num_gaussians)]).mean()


# ---------------------------------------------------------------------------- rendering


def scale_intrinsics(K: Tensor, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> Tensor:  # [..., 3, 3]
    """Pixel intrinsics for the same camera at another image size (continuous pixel coordinates)."""
    factors = K.new_tensor([to_hw[1] / from_hw[1], to_hw[0] / from_hw[0], 1.0])
    return K * factors[:, None]


def resize_images(images: Tensor, size: tuple[int, int]) -> Tensor:  # [N, 3, H, W] -> [N, 3, h, w]
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def render_views(output: DecoderOutput, batch_index: int,
                 camtoworld: Tensor,  # [V, 4, 4] in the network's frame
                 K: Tensor,  # [V, 3, 3] pixels for `size`
                 size: tuple[int, int],  # (h, w)
                 background: Tensor,  # [3]
                 raster: RasterConfig = RasterConfig()) -> Tensor:  # -> [V, 3, h, w] in [0, 1]
    """Render one batch entry's predicted Gaussians at V cameras (differentiable)."""
    g, n = output.gaussians, output.num_gaussians[batch_index]
    xyzw = g.rotations[batch_index, :n].float()
    means, quats = g.means[batch_index, :n].float(), torch.cat([xyzw[:, 3:], xyzw[:, :3]], dim=-1)
    scales, opacities = g.scales[batch_index, :n].float(), g.opacities[batch_index, :n].float()
    sh = g.harmonics[batch_index, :n].float().transpose(-1, -2)
    images = []
    for c2w, k in zip(camtoworld.float(), K.float()):
        out = rasterize_gaussians(means, quats, scales, opacities, sh, torch.linalg.inv(c2w), k,
                                  size[1], size[0], background.float(), raster)
        images.append(out.color.permute(2, 0, 1))
    return torch.stack(images)


def _render_size(hw: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(1, round(hw[0] * scale)), max(1, round(hw[1] * scale))


# ---------------------------------------------------------------------------- the trainer


@dataclass
class ReconSettings:
    """Training settings; ``weights`` override ``DEFAULT_WEIGHTS`` key by key (0 skips a term)."""

    lr: float = 2e-4
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    warmup_steps: int = 0
    weights: dict = field(default_factory=dict)
    scale: str = "metric"  # "metric" | "normalized"
    depth_mode: str = "log_l1"  # "log_l1" | "scale_invariant"
    render_scale: float = 0.5  # rendered loss images: this fraction of the frame size
    views_per_step: int = 2  # input views rendered per clip and step (random subset)
    novel_views_per_step: int = 2  # novel views rendered per clip and step, when given
    raster: RasterConfig = field(default_factory=lambda: RasterConfig(tile_size=8))
    # Random frame subsets (VGGT trains on varying frame counts): each step keeps frame 0 (the
    # anchor) and min..max - 1 others in random order. None: every frame, in order.
    frames_per_step: tuple[int, int] | None = None
    render_every: int = 1  # the rendered terms only every N-th step (the others cost ~1/10)
    fov_straight_through: bool = True  # see ``CameraHead.fov_straight_through``
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.weights) - set(DEFAULT_WEIGHTS))
        if unknown:
            raise Vist3AInputError(f"unknown loss weights {unknown}; known: {sorted(DEFAULT_WEIGHTS)}")
        if self.scale not in ("metric", "normalized"):
            raise Vist3AInputError(f"scale must be 'metric' or 'normalized', got {self.scale!r}")
        if self.depth_mode not in ("log_l1", "scale_invariant"):
            raise Vist3AInputError(f"depth_mode must be 'log_l1' or 'scale_invariant', got {self.depth_mode!r}")
        if not 0 < self.render_scale <= 1 or self.views_per_step < 0 or self.novel_views_per_step < 0:
            raise Vist3AInputError(f"need 0 < render_scale <= 1 and view counts >= 0, got {self.render_scale}, "
                                   f"{self.views_per_step}, {self.novel_views_per_step}")
        if self.frames_per_step is not None:
            low, high = self.frames_per_step = tuple(self.frames_per_step)
            if not 2 <= low <= high:
                raise Vist3AInputError(f"frames_per_step must be (min, max) with 2 <= min <= max, got {self.frames_per_step}")
        if self.render_every < 1:
            raise Vist3AInputError(f"render_every must be >= 1, got {self.render_every}")

    @property
    def loss_weights(self) -> dict[str, float]:
        return {**DEFAULT_WEIGHTS, **self.weights}


def recon_losses(output: DecoderOutput, targets: Targets, settings: ReconSettings, background: Tensor,
                 views: Sequence[Tensor] | None = None,  # per batch entry: input-view indices to render
                 novel: tuple[Tensor, Tensor, Tensor] | None = None,  # aligned (images [B,V,3,H,W], c2w, K)
                 ) -> dict[str, Tensor]:
    """Every loss term (unweighted, plus the camera sub-terms) and ``total`` (weighted sum)."""
    weights = settings.loss_weights
    terms = camera_loss(output.pose_encodings, targets.pose_encoding)
    terms["depth"] = depth_loss(output.depth, targets.depth, targets.valid, settings.depth_mode)
    terms["opacity"] = opacity_loss(output)
    if weights["rgb"] or weights["rgb_self"]:
        terms.update(_render_terms(output, targets, settings, background, views, novel))
    terms["total"] = sum(weights[name] * terms[name] for name in DEFAULT_WEIGHTS if weights[name] and name in terms)
    return terms


def _render_terms(output, targets: Targets, settings: ReconSettings, background, views, novel) -> dict[str, Tensor]:
    weights, hw = settings.loss_weights, tuple(targets.images.shape[-2:])
    size = _render_size(hw, settings.render_scale)
    pairs = {"rgb": [], "rgb_self": []}  # (rendered, target) image batches
    for b in range(targets.images.shape[0]):
        index = torch.arange(targets.images.shape[1]) if views is None else views[b]
        truth = resize_images(targets.images[b, index], size)
        if weights["rgb"] and len(index):
            K = scale_intrinsics(targets.K[b, index], hw, size)
            pairs["rgb"].append((render_views(output, b, targets.camtoworld[b, index], K, size, background,
                                              settings.raster), truth))
        if weights["rgb_self"] and len(index):
            K = output.intrinsics[b, index] * output.intrinsics.new_tensor([size[1], size[0], 1.0])[:, None]
            pairs["rgb_self"].append((render_views(output, b, output.extrinsics[b, index], K, size, background,
                                                   settings.raster), truth))
        if novel is not None and weights["rgb"]:
            images, c2w, K = (x[b] for x in novel)
            novel_hw = tuple(images.shape[-2:])
            novel_size = _render_size(novel_hw, settings.render_scale)
            rendered = render_views(output, b, c2w, scale_intrinsics(K, novel_hw, novel_size), novel_size,
                                    background, settings.raster)
            pairs["rgb"].append((rendered, resize_images(images, novel_size)))
    terms = {}
    for name, items in pairs.items():
        if items:
            terms[name] = torch.stack([F.mse_loss(r, t) for r, t in items]).mean()
    if weights["ssim"]:
        everything = [pair for items in pairs.values() for pair in items]
        terms["ssim"] = torch.stack([1 - ssim(r, t) for r, t in everything]).mean()
    return terms


class ReconTrainer:
    """AdamW over the whole network (trained from scratch), gradient clipping, linear warm-up."""

    def __init__(self, model: ReconstructionModel, settings: ReconSettings | None = None) -> None:
        self.model = model.train()
        self.settings = settings or ReconSettings()
        self.model.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=self.settings.lr,
                                           weight_decay=self.settings.weight_decay)
        warmup = max(1, self.settings.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.generator = torch.Generator().manual_seed(self.settings.seed)
        self.background = torch.tensor(model.config.decoder_cfg.get("background_color", [1.0, 1.0, 1.0]))
        self.global_step = 0
        model.encoder.camera_head.fov_straight_through = self.settings.fov_straight_through

    def step(self, frames: Tensor,  # [B, 3, T, H, W] in [-1, 1] (or one clip [3, T, H, W])
             depth: Tensor,  # [B, T, H, W]
             camtoworld: Tensor,  # [B, T, 4, 4]
             K: Tensor,  # [B, T, 3, 3] pixels
             novel: Views | None = None,  # extra GT views (batched like the inputs), also supervised
             ) -> dict[str, float]:
        """One update on a batch; returns every loss term as a float."""
        if frames.dim() == 4:  # a single clip
            frames, depth, camtoworld, K = frames[None], depth[None], camtoworld[None], K[None]
            novel = None if novel is None else Views(novel.frames[None], novel.camtoworld[None], novel.K[None])
        frames, depth, camtoworld, K = self._frame_subset(frames, depth, camtoworld, K)
        # 1. ground truth in the network's frame
        targets = make_targets(frames, depth, camtoworld, K, self.settings.scale)
        novel_aligned = self._novel_targets(novel, targets)
        views = [self._pick(frames.shape[2], self.settings.views_per_step) for _ in range(frames.shape[0])]
        # 2. predict, 3. losses
        output = self.model(frames)
        settings = self.settings
        if self.global_step % settings.render_every:  # a step without the rendered terms
            settings = dataclasses.replace(settings, weights={**settings.weights, "rgb": 0.0, "rgb_self": 0.0, "ssim": 0.0})
        losses = recon_losses(output, targets, settings, self.background, views, novel_aligned)
        # 4. update
        self.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.global_step += 1
        return {name: float(value.detach()) for name, value in losses.items()}

    def _frame_subset(self, frames: Tensor, depth: Tensor, camtoworld: Tensor, K: Tensor):
        """Frame 0 and a random number of the others in random order (``frames_per_step``)."""
        if self.settings.frames_per_step is None:
            return frames, depth, camtoworld, K
        low, high = self.settings.frames_per_step
        T = frames.shape[2]
        count = min(T, int(torch.randint(low, high + 1, (), generator=self.generator)))
        index = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(T - 1, generator=self.generator)[:count - 1]])
        return frames[:, :, index], depth[:, index], camtoworld[:, index], K[:, index]

    def _pick(self, count: int, wanted: int) -> Tensor:
        if wanted >= count:
            return torch.arange(count)
        return torch.randperm(count, generator=self.generator)[:wanted].sort().values

    def _novel_targets(self, novel: Views | None, targets: Targets):
        if novel is None or self.settings.novel_views_per_step == 0:
            return None
        B, _, V = novel.frames.shape[:3]
        if novel.camtoworld.shape != (B, V, 4, 4) or novel.K.shape != (B, V, 3, 3):
            raise Vist3AInputError(f"novel views: frames {list(novel.frames.shape)} need camtoworld "
                                   f"[{B}, {V}, 4, 4] and K [{B}, {V}, 3, 3], got {list(novel.camtoworld.shape)} "
                                   f"and {list(novel.K.shape)}")
        index = self._pick(V, self.settings.novel_views_per_step)
        c2w = align_views(novel.camtoworld[:, index].float(), targets.anchor, targets.scale)
        images = (novel.frames[:, :, index].float().transpose(1, 2) + 1) / 2
        return images, c2w, novel.K[:, index].float()


# ---------------------------------------------------------------------------- evaluation


def _as_clip(clip) -> Clip:
    return clip if isinstance(clip, Clip) else Clip(*clip)


def _as_views(views) -> Views:
    return views if isinstance(views, Views) else Views(*views)


def psnr(rendered: Tensor, truth: Tensor) -> Tensor:  # [N, 3, H, W] in [0, 1] -> [N]
    mse = ((rendered - truth) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


@torch.no_grad()
def evaluate(model: ReconstructionModel, clips: Iterable,
             novel_views: Iterable | None = None, *,
             settings: ReconSettings | None = None, input_views: bool = False,
             raster: RasterConfig = RasterConfig()) -> dict[str, float]:
    """Reconstruct each clip from its input frames and measure it against the ground truth.

    ``clips``: ``Clip`` objects or (frames, depth, camtoworld, K) tuples; ``novel_views``: one
    ``Views`` (or (frames, camtoworld, K)) per clip, or None. Keys, means over clips:
    ``psnr`` (novel views at their aligned GT cameras, full size, official raster settings;
    only with ``novel_views``), ``input_psnr`` (input views at GT cameras; only with
    ``input_views``), ``depth_abs_rel`` (mean |d̂ − d| / d over valid pixels, aligned scale),
    ``depth_delta1`` (share with max(d̂/d, d/d̂) < 1.25), ``translation_error`` (camera
    centres, aligned units), ``rotation_error_deg``, ``fov_error_deg``, ``num_clips``.
    """
    settings = settings or ReconSettings()
    background = torch.tensor(model.config.decoder_cfg.get("background_color", [1.0, 1.0, 1.0]))
    was_training = model.training
    model.eval()
    clips = [_as_clip(c) for c in clips]
    novel = None if novel_views is None else [_as_views(v) for v in novel_views]
    if novel is not None and len(novel) != len(clips):
        raise Vist3AInputError(f"novel_views must give one entry per clip: {len(novel)} for {len(clips)} clips")
    rows = [_evaluate_clip(model, clip, None if novel is None else novel[i], settings, background,
                           input_views, raster) for i, clip in enumerate(clips)]
    model.train(was_training)
    result = {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]} if rows else {}
    result["num_clips"] = len(rows)
    return result


def _evaluate_clip(model, clip: Clip, novel: Views | None, settings, background, input_views, raster) -> dict:
    targets = make_targets(clip.frames[None], clip.depth[None], clip.camtoworld[None], clip.K[None], settings.scale)
    output = model(clip.frames[None].to(next(model.parameters()).dtype))
    row = {**_depth_metrics(output.depth[0, ..., 0].float(), targets.depth[0], targets.valid[0]),
           **_camera_metrics(output, targets)}
    hw = tuple(targets.images.shape[-2:])
    if input_views:
        rendered = render_views(output, 0, targets.camtoworld[0], targets.K[0], hw, background, raster)
        row["input_psnr"] = float(psnr(rendered, targets.images[0]).mean())
    if novel is not None:
        c2w = align_views(novel.camtoworld[None].float(), targets.anchor, targets.scale)[0]
        truth = (novel.frames.float().transpose(0, 1) + 1) / 2
        rendered = render_views(output, 0, c2w, novel.K.float(), tuple(truth.shape[-2:]), background, raster)
        row["psnr"] = float(psnr(rendered, truth).mean())
    return row


def _depth_metrics(prediction: Tensor, truth: Tensor, valid: Tensor) -> dict[str, float]:
    if not valid.any():
        return {"depth_abs_rel": float("nan"), "depth_delta1": float("nan")}
    d, g = prediction[valid], truth[valid]
    ratio = torch.maximum(d / g, g / d.clamp_min(1e-12))
    return {"depth_abs_rel": float(((d - g).abs() / g).mean()), "depth_delta1": float((ratio < 1.25).float().mean())}


def _camera_metrics(output: DecoderOutput, targets: Targets) -> dict[str, float]:
    c2w, gt = output.extrinsics[0].float(), targets.camtoworld[0]
    relative = c2w[:, :3, :3].transpose(-1, -2) @ gt[:, :3, :3]
    cos = ((relative.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    fov = output.pose_encodings[-1][0, :, 7:].float()
    return {"translation_error": float((c2w[:, :3, 3] - gt[:, :3, 3]).norm(dim=-1).mean()),
            "rotation_error_deg": float(torch.rad2deg(torch.acos(cos)).mean()),
            "fov_error_deg": float(torch.rad2deg((fov - targets.pose_encoding[0, :, 7:]).abs()).mean())}


__all__ = ["Clip", "DEFAULT_WEIGHTS", "ReconSettings", "ReconTrainer", "Targets", "Views", "align_to_first_camera",
           "align_views", "camera_loss", "depth_loss", "encode_pose_encoding", "evaluate", "make_targets",
           "matrix_to_quaternion", "micro_decoder_config", "nano_decoder_config", "psnr", "recon_losses", "render_views", "ssim"]
