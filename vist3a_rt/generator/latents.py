"""Wan latent space: shapes, de-normalisation, VAE decoding, and the resize to the decoder's input.

Everything here follows the official inference script step for step (e2e fixture README steps
9 to 11); the exact operation forms matter at the 1e-6 level and are noted where they do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..errors import Vist3AInputError

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan


def latent_shape(vae_config, batch: int, num_frames: int, height: int, width: int) -> tuple[int, ...]:
    """[B, z_dim, (F-1)/st + 1, H/ss, W/ss] for a video of ``num_frames`` frames of H×W pixels."""
    temporal, spatial = vae_config.scale_factor_temporal, vae_config.scale_factor_spatial
    return (batch, vae_config.z_dim, (num_frames - 1) // temporal + 1, height // spatial, width // spatial)


def check_video_size(num_frames: int, height: int, width: int, *, temporal: int, spatial: int,
                     patch: tuple[int, int]) -> None:
    """Frames of the form ``temporal·k + 1``; height/width multiples of ``spatial × patch``."""
    for name, value in (("num_frames", num_frames), ("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise Vist3AInputError(f"{name} must be a positive integer, got {value!r}")
    if (num_frames - 1) % temporal:
        lower = (num_frames - 1) // temporal * temporal + 1
        raise Vist3AInputError(f"num_frames must be {temporal}k+1 (the VAE compresses time by {temporal}), "
                               f"got {num_frames}; nearest: {lower} or {lower + temporal}")
    for name, value, multiple in (("height", height, spatial * patch[0]), ("width", width, spatial * patch[1])):
        if value % multiple:
            raise Vist3AInputError(f"{name} must be a multiple of {multiple} (VAE factor {spatial} × "
                                   f"transformer patch {multiple // spatial}), got {value}")


def latent_statistics(vae_config, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) as [1, z_dim, 1, 1, 1] tensors from the VAE config's lists (made in float32,
    then cast, as the official script does)."""
    shape = (1, vae_config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae_config.latents_mean, dtype=torch.float32).view(shape)
    std = torch.tensor(vae_config.latents_std, dtype=torch.float32).view(shape)
    return mean.to(device, dtype), std.to(device, dtype)


def denormalize(latents: torch.Tensor, vae_config) -> torch.Tensor:  # [B, z, T, h, w]
    """``latents / (1/std) + mean``, the official form: the reciprocal is taken first (in the
    latents' dtype), then divided by. Multiplying by ``std`` directly differs by up to ~1e-6."""
    mean, std = latent_statistics(vae_config, latents.device, latents.dtype)
    inverse_std = 1.0 / std
    return latents / inverse_std + mean


@torch.no_grad()
def decode(vae: "AutoencoderKLWan", latents: torch.Tensor) -> torch.Tensor:  # [B, z, T_lat, h, w] de-normalised
    """Video frames [B, 3, T, H, W] in [-1, 1] (diffusers' decode already clamps; kept explicit)."""
    frames = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return frames.clamp(-1.0, 1.0)


def resize_frames(frames: torch.Tensor,  # [B, 3, T, H, W]
                  resolution: int | tuple[int, int]) -> torch.Tensor:  # [B, 3, T, R_h, R_w]
    """The official resize to the feed-forward resolution: trilinear, **align_corners=False**, frame
    count unchanged (so a per-frame bilinear resize with half-pixel centres). The training path's
    align_corners=True resize differs by up to ~0.1 and must not be used here."""
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if frames.ndim != 5:
        raise Vist3AInputError(f"frames must be [B, C, T, H, W], got shape {list(frames.shape)}")
    return F.interpolate(frames, size=(frames.shape[2], *size), mode="trilinear", align_corners=False)
