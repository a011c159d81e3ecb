"""What layer search needs from a (video VAE, reconstruction network) pair, as two small protocols.

* ``VideoLatentSource``: videos [B, 3, T, H, W] in [-1, 1] -> latents [B, C, T_lat, h, w].
* ``BlockFeatureSource``: videos [B, 3, T, H, W] in [-1, 1] -> per candidate block, patch-token
  features [B, T, P, E] (prefix tokens dropped, P = rows·cols row-major), plus the (rows, cols) grid.

Adapters here: ``WanLatentSource`` (diffusers ``AutoencoderKLWan``, posterior sampled with a
torch generator), ``PrecomputedLatentSource`` (latents already at hand, served in order) and
``AnySplatFeatureSource`` (``ReconstructionModel.block_outputs``, blocks named ``enc_blocks_<j>``
as the official hooks name them: block index j-1). Any other pair only has to implement the
protocols.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..errors import CheckpointError, Vist3AInputError

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan

    from ..decoder.network import ReconstructionModel


@runtime_checkable
class VideoLatentSource(Protocol):
    """Encodes a batch of videos into the video model's latent space."""

    latent_channels: int

    def latents(self, videos: Tensor) -> Tensor:  # [B, 3, T, H, W] in [-1, 1] -> [B, C, T_lat, h, w]
        ...


@runtime_checkable
class BlockFeatureSource(Protocol):
    """Runs the reconstruction network and returns the candidate blocks' token features."""

    block_names: tuple[str, ...]

    def block_features(self, videos: Tensor,  # [B, 3, T, H, W] in [-1, 1]
                       blocks: tuple[str, ...]) -> tuple[dict[str, Tensor], tuple[int, int]]:
        """{block: [B, T, P, E]} for the requested blocks, and the (rows, cols) token grid."""
        ...


def check_videos(videos: Tensor, what: str = "videos") -> None:
    if not isinstance(videos, Tensor) or videos.dim() != 5 or videos.shape[1] != 3:
        shape = list(videos.shape) if isinstance(videos, Tensor) else type(videos).__name__
        raise Vist3AInputError(f"{what} must be [B, 3, T, H, W], got {shape}")


class WanLatentSource:
    """Wan 2.1 VAE: ``encode(videos).latent_dist.sample(generator)`` (the official layer search
    samples the posterior; with ``generator=None`` torch's global RNG is used, as there)."""

    def __init__(self, vae: "AutoencoderKLWan", generator: torch.Generator | None = None) -> None:
        self.vae = vae.eval().requires_grad_(False)
        self.generator = generator
        self.latent_channels = int(vae.config.z_dim)

    @classmethod
    def from_pretrained(cls, folder: str | Path, generator: torch.Generator | None = None,
                        device: str | torch.device = "cpu") -> "WanLatentSource":
        """From a diffusers VAE folder (``config.json`` + weights), offline."""
        from ..generator.loading import set_offline_defaults

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{folder} is not a diffusers VAE folder (no config.json)")
        set_offline_defaults()
        from diffusers import AutoencoderKLWan

        try:
            vae = AutoencoderKLWan.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"cannot load the Wan VAE from {folder}: {err}") from err
        return cls(vae.to(device), generator)

    @torch.no_grad()
    def posterior(self, videos: Tensor) -> tuple[Tensor, Tensor]:  # -> (mean, std), each [B, C, T_lat, h, w]
        dist = self._encode(videos)
        return dist.mean, dist.std

    @torch.no_grad()
    def latents(self, videos: Tensor) -> Tensor:  # [B, 3, T, H, W] -> [B, C, T_lat, h, w]
        return self._encode(videos).sample(generator=self.generator)

    def _encode(self, videos: Tensor):
        check_videos(videos)
        return self.vae.encode(videos.to(device=self.vae.device, dtype=self.vae.dtype)).latent_dist


class PrecomputedLatentSource:
    """Latents computed elsewhere, handed out in order, one batch per call (the videos passed in
    only set the batch size)."""

    def __init__(self, latents: Tensor) -> None:  # [N, C, T_lat, h, w]
        if not isinstance(latents, Tensor) or latents.dim() != 5:
            shape = list(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise Vist3AInputError(f"precomputed latents must be [N, C, T_lat, h, w], got {shape}")
        self.all_latents = latents
        self.latent_channels = latents.shape[1]
        self.position = 0

    def latents(self, videos: Tensor) -> Tensor:
        batch = videos.shape[0]
        if self.position + batch > self.all_latents.shape[0]:
            raise Vist3AInputError(f"precomputed latents exhausted: {self.all_latents.shape[0]} latents, "
                                   f"asked for videos {self.position}..{self.position + batch - 1}")
        out = self.all_latents[self.position:self.position + batch]
        self.position += batch
        return out


class AnySplatFeatureSource:
    """The unstitched AnySplat-architecture network: DINO block j-1's output (before the final
    norm, as the official forward hooks see it) is block ``enc_blocks_<j>``; the cls and register
    prefix tokens are dropped."""

    def __init__(self, model: "ReconstructionModel") -> None:
        self.model = model.eval()
        depth = model.config.architecture.dino_depth
        self.block_names = tuple(f"enc_blocks_{j}" for j in range(1, depth + 1))
        self.patch_size = model.config.architecture.patch_size
        self.num_prefix_tokens = model.encoder.aggregator.patch_embed.num_prefix_tokens

    @torch.no_grad()
    def block_features(self, videos: Tensor, blocks: tuple[str, ...]) -> tuple[dict[str, Tensor], tuple[int, int]]:
        check_videos(videos)
        unknown = [b for b in blocks if b not in self.block_names]
        if unknown:
            raise Vist3AInputError(f"unknown block(s) {unknown}: this network has {self.block_names[0]}.."
                                   f"{self.block_names[-1]}")
        outputs = self.model.block_outputs(videos)  # per block [B, T, prefix + P, E]
        grid = (videos.shape[-2] // self.patch_size, videos.shape[-1] // self.patch_size)
        by_name = dict(zip(self.block_names, outputs))
        return {b: by_name[b][:, :, self.num_prefix_tokens:] for b in blocks}, grid
