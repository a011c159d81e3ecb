"""Analytic ray casting of a ``SceneGraph``: exact depth, object ids and shaded RGB.

Every pixel's ray is intersected in closed form with every primitive (sphere: quadratic; cube:
slab test in its yawed frame; cylinder and cone: quadratic side + cap discs) and with the ground
plane z = 0; the nearest hit wins. Rays are ``o + t d`` with the camera-space z of ``d`` equal to
1, so the hit parameter ``t`` *is* the depth (camera-space z), exactly.

Shading: ``albedo * (ambient + (1 - ambient) * max(n.l, 0) * lit)`` for a directional light,
``lit`` = 0 where a shadow ray towards the light hits an object. The ground is a grey checker in
world coordinates (so pose and depth are observable from texture) whose contrast fades where a
pixel covers a whole tile (a cheap analytic anti-alias against moire at grazing angles). Rays
that hit nothing see a sky gradient, depth 0, id -1 (the default cameras never see sky).

Vectorised float32 numpy, single-threaded by construction: torch's intra-op pool (and MKL's
vector-math threads behind its sqrt/floor) stall for milliseconds per op on a busy 2-core
machine, numpy does not; a data-loader worker is one core anyway. Only element-wise,
correctly rounded ops (+ - * / sqrt floor min max), so each pixel's result is independent of
the other pixels and renders are bit-identical across runs and processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ...errors import Vist3AInputError
from ...scene.cameras import Cameras
from .config import WorldConfig
from .scene_graph import COLOURS, Primitive, SceneGraph

RENDER_VERSION = 1  # bump when pixels change: it is part of the disk-cache key
_EPS = 1e-4  # smallest accepted hit distance (along d)
_SHADOW_OFFSET = 1e-3  # shadow rays start this far off the surface (world units)
_GROUND_LIGHT, _GROUND_DARK = (0.62, 0.62, 0.60), (0.36, 0.36, 0.35)
_SKY_HORIZON, _SKY_ZENITH = (0.80, 0.86, 0.93), (0.40, 0.58, 0.86)
_INF = np.float32(np.inf)
_F32 = np.float32
Array = np.ndarray


@dataclass
class WorldRender:
    rgb: Tensor  # [T, 3, H, W] float32 in [0, 1]
    depth: Tensor  # [T, H, W] float32 camera-space z of the visible surface; 0 where the ray hits nothing
    object_ids: Tensor  # [T, H, W] int64: -1 nothing (sky), 0 ground, 1 + i for scene.objects[i]


@dataclass
class Rays:
    """``o + t d``; each component a float32 array broadcastable to the image batch [T, H, W]."""

    ox: Array
    oy: Array
    oz: Array
    dx: Array
    dy: Array
    dz: Array

    def at(self, t: Array) -> tuple[Array, Array, Array]:
        return self.ox + t * self.dx, self.oy + t * self.dy, self.oz + t * self.dz


def camera_rays(cameras: Cameras) -> Rays:
    """One ray per pixel centre; direction = R @ ((u - cx) / fx, (v - cy) / fy, 1)."""
    c2w, K = cameras.camtoworld.detach().cpu().float().numpy(), cameras.K.detach().cpu().float().numpy()
    col = lambda m, i, j: m[:, i, j].reshape(-1, 1, 1)  # noqa: E731  [T, 1, 1]
    u = np.arange(cameras.width, dtype=_F32).reshape(1, 1, -1) + _F32(0.5)
    v = np.arange(cameras.height, dtype=_F32).reshape(1, -1, 1) + _F32(0.5)
    x, y = (u - col(K, 0, 2)) / col(K, 0, 0), (v - col(K, 1, 2)) / col(K, 1, 1)  # [T,1,W], [T,H,1]
    d = [col(c2w, i, 0) * x + col(c2w, i, 1) * y + col(c2w, i, 2) for i in range(3)]  # [T, H, W] each
    return Rays(col(c2w, 0, 3), col(c2w, 1, 3), col(c2w, 2, 3), *d)


def _nonzero(x: Array) -> Array:
    return np.where(x == 0, _F32(1e-30), x)


def _first(hit: Array, t: Array) -> Array:
    with np.errstate(invalid="ignore"):
        return np.where(hit & (t > _EPS), t, _INF)


def _ground(rays: Rays) -> tuple[Array, tuple]:
    t = _first(rays.dz < 0, -rays.oz / _nonzero(rays.dz))
    return t, (0.0, 0.0, 1.0)


def _sphere(rays: Rays, prim: Primitive) -> tuple[Array, tuple]:
    cx, cy, cz = prim.centre
    r = prim.scale
    px, py, pz = rays.ox - _F32(cx), rays.oy - _F32(cy), rays.oz - _F32(cz)
    a = rays.dx * rays.dx + rays.dy * rays.dy + rays.dz * rays.dz
    b = px * rays.dx + py * rays.dy + pz * rays.dz
    disc = b * b - a * (px * px + py * py + pz * pz - _F32(r * r))
    t = _first(disc >= 0, (-b - np.sqrt(np.maximum(disc, 0))) / a)
    inv_r = _F32(1.0 / r)
    return t, ((px + t * rays.dx) * inv_r, (py + t * rays.dy) * inv_r, (pz + t * rays.dz) * inv_r)


def _cube(rays: Rays, prim: Primitive) -> tuple[Array, tuple]:
    cx, cy, cz = prim.centre
    s, c, n = _F32(prim.scale), _F32(math.cos(prim.yaw)), _F32(math.sin(prim.yaw))
    px, py = rays.ox - _F32(cx), rays.oy - _F32(cy)
    local_o = (c * px + n * py, -n * px + c * py, rays.oz - _F32(cz))  # rotated by -yaw
    local_d = (c * rays.dx + n * rays.dy, -n * rays.dx + c * rays.dy, rays.dz)
    near, far = [], []
    for o, d in zip(local_o, local_d):
        inv = _F32(1.0) / _nonzero(d)
        t1, t2 = (-s - o) * inv, (s - o) * inv
        near.append(np.minimum(t1, t2))
        far.append(np.maximum(t1, t2))
    t_near = np.maximum(np.maximum(near[0], near[1]), near[2])
    t_far = np.minimum(np.minimum(far[0], far[1]), far[2])
    t = _first(t_near <= t_far, t_near)
    # the face is that of the slab entered last
    on_x = near[0] >= np.maximum(near[1], near[2])
    on_y = ~on_x & (near[1] >= near[2])
    zero = _F32(0.0)
    nlx = np.where(on_x, -np.sign(local_d[0]), zero)
    nly = np.where(on_y, -np.sign(local_d[1]), zero)
    nlz = np.where(~on_x & ~on_y, -np.sign(local_d[2]), zero)
    return t, (c * nlx - n * nly, n * nlx + c * nly, nlz)


def _cap(rays: Rays, px: Array, py: Array, z: float, radius: float) -> Array:
    """Hit distance of the horizontal disc at height ``z`` (``px, py``: origin minus the axis)."""
    t = (_F32(z) - rays.oz) / _nonzero(rays.dz)
    x, y = px + t * rays.dx, py + t * rays.dy
    return _first(x * x + y * y <= _F32(radius * radius), t)


def _cylinder(rays: Rays, prim: Primitive) -> tuple[Array, tuple]:
    x0, y0, z0 = prim.position
    r, z1 = prim.scale, prim.top
    px, py = rays.ox - _F32(x0), rays.oy - _F32(y0)
    a = rays.dx * rays.dx + rays.dy * rays.dy
    b = px * rays.dx + py * rays.dy
    disc = b * b - a * (px * px + py * py - _F32(r * r))
    t_side = (-b - np.sqrt(np.maximum(disc, 0))) / np.maximum(a, _F32(1e-12))
    z = rays.oz + t_side * rays.dz
    t_side = _first((disc >= 0) & (a > 1e-12) & (z >= z0) & (z <= z1), t_side)
    t_top, t_bottom = _cap(rays, px, py, z1, r), _cap(rays, px, py, z0, r)
    t = np.minimum(t_side, np.minimum(t_top, t_bottom))
    side, inv_r = t == t_side, _F32(1.0 / r)
    with np.errstate(invalid="ignore"):
        nx = np.where(side, (px + t * rays.dx) * inv_r, _F32(0.0))
        ny = np.where(side, (py + t * rays.dy) * inv_r, _F32(0.0))
    nz = np.where(side, _F32(0.0), np.where(t == t_top, _F32(1.0), _F32(-1.0)))
    return t, (nx, ny, nz)


def _cone(rays: Rays, prim: Primitive) -> tuple[Array, tuple]:
    x0, y0, z0 = prim.position
    r, apex = prim.scale, prim.top
    k2 = _F32((r / prim.height) ** 2)  # x^2 + y^2 = k^2 (apex - z)^2 on the side
    px, py, w = rays.ox - _F32(x0), rays.oy - _F32(y0), _F32(apex) - rays.oz
    a = rays.dx * rays.dx + rays.dy * rays.dy - k2 * rays.dz * rays.dz
    b = px * rays.dx + py * rays.dy + k2 * w * rays.dz
    disc = b * b - a * (px * px + py * py - k2 * w * w)
    root = np.sqrt(np.maximum(disc, 0))
    a = np.where(np.abs(a) < 1e-12, _F32(1e-12), a)
    t_side = np.full(np.broadcast_shapes(disc.shape, a.shape), _INF, dtype=_F32)
    for t in ((-b - root) / a, (-b + root) / a):  # the nearest root on the upper nappe, below the apex
        z = rays.oz + t * rays.dz
        t_side = np.minimum(t_side, _first((disc >= 0) & (z >= z0) & (z <= apex), t))
    t = np.minimum(t_side, _cap(rays, px, py, z0, r))
    side = t == t_side
    with np.errstate(invalid="ignore", divide="ignore"):
        hx, hy, hz = px + t * rays.dx, py + t * rays.dy, k2 * (w - t * rays.dz)  # gradient / 2
        inv_norm = _F32(1.0) / np.sqrt(hx * hx + hy * hy + hz * hz)
        return t, (np.where(side, hx * inv_norm, _F32(0.0)), np.where(side, hy * inv_norm, _F32(0.0)),
                   np.where(side, hz * inv_norm, _F32(-1.0)))


_INTERSECT = {"sphere": _sphere, "cube": _cube, "cylinder": _cylinder, "cone": _cone}


def trace(objects: tuple[Primitive, ...], rays: Rays) -> tuple[Array, Array]:
    """Hit distances [1 + P, T, H, W] (ground first, inf = miss) and normals [1 + P, 3, T, H, W]."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        hits = [_ground(rays)] + [_INTERSECT[o.shape](rays, o) for o in objects]
    shape = np.broadcast_shapes(*(t.shape for t, _ in hits))
    t = np.stack([np.broadcast_to(h, shape) for h, _ in hits])
    normals = np.stack([np.stack([np.broadcast_to(np.asarray(c, dtype=_F32), shape) for c in n]) for _, n in hits])
    return t, normals


def _in_shadow(objects, x: Array, y: Array, z: Array, light: tuple[float, float, float]) -> Array:
    rays = Rays(x, y, z, *(np.asarray(c, dtype=_F32) for c in light))
    blocked = np.zeros(x.shape, dtype=bool)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for obj in objects:
            blocked |= np.isfinite(_INTERSECT[obj.shape](rays, obj)[0])
    return blocked


def _ground_albedo(x: Array, y: Array, footprint: Array, tile: float) -> Array:  # -> [3, T, H, W]
    inv_tile = _F32(1.0 / tile)
    with np.errstate(invalid="ignore"):
        parity = np.mod(np.floor(x * inv_tile) + np.floor(y * inv_tile), _F32(2.0))  # 0 or 1
    contrast = np.clip(_F32(1.0) - footprint * inv_tile, 0, 1) * (_F32(1.0) - _F32(2.0) * parity)  # +-1 faded
    light, dark = np.array(_GROUND_LIGHT, dtype=_F32), np.array(_GROUND_DARK, dtype=_F32)
    return ((light + dark) / 2).reshape(3, 1, 1, 1) + ((light - dark) / 2).reshape(3, 1, 1, 1) * contrast


def _sky(rays: Rays) -> Array:  # -> [3, T, H, W]
    up = np.clip(rays.dz / np.sqrt(rays.dx * rays.dx + rays.dy * rays.dy + rays.dz * rays.dz), 0, 1)
    horizon = np.array(_SKY_HORIZON, dtype=_F32).reshape(3, 1, 1, 1)
    zenith = np.array(_SKY_ZENITH, dtype=_F32).reshape(3, 1, 1, 1)
    return horizon + (zenith - horizon) * up


def render(scene: SceneGraph, cameras: Cameras, config: WorldConfig | None = None) -> WorldRender:
    """RGB, depth and object ids of ``scene`` seen by every camera of ``cameras``."""
    if not isinstance(cameras, Cameras):
        raise Vist3AInputError(f"render needs Cameras, got {type(cameras).__name__}")
    config = config or WorldConfig()
    # 1. primary rays and the nearest hit per pixel
    rays = camera_rays(cameras)
    t_all, normals = trace(scene.objects, rays)
    index = t_all.argmin(0)  # [T, H, W]
    depth = np.take_along_axis(t_all, index[None], 0)[0]
    hit = np.isfinite(depth)
    normal = np.take_along_axis(normals, index[None, None], 0)[0]  # [3, T, H, W]
    with np.errstate(invalid="ignore"):
        x, y, z = rays.at(depth)
    # 2. albedo: object colours, checker on the ground
    palette = np.array([(0.0, 0.0, 0.0)] + [COLOURS[o.colour] for o in scene.objects], dtype=_F32)  # [1+P, 3]
    albedo = np.moveaxis(palette[index], -1, 0)  # [3, T, H, W]
    focal = cameras.K[:, 1, 1].detach().cpu().float().numpy().reshape(-1, 1, 1)
    cos_ground = np.maximum(-rays.dz / np.sqrt(rays.dx ** 2 + rays.dy ** 2 + rays.dz ** 2), _F32(1e-3))
    footprint = depth / focal / cos_ground  # world size of a pixel on the ground
    albedo = np.where(index == 0, _ground_albedo(x, y, footprint, config.ground_tile), albedo)
    # 3. Lambert + ambient, hard shadows
    norm = math.sqrt(sum(c * c for c in config.light_direction))
    light = tuple(c / norm for c in config.light_direction)
    n_dot_l = np.maximum(normal[0] * _F32(light[0]) + normal[1] * _F32(light[1]) + normal[2] * _F32(light[2]), 0)
    if config.shadows and scene.objects:
        start = [p + _F32(_SHADOW_OFFSET) * n for p, n in zip((x, y, z), normal)]
        n_dot_l = np.where(_in_shadow(scene.objects, *start, light), _F32(0.0), n_dot_l)
    rgb = albedo * (_F32(config.ambient) + _F32(1.0 - config.ambient) * n_dot_l)
    # 4. sky where nothing was hit
    rgb = np.clip(np.where(hit, rgb, _sky(rays)), 0, 1)
    return WorldRender(torch.from_numpy(np.ascontiguousarray(rgb.transpose(1, 0, 2, 3), dtype=_F32)),
                       torch.from_numpy(np.where(hit, depth, _F32(0.0)).astype(_F32)),
                       torch.from_numpy(np.where(hit, index, -1).astype(np.int64)))
