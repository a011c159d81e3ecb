"""How closely a backend's output follows torch eager's on the same prompt and seed."""

from __future__ import annotations

import math

from torch import Tensor


def tensor_agreement(output: Tensor, reference: Tensor) -> dict[str, float]:
    """Max |output − reference|, and that divided by max |reference| (the relative error)."""
    if output.shape != reference.shape:
        raise ValueError(f"shapes differ: {list(output.shape)} vs reference {list(reference.shape)}")
    output, reference = output.detach().double().cpu(), reference.detach().double().cpu()
    max_abs = (output - reference).abs().max().item() if reference.numel() else 0.0
    scale = reference.abs().max().item() if reference.numel() else 0.0
    return {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)}


def psnr(image: Tensor, reference: Tensor, *, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of ``image`` against ``reference`` (``inf`` when identical)."""
    if image.shape != reference.shape:
        raise ValueError(f"image shapes differ: {list(image.shape)} vs reference {list(reference.shape)}")
    mse = (image.detach().double().cpu() - reference.detach().double().cpu()).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)
