"""State dicts as safetensors files: tied tensors stored once, read back memory-mapped.

safetensors refuses to write two names that share memory (UMT5 ties ``shared.weight`` and
``encoder.embed_tokens.weight``). ``save_state`` stores such a tensor once and records the other
names in the file's metadata (``"aliases"``: name → stored name); ``load_state`` hands the same
tensor back under every name, so ``load_state_dict(assign=True)`` keeps the tie.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import CheckpointError

_ALIASES = "aliases"


def save_state(state: Mapping[str, torch.Tensor], path: str | Path, *, dtype: torch.dtype | None = None,
               metadata: Mapping[str, str] | None = None) -> None:
    """Write ``state`` to ``path`` atomically; floating tensors cast to ``dtype`` when given."""
    from safetensors.torch import save_file

    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_name: dict[tuple, str] = {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                    tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and identity in first_name:
            aliases[name] = first_name[identity]
            continue
        first_name[identity] = name
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        stored[name] = tensor.to("cpu").contiguous().clone() if _shares_memory(tensor, stored) else \
            tensor.to("cpu").contiguous()
    info = dict(metadata or {})
    info[_ALIASES] = json.dumps(aliases, sort_keys=True)
    path = Path(path)
    fd, staged = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(stored, staged, metadata=info)
        os.replace(staged, path)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise


def _shares_memory(tensor: torch.Tensor, stored: Mapping[str, torch.Tensor]) -> bool:
    """A view into memory already stored under another name (e.g. a slice of a fused weight)."""
    pointer = tensor.untyped_storage().data_ptr()
    return any(t.untyped_storage().data_ptr() == pointer for t in stored.values())


def load_state(path: str | Path, *, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of ``path`` (memory-mapped; floats cast to ``dtype`` when given), aliases included."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            aliases = json.loads((f.metadata() or {}).get(_ALIASES, "{}"))
            state = {}
            for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                tensor = f.get_tensor(name)
                state[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read weights {path}: {err}") from None
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for truncated / foreign files
        raise CheckpointError(f"cannot read weights {path}: {err}") from None
    for name, target in aliases.items():
        state[name] = state[target]
    return state


def file_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
