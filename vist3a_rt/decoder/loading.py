"""Building the decoder from the official artifacts without holding two copies of the weights.

The module tree is created with parameters on the meta device (buffers, which are small and
derived from the config, stay real); every weight is then read from the memory-mapped files,
LoRA-merged where the checkpoint has LoRA for it, cast, and assigned in place
(``load_state_dict(assign=True)``).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..checkpoints.lora import LoraSpec, check_lora_state, merge_into, parse_lora_spec, replacement_bias
from ..checkpoints.official import (DINO_PREFIX, DINO_TOKENS, SafetensorsFile, find_anysplat_weights,
                                    read_anysplat_base, read_stitched_checkpoint, stitched_names)
from ..errors import CheckpointError, ConfigError
from .config import DecoderConfig
from .network import ReconstructionModel, StitchedDecoder

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Create ``nn.Parameter``s on the meta device (no memory); buffers are created normally."""
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def resolve_config(config, base_weights) -> DecoderConfig:
    """The decoder config; a released AnySplat folder's ``config.json`` fills a missing ``anysplat``."""
    if config is None or isinstance(config, DecoderConfig):
        raw = {} if config is None else config.to_dict()
    elif isinstance(config, dict):
        raw = dict(config)
    else:
        raw = _read_json(Path(config))
    if "anysplat" not in raw and base_weights is not None:
        _, folder_config = find_anysplat_weights(base_weights)
        if folder_config is not None:
            raw["anysplat"] = folder_config
    return DecoderConfig.from_dict(raw)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"decoder config not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"decoder config {path} is not valid JSON: {err}") from None


def load_stitched_decoder(config, base_weights, stitched_checkpoint, dtype: torch.dtype = torch.float32,
                          device: str | torch.device = "cpu") -> StitchedDecoder:
    """The VIST3A stitched decoder from the official files, LoRA merged, in eval mode.

    ``config``: path to / dict of a config laid out like the fixtures' ``config.json`` (or
    None: official values); ``base_weights``: AnySplat ``model.safetensors`` or its released
    folder; ``stitched_checkpoint``: ``anysplat_stitched.pth`` (or its safetensors twin).
    """
    _check_dtype(dtype)
    cfg = resolve_config(config, base_weights)
    ckpt = read_stitched_checkpoint(stitched_checkpoint)
    spec = parse_lora_spec(cfg.stitching.lora_config)
    with meta_parameters():
        model = StitchedDecoder(cfg)
    base = read_anysplat_base(base_weights)
    sources = stitched_names(base, cfg.stitching.stitched_layer_index)
    lora_modules = set(check_lora_state(ckpt["lora"], lora_targets(model, spec), spec))
    read_base = _base_reader(base, dtype)
    delta_scratch = torch.empty(max((math.prod(base.shape(n)) for n in base), default=0), dtype=torch.float32)

    def produce(key: str) -> torch.Tensor:
        # checkpoint tensors are cloned: a view would keep the memory-mapped .pth resident
        if key.startswith("stitching_layer."):
            return ckpt["stitching_layer"][key.removeprefix("stitching_layer.")].clone()
        if key.removeprefix(DINO_PREFIX) in DINO_TOKENS:
            return ckpt[key.removeprefix(DINO_PREFIX)].clone()
        tensor = read_base(sources[key])  # freshly read (or in the scratch buffer): ours to modify
        module, leaf = key.rsplit(".", 1)
        if module in lora_modules and leaf == "weight":
            return merge_into(module, tensor, ckpt["lora"], spec, scratch=delta_scratch)
        if module in lora_modules and leaf == "bias" and key in ckpt["lora"]:
            return replacement_bias(module, tensor, ckpt["lora"]).clone()
        return tensor

    available = set(sources) | {f"stitching_layer.{k}" for k in ckpt["stitching_layer"]}
    available |= {DINO_PREFIX + t for t in DINO_TOKENS}
    _assign(model, available, produce, dtype, device)
    return model.eval()


def load_reconstruction_model(config, base_weights, dtype: torch.dtype = torch.float32,
                              device: str | torch.device = "cpu") -> ReconstructionModel:
    """AnySplat as released (images in), from its base weights."""
    _check_dtype(dtype)
    cfg = resolve_config(config, base_weights)
    with meta_parameters():
        model = ReconstructionModel(cfg)
    base = read_anysplat_base(base_weights)
    _assign(model, set(base), _base_reader(base, dtype), dtype, device)
    return model.eval()


def _base_reader(base: SafetensorsFile, dtype: torch.dtype) -> Callable[[str], torch.Tensor]:
    """Reads base tensors one by one. When the model's dtype differs from the file's, each
    tensor is read into one reused scratch buffer (then merged and cast into its own memory by
    the caller), so no file-precision copy of each weight piles up on the heap."""
    if all(base.dtype(name) == dtype for name in base):
        return base.__getitem__
    scratch = torch.empty(max((math.prod(base.shape(n)) * base.dtype(n).itemsize for n in base), default=0),
                          dtype=torch.uint8)

    def read(name: str) -> torch.Tensor:
        if base.dtype(name) == dtype or not base.dtype(name).is_floating_point:
            return base[name]  # kept as read: it must own its memory
        numel = math.prod(base.shape(name))
        view = scratch[: numel * base.dtype(name).itemsize].view(base.dtype(name)).view(base.shape(name))
        return base.read_into(name, view)

    return read


def lora_targets(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Official names of the modules the official ``add_lora`` wraps: every Linear and Conv2d
    under the network (not the stitching conv) whose name contains a target string."""
    return [name for name, module in model.named_modules()
            if name.startswith("encoder.") and isinstance(module, (nn.Linear, nn.Conv2d)) and spec.targets(name)]


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _FLOAT_DTYPES:
        raise ConfigError(f"dtype must be one of {[str(d) for d in _FLOAT_DTYPES]}, got {dtype}")


def _assign(model: nn.Module, available: set[str], produce: Callable[[str], torch.Tensor],
            dtype: torch.dtype, device) -> None:
    """Strict load with ``assign=True``, one tensor at a time: each produced tensor (read from
    disk, merged, cast) becomes the parameter, so peak memory stays near one model's size."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(expected) - available), sorted(available - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"weights do not match the model built from the config: {len(missing)} missing "
                              f"(e.g. {missing[:4]}), {len(unexpected)} unexpected (e.g. {unexpected[:4]})")
    state = {}  # the meta model holds no memory, so these tensors are the only copy
    for key, shape in expected.items():
        tensor = produce(key)
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"{key}: the file has shape {list(tensor.shape)}, the config gives "
                                  f"{list(shape)} (is the config for these weights?)")
        state[key] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    model.load_state_dict(state, strict=True, assign=True)
    for module in model.modules():  # buffers were built on the CPU in float32
        for name, buf in module.named_buffers(recurse=False):
            module._buffers[name] = buf.to(device=device, dtype=dtype if buf.is_floating_point() else buf.dtype)
