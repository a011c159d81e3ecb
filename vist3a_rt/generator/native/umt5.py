"""The UMT5 text encoder in plain torch, for inference (Wan 2.1's ``text_encoder/``).

Computes ``transformers.UMT5EncoderModel(ids, mask).last_hidden_state`` with the same parameter
names, so the ``text_encoder/`` folder of a diffusers-layout Wan model loads into it unchanged.

T5 v1.1 as UMT5 uses it, for token ids [B, L] and a 0/1 attention mask [B, L]:

* embeddings from ``shared`` (``encoder.embed_tokens`` is the same table);
* each of ``num_layers`` blocks: RMS LayerNorm (no mean, no bias; variance in float32) →
  self-attention with *unscaled* dot products plus a learned relative position bias that every
  layer holds for itself (UMT5; T5 shares the first layer's), padded keys masked → residual;
  RMS LayerNorm → FFN (gated: ``act(wi_0 x) · wi_1 x``, then ``wo``) → residual;
* a final RMS LayerNorm.

The relative position bias buckets key − query offsets: bidirectionally, half the buckets per
sign; within each half, offsets below a quarter of the buckets map one to one, larger ones
logarithmically up to ``relative_attention_max_distance``, beyond which they share the last bucket.
Decoder configs and the float16-only tricks of transformers (clamping, ``wo`` in float32) are not
reproduced; the runtime runs the encoder in float32 or bfloat16.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError, Vist3AInputError


def _gelu_tanh_formula(x: Tensor) -> Tensor:
    """tanh-approximated GELU written out, as transformers' "gelu_new" computes it."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {
    "gelu_new": _gelu_tanh_formula,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass(frozen=True)
class UMT5Config:
    """The fields of ``text_encoder/config.json`` the encoder uses (defaults: transformers' UMT5Config)."""

    vocab_size: int = 250112
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 8
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """transformers' rule: "gated-gelu" means the tanh formula ("gelu_new"), else the name after "gated-"."""
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

    @classmethod
    def from_dict(cls, raw: dict) -> UMT5Config:
        """The encoder's fields of a transformers config; the rest (decoder sizes, token ids,
        dropout, ``dense_act_fn``, which transformers re-derives from ``feed_forward_proj``) is ignored."""
        model_type = raw.get("model_type", "umt5")
        if model_type != "umt5":
            raise ConfigError(f"text encoder config has model_type {model_type!r}; the native encoder runs 'umt5'")
        if raw.get("is_decoder"):
            raise ConfigError("text encoder config says is_decoder: the native encoder runs encoder stacks only")
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in raw.items() if k in names})
        config.check()
        return config

    def check(self) -> None:
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or self.activation not in ACTIVATIONS:
            raise ConfigError(f"feed_forward_proj {self.feed_forward_proj!r} is not supported (use '<act>' or "
                              f"'gated-<act>' with act in {sorted(ACTIVATIONS)}, or 'gated-gelu')")
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.relative_attention_num_buckets < 4:
            raise ConfigError("relative_attention_num_buckets must be >= 4 (two signs, exact and log ranges)")


class EncoderOutput(NamedTuple):
    last_hidden_state: Tensor  # [B, L, d_model]


def relative_position_buckets(length: int, num_buckets: int, max_distance: int,
                              device: torch.device) -> Tensor:  # [L, L] int64
    """Bucket of each (query i, key j) offset j − i for a bidirectional encoder (see module docstring)."""
    positions = torch.arange(length, dtype=torch.long, device=device)
    offset = positions[None, :] - positions[:, None]
    half = num_buckets // 2
    bucket = (offset > 0).long() * half
    distance = offset.abs()
    exact = half // 2
    # log-spaced buckets for distances in [exact, max_distance); clamp(min=1) only avoids log(0),
    # those entries take the exact branch below
    scaled = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (half - exact)
    far = (exact + scaled.long()).clamp(max=half - 1)
    return bucket + torch.where(distance < exact, distance, far)


def _embedding(count: int, dim: int) -> nn.Embedding:
    """An uninitialised table (weights come from the checkpoint). Passing the storage skips the
    normal_ init, which on the meta device would import torch._dynamo: seconds of cold start."""
    return nn.Embedding(count, dim, _weight=torch.empty(count, dim))


class RMSLayerNorm(nn.Module):
    """T5's LayerNorm: x / rms(x) · weight, no mean, no bias; the variance in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class SelfAttention(nn.Module):
    def __init__(self, config: UMT5Config) -> None:
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.heads = config.num_heads
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        self.relative_attention_bias = _embedding(self.num_buckets, self.heads)

    def forward(self, x: Tensor,  # [B, L, d_model]
                key_padding: Tensor) -> Tensor:  # [B, 1, 1, L] bool, True where the key is padding
        B, L, _ = x.shape
        q, k, v = (proj(x).view(B, L, self.heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        buckets = relative_position_buckets(L, self.num_buckets, self.max_distance, x.device)
        bias = self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # [1, H, L, L]
        bias = bias.masked_fill(key_padding, torch.finfo(bias.dtype).min)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # T5: unscaled
        return self.o(out.transpose(1, 2).reshape(B, L, -1))


class FeedForward(nn.Module):
    """``wo(act(wi_0 x) · wi_1 x)`` (gated) or ``wo(act(wi x))``, under transformers' names."""

    def __init__(self, config: UMT5Config) -> None:
        super().__init__()
        self.gated = config.is_gated
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(h.to(self.wo.weight.dtype))


class _AttentionLayer(nn.Module):
    def __init__(self, config: UMT5Config) -> None:
        super().__init__()
        self.SelfAttention = SelfAttention(config)  # transformers' parameter name
        self.layer_norm = RMSLayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: Tensor, key_padding: Tensor) -> Tensor:
        return x + self.SelfAttention(self.layer_norm(x), key_padding)


class _FeedForwardLayer(nn.Module):
    def __init__(self, config: UMT5Config) -> None:
        super().__init__()
        self.DenseReluDense = FeedForward(config)  # transformers' parameter name
        self.layer_norm = RMSLayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class UMT5Block(nn.Module):
    def __init__(self, config: UMT5Config) -> None:
        super().__init__()
        self.layer = nn.ModuleList([_AttentionLayer(config), _FeedForwardLayer(config)])

    def forward(self, x: Tensor, key_padding: Tensor) -> Tensor:
        return self.layer[1](self.layer[0](x, key_padding))


class _Stack(nn.Module):
    def __init__(self, config: UMT5Config, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens  # the model's `shared` table, registered under both names
        self.block = nn.ModuleList([UMT5Block(config) for _ in range(config.num_layers)])
        self.final_layer_norm = RMSLayerNorm(config.d_model, config.layer_norm_epsilon)


class UMT5Encoder(nn.Module):
    """``encoder(input_ids, attention_mask).last_hidden_state`` [B, L, d_model]."""

    tied_weights: ClassVar[dict[str, str]] = {"encoder.embed_tokens.weight": "shared.weight"}  # one tensor, two names

    def __init__(self, config: UMT5Config) -> None:
        super().__init__()
        self.config = config
        self.shared = _embedding(config.vocab_size, config.d_model)
        self.encoder = _Stack(config, self.shared)

    @property
    def dtype(self) -> torch.dtype:
        return self.shared.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.shared.weight.device

    def forward(self, input_ids: Tensor,  # [B, L] int64
                attention_mask: Tensor | None = None) -> EncoderOutput:  # [B, L] 1 = real token, 0 = padding
        if input_ids.ndim != 2:
            raise Vist3AInputError(f"input_ids must be [batch, tokens], got {list(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise Vist3AInputError(f"attention_mask {list(attention_mask.shape)} does not match input_ids "
                                   f"{list(input_ids.shape)}")
        key_padding = (attention_mask == 0)[:, None, None, :]  # [B, 1, 1, L]
        x = self.shared(input_ids)
        for block in self.encoder.block:
            x = block(x, key_padding)
        return EncoderOutput(self.encoder.final_layer_norm(x))
