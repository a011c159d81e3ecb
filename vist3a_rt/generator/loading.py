"""Loading the Wan 2.1 video generator from a local diffusers-layout folder, offline.

The folder is what ``WanPipeline.save_pretrained`` writes (the released
``Wan2.1-T2V-*-Diffusers`` layout)::

    model_index.json  transformer/  vae/  text_encoder/  tokenizer/  scheduler/

Two implementations read it (``impl``):

* ``"native"`` — the runtime's own plain-torch modules (``generator.native``): the same
  config.json and state-dict keys, built on the meta device and given the memory-mapped weights;
  the tokenizer through the ``tokenizers`` library (``bundle.text.BundleTokenizer``). Imports
  neither diffusers, transformers nor peft, whose imports alone cost seconds of a cold start:
  ``vist3a-rt generate`` runs it by default. Inference only: no VAE encoder, no PEFT injection.
* ``"diffusers"`` — the libraries' classes, the reference the native modules are tested against,
  and what training, evaluation and export build on (PEFT adapters on the transformer, the VAE
  encoder, the library config classes in bundle manifests); so it stays ``Vist3A.load``'s
  default. The rest of this docstring describes it.

With ``"diffusers"`` every piece is loaded with its own diffusers / transformers class and
``local_files_only=True``; nothing is ever fetched. In addition, before diffusers, transformers
or peft is first imported, ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` are set unless the
user already set them (``os.environ.setdefault``: an explicit user value wins), so a stray hub
lookup fails fast instead of hanging on a machine without network. (huggingface_hub reads the
variable once, at import; if the host program imported it earlier, ``local_files_only`` alone
still keeps every load local.) Library load failures become ``CheckpointError`` naming the
subfolder.

The reward-aligned LoRA is a PEFT adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``). It is checked against the transformer's module names first (a
LoRA made for another architecture is a ``CheckpointError`` naming the targets that do not
exist), then loaded with ``PeftModel.from_pretrained`` and merged with ``merge_and_unload``:
the generator runs plain linear layers and the LoRA costs nothing at inference. The native path
merges the same adapter into the state dict before it is assigned (``merge_lora_state``: W + s·B·A
with PEFT's scaling and dtype rules), after the same checks.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CheckpointError, Vist3AInputError

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")
_LORA_PREFIX = "base_model.model."
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
IMPLEMENTATIONS = ("native", "diffusers")
IMPL_ENV_VARIABLE = "VIST3A_WAN_IMPL"  # overrides the default implementation of Vist3A.load and the CLI


@dataclass
class WanComponents:
    """The loaded pieces of a Wan text-to-video model (LoRA, if any, already merged)."""

    tokenizer: "PreTrainedTokenizerBase"
    text_encoder: "UMT5EncoderModel"
    transformer: "WanTransformer3DModel"
    vae: "AutoencoderKLWan"
    scheduler_config: dict[str, Any]  # scheduler/scheduler_config.json as read
    impl: str = "diffusers"  # which classes these are: "native" (generator.native) or "diffusers"


def resolve_impl(impl: str | None, default: str = "diffusers") -> str:
    """``impl``, else the ``VIST3A_WAN_IMPL`` environment variable, else ``default``; checked."""
    impl = impl or os.environ.get(IMPL_ENV_VARIABLE) or default
    if impl not in IMPLEMENTATIONS:
        raise Vist3AInputError(f"unknown Wan implementation {impl!r} (from the argument or {IMPL_ENV_VARIABLE}); "
                               f"choose one of {list(IMPLEMENTATIONS)}")
    return impl


def set_offline_defaults() -> None:
    """Hub-offline unless the user said otherwise; call before importing diffusers/transformers."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_wan_components(wan_dir: str | Path, lora_dir: str | Path | None = None, *,
                        dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", impl: str = "diffusers") -> WanComponents:
    """Tokenizer, text encoder (``dtype``), transformer (``dtype``, LoRA merged) and VAE
    (``vae_dtype``; float32 by default, as diffusers recommends for Wan) from ``wan_dir``, as
    ``impl`` classes (see the module docstring)."""
    if impl not in IMPLEMENTATIONS:
        raise Vist3AInputError(f"unknown Wan implementation {impl!r}; choose one of {list(IMPLEMENTATIONS)}")
    device = torch.device(device)
    check_dtype(dtype, device)
    check_dtype(vae_dtype, device)
    wan_dir = check_wan_folder(wan_dir)
    if impl == "native":
        return _load_native_components(wan_dir, lora_dir, dtype=dtype, vae_dtype=vae_dtype, device=device)
    set_offline_defaults()
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a "Loading weights" bar per component is noise here

    with _loading(wan_dir, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(wan_dir / "tokenizer", local_files_only=True)
    with _loading(wan_dir, "text_encoder"):
        text_encoder = UMT5EncoderModel.from_pretrained(wan_dir / "text_encoder", dtype=dtype,
                                                        local_files_only=True)
    with _loading(wan_dir, "transformer"):
        transformer = WanTransformer3DModel.from_pretrained(wan_dir, subfolder="transformer", torch_dtype=dtype,
                                                            local_files_only=True)
    if lora_dir is not None:
        transformer = merge_lora(transformer, lora_dir)
    with _loading(wan_dir, "vae"):
        vae = AutoencoderKLWan.from_pretrained(wan_dir, subfolder="vae", torch_dtype=vae_dtype,
                                               local_files_only=True)
    scheduler_config = _read_json(wan_dir / "scheduler" / "scheduler_config.json")
    for module in (text_encoder, transformer, vae):
        module.to(device).eval().requires_grad_(False)
    return WanComponents(tokenizer, text_encoder, transformer, vae, scheduler_config)


def _load_native_components(wan_dir: Path, lora_dir: str | Path | None, *, dtype: torch.dtype,
                            vae_dtype: torch.dtype, device: torch.device) -> WanComponents:
    from ..bundle.text import BundleTokenizer
    from .native.loading import load_text_encoder, load_transformer, load_vae

    if not (wan_dir / "tokenizer" / "tokenizer.json").is_file():
        raise CheckpointError(f"Wan model folder {wan_dir}: tokenizer/ has no tokenizer.json, which the native "
                              "implementation reads (a spiece.model-only tokenizer needs impl='diffusers')")
    tokenizer = BundleTokenizer(wan_dir / "tokenizer")
    text_encoder = load_text_encoder(wan_dir / "text_encoder", dtype=dtype, device=device)
    merge = None
    if lora_dir is not None:
        lora_dir = Path(lora_dir)
        read_adapter_config(lora_dir)  # a missing or foreign adapter fails before the weights are read

        def merge(state, transformer):
            return merge_lora_state(state, transformer, lora_dir)
    transformer = load_transformer(wan_dir / "transformer", dtype=dtype, device=device, transform=merge)
    vae = load_vae(wan_dir / "vae", dtype=vae_dtype, device=device)
    scheduler_config = _read_json(wan_dir / "scheduler" / "scheduler_config.json")
    return WanComponents(tokenizer, text_encoder, transformer, vae, scheduler_config, impl="native")


@contextlib.contextmanager
def _loading(wan_dir: Path, sub: str) -> Iterator[None]:
    """Library load failures (unreadable config, truncated or mismatched weights) as CheckpointError."""
    try:
        yield
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        if isinstance(err, Vist3AInputError):
            raise
        raise CheckpointError(f"cannot load {sub}/ of the Wan model folder {wan_dir}: {err}") from err


def check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """float32 and bfloat16 anywhere; float16 only off the CPU (torch's CPU float16 kernels are
    far slower than float32 and the official recipe only uses float16 on CUDA)."""
    if dtype not in SUPPORTED_DTYPES:
        raise Vist3AInputError(f"unsupported generator dtype {dtype}; use one of "
                               f"{[str(d).removeprefix('torch.') for d in SUPPORTED_DTYPES]}")
    if dtype == torch.float16 and device.type == "cpu":
        raise Vist3AInputError("float16 on the CPU is not supported (CPU float16 kernels are orders of "
                               "magnitude slower than float32); use float32 or bfloat16 on the CPU")


def check_wan_folder(wan_dir: str | Path) -> Path:
    """The folder as a Path, after checking that every piece of the diffusers layout is there."""
    wan_dir = Path(wan_dir)
    if not wan_dir.is_dir():
        raise CheckpointError(f"Wan model folder not found: {wan_dir}")
    _require_file(wan_dir, "model_index.json")
    _require_file(wan_dir, "scheduler/scheduler_config.json")
    for sub in ("transformer", "vae", "text_encoder"):
        _require_file(wan_dir, f"{sub}/config.json")
        if not any(p.name.endswith(_WEIGHT_SUFFIXES) for p in (wan_dir / sub).iterdir()):
            raise CheckpointError(f"Wan model folder {wan_dir}: {sub}/ holds no weights "
                                  f"(expected one of *{', *'.join(_WEIGHT_SUFFIXES)})")
    _require_dir(wan_dir, "tokenizer")
    if not any((wan_dir / "tokenizer" / name).is_file() for name in ("tokenizer.json", "spiece.model")):
        raise CheckpointError(f"Wan model folder {wan_dir}: tokenizer/ holds neither tokenizer.json "
                              "nor spiece.model")
    return wan_dir


def _require_dir(root: Path, sub: str) -> None:
    if not (root / sub).is_dir():
        raise CheckpointError(f"Wan model folder {root} has no {sub}/ subfolder")


def _require_file(root: Path, relative: str) -> None:
    if "/" in relative:
        _require_dir(root, relative.split("/")[0])
    if not (root / relative).is_file():
        raise CheckpointError(f"Wan model folder {root} is missing {relative}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None


# --- the reward-aligned LoRA -----------------------------------------------------------------


def merge_lora(transformer: "WanTransformer3DModel", lora_dir: str | Path) -> "WanTransformer3DModel":
    """``transformer`` with the PEFT adapter in ``lora_dir`` merged into its weights (W + s·B·A)."""
    lora_dir = Path(lora_dir)
    config = read_adapter_config(lora_dir)
    check_lora_matches(transformer, config, adapter_module_names(lora_dir))
    set_offline_defaults()
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(transformer, lora_dir, is_trainable=False)
    except (ValueError, RuntimeError, KeyError) as err:  # shape mismatches, bad config fields
        raise CheckpointError(f"LoRA adapter {lora_dir} does not fit the Wan transformer: {err}") from None
    return peft_model.merge_and_unload(safe_merge=True)


def merge_lora_state(state: dict[str, torch.Tensor], transformer: torch.nn.Module,
                     lora_dir: str | Path) -> dict[str, torch.Tensor]:
    """``state`` (the transformer's, already in its load dtype) with the PEFT adapter of
    ``lora_dir`` merged: ``W + s·(B·A)``, ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA),
    the product in float32 and rounded to W's dtype before the sum, as PEFT merges on the CPU.
    ``transformer`` (which may live on the meta device) names the layers the adapter must fit."""
    lora_dir = Path(lora_dir)
    config = read_adapter_config(lora_dir)
    _refuse_unsupported_lora(config, lora_dir)
    names = adapter_module_names(lora_dir)
    check_lora_matches(transformer, config, names)
    from ..bundle.weights import load_state

    factors = load_state(lora_dir / "adapter_model.safetensors")
    rank, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    scaling = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
    merged = dict(state)
    for name in sorted(names):
        down = factors[f"{_LORA_PREFIX}{name}.lora_A.weight"].float()  # [r, in]
        up = factors[f"{_LORA_PREFIX}{name}.lora_B.weight"].float()  # [out, r]
        weight = state[f"{name}.weight"]  # [out, in]
        delta = up @ down * scaling
        if config.get("fan_in_fan_out"):
            delta = delta.T
        if tuple(delta.shape) != tuple(weight.shape) or down.shape[0] != rank:
            raise CheckpointError(f"LoRA adapter {lora_dir}: {name} has A {list(down.shape)}, B {list(up.shape)} "
                                  f"(rank {rank} in adapter_config.json), which do not fit the weight "
                                  f"{list(weight.shape)}")
        if not torch.isfinite(delta).all():
            raise CheckpointError(f"LoRA adapter {lora_dir}: the update of {name} is not finite")
        merged[f"{name}.weight"] = weight + delta.to(weight.dtype)
    return merged


_LORA_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "bias": "none", "rank_pattern": {}, "alpha_pattern": {},
                     "layer_replication": None, "target_parameters": None}


def _refuse_unsupported_lora(config: dict, lora_dir: Path) -> None:
    """Adapter options whose merge is not ``W + s·B·A`` per targeted linear layer."""
    set_options = sorted(k for k, default in _LORA_UNSUPPORTED.items() if config.get(k) not in (None, default))
    if set_options:
        raise CheckpointError(f"LoRA adapter {lora_dir} sets {set_options}, which the native Wan implementation does "
                              "not merge (load it with impl='diffusers')")


def read_adapter_config(lora_dir: Path) -> dict:
    if not lora_dir.is_dir():
        raise CheckpointError(f"LoRA adapter folder not found: {lora_dir}")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (lora_dir / name).is_file():
            raise CheckpointError(f"LoRA adapter folder {lora_dir} is missing {name}")
    config = _read_json(lora_dir / "adapter_config.json")
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{lora_dir}/adapter_config.json: peft_type {config['peft_type']!r} is not LORA")
    return config


def adapter_module_names(lora_dir: Path) -> set[str]:
    """The transformer module paths that ``adapter_model.safetensors`` holds LoRA weights for."""
    from safetensors import safe_open

    try:
        with safe_open(lora_dir / "adapter_model.safetensors", framework="pt") as f:
            keys = list(f.keys())
    except Exception as err:  # safetensors raises its own error types for truncated/foreign files
        raise CheckpointError(f"cannot read {lora_dir}/adapter_model.safetensors: {err}") from None
    names = set()
    for key in keys:
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(_LORA_PREFIX):
            raise CheckpointError(f"{lora_dir}/adapter_model.safetensors: unexpected tensor {key!r} "
                                  f"(expected {_LORA_PREFIX}<module>.lora_A/B.weight)")
        names.add(key[len(_LORA_PREFIX):-len(suffix)])
    return names


def check_lora_matches(transformer: torch.nn.Module, config: dict, weight_modules: set[str]) -> None:
    """Every listed target and every weight in the file must name a linear layer of the transformer."""
    linear_names = {name for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = config.get("target_modules")
    if isinstance(targets, list):  # a regex string is left to PEFT's own matching
        matches = {t: {n for n in linear_names if n == t or n.endswith("." + t)} for t in targets}
        missing = sorted(t for t, found in matches.items() if not found)
        if missing:
            raise CheckpointError(f"LoRA target modules {missing} do not exist in the Wan transformer "
                                  f"(it has e.g. {sorted(linear_names)[:4]})")
        unfilled = sorted(set().union(*matches.values()) - weight_modules)
        if unfilled and not (config.get("layers_to_transform") or config.get("exclude_modules")):
            raise CheckpointError(f"adapter_model.safetensors has no LoRA weights for {len(unfilled)} "
                                  f"targeted modules, e.g. {unfilled[:4]}")
    unknown = sorted(weight_modules - linear_names)
    if unknown:
        raise CheckpointError(f"LoRA weights for {len(unknown)} modules that do not exist in the Wan "
                              f"transformer, e.g. {unknown[:4]}")
    if not weight_modules:
        raise CheckpointError("the LoRA adapter holds no weights")
