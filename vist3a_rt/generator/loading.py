"""Loading the Wan 2.1 video generator from a local diffusers-layout folder, offline.

The folder is what ``WanPipeline.save_pretrained`` writes (the released
``Wan2.1-T2V-*-Diffusers`` layout)::

    model_index.json  transformer/  vae/  text_encoder/  tokenizer/  scheduler/

Every piece is loaded with its own diffusers / transformers class and
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
the generator runs plain linear layers and the LoRA costs nothing at inference.
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


@dataclass
class WanComponents:
    """The loaded pieces of a Wan text-to-video model (LoRA, if any, already merged)."""

    tokenizer: "PreTrainedTokenizerBase"
    text_encoder: "UMT5EncoderModel"
    transformer: "WanTransformer3DModel"
    vae: "AutoencoderKLWan"
    scheduler_config: dict[str, Any]  # scheduler/scheduler_config.json as read


def set_offline_defaults() -> None:
    """Hub-offline unless the user said otherwise; call before importing diffusers/transformers."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_wan_components(wan_dir: str | Path, lora_dir: str | Path | None = None, *,
                        dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> WanComponents:
    """Tokenizer, text encoder (``dtype``), transformer (``dtype``, LoRA merged) and VAE
    (``vae_dtype``; float32 by default, as diffusers recommends for Wan) from ``wan_dir``."""
    device = torch.device(device)
    check_dtype(dtype, device)
    check_dtype(vae_dtype, device)
    wan_dir = check_wan_folder(wan_dir)
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
