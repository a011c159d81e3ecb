"""Flow-matching training of the Wan transformer (optionally with its text encoder) on
normalised VAE latents, in exactly the convention the runtime's samplers integrate.

Convention (diffusers' ``FlowMatchEulerDiscreteScheduler`` and ``UniPCMultistepScheduler`` with
``prediction_type="flow_prediction"``, as used by ``generator.sampling``):

    x_σ = (1 − σ)·x₀ + σ·ε,      the transformer predicts v = ε − x₀  (so x₀ = x_σ − σ·v),

at timestep ``t = 1000·σ``. Euler steps ``x ← x + (σ_next − σ)·v``; UniPC converts ``v`` to
``x₀ = x − σ·v``. ``tests/test_train_video.py`` checks the pair by sampling with an oracle.

Timesteps: u ~ U(0, 1) (``"uniform"``) or sigmoid(N(m, s)) (``"logit_normal"``), then the
sampler's shift ``σ = shift·u / (1 + (shift − 1)·u)`` — uniform u spends training where the
shifted sampler spends its steps. Captions are wrapped in the official orbit-camera template
(as the runtime wraps prompts); with probability ``caption_dropout`` a caption is replaced by one
of ``uncond_prompts`` (the official negative prompt and the empty prompt by default), so that
either negative prompt gives the runtime's classifier-free guidance a trained unconditional
branch. Text is encoded as ``generator.text.TextEncoder`` does (cleaned, end-of-sequence, zeros
after the last real token, padded to 512 positions) but padded to the batch's longest caption
inside the encoder: the attention mask makes that identical and much cheaper.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import Vist3AInputError
from ..generator.sampling import NUM_TRAIN_TIMESTEPS
from ..generator.text import MAX_SEQUENCE_LENGTH, OFFICIAL_NEGATIVE_PROMPT, PROMPT_TEMPLATE, clean_prompt
from .vae import clip_gradients

if TYPE_CHECKING:
    from diffusers import WanTransformer3DModel
    from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

TIMESTEP_SAMPLING = ("uniform", "logit_normal")


# --- the flow-matching pair ------------------------------------------------------------------------


def shift_sigmas(u: Tensor, shift: float) -> Tensor:
    """The samplers' time shift: σ = shift·u / (1 + (shift − 1)·u)."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def sample_sigmas(batch: int, *, shift: float, mode: str = "uniform", logit_mean: float = 0.0,
                  logit_std: float = 1.0, generator: torch.Generator | None = None) -> Tensor:  # [B] in [0, 1]
    if mode not in TIMESTEP_SAMPLING:
        raise Vist3AInputError(f"unknown timestep sampling {mode!r}; choose one of {TIMESTEP_SAMPLING}")
    if mode == "uniform":
        u = torch.rand(batch, generator=generator)
    else:
        u = torch.sigmoid(logit_mean + logit_std * torch.randn(batch, generator=generator))
    return shift_sigmas(u, shift)


def flow_matching_pair(x0: Tensor, noise: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(x_σ, v): the noisy input ``(1 − σ)·x0 + σ·noise`` and the target velocity ``noise − x0``;
    ``sigma`` [B] broadcasts over the other dimensions."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise, noise - x0


def timesteps_from_sigmas(sigma: Tensor) -> Tensor:
    """The transformer's timestep for noise level σ (the schedulers' ``timesteps = σ·1000``)."""
    return sigma * NUM_TRAIN_TIMESTEPS


# --- text --------------------------------------------------------------------------------------------


def encode_captions(tokenizer: "PreTrainedTokenizerBase", text_encoder: "UMT5EncoderModel", prompts: list[str],
                    max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> Tensor:  # [B, max_sequence_length, D]
    """``TextEncoder``'s embeddings (differentiable when grad is on); see the module docstring."""
    tokens = tokenizer([clean_prompt(p) for p in prompts], padding="longest", max_length=max_sequence_length,
                       truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    device = text_encoder.device
    mask = tokens.attention_mask.to(device)
    hidden = text_encoder(tokens.input_ids.to(device), mask).last_hidden_state
    hidden = hidden * mask[..., None].to(hidden.dtype)  # exactly 0 after each prompt's last real token
    return F.pad(hidden, (0, 0, 0, max_sequence_length - hidden.shape[1]))


# --- the trainer -------------------------------------------------------------------------------------


class DenoiserTrainer:
    """AdamW on the transformer (and, with ``text_encoder_lr``, the text encoder); ``step`` returns floats.

    ``ema_decay``: keep an exponential moving average of every trained weight; ``ema_weights()``
    swaps it in for sampling or saving.
    """

    def __init__(self, transformer: "WanTransformer3DModel", text_encoder: "UMT5EncoderModel",
                 tokenizer: "PreTrainedTokenizerBase", *, lr: float = 3e-4, text_encoder_lr: float | None = None,
                 flow_shift: float = 5.0, timestep_sampling: str = "uniform", logit_mean: float = 0.0,
                 logit_std: float = 1.0, caption_dropout: float = 0.1,
                 uncond_prompts: Sequence[str] = (OFFICIAL_NEGATIVE_PROMPT, ""),
                 prompt_template: str | None = PROMPT_TEMPLATE, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                 ema_decay: float | None = None, weight_decay: float = 0.0, grad_clip: float | None = 1.0,
                 seed: int = 0) -> None:
        _check_options(flow_shift, timestep_sampling, caption_dropout, uncond_prompts, ema_decay)
        self.transformer, self.text_encoder, self.tokenizer = transformer, text_encoder, tokenizer
        self.train_text = text_encoder_lr is not None
        self.flow_shift, self.timestep_sampling = flow_shift, timestep_sampling
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.caption_dropout, self.uncond_prompts = caption_dropout, list(uncond_prompts)
        self.prompt_template, self.max_sequence_length = prompt_template, max_sequence_length
        self.grad_clip = grad_clip
        text_encoder.requires_grad_(self.train_text).train(self.train_text)
        groups = [{"params": [p for p in transformer.parameters() if p.requires_grad], "lr": lr}]
        if self.train_text:
            groups.append({"params": list(text_encoder.parameters()), "lr": text_encoder_lr})
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.99), weight_decay=weight_decay)
        self.ema_decay = ema_decay
        self.ema = {name: p.detach().clone() for name, p in self._trained()} if ema_decay else None
        self.generator = torch.Generator().manual_seed(seed)  # noise, timesteps (CPU: same draws on any device)
        self.rng = random.Random(seed)  # caption dropout
        self._uncond_cache: dict[str, Tensor] = {}
        self.steps = 0

    # -- one step

    def step(self, latents: Tensor, captions: Sequence[str]) -> dict[str, float]:  # [B, 16, T, h, w] normalised
        self._check_batch(latents, captions)
        self.transformer.train()
        device, dtype = self.transformer.device, self.transformer.dtype
        x0 = latents.to(device, torch.float32)
        # 1. noise level and noisy input
        sigma = sample_sigmas(x0.shape[0], shift=self.flow_shift, mode=self.timestep_sampling,
                              logit_mean=self.logit_mean, logit_std=self.logit_std, generator=self.generator)
        noise = torch.randn(x0.shape, generator=self.generator).to(device)
        x_t, target = flow_matching_pair(x0, noise, sigma.to(device))
        # 2. text, with caption dropout
        prompts, dropped = self._prompts(captions)
        context = self._embed(prompts).to(dtype)
        # 3. velocity prediction and loss
        velocity = self.transformer(hidden_states=x_t.to(dtype), timestep=timesteps_from_sigmas(sigma).to(device),
                                    encoder_hidden_states=context, return_dict=False)[0]
        loss = F.mse_loss(velocity.float(), target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_gradients([p for _, p in self._trained()], self.grad_clip)
        self.optimizer.step()
        self._update_ema()
        self.steps += 1
        return {"loss": loss.item(), "grad_norm": grad_norm, "sigma_mean": sigma.mean().item(),
                "dropped": float(dropped)}

    @torch.no_grad()
    def evaluate(self, latents: Tensor, captions: Sequence[str], *, num_sigmas: int = 4,
                 seed: int = 0) -> dict[str, float]:
        """The flow-matching loss at fixed noise (from ``seed``) and ``num_sigmas`` fixed noise levels
        (evenly spaced quantiles of the training distribution's u, shifted), without caption
        dropout: a low-variance validation number that steps with random σ cannot give."""
        self._check_batch(latents, captions)
        device, dtype = self.transformer.device, self.transformer.dtype
        generator = torch.Generator().manual_seed(seed)
        u = (torch.arange(num_sigmas) + 0.5) / num_sigmas
        sigma = shift_sigmas(u, self.flow_shift).repeat_interleave(latents.shape[0])  # [S·B]
        x0 = latents.to(device, torch.float32).repeat(num_sigmas, 1, 1, 1, 1)
        x_t, target = flow_matching_pair(x0, torch.randn(x0.shape, generator=generator).to(device), sigma.to(device))
        with _evaluating(self.transformer, self.text_encoder):
            context = encode_captions(self.tokenizer, self.text_encoder, [self._wrap(c) for c in captions],
                                      self.max_sequence_length).to(dtype)
            velocity = self.transformer(hidden_states=x_t.to(dtype), timestep=timesteps_from_sigmas(sigma).to(device),
                                        encoder_hidden_states=context.repeat(num_sigmas, 1, 1), return_dict=False)[0]
        per_sigma = (velocity.float() - target).square().flatten(1).mean(1).view(num_sigmas, -1).mean(1)
        return {"loss": per_sigma.mean().item(),
                **{f"loss_sigma_{s:.2f}": v.item() for s, v in zip(shift_sigmas(u, self.flow_shift), per_sigma)}}

    def _wrap(self, caption: str) -> str:
        return self.prompt_template.format(prompt=caption) if self.prompt_template else caption

    def _prompts(self, captions: Sequence[str]) -> tuple[list[str], int]:
        prompts, dropped = [], 0
        for caption in captions:
            if self.rng.random() < self.caption_dropout:
                prompts.append(self.rng.choice(self.uncond_prompts))
                dropped += 1
            else:
                prompts.append(self._wrap(caption))
        return prompts, dropped

    def _embed(self, prompts: list[str]) -> Tensor:  # [B, L, D]
        if self.train_text:
            return encode_captions(self.tokenizer, self.text_encoder, prompts, self.max_sequence_length)
        with torch.no_grad():  # frozen: encode the batch's captions; the few uncond prompts once
            missing = sorted({p for p in prompts if p in self.uncond_prompts and p not in self._uncond_cache})
            if missing:
                self._uncond_cache.update(zip(missing, encode_captions(
                    self.tokenizer, self.text_encoder, missing, self.max_sequence_length)))
            captions = [p for p in prompts if p not in self._uncond_cache]
            encoded = iter(encode_captions(self.tokenizer, self.text_encoder, captions, self.max_sequence_length)
                           if captions else [])
            return torch.stack([self._uncond_cache[p] if p in self._uncond_cache else next(encoded)
                                for p in prompts])

    def _check_batch(self, latents: Tensor, captions: Sequence[str]) -> None:
        channels = self.transformer.config.in_channels
        _, ph, pw = self.transformer.config.patch_size
        if not isinstance(latents, Tensor) or latents.ndim != 5 or latents.shape[1] != channels:
            shape = list(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise Vist3AInputError(f"latents must be [batch, {channels}, frames, height, width], got {shape}")
        if latents.shape[3] % ph or latents.shape[4] % pw:
            raise Vist3AInputError(f"latent height/width must be multiples of the patch ({ph}, {pw}), "
                                   f"got {tuple(latents.shape[3:])}")
        if isinstance(captions, str) or len(captions) != latents.shape[0] or \
                not all(isinstance(c, str) for c in captions):
            raise Vist3AInputError(f"captions must be a list of {latents.shape[0]} strings (one per latent)")
        if not torch.isfinite(latents).all():
            raise Vist3AInputError("latents contain NaN or infinite values")

    # -- trained weights and their EMA

    def _trained(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        yield from (("transformer." + n, p) for n, p in self.transformer.named_parameters() if p.requires_grad)
        if self.train_text:
            yield from (("text_encoder." + n, p) for n, p in self.text_encoder.named_parameters())

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        for name, param in self._trained():
            self.ema[name].lerp_(param.detach(), 1.0 - self.ema_decay)

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Within the block the models hold the EMA weights (the trained ones are restored after)."""
        if self.ema is None:
            raise Vist3AInputError("this trainer keeps no EMA (ema_decay was None)")
        params = dict(self._trained())
        backup = {name: p.detach().clone() for name, p in params.items()}
        try:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(self.ema[name])
            yield
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(backup[name])

    def state_dict(self) -> dict:
        return {"transformer": self.transformer.state_dict(), "text_encoder": self.text_encoder.state_dict(),
                "optimizer": self.optimizer.state_dict(), "ema": self.ema, "steps": self.steps,
                "generator": self.generator.get_state(), "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.transformer.load_state_dict(state["transformer"])
        self.text_encoder.load_state_dict(state["text_encoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema, self.steps = state["ema"], state["steps"]
        self.generator.set_state(state["generator"])
        self.rng.setstate(state["rng"])
        self._uncond_cache.clear()


@contextlib.contextmanager
def _evaluating(*modules: torch.nn.Module) -> Iterator[None]:
    """Modules in eval mode within the block, each back in its own mode after."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def _check_options(flow_shift: float, timestep_sampling: str, caption_dropout: float,
                   uncond_prompts: Sequence[str], ema_decay: float | None) -> None:
    if not (isinstance(flow_shift, (int, float)) and math.isfinite(flow_shift) and flow_shift > 0):
        raise Vist3AInputError(f"flow_shift must be a positive number, got {flow_shift!r}")
    if timestep_sampling not in TIMESTEP_SAMPLING:
        raise Vist3AInputError(f"unknown timestep sampling {timestep_sampling!r}; choose one of {TIMESTEP_SAMPLING}")
    if not 0.0 <= caption_dropout <= 1.0:
        raise Vist3AInputError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
    if caption_dropout > 0 and (isinstance(uncond_prompts, str) or not uncond_prompts):
        raise Vist3AInputError("caption dropout needs a non-empty list of uncond_prompts")
    if ema_decay is not None and not 0.0 < ema_decay < 1.0:
        raise Vist3AInputError(f"ema_decay must be in (0, 1) or None, got {ema_decay}")


__all__ = ["DenoiserTrainer", "encode_captions", "flow_matching_pair", "sample_sigmas", "shift_sigmas",
           "timesteps_from_sigmas", "TIMESTEP_SAMPLING"]
