"""Reference Gaussian-splat rasterizer: pure torch, differentiable, the oracle for faster ones.

Semantics are those of gsplat 1.4 ``rasterization(..., rasterize_mode="classic",
render_mode="RGB+D", packed=False)`` with a pinhole camera, as the official AnySplat decoder
calls it (near_plane=1e-10, radius_clip=0.1). Facts were read from gsplat's CUDA kernels
(the code that actually runs there); the code here is our own.

Projection, per Gaussian (``project_gaussians``):
  * covariance ``R S S^T R^T``, R from the w-first quaternion after normalisation, S = diag(scales);
  * camera space ``x_c = W x + t`` with ``viewmat = [W t; 0 1]`` (world-to-camera; last row ignored);
  * EWA: ``cov2d = J W cov W^T J^T + eps2d I`` (eps2d = 0.3 px^2, no opacity compensation), J the
    perspective Jacobian at the mean with x/z clamped to [-(cx/fx + 0.3 tan_x), (W-cx)/fx + 0.3 tan_x]
    (tan_x = W / (2 fx); likewise y) -- i.e. +-1.3 tan(half-FOV) for a centred principal point.
    The clamp affects J only; the 2D mean is the unclamped projection ``(fx x/z + cx, fy y/z + cy)``;
  * radius = ceil(3 sqrt(b + sqrt(max(0.01, b^2 - det)))), b = trace/2, det = det(cov2d): an
    integer number of pixels, non-differentiable. After the 0.3 blur it is always >= 2;
  * dropped (radius 0) when z < near_plane or z > far_plane, det <= 0, radius <= radius_clip, or the
    square of half-side ``radius`` around the mean misses the image.
Colour: SH of degree sqrt(K)-1 along ``normalize(mean - camera centre)`` (centre from
``inverse(viewmat)``), plus 0.5, clamped at 0. The 4th channel is camera-space depth z.
Tiles: the image is cut into ``tile_size`` (16) squares; a Gaussian is seen by every pixel of the
tiles its radius box ``[floor((m - r)/ts), ceil((m + r)/ts))`` covers, and by no other pixel.
(Like gsplat, a pixel outside the 3-sigma circle but inside a covered tile still sees it.)
Compositing, per pixel at (col + 0.5, row + 0.5), front to back by depth (ties: input order):
  sigma = 1/2 d^T cov2d^-1 d; alpha = min(0.999, opacity exp(-sigma)); skipped if sigma < 0 or
  alpha < 1/255; the first Gaussian whose ``T (1 - alpha) <= 1e-4`` ends the pixel and is itself
  excluded (so are all after it); weight w_i = alpha_i T_i.
Outputs: color = sum w c + T_final background, clamped to [0, 1] (``clamp_color``); depth = sum w z
(no background; gsplat's "RGB+D", not divided by alpha); alpha = 1 - T_final.

Shapes and dtypes: N Gaussians (N = 0 allowed), one camera, H x W image (any size >= 1x1).
float32 or float64, every tensor on one device and of one dtype; computation happens in that
dtype (gsplat's CUDA is float32), so results agree with gsplat to float rounding -- the
transmittance is a cumulative product here, a running product there.

Limits: pinhole only (K must have zero skew and last row [0, 0, 1]); SH degree <= 4.
Memory: pixel-Gaussian pairs are formed one tile and at most ``chunk_elements`` pairs at a
time; Gaussians are culled per tile first. Without autograd the peak is
O(N + tile intersections + chunk_elements);
with autograd the graph keeps every evaluated pair, as any autograd-through-compositing does.
Speed: correctness first; a 128x128 image of 5k Gaussians takes well under a second on 2 cores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import Vist3AInputError
from .sh import eval_sh, sh_degree_from_count

ALPHA_MAX = 0.999  # gsplat caps alpha so that 1 - alpha never reaches 0
ALPHA_MIN = 1.0 / 255.0  # contributions below one 8-bit step are skipped
TRANSMITTANCE_MIN = 1e-4  # a pixel ends before the Gaussian that would push T to or below this


@dataclass(frozen=True)
class RasterConfig:
    """Rasterization settings; the defaults are the official decoder's."""

    near_plane: float = 1e-10
    far_plane: float = 1e10
    eps2d: float = 0.3  # px^2 low-pass added to every projected covariance
    radius_clip: float = 0.1  # Gaussians with radius <= this (px) are dropped
    tile_size: int = 16
    clamp_color: bool = True  # clamp the final colour to [0, 1] as the decoder does
    chunk_elements: int = 1 << 20  # pixel-Gaussian pairs per dense step (memory bound)

    def __post_init__(self) -> None:
        if not 0 <= self.near_plane < self.far_plane:
            raise Vist3AInputError(
                f"need 0 <= near_plane < far_plane, got {self.near_plane} and {self.far_plane}")
        if self.eps2d < 0 or self.radius_clip < 0:
            raise Vist3AInputError(
                f"eps2d and radius_clip must be >= 0, got {self.eps2d} and {self.radius_clip}")
        if int(self.tile_size) < 1 or int(self.chunk_elements) < 1:
            raise Vist3AInputError(
                f"tile_size and chunk_elements must be >= 1, got {self.tile_size} and {self.chunk_elements}")


@dataclass
class Projection:
    """Per-Gaussian screen-space quantities; entries with ``radii == 0`` are dropped."""

    means2d: torch.Tensor  # [N, 2] pixel coordinates (x right, y down)
    covars2d: torch.Tensor  # [N, 2, 2] including the eps2d low-pass
    conics: torch.Tensor  # [N, 3] inverse covariance (xx, xy, yy)
    depths: torch.Tensor  # [N] camera-space z
    radii: torch.Tensor  # [N] int32 pixels, 0 = dropped


@dataclass
class RenderOutput:
    """A rendered view. Leading [T] dimension when a batch of cameras was rendered."""

    color: torch.Tensor  # [H, W, 3]
    depth: torch.Tensor  # [H, W, 1] accumulated sum w z
    alpha: torch.Tensor  # [H, W, 1] 1 - final transmittance
    radii: torch.Tensor  # [N] int32, 0 where the Gaussian was dropped for this view


# ---------------------------------------------------------------------------- input checks


def _check_tensor(name: str, value, shape: tuple) -> None:
    """``shape`` entries: an int must match, None matches anything."""
    if not isinstance(value, torch.Tensor):
        raise Vist3AInputError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in (torch.float32, torch.float64):
        raise Vist3AInputError(f"{name} must be float32 or float64, got {value.dtype}")
    if value.dim() != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape)):
        expected = "[" + ",".join("*" if s is None else str(s) for s in shape) + "]"
        raise Vist3AInputError(f"{name} must have shape {expected}, got {list(value.shape)}")
    # The sum is finite unless a value is nan/inf (or huge finite values overflow it, which the
    # exact test then clears): 1-2 ms instead of ~45 for torch.isfinite on a 200k x 25 x 3 SH.
    if not torch.isfinite(value.detach().sum()) and not torch.isfinite(value).all():
        raise Vist3AInputError(f"{name} has non-finite values (nan or inf)")


def _check_intrinsics(K: torch.Tensor) -> None:
    K = K.detach()
    fx, fy = float(K[0, 0]), float(K[1, 1])
    if fx <= 0 or fy <= 0:
        raise Vist3AInputError(f"K must have positive focal lengths, got fx={fx}, fy={fy}")
    tol = 1e-6 * max(fx, fy)
    skew = max(abs(float(K[0, 1])), abs(float(K[1, 0])))
    last = K[2].tolist()
    if skew > tol or abs(last[0]) > tol or abs(last[1]) > tol or abs(last[2] - 1) > 1e-6:
        raise Vist3AInputError(
            f"K must be a pinhole matrix [[fx,0,cx],[0,fy,cy],[0,0,1]], got {K.tolist()}")


def _check_values(quats: torch.Tensor, scales: torch.Tensor, opacities: torch.Tensor) -> None:
    quats, scales, opacities = quats.detach(), scales.detach(), opacities.detach()
    if len(opacities) and (opacities.min() < 0 or opacities.max() > 1):
        raise Vist3AInputError(
            f"opacities must lie in [0, 1], got range "
            f"[{float(opacities.min())}, {float(opacities.max())}]")
    if len(scales) and scales.min() < 0:
        raise Vist3AInputError(f"scales must be >= 0 (linear, not log), got min {float(scales.min())}")
    if len(quats) and quats.norm(dim=-1).min() == 0:
        bad = int(torch.nonzero(quats.norm(dim=-1) == 0)[0])
        raise Vist3AInputError(f"rotations must be nonzero quaternions; rotation {bad} is all zeros")


def check_inputs(means, quats, scales, opacities, sh, viewmat, K, width, height, background) -> None:
    """Raise Vist3AInputError naming the first bad argument; see ``rasterize_gaussians``."""
    for name, size in (("width", width), ("height", height)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise Vist3AInputError(f"{name} must be a positive int, got {size!r}")
    _check_tensor("means", means, (None, 3))
    n = means.shape[0]
    for name, value, shape in (("rotations", quats, (n, 4)), ("scales", scales, (n, 3)),
                               ("opacities", opacities, (n,)), ("sh", sh, (n, None, 3)),
                               ("viewmat", viewmat, (4, 4)), ("K", K, (3, 3))):
        _check_tensor(name, value, shape)
    if background is not None:
        _check_tensor("background", background, (3,))
    tensors = [means, quats, scales, opacities, sh, viewmat, K]
    tensors += [background] if background is not None else []
    if len({(t.dtype, t.device) for t in tensors}) != 1:
        found = sorted({f"{t.dtype}@{t.device}" for t in tensors})
        raise Vist3AInputError(f"all tensors must share one dtype and device, got {found}")
    sh_degree_from_count(sh.shape[1])
    _check_intrinsics(K)
    _check_values(quats, scales, opacities)


# ---------------------------------------------------------------------------- projection


def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:  # [N, 4] w-first -> [N, 3, 3]
    """Rotation matrices of (normalised) w-first quaternions."""
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    rows = [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]
    return torch.stack(rows, dim=-1).reshape(quats.shape[:-1] + (3, 3))


def covariance_3d(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:  # -> [N, 3, 3]
    """R S S^T R^T from quats [N, 4] (w first) and linear scales [N, 3]."""
    m = quat_to_rotmat(quats) * scales[:, None, :]  # R S: column j scaled by s_j
    return m @ m.transpose(-1, -2)


def _perspective_jacobian(
    means_c: torch.Tensor,  # [N, 3] camera space, z > 0 (invalid rows already replaced)
    K: torch.Tensor,  # [3, 3]
    width: int,
    height: int,
) -> torch.Tensor:  # [N, 2, 3]
    """d(pixel)/d(camera point) with x/z, y/z clamped a little beyond the image (gsplat's rule).

    The clamp keeps Gaussians far outside the view from getting huge, sheared footprints.
    """
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    x, y, z = means_c.unbind(-1)
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    u = torch.minimum(torch.maximum(x / z, -(cx / fx + 0.3 * tan_x)), (width - cx) / fx + 0.3 * tan_x)
    v = torch.minimum(torch.maximum(y / z, -(cy / fy + 0.3 * tan_y)), (height - cy) / fy + 0.3 * tan_y)
    zero = torch.zeros_like(z)
    rows = [fx / z, zero, -fx * u / z, zero, fy / z, -fy * v / z]
    return torch.stack(rows, dim=-1).reshape(-1, 2, 3)


@torch.no_grad()
def _pixel_radius(covars2d: torch.Tensor, det: torch.Tensor) -> torch.Tensor:  # [N, 2, 2], [N] -> [N]
    """ceil(3 sqrt(largest eigenvalue)), the eigenvalue gap floored at 0.1 as in gsplat."""
    b = 0.5 * (covars2d[:, 0, 0] + covars2d[:, 1, 1])
    largest = b + torch.sqrt(torch.clamp(b * b - det, min=0.01))
    return torch.ceil(3.0 * torch.sqrt(largest))


def project_gaussians(
    means: torch.Tensor,  # [N, 3] world
    quats: torch.Tensor,  # [N, 4] w first
    scales: torch.Tensor,  # [N, 3] linear
    viewmat: torch.Tensor,  # [4, 4] world-to-camera
    K: torch.Tensor,  # [3, 3] pixels
    width: int,
    height: int,
    config: RasterConfig = RasterConfig(),
) -> Projection:
    """EWA projection and culling (see the module docstring). Inputs are not checked here."""
    rot, trans = viewmat[:3, :3], viewmat[:3, 3]
    means_c = means @ rot.T + trans
    z = means_c[:, 2]
    in_depth = (z >= config.near_plane) & (z <= config.far_plane)
    # Dropped Gaussians still flow through the maths; give them a harmless z so that their
    # (zero) gradients stay finite instead of 0 * inf = nan.
    safe_c = torch.where(in_depth[:, None], means_c, means_c.new_tensor([0.0, 0.0, 1.0]))
    foot = _perspective_jacobian(safe_c, K, width, height) @ rot @ (
        quat_to_rotmat(quats) * scales[:, None, :])  # [N, 2, 3]: J W R S
    blur = config.eps2d * torch.eye(2, dtype=means.dtype, device=means.device)
    covars2d = foot @ foot.transpose(-1, -2) + blur  # symmetric by construction
    det = covars2d[:, 0, 0] * covars2d[:, 1, 1] - covars2d[:, 0, 1] * covars2d[:, 1, 0]
    safe_det = torch.where(det > 0, det, torch.ones_like(det))
    adjugate = torch.stack([covars2d[:, 1, 1], -covars2d[:, 0, 1], covars2d[:, 0, 0]], dim=-1)
    conics = adjugate / safe_det[:, None]
    focal, centre = torch.stack([K[0, 0], K[1, 1]]), torch.stack([K[0, 2], K[1, 2]])
    means2d = safe_c[:, :2] / safe_c[:, 2:] * focal + centre
    radius = _pixel_radius(covars2d.detach(), det.detach())
    keep = in_depth & (det > 0) & (radius > config.radius_clip)
    keep &= _on_screen(means2d.detach(), radius, width, height)
    radii = torch.where(keep, radius, torch.zeros_like(radius)).to(torch.int32)
    return Projection(means2d, covars2d, conics, z, radii)


def _on_screen(means2d: torch.Tensor, radius: torch.Tensor, width: int, height: int) -> torch.Tensor:
    x, y = means2d.unbind(-1)
    return (x + radius > 0) & (x - radius < width) & (y + radius > 0) & (y - radius < height)


# ---------------------------------------------------------------------------- tiles


@torch.no_grad()
def _tile_intersections(
    proj: Projection, width: int, height: int, tile_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gaussian ids, tile start offsets, counts): per tile, the Gaussians it sees, nearest first.

    Returns ids [M] (indices into the N Gaussians) grouped by tile (row-major), depth-sorted inside
    a tile with ties in input order, and starts / counts [tiles_y * tiles_x] into ids.
    """
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    visible = torch.nonzero(proj.radii > 0).squeeze(1)
    order = visible[torch.sort(proj.depths[visible], stable=True).indices]
    r = proj.radii[order].to(proj.means2d.dtype)
    m = proj.means2d.detach()[order]
    x0 = torch.floor((m[:, 0] - r) / tile_size).long().clamp(0, tiles_x)
    x1 = torch.ceil((m[:, 0] + r) / tile_size).long().clamp(0, tiles_x)
    y0 = torch.floor((m[:, 1] - r) / tile_size).long().clamp(0, tiles_y)
    y1 = torch.ceil((m[:, 1] + r) / tile_size).long().clamp(0, tiles_y)
    span_x = x1 - x0
    per_gaussian = span_x * (y1 - y0)
    rank = torch.repeat_interleave(torch.arange(len(order), device=m.device), per_gaussian)
    first = torch.cumsum(per_gaussian, 0) - per_gaussian
    local = torch.arange(len(rank), device=m.device) - first[rank]
    tile = (y0[rank] + local // span_x[rank]) * tiles_x + x0[rank] + local % span_x[rank]
    by_tile = torch.sort(tile, stable=True).indices  # stable: keeps depth order within a tile
    counts = torch.bincount(tile, minlength=tiles_x * tiles_y)
    return order[rank[by_tile]], torch.cumsum(counts, 0) - counts, counts


def _tile_pixels(tile: int, width: int, height: int, tile_size: int, like: torch.Tensor):
    """Flat pixel indices [P] and pixel-centre coordinates [P, 2] of one (edge-clipped) tile."""
    tiles_x = math.ceil(width / tile_size)
    row0, col0 = (tile // tiles_x) * tile_size, (tile % tiles_x) * tile_size
    rows = torch.arange(row0, min(row0 + tile_size, height), device=like.device)
    cols = torch.arange(col0, min(col0 + tile_size, width), device=like.device)
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")
    centres = torch.stack([cc, rr], dim=-1).reshape(-1, 2).to(like.dtype) + 0.5
    return (rr * width + cc).reshape(-1), centres


# ---------------------------------------------------------------------------- compositing


def _composite_chunk(
    pixels: torch.Tensor,  # [P, 2] pixel centres
    means2d: torch.Tensor,  # [G, 2] depth-sorted
    conics: torch.Tensor,  # [G, 3]
    opacities: torch.Tensor,  # [G]
    features: torch.Tensor,  # [G, C]
    trans: torch.Tensor,  # [P] transmittance before this chunk
    done: torch.Tensor,  # [P] bool: the pixel already met its terminating Gaussian
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # acc [P, C], trans [P], done [P]
    d = pixels[:, None, :] - means2d[None]  # [P, G, 2]
    dx, dy = d.unbind(-1)
    sigma = 0.5 * (conics[:, 0] * dx * dx + conics[:, 2] * dy * dy) + conics[:, 1] * dx * dy
    alpha = torch.clamp(opacities * torch.exp(-sigma), max=ALPHA_MAX)
    hit = (sigma >= 0) & (alpha >= ALPHA_MIN)
    alpha = torch.where(hit, alpha, torch.zeros_like(alpha))  # skipped: leaves T unchanged
    through = torch.cumprod(1 - alpha, dim=1)  # [P, G] product up to and including each
    # The product counts the terminating Gaussian too, so once it drops to <= 1e-4 it stays
    # there: this mask excludes the terminating Gaussian and everything after it at once.
    keep = hit & (trans[:, None] * through > TRANSMITTANCE_MIN) & ~done[:, None]
    before = trans[:, None] * torch.cat([torch.ones_like(through[:, :1]), through[:, :-1]], dim=1)
    weights = torch.where(keep, alpha * before, torch.zeros_like(alpha))
    new_trans = trans * torch.where(keep, 1 - alpha, torch.ones_like(alpha)).prod(dim=1)
    return weights @ features, new_trans, done | (hit & ~keep).any(dim=1)


def _composite_tile(pixels, means2d, conics, opacities, features, chunk: int):
    """Front-to-back over the tile's depth-sorted Gaussians, ``chunk`` at a time; -> acc [P, C], T [P]."""
    trans = torch.ones(len(pixels), dtype=pixels.dtype, device=pixels.device)
    done = torch.zeros(len(pixels), dtype=torch.bool, device=pixels.device)
    acc = torch.zeros(len(pixels), features.shape[1], dtype=pixels.dtype, device=pixels.device)
    for start in range(0, len(means2d), chunk):
        part = slice(start, start + chunk)
        step, trans, done = _composite_chunk(pixels, means2d[part], conics[part], opacities[part],
                                             features[part], trans, done)
        acc = acc + step
    return acc, trans


def _gaussian_features(means, sh, depths, viewmat) -> torch.Tensor:  # -> [N, 4]
    """RGB from SH along the view ray (+0.5, clamped at 0), then camera-space depth."""
    centre = torch.linalg.inv(viewmat)[:3, 3]
    rgb = torch.clamp_min(eval_sh(sh, means - centre) + 0.5, 0.0)
    return torch.cat([rgb, depths[:, None]], dim=-1)


def rasterize_gaussians(
    means: torch.Tensor,  # [N, 3] world
    quats: torch.Tensor,  # [N, 4] w first, normalised here
    scales: torch.Tensor,  # [N, 3] linear
    opacities: torch.Tensor,  # [N] in [0, 1]
    sh: torch.Tensor,  # [N, K, 3], K = (degree+1)^2, DC first
    viewmat: torch.Tensor,  # [4, 4] world-to-camera
    K: torch.Tensor,  # [3, 3] pixel intrinsics
    width: int,
    height: int,
    background: torch.Tensor | None = None,  # [3], black when None
    config: RasterConfig = RasterConfig(),
) -> RenderOutput:
    """Render one view; differentiable w.r.t. every tensor argument (see the module docstring)."""
    check_inputs(means, quats, scales, opacities, sh, viewmat, K, width, height, background)
    proj = project_gaussians(means, quats, scales, viewmat, K, width, height, config)
    visible = proj.radii > 0
    # Colour only the Gaussians that survive culling (a dropped one may sit on the camera centre).
    features = means.new_zeros(len(means), 4).index_put(
        (visible,), _gaussian_features(means[visible], sh[visible], proj.depths[visible], viewmat))
    acc, trans = _rasterize_tiles(proj, opacities, features, width, height, config)
    color = acc[:, :3] if background is None else acc[:, :3] + trans[:, None] * background
    if config.clamp_color:
        color = color.clamp(0.0, 1.0)
    return RenderOutput(color.reshape(height, width, 3), acc[:, 3:].reshape(height, width, 1),
                        (1 - trans).reshape(height, width, 1), proj.radii)


def _rasterize_tiles(
    proj: Projection,
    opacities: torch.Tensor,  # [N]
    features: torch.Tensor,  # [N, C]
    width: int,
    height: int,
    config: RasterConfig,
) -> tuple[torch.Tensor, torch.Tensor]:  # acc [H*W, C], trans [H*W]
    """Composite every tile that sees a Gaussian; the other pixels keep acc = 0, T = 1."""
    ids, starts, counts = _tile_intersections(proj, width, height, config.tile_size)
    pixel_ids, accs, transes = [], [], []
    starts, counts = starts.tolist(), counts.tolist()
    for tile in (t for t, count in enumerate(counts) if count):
        span = ids[starts[tile]:starts[tile] + counts[tile]]
        pix, centres = _tile_pixels(tile, width, height, config.tile_size, features)
        chunk = max(1, config.chunk_elements // len(pix))
        acc, trans = _composite_tile(centres, proj.means2d[span], proj.conics[span],
                                     opacities[span], features[span], chunk)
        pixel_ids.append(pix)
        accs.append(acc)
        transes.append(trans)
    acc = features.new_zeros(height * width, features.shape[1])
    trans = features.new_ones(height * width)
    if accs:
        index = torch.cat(pixel_ids)
        acc = acc.index_copy(0, index, torch.cat(accs))
        trans = trans.index_copy(0, index, torch.cat(transes))
    return acc, trans
