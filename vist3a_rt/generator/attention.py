"""Wan's denoiser attention on the Triton flash-attention kernel (``VIST3A_ATTENTION=triton``).

``use_triton_attention(transformer)`` swaps diffusers' ``WanAttnProcessor`` (SDPA through
``dispatch_attention_fn``) for ``WanTritonAttnProcessor`` in every ``WanAttention`` of a
``WanTransformer3DModel`` when asked to (the argument, else the environment variable the
decoder reads too) and able to (model on CUDA, triton importable, head dim <= 128); otherwise
it leaves or restores the default processors. It returns which one is active and why.

What the processor computes is diffusers' processor, term for term:

* projections ``to_q / to_k / to_v`` (or the fused ``to_qkv`` / ``to_kv``), then the qk norm
  (RMSNorm over all heads together, before splitting into heads), in torch;
* self-attention (``attn1``): Wan's 3D RoPE on q and k -- complex multiplication of the
  interleaved channel pairs ``(2i, 2i+1)`` by ``exp(i * pos * freq)``, the head dim split into
  frame / row / column sections of ``D - 4 (D // 6)``, ``2 (D // 6)``, ``2 (D // 6)`` channels,
  theta 10000. That is the convention of the kernel's ``Rope.wan_3d``, so the rotation is fused
  into the kernel (q in its prologue, k in one pass before it; angles in float32 from token
  positions). The positions come with the rotary tables: a forward hook on the transformer's
  ``rope`` module tags its ``(cos, sin)`` output with the ``Rope`` of the same (frames, rows,
  cols) grid. Tables that arrive untagged (a block called on its own) are applied in torch,
  with diffusers' formula, before a plain kernel call;
* cross-attention (``attn2``): text tokens as keys, no mask -- diffusers passes
  ``attention_mask=None`` to both attentions, and the pipeline zeroes the text embedding past
  the prompt instead (``text.py``), so the padded tokens are attended to, as in the official
  model. The I2V image-context branch (``add_k_proj``: the image tokens that precede the 512
  text tokens) is a second unmasked call whose output is added, as in diffusers.

Numerics: the kernel keeps softmax statistics and accumulators in float32 and rounds the
rotated q / k to the input dtype like diffusers does; in float32 the denoiser's output matches
SDPA to ~1e-6 (tests/test_wan_triton_attention.py). No attention mask other than None is
accepted (Wan never passes one).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import ConfigError

if TYPE_CHECKING:
    from diffusers import WanTransformer3DModel

ENV_VARIABLE = "VIST3A_ATTENTION"  # "sdpa" | "triton": the decoder's switch too
MAX_HEAD_DIM = 128  # the kernels' tuned range (the official models use 128)
TEXT_CONTEXT_LENGTH = 512  # diffusers' I2V split: image tokens, then this many text tokens


@dataclass(frozen=True)
class AttentionChoice:
    """Which attention a transformer runs, and why."""

    backend: str  # "triton" | "sdpa"
    reason: str


class WanTritonAttnProcessor:
    """Drop-in for diffusers' ``WanAttnProcessor``: the same maths, the Triton kernel inside."""

    def __call__(self, attn, hidden_states: Tensor,  # [B, N, dim]
                 encoder_hidden_states: Tensor | None = None,  # [B, L, dim] (cross-attention)
                 attention_mask: Tensor | None = None,
                 rotary_emb: tuple[Tensor, Tensor] | None = None,  # ([1, N, 1, D] cos, sin)
                 ) -> Tensor:  # [B, N, dim]
        from vist3a_rt.kernels.triton_attention import flash_attention

        if attention_mask is not None:
            raise ValueError("WanTritonAttnProcessor takes no attention mask (Wan passes none); "
                             f"got one of shape {list(attention_mask.shape)}")
        image_context = None
        if attn.add_k_proj is not None:  # I2V
            split = encoder_hidden_states.shape[1] - TEXT_CONTEXT_LENGTH
            image_context = encoder_hidden_states[:, :split]
            encoder_hidden_states = encoder_hidden_states[:, split:]
        q, k, v = _projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = (_split_heads(t, attn.heads) for t in (attn.norm_q(q), attn.norm_k(k), v))
        out = _self_or_cross_attention(q, k, v, rotary_emb)
        if image_context is not None:
            k_img, v_img = _image_projections(attn, image_context)
            k_img, v_img = (_split_heads(t, attn.heads) for t in (attn.norm_added_k(k_img), v_img))
            out = out + flash_attention(q, k_img, v_img)
        out = out.transpose(1, 2).flatten(2)
        return attn.to_out[1](attn.to_out[0](out))


def _projections(attn, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """q from x; k, v from the context (cross-attention) or x; fused Linears when fused."""
    source = x if context is None else context
    if not getattr(attn, "fused_projections", False):
        return attn.to_q(x), attn.to_k(source), attn.to_v(source)
    if not attn.is_cross_attention:
        return attn.to_qkv(x).chunk(3, dim=-1)
    return (attn.to_q(x), *attn.to_kv(source).chunk(2, dim=-1))


def _image_projections(attn, image_context: Tensor) -> tuple[Tensor, Tensor]:
    if getattr(attn, "fused_projections", False):
        return attn.to_added_kv(image_context).chunk(2, dim=-1)
    return attn.add_k_proj(image_context), attn.add_v_proj(image_context)


def _split_heads(x: Tensor,  # [B, N, heads * D]
                 heads: int) -> Tensor:  # [B, heads, N, D], a view
    return x.unflatten(2, (heads, -1)).transpose(1, 2)


def _self_or_cross_attention(q: Tensor, k: Tensor, v: Tensor,  # [B, H, N, D]
                             rotary_emb: tuple[Tensor, Tensor] | None) -> Tensor:
    from vist3a_rt.kernels.triton_attention import flash_attention

    if rotary_emb is None:
        return flash_attention(q, k, v)
    rope = getattr(rotary_emb, "rope", None)
    if rope is not None and rope.positions.shape[1] == q.shape[2]:
        return flash_attention(q, k, v, rope=rope)
    cos, sin = rotary_emb
    return flash_attention(rotate_like_diffusers(q, cos, sin), rotate_like_diffusers(k, cos, sin), v)


def rotate_like_diffusers(x: Tensor,  # [B, H, N, D]
                          cos: Tensor, sin: Tensor,  # [1, N, 1, D] float32, each value twice per pair
                          ) -> Tensor:  # [B, H, N, D], x's dtype
    """Wan's RoPE from diffusers' tables: pair (x[2i], x[2i+1]) times exp(i angle), float32 maths."""
    cos, sin = cos[..., 0::2].transpose(1, 2), sin[..., 1::2].transpose(1, 2)  # [1, 1, N, D/2]
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


class _TaggedRotary(tuple):
    """``(freqs_cos, freqs_sin)`` as ``WanRotaryPosEmbed`` returns them, plus ``rope``: the
    kernel's ``Rope`` for the same token grid (the SDPA processor just unpacks the tuple)."""

    rope: object


def _tag_rotary(module, args: tuple, output: tuple[Tensor, Tensor]):
    """Forward hook on ``transformer.rope``: attach the fused-RoPE positions to its output."""
    from vist3a_rt.kernels.triton_attention import Rope, wan_positions

    if not args or not isinstance(output, tuple):
        return None
    _, _, frames, height, width = args[0].shape
    p_t, p_h, p_w = module.patch_size
    tagged = _TaggedRotary(output)
    positions = wan_positions(frames // p_t, height // p_h, width // p_w, device=output[0].device)
    tagged.rope = Rope.wan_3d(positions, module.attention_head_dim)  # diffusers' theta: 10000
    return tagged


_HOOK_ATTRIBUTE = "_vist3a_rope_hook"


def install_triton_attention(transformer: "WanTransformer3DModel") -> None:
    """Triton processors in every attention, and the RoPE tag hook; no availability checks
    (``use_triton_attention`` does those; tests call this to run the interpreter on CPU)."""
    _remove_rope_hook(transformer)
    transformer.set_attn_processor(WanTritonAttnProcessor())
    setattr(transformer, _HOOK_ATTRIBUTE, transformer.rope.register_forward_hook(_tag_rotary))


def install_default_attention(transformer: "WanTransformer3DModel") -> None:
    """diffusers' own processors back (SDPA through ``dispatch_attention_fn``), hook removed."""
    _remove_rope_hook(transformer)
    for module in transformer.modules():
        if isinstance(getattr(module, "processor", None), WanTritonAttnProcessor):
            module.set_processor(type(module)._default_processor_cls())


def _remove_rope_hook(transformer) -> None:
    hook = getattr(transformer, _HOOK_ATTRIBUTE, None)
    if hook is not None:
        hook.remove()
        setattr(transformer, _HOOK_ATTRIBUTE, None)


def use_triton_attention(transformer: "WanTransformer3DModel", enabled: bool | None = None) -> AttentionChoice:
    """Install the Triton processors when ``enabled`` (default: ``VIST3A_ATTENTION=triton``) and
    the transformer can run them; else keep diffusers' SDPA processors. Returns what is active."""
    if enabled is None:
        enabled = _requested_by_environment()
    missing = _why_not_triton(transformer) if enabled else f"{ENV_VARIABLE} is not 'triton'"
    if missing:
        install_default_attention(transformer)
        return AttentionChoice("sdpa", missing if not enabled else f"Triton attention requested, but {missing}")
    install_triton_attention(transformer)
    return AttentionChoice("triton", f"Triton flash attention, Wan 3D RoPE fused, on {transformer.device}")


def _requested_by_environment() -> bool:
    value = os.environ.get(ENV_VARIABLE, "sdpa")
    if value not in ("sdpa", "triton"):
        raise ConfigError(f"attention backend ({ENV_VARIABLE}) must be 'sdpa' or 'triton', got {value!r}")
    return value == "triton"


def _why_not_triton(transformer) -> str:
    """Why the Triton processors cannot run this transformer ("" when they can)."""
    if transformer.device.type != "cuda":
        return f"the transformer is on {transformer.device.type} and the Triton kernels need CUDA"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'vist3a-rt[triton]')"
    head_dim = transformer.config.attention_head_dim
    if head_dim > MAX_HEAD_DIM or head_dim % 2 or head_dim < 6:
        return f"head dim {head_dim} is outside the kernel's range (even, 6 to {MAX_HEAD_DIM})"
    return ""


def aot_variants(head_dims: tuple[int, ...] = (64, 128), dtype: str = "bf16") -> list[dict]:
    """The kernels this processor launches, for ``triton.compile`` without a GPU: the forward
    with fused 3D RoPE (self-attention) and without (cross-attention) at every GPU autotune
    config, and the k rotation, per head dim (see ``triton_attention.aot_variants``)."""
    from vist3a_rt.kernels import triton_attention as ta

    variants = []
    for head_dim in head_dims:
        variants += ta.aot_forward_variants(dtype, head_dim, rope=True)
        variants += ta.aot_forward_variants(dtype, head_dim, rope=False)
    return variants
