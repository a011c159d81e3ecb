"""``WanGenerator``: prompt embeddings → flow-matching sampling → latents → video frames.

The video half of VIST3A, exactly as the official inference runs it through diffusers, minus the
pipeline object: the stages are separate methods so the caller can time them, cache the
negative prompt, and hand the de-normalised latents to the stitched decoder.

``impl="native"`` runs the runtime's own modules (``generator.native``), the ``tokenizers``
tokenizer and the plain-torch flow samplers of ``bundle.samplers``: no diffusers, transformers
or peft is imported; inference only. ``impl="diffusers"`` (the default; training, evaluation and
export build on it) runs the library classes and schedulers. ``vist3a-rt generate`` picks native.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import Vist3AInputError
from . import latents as latent_ops
from .attention import AttentionChoice, use_triton_attention
from .loading import WanComponents, load_wan_components
from .sampling import StepCallback, check_initial_latents, check_steps_and_guidance, denoise, denoise_flow, \
    initial_noise, make_scheduler
from .text import MAX_SEQUENCE_LENGTH, TextEncoder


class WanGenerator:
    """A loaded Wan 2.1 text-to-video model (LoRA merged) with the official sampling recipe."""

    def __init__(self, components: WanComponents, *, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                 cache_size: int = 16) -> None:
        self.components = components
        self.impl = components.impl
        self.transformer = components.transformer
        self.vae = components.vae
        clean = None
        if self.impl == "native":
            from ..bundle.text import clean_prompt as clean

            self.attention = AttentionChoice("sdpa", "the native Wan transformer runs torch SDPA")
        else:
            self.attention = use_triton_attention(self.transformer)  # SDPA unless VIST3A_ATTENTION=triton on CUDA
        self.text_encoder = TextEncoder(components.tokenizer, components.text_encoder,
                                        max_sequence_length=max_sequence_length, cache_size=cache_size, clean=clean)

    @classmethod
    def from_folder(cls, wan_dir: str | Path, lora_dir: str | Path | None = None, *,
                    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    vae_dtype: torch.dtype = torch.float32, impl: str = "diffusers") -> "WanGenerator":
        """Load a diffusers-layout Wan folder offline, merging the PEFT LoRA in ``lora_dir`` if given,
        as ``impl`` ("native" or "diffusers") classes."""
        return cls(load_wan_components(wan_dir, lora_dir, dtype=dtype, vae_dtype=vae_dtype, device=device,
                                       impl=impl))

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def encode_prompt(self, prompts: str | list[str], *, allow_empty: bool = False) -> torch.Tensor:
        """Text embeddings [B, 512, D] (cached per exact string; see ``TextEncoder``)."""
        return self.text_encoder(prompts, allow_empty=allow_empty)

    def latent_shape(self, batch: int, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        """[B, 16, T_lat, h, w], after checking the video size fits the VAE and the patching."""
        latent_ops.check_video_size(num_frames, height, width, temporal=self.vae.config.scale_factor_temporal,
                                    spatial=self.vae.config.scale_factor_spatial,
                                    patch=tuple(self.transformer.config.patch_size[1:]))
        return latent_ops.latent_shape(self.vae.config, batch, num_frames, height, width)

    def sample(self, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None, *, num_frames: int,
               height: int, width: int, num_steps: int = 50, guidance_scale: float = 7.5, sampler: str = "unipc",
               flow_shift: float = 5.0, seed: int | None = None, latents: torch.Tensor | None = None,
               callback: StepCallback | None = None) -> torch.Tensor:
        """Final latents [B, 16, T_lat, h, w] (float32, normalised) for ``prompt_embeds`` [B, L, D].

        ``latents``: explicit initial noise of exactly that shape; otherwise drawn on the CPU from
        ``seed`` (see ``initial_noise``). ``guidance_scale <= 1`` skips the unconditional pass
        (``negative_embeds`` may then be None). ``callback(step, timestep, latents)`` runs after
        every solver step.
        """
        check_steps_and_guidance(num_steps, guidance_scale)
        self._check_embeddings(prompt_embeds, "prompt_embeds")
        if negative_embeds is not None:
            self._check_embeddings(negative_embeds, "negative_embeds")
        shape = self.latent_shape(prompt_embeds.shape[0], num_frames, height, width)
        if latents is None:
            latents = initial_noise(shape, seed, self.device)
        else:
            check_initial_latents(latents, shape)
            latents = latents.to(self.device, torch.float32)
        if self.impl == "native":  # the plain-torch samplers: no diffusers scheduler
            from ..bundle.samplers import make_sampler

            flow_sampler = make_sampler(sampler, num_steps, flow_shift, self.components.scheduler_config)
            return denoise_flow(self.transformer, flow_sampler, latents, prompt_embeds, negative_embeds,
                                guidance_scale=guidance_scale, callback=callback)
        scheduler = make_scheduler(sampler, flow_shift, self.components.scheduler_config)
        return denoise(self.transformer, scheduler, latents, prompt_embeds, negative_embeds,
                       num_steps=num_steps, guidance_scale=guidance_scale, callback=callback)

    def _check_embeddings(self, embeds: torch.Tensor, name: str) -> None:
        text_dim = self.transformer.config.text_dim
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[-1] != text_dim:
            shape = list(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise Vist3AInputError(f"{name} must be [batch, tokens, {text_dim}], got {shape}")

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion-space latents → VAE latents (``latents / (1/std) + mean``)."""
        return latent_ops.denormalize(latents, self.vae.config)

    def decode(self, denormalized: torch.Tensor) -> torch.Tensor:
        """VAE latents → frames [B, 3, T, H, W] in [-1, 1]."""
        return latent_ops.decode(self.vae, denormalized)

    @staticmethod
    def resize_frames(frames: torch.Tensor, resolution: int | tuple[int, int]) -> torch.Tensor:
        """Frames resized to the stitched decoder's input (trilinear, align_corners=False)."""
        return latent_ops.resize_frames(frames, resolution)
