"""The VGGT aggregator: DINO patch tokens -> alternating frame / global attention.

Re-implemented from VGGT's ``Aggregator`` as AnySplat uses it (and as the official stitched
forward drives it). Per frame the token sequence is [camera token, R register tokens, patch
tokens]; frame 0 takes slice 0 of ``camera_token`` (1, 2, 1, E) and ``register_token``
(1, 2, R, E), every other frame slice 1. Patch tokens get 2D RoPE positions (row, col) + 1,
the special tokens (0, 0). Each of the ``depth`` rounds runs one frame-attention block (per
frame) and one global-attention block (over all frames' tokens); at the tapped rounds the
two outputs are concatenated on channels, giving [B, S, 1 + R + P, 2E].

The DINO ViT lives inside as ``patch_embed`` (as in the official module tree), so the official
names ``aggregator.patch_embed.blocks.N.*`` / ``aggregator.frame_blocks.N.*`` load unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import Vist3AInputError
from .dino import DinoVisionTransformer
from .layers import Block, RotaryPositionEmbedding2D, grid_positions

# ImageNet statistics the aggregator normalises [0, 1] images with before DINO.
RESNET_MEAN = (0.485, 0.456, 0.406)
RESNET_STD = (0.229, 0.224, 0.225)


class Aggregator(nn.Module):
    """Alternating-attention aggregator with its DINO patch embedder (``patch_embed``)."""

    def __init__(self, embed_dim: int = 1024, depth: int = 24, num_heads: int = 16,
                 mlp_ratio: float = 4.0, num_register_tokens: int = 4, img_size: int = 518,
                 patch_size: int = 14, dino_depth: int = 24, dino_num_heads: int = 16,
                 dino_mlp_ratio: float = 4.0, dino_first_block: int = 0, dino_init_values: float = 1.0,
                 dino_norm_eps: float = 1e-6, qk_norm: bool = True, rope_freq: float = 100.0,
                 init_values: float = 0.01, norm_eps: float = 1e-5,
                 intermediate_layer_idx: Sequence[int] = (4, 11, 17, 23)) -> None:
        super().__init__()
        self.patch_embed = DinoVisionTransformer(
            embed_dim, dino_depth, dino_num_heads, dino_mlp_ratio, num_register_tokens, img_size,
            patch_size, first_block=dino_first_block, init_values=dino_init_values, norm_eps=dino_norm_eps)
        self.rope = RotaryPositionEmbedding2D(rope_freq) if rope_freq > 0 else None
        self.frame_blocks = self._make_blocks(embed_dim, depth, num_heads, mlp_ratio, init_values, norm_eps, qk_norm)
        self.global_blocks = self._make_blocks(embed_dim, depth, num_heads, mlp_ratio, init_values, norm_eps, qk_norm)
        self.camera_token = nn.Parameter(torch.empty(1, 2, 1, embed_dim).normal_(std=1e-6))
        self.register_token = nn.Parameter(torch.empty(1, 2, num_register_tokens, embed_dim).normal_(std=1e-6))
        self.patch_size = patch_size
        self.patch_start_idx = 1 + num_register_tokens
        self.tapped_layers = self._tapped_layers(intermediate_layer_idx, depth)
        self.register_buffer("_resnet_mean", torch.tensor(RESNET_MEAN).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("_resnet_std", torch.tensor(RESNET_STD).view(1, 1, 3, 1, 1), persistent=False)

    def _make_blocks(self, dim, depth, num_heads, mlp_ratio, init_values, norm_eps, qk_norm) -> nn.ModuleList:
        return nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, init_values=init_values, norm_eps=norm_eps,
                  qk_norm=qk_norm, rope=self.rope)
            for _ in range(depth))

    @staticmethod
    def _tapped_layers(indices: Sequence[int], depth: int) -> tuple[int, ...]:
        """Tapped rounds in increasing order; the last round is always included (camera head)."""
        bad = [i for i in indices if not 0 <= i < depth]
        if bad:
            raise ValueError(f"tapped aggregator layers {bad} lie outside [0, {depth})")
        return tuple(sorted(set(indices) | {depth - 1}))

    def forward(self, images: Tensor,  # [B, S, 3, H, W] in [0, 1]
                ) -> tuple[list[Tensor], int]:  # taps [B, S, 1+R+P, 2E] each, patch_start_idx
        """Unstitched forward: ImageNet-normalise, DINO patch embedding, alternating attention."""
        self._check_images(images)
        B, S, _, H, W = images.shape
        dino_tokens = self.patch_embed.forward_images(self._normalize(images).reshape(B * S, 3, H, W))
        return self.aggregate(self.drop_dino_prefix(dino_tokens).unflatten(0, (B, S)), self._grid_of(images))

    def forward_stitched(self, tokens: Tensor,  # [B, S, rows*cols, E]: stitching-layer tokens
                         grid_size: tuple[int, int],  # (rows, cols)
                         ) -> tuple[list[Tensor], int]:
        """Stitched forward: the remaining DINO blocks, then alternating attention."""
        B, S = self._check_patch_tokens(tokens, grid_size)[:2]
        dino_tokens = self.patch_embed(tokens.flatten(0, 1), grid_size)
        return self.aggregate(self.drop_dino_prefix(dino_tokens).unflatten(0, (B, S)), grid_size)

    def dino_block_outputs(self, images: Tensor,  # [B, S, 3, H, W] in [0, 1]
                           ) -> list[Tensor]:  # per DINO block [B, S, 1+R+P, E], before the final norm
        """What the official layer search's forward hooks record on each DINO block (unstitched)."""
        self._check_images(images)
        B, S, _, H, W = images.shape
        patch_tokens = self.patch_embed.embed_images(self._normalize(images).reshape(B * S, 3, H, W))
        outputs = self.patch_embed.block_outputs(patch_tokens, self._grid_of(images))
        return [out.unflatten(0, (B, S)) for out in outputs]

    def drop_dino_prefix(self, dino_tokens: Tensor) -> Tensor:  # [N, 1+R+P, E] -> [N, P, E]
        return dino_tokens[:, self.patch_embed.num_prefix_tokens:]

    def aggregate(self, patch_tokens: Tensor,  # [B, S, rows*cols, E], DINO output without prefix
                  grid_size: tuple[int, int],  # (rows, cols)
                  ) -> tuple[list[Tensor], int]:  # taps [B, S, 1+R+P, 2E] each, patch_start_idx
        """Alternating frame / global attention over [camera, registers, patches] per frame."""
        B, S, P, E = self._check_patch_tokens(patch_tokens, grid_size)
        tokens = torch.cat((self._special_tokens(B, S), patch_tokens.flatten(0, 1)), dim=1)
        T = tokens.shape[1]
        frame_pos = grid_positions(*grid_size, self.patch_start_idx, tokens.device).expand(B * S, T, 2)
        global_pos = frame_pos.reshape(B, S * T, 2)
        taps = []
        for layer, (frame_block, global_block) in enumerate(zip(self.frame_blocks, self.global_blocks)):
            tokens = frame_block(tokens.reshape(B * S, T, E), pos=frame_pos)
            frame_out = tokens.view(B, S, T, E)
            tokens = global_block(tokens.reshape(B, S * T, E), pos=global_pos)
            if layer in self.tapped_layers:
                taps.append(torch.cat((frame_out, tokens.view(B, S, T, E)), dim=-1))
        return taps, self.patch_start_idx

    def _special_tokens(self, B: int, S: int) -> Tensor:  # [B*S, 1 + R, E]
        """Camera + register tokens per frame: slice 0 for frame 0, slice 1 for the others."""
        special = torch.cat((self.camera_token, self.register_token), dim=2)  # [1, 2, 1+R, E]
        first = special[:, :1].expand(B, 1, -1, -1)
        others = special[:, 1:].expand(B, S - 1, -1, -1)
        return torch.cat((first, others), dim=1).flatten(0, 1)

    def _normalize(self, images: Tensor) -> Tensor:  # [B, S, 3, H, W]: [0, 1] -> ImageNet statistics
        return (images - self._resnet_mean) / self._resnet_std

    def _grid_of(self, images: Tensor) -> tuple[int, int]:
        return images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size

    @staticmethod
    def _check_images(images: Tensor) -> None:
        if images.dim() != 5 or images.shape[2] != 3:
            raise Vist3AInputError(f"aggregator expects images [B, S, 3, H, W], got {list(images.shape)}")

    def _check_patch_tokens(self, patch_tokens: Tensor, grid_size: tuple[int, int]) -> tuple[int, ...]:
        rows, cols = grid_size
        E = self.camera_token.shape[-1]
        if patch_tokens.dim() != 4 or patch_tokens.shape[2] != rows * cols or patch_tokens.shape[3] != E:
            raise Vist3AInputError(f"aggregator expects patch tokens [B, S, {rows}*{cols}, {E}] for grid "
                                   f"{rows}x{cols}, got {list(patch_tokens.shape)}")
        return tuple(patch_tokens.shape)
