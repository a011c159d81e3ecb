"""C++ CPU Gaussian-splat rasterizer (forward only): the torch-facing wrapper and its lazy loader.

Oracle: ``vist3a_rt.rendering.reference.rasterize_gaussians`` (gsplat 1.4 "classic", RGB+D);
the C++ follows every rule of it (``raster.cpp`` lists them) and is tested against it to 1e-4
with identical radii (measured: ~1e-7, the float32 rounding of the outputs). Inputs are
converted to float32 here, outputs are float32; the maths inside is float64, because the rules
are threshold tests that float32 rounding flips on a few pixels per frame.

Supported: one pinhole camera, N >= 0 Gaussians, SH degree 0-4 (K = 1, 4, 9, 16, 25), any
image size >= 1x1 and tile size >= 1; CPU tensors; no autograd (use the reference for
gradients). Threads: ``num_threads`` (None: all hardware threads) split projection, binning
and tiles; the output does not depend on the thread count.

The compiled module ``_cpu_raster`` (pybind11, numpy in / numpy out, no libtorch) is built by
the repository's root ``CMakeLists.txt`` during ``pip install``. Importing this package never
needs it; the first call does, and says how to build it when it is missing.
"""

from __future__ import annotations

import functools
import importlib
from typing import NamedTuple

import torch

EXTENSION = __name__ + "._cpu_raster"
BUILD_HINT = (
    "build it by reinstalling vist3a-rt from the repository root with a C++17 compiler on the "
    "PATH: `pip install -e .` (or `pip install .`); cmake, ninja and pybind11 come from PyPI "
    "during the build when missing"
)


class CpuRasterizerUnavailable(ImportError):
    """The compiled C++ rasterizer is not importable in this installation."""


class CpuRender(NamedTuple):
    color: torch.Tensor  # [H, W, 3] float32
    depth: torch.Tensor  # [H, W, 1] float32, sum of w z
    alpha: torch.Tensor  # [H, W, 1] float32, 1 - final transmittance
    radii: torch.Tensor  # [N] int32, 0 where dropped
    stats: dict  # milliseconds per stage (project, sort, bin, composite), counts, threads used


@functools.lru_cache(maxsize=None)  # failures are not cached: a later build is picked up
def load_extension():
    """The compiled module; raises CpuRasterizerUnavailable (saying how to build it) if absent."""
    try:
        return importlib.import_module(EXTENSION)
    except ImportError as err:
        raise CpuRasterizerUnavailable(
            f"the C++ CPU rasterizer ({EXTENSION}) is not built in this installation ({err}); "
            f"{BUILD_HINT}") from err


def is_available() -> bool:
    """Whether ``rasterize`` can run here (the compiled module imports)."""
    try:
        load_extension()
    except CpuRasterizerUnavailable:
        return False
    return True


def _numpy(name: str, tensor: torch.Tensor, dtype: torch.dtype):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(f"{name} is on {tensor.device}; the CPU rasterizer needs CPU tensors")
    return tensor.detach().to(dtype).contiguous().numpy()


def rasterize(
    means: torch.Tensor,  # [N, 3] world
    quats: torch.Tensor,  # [N, 4] w first, normalised here
    scales: torch.Tensor,  # [N, 3] linear
    opacities: torch.Tensor,  # [N] in [0, 1]
    sh: torch.Tensor,  # [N, K, 3], K = (degree+1)^2 <= 25, DC first
    viewmat: torch.Tensor,  # [4, 4] world-to-camera
    K: torch.Tensor,  # [3, 3] pixel intrinsics (pinhole)
    width: int,
    height: int,
    background: torch.Tensor | None = None,  # [3], black when None
    *,
    near_plane: float = 1e-10,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    radius_clip: float = 0.1,
    tile_size: int = 16,
    clamp_color: bool = True,
    num_threads: int | None = None,
) -> CpuRender:
    """Render one view with the C++ rasterizer. Values are not validated here (shapes are):
    the public ``vist3a_rt.render`` checks them as the reference does before calling this."""
    if num_threads is not None and (isinstance(num_threads, bool) or int(num_threads) < 1):
        raise ValueError(f"num_threads must be None (all hardware threads) or >= 1, got {num_threads!r}")
    extension = load_extension()
    f32 = functools.partial(_numpy, dtype=torch.float32)
    f64 = functools.partial(_numpy, dtype=torch.float64)
    centre = torch.linalg.inv(viewmat.detach().to(torch.float64))[:3, 3]  # as the reference: inverse(viewmat)
    color, depth, alpha, radii, stats = extension.rasterize(
        f32("means", means), f32("quats", quats), f32("scales", scales),
        f32("opacities", opacities), f32("sh", sh), f64("viewmat", viewmat), f64("K", K),
        f64("centre", centre), int(width), int(height),
        None if background is None else f32("background", background),
        near_plane=float(near_plane), far_plane=float(far_plane), eps2d=float(eps2d),
        radius_clip=float(radius_clip), tile_size=int(tile_size), clamp_color=bool(clamp_color),
        num_threads=0 if num_threads is None else int(num_threads))
    return CpuRender(torch.from_numpy(color), torch.from_numpy(depth), torch.from_numpy(alpha),
                     torch.from_numpy(radii), stats)
