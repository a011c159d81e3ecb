"""The denoiser as two graphs: its text context once per prompt, then the step (50× per prompt).

Every denoising step of the Wan transformer recomputes, from the same text embeddings, the
text projection (``condition_embedder.text_embedder``) and each block's cross-attention keys
and values. They do not depend on the latents or the timestep, so the split moves them into a
graph run once per prompt:

``denoiser_context``  encoder_hidden_states [batch, keys, D_text] → context [batch, keys, 2·layers·D]
                      (per block i: channels [2iD, (2i+1)D) the RMS-normed keys, the next D the values)
``denoiser``          latents, timestep, context, context_log_counts [keys] → velocity: the
                      transformer's own forward, with the text embedder an identity and each
                      block's cross-attention reading its keys and values from ``context``.

The runtime feeds the context graph only the text positions that matter and gives the step
one log count per position (``vist3a_rt.bundle.context``: all padded positions of a prompt
share one key and value, so one of them with log(count) added to its score stands for all),
which makes the nano model's cross-attention ~6× cheaper with the same result up to float
rounding (the agreement tests bound it).

Both modules are built on diffusers' ``WanTransformer3DModel`` (what ``vist3a-rt export`` loads):
``DenoiserContext`` uses its ``condition_embedder.text_embedder`` and each block's
``attn2.{to_k,norm_k,to_v}``; ``DenoiserStep`` runs its own forward with the text embedder an
identity and each block's ``attn2`` reading keys and values from the context. The runtime's
native transformer computes its text context itself (``text_context``) and is refused here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def context_width(transformer: nn.Module) -> int:
    """Channels of the context: keys and values of every block's cross-attention."""
    return 2 * len(transformer.blocks) * _inner_dim(transformer)


def _inner_dim(transformer: nn.Module) -> int:
    config = transformer.config
    return config.num_attention_heads * config.attention_head_dim


def _check_library_transformer(transformer: nn.Module) -> None:
    from .spec import ExportUnsupportedError

    if hasattr(transformer, "text_context"):
        raise ExportUnsupportedError(
            f"the split denoiser is built on diffusers' WanTransformer3DModel, not {type(transformer).__name__}: "
            "load the model with wan_impl='diffusers' to export it")


class DenoiserContext(nn.Module):
    """encoder_hidden_states [B, L, D_text] → context [B, L, 2·layers·D] (keys, values per block)."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        _check_library_transformer(transformer)
        self.transformer = transformer

    def forward(self, encoder_hidden_states: Tensor) -> Tensor:
        transformer = self.transformer
        text = transformer.condition_embedder.text_embedder(encoder_hidden_states)
        parts = []
        for block in transformer.blocks:
            attention = block.attn2
            parts += [attention.norm_k(attention.to_k(text)), attention.to_v(text)]
        return torch.cat(parts, dim=-1)


class DenoiserStep(nn.Module):
    """latents [B, C, T, h, w], timestep [B], context [B, K, 2·layers·D], context_log_counts [K]
    → velocity [B, C, T, h, w]: the transformer's forward on a precomputed context."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        _check_library_transformer(transformer)
        self.transformer = transformer

    def forward(self, latents: Tensor, timestep: Tensor, context: Tensor, context_log_counts: Tensor) -> Tensor:
        with _cross_attention_on_context(self.transformer, context_log_counts):
            return self.transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=context,
                                    return_dict=False)[0]


class _ContextCrossAttention(nn.Module):
    """Block ``index``'s cross-attention with its keys and values read from the context."""

    def __init__(self, attention: nn.Module, index: int, dim: int, log_counts: Tensor) -> None:
        super().__init__()
        self.attention, self.index, self.dim, self.log_counts = attention, index, dim, log_counts

    def forward(self, hidden_states: Tensor, cached: Tensor, *unused) -> Tensor:  # as diffusers' blocks call it
        attention, start, heads = self.attention, 2 * self.index * self.dim, self.attention.heads
        query = attention.norm_q(attention.to_q(hidden_states)).unflatten(2, (heads, -1)).transpose(1, 2)
        key = cached[..., start:start + self.dim].unflatten(2, (heads, -1)).transpose(1, 2)
        value = cached[..., start + self.dim:start + 2 * self.dim].unflatten(2, (heads, -1)).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=self.log_counts.to(query.dtype)[None, :])
        return attention.to_out[0](out.transpose(1, 2).flatten(2).type_as(query))


@contextlib.contextmanager
def _cross_attention_on_context(transformer: nn.Module, log_counts: Tensor) -> Iterator[None]:
    """While inside: the text embedder is an identity and each block's cross-attention a
    ``_ContextCrossAttention`` (the original modules are put back on exit)."""
    embedder = transformer.condition_embedder
    saved = embedder.text_embedder, [block.attn2 for block in transformer.blocks]
    dim = _inner_dim(transformer)
    try:
        embedder.text_embedder = nn.Identity()
        for index, block in enumerate(transformer.blocks):
            block.attn2 = _ContextCrossAttention(saved[1][index], index, dim, log_counts)
        yield
    finally:
        embedder.text_embedder = saved[0]
        for block, attention in zip(transformer.blocks, saved[1]):
            block.attn2 = attention


# --- export contracts ----------------------------------------------------------------------------


def denoiser_context_stage(transformer: nn.Module, *, text_tokens: int = 512, profile=None):
    """``DenoiserContext``: text embeddings (trimmed: 1..``text_tokens`` positions) → context."""
    from .contracts import _profile
    from .spec import Axis, ExportContract, ExportStage, Profile, TensorSpec

    keys = Axis("text_keys")
    contract = ExportContract(
        "denoiser_context",
        inputs=(TensorSpec("encoder_hidden_states", (Axis("batch"), keys, transformer.config.text_dim)),),
        outputs=(TensorSpec("context", (Axis("batch"), keys, context_width(transformer))),),
        profile=_profile(Profile({"batch": 1, "text_keys": 1}, {"batch": 2, "text_keys": min(128, text_tokens)},
                                 {"batch": 8, "text_keys": text_tokens}), profile, "denoiser_context"),
        notes="per block: cross-attention keys (RMS-normed) then values, each inner_dim channels")
    return ExportStage(contract, DenoiserContext(transformer))


def denoiser_step_stage(transformer: nn.Module, *, latent_frames: int, latent_height: int, latent_width: int,
                        text_tokens: int = 512, static_latents: bool = False, profile=None):
    """``DenoiserStep``: the denoiser's ``latents``/``timestep`` axes (``contracts.denoiser_stage``)
    plus the context and its log counts, ``text_keys`` positions (1..``text_tokens``).

    ``static_latents``: the latent frames and size fixed at the given ones (batch and text_keys
    stay dynamic), so the exported graph computes no shapes at run time (RoPE tables and
    (un)patchify folded into constants).
    """
    from .contracts import _profile, denoiser_stage
    from .spec import Axis, ExportContract, ExportStage, Profile, TensorSpec

    full = denoiser_stage(transformer, latent_frames=latent_frames, latent_height=latent_height,
                          latent_width=latent_width, text_tokens=text_tokens).contract
    points = {point: full.profile.sizes(point) for point in ("min", "opt", "max")}
    if static_latents:
        points = {point: {**points["opt"], "batch": sizes["batch"]} for point, sizes in points.items()}
    keys = Axis("text_keys")
    for point, count in (("min", 1), ("opt", min(128, text_tokens)), ("max", text_tokens)):
        points[point]["text_keys"] = count
    contract = ExportContract(
        "denoiser",
        inputs=(*full.inputs[:2],
                TensorSpec("context", (Axis("batch"), keys, context_width(transformer))),
                TensorSpec("context_log_counts", (keys,), values="uniform", low=0.0, high=1.0)),
        outputs=full.outputs,
        profile=_profile(Profile(points["min"], points["opt"], points["max"]), profile, "denoiser"),
        notes="batch is 2B with classifier-free guidance: rows [cond; uncond]; context from denoiser_context, "
              "context_log_counts: log of how many text positions each context position stands for")
    return ExportStage(contract, DenoiserStep(transformer))
