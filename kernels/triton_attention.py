"""Flash attention in Triton: forward and backward, key-padding / causal masks, fused RoPE.

Origin: FlashAttention-2 (Dao, 2023) as laid out in Triton's tutorial 06 ("Fused Attention"):
the forward streams K/V tiles through an online softmax (running max and sum, base-2
exponentials, the scale folded into them) and stores the log-sum-exp; the backward recomputes
the probabilities from it -- a preprocess (``delta = rowsum(dO * O)``), one kernel per key
block for dK/dV, one per query block for dQ. The code is ours, for the shapes used here.

Shapes: ``q [B, H, Nq, D]``, ``k, v [B, H, Nk, D]`` like ``F.scaled_dot_product_attention``
(the last dimension must be contiguous; other strides are free, so the views of a fused qkv
projection go in without a copy). Any ``Nq, Nk >= 1`` (the ragged tail block is masked) and
any head dim ``D >= 1``: D is padded to ``max(16, next power of two)`` inside the kernels, so
64 and 128 (the official models) run unpadded and the tiny models' 8/16/32 work too.
Dtypes: float32, bfloat16, float16; every tensor in one dtype. Softmax statistics and all
accumulators are float32; outputs and gradients come back in the input dtype. float32 dots
are IEEE fp32 unless ``torch.backends.cuda.matmul.allow_tf32`` is set (then TF32).

Options: ``scale`` (default ``1/sqrt(D)``, SDPA's); ``causal`` (off by default; top-left
aligned like SDPA's ``is_causal``: query i sees keys j <= i); ``key_padding_mask [B, Nk]``
bool, True = attend. A query row with no key to attend gives 0 and zero gradients (SDPA
gives NaN there); the reference below does the same.

RoPE (``rope=Rope(...)``, self-attention, Nq == Nk): every channel j of q and k is rotated
with a partner channel p(j) by the angle ``positions[token, axis(j)] * freq(j)``::

    out[j] = x[j] cos(angle) + sign(j) x[p(j)] sin(angle)

which covers both layouts in use: ``Rope.axial_2d`` -- the decoder's 2D RoPE (D split in
halves for row / column, rotate-half inside each half, base 100; ``decoder/layers.py``) --
and ``Rope.wan_3d`` -- Wan 2.1's 3D RoPE (frame / row / column sections, interleaved pairs,
theta 10000; diffusers' ``WanRotaryPosEmbed``). Angles and cos / sin are computed in float32
in the kernel from per-token positions (no cos / sin tables in memory). q is rotated in the
forward kernel's prologue (each program loads its query tile once). k is streamed in the inner
loop, once per query block: rotating it there would redo the rotation Nq / BLOCK_M times, so
``_rope_kernel`` rotates k once before the launch. The backward re-rotates q the same way and
maps dQ, dK back through the transposed rotation (the same kernel with the sign flipped).
The Wan denoiser runs this through ``vist3a_rt.generator.attention`` (a diffusers attention
processor, ``VIST3A_ATTENTION=triton``).

Limits: no dropout, no GQA / MQA, v has q's head dim, no arbitrary additive masks.
Interpreter (``TRITON_INTERPRET=1``, how CPU-only machines test this file; it must be set
before triton is first imported): one autotune config; 16-bit dots are cast to float32 first
(the interpreter's bf16 ``tl.dot`` returns garbage), which changes no number -- products of
16-bit values are exact in float32, the accumulation is float32 either way, and p is still
rounded to the input dtype before ``p @ V``; float32 -> bfloat16 casts are rounded to nearest
even by hand (``_cast``: the interpreter truncates, which biased every bf16 result).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .triton_common import interpreting


INTERPRET = interpreting()  # fixed at import: the kernels below are decorated accordingly
LOG2E = 1.4426950408889634
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# The forward's autotune space on a GPU: (BLOCK_M, BLOCK_N, num_warps, num_stages).
GPU_FORWARD_CONFIGS = ((128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4), (64, 64, 4, 3), (128, 32, 4, 4),
                       (64, 32, 4, 2))


def _configs() -> list[triton.Config]:
    if INTERPRET:  # the interpreter runs one config; small blocks exercise the tails
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in GPU_FORWARD_CONFIGS]


# ---------------------------------------------------------------------------- jit helpers

_ROUND_BF16_BY_HAND = tl.constexpr(INTERPRET)


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """x.to(dtype) rounding to nearest even; the interpreter truncates float32 -> bfloat16, so
    there the rounding is done on the bits first (the GPU path is a plain ``.to``)."""
    if _ROUND_BF16_BY_HAND and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b with a float32 accumulator; DOT_FP32 casts 16-bit operands first (interpreter)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _rotated_rows(X, stride_n, offs_n, n_valid, POS, stride_pos_n, FREQ, AXIS, PARTNER, SIGN,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, INVERSE: tl.constexpr):
    """Rows ``offs_n`` of X [N, D] rotated, float32 [BLOCK_N, BLOCK_D]; INVERSE applies R^T.

    The tables (length BLOCK_D) pad with partner = self, sign = 0, so padded channels stay 0.
    """
    offs_d = tl.arange(0, BLOCK_D)
    mask = n_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = X + offs_n[:, None] * stride_n
    x = tl.load(rows + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    x_partner = tl.load(rows + tl.load(PARTNER + offs_d)[None, :], mask=mask, other=0.0).to(tl.float32)
    pos = tl.load(POS + offs_n[:, None] * stride_pos_n + tl.load(AXIS + offs_d)[None, :],
                  mask=mask, other=0.0)
    angle = pos * tl.load(FREQ + offs_d)[None, :]
    sign = tl.load(SIGN + offs_d)[None, :]
    if INVERSE:  # R is orthogonal; partners share the angle and have opposite signs
        sign = -sign
    return x * tl.cos(angle) + sign * x_partner * tl.sin(angle)


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K, V, KPM, stride_kn, stride_vn, lo, hi, offs_m, N_K,
                    qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over key blocks [lo, hi); MASKED blocks apply the tail and causal masks."""
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < N_K
        if MASKED:
            k_mask = n_valid[None, :] & d_valid[:, None]
            v_mask = n_valid[:, None] & d_valid[None, :]
        else:
            k_mask = d_valid[:, None]
            v_mask = d_valid[None, :]
        k_t = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None], mask=k_mask, other=0.0)
        qk = _dot(q, k_t, DOT_FP32, PRECISION) * qk_scale  # log2 units
        if MASKED:
            allowed = n_valid[None, :]
            if CAUSAL:
                allowed = allowed & (offs_m[:, None] >= offs_n[None, :])
            qk = tl.where(allowed, qk, float("-inf"))
        if HAS_KPM:
            attend = tl.load(KPM + offs_n, mask=n_valid, other=0) != 0
            qk = tl.where(attend[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        p = tl.exp2(qk - m_safe[:, None])
        correction = tl.exp2(m_i - m_safe)
        l_i = l_i * correction + tl.sum(p, 1)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :], mask=v_mask, other=0.0)
        acc = acc * correction[:, None] + _dot(_cast(p, v.dtype), v, DOT_FP32, PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# ---------------------------------------------------------------------------- kernels


@triton.jit
def _rope_kernel(X, Y, POS, FREQ, AXIS, PARTNER, SIGN,
                 stride_xb, stride_xh, stride_xn, stride_pos_b, stride_pos_n, H, N,
                 HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 INVERSE: tl.constexpr):
    """Y [B, H, N, D] (contiguous) = rotation of X, or of R^T X when INVERSE."""
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < N
    y = _rotated_rows(X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh, stride_xn, offs_n,
                      n_valid, POS + b.to(tl.int64) * stride_pos_b, stride_pos_n, FREQ, AXIS, PARTNER,
                      SIGN, HEAD_DIM, BLOCK_D, INVERSE)
    out = Y + bh.to(tl.int64) * N * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(out, _cast(y, Y.dtype.element_ty), mask=n_valid[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.autotune(configs=_configs(), key=["SEQ_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_KPM", "ROPE"])
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, KPM, POS, FREQ, AXIS, PARTNER, SIGN,
              stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_kpm_b, stride_pos_b, stride_pos_n,
              H, N_Q, N_K, qk_scale, SEQ_BUCKET,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_KPM: tl.constexpr, ROPE: tl.constexpr, DOT_FP32: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (query block, batch * head): O and the base-2 log-sum-exp LSE."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < N_Q
    q_mask = m_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    Q += b * stride_qb + h * stride_qh
    if ROPE:
        q = _rotated_rows(Q, stride_qn, offs_m, m_valid, POS + b * stride_pos_b, stride_pos_n, FREQ,
                          AXIS, PARTNER, SIGN, HEAD_DIM, BLOCK_D, False)
        q = _cast(q, Q.dtype.element_ty)
    else:
        q = tl.load(Q + offs_m[:, None] * stride_qn + offs_d[None, :], mask=q_mask, other=0.0)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    KPM += b * stride_kpm_b
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Key blocks below the diagonal and before the tail need no mask: run them without one.
    if CAUSAL:
        hi = tl.minimum(N_K, (start_m + 1) * BLOCK_M)
        full = tl.minimum(N_K, start_m * BLOCK_M) // BLOCK_N * BLOCK_N
    else:
        hi = N_K
        full = N_K // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, KPM, stride_kn, stride_vn, 0, full, offs_m,
                                    N_K, qk_scale, HEAD_DIM, BLOCK_N, BLOCK_D, False, CAUSAL, HAS_KPM,
                                    DOT_FP32, PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K, V, KPM, stride_kn, stride_vn, full, hi, offs_m,
                                    N_K, qk_scale, HEAD_DIM, BLOCK_N, BLOCK_D, True, CAUSAL, HAS_KPM,
                                    DOT_FP32, PRECISION)
    seen = l_i > 0  # False only for rows with no key to attend: output 0, LSE +inf (p = 0 later)
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    O += bh.to(tl.int64) * N_Q * HEAD_DIM
    tl.store(O + offs_m[:, None] * HEAD_DIM + offs_d[None, :], _cast(out, O.dtype.element_ty), mask=q_mask)
    tl.store(LSE + bh.to(tl.int64) * N_Q + offs_m, lse, mask=m_valid)


@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA, N_Q, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """DELTA [B*H, Nq] = rowsum(dO * O) (both contiguous [B, H, Nq, D]), float32."""
    bh = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < N_Q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    offs = bh * N_Q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(O + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * N_Q + offs_m, tl.sum(o * do, 1), mask=offs_m < N_Q)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, KPM, stride_kpm_b, H, N_Q, N_K, sm_scale, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_KPM: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (key block, batch * head): dK, dV over every query block that sees it.

    Q, DO, DK, DV contiguous [B, H, N, D]; K, V too (the launcher makes them so).
    """
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    n_valid = offs_n < N_K
    kv_mask = n_valid[:, None] & d_valid[None, :]
    kv_offs = bh * N_K * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
    key_ok = n_valid
    if HAS_KPM:
        key_ok = key_ok & (tl.load(KPM + (bh // H) * stride_kpm_b + offs_n, mask=n_valid, other=0) != 0)
    Q += bh * N_Q * HEAD_DIM
    DO += bh * N_Q * HEAD_DIM
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:  # earlier query blocks cannot see these keys
        lo = start_n // BLOCK_M * BLOCK_M
    for start_m in range(lo, N_Q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_valid = offs_m < N_Q
        q_mask = m_valid[:, None] & d_valid[None, :]
        q = tl.load(Q + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(LSE + bh * N_Q + offs_m, mask=m_valid, other=float("inf"))
        delta = tl.load(DELTA + bh * N_Q + offs_m, mask=m_valid, other=0.0)
        qk_t = _dot(k, tl.trans(q), DOT_FP32, PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        allowed = key_ok[:, None] & m_valid[None, :]
        if CAUSAL:
            allowed = allowed & (offs_m[None, :] >= offs_n[:, None])
        p_t = tl.where(allowed, tl.exp2(qk_t - lse[None, :]), 0.0)
        dv += _dot(_cast(p_t, do.dtype), do, DOT_FP32, PRECISION)
        dp_t = _dot(v, tl.trans(do), DOT_FP32, PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(_cast(ds_t, q.dtype), q, DOT_FP32, PRECISION)
    tl.store(DK + kv_offs, _cast(dk * sm_scale, DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_offs, _cast(dv, DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, KPM, stride_kpm_b, H, N_Q, N_K, sm_scale, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                 HAS_KPM: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (query block, batch * head): dQ over every key block it sees."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    m_valid = offs_m < N_Q
    q_mask = m_valid[:, None] & d_valid[None, :]
    q_offs = bh * N_Q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + q_offs, mask=q_mask, other=0.0)
    do = tl.load(DO + q_offs, mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh * N_Q + offs_m, mask=m_valid, other=float("inf"))
    delta = tl.load(DELTA + bh * N_Q + offs_m, mask=m_valid, other=0.0)
    K += bh * N_K * HEAD_DIM
    V += bh * N_K * HEAD_DIM
    KPM += (bh // H) * stride_kpm_b
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = N_K
    if CAUSAL:
        hi = tl.minimum(N_K, start_m + BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < N_K
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(K + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = _dot(q, tl.trans(k), DOT_FP32, PRECISION) * qk_scale
        allowed = n_valid[None, :]
        if HAS_KPM:
            allowed = allowed & (tl.load(KPM + offs_n, mask=n_valid, other=0) != 0)[None, :]
        if CAUSAL:
            allowed = allowed & (offs_m[:, None] >= offs_n[None, :])
        p = tl.where(allowed, tl.exp2(qk - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), DOT_FP32, PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _dot(_cast(ds, k.dtype), k, DOT_FP32, PRECISION)
    tl.store(DQ + q_offs, _cast(dq * sm_scale, DQ.dtype.element_ty), mask=q_mask)


# ---------------------------------------------------------------------------- RoPE tables


@dataclass(frozen=True)
class Rope:
    """Per-token positions and per-channel rotation tables (see the module docstring).

    Build with ``Rope.axial_2d`` (the decoder) or ``Rope.wan_3d`` (Wan 2.1); the tables have
    length ``padded_head_dim(D)`` and are cached per (layout, D, base, device).
    """

    positions: torch.Tensor  # [B or 1, N, A] float32 position of each token on each axis
    freq: torch.Tensor  # [BLOCK_D] float32 angle per unit position of channel j
    axis: torch.Tensor  # [BLOCK_D] int32 position axis channel j rotates with
    partner: torch.Tensor  # [BLOCK_D] int32 the channel rotated together with j
    sign: torch.Tensor  # [BLOCK_D] float32 -1 / +1 (0 on padding)
    head_dim: int

    @classmethod
    def axial_2d(cls, positions: torch.Tensor,  # [B, N, 2] or [N, 2] (row, col)
                 head_dim: int, base: float = 100.0) -> Rope:
        """The decoder's 2D RoPE (``RotaryPositionEmbedding2D``): rows rotate the first half of
        the head dim, columns the second, rotate-half inside each, ``base ** (-2i / (D/2))``."""
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
        return cls(_positions(positions, 2), *_tables("axial_2d", head_dim, float(base),
                                                      str(positions.device)), head_dim)

    @classmethod
    def wan_3d(cls, positions: torch.Tensor,  # [B, N, 3] or [N, 3] (frame, row, col)
               head_dim: int, theta: float = 10000.0) -> Rope:
        """Wan 2.1's 3D RoPE (diffusers ``WanRotaryPosEmbed`` + ``apply_rotary_emb``): sections
        of 2 (D // 6) channels for row and column, the rest for frames; interleaved pairs."""
        if head_dim % 2 or head_dim < 6:
            raise ValueError(f"3D RoPE needs an even head dim >= 6, got {head_dim}")
        return cls(_positions(positions, 3), *_tables("wan_3d", head_dim, float(theta),
                                                      str(positions.device)), head_dim)


def padded_head_dim(head_dim: int) -> int:
    """BLOCK_D: the head dim the kernels compute with (masked loads fill the padding)."""
    return max(16, triton.next_power_of_2(head_dim))


def wan_positions(frames: int, rows: int, cols: int, device=None) -> torch.Tensor:  # [F*R*C, 3]
    """(frame, row, col) of Wan's latent patch tokens in their frame-major order."""
    grid = torch.meshgrid(*(torch.arange(n, device=device) for n in (frames, rows, cols)), indexing="ij")
    return torch.stack(grid, dim=-1).reshape(-1, 3)


def _positions(positions: torch.Tensor, axes: int) -> torch.Tensor:
    if positions.dim() == 2:
        positions = positions[None]
    if positions.dim() != 3 or positions.shape[-1] != axes:
        raise ValueError(f"RoPE positions must be [B, N, {axes}] or [N, {axes}], got {list(positions.shape)}")
    return positions.to(torch.float32).contiguous()


@functools.lru_cache(maxsize=64)
def _tables(layout: str, head_dim: int, base: float, device: str):
    block_d = padded_head_dim(head_dim)
    freq, axis = torch.zeros(block_d), torch.zeros(block_d, dtype=torch.int32)
    partner, sign = torch.arange(block_d, dtype=torch.int32), torch.zeros(block_d)
    if layout == "axial_2d":  # float32 frequencies exactly as RotaryPositionEmbedding2D makes them
        half = head_dim // 2
        inv_freq = 1.0 / (base ** (torch.arange(0, half, 2).float() / half))
        for j in range(head_dim):
            section, i = divmod(j, half)
            first = i < half // 2
            freq[j] = inv_freq[i % (half // 2)]
            axis[j] = section
            partner[j] = section * half + (i + half // 2 if first else i - half // 2)
            sign[j] = -1.0 if first else 1.0
    else:  # wan_3d: float64 frequencies as diffusers computes them, then float32
        h_dim = 2 * (head_dim // 6)
        start = 0
        for section, size in enumerate((head_dim - 2 * h_dim, h_dim, h_dim)):
            inv_freq = 1.0 / (base ** (torch.arange(0, size, 2, dtype=torch.float64) / size))
            for i in range(size):
                j = start + i
                freq[j] = float(inv_freq[i // 2])
                axis[j] = section
                partner[j] = j + 1 if i % 2 == 0 else j - 1
                sign[j] = -1.0 if i % 2 == 0 else 1.0
            start += size
    return tuple(t.to(device) for t in (freq, axis, partner, sign))


# ---------------------------------------------------------------------------- launchers


def _dot_options(dtype: torch.dtype) -> dict:
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {"DOT_FP32": INTERPRET and dtype != torch.float32, "PRECISION": "tf32" if tf32 else "ieee"}


def apply_rope(x: torch.Tensor,  # [B, H, N, D], last dim contiguous
               rope: Rope, *, inverse: bool = False,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:  # [B, H, N, D] contiguous
    """R x (or R^T x) with ``rope``'s tables, in one pass; float32 maths. Not differentiable."""
    B, H, N, D = x.shape
    pos, freq, axis, partner, sign, stride_pos_b, stride_pos_n = _rope_args(rope, x)
    y = torch.empty(B, H, N, D, dtype=out_dtype or x.dtype, device=x.device)
    block_d = padded_head_dim(D)
    block_n = _rope_block_n(block_d)
    _rope_kernel[(triton.cdiv(N, block_n), B * H)](
        x, y, pos, freq, axis, partner, sign, x.stride(0), x.stride(1), x.stride(2), stride_pos_b, stride_pos_n,
        H, N, HEAD_DIM=D, BLOCK_N=block_n, BLOCK_D=block_d, INVERSE=inverse)
    return y


def _rope_block_n(block_d: int) -> int:
    return max(1, min(64, 4096 // block_d))


def _forward(q, k, v, rope: Rope | None, scale: float, causal: bool, kpm: torch.Tensor | None):
    """-> (o [B, H, Nq, D] contiguous, lse [B, H, Nq] float32 base 2, k as attended)."""
    B, H, n_q, D = q.shape
    n_k = k.shape[2]
    if rope is not None:
        k = apply_rope(k, rope)
    o = torch.empty(B, H, n_q, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, n_q, dtype=torch.float32, device=q.device)
    pos, freq, axis, partner, sign, stride_pos_b, stride_pos_n = _rope_args(rope, q)
    kpm_arg = kpm if kpm is not None else o  # never read without HAS_KPM

    def grid(meta):
        return triton.cdiv(n_q, meta["BLOCK_M"]), B * H

    _attn_fwd[grid](
        q, k, v, o, lse, kpm_arg, pos, freq, axis, partner, sign,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), kpm.stride(0) if kpm is not None else 0,
        stride_pos_b, stride_pos_n,
        H, n_q, n_k, scale * LOG2E, triton.next_power_of_2(max(n_q, n_k)),
        HEAD_DIM=D, BLOCK_D=padded_head_dim(D), CAUSAL=causal, HAS_KPM=kpm is not None,
        ROPE=rope is not None, **_dot_options(q.dtype))
    return o, lse, k


def _rope_args(rope: Rope | None, like: torch.Tensor) -> tuple:
    """(positions, freq, axis, partner, sign, stride_pos_b, stride_pos_n) kernel arguments."""
    if rope is None:
        return (like,) * 5 + (0, 0)  # never read without ROPE
    pos = rope.positions
    return (pos, rope.freq, rope.axis, rope.partner, rope.sign,
            pos.stride(0) if pos.shape[0] > 1 else 0, pos.stride(1))


def _backward(do, q, k, v, o, lse, scale: float, causal: bool, kpm, grad_dtype: torch.dtype):
    """-> dq, dk, dv for contiguous q, k, v (already rotated when RoPE is on)."""
    B, H, n_q, D = q.shape
    n_k = k.shape[2]
    block_d = padded_head_dim(D)
    block = 16 if INTERPRET else (64 if block_d <= 64 else 32)
    options = dict(HEAD_DIM=D, BLOCK_D=block_d, CAUSAL=causal, HAS_KPM=kpm is not None,
                   **_dot_options(q.dtype), BLOCK_M=block, BLOCK_N=block)
    warps = {} if INTERPRET else {"num_warps": 4, "num_stages": 2}
    delta = torch.empty_like(lse)
    _attn_bwd_preprocess[(triton.cdiv(n_q, 64), B * H)](o, do, delta, n_q, HEAD_DIM=D, BLOCK_M=64,
                                                        BLOCK_D=block_d)
    dq = torch.empty(q.shape, dtype=grad_dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=grad_dtype, device=q.device)
    dv = torch.empty_like(v)
    kpm_arg = kpm if kpm is not None else delta
    stride_kpm = kpm.stride(0) if kpm is not None else 0
    _attn_bwd_dkdv[(triton.cdiv(n_k, block), B * H)](
        q, k, v, do, lse, delta, dk, dv, kpm_arg, stride_kpm, H, n_q, n_k, scale, scale * LOG2E,
        **options, **warps)
    _attn_bwd_dq[(triton.cdiv(n_q, block), B * H)](
        q, k, v, do, lse, delta, dq, kpm_arg, stride_kpm, H, n_q, n_k, scale, scale * LOG2E,
        **options, **warps)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rope, scale, causal, kpm):
        o, lse, k_attended = _forward(q, k, v, rope, scale, causal, kpm)
        ctx.save_for_backward(q, k_attended, v, o, lse, kpm)
        ctx.rope, ctx.scale, ctx.causal = rope, scale, causal
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kpm = ctx.saved_tensors
        rope = ctx.rope
        q = apply_rope(q, rope) if rope is not None else q.contiguous()
        grad_dtype = torch.float32 if rope is not None else q.dtype  # rotated back, then cast
        dq, dk, dv = _backward(do.contiguous(), q, k.contiguous(), v.contiguous(), o, lse, ctx.scale,
                               ctx.causal, kpm, grad_dtype)
        if rope is not None:
            dq = apply_rope(dq, rope, inverse=True, out_dtype=q.dtype)
            dk = apply_rope(dk, rope, inverse=True, out_dtype=q.dtype)
        return dq, dk, dv, None, None, None, None


def flash_attention(
    q: torch.Tensor,  # [B, H, Nq, D]
    k: torch.Tensor,  # [B, H, Nk, D]
    v: torch.Tensor,  # [B, H, Nk, D]
    *,
    rope: Rope | None = None,  # rotates q and k (self-attention: Nq == Nk)
    scale: float | None = None,  # default 1 / sqrt(D)
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,  # [B, Nk] bool, True = attend
) -> torch.Tensor:  # [B, H, Nq, D], q's dtype
    """softmax(q k^T scale) v, differentiable in q, k, v (see the module docstring)."""
    _check(q, k, v, rope, key_padding_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    kpm = None
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(torch.int8).contiguous()
    return _FlashAttention.apply(q, k, v, rope, scale, bool(causal), kpm)


def _check(q, k, v, rope, kpm) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, N, D], got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    B, H, _, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D or v.shape != k.shape:
        raise ValueError(f"k and v must be [{B}, {H}, Nk, {D}] like q, got {list(k.shape)} and {list(v.shape)}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of float32 / bfloat16 / float16, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if min(q.shape[2], k.shape[2]) < 1:
        raise ValueError(f"sequence lengths must be >= 1, got Nq={q.shape[2]}, Nk={k.shape[2]}")
    devices = {t.device for t in (q, k, v)} | ({kpm.device} if kpm is not None else set())
    if len(devices) != 1 or (q.device.type != "cuda" and not INTERPRET):
        raise ValueError(f"flash_attention needs q, k, v (and the mask) on one CUDA device, got "
                         f"{sorted(map(str, devices))} (CPU tensors run only under TRITON_INTERPRET=1)")
    if kpm is not None and (kpm.shape != (B, k.shape[2]) or kpm.dtype != torch.bool):
        raise ValueError(f"key_padding_mask must be bool [{B}, {k.shape[2]}], got {kpm.dtype} {list(kpm.shape)}")
    if rope is not None:
        n = q.shape[2]
        if k.shape[2] != n or rope.head_dim != D or rope.positions.shape[1] != n \
                or rope.positions.shape[0] not in (1, B) or rope.positions.device != q.device:
            raise ValueError(
                f"rope (head dim {rope.head_dim}, positions {list(rope.positions.shape)} on "
                f"{rope.positions.device}) does not fit q {list(q.shape)} / k {list(k.shape)} on "
                f"{q.device}: RoPE is for self-attention with positions [B or 1, N, axes]")


# ---------------------------------------------------------------------------- reference


def rope_reference(x: torch.Tensor,  # [B, H, N, D]
                   rope: Rope) -> torch.Tensor:  # [B, H, N, D], x's dtype
    """The rotation in plain torch, float32 maths (the kernels' oracle)."""
    D = x.shape[-1]
    pos = rope.positions[:, None]  # [B or 1, 1, N, A]
    axis, partner = rope.axis[:D].long(), rope.partner[:D].long()
    angle = pos[..., axis] * rope.freq[:D]
    xf = x.float()
    out = xf * angle.cos() + rope.sign[:D] * xf[..., partner] * angle.sin()
    return out.to(x.dtype)


def attention_reference(
    q: torch.Tensor,  # [B, H, Nq, D]
    k: torch.Tensor,  # [B, H, Nk, D]
    v: torch.Tensor,  # [B, H, Nk, D]
    *,
    rope: Rope | None = None,
    scale: float | None = None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,  # [B, Nk] bool, True = attend
) -> torch.Tensor:
    """``flash_attention`` in plain torch: reference RoPE + ``F.scaled_dot_product_attention``.

    Rows with no key to attend give 0 (they attend everything inside SDPA, then are zeroed, so
    no NaN reaches the gradients).
    """
    if rope is not None:
        q, k = rope_reference(q, rope), rope_reference(k, rope)
    n_q, n_k = q.shape[2], k.shape[2]
    allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()
    allowed = allowed.expand(q.shape[0], 1, n_q, n_k)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    if not causal and key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    empty = ~allowed.any(-1, keepdim=True)  # [B, 1, Nq, 1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | empty, scale=scale)
    return out.masked_fill(empty, 0.0)


# ---------------------------------------------------------------------------- ahead-of-time variants


def _jit_function(kernel):
    return kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel


def _aot(kernel, pointers: dict, floats: tuple, constexprs: dict, **options) -> dict:
    """``triton.compile`` inputs: every argument typed (pointers as given, floats fp32, other
    scalars i32, constexprs fixed), and the 16-divisibility a launch would specialise on for
    tensor pointers and head / token strides (never for mask or position strides)."""
    fn = _jit_function(kernel)
    signature = {name: ("constexpr" if name in constexprs else pointers.get(name)
                        or ("fp32" if name in floats else "i32")) for name in fn.arg_names}
    aligned = [i for i, name in enumerate(fn.arg_names) if signature[name].startswith("*")
               or (name.startswith("stride_") and not name.startswith(("stride_kpm", "stride_pos")))]
    return {"fn": fn, "signature": signature, "constexprs": constexprs,
            "attrs": {(i,): [["tt.divisibility", 16]] for i in aligned}, "options": options}


_AOT_TABLES = {"POS": "*fp32", "FREQ": "*fp32", "AXIS": "*i32", "PARTNER": "*i32", "SIGN": "*fp32"}


def _aot_pointers(dt: str, rope: bool) -> dict:
    grads = "*fp32" if rope else f"*{dt}"  # with RoPE, dQ / dK are rotated back from float32
    return {**{name: f"*{dt}" for name in ("Q", "K", "V", "O", "DO", "DV", "Y")}, **_AOT_TABLES,
            "LSE": "*fp32", "DELTA": "*fp32", "KPM": "*i8", "DQ": grads, "DK": grads, "X": grads}


def _aot_switches(head_dim: int, causal: bool, kpm: bool) -> dict:
    return dict(HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim), CAUSAL=causal, HAS_KPM=kpm,
                DOT_FP32=False, PRECISION="ieee")


def aot_variants() -> list[dict]:
    """Kernel variants worth proving ahead of time: every kernel, every constexpr switch on at
    least once, both official head dims, 16-bit and float32 dots: ``[{fn, signature,
    constexprs, attrs, options}]`` for ``triton.compile(ASTSource(fn, signature, constexprs,
    attrs), target, options=options)``."""
    pointers, switches = _aot_pointers, _aot_switches
    return [
        _aot(_attn_fwd, pointers("fp32", False), ("qk_scale",),
             dict(switches(64, False, False), ROPE=False, BLOCK_M=64, BLOCK_N=32), num_warps=4, num_stages=2),
        _aot(_attn_fwd, pointers("fp16", True), ("qk_scale",),
             dict(switches(64, True, True), ROPE=True, BLOCK_M=64, BLOCK_N=64), num_warps=4, num_stages=3),
        _aot(_attn_fwd, pointers("bf16", False), ("qk_scale",),
             dict(switches(128, False, False), ROPE=False, BLOCK_M=128, BLOCK_N=64), num_warps=8, num_stages=3),
        _aot(_rope_kernel, pointers("bf16", True), (), dict(HEAD_DIM=64, BLOCK_N=64, BLOCK_D=64, INVERSE=True)),
        _aot(_attn_bwd_dkdv, pointers("bf16", True), ("sm_scale", "qk_scale"),
             dict(switches(128, True, True), BLOCK_M=32, BLOCK_N=32), num_warps=4, num_stages=2),
        _aot(_attn_bwd_dq, pointers("bf16", True), ("sm_scale", "qk_scale"),
             dict(switches(128, True, True), BLOCK_M=32, BLOCK_N=32), num_warps=4, num_stages=2),
        _aot(_attn_bwd_preprocess, pointers("bf16", False), (), dict(HEAD_DIM=128, BLOCK_M=64, BLOCK_D=128)),
    ]


def aot_forward_variants(dtype: str, head_dim: int, *, rope: bool) -> list[dict]:
    """An unmasked, non-causal inference forward as a GPU may launch it (``aot_variants``'s
    format): ``_attn_fwd`` at every config of ``GPU_FORWARD_CONFIGS`` (the autotuner picks one
    at run time), plus, with ``rope``, the k rotation ``apply_rope`` launches first.
    ``dtype``: "fp32" | "bf16" | "fp16"."""
    variants = [_aot(_attn_fwd, _aot_pointers(dtype, False), ("qk_scale",),
                     dict(_aot_switches(head_dim, False, False), ROPE=rope, BLOCK_M=m, BLOCK_N=n),
                     num_warps=w, num_stages=s)
                for m, n, w, s in GPU_FORWARD_CONFIGS]
    if rope:
        block_d = padded_head_dim(head_dim)
        variants.append(_aot(_rope_kernel, _aot_pointers(dtype, False), (),
                             dict(HEAD_DIM=head_dim, BLOCK_N=_rope_block_n(block_d), BLOCK_D=block_d,
                                  INVERSE=False)))
    return variants
