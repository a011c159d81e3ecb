"""Tile-based front-to-back blending of projected Gaussian splats in Triton (forward + backward).

Origin: the per-tile compositing of 3D Gaussian splatting (Kerbl et al. 2023) with gsplat 1.4's
"classic" rules, written as Triton programs; the oracle is ``vist3a_rt.rendering.reference``
(whose module docstring states every rule) and, for this op alone, ``blend_tiles_reference``
below. The code is ours.

Scope: this module is the blending step. The rest of a render -- EWA projection, SH colour,
tile binning and the per-tile depth sort -- is the reference rasterizer's own torch code, run
on the GPU by ``vist3a_rt.rendering.api`` (render backend "triton"); a Triton projection and
binning are the next step if profiles ask for them.

Blending: one program per ``tile_size`` x ``tile_size`` tile (every pixel of it in one block,
padded to a power of two), walking that tile's depth-sorted Gaussians ``BLOCK_G`` at a time.
Per chunk it evaluates the [pixels, Gaussians] block at once: ``sigma = 1/2 d^T conic d``,
``alpha = min(0.999, opacity exp(-sigma))``, skipped when ``sigma < 0`` or
``alpha < 1/255``; the transmittance is a cumulative product along the chunk, and a pixel ends
*before* the first Gaussian that would bring it to ``<= 1e-4`` (that one is excluded). The
program stops as soon as every pixel of its tile has ended (early termination), and records
per pixel where it ended (``last``) for the backward. Outputs: ``acc [H*W, C]`` =
``sum w_i f_i`` (C feature channels: RGB and depth for a render) and the final transmittance
``T [H*W]``; background, the alpha channel and the colour clamp are applied by the caller.

Backward (``torch.autograd.Function``): one program per tile walks its chunks back to front,
rebuilding each ``T_i`` from the final T by division by ``1 - alpha`` (as gsplat does), and
accumulates d means2d, d conics, d opacities and d features with float32 atomics (a Gaussian
is blended in several tiles). Gradients through ``min(0.999, .)`` stop where the cap applies,
exactly as ``torch.clamp``'s do in the reference.

Shapes: N projected Gaussians (means2d [N, 2], conics [N, 3] = (xx, xy, yy) of the inverse 2D
covariance, opacities [N], features [N, C] with C <= 4), the tile lists ``ids [M]`` (indices
into N, grouped by row-major tile, nearest first) with ``starts, counts [tiles]``. Maths in
float32 (as gsplat's CUDA); inputs are converted, outputs are float32. CUDA tensors; CPU
tensors only under ``TRITON_INTERPRET=1``. Any image size >= 1x1 and tile size >= 1.

Interpreter (how CPU-only machines test this file): chunks of 16 instead of 32, and no
custom-combine reductions -- the product of a chunk's factors is read off the cumulative
product (its minimum) because the interpreter runs ``tl.reduce`` with a Python combine
function element by element (20x slower); the atomics are float32, which it supports.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_common import interpreting

ALPHA_MAX = 0.999
ALPHA_MIN = 1.0 / 255.0
TRANSMITTANCE_MIN = 1e-4
CHANNELS = 4  # the kernels carry 4 feature channels (RGB + depth); fewer are zero-padded


INTERPRET = interpreting()  # fixed at import: the kernels below are decorated accordingly
BLOCK_G = 16 if INTERPRET else 32  # Gaussians per chunk


# ---------------------------------------------------------------------------- jit helpers


@triton.jit
def _tile_pixels(tile, width, height, tiles_x, TILE: tl.constexpr, TILE_PAD: tl.constexpr):
    """Flat pixel index, centre x / y and validity of every pixel slot of a (padded) tile."""
    slot = tl.arange(0, TILE_PAD * TILE_PAD)
    row = (tile // tiles_x) * TILE + slot // TILE_PAD
    col = (tile % tiles_x) * TILE + slot % TILE_PAD
    inside = (slot // TILE_PAD < TILE) & (slot % TILE_PAD < TILE) & (row < height) & (col < width)
    return row * width + col, col.to(tl.float32) + 0.5, row.to(tl.float32) + 0.5, inside


@triton.jit
def _chunk(MEANS2D, CONICS, OPACITIES, IDS, start, offs, count, px, py):
    """Gaussian ids of a chunk, validity, and per (pixel, Gaussian): dx, dy, sigma, raw alpha."""
    g_valid = offs < count
    gid = tl.load(IDS + start + offs, mask=g_valid, other=0)
    mx = tl.load(MEANS2D + gid * 2, mask=g_valid, other=0.0)
    my = tl.load(MEANS2D + gid * 2 + 1, mask=g_valid, other=0.0)
    c0 = tl.load(CONICS + gid * 3, mask=g_valid, other=0.0)
    c1 = tl.load(CONICS + gid * 3 + 1, mask=g_valid, other=0.0)
    c2 = tl.load(CONICS + gid * 3 + 2, mask=g_valid, other=0.0)
    opacity = tl.load(OPACITIES + gid, mask=g_valid, other=0.0)
    dx = px[:, None] - mx[None, :]
    dy = py[:, None] - my[None, :]
    sigma = 0.5 * (c0[None, :] * dx * dx + c2[None, :] * dy * dy) + c1[None, :] * dx * dy
    raw = opacity[None, :] * tl.exp(-sigma)
    return gid, g_valid, c0, c1, c2, dx, dy, sigma, raw


# ---------------------------------------------------------------------------- kernels


@triton.jit
def _blend_fwd(MEANS2D, CONICS, OPACITIES, FEATURES, IDS, STARTS, COUNTS, ACC, TRANS, LAST,
               width, height, tiles_x, TILE: tl.constexpr, TILE_PAD: tl.constexpr,
               BLOCK_G: tl.constexpr):
    """One program per tile: front-to-back over its sorted Gaussians until every pixel ends."""
    tile = tl.program_id(0)
    pixel, px, py, inside = _tile_pixels(tile, width, height, tiles_x, TILE, TILE_PAD)
    start = tl.load(STARTS + tile)
    count = tl.load(COUNTS + tile)
    trans = tl.full(px.shape, 1.0, tl.float32)
    acc0 = tl.zeros(px.shape, tl.float32)
    acc1 = tl.zeros(px.shape, tl.float32)
    acc2 = tl.zeros(px.shape, tl.float32)
    acc3 = tl.zeros(px.shape, tl.float32)
    last = tl.zeros(px.shape, tl.int32) + count  # index of the terminating Gaussian, else count
    done = ~inside  # slots outside the image never hold the tile open
    base = 0
    while (base < count) & (tl.min(done.to(tl.int32), 0) == 0):
        offs = base + tl.arange(0, BLOCK_G)
        gid, g_valid, _, _, _, _, _, sigma, raw = _chunk(MEANS2D, CONICS, OPACITIES, IDS, start, offs,
                                                         count, px, py)
        alpha = tl.minimum(raw, 0.999)
        hit = (sigma >= 0) & (alpha >= 1.0 / 255.0) & g_valid[None, :]
        alpha = tl.where(hit, alpha, 0.0)
        through = tl.cumprod(1.0 - alpha, axis=1)  # T after each Gaussian, relative to the chunk
        keep = hit & (trans[:, None] * through > 1e-4) & ~done[:, None]
        weight = tl.where(keep, alpha * trans[:, None] * (through / (1.0 - alpha)), 0.0)
        acc0 += tl.sum(weight * tl.load(FEATURES + gid * 4, mask=g_valid, other=0.0)[None, :], 1)
        acc1 += tl.sum(weight * tl.load(FEATURES + gid * 4 + 1, mask=g_valid, other=0.0)[None, :], 1)
        acc2 += tl.sum(weight * tl.load(FEATURES + gid * 4 + 2, mask=g_valid, other=0.0)[None, :], 1)
        acc3 += tl.sum(weight * tl.load(FEATURES + gid * 4 + 3, mask=g_valid, other=0.0)[None, :], 1)
        # Kept Gaussians form a prefix of the hits, so their product is the smallest kept
        # ``through`` (a min, not a product reduction: the interpreter runs those in Python).
        trans = trans * tl.min(tl.where(keep, through, 1.0), 1)
        ending = tl.min(tl.where(hit & ~keep & ~done[:, None], offs[None, :], 2147483647), 1)
        last = tl.where(ending < 2147483647, ending, last)
        done = done | (ending < 2147483647)
        base += BLOCK_G
    tl.store(ACC + pixel * 4, acc0, mask=inside)
    tl.store(ACC + pixel * 4 + 1, acc1, mask=inside)
    tl.store(ACC + pixel * 4 + 2, acc2, mask=inside)
    tl.store(ACC + pixel * 4 + 3, acc3, mask=inside)
    tl.store(TRANS + pixel, trans, mask=inside)
    tl.store(LAST + pixel, last, mask=inside)


@triton.jit
def _blend_bwd(MEANS2D, CONICS, OPACITIES, FEATURES, IDS, STARTS, COUNTS, TRANS, LAST,
               GRAD_ACC, GRAD_TRANS, D_MEANS2D, D_CONICS, D_OPACITIES, D_FEATURES,
               width, height, tiles_x, TILE: tl.constexpr, TILE_PAD: tl.constexpr,
               BLOCK_G: tl.constexpr):
    """One program per tile: back to front over the Gaussians its pixels blended."""
    tile = tl.program_id(0)
    pixel, px, py, inside = _tile_pixels(tile, width, height, tiles_x, TILE, TILE_PAD)
    start = tl.load(STARTS + tile)
    final = tl.load(TRANS + pixel, mask=inside, other=1.0)
    last = tl.load(LAST + pixel, mask=inside, other=0)  # Gaussians [0, last) of the tile were seen
    g0 = tl.load(GRAD_ACC + pixel * 4, mask=inside, other=0.0)
    g1 = tl.load(GRAD_ACC + pixel * 4 + 1, mask=inside, other=0.0)
    g2 = tl.load(GRAD_ACC + pixel * 4 + 2, mask=inside, other=0.0)
    g3 = tl.load(GRAD_ACC + pixel * 4 + 3, mask=inside, other=0.0)
    g_final = tl.load(GRAD_TRANS + pixel, mask=inside, other=0.0) * final
    end = tl.max(last, 0)
    trans = final  # transmittance after the chunk being processed
    later = tl.zeros(px.shape, tl.float32)  # sum over later Gaussians of w_j (f_j . g)
    num_chunks = tl.cdiv(end, BLOCK_G)
    for i in range(num_chunks):
        offs = (num_chunks - 1 - i) * BLOCK_G + tl.arange(0, BLOCK_G)
        gid, g_valid, c0, c1, c2, dx, dy, sigma, raw = _chunk(MEANS2D, CONICS, OPACITIES, IDS, start,
                                                              offs, end, px, py)
        alpha = tl.minimum(raw, 0.999)
        seen = (sigma >= 0) & (alpha >= 1.0 / 255.0) & (offs[None, :] < last[:, None])
        alpha = tl.where(seen, alpha, 0.0)
        suffix = tl.cumprod(1.0 - alpha, axis=1, reverse=True)
        t_before = trans[:, None] / suffix  # T_i: transmittance in front of Gaussian i
        weight = alpha * t_before
        f0 = tl.load(FEATURES + gid * 4, mask=g_valid, other=0.0)
        f1 = tl.load(FEATURES + gid * 4 + 1, mask=g_valid, other=0.0)
        f2 = tl.load(FEATURES + gid * 4 + 2, mask=g_valid, other=0.0)
        f3 = tl.load(FEATURES + gid * 4 + 3, mask=g_valid, other=0.0)
        fg = (f0[None, :] * g0[:, None] + f1[None, :] * g1[:, None] + f2[None, :] * g2[:, None]
              + f3[None, :] * g3[:, None])
        contribution = weight * fg
        behind = later[:, None] + tl.cumsum(contribution, axis=1, reverse=True) - contribution
        d_alpha = t_before * fg - (behind + g_final[:, None]) / (1.0 - alpha)
        d_raw = tl.where(seen & (raw <= 0.999), d_alpha, 0.0)  # min(0.999, .) passes below the cap
        d_sigma = -d_raw * raw
        tl.atomic_add(D_OPACITIES + gid, tl.sum(d_raw * tl.exp(-sigma), 0), mask=g_valid)
        tl.atomic_add(D_CONICS + gid * 3, tl.sum(0.5 * d_sigma * dx * dx, 0), mask=g_valid)
        tl.atomic_add(D_CONICS + gid * 3 + 1, tl.sum(d_sigma * dx * dy, 0), mask=g_valid)
        tl.atomic_add(D_CONICS + gid * 3 + 2, tl.sum(0.5 * d_sigma * dy * dy, 0), mask=g_valid)
        tl.atomic_add(D_MEANS2D + gid * 2, -tl.sum(d_sigma * (c0[None, :] * dx + c1[None, :] * dy), 0),
                      mask=g_valid)
        tl.atomic_add(D_MEANS2D + gid * 2 + 1, -tl.sum(d_sigma * (c2[None, :] * dy + c1[None, :] * dx), 0),
                      mask=g_valid)
        tl.atomic_add(D_FEATURES + gid * 4, tl.sum(weight * g0[:, None], 0), mask=g_valid)
        tl.atomic_add(D_FEATURES + gid * 4 + 1, tl.sum(weight * g1[:, None], 0), mask=g_valid)
        tl.atomic_add(D_FEATURES + gid * 4 + 2, tl.sum(weight * g2[:, None], 0), mask=g_valid)
        tl.atomic_add(D_FEATURES + gid * 4 + 3, tl.sum(weight * g3[:, None], 0), mask=g_valid)
        later += tl.sum(contribution, 1)
        trans = trans / tl.min(suffix, 1)  # the whole chunk's product: T in front of it


# ---------------------------------------------------------------------------- launchers


def _grid_args(width: int, height: int, tile_size: int) -> tuple[int, dict]:
    tiles_x = math.ceil(width / tile_size)
    return tiles_x * math.ceil(height / tile_size), dict(
        TILE=tile_size, TILE_PAD=triton.next_power_of_2(tile_size), BLOCK_G=BLOCK_G)


def _forward(means2d, conics, opacities, features, ids, starts, counts, width, height, tile_size):
    """-> acc [H*W, 4], trans [H*W], last [H*W] int32 (float32, contiguous inputs)."""
    pixels = width * height
    acc = torch.zeros(pixels, CHANNELS, dtype=torch.float32, device=means2d.device)
    trans = torch.ones(pixels, dtype=torch.float32, device=means2d.device)
    last = torch.zeros(pixels, dtype=torch.int32, device=means2d.device)
    tiles, meta = _grid_args(width, height, tile_size)
    _blend_fwd[(tiles,)](means2d, conics, opacities, features, ids, starts, counts, acc, trans, last,
                         width, height, math.ceil(width / tile_size), **meta)
    return acc, trans, last


class _BlendTiles(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, opacities, features, ids, starts, counts, width, height, tile_size):
        inputs = [t.detach().to(torch.float32).contiguous() for t in (means2d, conics, opacities)]
        channels = features.shape[1]
        padded = torch.zeros(len(features), CHANNELS, dtype=torch.float32, device=features.device)
        padded[:, :channels] = features.detach()
        acc, trans, last = _forward(*inputs, padded, ids, starts, counts, width, height, tile_size)
        ctx.save_for_backward(*inputs, padded, ids, starts, counts, trans, last)
        ctx.meta = (width, height, tile_size, channels, [t.dtype for t in (means2d, conics, opacities, features)])
        return acc[:, :channels], trans

    @staticmethod
    def backward(ctx, grad_acc, grad_trans):
        means2d, conics, opacities, features, ids, starts, counts, trans, last = ctx.saved_tensors
        width, height, tile_size, channels, dtypes = ctx.meta
        g_acc = torch.zeros(len(trans), CHANNELS, dtype=torch.float32, device=trans.device)
        if grad_acc is not None:
            g_acc[:, :channels] = grad_acc
        g_trans = (torch.zeros_like(trans) if grad_trans is None else grad_trans.to(torch.float32)).contiguous()
        grads = [torch.zeros_like(t) for t in (means2d, conics, opacities, features)]
        tiles, meta = _grid_args(width, height, tile_size)
        _blend_bwd[(tiles,)](means2d, conics, opacities, features, ids, starts, counts, trans, last,
                             g_acc, g_trans, *grads, width, height, math.ceil(width / tile_size), **meta)
        grads[3] = grads[3][:, :channels]
        return (*(g.to(d) for g, d in zip(grads, dtypes)), None, None, None, None, None, None)


def blend_tiles(
    means2d: torch.Tensor,  # [N, 2] pixel coordinates
    conics: torch.Tensor,  # [N, 3] inverse 2D covariance (xx, xy, yy)
    opacities: torch.Tensor,  # [N] in [0, 1]
    features: torch.Tensor,  # [N, C], C <= 4 (RGB + depth for a render)
    ids: torch.Tensor,  # [M] Gaussian index per tile entry, grouped by tile, nearest first
    starts: torch.Tensor,  # [tiles] offset of each tile's entries in ids
    counts: torch.Tensor,  # [tiles] number of entries per tile
    width: int,
    height: int,
    tile_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:  # acc [H*W, C] float32, trans [H*W] float32
    """Front-to-back blending per tile (see the module docstring); differentiable in the first four."""
    n = len(means2d)
    tiles = math.ceil(width / tile_size) * math.ceil(height / tile_size)
    expected = {"means2d": (means2d, (n, 2)), "conics": (conics, (n, 3)), "opacities": (opacities, (n,)),
                "starts": (starts, (tiles,)), "counts": (counts, (tiles,))}
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")
    if features.dim() != 2 or len(features) != n or not 1 <= features.shape[1] <= CHANNELS:
        raise ValueError(f"features must be [{n}, C] with 1 <= C <= {CHANNELS}, got {list(features.shape)}")
    devices = {t.device for t in (means2d, conics, opacities, features, ids, starts, counts)}
    if len(devices) != 1 or (means2d.device.type != "cuda" and not INTERPRET):
        raise ValueError(f"blend_tiles needs every tensor on one CUDA device, got {sorted(map(str, devices))} "
                         f"(CPU tensors run only under TRITON_INTERPRET=1)")
    index = [t.to(torch.int32).contiguous() for t in (ids, starts, counts)]
    return _BlendTiles.apply(means2d, conics, opacities, features, *index, width, height, int(tile_size))


# ---------------------------------------------------------------------------- reference


def blend_tiles_reference(means2d, conics, opacities, features, ids, starts, counts,
                          width: int, height: int, tile_size: int = 16):
    """``blend_tiles`` in plain torch (differentiable, dense per tile): the op's oracle."""
    acc = features.new_zeros(width * height, features.shape[1])
    trans = features.new_ones(width * height)
    tiles_x = math.ceil(width / tile_size)
    for tile, (start, count) in enumerate(zip(starts.tolist(), counts.tolist())):
        if not count:
            continue
        ty, tx = divmod(tile, tiles_x)
        rows = torch.arange(ty * tile_size, min((ty + 1) * tile_size, height), device=acc.device)
        cols = torch.arange(tx * tile_size, min((tx + 1) * tile_size, width), device=acc.device)
        rr, cc = torch.meshgrid(rows, cols, indexing="ij")
        pixel = (rr * width + cc).reshape(-1)
        centre = torch.stack([cc, rr], -1).reshape(-1, 1, 2).to(means2d.dtype) + 0.5
        g = ids[start:start + count].long()
        dx, dy = (centre - means2d[g]).unbind(-1)  # [P, G]
        c = conics[g]
        sigma = 0.5 * (c[:, 0] * dx * dx + c[:, 2] * dy * dy) + c[:, 1] * dx * dy
        alpha = torch.clamp(opacities[g] * torch.exp(-sigma), max=ALPHA_MAX)
        hit = (sigma >= 0) & (alpha >= ALPHA_MIN)
        alpha = torch.where(hit, alpha, torch.zeros_like(alpha))
        through = torch.cumprod(1 - alpha, dim=1)
        keep = hit & (through > TRANSMITTANCE_MIN)  # prefix-closed: ends before the first <= 1e-4
        before = torch.cat([torch.ones_like(through[:, :1]), through[:, :-1]], dim=1)
        weight = torch.where(keep, alpha * before, torch.zeros_like(alpha))
        acc = acc.index_copy(0, pixel, weight @ features[g])
        trans = trans.index_copy(0, pixel, torch.where(keep, 1 - alpha, torch.ones_like(alpha)).prod(1))
    return acc, trans


# ---------------------------------------------------------------------------- ahead-of-time variants


def aot_variants(tile_size: int = 16) -> list[dict]:
    """``[{fn, signature, constexprs, attrs, options}]`` for ``triton.compile`` (as in
    ``triton_attention.aot_variants``): both kernels at the default tile size."""
    meta = {**_grid_args(tile_size, tile_size, tile_size)[1], "BLOCK_G": 32}
    variants = []
    for kernel in (_blend_fwd, _blend_bwd):
        signature = {name: ("constexpr" if name in meta else "i32" if name in ("width", "height", "tiles_x")
                            else "*i32" if name in ("IDS", "STARTS", "COUNTS", "LAST") else "*fp32")
                     for name in kernel.arg_names}
        pointers = [i for i, name in enumerate(kernel.arg_names) if signature[name].startswith("*")]
        variants.append({"fn": kernel, "signature": signature, "constexprs": meta,
                         "attrs": {(i,): [["tt.divisibility", 16]] for i in pointers}, "options": {"num_warps": 8}})
    return variants
