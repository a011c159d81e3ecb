"""Training the Wan VAE on videos, and measuring its latent statistics.

``VaeTrainer(vae).step(videos)`` is one AdamW step on

    L1(x̂, x) + perceptual_weight · (1 − SSIM-lite)(x̂, x) + kl_weight · KL(q(z|x) ‖ N(0, I))

where x̂ decodes a reparameterised posterior sample. SSIM-lite is SSIM with a 3×3 box window on
every frame at three scales (full, ½, ¼): an LPIPS-free stand-in for a perceptual loss that
rewards edges and local contrast, which plain L1 blurs away. All terms are means (per pixel, per
latent element), so ``kl_weight`` is per latent element; the default 1e-6 only keeps the
posterior's scale bounded, as in latent-diffusion VAEs. The trainer decodes *without* the
clamp to [-1, 1] that ``AutoencoderKLWan.decode`` applies (``decode_unclamped``): a clamped
pixel gets no gradient, and one that overshoots early would stay stuck.

``fit_latent_statistics(vae, videos)`` measures the per-channel mean and standard deviation of
the posterior means over a sample of the data and writes them into the VAE config as
``latents_mean`` / ``latents_std``, where the Wan pipeline (and ``generator.latents``) reads
them: diffusion runs on ``(z − mean) / std``. ``normalized_latents`` produces exactly that.

``VaeTrainer.evaluate(videos)`` gives a deterministic validation number (L1 and PSNR of the
posterior means' reconstructions) for logs and for tests that must see the loss fall.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import Vist3AInputError
from ..generator.latents import latent_statistics

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan

SSIM_SCALES = 3
_SSIM_C1, _SSIM_C2 = 0.01 ** 2, 0.03 ** 2  # SSIM's constants for data in [0, 1]


class VaeTrainer:
    """AdamW on every VAE parameter; ``step(videos)`` returns the loss terms as floats."""

    def __init__(self, vae: "AutoencoderKLWan", lr: float = 3e-4, kl_weight: float = 1e-6, *,
                 perceptual_weight: float = 0.5, weight_decay: float = 0.0, grad_clip: float | None = 1.0,
                 seed: int = 0) -> None:
        for name, value in (("lr", lr), ("kl_weight", kl_weight), ("perceptual_weight", perceptual_weight)):
            if not value >= 0:
                raise Vist3AInputError(f"{name} must be >= 0, got {value}")
        self.vae = vae
        self.kl_weight = kl_weight
        self.perceptual_weight = perceptual_weight
        self.grad_clip = grad_clip
        self.optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)
        self.generator = torch.Generator(device=_device(vae)).manual_seed(seed)
        self.steps = 0

    def step(self, videos: Tensor) -> dict[str, float]:  # [B, 3, T, H, W] in [-1, 1]
        """One AdamW step; returns loss, l1, perceptual, kl, psnr (of the clamped reconstruction), grad_norm."""
        check_videos(videos, self.vae)
        self.vae.train()
        videos = videos.to(_device(self.vae), self.vae.dtype)
        posterior = self.vae.encode(videos).latent_dist
        recon = decode_unclamped(self.vae, posterior.sample(self.generator))
        l1 = (recon - videos).abs().mean()
        perceptual = structural_loss(recon, videos) if self.perceptual_weight else l1.new_zeros(())
        kl = kl_divergence(posterior.mean, posterior.logvar)
        loss = l1 + self.perceptual_weight * perceptual + self.kl_weight * kl
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_gradients(self.vae.parameters(), self.grad_clip)
        self.optimizer.step()
        self.steps += 1
        with torch.no_grad():
            mse = (recon.detach().clamp(-1, 1) - videos).square().mean()
            psnr = 10 * torch.log10(4.0 / mse.clamp_min(1e-10))  # peak-to-peak 2 for [-1, 1]
        return {"loss": loss.item(), "l1": l1.item(), "perceptual": perceptual.item(), "kl": kl.item(),
                "psnr": psnr.item(), "grad_norm": grad_norm}

    @torch.no_grad()
    def evaluate(self, videos: Tensor) -> dict[str, float]:  # [B, 3, T, H, W] in [-1, 1]
        """Reconstruction L1 and PSNR of the posterior means (deterministic; no training)."""
        check_videos(videos, self.vae)
        was_training = self.vae.training
        self.vae.eval()
        videos = videos.to(_device(self.vae), self.vae.dtype)
        recon = self.vae.decode(self.vae.encode(videos).latent_dist.mean).sample
        self.vae.train(was_training)
        mse = (recon - videos).square().mean()
        return {"l1": (recon - videos).abs().mean().item(),
                "psnr": (10 * torch.log10(4.0 / mse.clamp_min(1e-10))).item()}

    def state_dict(self) -> dict:
        return {"vae": self.vae.state_dict(), "optimizer": self.optimizer.state_dict(), "steps": self.steps,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.vae.load_state_dict(state["vae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = state["steps"]
        self.generator.set_state(state["generator"])


# --- losses ----------------------------------------------------------------------------------------


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:  # [B, z, T, h, w] each -> scalar
    """KL(N(mean, e^logvar) ‖ N(0, 1)), averaged over every latent element."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()


def structural_loss(recon: Tensor, target: Tensor, scales: int = SSIM_SCALES) -> Tensor:  # [B, 3, T, H, W] each
    """1 − SSIM-lite, averaged over ``scales`` dyadic scales (each frame an image, data in [-1, 1])."""
    x, y = _frames(recon), _frames(target)
    total = x.new_zeros(())
    for scale in range(scales):
        if scale:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        total = total + 1.0 - ssim_lite(x, y)
    return total / scales


def ssim_lite(x: Tensor, y: Tensor) -> Tensor:  # [N, C, H, W] each, in [0, 1] -> scalar
    """Mean SSIM with a 3×3 box window (valid positions only)."""
    mu_x, mu_y = F.avg_pool2d(x, 3, 1), F.avg_pool2d(y, 3, 1)
    var_x = F.avg_pool2d(x * x, 3, 1) - mu_x.square()
    var_y = F.avg_pool2d(y * y, 3, 1) - mu_y.square()
    cov = F.avg_pool2d(x * y, 3, 1) - mu_x * mu_y
    ssim = ((2 * mu_x * mu_y + _SSIM_C1) * (2 * cov + _SSIM_C2)
            / ((mu_x.square() + mu_y.square() + _SSIM_C1) * (var_x + var_y + _SSIM_C2)))
    return ssim.mean()


def _frames(video: Tensor) -> Tensor:  # [B, C, T, H, W] in [-1, 1] -> [B·T, C, H, W] in [0, 1]
    b, c, t, h, w = video.shape
    return (video.transpose(1, 2).reshape(b * t, c, h, w) + 1.0) * 0.5


# --- the VAE, as the trainer uses it -----------------------------------------------------------------


def decode_unclamped(vae: "AutoencoderKLWan", z: Tensor) -> Tensor:  # [B, z, T_lat, h, w] -> [B, 3, T, H, W]
    """``AutoencoderKLWan.decode`` (diffusers' ``_decode``: one causal decoder call per latent frame,
    sharing the feature cache) without the final clamp; ``.clamp(-1, 1)`` of it equals ``decode``."""
    if vae.config.patch_size is not None:
        raise Vist3AInputError("decode_unclamped supports Wan 2.1 VAEs (patch_size None); this one is patchified")
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    frames = []
    for i in range(x.shape[2]):
        vae._conv_idx = [0]
        frames.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                  first_chunk=i == 0))
    vae.clear_cache()
    return torch.cat(frames, dim=2)


def check_videos(videos: Tensor, vae: "AutoencoderKLWan") -> None:
    """[B, 3, T, H, W], T = 4k+1, H and W multiples of the spatial factor, finite, in [-1, 1]."""
    temporal, spatial = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    if not isinstance(videos, Tensor) or videos.ndim != 5 or videos.shape[1] != 3:
        shape = list(videos.shape) if isinstance(videos, Tensor) else type(videos).__name__
        raise Vist3AInputError(f"videos must be [batch, 3, frames, height, width], got {shape}")
    _, _, t, h, w = videos.shape
    if (t - 1) % temporal or h % spatial or w % spatial:
        raise Vist3AInputError(f"videos of {t} frames of {h}x{w} do not fit the VAE: frames must be "
                               f"{temporal}k+1, height and width multiples of {spatial}")
    if not videos.is_floating_point() or not torch.isfinite(videos).all():
        raise Vist3AInputError("videos must be finite floating-point tensors")
    low, high = videos.min().item(), videos.max().item()
    if low < -1.001 or high > 1.001:
        raise Vist3AInputError(f"videos must be in [-1, 1], got values in [{low:.3f}, {high:.3f}]")


@torch.no_grad()
def fit_latent_statistics(vae: "AutoencoderKLWan", videos_iter: Iterable[Tensor], *,
                          max_batches: int | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior means over ``videos_iter`` (batches [B, 3, T, H, W]),
    written into ``vae.config`` (``latents_mean`` / ``latents_std``) and returned."""
    count, total, total_sq = 0, None, None
    was_training = vae.training
    vae.eval()
    for i, videos in enumerate(videos_iter):
        if max_batches is not None and i >= max_batches:
            break
        check_videos(videos, vae)
        z = vae.encode(videos.to(_device(vae), vae.dtype)).latent_dist.mean.double()  # [B, z, T, h, w]
        channels = z.transpose(0, 1).flatten(1)  # [z, N]
        total = channels.sum(1) if total is None else total + channels.sum(1)
        total_sq = channels.square().sum(1) if total_sq is None else total_sq + channels.square().sum(1)
        count += channels.shape[1]
    vae.train(was_training)
    if count < 2:
        raise Vist3AInputError("fit_latent_statistics needs at least one batch of videos")
    mean = total / count
    std = ((total_sq - count * mean.square()) / (count - 1)).clamp_min(0).sqrt()
    flat = (std < 1e-4).nonzero().flatten().tolist()
    if flat:
        warnings.warn(f"latent channels {flat} are (nearly) constant over the data (std < 1e-4); "
                      "their std is floored at 1e-4", stacklevel=2)
    mean_list, std_list = mean.tolist(), std.clamp_min(1e-4).tolist()
    vae.register_to_config(latents_mean=mean_list, latents_std=std_list)
    return mean_list, std_list


def normalized_latents(vae: "AutoencoderKLWan", videos: Tensor, *,  # [B, 3, T, H, W] in [-1, 1]
                       sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """Diffusion-space latents ``(z − mean) / std`` [B, z, T_lat, h, w] (float32, no grad), with z the
    posterior mean (``sample=False``) or a posterior sample; the inverse of ``generator.denormalize``."""
    check_videos(videos, vae)
    with torch.no_grad():
        posterior = vae.encode(videos.to(_device(vae), vae.dtype)).latent_dist
        z = posterior.sample(generator) if sample else posterior.mean
        mean, std = latent_statistics(vae.config, z.device, torch.float32)
        return (z.float() - mean) / std


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def clip_gradients(parameters: Iterable[Tensor], max_norm: float | None) -> float:
    """The gradients' global L2 norm (before clipping), clipped to ``max_norm`` unless None."""
    parameters = [p for p in parameters if p.grad is not None]
    if max_norm is None:
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters])).item()
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm).item()


__all__ = ["VaeTrainer", "fit_latent_statistics", "normalized_latents", "decode_unclamped", "structural_loss",
           "ssim_lite", "kl_divergence", "check_videos", "clip_gradients"]
