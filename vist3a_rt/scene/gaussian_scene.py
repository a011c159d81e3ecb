"""``GaussianScene``: a set of 3D Gaussians, the reconstruction network's output.

Conventions (the official decoder's): scales are linear standard deviations, rotations are
unit quaternions stored w first, colours are real spherical-harmonic coefficients with the DC
term first (K = (degree + 1)^2 per channel, degree <= 4; AnySplat predicts degree 4),
opacities are probabilities in [0, 1] (not logits). A scene is validated on construction and
never repaired silently: ``from_unnormalized`` is the one explicit fixing entry point.

Files: ``save_ply`` / ``load_ply`` (standard 3DGS PLY, see ``ply.py``) and ``save_splat`` /
``load_splat`` (antimatter15 ``.splat``, see ``splat_format.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ..errors import Vist3AInputError
from . import ply, splat_format

MAX_SH_DEGREE = 4
VIEWER_MAX_SH_DEGREE = 3  # SuperSplat, Spark and the 3DGS viewers stop at degree 3
# Opacity below 1/255 can never be drawn: alpha = opacity * exp(-sigma) <= opacity and the
# rasterizer skips alpha < 1/255, so pruning at this threshold changes no pixel.
DEFAULT_MIN_OPACITY = 1.0 / 255.0
_VALID_K = tuple((d + 1) ** 2 for d in range(MAX_SH_DEGREE + 1))


def normalize_quaternions(q: torch.Tensor) -> torch.Tensor:  # [..., 4] -> [..., 4]
    """``q / |q|`` (computed in float64); raises on a zero or non-finite quaternion."""
    q64 = q.double()
    norm = q64.norm(dim=-1, keepdim=True)
    bad = ~(torch.isfinite(norm) & (norm > 0))
    if bad.any():
        index = bad.reshape(-1).nonzero()[0].item()
        raise Vist3AInputError(f"rotations: quaternion {index} has zero or non-finite norm; cannot normalise it")
    return (q64 / norm).to(q.dtype)


def _rotation_tolerance(dtype: torch.dtype) -> float:
    # 1e-3 for float32/64; low-precision copies (to(torch.bfloat16)) round the norm more than that.
    return max(1e-3, 4 * torch.finfo(dtype).eps)


def _first_row(mask: torch.Tensor) -> int:  # mask [N, ...] -> index of the first row with a True
    return int(mask.reshape(mask.shape[0], -1).any(dim=1).nonzero()[0].item())


@dataclass(frozen=True, eq=False)
class GaussianScene:
    """N Gaussians. Tensors share one floating dtype and device (float32 from the decoder)."""

    means: torch.Tensor  # [N, 3]
    scales: torch.Tensor  # [N, 3], linear, > 0
    rotations: torch.Tensor  # [N, 4], unit quaternion (w, x, y, z)
    sh: torch.Tensor  # [N, K, 3], K = (degree + 1)^2, DC first
    opacities: torch.Tensor  # [N], in [0, 1]

    def __post_init__(self) -> None:
        self.validate()

    # --- invariants -------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise ``Vist3AInputError`` naming the field and the problem if any invariant fails."""
        self._check_types()
        self._check_shapes()
        for name in _FIELD_NAMES:
            value = getattr(self, name)
            if value.numel() and not torch.isfinite(value).all():
                bad = ~torch.isfinite(value)
                raise Vist3AInputError(f"{name} has non-finite values (first at Gaussian {_first_row(bad)})")
        self._check_values()

    def _check_types(self) -> None:
        for name in _FIELD_NAMES:
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise Vist3AInputError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
            if not value.is_floating_point():
                raise Vist3AInputError(f"{name} must be a floating-point tensor, got {value.dtype}")
            if value.dtype != self.means.dtype or value.device != self.means.device:
                raise Vist3AInputError(
                    f"{name} is {value.dtype} on {value.device} but means is "
                    f"{self.means.dtype} on {self.means.device}; all fields must match")

    def _check_shapes(self) -> None:
        if self.means.dim() != 2 or self.means.shape[1] != 3:
            raise Vist3AInputError(f"means must have shape [N, 3], got {list(self.means.shape)}")
        n = self.means.shape[0]
        for name, shape in (("scales", (n, 3)), ("rotations", (n, 4)), ("opacities", (n,))):
            if tuple(getattr(self, name).shape) != shape:
                raise Vist3AInputError(f"{name} must have shape {list(shape)} (N={n} from means), "
                                       f"got {list(getattr(self, name).shape)}")
        sh = self.sh
        if sh.dim() != 3 or sh.shape[0] != n or sh.shape[2] != 3:
            raise Vist3AInputError(f"sh must have shape [N, K, 3] with N={n} (from means), got {list(sh.shape)}")
        if sh.shape[1] not in _VALID_K:
            raise Vist3AInputError(
                f"sh has K={sh.shape[1]} coefficients per channel (shape {list(sh.shape)}); K must be "
                f"(degree + 1)^2 with degree <= {MAX_SH_DEGREE}, i.e. one of {_VALID_K}")

    def _check_values(self) -> None:
        if len(self) == 0:
            return
        outside = (self.opacities < 0) | (self.opacities > 1)
        if outside.any():
            i = _first_row(outside)
            raise Vist3AInputError(f"opacities must be in [0, 1] (probabilities, not logits); "
                                   f"Gaussian {i} has {self.opacities[i].item()}")
        if (self.scales <= 0).any():
            i = _first_row(self.scales <= 0)
            raise Vist3AInputError(f"scales must be > 0 (linear, not log); Gaussian {i} has "
                                   f"{self.scales[i].tolist()}")
        norm = self.rotations.double().norm(dim=-1)
        deviation = (norm - 1).abs()
        tolerance = _rotation_tolerance(self.rotations.dtype)
        if (deviation > tolerance).any():
            i = _first_row(deviation > tolerance)
            raise Vist3AInputError(
                f"rotations must be unit quaternions (w, x, y, z): Gaussian {i} has norm "
                f"{norm[i].item():.6g} (tolerance {tolerance:g}); "
                f"use GaussianScene.from_unnormalized(...) to normalise")

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def from_unnormalized(cls, means: torch.Tensor, scales: torch.Tensor, rotations: torch.Tensor,
                          sh: torch.Tensor, opacities: torch.Tensor) -> GaussianScene:
        """Like the constructor, but ``rotations`` [N,4] (w first) may have any non-zero norm."""
        if isinstance(rotations, torch.Tensor) and rotations.dim() >= 1 and rotations.shape[-1] == 4:
            rotations = normalize_quaternions(rotations)
        return cls(means, scales, rotations, sh, opacities)

    @classmethod
    def _from_numpy(cls, arrays: dict[str, np.ndarray], path: Path) -> GaussianScene:
        """A scene from a file's decoded arrays; only rotations off unit norm get normalised,
        so a file this class wrote reads back bit-exact while raw trainer output still loads."""
        tensors = {name: torch.from_numpy(np.ascontiguousarray(arrays[name])) for name in _FIELD_NAMES}
        q = tensors["rotations"]
        off = ~((q.double().norm(dim=-1) - 1).abs() <= _rotation_tolerance(q.dtype))  # NaN counts as off
        try:
            if off.any():
                tensors["rotations"] = torch.where(off[:, None], normalize_quaternions(q), q)
            return cls(**tensors)
        except Vist3AInputError as err:
            raise Vist3AInputError(f"{path}: {err}") from err

    # --- properties -------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.means.shape[0]

    @property
    def sh_degree(self) -> int:
        return math.isqrt(self.sh.shape[1]) - 1

    @property
    def device(self) -> torch.device:
        return self.means.device

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    def __repr__(self) -> str:
        return (f"GaussianScene(num_gaussians={len(self)}, sh_degree={self.sh_degree}, "
                f"dtype={self.dtype}, device={self.device})")

    # --- transforms -------------------------------------------------------------------------

    def to(self, *args, **kwargs) -> GaussianScene:
        """A copy with every tensor moved/cast by ``torch.Tensor.to(*args, **kwargs)``."""
        return GaussianScene(**{name: getattr(self, name).to(*args, **kwargs) for name in _FIELD_NAMES})

    def select(self, index) -> GaussianScene:
        """The Gaussians picked by a bool mask [N] or an integer index [M] (order and repeats kept)."""
        index = torch.as_tensor(index, device=self.device)
        if index.numel() == 0 and index.dim() == 1 and index.dtype != torch.bool:
            index = index.long()  # torch.as_tensor([]) is float32
        if index.dtype == torch.bool:
            if tuple(index.shape) != (len(self),):
                raise Vist3AInputError(f"select: bool mask must have shape [{len(self)}], got {list(index.shape)}")
        elif index.is_floating_point() or index.is_complex() or index.dim() != 1:
            raise Vist3AInputError(f"select: expected a bool mask [N] or an integer index [M], "
                                   f"got {index.dtype} of shape {list(index.shape)}")
        elif index.numel() and (index.min() < -len(self) or index.max() >= len(self)):
            raise Vist3AInputError(f"select: index out of range for {len(self)} Gaussians "
                                   f"(min {index.min().item()}, max {index.max().item()})")
        return GaussianScene(**{name: getattr(self, name)[index] for name in _FIELD_NAMES})

    def prune(self, min_opacity: float = DEFAULT_MIN_OPACITY) -> GaussianScene:
        """The Gaussians with opacity >= ``min_opacity`` (default: those that can ever be drawn)."""
        if not 0.0 <= min_opacity <= 1.0:
            raise Vist3AInputError(f"prune: min_opacity must be in [0, 1], got {min_opacity}")
        return self.select(self.opacities >= min_opacity)

    # --- files ------------------------------------------------------------------------------

    def _numpy(self, name: str) -> np.ndarray:
        return getattr(self, name).detach().to("cpu", torch.float32).numpy()

    def save_ply(self, path: str | Path, *, sh_degree: int | None = None, dc_only: bool = False) -> None:
        """Write the standard 3DGS binary PLY (layout and exactness: ``vist3a_rt.scene.ply``).

        ``sh_degree=None`` writes min(scene degree, 3), the most that viewers read; an explicit
        degree up to the scene's is honoured (4 included). ``dc_only=True`` writes degree 0.
        """
        degree = self._export_degree(sh_degree, dc_only)
        sh = self._numpy("sh")[:, : (degree + 1) ** 2]
        ply.write_gaussian_ply(path, self._numpy("means"), self._numpy("scales"),
                               self._numpy("rotations"), sh, self._numpy("opacities"))

    def _export_degree(self, sh_degree: int | None, dc_only: bool) -> int:
        if dc_only:
            if sh_degree not in (None, 0):
                raise Vist3AInputError(f"save_ply: dc_only=True conflicts with sh_degree={sh_degree}")
            return 0
        if sh_degree is None:
            return min(self.sh_degree, VIEWER_MAX_SH_DEGREE)
        if not isinstance(sh_degree, int) or not 0 <= sh_degree <= self.sh_degree:
            raise Vist3AInputError(f"save_ply: sh_degree must be an int in [0, {self.sh_degree}] "
                                   f"(the scene's degree), got {sh_degree!r}")
        return sh_degree

    @classmethod
    def load_ply(cls, path: str | Path) -> GaussianScene:
        """Read a 3DGS binary PLY (any property order; off-unit quaternions are normalised)."""
        return cls._from_numpy(ply.read_gaussian_ply(path), Path(path))

    def save_splat(self, path: str | Path) -> None:
        """Write an antimatter15 ``.splat`` (DC colour only, quantised; see ``splat_format``)."""
        splat_format.write_splat(path, self._numpy("means"), self._numpy("scales"),
                                 self._numpy("rotations"), self._numpy("sh")[:, 0, :],
                                 self._numpy("opacities"))

    @classmethod
    def load_splat(cls, path: str | Path) -> GaussianScene:
        """Read a ``.splat`` as a degree-0 scene, sorted as stored (by descending importance)."""
        return cls._from_numpy(splat_format.read_splat(path), Path(path))


_FIELD_NAMES = tuple(f.name for f in fields(GaussianScene))
