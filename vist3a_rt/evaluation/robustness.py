"""Section 3 of the report: robustness to noisy latents, the paper's claim for stitching.

A generator's latents are never exactly a VAE encoding. To measure what that costs, Gaussian
noise of ``level`` times the VAE's per-channel latent std (``latents_std``, the spread
``training.vae.fit_latent_statistics`` measured) is added to each held-out clip's raw latents,
and the noisy latents are turned into 3D two ways:

(a) ``stitched``: the stitched decoder reads them directly (with their VAE decoding resized to
    the network size beside them, as at run time);
(b) ``decode_then_reconstruct``: the VAE decodes them, the unstitched network reconstructs the
    resized frames.

Both are scored on the clip's novel views (``world_eval.score_output``). One noise draw per
clip (seeded), scaled to every level, so levels differ only in magnitude. Level 0 is the clean
reference.
"""

from __future__ import annotations

import torch

from .clips import HeldoutClip
from .model import EvalModel
from .world_eval import EncodedClip, decoded_frames, score_output

NOISE_LEVELS = (0.1, 0.25, 0.5)


@torch.no_grad()
def robustness_section(model: EvalModel, clips: list[HeldoutClip], encoded: list[EncodedClip], *,
                       levels: tuple[float, ...] = NOISE_LEVELS, seed: int = 0) -> dict:
    """Novel-view PSNR of (a) and (b) at noise level 0 and each of ``levels``, means over clips."""
    std = torch.tensor(model.vae.config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
    table = {level: {"stitched": [], "decode_then_reconstruct": []} for level in (0.0, *levels)}
    for clip, enc in zip(clips, encoded):
        noise = torch.randn(enc.latent.shape, generator=torch.Generator().manual_seed(seed * 100_003 + clip.index))
        for level, scores in table.items():
            latent = enc.latent + level * std * noise
            frames = enc.frames if level == 0 else decoded_frames(model, latent)
            scores["stitched"].append(score_output(model.stitched(latent, frames), clip, model.background)["psnr"])
            scores["decode_then_reconstruct"].append(
                score_output(model.reconstruction(frames), clip, model.background)["psnr"])
    rows = []
    for level, scores in table.items():
        a, b = (sum(v) / len(v) if v else float("nan") for v in scores.values())
        rows.append({"level": level, "psnr_stitched": a, "psnr_decode_then_reconstruct": b, "advantage_db": a - b})
    return {"num_clips": len(clips), "noise": "level x per-channel latents_std, one draw per clip",
            "seed": seed, "levels": rows}


__all__ = ["NOISE_LEVELS", "robustness_section"]
