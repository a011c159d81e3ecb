"""The text positions the denoiser's cross-attention needs, and what each one stands for.

The text encoder pads every prompt to the same length (512) with embedding rows that are exactly
zero, so in every block all padded positions of a prompt have one and the same cross-attention
key and value. Attention over ``n`` identical keys equals attention over one of them with
``log n`` added to its score (Σ over n copies of exp(q·k)·v = exp(q·k + log n)·v). So the
bundle's denoiser attends to:

* each prompt's positions up to its last non-zero one (``used_length``), plus one zero position
  (``trim``): the context graph (``denoiser_context``) runs on these, once per prompt;
* for a batch ([cond; uncond]), every prompt's rows padded to the longest with its zero
  position's row, and one log count per position (``join``): 0 for a position that stands for
  itself, log(number of zero positions it replaces) for the last one.

The result equals full attention over the 512 positions up to float rounding; for the nano
model's prompts (33 and 79 tokens) it attends to 80 positions instead of 512.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def used_length(embeddings: Tensor) -> int:  # [B, L, D]
    """1 + the index of the last position that is non-zero in any row (0 when all are zero)."""
    nonzero = embeddings.ne(0).any(dim=-1).any(dim=0)  # [L]
    return int(nonzero.nonzero().max()) + 1 if bool(nonzero.any()) else 0


def trim(embeddings: Tensor) -> tuple[Tensor, int]:  # [B, L, D] -> ([B, K, D], used length)
    """The used positions and, when the rows are padded, the first zero position after them."""
    used = used_length(embeddings)
    return embeddings[:, :min(used + 1, embeddings.shape[1])], used


def join(parts: list[tuple[Tensor, int]], total: int) -> tuple[Tensor, Tensor]:
    """One batch from per-prompt ``(context [1, K_i, C], used length)`` pairs made from ``trim``med
    embeddings of ``total`` positions: (context [B, K, C], log counts [K] float32)."""
    longest = max(used for _, used in parts)
    kept = min(longest + 1, total)
    rows = []
    for context, used in parts:
        missing = kept - context.shape[1]  # > 0 only for a padded prompt: its last row is the zero position's
        rows.append(torch.cat([context, context[:, -1:].expand(-1, missing, -1)], dim=1) if missing else context)
    log_counts = torch.zeros(kept, dtype=torch.float32)
    if longest < total:  # the last kept position is a zero one in every row, as are the dropped ones
        log_counts[-1] = math.log(total - kept + 1)
    return torch.cat(rows), log_counts
