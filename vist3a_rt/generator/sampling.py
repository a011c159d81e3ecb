"""Flow-matching sampling of Wan latents with classifier-free guidance, on diffusers' schedulers.

The loop is diffusers' ``WanPipeline`` denoising loop with one change: the conditional and the
unconditional predictions come from **one** transformer forward on the batch ``[cond; uncond]``
(diffusers runs two batch-B forwards). The arithmetic per sample is the same; batched matmuls may
round differently in the last bit, well below the goldens' tolerances.

Samplers:

* ``"unipc"`` — the official one: ``UniPCMultistepScheduler(prediction_type="flow_prediction",
  num_train_timesteps=1000, use_flow_sigmas=True, flow_shift=flow_shift)``; every other field
  comes from the model folder's scheduler config when that is a UniPC config, else diffusers'
  defaults (bh2, order 2, predict_x0, lower_order_final, final sigma zero).
* ``"euler"`` — ``FlowMatchEulerDiscreteScheduler(shift=flow_shift)``, same rule for the rest.

The native generator steps the plain-torch flow samplers of ``vist3a_rt.bundle.samplers`` instead
(``denoise_flow``: the same loop, no diffusers); they compute diffusers' schedules and updates.

Guidance: ``guided = uncond + g·(cond − uncond)``. As in diffusers, ``g ≤ 1`` disables guidance:
the unconditional pass is skipped and the conditional prediction is used as is (so ``g`` in
``[0, 1]`` all mean "no guidance", not an interpolation). A negative ``g`` is an input error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..errors import Vist3AInputError

if TYPE_CHECKING:
    from diffusers import WanTransformer3DModel

SAMPLERS = {"unipc": "UniPCMultistepScheduler", "euler": "FlowMatchEulerDiscreteScheduler"}
NUM_TRAIN_TIMESTEPS = 1000

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (step index, timestep, latents after it)


def make_scheduler(sampler: str = "unipc", flow_shift: float = 5.0, base_config: dict[str, Any] | None = None):
    """A fresh (stateless) diffusers scheduler for ``sampler``; see the module docstring."""
    import diffusers

    check_sampler(sampler, flow_shift)
    cls = getattr(diffusers, SAMPLERS[sampler])
    base = base_config if base_config and base_config.get("_class_name") == cls.__name__ else {}
    if sampler == "unipc":
        return cls.from_config(base, prediction_type="flow_prediction", num_train_timesteps=NUM_TRAIN_TIMESTEPS,
                               use_flow_sigmas=True, flow_shift=flow_shift)
    return cls.from_config(base, num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=flow_shift)


def check_sampler(sampler: str, flow_shift: float) -> None:
    if sampler not in SAMPLERS:
        raise Vist3AInputError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    if not (isinstance(flow_shift, (int, float)) and math.isfinite(flow_shift) and flow_shift > 0):
        raise Vist3AInputError(f"flow_shift must be a positive number, got {flow_shift!r}")


def check_steps_and_guidance(num_steps: int, guidance_scale: float) -> None:
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise Vist3AInputError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if not (isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale)):
        raise Vist3AInputError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    if guidance_scale < 0:
        raise Vist3AInputError(f"guidance_scale must be >= 0 (<= 1 disables guidance), got {guidance_scale}")


def initial_noise(shape: tuple[int, ...], seed: int | None, device: str | torch.device) -> torch.Tensor:
    """Standard-normal float32 latents drawn on the CPU from ``torch.Generator().manual_seed(seed)``
    (the same numbers on every device), then moved to ``device``. ``seed=None``: a fresh random seed."""
    generator = torch.Generator("cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)


def check_initial_latents(latents: torch.Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
        raise Vist3AInputError(f"latents must be a floating-point tensor, got {type(latents).__name__}"
                               + (f" of {latents.dtype}" if isinstance(latents, torch.Tensor) else ""))
    if tuple(latents.shape) != tuple(shape):
        raise Vist3AInputError(f"latents have shape {list(latents.shape)}, expected {list(shape)} "
                               "[batch, channels, latent frames, latent height, latent width]")
    if not torch.isfinite(latents).all():
        raise Vist3AInputError("latents contain NaN or infinite values")


def guidance_context(prompt_embeds: torch.Tensor,  # [B, L, D]
                     negative_embeds: torch.Tensor | None,  # [B or 1, L, D]
                     guidance_scale: float) -> torch.Tensor:  # [2B, L, D] = [cond; uncond], or [B, L, D]
    """The text conditioning of one transformer forward: ``[cond; uncond]`` with guidance, else cond."""
    if guidance_scale <= 1.0:
        return prompt_embeds
    if negative_embeds is None:
        raise Vist3AInputError(f"guidance_scale {guidance_scale} > 1 needs negative prompt embeddings")
    batch = prompt_embeds.shape[0]
    if negative_embeds.shape[0] == 1 and batch > 1:  # one negative prompt for every prompt
        negative_embeds = negative_embeds.expand(batch, -1, -1)
    if negative_embeds.shape != prompt_embeds.shape:
        raise Vist3AInputError(f"negative prompt embeddings {list(negative_embeds.shape)} do not match the "
                               f"prompt embeddings {list(prompt_embeds.shape)}")
    return torch.cat([prompt_embeds, negative_embeds])


def predict_velocity(transformer: "WanTransformer3DModel", latents: torch.Tensor,  # [B, C, T, h, w]
                     timestep: torch.Tensor,  # scalar
                     context: torch.Tensor) -> torch.Tensor:  # [kB, L, D] -> [kB, C, T, h, w]
    """The transformer's flow prediction for ``latents`` repeated once per context block."""
    copies = context.shape[0] // latents.shape[0]
    hidden = latents.to(transformer.dtype).repeat(copies, 1, 1, 1, 1)
    return transformer(hidden_states=hidden, timestep=timestep.expand(hidden.shape[0]),
                       encoder_hidden_states=context, return_dict=False)[0]


def apply_guidance(velocity: torch.Tensor, batch: int, guidance_scale: float) -> torch.Tensor:
    """``uncond + g·(cond − uncond)`` from a ``[cond; uncond]`` prediction; unchanged without guidance."""
    if velocity.shape[0] == batch:
        return velocity
    cond, uncond = velocity.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


@torch.no_grad()
def denoise(transformer: "WanTransformer3DModel", scheduler, latents: torch.Tensor,  # [B, C, T, h, w] float32
            prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None, *, num_steps: int,
            guidance_scale: float, callback: StepCallback | None = None) -> torch.Tensor:
    """Run the sampler from ``latents`` to clean (normalised) latents, float32 [B, C, T, h, w]."""
    device, batch = latents.device, latents.shape[0]
    # 1. timesteps (integers for the transformer) and sigmas (floats for the solver)
    scheduler.set_timesteps(num_steps, device=device)
    scheduler.set_begin_index(0)
    # 2. conditioning for one batched forward per step: [cond; uncond]
    context = guidance_context(prompt_embeds, negative_embeds, guidance_scale).to(device, transformer.dtype)
    # 3. denoising loop
    for i, t in enumerate(scheduler.timesteps):
        velocity = predict_velocity(transformer, latents, t, context)
        velocity = apply_guidance(velocity, batch, guidance_scale)
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        if callback is not None:
            callback(i, t, latents)
    return latents


@torch.no_grad()
def denoise_flow(transformer, sampler, latents: torch.Tensor,  # [B, C, T, h, w] float32
                 prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None, *, guidance_scale: float,
                 callback: StepCallback | None = None) -> torch.Tensor:
    """``denoise`` for the native transformer on a plain-torch flow sampler
    (``bundle.samplers.make_sampler``: its own timesteps, ``step(velocity, latents)``): no diffusers
    scheduler, and the text's keys and values (``text_context``) computed once, not every step."""
    batch = latents.shape[0]
    context = guidance_context(prompt_embeds, negative_embeds, guidance_scale).to(latents.device, transformer.dtype)
    copies = context.shape[0] // batch
    text = transformer.text_context(context)
    for i, t in enumerate(sampler.timesteps):
        hidden = latents.to(transformer.dtype).repeat(copies, 1, 1, 1, 1)
        velocity = transformer(hidden, t.to(latents.device).expand(hidden.shape[0]), text, return_dict=False)[0]
        latents = sampler.step(apply_guidance(velocity, batch, guidance_scale), latents)
        if callback is not None:
            callback(i, t, latents)
    return latents
