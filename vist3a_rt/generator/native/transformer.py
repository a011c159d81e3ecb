"""The Wan 2.1 text-to-video denoiser in plain torch, for inference.

Computes what diffusers' ``WanTransformer3DModel`` computes for text-to-video, with the same
module names, so a diffusers-layout ``transformer/`` folder (``config.json`` + safetensors) loads
into it unchanged (``native.loading``). Diffusers stays the reference (tests compare the two) and
the class training uses; this one exists so that inference does not import diffusers.

The forward, for latents [B, C, T, H, W], a timestep per sample and text embeddings [B, L, D_txt]:

1. patchify: a Conv3d with kernel = stride = ``patch_size`` → tokens [B, N, D], N = T'·H'·W';
2. condition: sinusoidal timestep features (cos first) → MLP ``temb`` [B, D] (kept in float32
   weights, like diffusers) → ``time_proj`` → six modulation vectors per block; text → MLP [B, L, D]
   → each block's cross-attention keys and values (``text_context``: a sampler computes them once
   per prompt and reuses them at every step — same numbers, a fraction of the step's work);
3. blocks: AdaLN-modulated self-attention with RMS qk-norm over all heads and Wan's 3D RoPE,
   cross-attention to the text (no mask: the padded text rows are zeros), a tanh-GELU FFN, each
   residual gated;
4. output: AdaLN with the model's own table, a linear to C·pt·ph·pw, unpatchify to [B, C, T, H, W].

The dtype flow follows diffusers step for step: normalisations and modulations run in float32
and are rounded to the activation dtype where diffusers rounds them, so bfloat16 runs agree to
bfloat16 rounding. Image-to-video configs (``image_dim``, ``added_kv_proj_dim``,
``pos_embed_seq_len``) and per-token timesteps (Wan 2.2) are refused, not approximated.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError, Vist3AInputError

ROPE_THETA = 10000.0
TIMESTEP_MAX_PERIOD = 10000
_IMAGE_TO_VIDEO_KEYS = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
_QK_NORMS = ("rms_norm_across_heads",)


@dataclass(frozen=True)
class WanTransformerConfig:
    """``transformer/config.json`` of a diffusers-layout Wan folder (defaults: diffusers' own)."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str = "rms_norm_across_heads"
    eps: float = 1e-6
    rope_max_seq_len: int = 1024

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, raw: dict) -> WanTransformerConfig:
        """Keys starting with ``_`` (diffusers' bookkeeping) are ignored; unknown keys and
        image-to-video options are a ``ConfigError``."""
        values = {k: v for k, v in raw.items() if not k.startswith("_")}
        needs_image = sorted(k for k in _IMAGE_TO_VIDEO_KEYS if values.pop(k, None) is not None)
        if needs_image:
            raise ConfigError(f"the transformer config sets {needs_image}: an image-to-video Wan model, which the "
                              "native implementation does not run (load it with impl='diffusers')")
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown Wan transformer config keys {unknown}")
        if values.get("out_channels") is None:
            values["out_channels"] = values.get("in_channels", cls.in_channels)
        if "patch_size" in values:
            values["patch_size"] = tuple(values["patch_size"])
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        if len(self.patch_size) != 3 or any(not isinstance(p, int) or p < 1 for p in self.patch_size):
            raise ConfigError(f"patch_size must be three positive integers, got {list(self.patch_size)}")
        if self.qk_norm not in _QK_NORMS:
            raise ConfigError(f"qk_norm {self.qk_norm!r} is not supported by the native Wan transformer "
                              f"(supported: {list(_QK_NORMS)})")
        if self.attention_head_dim % 2 or self.attention_head_dim < 6:
            raise ConfigError(f"attention_head_dim must be even and >= 6 for Wan's 3D RoPE, "
                              f"got {self.attention_head_dim}")
        for name in ("num_attention_heads", "in_channels", "out_channels", "text_dim", "freq_dim", "ffn_dim",
                     "num_layers", "rope_max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")


class TransformerOutput(NamedTuple):
    sample: Tensor  # [B, C, T, H, W]


class TextContext(NamedTuple):
    """The text's cross-attention keys and values of every block, each [B, heads, L, head_dim].

    They depend on the text alone, so a sampler computes them once (``WanTransformer.text_context``)
    and passes them as ``encoder_hidden_states`` at every step: the same numbers as recomputing
    them, without the text projections that dominate a small model's step (512 text tokens)."""

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype


# --- positions and conditioning ---------------------------------------------------------------------


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels per axis (frames, rows, columns): rows and columns get 2·(D // 6) each, frames the rest."""
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def rope_angles(grid: tuple[int, int, int], head_dim: int,
                device: torch.device) -> tuple[Tensor, Tensor]:  # ([N, D/2], [N, D/2]) float32
    """cos and sin of the rotation of each channel pair (2i, 2i+1) at each token of a
    (frames, rows, cols) grid, tokens in frame-major order. Angles are position × θ^(−2i/d_axis)
    per axis, computed in float64 and rounded once, as diffusers builds its tables."""
    tables = []
    for size, dim, shape in zip(grid, rope_axis_dims(head_dim), ((-1, 1, 1), (1, -1, 1), (1, 1, -1))):
        inverse = 1.0 / ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
        angle = torch.outer(torch.arange(size, dtype=torch.float64, device=device), inverse)  # [size, dim/2]
        tables.append(angle.view(*shape, dim // 2).expand(*grid, dim // 2))
    angles = torch.cat(tables, dim=-1).reshape(math.prod(grid), head_dim // 2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor,  # [B, N, H, D]
               cos: Tensor, sin: Tensor) -> Tensor:  # [N, D/2] each
    """Rotate each interleaved channel pair (x[2i], x[2i+1]) by its angle; float32 math, rounded to x's dtype."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)  # [B, N, H, D/2]
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def timestep_features(timestep: Tensor, dim: int) -> Tensor:  # [B] -> [B, dim] float32
    """Sinusoidal features [cos | sin] of ``timestep`` at frequencies 10000^(−i/(dim/2))."""
    half = dim // 2
    frequencies = torch.exp(-math.log(TIMESTEP_MAX_PERIOD) *
                            torch.arange(half, dtype=torch.float32, device=timestep.device) / half)
    args = timestep[:, None].float() * frequencies[None, :]
    features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(features, (0, dim % 2))


class MLP(nn.Module):
    """linear_1 → activation → linear_2 (diffusers' TimestepEmbedding / PixArtAlphaTextProjection names)."""

    def __init__(self, in_dim: int, dim: int, activation: nn.Module) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = activation
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ConditionEmbedder(nn.Module):
    """Timestep → (temb, per-block modulation); text → tokens of the model's width (``text_embedder``)."""

    def __init__(self, config: WanTransformerConfig) -> None:
        super().__init__()
        dim = config.inner_dim
        self.freq_dim = config.freq_dim
        self.time_embedder = MLP(config.freq_dim, dim, nn.SiLU())
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = MLP(config.text_dim, dim, nn.GELU(approximate="tanh"))

    def forward(self, timestep: Tensor,  # [B]
                dtype: torch.dtype) -> tuple[Tensor, Tensor]:  # the projected text's dtype
        """(temb [B, D], block modulation [B, 6, D])."""
        features = timestep_features(timestep, self.freq_dim)
        temb = self.time_embedder(features.to(self.time_embedder.linear_1.weight.dtype)).to(dtype)
        return temb, self.time_proj(F.silu(temb)).unflatten(1, (6, -1))


# --- blocks ------------------------------------------------------------------------------------------


def layer_norm_fp32(x: Tensor, eps: float, norm: nn.LayerNorm | None = None) -> Tensor:
    """LayerNorm over the last dim in float32 (affine with ``norm``'s parameters when given)."""
    weight = bias = None
    if norm is not None:
        weight, bias = norm.weight.float(), norm.bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), weight, bias, eps)


class Attention(nn.Module):
    """Multi-head attention with RMS-normalised q and k (over all heads together); RoPE when given."""

    def __init__(self, dim: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # diffusers' index 1 is a dropout: not stored
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    def keys_values(self, context: Tensor,  # [B, L, D]
                    rope: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:  # [B, H, L, Dh] each
        k = self.norm_k(self.to_k(context)).unflatten(2, (self.heads, -1))
        if rope is not None:
            k = apply_rope(k, *rope)
        return k.transpose(1, 2), self.to_v(context).unflatten(2, (self.heads, -1)).transpose(1, 2)

    def forward(self, x: Tensor,  # [B, N, D]
                keys_values: tuple[Tensor, Tensor] | None = None,  # cross-attention: the context's
                rope: tuple[Tensor, Tensor] | None = None) -> Tensor:  # self-attention: RoPE on q and k
        q = self.norm_q(self.to_q(x)).unflatten(2, (self.heads, -1))  # [B, N, H, Dh]
        if rope is not None:
            q = apply_rope(q, *rope)
        k, v = self.keys_values(x, rope) if keys_values is None else keys_values
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v)
        return self.to_out[0](out.transpose(1, 2).flatten(2).type_as(q))


class FeedForward(nn.Module):
    """Linear → tanh-GELU → linear, under diffusers' names ``net.0.proj`` and ``net.2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        projection = nn.Module()
        projection.proj = nn.Linear(dim, hidden)
        self.net = nn.ModuleList([projection, nn.Identity(), nn.Linear(hidden, dim)])  # [1]: diffusers' dropout

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


class WanBlock(nn.Module):
    def __init__(self, config: WanTransformerConfig) -> None:
        super().__init__()
        dim, heads, self.eps = config.inner_dim, config.num_attention_heads, config.eps
        self.attn1 = Attention(dim, heads, config.eps)
        self.attn2 = Attention(dim, heads, config.eps)
        self.norm2 = nn.LayerNorm(dim, eps=config.eps) if config.cross_attn_norm else None
        self.ffn = FeedForward(dim, config.ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.empty(1, 6, dim))

    def forward(self, x: Tensor,  # [B, N, D]
                text: tuple[Tensor, Tensor],  # this block's text keys and values, [B, H, L, Dh] each
                modulation: Tensor,  # [B, 6, D]
                rope: tuple[Tensor, Tensor]) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.scale_shift_table + modulation.float()).chunk(6, dim=1)
        # 1. self-attention on AdaLN-modulated tokens, gated residual
        h = (layer_norm_fp32(x, self.eps) * (1 + scale1) + shift1).type_as(x)
        x = (x.float() + self.attn1(h, rope=rope) * gate1).type_as(x)
        # 2. cross-attention to the text
        h = layer_norm_fp32(x, self.eps, self.norm2).type_as(x) if self.norm2 is not None else x
        x = x + self.attn2(h, keys_values=text)
        # 3. feed-forward on modulated tokens, gated residual
        h = (layer_norm_fp32(x, self.eps) * (1 + scale2) + shift2).type_as(x)
        return (x.float() + self.ffn(h).float() * gate2).type_as(x)


# --- the model ----------------------------------------------------------------------------------------


class WanTransformer(nn.Module):
    """Wan 2.1 text-to-video denoiser: ``model(hidden_states, timestep, encoder_hidden_states)``."""

    # parameters diffusers keeps in float32 whatever the load dtype (matched per dotted name component)
    keep_in_float32 = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")

    def __init__(self, config: WanTransformerConfig) -> None:
        super().__init__()
        self.config = config
        dim, patch = config.inner_dim, config.patch_size
        self.patch_embedding = nn.Conv3d(config.in_channels, dim, kernel_size=patch, stride=patch)
        self.condition_embedder = ConditionEmbedder(config)
        self.blocks = nn.ModuleList([WanBlock(config) for _ in range(config.num_layers)])
        self.proj_out = nn.Linear(dim, config.out_channels * math.prod(patch))
        self.scale_shift_table = nn.Parameter(torch.empty(1, 2, dim))
        self._rope_cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def text_context(self, encoder_hidden_states: Tensor) -> TextContext:  # [B, L, text_dim]
        """The text projected to the model's width, then to every block's cross-attention keys and values."""
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != self.config.text_dim:
            raise Vist3AInputError(f"encoder_hidden_states must be [B, L, {self.config.text_dim}], "
                                   f"got {list(encoder_hidden_states.shape)}")
        text = self.condition_embedder.text_embedder(encoder_hidden_states)
        pairs = [block.attn2.keys_values(text) for block in self.blocks]
        return TextContext(tuple(k for k, _ in pairs), tuple(v for _, v in pairs))

    def forward(self, hidden_states: Tensor,  # [B, C, T, H, W]
                timestep: Tensor,  # [B] (integer or float timesteps in [0, 1000])
                encoder_hidden_states: Tensor | TextContext,  # [B, L, text_dim], or its text_context()
                return_dict: bool = True) -> TransformerOutput | tuple[Tensor]:
        """The flow (velocity) prediction [B, out_channels, T, H, W]; ``return_dict`` as in diffusers."""
        grid = self._grid(hidden_states, timestep)
        rope = self._rope(grid, hidden_states.device)
        # 1. text keys / values of every block (unless the caller computed them once for all steps)
        text = encoder_hidden_states
        if not isinstance(text, TextContext):
            text = self.text_context(text)
        if text.batch != hidden_states.shape[0]:
            raise Vist3AInputError(f"text batch {text.batch} does not match hidden_states batch "
                                   f"{hidden_states.shape[0]}")
        # 2. patchify; timestep conditioning
        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()  # [B, N, D]
        temb, modulation = self.condition_embedder(timestep, text.dtype)
        # 3. blocks
        for block, keys, values in zip(self.blocks, text.keys, text.values):
            x = block(x, (keys, values), modulation, rope)
        # 4. output modulation, projection, unpatchify
        shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (layer_norm_fp32(x, self.config.eps) * (1 + scale) + shift).type_as(x)
        out = self._unpatchify(self.proj_out(x), grid)
        return TransformerOutput(out) if return_dict else (out,)

    def _grid(self, hidden_states: Tensor, timestep: Tensor) -> tuple[int, int, int]:
        config = self.config
        if hidden_states.ndim != 5 or hidden_states.shape[1] != config.in_channels:
            raise Vist3AInputError(f"hidden_states must be [B, {config.in_channels}, T, H, W], "
                                   f"got {list(hidden_states.shape)}")
        if timestep.ndim != 1 or timestep.shape[0] != hidden_states.shape[0]:
            raise Vist3AInputError(f"timestep must be [B] = [{hidden_states.shape[0]}] (per-token timesteps are "
                                   f"not supported), got {list(timestep.shape)}")
        sizes = hidden_states.shape[2:]
        if any(s % p for s, p in zip(sizes, config.patch_size)):
            raise Vist3AInputError(f"latent size {list(sizes)} is not a multiple of patch_size {list(config.patch_size)}")
        grid = tuple(s // p for s, p in zip(sizes, config.patch_size))
        if max(grid) > config.rope_max_seq_len:
            raise Vist3AInputError(f"token grid {list(grid)} exceeds rope_max_seq_len {config.rope_max_seq_len}")
        return grid

    def _rope(self, grid: tuple[int, int, int], device: torch.device) -> tuple[Tensor, Tensor]:
        key = (grid, str(device))
        if key not in self._rope_cache:
            self._rope_cache.clear()  # one grid at a time is the common case; keep the cache tiny
            self._rope_cache[key] = rope_angles(grid, self.config.attention_head_dim, device)
        return self._rope_cache[key]

    def _unpatchify(self, x: Tensor,  # [B, N, C·pt·ph·pw]
                    grid: tuple[int, int, int]) -> Tensor:  # [B, C, T, H, W]
        (pt, ph, pw), (t, h, w) = self.config.patch_size, grid
        x = x.reshape(x.shape[0], t, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], x.shape[1], t * pt, h * ph, w * pw)
