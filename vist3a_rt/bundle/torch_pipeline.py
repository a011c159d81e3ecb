"""A bundle run by the torch backend: the eager ``Vist3A`` pipeline built from ``weights/*.safetensors``.

Each component is built from the config the manifest records, with its parameters on the meta
device (no memory), then given the memory-mapped tensors of its weights file
(``load_state_dict(assign=True)``): no second copy of the weights is made at float32. The Wan
components are the diffusers / transformers classes the manifest names, so this path needs
those libraries (the onnxruntime path does not). The VAE runs in float32 whatever ``dtype``
is, as in ``WanGenerator.from_folder``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from .format import read_manifest, weights_file
from .weights import load_state


def load_torch_pipeline(bundle: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """``Vist3A`` (the torch pipeline) with the bundle's weights, LoRA already merged."""
    from ..decoder import DecoderConfig, StitchedDecoder
    from ..generator.loading import WanComponents, check_dtype, set_offline_defaults
    from ..generator.wan import WanGenerator
    from ..pipeline.vist3a import GenerationSettings, Vist3A, _check_device, _timed

    root = Path(bundle)
    manifest = read_manifest(root)
    torch_device = _check_device(device)
    check_dtype(dtype, torch_device)
    set_offline_defaults()
    configs, classes = manifest["configs"], manifest["classes"]
    timings: dict[str, float] = {}
    with _timed(timings, "load_generator"):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(root / manifest["tokenizer"], local_files_only=True)
        modules = {name: _library_module(classes[name], configs[name])
                   for name in ("text_encoder", "transformer", "vae")}
        for name, module in modules.items():
            _assign(module, root / weights_file(name), torch.float32 if name == "vae" else dtype, torch_device)
        scheduler_config = json.loads((root / manifest["scheduler"]).read_text())
        components = WanComponents(tokenizer, modules["text_encoder"], modules["transformer"], modules["vae"],
                                   scheduler_config)
        generator = WanGenerator(components, max_sequence_length=manifest["generation"]["max_sequence_length"])
    with _timed(timings, "load_decoder"):
        from ..decoder.loading import meta_parameters

        with meta_parameters():
            decoder = StitchedDecoder(DecoderConfig.from_dict(configs["stitched_decoder"]))
        _assign(decoder, root / weights_file("stitched_decoder"), dtype, torch_device)
    model = Vist3A(generator, decoder, source=str(root), device=torch_device, dtype=dtype,
                   defaults=GenerationSettings(**manifest["generation"]["defaults"]))
    model.closed_vocabulary = manifest["generation"]["closed_vocabulary"]
    model.load_timings = timings
    return model


def _library_module(class_path: str, config: dict) -> nn.Module:
    """A diffusers / transformers model of ``class_path`` ("library.ClassName") built from
    ``config`` with its parameters on the meta device."""
    import importlib

    from ..decoder.loading import meta_parameters

    library, _, name = class_path.partition(".")
    if library not in ("diffusers", "transformers"):
        raise CheckpointError(f"the bundle names a component class {class_path!r} from an unknown library")
    try:
        cls = getattr(importlib.import_module(library), name)
    except AttributeError:
        raise CheckpointError(f"{library} has no class {name!r} (the bundle was made with another version?)") from None
    with meta_parameters():
        if library == "diffusers":
            return cls.from_config(config)
        return cls(cls.config_class.from_dict(config))


def _assign(module: nn.Module, path: Path, dtype: torch.dtype, device: torch.device) -> None:
    """The weights file's tensors become ``module``'s parameters (strict names and shapes)."""
    state = load_state(path, dtype=dtype)
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path.name} does not fit the model built from the manifest: {len(missing)} missing "
                              f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{path.name}: {name} has shape {list(tensor.shape)}, the config gives "
                                  f"{list(expected[name].shape)}")
    module.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True, assign=True)
    for sub in module.modules():  # buffers were built on the CPU in float32 from the config
        for name, buf in sub.named_buffers(recurse=False):
            sub._buffers[name] = buf.to(device=device, dtype=dtype if buf.is_floating_point() else buf.dtype)
    module.eval().requires_grad_(False)
