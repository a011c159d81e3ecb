"""Building the native Wan modules from a diffusers-layout folder: config.json + weights, no diffusers.

Each module is built from its ``config.json`` with every parameter on the meta device (no memory,
no initialisation), then given the tensors of its weights file with ``load_state_dict(assign=True)``:
the safetensors file is memory-mapped and, at the file's dtype, its tensors *become* the
parameters (no second copy). Weights may be one file or a sharded set with its
``*.index.json`` (the released 14B layout), as safetensors or as torch ``.bin`` pickles (read
with ``weights_only=True`` and mmap).

The VAE decoder (``native.vae``) is built by that module's own ``build_native_vae`` from the
config and the same memory-mapped weights (``load_vae``).

The dtype rule is diffusers' / transformers': floating tensors are cast to the requested dtype,
except the parameters a class lists in ``keep_in_float32`` (matched per dotted name component),
which stay float32. Tied tensors (UMT5's ``shared`` / ``encoder.embed_tokens``) may be stored
under either name. Every way a folder can fail to fit — unreadable or invalid config, an
unsupported option, missing, unexpected or mis-shaped tensors, unreadable weights — is a
``CheckpointError`` naming the file and, where there is one, the tensor.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from ...errors import CheckpointError, ConfigError
from .transformer import WanTransformer, WanTransformerConfig
from .umt5 import UMT5Config, UMT5Encoder

StateTransform = Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


def load_transformer(folder: str | Path, *, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu", transform: StateTransform | None = None) -> WanTransformer:
    """The Wan transformer of ``folder`` (``<wan>/transformer``); ``transform(state, meta_module)``
    may rewrite the (already cast) state dict before it is assigned, e.g. to merge a LoRA."""
    folder = Path(folder)
    config = _config(folder, WanTransformerConfig.from_dict)
    return load_module(_on_meta(WanTransformer, config), folder, dtype=dtype, device=device, transform=transform)


def load_text_encoder(folder: str | Path, *, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> UMT5Encoder:
    """The UMT5 encoder of ``folder`` (``<wan>/text_encoder``)."""
    folder = Path(folder)
    return load_module(_on_meta(UMT5Encoder, _config(folder, UMT5Config.from_dict)), folder, dtype=dtype,
                       device=device)


def load_vae(folder: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The VAE decoder of ``folder`` (``<wan>/vae``; ``native.vae``: the encoder half is not loaded)."""
    from .vae import WanVAEConfig, build_native_vae

    folder = Path(folder)
    config = _config(folder, WanVAEConfig.from_dict)
    return build_native_vae(config, read_weights(folder), dtype=dtype, device=device)


def _on_meta(cls, config) -> nn.Module:
    with torch.device("meta"):
        return cls(config)


def _config(folder: Path, parse):
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    try:
        return parse(raw)
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{path}: {err}") from None


def load_module(module: nn.Module, folder: Path, *, dtype: torch.dtype, device: str | torch.device,
                transform: StateTransform | None = None) -> nn.Module:
    """``module`` (parameters on the meta device) with the weights of ``folder`` assigned, cast,
    on ``device``, in eval mode without gradients."""
    state = read_weights(folder)
    expected = module.state_dict()  # meta tensors: names and shapes only
    state = _fill_ties(state, getattr(module, "tied_weights", {}))
    _check_fits(state, expected, folder)
    keep = getattr(module, "keep_in_float32", ())
    state = {name: _cast(tensor, torch.float32 if _kept(name, keep) else dtype) for name, tensor in state.items()}
    if transform is not None:
        state = transform(state, module)
    device = torch.device(device)
    module.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's weights: one file, or the shards an ``*.index.json`` lists."""
    for stem in _WEIGHT_STEMS:
        for suffix in (".safetensors", ".bin"):
            single, index = folder / f"{stem}{suffix}", folder / f"{stem}{suffix}.index.json"
            if single.is_file():
                return _read_file(single)
            if index.is_file():
                return _read_shards(index)
    raise CheckpointError(f"{folder} holds no weights (expected {_WEIGHT_STEMS[0]}.safetensors, model.safetensors, "
                          "a sharded *.safetensors.index.json set, or the .bin equivalents)")


def _read_shards(index: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{index} is not a weights index (a JSON object with a 'weight_map'): {err}") from None
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors = _read_file(index.parent / shard)
        listed = {name for name, file in weight_map.items() if file == shard}
        if listed - set(tensors):
            raise CheckpointError(f"{index.parent / shard} lacks tensors its index lists, e.g. {sorted(listed - set(tensors))[:3]}")
        state.update({name: tensors[name] for name in listed})
    return state


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from ...bundle.weights import load_state

        return load_state(path)  # memory-mapped; CheckpointError on truncated or foreign files
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for corrupt or unsafe pickles
        raise CheckpointError(f"cannot read weights {path}: {err}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return dict(state)


def _fill_ties(state: dict[str, torch.Tensor], ties: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """A tied tensor stored under one of its names is given to the other too."""
    state = dict(state)
    for alias, source in ties.items():
        if source in state:
            state[alias] = state[source]
        elif alias in state:
            state[source] = state[alias]
    return state


def _check_fits(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], folder: Path) -> None:
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"the weights in {folder} do not fit the model its config.json describes: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{folder}: tensor {name} has shape {list(tensor.shape)}, config.json gives "
                                  f"{list(expected[name].shape)}")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{folder}: tensor {name} has dtype {tensor.dtype}, expected floating point")


def _kept(name: str, keep: tuple[str, ...]) -> bool:
    return any(part in keep for part in name.split("."))


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)
