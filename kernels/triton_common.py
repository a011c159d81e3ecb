"""Helpers shared by the Triton kernels (imported only where triton is installed)."""

import os

import triton


def interpreting() -> bool:
    """Whether ``@triton.jit`` makes interpreted functions (TRITON_INTERPRET=1 at import)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
