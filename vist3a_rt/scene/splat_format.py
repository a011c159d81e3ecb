"""The antimatter15 ``.splat`` format: 32 bytes per Gaussian, no header; most web viewers read it.

Record (little-endian): position 3 x float32, scale 3 x float32 (linear), colour RGBA
4 x uint8, rotation 4 x uint8 (w, x, y, z).

- rgb = (0.5 + SH_C0 * f_dc) * 255, a = opacity * 255;
- rotation = q / |q| * 128 + 128;

each rounded to nearest and clipped to [0, 255]. (The reference converter truncates instead;
rounding halves the worst-case error and viewers decode both the same way.) Records are
sorted by descending scale_0 * scale_1 * scale_2 * opacity, as the reference converter sorts
them, so a viewer that streams the file shows the most visible Gaussians first. Only the DC
colour survives: view-dependent SH is dropped, colours outside [0, 1] are clipped.

Read back: positions and scales are exact; f_dc within 0.5 / 255 / SH_C0 (~0.007) where the
colour was inside [0, 1]; opacity within 0.5 / 255; each quaternion component within ~0.012.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import Vist3AInputError
from .ply import atomic_write

SH_C0 = 0.28209479177387814  # the degree-0 real spherical harmonic, 1 / (2 sqrt(pi))
RECORD = np.dtype([("position", "<f4", (3,)), ("scale", "<f4", (3,)),
                   ("rgba", "u1", (4,)), ("rotation", "u1", (4,))])
assert RECORD.itemsize == 32


def _to_byte(values: np.ndarray) -> np.ndarray:  # float64 in byte units -> uint8
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def importance_order(scales: np.ndarray,  # [N, 3] linear
                     opacities: np.ndarray,  # [N]
                     ) -> np.ndarray:  # [N] int64
    """Indices sorting Gaussians by descending volume-ish size x opacity (stable for ties)."""
    importance = np.prod(scales.astype(np.float64), axis=1) * opacities.astype(np.float64)
    return np.argsort(-importance, kind="stable")


def encode_splat(means: np.ndarray,  # [N, 3]
                 scales: np.ndarray,  # [N, 3] linear
                 rotations: np.ndarray,  # [N, 4] w, x, y, z
                 sh_dc: np.ndarray,  # [N, 3]
                 opacities: np.ndarray,  # [N]
                 ) -> np.ndarray:  # structured [N] of RECORD
    order = importance_order(scales, opacities)
    records = np.empty(len(order), RECORD)
    records["position"] = means[order]
    records["scale"] = scales[order]
    rgb = (0.5 + SH_C0 * sh_dc[order].astype(np.float64)) * 255.0
    records["rgba"] = _to_byte(np.concatenate([rgb, opacities[order, None] * 255.0], axis=1))
    q = rotations[order].astype(np.float64)
    records["rotation"] = _to_byte(q / np.linalg.norm(q, axis=1, keepdims=True) * 128.0 + 128.0)
    return records


def decode_splat(records: np.ndarray) -> dict[str, np.ndarray]:
    """Float32 arrays ``means``, ``scales``, ``rotations`` (normalised), ``sh`` [N,1,3], ``opacities``."""
    rgba = records["rgba"].astype(np.float64) / 255.0
    q = (records["rotation"].astype(np.float64) - 128.0) / 128.0
    norm = np.linalg.norm(q, axis=1, keepdims=True)
    return {
        "means": records["position"].astype(np.float32),
        "scales": records["scale"].astype(np.float32),
        # a zero quaternion stays zero so that the scene's validation names it
        "rotations": np.divide(q, norm, out=q.copy(), where=norm > 0).astype(np.float32),
        "sh": ((rgba[:, None, :3] - 0.5) / SH_C0).astype(np.float32),
        "opacities": rgba[:, 3].astype(np.float32),
    }


def write_splat(path: str | Path, means: np.ndarray, scales: np.ndarray, rotations: np.ndarray,
                sh_dc: np.ndarray, opacities: np.ndarray) -> None:
    """Write a ``.splat`` file atomically (arguments as for ``encode_splat``)."""
    records = encode_splat(means, scales, rotations, sh_dc, opacities)
    atomic_write(path, [records.view(np.uint8)])


def read_splat(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise Vist3AInputError(f"cannot read {path}: {err.strerror or err}") from err
    if len(data) % RECORD.itemsize:
        raise Vist3AInputError(f"{path}: not a .splat file (size {len(data)} bytes is not a "
                               f"multiple of the {RECORD.itemsize}-byte record)")
    return decode_splat(np.frombuffer(data, dtype=RECORD))
