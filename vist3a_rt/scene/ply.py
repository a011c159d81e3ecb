"""The standard 3DGS (INRIA) binary PLY layout: writer, and our own reader.

Written layout: one ``vertex`` element, ``binary_little_endian 1.0``, every property
``float`` (float32), in this order, which SuperSplat, Spark and plyfile read as is::

    x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 f_rest_0 .. f_rest_{3(K-1)-1}
    opacity scale_0 scale_1 scale_2 rot_0 rot_1 rot_2 rot_3

Stored encodings: normals are 0; ``f_rest`` is channel-major (index ``c*(K-1) + (k-1)``
for colour channel c and coefficient k >= 1); ``opacity`` is logit(opacity); ``scale_i`` is
log(scale); ``rot_0..3`` is the quaternion (w, x, y, z).

Exactness of a write -> read round trip (float32 in, float32 out): means, SH and rotations
are bit-exact. Log and logit are computed in float64 and rounded once to float32, exp and
sigmoid are computed in float64 from the stored float32 and rounded once. That is bit-exact
for every scale in (1/e, e) and every opacity whose |logit| < 1 or that is >= 0.5. Elsewhere a
float32 log/logit cannot represent every float32 value (a float32 in [4, 8) has 8x coarser
relative spacing than the number it encodes), so the read value is the nearest one the
format can hold: at most floor(|stored value|) float32 ulps away, i.e. a relative error
below (|log s| + 1) * 2^-24 (about 4e-7 for a scale of 1e-3). Checked in tests.

Opacities 0 and 1 have an infinite logit; the logit is clipped to +-``LOGIT_LIMIT`` (110),
which is the same as clamping the input to [sigmoid(-110), 1 - sigmoid(-110)]. That eps
(1.7e-48) is below half the smallest float32, so 0 and 1 still read back exactly and no
opacity strictly inside (0, 1) is altered by the clamp. (Clamping the input in float64
instead could not represent 1 - eps for any eps that small.)

Reader: accepts the vertex properties in any order and of any scalar type, ignores extra
ones (such as the normals), and rejects anything else (ascii or big-endian files, list
properties, other elements such as a compressed PLY's ``chunk``) with a message naming it.
"""

from __future__ import annotations

import math
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import Vist3AInputError

LOGIT_LIMIT = 110.0
_SH_REST_COUNTS = {3 * ((d + 1) ** 2 - 1): d for d in range(5)}  # number of f_rest_* -> degree
_REQUIRED = ("x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
             "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")
_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "<i2", "int16": "<i2", "ushort": "<u2", "uint16": "<u2",
    "int": "<i4", "int32": "<i4", "uint": "<u4", "uint32": "<u4",
    "float": "<f4", "float32": "<f4", "double": "<f8", "float64": "<f8",
}
_MAX_HEADER_LINES = 4096  # a real 3DGS header has < 100 lines; stops runaway reads of non-PLY files
_MAX_LINE = 1024


def property_names(sh_degree: int) -> list[str]:
    """The vertex properties we write for an SH degree, in file order."""
    num_rest = 3 * ((sh_degree + 1) ** 2 - 1)
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
            + [f"f_rest_{i}" for i in range(num_rest)]
            + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


# --- value encodings (float64 inside, one rounding to float32 each way) -------------------

def encode_scales(scales: np.ndarray) -> np.ndarray:  # [N, 3] linear -> [N, 3] log, float32
    return np.log(scales.astype(np.float64)).astype(np.float32)


def decode_scales(log_scales: np.ndarray) -> np.ndarray:  # [N, 3] log -> [N, 3] linear, float32
    with np.errstate(over="ignore"):  # a foreign file's huge log-scale becomes inf; validation names it
        return np.exp(log_scales.astype(np.float64)).astype(np.float32)


def encode_opacities(opacities: np.ndarray) -> np.ndarray:  # [N] in [0,1] -> [N] logit, float32
    p = opacities.astype(np.float64)
    with np.errstate(divide="ignore"):  # 0 and 1 give -inf / +inf before the clip
        logit = np.log(p) - np.log1p(-p)
    return np.clip(logit, -LOGIT_LIMIT, LOGIT_LIMIT).astype(np.float32)


def decode_opacities(logits: np.ndarray) -> np.ndarray:  # [N] logit -> [N] in [0,1], float32
    with np.errstate(over="ignore"):  # exp(1000) = inf gives opacity 0, as it should
        return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)


# --- writing --------------------------------------------------------------------------------

def atomic_write(path: str | Path, chunks: Iterable) -> None:
    """Write bytes-like ``chunks`` to ``path`` via a temp file in the same folder + ``os.replace``,
    so a reader never sees a half-written file. OS failures become ``Vist3AInputError``."""
    path = Path(path)
    directory = path.parent
    if not directory.is_dir():
        raise Vist3AInputError(f"cannot write {path}: directory {directory} does not exist")
    # os.open with 0o666 (not mkstemp's 0o600) so the file gets the usual umask permissions.
    tmp = directory / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as err:
        raise Vist3AInputError(f"cannot write {path}: {err.strerror or err}") from err
    try:
        with os.fdopen(fd, "wb") as stream:
            for chunk in chunks:
                stream.write(chunk)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise Vist3AInputError(f"cannot write {path}: {err.strerror or err}") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_gaussian_ply(path: str | Path,
                       means: np.ndarray,  # [N, 3]
                       scales: np.ndarray,  # [N, 3] linear
                       rotations: np.ndarray,  # [N, 4] w, x, y, z
                       sh: np.ndarray,  # [N, K, 3], the K to write
                       opacities: np.ndarray,  # [N]
                       ) -> None:
    """Write float32 arrays in the 3DGS layout (see module docstring)."""
    n, k = sh.shape[0], sh.shape[1]
    names = property_names(math.isqrt(k) - 1)
    rest = sh[:, 1:, :].transpose(0, 2, 1).reshape(n, 3 * (k - 1))  # channel-major
    columns = [means, np.zeros((n, 3), np.float32), sh[:, 0, :], rest,
               encode_opacities(opacities)[:, None], encode_scales(scales), rotations]
    flat = np.ascontiguousarray(np.concatenate(columns, axis=1), dtype="<f4")  # [N, P]
    table = flat.view(np.dtype([(name, "<f4") for name in names]))[:, 0]  # structured [N]
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    header += [f"property float {name}" for name in names] + ["end_header"]
    atomic_write(path, ["\n".join(header).encode("ascii") + b"\n", table.view(np.uint8)])


# --- reading --------------------------------------------------------------------------------

def _header_error(path: Path, message: str) -> Vist3AInputError:
    return Vist3AInputError(f"{path}: {message}")


def _parse_header_line(words: list[str], state: dict, path: Path) -> None:
    keyword = words[0]
    if keyword == "format":
        if words[1:] != ["binary_little_endian", "1.0"]:
            raise _header_error(path, f"unsupported PLY format '{' '.join(words[1:])}'; "
                                      "only 'binary_little_endian 1.0' is read")
        state["format"] = True
    elif keyword == "element":
        if state["count"] is not None or len(words) != 3 or words[1] != "vertex":
            raise _header_error(path, f"unsupported element '{' '.join(words[1:])}'; only a single "
                                      "'vertex' element is read (compressed PLY is not supported)")
        if not words[2].isdigit():
            raise _header_error(path, f"bad vertex count '{words[2]}'")
        state["count"] = int(words[2])
    elif keyword == "property":
        _parse_property(words, state, path)
    else:
        raise _header_error(path, f"unrecognised header line '{' '.join(words)}'")


def _parse_property(words: list[str], state: dict, path: Path) -> None:
    if state["count"] is None:
        raise _header_error(path, "property before any element")
    if len(words) >= 2 and words[1] == "list":
        raise _header_error(path, f"unsupported list property '{' '.join(words[1:])}' in vertex")
    if len(words) != 3 or words[1] not in _PLY_TYPES:
        raise _header_error(path, f"unsupported property line '{' '.join(words)}'")
    if any(name == words[2] for name, _ in state["fields"]):
        raise _header_error(path, f"duplicate vertex property '{words[2]}'")
    state["fields"].append((words[2], _PLY_TYPES[words[1]]))


def _read_header(stream, path: Path) -> tuple[int, np.dtype]:
    """Parse the header; leave ``stream`` at the first data byte; return (vertex count, row dtype)."""
    if stream.readline(_MAX_LINE).rstrip(b"\r\n") != b"ply":
        raise _header_error(path, "not a PLY file (it does not start with 'ply')")
    state = {"format": False, "count": None, "fields": []}
    for _ in range(_MAX_HEADER_LINES):
        raw = stream.readline(_MAX_LINE)
        if not raw:
            raise _header_error(path, "truncated PLY header (no 'end_header')")
        try:
            words = raw.decode("ascii").split()
        except UnicodeDecodeError:
            raise _header_error(path, "corrupt PLY header (non-ASCII bytes)") from None
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "end_header":
            break
        _parse_header_line(words, state, path)
    else:
        raise _header_error(path, f"PLY header longer than {_MAX_HEADER_LINES} lines")
    if not state["format"] or state["count"] is None:
        raise _header_error(path, "PLY header lacks a 'format' line or an 'element vertex' line")
    return state["count"], np.dtype(state["fields"])


def _check_fields(names: tuple[str, ...], path: Path) -> int:
    """Check the 3DGS properties are present; return the SH degree implied by the f_rest_* count."""
    missing = [name for name in _REQUIRED if name not in names]
    if missing:
        raise _header_error(path, f"not a 3DGS PLY: missing vertex properties {missing}")
    rest = sorted(int(m.group(1)) for m in map(re.compile(r"f_rest_(\d+)$").match, names) if m)
    if rest != list(range(len(rest))) or len(rest) not in _SH_REST_COUNTS:
        raise _header_error(path, f"f_rest_* properties must be f_rest_0..f_rest_{{3(K-1)-1}} with "
                                  f"K in (1, 4, 9, 16, 25); found {len(rest)} (indices {rest[:3]}..)")
    return _SH_REST_COUNTS[len(rest)]


def _read_table(path: Path) -> np.ndarray:
    try:
        with open(path, "rb") as stream:
            count, row = _read_header(stream, path)
            available = os.fstat(stream.fileno()).st_size - stream.tell()
            if available < count * row.itemsize:
                raise _header_error(path, f"truncated: header declares {count} vertices "
                                          f"({count * row.itemsize} bytes) but {available} bytes follow")
            return np.frombuffer(stream.read(count * row.itemsize), dtype=row, count=count)
    except OSError as err:
        raise Vist3AInputError(f"cannot read {path}: {err.strerror or err}") from err


def read_gaussian_ply(path: str | Path) -> dict[str, np.ndarray]:
    """Read a 3DGS PLY into float32 arrays ``means`` [N,3], ``scales`` [N,3] (linear),
    ``rotations`` [N,4] (w,x,y,z as stored, not normalised), ``sh`` [N,K,3], ``opacities`` [N]."""
    path = Path(path)
    table = _read_table(path)
    degree = _check_fields(table.dtype.names or (), path)
    n, k = len(table), (degree + 1) ** 2

    def columns(*names: str) -> np.ndarray:  # [N, len(names)] float32
        out = np.empty((n, len(names)), np.float32)
        for i, name in enumerate(names):
            out[:, i] = table[name]
        return out

    rest = columns(*(f"f_rest_{i}" for i in range(3 * (k - 1)))).reshape(n, 3, k - 1)
    return {
        "means": columns("x", "y", "z"),
        "scales": decode_scales(columns("scale_0", "scale_1", "scale_2")),
        "rotations": columns("rot_0", "rot_1", "rot_2", "rot_3"),
        "sh": np.concatenate([columns("f_dc_0", "f_dc_1", "f_dc_2")[:, None, :],
                              rest.transpose(0, 2, 1)], axis=1),
        "opacities": decode_opacities(columns("opacity")[:, 0]),
    }
