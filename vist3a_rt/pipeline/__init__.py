"""The text-to-3D pipeline: ``Vist3A`` and its ``GenerationResult`` (imported on first use)."""

import importlib

_PUBLIC = {"Vist3A": ".vist3a", "GenerationSettings": ".vist3a", "GenerationResult": ".result"}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'vist3a_rt.pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name], __name__), name)
