"""Backends: what runs a stage (text encoder, denoiser, VAE decoder, stitched decoder).

Every backend takes and returns named torch tensors, the names being those of the stage's
export contract (``vist3a_rt.export.contracts``), so the pipeline does not care which one runs.

* ``onnxruntime`` — ``OnnxRuntimeBackend``: exported ONNX graphs through onnxruntime (CPU
  execution provider; CUDA / TensorRT providers with ``onnxruntime-gpu``). Needs the ``onnx``
  extra; onnxruntime is imported only when a backend is created.
* ``tensorrt`` — ``TensorRTBackend``: engines built from the same ONNX
  (``vist3a_rt.export.tensorrt_build``), I/O bound to torch CUDA tensors, the denoiser replayed
  as a CUDA graph. Needs tensorrt and an NVIDIA GPU; imported only when a backend is created.

Nothing here is imported until first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from torch import Tensor

from ..errors import Vist3AInputError


class BackendUnavailableError(Vist3AInputError):
    """A backend's library is not installed, or cannot use the requested device."""


@runtime_checkable
class Backend(Protocol):
    """Runs the stages it was built for; inputs and outputs by contract name."""

    name: str

    @property
    def stages(self) -> tuple[str, ...]: ...

    def run(self, stage: str, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]: ...


_LAZY = {"OnnxRuntimeBackend": "vist3a_rt.backends.onnxruntime_backend",
         "OnnxRuntimeStage": "vist3a_rt.backends.onnxruntime_backend",
         "TensorRTBackend": "vist3a_rt.backends.tensorrt_backend",
         "TensorRTStage": "vist3a_rt.backends.tensorrt_backend"}

__all__ = ["Backend", "BackendUnavailableError", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'vist3a_rt.backends' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
