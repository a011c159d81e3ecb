"""Triton kernels against their torch references, and their compilation for Hopper (sm_90).

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by
``conftest.py`` before anything imports triton), on CPU tensors at tiny sizes; with a GPU the
same tests run the compiled kernels on CUDA. The compile test lowers every kernel variant to a
sm_90 cubin with no GPU present, in fresh subprocesses (interpreter off, empty Triton cache).
Only a missing triton skips this module.

Tolerances: float32 -- 1e-5 for attention, 1e-4 for rendering (the acceptance bound);
bfloat16 / float16 -- STYLE.md's rule: the kernel's max error against the float32 reference
is at most twice that of torch (SDPA, with the reference RoPE) computing at the same precision.
"""

import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'vist3a-rt[triton]')")

from vist3a_rt.decoder import layers
from vist3a_rt.errors import Vist3AInputError
from vist3a_rt.rendering import RasterConfig, api, rasterize_gaussians, render
from vist3a_rt.scene.cameras import Camera

F32 = torch.float32
RENDER_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def kernels():
    """The kernel modules and where they run: interpreted on CPU tensors (conftest sets
    TRITON_INTERPRET=1 when no GPU is visible), compiled on CUDA otherwise."""
    from vist3a_rt.kernels import triton_attention, triton_raster

    if not triton_attention.INTERPRET and not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET=0 and no CUDA device: nothing can run the kernels")
    device = "cpu" if triton_attention.INTERPRET else "cuda"
    return SimpleNamespace(attention=triton_attention, raster=triton_raster, device=device)


def max_error(value, reference):
    return (value.float() - reference.float()).abs().max().item()


# ---------------------------------------------------------------------------- attention


def attention_inputs(kernels, shape, dtype, seed=0, causal=False, padding=False, rope=None):
    """q [B,H,Nq,D], k/v [B,H,Nk,D], a cotangent and the call options, on the kernels' device."""
    B, H, n_q, n_k, D = shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g).to(dtype) for n in (n_q, n_k, n_k))
    grad = torch.randn(B, H, n_q, D, generator=g).to(dtype)
    options = {"causal": causal}
    if padding:
        mask = torch.rand(B, n_k, generator=g) > 0.3
        mask[0, 0] = True
        options["key_padding_mask"] = mask.to(kernels.device)
    ta = kernels.attention
    if rope == "2d":
        options["rope"] = ta.Rope.axial_2d(torch.randint(0, 20, (B, n_q, 2), generator=g).to(kernels.device), D)
    elif rope == "3d":
        positions = ta.wan_positions(3, 4, math.ceil(n_q / 12), device=kernels.device)[:n_q]
        options["rope"] = ta.Rope.wan_3d(positions, D)
    tensors = [t.to(kernels.device) for t in (q, k, v, grad)]
    return tensors, options


def forward_backward(fn, q, k, v, grad, dtype, options):
    """(out, dq, dk, dv) of ``fn`` on copies of q, k, v cast to ``dtype``."""
    inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*inputs, **options)
    return (out, *torch.autograd.grad(out, inputs, grad.to(dtype)))


@pytest.mark.parametrize("shape, causal, padding, rope", [
    ((1, 2, 37, 37, 64), False, False, None),  # tails: 37 = 2 blocks of 16 + 5
    ((2, 1, 20, 45, 32), False, False, None),  # cross-attention lengths
    ((1, 2, 33, 29, 16), True, False, None),  # causal, Nq > Nk
    ((2, 2, 19, 19, 8), False, True, None),  # key padding, head dim padded 8 -> 16
    ((1, 1, 24, 24, 128), True, True, "2d"),  # everything at the big head dim
    ((1, 2, 37, 37, 32), False, False, "2d"),  # the decoder's RoPE, fused
    ((1, 2, 30, 30, 24), False, False, "3d"),  # Wan's RoPE, non-power-of-two head dim
])
def test_attention_float32_matches_reference(kernels, shape, causal, padding, rope):
    (q, k, v, grad), options = attention_inputs(kernels, shape, F32, causal=causal, padding=padding, rope=rope)
    ta = kernels.attention
    ours = forward_backward(ta.flash_attention, q, k, v, grad, F32, options)
    reference = forward_backward(ta.attention_reference, q, k, v, grad, F32, options)
    for name, value, expected in zip(("out", "dq", "dk", "dv"), ours, reference):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, causal, padding, rope", [
    ((2, 2, 37, 37, 64), False, False, None),
    ((2, 2, 45, 45, 32), True, True, "2d"),
])
def test_attention_reduced_precision_within_twice_torch_error(kernels, dtype, shape, causal, padding, rope):
    (q, k, v, grad), options = attention_inputs(kernels, shape, dtype, seed=1, causal=causal,
                                                padding=padding, rope=rope)
    ta = kernels.attention
    exact = forward_backward(ta.attention_reference, q, k, v, grad, F32, options)
    torch_low = forward_backward(ta.attention_reference, q, k, v, grad, dtype, options)
    ours = forward_backward(ta.flash_attention, q, k, v, grad, dtype, options)
    for name, value, baseline, expected in zip(("out", "dq", "dk", "dv"), ours, torch_low, exact):
        assert value.dtype == dtype, name
        assert max_error(value, expected) <= 2 * max_error(baseline, expected), name


def test_rows_without_keys_give_zero_and_zero_gradients(kernels):
    (q, k, v, grad), options = attention_inputs(kernels, (2, 1, 21, 21, 16), F32, padding=True)
    options["key_padding_mask"][1] = False  # the second batch sees no key at all
    ta = kernels.attention
    out, dq, dk, dv = forward_backward(ta.flash_attention, q, k, v, grad, F32, options)
    reference = forward_backward(ta.attention_reference, q, k, v, grad, F32, options)
    assert out[1].abs().max() == 0 and dq[1].abs().max() == 0 and dv[1].abs().max() == 0
    for value, expected in zip((out, dq, dk, dv), reference):
        assert torch.isfinite(value).all()
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)


def test_rope_tables_match_the_decoder_and_wan(kernels):
    """Rope.axial_2d is the decoder's RotaryPositionEmbedding2D; Rope.wan_3d is diffusers' Wan
    RoPE (WanRotaryPosEmbed tables + the apply_rotary_emb of WanAttnProcessor)."""
    ta = kernels.attention
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 10, 32, generator=g)
    pos = torch.randint(0, 30, (2, 10, 2), generator=g)
    decoder = layers.RotaryPositionEmbedding2D(100.0)(x, pos)
    torch.testing.assert_close(ta.rope_reference(x, ta.Rope.axial_2d(pos, 32)), decoder, rtol=0, atol=1e-6)

    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    head_dim, frames, rows, cols = 24, 2, 3, 4
    cos, sin = WanRotaryPosEmbed(head_dim, (1, 2, 2), max_seq_len=64)(torch.zeros(1, 1, frames, 2 * rows, 2 * cols))
    x = torch.randn(1, frames * rows * cols, 2, head_dim, generator=g)  # Wan's [B, N, heads, D]
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    wan = torch.empty_like(x)
    wan[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
    wan[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
    ours = ta.rope_reference(x.transpose(1, 2), ta.Rope.wan_3d(ta.wan_positions(frames, rows, cols), head_dim))
    torch.testing.assert_close(ours.transpose(1, 2), wan, rtol=0, atol=1e-5)


def test_rope_kernel_and_its_inverse(kernels):
    ta = kernels.attention
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 19, 64, generator=g).to(kernels.device)
    for rope in (ta.Rope.axial_2d(torch.randint(0, 9, (19, 2), generator=g).to(kernels.device), 64),
                 ta.Rope.wan_3d(ta.wan_positions(2, 3, 4, device=kernels.device)[:19], 64)):
        rotated = ta.apply_rope(x, rope)
        torch.testing.assert_close(rotated, ta.rope_reference(x, rope), rtol=0, atol=2e-6)
        torch.testing.assert_close(ta.apply_rope(rotated, rope, inverse=True), x, rtol=0, atol=2e-6)


def test_decoder_switch(kernels, monkeypatch):
    """CPU tensors keep SDPA bit for bit whatever the switch says; the Triton path (called
    directly, as CUDA tensors would reach it) equals it; a bad setting is refused."""
    torch.manual_seed(4)
    attention = layers.Attention(64, num_heads=4, qk_norm=True, rope=layers.RotaryPositionEmbedding2D(100.0))
    x = torch.randn(2, 21, 64)
    pos = torch.cat([torch.zeros(2, 1, 2, dtype=torch.long), layers.grid_positions(4, 5).expand(2, 20, 2) + 1], 1)
    with torch.no_grad():
        sdpa = attention(x, pos)
        monkeypatch.setattr(layers, "ATTENTION_BACKEND", "triton")
        assert torch.equal(attention(x, pos), sdpa)
        qkv = attention.qkv(x).reshape(2, 21, 3, 4, 16).permute(2, 0, 3, 1, 4).to(kernels.device)
        q, k, v = qkv.unbind(0)
        q, k = attention.q_norm.to(kernels.device)(q), attention.k_norm.to(kernels.device)(k)
        fused = layers._triton_attention(q, k, v, attention.rope, pos.to(kernels.device))
        out = attention.proj.to(kernels.device)(fused.transpose(1, 2).reshape(2, 21, 64))
        torch.testing.assert_close(out.cpu(), sdpa, rtol=1e-5, atol=1e-5)
        monkeypatch.setattr(layers, "ATTENTION_BACKEND", "flash")
        with pytest.raises(ValueError, match="must be 'sdpa' or 'triton'"):
            attention(x, pos)


@pytest.mark.parametrize("change, message", [
    (lambda q, k, v: (q[0], k, v), r"must be \[B, H, N, D\]"),
    (lambda q, k, v: (q, k[:, :1], v[:, :1]), "must be"),
    (lambda q, k, v: (q, k.double(), v), "float32 / bfloat16 / float16"),
])
def test_attention_bad_inputs(kernels, change, message):
    q = torch.randn(1, 2, 5, 16, device=kernels.device)
    with pytest.raises(ValueError, match=message):
        kernels.attention.flash_attention(*change(q, q, q))


# ---------------------------------------------------------------------------- rasterizer


def random_scene(n, seed, width, height, wall=0, corner=False, degree=1):
    """n random float32 Gaussians in front of an axis camera; the first ``wall`` are big, opaque
    and central (pixels behind them terminate); ``corner`` keeps the rest in the top-left."""
    g = torch.Generator().manual_seed(seed)
    z = 2 + 4 * torch.rand(n, generator=g)
    spread = torch.where(torch.arange(n) < wall, 0.1, 0.9)
    xy = (torch.rand(n, 2, generator=g) - 0.5) * (z * spread)[:, None]
    if corner:
        xy = -(xy.abs() + 0.2 * z[:, None])
    big = (torch.arange(n) < wall).float()[:, None]
    scene = SimpleNamespace(
        means=torch.cat([xy, z[:, None]], 1), scales=0.02 + 0.3 * torch.rand(n, 3, generator=g) + 0.5 * big,
        rotations=torch.randn(n, 4, generator=g), sh=0.6 * torch.randn(n, (degree + 1) ** 2, 3, generator=g),
        opacities=torch.where(big[:, 0] > 0, 0.97, 0.3 + 0.7 * torch.rand(n, generator=g)))
    focal = 0.8 * max(width, height)
    K = torch.tensor([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]])
    return scene, torch.eye(4), K


def scene_args(scene):
    return [scene.means, scene.rotations, scene.scales, scene.opacities, scene.sh]


def render_both(kernels, scene, viewmat, K, width, height, background, config):
    """(triton RenderOutput, reference RenderOutput, the leaf tensors of each) for one view."""
    outputs, leaves = [], []
    for rasterize in (api._rasterize_triton, rasterize_gaussians):
        tensors = [t.to(kernels.device).requires_grad_() for t in scene_args(scene)]
        bg = None if background is None else background.to(kernels.device)
        outputs.append(rasterize(*tensors, viewmat.to(kernels.device), K.to(kernels.device), width, height,
                                 bg, config))
        leaves.append(tensors)
    return outputs, leaves


@pytest.mark.parametrize("n, wall, corner, size, background, tile", [
    (40, 0, False, (37, 21), (0.1, 0.5, 0.9), 16),  # partial edge tiles
    (50, 8, False, (40, 30), None, 16),  # opaque wall: early termination
    (30, 0, True, (48, 40), (1.0, 1.0, 1.0), 16),  # Gaussians in one corner: empty tiles
    (25, 4, False, (23, 19), (0.2, 0.2, 0.2), 6),  # tile size not a power of two
    (12, 0, False, (1, 1), (0.0, 0.0, 1.0), 16),  # a single pixel
])
def test_triton_render_matches_reference_forward_and_backward(kernels, n, wall, corner, size, background, tile):
    width, height = size
    scene, viewmat, K = random_scene(n, seed=n, width=width, height=height, wall=wall, corner=corner)
    bg = None if background is None else torch.tensor(background)
    config = RasterConfig(tile_size=tile)
    (ours, reference), (our_leaves, reference_leaves) = render_both(kernels, scene, viewmat, K, width, height,
                                                                     bg, config)
    assert torch.equal(ours.radii, reference.radii)
    for field in ("color", "depth", "alpha"):
        assert max_error(getattr(ours, field), getattr(reference, field)) <= RENDER_TOLERANCE, field
    cotangents = [torch.randn(reference.color.shape), torch.randn(reference.depth.shape),
                  torch.randn(reference.alpha.shape)]

    def backward(out, leaves):
        loss = sum((getattr(out, f) * c.to(kernels.device)).sum()
                   for f, c in zip(("color", "depth", "alpha"), cotangents))
        return torch.autograd.grad(loss, leaves)

    for name, value, expected in zip(("means", "rotations", "scales", "opacities", "sh"),
                                     backward(ours, our_leaves), backward(reference, reference_leaves)):
        scale = expected.abs().max().item()
        assert max_error(value, expected) <= 1e-4 * max(scale, 1.0), name


def test_blend_kernel_terminates_like_the_reference(kernels):
    """Seven Gaussians stacked on the centre pixel (alpha 0.8 there): T = 0.2^k, the sixth would
    take it to 6.4e-5 <= 1e-4, so it and the faint seventh are excluded; the op-level oracle and
    the kernel agree, forward and backward, and the tile stops there."""
    kr = kernels.raster
    means2d = torch.full((7, 2), 8.0) + 0.5
    conics = torch.tensor([[0.01, 0.0, 0.01]]).expand(7, 3).contiguous()
    opacities = torch.tensor([0.8] * 6 + [0.05])
    features = torch.rand(7, 4, generator=torch.Generator().manual_seed(5))
    ids, starts, counts = torch.arange(7), torch.tensor([0]), torch.tensor([7])
    tensors = [t.to(kernels.device).requires_grad_() for t in (means2d, conics, opacities, features)]
    index = [t.to(kernels.device) for t in (ids, starts, counts)]
    acc, trans = kr.blend_tiles(*tensors, *index, 16, 16, 16)
    ref_tensors = [t.detach().clone().requires_grad_() for t in tensors]
    ref_acc, ref_trans = kr.blend_tiles_reference(*ref_tensors, *index, 16, 16, 16)
    weights = torch.tensor([0.8 * 0.2 ** k for k in range(5)] + [0.0, 0.0])
    centre = 8 * 16 + 8
    torch.testing.assert_close(acc[centre].cpu(), weights @ features, rtol=0, atol=1e-6)
    assert trans[centre].item() == pytest.approx(0.2 ** 5, rel=1e-5)
    torch.testing.assert_close(acc, ref_acc, rtol=0, atol=1e-6)
    torch.testing.assert_close(trans, ref_trans, rtol=0, atol=1e-6)
    g = torch.Generator().manual_seed(6)
    cot_acc, cot_trans = torch.randn(acc.shape, generator=g), torch.randn(trans.shape, generator=g)

    def grads(outputs, leaves):
        loss = (outputs[0] * cot_acc.to(kernels.device)).sum() + (outputs[1] * cot_trans.to(kernels.device)).sum()
        return torch.autograd.grad(loss, leaves)

    for value, expected in zip(grads((acc, trans), tensors), grads((ref_acc, ref_trans), ref_tensors)):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)


def test_empty_scene_is_background(kernels):
    scene, viewmat, K = random_scene(0, seed=0, width=9, height=4)
    out = api._rasterize_triton(*(t.to(kernels.device) for t in scene_args(scene)), viewmat.to(kernels.device),
                                K.to(kernels.device), 9, 4, torch.tensor([0.25, 0.5, 0.75], device=kernels.device),
                                RasterConfig())
    torch.testing.assert_close(out.color.cpu(), torch.tensor([0.25, 0.5, 0.75]).expand(4, 9, 3))
    assert out.alpha.abs().max() == 0 and out.depth.abs().max() == 0


def test_render_backend_triton_needs_cuda_and_says_so():
    if api._triton_missing() == "":
        pytest.skip("a CUDA device and triton are present: the backend is available here")
    camera = Camera(torch.eye(4), torch.tensor([[8.0, 0, 4], [0, 8.0, 4], [0, 0, 1]]), 8, 8)
    scene, _, _ = random_scene(3, seed=1, width=8, height=8)
    with pytest.raises(Vist3AInputError, match="render backend 'triton' is not available.*CUDA"):
        render(scene, camera, backend="triton")
    assert "triton" not in api.available_backends()


# ---------------------------------------------------------------------------- compiles for Hopper

COMPILE_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vist3a_rt.kernels import triton_attention, triton_raster

part, parts = int(sys.argv[1]), int(sys.argv[2])
variants = triton_attention.aot_variants() + triton_raster.aot_variants()
for i, v in enumerate(variants):
    if i % parts != part:
        continue
    kernel = triton.compile(ASTSource(v["fn"], v["signature"], v["constexprs"], v["attrs"]),
                            target=GPUTarget("cuda", 90, 32), options=v["options"])
    assert kernel.asm["cubin"], v["fn"].__name__
    assert "sm_90" in kernel.asm["ptx"], v["fn"].__name__
    assert kernel.metadata.shared <= 227 * 1024, (v["fn"].__name__, kernel.metadata.shared)
    print(i, v["fn"].__name__, len(kernel.asm["cubin"]), kernel.metadata.shared)
"""


def test_every_kernel_compiles_for_sm90_without_a_gpu(tmp_path):
    """triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)) to a cubin for each
    variant in the modules' ``aot_variants()``: two processes, interpreter off, empty cache."""
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "cache"), "TRITON_DEFAULT_FP_FUSION": "1"}
    env.pop("TRITON_INTERPRET", None)
    parts = 2
    runs = [subprocess.Popen([sys.executable, "-c", COMPILE_SCRIPT, str(i), str(parts)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(parts)]
    compiled = []
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-3000:]
        compiled += [line.split()[1] for line in out.splitlines()]
    expected = {"_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq", "_rope_kernel",
                "_blend_fwd", "_blend_bwd"}
    assert set(compiled) == expected, compiled
