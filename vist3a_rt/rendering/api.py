"""``render(scene, camera)``: the public entry point, dispatching to a rasterizer backend.

Backends:
  * ``"torch"`` -- the differentiable reference (``reference.py``), always present;
  * ``"cpu"`` -- the C++ rasterizer (``vist3a_rt.kernels.cpu_raster``), forward only, CPU
    tensors, float32 in and out (float64 inside: it matches the float64 reference to ~1e-7);
    present when its compiled module was built (``pip install -e .``);
  * ``"triton"`` -- the reference's projection, SH colour, binning and depth sort in torch, then
    the Triton tile-blending kernel (``vist3a_rt.kernels.triton_raster``, float32), differentiable;
    CUDA tensors; present when triton is installed (``pip install 'vist3a-rt[triton]'``) and a
    CUDA device is visible.
``"auto"`` picks the fastest available backend that computes what the call asks for: "cpu" for
float32 CPU scenes that need no gradient, "triton" for float32 CUDA scenes (gradients included),
otherwise "torch" (float64 scenes keep float64 maths; CPU tensors that require grad, with grad
mode on, keep the differentiable reference).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import Vist3AInputError
from .reference import (
    RasterConfig,
    RenderOutput,
    _gaussian_features,
    _tile_intersections,
    check_inputs,
    project_gaussians,
    rasterize_gaussians,
)

KNOWN_BACKENDS = ("torch", "cpu", "triton")
_FASTEST_FIRST = ("triton", "cpu", "torch")
_SCENE_FIELDS = ("means", "scales", "rotations", "sh", "opacities")
_CAMERA_FIELDS = ("camtoworld", "K", "width", "height")


def available_backends() -> list[str]:
    """Backends that can render in this installation."""
    from vist3a_rt.kernels import cpu_raster  # pure Python; the compiled module loads lazily

    backends = ["torch"] + (["cpu"] if cpu_raster.is_available() else [])
    return backends + ([] if _triton_missing() else ["triton"])


def _triton_missing() -> str:
    """Why the "triton" backend cannot run here ("" when it can); imports nothing heavy."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "it needs the triton package: pip install 'vist3a-rt[triton]'"
    if not torch.cuda.is_available():
        return "it needs a CUDA GPU and torch.cuda.is_available() is False"
    return ""


def _needs_grad(tensors: Sequence[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _suits(backend: str, tensors: Sequence[torch.Tensor]) -> bool:
    """Whether ``backend`` computes what a call on ``tensors`` asks for (used by "auto")."""
    if backend == "cpu":
        return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
                and not _needs_grad(tensors))
    if backend == "triton":
        return all(t.device.type == "cuda" and t.dtype == torch.float32 for t in tensors)
    return backend == "torch"


def resolve_backend(backend: str, tensors: Sequence[torch.Tensor] | None = None) -> str:
    """The concrete backend ``backend`` names; raises if unusable.

    "auto" -> the fastest available backend, or with ``tensors`` (the scene's) the fastest one
    that suits them (see the module docstring).
    """
    available = available_backends()
    if backend == "auto":
        return next(name for name in _FASTEST_FIRST
                    if name in available and (tensors is None or _suits(name, tensors)))
    if backend not in KNOWN_BACKENDS:
        raise Vist3AInputError(
            f"unknown render backend {backend!r}; choose one of {['auto', *KNOWN_BACKENDS]}")
    if backend not in available:
        raise Vist3AInputError(
            f"render backend {backend!r} is not available in this build (its rasterizer is not "
            f"built{_build_hint(backend)}); available: {available}, or 'auto'")
    return backend


def _build_hint(backend: str) -> str:
    if backend == "triton":
        return f": {_triton_missing()}"
    if backend != "cpu":
        return ""
    from vist3a_rt.kernels import cpu_raster

    try:
        cpu_raster.load_extension()
    except cpu_raster.CpuRasterizerUnavailable as err:
        return f": {err}"
    return ""


def _fields(obj, names: Sequence[str], what: str) -> list:
    missing = [name for name in names if not hasattr(obj, name)]
    if missing:
        raise Vist3AInputError(
            f"{what} ({type(obj).__name__}) lacks {missing}; it needs attributes {list(names)}")
    return [getattr(obj, name) for name in names]


def _as_background(background, like: torch.Tensor) -> torch.Tensor | None:
    if background is None:
        return None
    if not isinstance(background, torch.Tensor):
        try:
            background = torch.tensor(background, dtype=like.dtype)
        except (TypeError, ValueError) as err:
            raise Vist3AInputError(f"background must be 3 numbers (RGB), got {background!r}") from err
    return background.to(dtype=like.dtype, device=like.device)


def _world_to_camera(camtoworld: torch.Tensor) -> torch.Tensor:  # [4, 4] -> [4, 4]
    if camtoworld.shape != (4, 4):
        raise Vist3AInputError(f"camera.camtoworld must be [4,4] or [T,4,4], got {list(camtoworld.shape)}")
    if not torch.isfinite(camtoworld).all():
        raise Vist3AInputError("camera.camtoworld has non-finite values (nan or inf)")
    viewmat, info = torch.linalg.inv_ex(camtoworld)
    if info.item() != 0:
        raise Vist3AInputError(f"camera.camtoworld is singular: {camtoworld.tolist()}")
    return viewmat


def _camera_views(camera, like: torch.Tensor) -> tuple[list, list, int, int, bool]:
    """(camtoworld list, K list, width, height, batched) in ``like``'s dtype and device."""
    camtoworld, K, width, height = _fields(camera, _CAMERA_FIELDS, "camera")
    camtoworld, K = (torch.as_tensor(m).to(dtype=like.dtype, device=like.device) for m in (camtoworld, K))
    if camtoworld.dim() == 2 and K.dim() == 2:
        return [camtoworld], [K], width, height, False
    if camtoworld.dim() != 3 or K.dim() != 3 or len(camtoworld) != len(K) or len(K) == 0:
        raise Vist3AInputError(
            f"camera needs camtoworld [4,4] and K [3,3], or [T,4,4] and [T,3,3] with the same T >= 1, "
            f"got {list(camtoworld.shape)} and {list(K.shape)}")
    return list(camtoworld), list(K), width, height, True


def render(
    scene,  # .means [N,3], .scales [N,3], .rotations [N,4] (w first), .sh [N,K,3], .opacities [N]
    camera,  # .camtoworld [4,4] or [T,4,4], .K [3,3] or [T,3,3] (pixels), .width, .height
    backend: str = "auto",
    background=None,  # [3] RGB (tensor or sequence); black when None
    config: RasterConfig | None = None,
) -> RenderOutput:
    """Render ``scene`` from ``camera`` (a Camera, or a Cameras batch -> outputs with a leading T).

    Camera tensors are moved to the scene's dtype and device; world-to-camera is
    ``inverse(camtoworld)``. Returns RenderOutput(color [H,W,3], depth [H,W,1], alpha [H,W,1], radii [N]).
    """
    means, scales, rotations, sh, opacities = _fields(scene, _SCENE_FIELDS, "scene")
    if not isinstance(means, torch.Tensor):
        raise Vist3AInputError(f"scene.means must be a torch.Tensor, got {type(means).__name__}")
    camtoworlds, Ks, width, height, batched = _camera_views(camera, means)
    background = _as_background(background, means)
    tensors = [t for t in (means, scales, rotations, sh, opacities, *camtoworlds, *Ks, background)
               if isinstance(t, torch.Tensor)]
    rasterize = _RASTERIZERS[resolve_backend(backend, tensors)]
    config = config or RasterConfig()
    views = [rasterize(means, rotations, scales, opacities, sh, _world_to_camera(c2w), K,
                       width, height, background, config) for c2w, K in zip(camtoworlds, Ks)]
    if not batched:
        return views[0]
    return RenderOutput(*(torch.stack([getattr(v, f) for v in views])
                          for f in ("color", "depth", "alpha", "radii")))


def _rasterize_cpu(means, quats, scales, opacities, sh, viewmat, K, width, height, background,
                   config: RasterConfig) -> RenderOutput:
    """The C++ rasterizer behind the reference's input checks; outputs in the scene's dtype."""
    check_inputs(means, quats, scales, opacities, sh, viewmat, K, width, height, background)
    if means.device.type != "cpu":
        raise Vist3AInputError(
            f"render backend 'cpu' needs CPU tensors, the scene is on {means.device} "
            f"(move it with .cpu(), or use backend='auto')")
    tensors = [means, quats, scales, opacities, sh, viewmat, K]
    if _needs_grad(tensors + ([background] if background is not None else [])):
        raise Vist3AInputError(
            "render backend 'cpu' is forward-only and these tensors require grad; use "
            "backend='torch' (or 'auto') for gradients, or render under torch.no_grad()")
    from vist3a_rt.kernels import cpu_raster

    out = cpu_raster.rasterize(
        means, quats, scales, opacities, sh, viewmat, K, width, height, background,
        near_plane=config.near_plane, far_plane=config.far_plane, eps2d=config.eps2d,
        radius_clip=config.radius_clip, tile_size=int(config.tile_size),
        clamp_color=config.clamp_color)
    dtype = means.dtype
    return RenderOutput(out.color.to(dtype), out.depth.to(dtype), out.alpha.to(dtype), out.radii)


def _rasterize_triton(means, quats, scales, opacities, sh, viewmat, K, width, height, background,
                      config: RasterConfig) -> RenderOutput:
    """The reference's torch projection, colour, binning and depth sort, then Triton blending."""
    check_inputs(means, quats, scales, opacities, sh, viewmat, K, width, height, background)
    from vist3a_rt.kernels import triton_raster

    if means.device.type != "cuda" and not triton_raster.INTERPRET:
        raise Vist3AInputError(
            f"render backend 'triton' needs CUDA tensors, the scene is on {means.device} "
            f"(move it with .cuda(), or use backend='auto')")
    proj = project_gaussians(means, quats, scales, viewmat, K, width, height, config)
    visible = proj.radii > 0
    features = means.new_zeros(len(means), 4).index_put(
        (visible,), _gaussian_features(means[visible], sh[visible], proj.depths[visible], viewmat))
    ids, starts, counts = _tile_intersections(proj, width, height, config.tile_size)
    acc, trans = triton_raster.blend_tiles(proj.means2d, proj.conics, opacities, features, ids, starts,
                                           counts, width, height, config.tile_size)
    acc, trans = acc.to(means.dtype), trans.to(means.dtype)
    color = acc[:, :3] if background is None else acc[:, :3] + trans[:, None] * background
    if config.clamp_color:
        color = color.clamp(0.0, 1.0)
    return RenderOutput(color.reshape(height, width, 3), acc[:, 3:].reshape(height, width, 1),
                        (1 - trans).reshape(height, width, 1), proj.radii)


_RASTERIZERS = {"torch": rasterize_gaussians, "cpu": _rasterize_cpu, "triton": _rasterize_triton}
