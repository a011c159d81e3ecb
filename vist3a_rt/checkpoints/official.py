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
import pickle
import re
import zipfile
from pathlib import Path

import torch

from ..errors import CheckpointError

STITCHED_KEYS = ("lora", "stitching_layer", "mask_token", "cls_token", "register_tokens")
DINO_PREFIX = "encoder.aggregator.patch_embed."
_DINO_BLOCK = re.compile(r"^encoder\.aggregator\.patch_embed\.blocks\.(\d+)\.(.+)$")


def read_safetensors(path: Path, *, mmap: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (memory-mapped: no copy until used)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path)) if mmap else {k: v.clone() for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read safetensors file {path}: {err}") from err


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


def read_anysplat_base(source: str | Path) -> dict[str, torch.Tensor]:
    """AnySplat base weights under their official names; rejects files that are not AnySplat."""
    weights, _ = find_anysplat_weights(source)
    state = read_safetensors(weights)
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


def cut_base_state(base: dict[str, torch.Tensor], stitch_index: int) -> dict[str, torch.Tensor]:
    """The base state as the stitched model names it: patch conv and the first
    ``stitch_index`` DINO blocks removed, the remaining blocks renumbered from 0."""
    cut = {}
    for key, value in base.items():
        if key.startswith(DINO_PREFIX + "patch_embed."):
            continue
        match = _DINO_BLOCK.match(key)
        if match is None:
            cut[key] = value
        elif int(match[1]) >= stitch_index:
            cut[f"{DINO_PREFIX}blocks.{int(match[1]) - stitch_index}.{match[2]}"] = value
    return cut


def replace_dino_tokens(state: dict[str, torch.Tensor], ckpt: dict) -> dict[str, torch.Tensor]:
    """The checkpoint's DINO special tokens replace the base ones (shapes must agree)."""
    state = dict(state)
    for key in ("mask_token", "cls_token", "register_tokens"):
        name = DINO_PREFIX + key
        if name in state and state[name].shape != ckpt[key].shape:
            raise CheckpointError(f"checkpoint {key} has shape {list(ckpt[key].shape)}, "
                                  f"the base model's is {list(state[name].shape)}")
        state[name] = ckpt[key]
    return state
