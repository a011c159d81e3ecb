"""The AnySplat-architecture reconstruction network, unstitched and stitched.

``AnySplatEncoder`` holds the official module tree (``aggregator``, ``camera_head``,
``depth_head``, ``gaussian_param_head``) so the official state-dict names — ``encoder.…`` —
are ours too. ``ReconstructionModel`` runs it on images (AnySplat as released);
``StitchedDecoder`` cuts it after ``enc_blocks_k`` and feeds it video latents through the
stitching Conv3d (VIST3A). Both end in the same decoding tail (cameras, depth, Gaussians).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import Vist3AInputError
from ..scene import Cameras, GaussianScene
from .aggregator import Aggregator
from .camera_head import CameraHead
from .config import DecoderConfig
from .dpt import DPTHead, GaussianParamHead
from .gaussians import GaussianAdapter, GaussianParams, gaussians_from_pixels, scene_scale
from .geometry import camera_to_world, decode_pose_encoding, normalize_intrinsics, unproject_depth
from .stitching import StitchingLayer


@dataclass
class DecoderOutput:
    """What the decoder predicts for a batch of B videos of T frames at H x W.

    Gaussians are held as the official code holds them (``gaussians.means`` [B,N,3],
    ``covariances`` [B,N,3,3], ``harmonics`` [B,N,3,K] colour-outer, ``opacities`` [B,N],
    ``scales`` [B,N,3], ``rotations`` [B,N,4] xyzw); batches with fewer Gaussians than N are
    padded (``num_gaussians`` says how many are real).
    """

    gaussians: GaussianParams
    extrinsics: Tensor  # [B, T, 4, 4] camera-to-world
    intrinsics: Tensor  # [B, T, 3, 3] normalized by image width / height
    depth: Tensor  # [B, T, H, W, 1]
    depth_conf: Tensor  # [B, T, H, W]
    conf_valid_mask: Tensor  # [B, T, H, W] bool
    pose_encodings: list[Tensor]  # refinement iterations, each [B, T, 9]
    scene_scale: Tensor  # []
    num_gaussians: list[int]
    image_size: tuple[int, int]  # (H, W)
    head_features: Tensor | None = None  # [B, T, 1+D+1, H, W] raw Gaussian-head output (distillation targets)

    means = property(lambda self: self.gaussians.means)
    covariances = property(lambda self: self.gaussians.covariances)
    harmonics = property(lambda self: self.gaussians.harmonics)
    opacities = property(lambda self: self.gaussians.opacities)
    scales = property(lambda self: self.gaussians.scales)
    rotations = property(lambda self: self.gaussians.rotations)

    @property
    def voxelize_ratio(self) -> float:
        H, W = self.image_size
        return self.gaussians.means.shape[1] / (H * W * self.extrinsics.shape[1])

    def to_scene(self, batch_index: int = 0) -> GaussianScene:
        """The real (unpadded) Gaussians of one batch entry as a ``GaussianScene`` (w-first quaternions)."""
        g, n = self.gaussians, self.num_gaussians[batch_index]
        xyzw = g.rotations[batch_index, :n].float()
        return GaussianScene.from_unnormalized(
            means=g.means[batch_index, :n].float(),
            scales=g.scales[batch_index, :n].float(),
            rotations=torch.cat([xyzw[:, 3:], xyzw[:, :3]], dim=-1),
            sh=g.harmonics[batch_index, :n].float().transpose(-1, -2).contiguous(),
            opacities=g.opacities[batch_index, :n].float(),
        )

    def cameras(self, batch_index: int = 0) -> Cameras:
        H, W = self.image_size
        return Cameras.from_normalized(self.extrinsics[batch_index].float(),
                                       self.intrinsics[batch_index].float(), W, H)


class AnySplatEncoder(nn.Module):
    """Aggregator + camera, depth and Gaussian heads, named as the official ``encoder``."""

    def __init__(self, config: DecoderConfig, stitched: bool) -> None:
        super().__init__()
        arch, enc = config.architecture, config.encoder
        self.config = config
        taps = arch.stitched_intermediate_layer_idx if stitched else enc.intermediate_layer_idx
        self.aggregator = Aggregator(
            embed_dim=arch.embed_dim, depth=arch.agg_depth, num_heads=arch.agg_num_heads,
            mlp_ratio=arch.agg_mlp_ratio, num_register_tokens=arch.num_register_tokens,
            img_size=arch.img_size, patch_size=arch.patch_size, dino_depth=arch.dino_depth,
            dino_num_heads=arch.dino_num_heads, dino_mlp_ratio=arch.dino_mlp_ratio,
            dino_first_block=config.stitching.stitched_layer_index if stitched else 0,
            dino_init_values=arch.dino_layerscale_init, dino_norm_eps=arch.dino_layernorm_eps,
            qk_norm=arch.agg_qk_norm, rope_freq=arch.rope_freq, init_values=arch.agg_layerscale_init,
            norm_eps=arch.agg_layernorm_eps, intermediate_layer_idx=tuple(taps))
        dim_in = 2 * arch.embed_dim
        self.camera_head = CameraHead(dim_in=dim_in, trunk_depth=arch.cam_trunk_depth,
                                      num_heads=arch.cam_num_heads, init_values=arch.cam_layerscale_init,
                                      num_iterations=arch.cam_num_iterations)
        self.depth_head = DPTHead(dim_in, arch.patch_size, output_dim=arch.depth_head["output_dim"],
                                  features=arch.dpt_features, out_channels=tuple(arch.dpt_out_channels),
                                  intermediate_layer_idx=tuple(taps),
                                  activation=arch.depth_head["activation"],
                                  conf_activation=arch.depth_head["conf_activation"],
                                  frames_chunk_size=arch.frames_chunk_size)
        self.gaussian_param_head = GaussianParamHead(
            dim_in, arch.patch_size, output_dim=arch.gs_head["output_dim"], features=arch.gs_features,
            out_channels=tuple(arch.gs_out_channels), head_features_1=arch.gs_head_features_1,
            head_features_2=arch.gs_head_features_2, intermediate_layer_idx=tuple(taps),
            frames_chunk_size=arch.frames_chunk_size)
        self.gaussian_adapter = GaussianAdapter(sh_degree=enc.gaussian_adapter.sh_degree)

    def decode(self, taps: list[Tensor],  # each [B, T, P_total, 2E]
               patch_start_idx: int,
               images: Tensor,  # [B, T, 3, H, W] in [0, 1]
               ) -> DecoderOutput:
        """The decoding tail shared by both forms: cameras, depth, points, Gaussians."""
        enc, hw = self.config.encoder, tuple(images.shape[-2:])
        pose_encodings = self.camera_head(taps[-1])
        w2c, K = decode_pose_encoding(pose_encodings[-1], hw)
        depth, depth_conf = self.depth_head(taps, images, patch_start_idx)
        points = unproject_depth(depth, w2c, K)
        head_out = self.gaussian_param_head(taps, images, patch_start_idx)
        valid = self._confidence_mask(depth_conf)
        gaussians = gaussians_from_pixels(
            head_out, points, self.gaussian_adapter,
            voxel_size=enc.voxel_size if enc.voxelize else None,
            valid_mask=None if enc.voxelize else valid,
            opacity_mapping=(enc.opacity_mapping.initial, enc.opacity_mapping.final, enc.opacity_mapping.warm_up))
        if enc.opacity_conf:
            gaussians.opacities = self._confidence_weighted(gaussians.opacities, depth_conf, valid)
        return DecoderOutput(
            gaussians=gaussians, extrinsics=camera_to_world(w2c), intrinsics=normalize_intrinsics(K, hw),
            depth=depth, depth_conf=depth_conf, conf_valid_mask=valid, pose_encodings=pose_encodings,
            scene_scale=scene_scale(points), num_gaussians=self._counts(gaussians, valid), image_size=hw,
            head_features=head_out)

    def _confidence_mask(self, depth_conf: Tensor) -> Tensor:  # [B, T, H, W] -> bool mask
        enc = self.config.encoder
        if not enc.render_conf:
            return torch.ones_like(depth_conf, dtype=torch.bool)
        # official: one quantile over the whole batch, strict comparison
        return depth_conf > torch.quantile(depth_conf.flatten(0, 1).float(), enc.conf_threshold)

    def _confidence_weighted(self, opacities: Tensor,  # [B, N]
                             depth_conf: Tensor, valid: Tensor) -> Tensor:  # [B, T, H, W] each
        """``opacity_conf``: opacities scaled by sigmoid(depth_conf − its conf_threshold quantile over
        the batch), per valid pixel (official; defined for the per-pixel path only)."""
        shift = torch.quantile(depth_conf.float(), self.config.encoder.conf_threshold).to(depth_conf.dtype)
        weights = torch.sigmoid(depth_conf - shift)
        rows = [w[m] for w, m in zip(weights, valid)]
        scaled = opacities.clone()
        for b, row in enumerate(rows):
            scaled[b, : row.numel()] = opacities[b, : row.numel()] * row
        return scaled

    def _counts(self, gaussians: GaussianParams, valid: Tensor) -> list[int]:
        if not self.config.encoder.voxelize:
            return [int(n) for n in valid.flatten(1).sum(1).tolist()]
        # voxel fusion pads shorter batch entries with means of -1e4 (an impossible point)
        real = (gaussians.means != -1e4).any(-1)
        return [int(n) for n in real.sum(1).tolist()]


def _check_frames(frames: Tensor, patch_size: int) -> None:
    if not isinstance(frames, Tensor) or frames.dim() != 5 or frames.shape[1] != 3:
        shape = list(frames.shape) if isinstance(frames, Tensor) else type(frames).__name__
        raise Vist3AInputError(f"frames must be [B, 3, T, H, W] in [-1, 1], got {shape}")
    H, W = frames.shape[-2:]
    if H % patch_size or W % patch_size or H == 0 or W == 0:
        raise Vist3AInputError(f"frame size {H}x{W} must be a positive multiple of the patch size {patch_size}")
    _check_finite("frames", frames)
    low, high = frames.min().item(), frames.max().item()
    if low < -1.001 or high > 1.001:
        raise Vist3AInputError(f"frames must lie in [-1, 1], got values in [{low:.4g}, {high:.4g}]")


def _check_finite(name: str, value: Tensor) -> None:
    if not torch.isfinite(value).all():
        raise Vist3AInputError(f"{name} contains NaN or infinite values")


class ReconstructionModel(nn.Module):
    """AnySplat as released: frames in, Gaussians and cameras out."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = AnySplatEncoder(config, stitched=False)

    def forward(self, frames: Tensor) -> DecoderOutput:  # [B, 3, T, H, W] in [-1, 1]
        _check_frames(frames, self.config.architecture.patch_size)
        images = (frames.to(self._dtype()).transpose(1, 2) + 1) / 2  # [B, T, 3, H, W] in [0, 1]
        taps, patch_start_idx = self.encoder.aggregator(images)
        return self.encoder.decode(taps, patch_start_idx, images)

    def block_outputs(self, frames: Tensor) -> list[Tensor]:  # [B, 3, T, H, W] -> per DINO block [B, T, 1+R+P, E]
        """Per-block DINO activations (before the final norm, prefix tokens kept), for layer search."""
        _check_frames(frames, self.config.architecture.patch_size)
        return self.encoder.aggregator.dino_block_outputs((frames.to(self._dtype()).transpose(1, 2) + 1) / 2)

    def _dtype(self) -> torch.dtype:
        return self.encoder.aggregator.camera_token.dtype


class StitchedDecoder(nn.Module):
    """VIST3A's decoder: video latents (+ decoded frames) in, Gaussians and cameras out."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.stitching_layer = StitchingLayer(config.stitching.stitching_layer_config,
                                              in_channels=config.stitching.latent_channels,
                                              temporal_compression=config.stitching.temporal_compression)
        self.encoder = AnySplatEncoder(config, stitched=True)

    def forward(self, latent: Tensor,  # [B, C_lat, T_lat, h, w] (de-normalized VAE latents)
                frames: Tensor,  # [B, 3, T, H, W] in [-1, 1], T = 4 (T_lat - 1) + 1
                ) -> DecoderOutput:
        self._check_inputs(latent, frames)
        dtype = self.stitching_layer.weight.dtype
        images = (frames.to(dtype).transpose(1, 2) + 1) / 2  # [B, T, 3, H, W] in [0, 1]
        tokens = self.stitching_layer(latent.to(dtype))  # [B, E, T, rows, cols]
        rows, cols = tokens.shape[-2:]
        tokens = tokens.permute(0, 2, 3, 4, 1).flatten(2, 3)  # [B, T, rows*cols, E], row-major
        taps, patch_start_idx = self.encoder.aggregator.forward_stitched(tokens, (rows, cols))
        return self.encoder.decode(taps, patch_start_idx, images)

    def stitch_tokens(self, latent: Tensor) -> Tensor:  # [B, C_lat, T_lat, h, w] -> [B, E, T, rows, cols]
        return self.stitching_layer(latent.to(self.stitching_layer.weight.dtype))

    def _check_inputs(self, latent: Tensor, frames: Tensor) -> None:
        C = self.config.stitching.latent_channels
        if not isinstance(latent, Tensor) or latent.dim() != 5 or latent.shape[1] != C:
            shape = list(latent.shape) if isinstance(latent, Tensor) else type(latent).__name__
            raise Vist3AInputError(f"latent must be [B, {C}, T_lat, h, w], got {shape}")
        _check_finite("latent", latent)
        _check_frames(frames, self.config.architecture.patch_size)
        if frames.shape[0] != latent.shape[0]:
            raise Vist3AInputError(f"batch mismatch: latent has {latent.shape[0]}, frames {frames.shape[0]}")
        expected = self.config.stitching.temporal_compression * (latent.shape[2] - 1) + 1
        if frames.shape[2] != expected:
            raise Vist3AInputError(f"{latent.shape[2]} latent frames decode to {expected} video frames, "
                                   f"but frames has {frames.shape[2]}")
        self._check_grid(latent, frames)

    def token_grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Rows and columns of the stitched token grid for a latent of spatial size ``latent_hw``."""
        layer = self.stitching_layer
        rows, cols = ((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in
                      zip(latent_hw, layer.kernel_size[1:], layer.stride[1:], layer.padding[1:], layer.dilation[1:]))
        return rows, cols

    def frame_size(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """The frame size (H, W) the decoder expects with such a latent: one patch per token."""
        patch = self.config.architecture.patch_size
        rows, cols = self.token_grid(latent_hw)
        return rows * patch, cols * patch

    def _check_grid(self, latent: Tensor, frames: Tensor) -> None:
        patch = self.config.architecture.patch_size
        grid = self.token_grid(tuple(latent.shape[3:]))
        image_grid = tuple(n // patch for n in frames.shape[3:])
        if grid != image_grid:
            raise Vist3AInputError(
                f"latent {list(latent.shape[3:])} gives a {grid[0]}x{grid[1]} token grid but frames "
                f"{list(frames.shape[3:])} give {image_grid[0]}x{image_grid[1]} patches of {patch} px "
                f"(expected frames of {grid[0] * patch}x{grid[1] * patch})")
