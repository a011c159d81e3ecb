"""Arithmetic work: FLOPs of one denoiser forward, and this machine's measured matmul rate.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add of every
matmul, convolution and attention). Its table lacks the CPU flash-attention kernel that
``scaled_dot_product_attention`` dispatches to on the CPU, so that op is added with torch's own
attention formula; every other op without a formula (norms, activations, RoPE) counts 0, which
is why "achieved GFLOP/s" slightly understates the work done.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .stats import summarize, time_repeats


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_formulas() -> dict:
    cpu_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {cpu_attention: _cpu_attention_flops} if cpu_attention is not None else {}


def count_flops(fn, *args, **kwargs) -> tuple[int, dict[str, int]]:
    """(total FLOPs, FLOPs per aten op) of ``fn(*args, **kwargs)``."""
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=_extra_formulas()) as counter:
        fn(*args, **kwargs)
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


def denoiser_inputs(transformer: nn.Module, latent_shape: tuple[int, ...], text_tokens: int, *,
                    cfg_batch: int = 2) -> dict[str, torch.Tensor]:
    """Inputs of one denoising step's transformer forward: latents for ``cfg_batch`` rows
    ([cond; uncond] with guidance), a timestep, text embeddings."""
    batch = latent_shape[0] * cfg_batch
    device, dtype = transformer.device, transformer.dtype
    generator = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn((batch, *latent_shape[1:]), generator=generator).to(device, dtype),
            "timestep": torch.full((batch,), 500.0, device=device),
            "encoder_hidden_states": torch.randn((batch, text_tokens, transformer.config.text_dim),
                                                 generator=generator).to(device, dtype)}


def denoiser_flops(transformer: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[int, dict[str, int]]:
    return count_flops(transformer, **inputs, return_dict=False)


def matmul_rate(device: torch.device | str, *, size: int, repeats: int = 3,
                dtype: torch.dtype = torch.float32) -> dict:
    """Measured rate of one ``size``³ matmul in ``dtype`` on ``device``: the machine's practical
    peak for dense work, to put the denoiser's achieved rate in proportion."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn((size, size), generator=generator, dtype=dtype).to(device)
    b = torch.randn((size, size), generator=generator, dtype=dtype).to(device)
    seconds = summarize(time_repeats(lambda: torch.matmul(a, b), repeats=repeats, warmup=1, device=device))
    return {"size": size, "dtype": str(dtype).removeprefix("torch."), "seconds": seconds,
            "gflops": 2 * size**3 / seconds["median"] / 1e9}
