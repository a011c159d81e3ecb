"""Gaussian-splat rendering: ``render(scene, camera)`` and the reference rasterizer (the oracle)."""

from .api import KNOWN_BACKENDS, available_backends, render, resolve_backend
from .reference import (
    Projection,
    RasterConfig,
    RenderOutput,
    covariance_3d,
    project_gaussians,
    quat_to_rotmat,
    rasterize_gaussians,
)
from .sh import MAX_SH_DEGREE, SH_C0, eval_sh, sh_basis, sh_degree_from_count

__all__ = [
    "KNOWN_BACKENDS", "MAX_SH_DEGREE", "Projection", "RasterConfig", "RenderOutput", "SH_C0",
    "available_backends", "covariance_3d", "eval_sh", "project_gaussians", "quat_to_rotmat",
    "rasterize_gaussians", "render", "resolve_backend", "sh_basis", "sh_degree_from_count",
]
