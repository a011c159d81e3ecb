"""Test and benchmark helpers: tiny random models in the official on-disk layout.

``write_tiny_model`` needs diffusers, transformers, tokenizers and PEFT; nothing is imported
until a name below is first used.
"""

from __future__ import annotations

import importlib

_PUBLIC = {name: "vist3a_rt.testing.tiny_model" for name in
           ("write_tiny_model", "tiny_decoder_config", "ORBIT_PROMPT_TEMPLATE", "OFFICIAL_NEGATIVE_PROMPT")}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'vist3a_rt.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
