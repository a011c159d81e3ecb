"""Readers for the official AnySplat / VIST3A artifacts, returning plain state dicts.

* AnySplat base weights: ``model.safetensors`` (or a released folder holding it next to
  ``config.json``) with the names AnySplat's ``state_dict()`` produces (``encoder.…``).
* ``anysplat_stitched.pth``: a ``torch.save`` dict with ``lora``, ``stitching_layer``,
  ``mask_token``, ``cls_token``, ``register_tokens`` (or the same tensors flattened into a
  safetensors file: ``lora.<key>``, ``stitching_layer.weight``, …).

Names stay official here; the decoder maps them onto its own modules.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import CheckpointError

STITCHED_KEYS = ("lora", "stitching_layer", "mask_token", "cls_token", "register_tokens")
DINO_PREFIX = "encoder.aggregator.patch_embed."
DINO_TOKENS = ("mask_token", "cls_token", "register_tokens")  # replaced by the stitched checkpoint
_DINO_BLOCK = re.compile(r"^encoder\.aggregator\.patch_embed\.blocks\.(\d+)\.(.+)$")


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsFile(Mapping):
    """A safetensors file read one tensor at a time, each into its own fresh memory.

    Unlike a memory map, nothing stays resident once a tensor has been consumed, so a loader
    that converts and assigns tensor by tensor peaks at about one model's worth of memory.
    The header is validated up front: a truncated or foreign file fails before any weight
    is read, naming the problem.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                self._entries, self._data_start = self._read_header(handle, os.fstat(handle.fileno()).st_size)
        except OSError as err:
            raise CheckpointError(f"cannot read safetensors file {self.path}: {err}") from err

    def _read_header(self, handle, file_size: int) -> tuple[dict, int]:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{self.path} is not a safetensors file (only {len(prefix)} bytes)")
        header_len = struct.unpack("<Q", prefix)[0]
        if header_len > min(file_size - 8, 100 << 20):
            raise CheckpointError(f"{self.path} is not a safetensors file (header length {header_len} "
                                  f"does not fit a {file_size}-byte file)")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{self.path} has a corrupt safetensors header: {err}") from None
        header.pop("__metadata__", None)
        entries = {name: self._entry(name, info) for name, info in header.items()}
        data_size = file_size - 8 - header_len
        for name, (_, _, (begin, end)) in entries.items():
            if end > data_size:
                raise CheckpointError(f"{self.path} is truncated: tensor {name!r} ends at byte {end} of the "
                                      f"data section, which holds only {data_size} bytes")
        return entries, 8 + header_len

    def _entry(self, name: str, info) -> tuple:
        try:
            dtype, shape, (begin, end) = _ST_DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{self.path}: bad header entry for {name!r}: {err!r}") from None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(f"{self.path}: tensor {name!r} has {end - begin} bytes for shape {list(shape)}")
        return dtype, shape, (begin, end)

    def __getitem__(self, name: str) -> torch.Tensor:
        dtype, shape, _ = self._entries[name]
        return self.read_into(name, torch.empty(shape, dtype=dtype))

    def read_into(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Read tensor ``name`` into ``tensor`` (contiguous, of its dtype and shape) and return it."""
        dtype, shape, (begin, end) = self._entries[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape or not tensor.is_contiguous():
            raise ValueError(f"read_into {name!r}: need a contiguous {dtype} tensor of shape {list(shape)}")
        if end > begin:
            buffer = tensor.view(-1).view(torch.uint8).numpy()
            with open(self.path, "rb") as handle:
                handle.seek(self._data_start + begin)
                if handle.readinto(buffer) != end - begin:
                    raise CheckpointError(f"{self.path} is truncated inside tensor {name!r}")
        return tensor

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][0]

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (small) safetensors file, eagerly."""
    reader = SafetensorsFile(path)
    return {name: reader[name] for name in reader}


def find_anysplat_weights(source: str | Path) -> tuple[Path, dict | None]:
    """Resolve a weights file or a released AnySplat folder to (weights path, folder config or None)."""
    path = Path(source)
    if path.is_dir():
        weights, config = path / "model.safetensors", path / "config.json"
        if not weights.is_file():
            raise CheckpointError(f"AnySplat folder {path} has no model.safetensors")
        return weights, (json.loads(config.read_text()) if config.is_file() else None)
    if not path.is_file():
        raise CheckpointError(f"AnySplat weights not found: {path}")
    return path, None


def read_anysplat_base(source: str | Path) -> SafetensorsFile:
    """AnySplat base weights under their official names, read lazily; rejects files that are not AnySplat."""
    weights, _ = find_anysplat_weights(source)
    state = SafetensorsFile(weights)
    if not any(k.startswith("encoder.aggregator.") for k in state):
        raise CheckpointError(f"{weights} does not look like AnySplat weights "
                              f"(no 'encoder.aggregator.*' tensors; first keys: {sorted(state)[:3]})")
    return state


def read_stitched_checkpoint(path: str | Path) -> dict:
    """The official stitched checkpoint as a nested dict with the five official entries."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"stitched checkpoint not found: {path}")
    raw = _read_flat_safetensors(path) if path.suffix == ".safetensors" else _torch_load_plain(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, expected a dict with keys {STITCHED_KEYS}")
    missing = [k for k in STITCHED_KEYS if k not in raw]
    extra = sorted(set(raw) - set(STITCHED_KEYS))
    if missing or extra:
        raise CheckpointError(f"{path} is not an official stitched checkpoint: missing {missing}, unexpected {extra}")
    _check_tensors(path, raw)
    return raw


def _torch_load_plain(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"cannot load {path} as plain tensors (truncated, corrupt, or a pickle "
                              f"with non-tensor objects): {message}") from err


def _read_flat_safetensors(path: Path) -> dict:
    nested: dict = {"lora": {}, "stitching_layer": {}}
    for key, value in read_safetensors(path).items():
        group, _, rest = key.partition(".")
        if group in ("lora", "stitching_layer") and rest:
            nested[group][rest] = value
        else:
            nested[key] = value
    return nested


def _check_tensors(path: Path, raw: dict) -> None:
    for group in ("lora", "stitching_layer"):
        if not isinstance(raw[group], dict) or not all(isinstance(v, torch.Tensor) for v in raw[group].values()):
            raise CheckpointError(f"{path}: '{group}' must be a dict of tensors")
    for key in ("mask_token", "cls_token", "register_tokens"):
        if not isinstance(raw[key], torch.Tensor):
            raise CheckpointError(f"{path}: '{key}' must be a tensor, got {type(raw[key]).__name__}")
    if set(raw["stitching_layer"]) - {"weight", "bias"} or "weight" not in raw["stitching_layer"]:
        raise CheckpointError(f"{path}: 'stitching_layer' must hold 'weight' (and optionally 'bias'), "
                              f"got {sorted(raw['stitching_layer'])}")
    for name, tensor in _all_tensors(raw):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: tensor {name!r} has non-finite values")


def _all_tensors(raw: dict):
    for key, value in raw.items():
        if isinstance(value, dict):
            yield from ((f"{key}.{k}", v) for k, v in value.items())
        else:
            yield key, value


def stitched_names(base_names, stitch_index: int) -> dict[str, str]:
    """Map stitched-model names to base names: the patch conv and the first ``stitch_index``
    DINO blocks are removed and the remaining blocks renumbered from 0 (a ModuleList deletion)."""
    names = {}
    for key in base_names:
        if key.startswith(DINO_PREFIX + "patch_embed."):
            continue
        match = _DINO_BLOCK.match(key)
        if match is None:
            names[key] = key
        elif int(match[1]) >= stitch_index:
            names[f"{DINO_PREFIX}blocks.{int(match[1]) - stitch_index}.{match[2]}"] = key
    return names


def cut_base_state(base: Mapping[str, torch.Tensor], stitch_index: int) -> dict[str, torch.Tensor]:
    """The base state as the stitched model names it (eager; see ``stitched_names``)."""
    return {new: base[old] for new, old in stitched_names(base, stitch_index).items()}


def replace_dino_tokens(state: dict[str, torch.Tensor], ckpt: dict) -> dict[str, torch.Tensor]:
    """The checkpoint's DINO special tokens replace the base ones (shapes must agree)."""
    state = dict(state)
    for key in DINO_TOKENS:
        name = DINO_PREFIX + key
        if name in state and state[name].shape != ckpt[key].shape:
            raise CheckpointError(f"checkpoint {key} has shape {list(ckpt[key].shape)}, "
                                  f"the base model's is {list(state[name].shape)}")
        state[name] = ckpt[key]
    return state
