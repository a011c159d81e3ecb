"""vist3a-rt: a low-latency runtime for VIST3A text-to-3D.

Importing this package is cheap and needs no GPU, TensorRT or built extension: the public
names below are resolved on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "load_stitched_decoder": "vist3a_rt.decoder.loading",
    "load_reconstruction_model": "vist3a_rt.decoder.loading",
    "DecoderConfig": "vist3a_rt.decoder.config",
    "DecoderOutput": "vist3a_rt.decoder.network",
    "StitchedDecoder": "vist3a_rt.decoder.network",
    "ReconstructionModel": "vist3a_rt.decoder.network",
    "GaussianScene": "vist3a_rt.scene",
    "Camera": "vist3a_rt.scene",
    "Cameras": "vist3a_rt.scene",
    "render": "vist3a_rt.rendering",
    "Vist3A": "vist3a_rt.pipeline",
    "GenerationResult": "vist3a_rt.pipeline",
    "Vist3AInputError": "vist3a_rt.errors",
    "CheckpointError": "vist3a_rt.errors",
    "ConfigError": "vist3a_rt.errors",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'vist3a_rt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
