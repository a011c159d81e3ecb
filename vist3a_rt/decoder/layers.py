"""Transformer pieces shared by the DINO patch embedder, the VGGT aggregator and the camera head.

Re-implemented from the layer definitions that AnySplat vendors from VGGT/DINOv2 (attention,
block, layer scale, MLP, 2D rotary embedding). Module and parameter names are the official
ones (``attn.qkv``, ``attn.q_norm``, ``ls1.gamma``, ``mlp.fc1``, …) so official state dicts
load unchanged, and the float32 op order is the official one so outputs agree to rounding:

* attention: one fused ``qkv`` Linear, optional per-head LayerNorm on q and k (before RoPE),
  optional 2D RoPE on q and k, ``F.scaled_dot_product_attention`` with its default scale;
* block: pre-norm residual ``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``;
* 2D RoPE: the head dim is split in halves; the first half rotates with the token's row,
  the second with its column; each half uses frequencies ``base ** (-2i / (D/2))`` and the
  rotate-half convention (``[x1, x2] -> [-x2, x1]``).

On CUDA, ``ATTENTION_BACKEND = "triton"`` (or ``VIST3A_ATTENTION=triton`` in the environment)
runs attention, RoPE fused, through the Triton flash-attention kernel
(``vist3a_rt.kernels.triton_attention``; needs triton). CPU tensors always take SDPA.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerScale(nn.Module):
    """Per-channel learned residual scale (``gamma``)."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:  # [..., dim]
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 -> GELU (exact, erf) -> fc2."""

    def __init__(self, in_features: int, hidden_features: int | None = None,
                 out_features: int | None = None, bias: bool = True) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:  # [..., in_features]
        return self.fc2(self.act(self.fc1(x)))


class RotaryPositionEmbedding2D(nn.Module):
    """2D RoPE for tokens on a (row, col) grid; no parameters.

    Computes the angles directly from the integer positions instead of looking them up in a
    table (same float32 values: each angle is a single product ``position * inv_freq``), which
    keeps the op traceable for export.
    """

    def __init__(self, frequency: float = 100.0) -> None:
        super().__init__()
        self.frequency = float(frequency)

    def forward(self, tokens: Tensor,  # [B, heads, N, D], D divisible by 4
                positions: Tensor,  # [B, N, 2] integer (row, col)
                ) -> Tensor:  # [B, heads, N, D]
        rows, cols = tokens.chunk(2, dim=-1)
        rows = self._rotate(rows, positions[..., 0])
        cols = self._rotate(cols, positions[..., 1])
        return torch.cat((rows, cols), dim=-1)

    def _rotate(self, x: Tensor,  # [B, heads, N, d]
                positions: Tensor,  # [B, N]
                ) -> Tensor:
        cos, sin = self._cos_sin(positions, x.shape[-1], x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _cos_sin(self, positions: Tensor, dim: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        exponents = torch.arange(0, dim, 2, device=positions.device).float() / dim
        inv_freq = 1.0 / (self.frequency ** exponents)  # [dim / 2]
        angles = (positions.float()[..., None] * inv_freq).to(dtype)  # [B, N, dim / 2]
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # [B, 1, N, dim]
        return angles.cos(), angles.sin()


def grid_positions(rows: int, cols: int, num_special: int = 0,
                   device: torch.device | str | None = None) -> Tensor:  # [num_special + rows*cols, 2]
    """RoPE positions of a frame: ``num_special`` tokens at (0, 0), then the patch grid in
    row-major order at (row, col) + 1 when there are special tokens, (row, col) otherwise."""
    r, c = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    patches = torch.stack((r.flatten(), c.flatten()), dim=-1)
    if num_special == 0:
        return patches
    special = torch.zeros(num_special, 2, dtype=patches.dtype, device=device)
    return torch.cat((special, patches + 1), dim=0)


ATTENTION_BACKEND = os.environ.get("VIST3A_ATTENTION", "sdpa")  # "sdpa" | "triton" (CUDA only)


def _use_triton(x: Tensor) -> bool:
    if ATTENTION_BACKEND not in ("sdpa", "triton"):
        raise ValueError(f"attention backend (VIST3A_ATTENTION) must be 'sdpa' or 'triton', "
                         f"got {ATTENTION_BACKEND!r}")
    return ATTENTION_BACKEND == "triton" and x.is_cuda


def _triton_attention(q: Tensor, k: Tensor, v: Tensor,  # [B, heads, N, head_dim]
                      rope: RotaryPositionEmbedding2D | None, pos: Tensor | None,  # [B, N, 2]
                      ) -> Tensor:  # [B, heads, N, head_dim]
    """SDPA with RoPE on q and k, as one Triton flash-attention call (the rotation is fused)."""
    from vist3a_rt.kernels.triton_attention import Rope, flash_attention

    fused = None if rope is None else Rope.axial_2d(pos, q.shape[-1], base=rope.frequency)
    return flash_attention(q, k, v, rope=fused)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, optional q/k LayerNorm and RoPE."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_bias: bool = True,
                 qk_norm: bool = False, qk_norm_eps: float = 1e-5,
                 rope: RotaryPositionEmbedding2D | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=qk_norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=qk_norm_eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.rope = rope

    def forward(self, x: Tensor,  # [B, N, dim]
                pos: Tensor | None = None,  # [B, N, 2], used only with RoPE
                ) -> Tensor:  # [B, N, dim]
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, N, head_dim] each
        q, k = self.q_norm(q), self.k_norm(k)
        if _use_triton(x):
            x = _triton_attention(q, k, v, self.rope, pos)
        else:
            if self.rope is not None:
                q, k = self.rope(q, pos), self.rope(k, pos)
            x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale on both residual branches."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, init_values: float = 1.0,
                 norm_eps: float = 1e-5, qk_norm: bool = False,
                 rope: RotaryPositionEmbedding2D | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias,
                              qk_norm=qk_norm, rope=rope)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x: Tensor,  # [B, N, dim]
                pos: Tensor | None = None,  # [B, N, 2]
                ) -> Tensor:  # [B, N, dim]
        x = x + self.ls1(self.attn(self.norm1(x), pos=pos))
        return x + self.ls2(self.mlp(self.norm2(x)))
