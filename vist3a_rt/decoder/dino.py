"""The DINOv2-style ViT (with registers) that serves as the aggregator's patch embedder.

Re-implemented from the DINOv2 ViT that VGGT/AnySplat vendor (``vit_large`` with 4 register
tokens, LayerScale init 1.0, LayerNorm eps 1e-6, bicubic antialiased position interpolation
with zero offset). Parameter names are the official ones: ``patch_embed.proj`` (patch conv),
``cls_token``, ``pos_embed`` (table for the training size, 1 + (img_size/patch)² entries),
``register_tokens``, ``mask_token`` (unused at inference, kept for strict loading),
``blocks.N.*``, ``norm``.

One class serves both forms of the network:

* unstitched (``first_block=0``): images -> patch conv -> tokens -> every block -> norm;
* stitched (``first_block=k > 0``): as the official stitched model builds it, the patch conv
  is absent and only blocks k.. exist, renumbered from 0; the stitching layer's tokens enter
  where the patch conv's output would.

Token layout after ``prepare_tokens``: [cls, register_1..R, patch tokens (row-major)].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import Vist3AInputError
from .layers import Block


class PatchEmbed(nn.Module):
    """Non-overlapping patch conv: [N, C, H, W] -> [N, (H/p)·(W/p), E] (row-major)."""

    def __init__(self, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 1024) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:  # [N, C, H, W] -> [N, P, E]
        H, W = images.shape[-2:]
        if images.dim() != 4 or H % self.patch_size or W % self.patch_size:
            raise Vist3AInputError(f"patch embedding expects images [N, C, H, W] with H and W multiples of "
                                   f"{self.patch_size}, got {list(images.shape)}")
        return self.proj(images).flatten(2).transpose(1, 2)


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT with registers; ``first_block > 0`` builds the stitched tail (no patch conv)."""

    def __init__(self, embed_dim: int = 1024, depth: int = 24, num_heads: int = 16,
                 mlp_ratio: float = 4.0, num_register_tokens: int = 4, img_size: int = 518,
                 patch_size: int = 14, in_chans: int = 3, first_block: int = 0,
                 init_values: float = 1.0, norm_eps: float = 1e-6) -> None:
        super().__init__()
        if not 0 <= first_block <= depth:
            raise ValueError(f"first_block must lie in [0, {depth}], got {first_block}")
        self.patch_size = patch_size
        self.first_block = first_block
        self.num_register_tokens = num_register_tokens
        self.pos_grid = img_size // patch_size  # the position table covers pos_grid x pos_grid patches
        if first_block == 0:
            self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pos_grid ** 2, embed_dim))
        self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                                if num_register_tokens else None)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, init_values=init_values, norm_eps=norm_eps)
            for _ in range(first_block, depth))
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self._init_weights()

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.num_register_tokens

    def forward(self, patch_tokens: Tensor,  # [N, rows*cols, E], row-major
                grid_size: tuple[int, int],  # (rows, cols)
                ) -> Tensor:  # [N, 1 + R + rows*cols, E], final norm applied, prefix kept
        x = self.prepare_tokens(patch_tokens, grid_size)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_images(self, images: Tensor) -> Tensor:  # [N, 3, H, W] -> [N, 1 + R + P, E]
        """Unstitched forward on (already ImageNet-normalised) images."""
        return self.forward(self.embed_images(images), self._grid_of(images))

    def block_outputs(self, patch_tokens: Tensor,  # [N, rows*cols, E]
                      grid_size: tuple[int, int],
                      ) -> list[Tensor]:  # per block [N, 1 + R + rows*cols, E], before the final norm
        """Every block's output as the official layer-search forward hook records it."""
        x, outputs = self.prepare_tokens(patch_tokens, grid_size), []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs

    def embed_images(self, images: Tensor) -> Tensor:  # [N, 3, H, W] -> [N, P, E]
        if self.first_block:
            raise RuntimeError(f"this DINO is the stitched tail (from block {self.first_block}): it has no "
                               "patch conv; feed it the stitching layer's tokens")
        return self.patch_embed(images)

    def prepare_tokens(self, patch_tokens: Tensor,  # [N, rows*cols, E]
                       grid_size: tuple[int, int],
                       ) -> Tensor:  # [N, 1 + R + rows*cols, E]
        """Prepend cls, add the (resized) position table, insert the registers after cls."""
        self._check_tokens(patch_tokens, grid_size)
        N = patch_tokens.shape[0]
        x = torch.cat((self.cls_token.expand(N, -1, -1), patch_tokens), dim=1)
        x = x + self.interpolate_pos_encoding(grid_size, x.dtype)
        if self.register_tokens is None:
            return x
        return torch.cat((x[:, :1], self.register_tokens.expand(N, -1, -1), x[:, 1:]), dim=1)

    def interpolate_pos_encoding(self, grid_size: tuple[int, int],
                                 dtype: torch.dtype) -> Tensor:  # [1, 1 + rows*cols, E]
        """The position table resized to ``grid_size`` (cls entry unchanged): float32 bicubic
        with antialias straight to the target size; the table itself when the size matches."""
        rows, cols = grid_size
        if rows == cols == self.pos_grid:
            return self.pos_embed
        table = self.pos_embed.float()
        M, E = self.pos_grid, table.shape[-1]
        patch_table = table[:, 1:].reshape(1, M, M, E).permute(0, 3, 1, 2)
        patch_table = F.interpolate(patch_table, size=(rows, cols), mode="bicubic", antialias=True)
        patch_table = patch_table.permute(0, 2, 3, 1).reshape(1, rows * cols, E)
        return torch.cat((table[:, :1], patch_table), dim=1).to(dtype)

    def _grid_of(self, images: Tensor) -> tuple[int, int]:
        return images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size

    def _check_tokens(self, patch_tokens: Tensor, grid_size: tuple[int, int]) -> None:
        rows, cols = grid_size
        E = self.cls_token.shape[-1]
        if patch_tokens.dim() != 3 or patch_tokens.shape[1] != rows * cols or patch_tokens.shape[2] != E:
            raise Vist3AInputError(f"DINO expects patch tokens [N, {rows}*{cols}, {E}] for grid "
                                   f"{rows}x{cols}, got {list(patch_tokens.shape)}")

    def _init_weights(self) -> None:
        if self.pos_embed.is_meta:  # built to receive loaded weights: nothing to initialise (and
            return  # torch's init functions on meta tensors import torch._dynamo, ~1-2 s)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

