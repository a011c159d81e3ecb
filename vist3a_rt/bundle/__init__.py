"""Exported bundles: the format (``format``), and loading one for generation.

``Vist3A.load(bundle_dir, backend=...)`` comes here when ``bundle_dir`` holds a bundle manifest:

* ``"onnxruntime"`` (and ``"auto"`` when onnxruntime is installed) — ``BundlePipeline``: the
  stages' ONNX graphs in onnxruntime, tokenization with ``tokenizers``, the flow samplers of
  ``samplers``; only core dependencies (no diffusers, no transformers);
* ``"torch"`` — the eager ``Vist3A`` pipeline with the bundle's safetensors weights;
* ``"tensorrt"`` — not wired to bundles here yet (a precise error).

``vist3a-rt export`` (``vist3a_rt.export.bundle``) writes bundles.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..errors import Vist3AInputError
from .format import FORMAT, is_bundle, read_manifest

BACKENDS = ("auto", "onnxruntime", "torch", "tensorrt")

__all__ = ["BACKENDS", "FORMAT", "is_bundle", "load_bundle", "read_manifest"]


def load_bundle(bundle: str | Path, *, backend: str = "auto", device: str = "cpu",
                dtype: torch.dtype = torch.float32, intra_op_threads: int | None = None, **paths):
    """A generation pipeline for ``bundle`` on ``backend`` (see the module docstring);
    ``intra_op_threads``: onnxruntime's threads per session (default: the physical cores)."""
    if paths:
        raise Vist3AInputError(f"a bundle holds every model piece; explicit paths {sorted(paths)} do not apply")
    if backend not in BACKENDS:
        raise Vist3AInputError(f"unknown backend {backend!r} for a bundle; choose one of {list(BACKENDS)}")
    if backend == "auto":
        backend = "onnxruntime" if importlib.util.find_spec("onnxruntime") is not None else "torch"
    if backend == "onnxruntime":
        if dtype != torch.float32:
            raise Vist3AInputError("the onnxruntime backend runs the bundle's graphs at the precision they were "
                                   f"exported with (its I/O is float32); dtype {dtype} applies to backend='torch'")
        from .pipeline import BundlePipeline

        return BundlePipeline.load(bundle, device=device, intra_op_threads=intra_op_threads)
    if backend == "torch":
        from .torch_pipeline import load_torch_pipeline

        return load_torch_pipeline(bundle, device=device, dtype=dtype)
    from ..backends import BackendUnavailableError

    raise BackendUnavailableError("backend 'tensorrt' cannot run a bundle yet: build its engines with "
                                  "`vist3a-rt export --backend tensorrt` and use backend='onnxruntime' or 'torch'")
