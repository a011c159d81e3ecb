"""``reward``: reward fine-tuning of the Wan denoiser through the stitched 3D decoder (VIST3A).

One ``RewardTrainer.step(prompts, regularizer_batch)``:

1. encode the prompts (template-wrapped) and the negative prompt;
2. roll the sampler out from noise with classifier-free guidance; the transformer runs with
   gradients at K randomly chosen steps plus the last one and under ``no_grad`` elsewhere, and
   its input latents are always detached — gradients reach the LoRA only through those steps'
   velocities, carried to the final latents by the solver's (linear) updates;
3. de-normalise the final latents and decode frames with the frozen VAE, gradients flowing
   through it; resize the frames to the decoder's input;
4. run the frozen stitched decoder (latents + frames → Gaussians + cameras);
5. render the predicted cameras' views with the differentiable reference rasterizer at a
   reduced resolution;
6. score the pluggable rewards (``training.rewards``) and add the flow-matching loss on real
   (latents, captions) pairs as a regulariser; one AdamW step on the LoRA, then its EMA.

What follows the official ``train_vdm.py`` (read, not copied): LoRA r 8 / alpha 16 with PEFT's
default init on the attention projections ``attn1/attn2.{to_q,to_k,to_v,to_out.0}``; AdamW
(betas 0.9 / 0.95, weight decay 1e-4, lr 1e-4), gradient norm clipped at 1, a step with a
non-finite gradient norm skipped; UniPC flow-matching sampler with flow shift 3.0, a random
number of steps in [10, 50], guidance drawn uniformly from [4, 6], the empty negative prompt;
K = 2 random steps plus the last one with gradients, inputs detached; the VAE decodes with
gradients (it is frozen, not cut off); frames resized trilinearly with ``align_corners=True``
(the training path's resize); all predicted cameras rendered (in random order); the
flow-matching regulariser with σ ~ U(0, 1), ``x_σ = (1 − σ) x₀ + σ ε``, target ``ε − x₀``,
timestep ``1000 σ``, weight 1; EMA of the trainable weights in float32 with decay
``min((1 + step) / (10 + step), 0.99)`` updated every step; the EMA adapter saved as a PEFT
adapter folder (EMA swapped in, ``save_pretrained``, swapped back).

Deviations: the rewards (PickScore + a CLIP model on renders and one decoded frame in the
official code) are pluggable here; the built-in ones are 3D consistency and attribute
faithfulness (``training.rewards``). Prompts go through ``settings.prompt_template`` (default:
the orbit-camera sentence used at inference) instead of the official random choice among ~80
camera-motion sentences. Text embeddings use the generator's sequence length (512, as at
inference; the official training script pads to 226). The official script forces 50 sampling
steps on every 10th step for its image logs; that is not reproduced. Renders use the
reference rasterizer at ``render_size`` instead of gsplat at the decoder's resolution.

Train from the base transformer (``Vist3A.load(..., use_lora=False)``): the adapter is a delta
on the weights the generator holds, and ``WanGenerator.from_folder(wan, lora_dir)`` merges it
into the base weights of ``wan``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..decoder.network import DecoderOutput, StitchedDecoder
from ..errors import Vist3AInputError
from ..generator.latents import latent_statistics
from ..generator.sampling import apply_guidance, guidance_context, make_scheduler, predict_velocity
from ..generator.text import wrap_prompt
from ..rendering.reference import RasterConfig, rasterize_gaussians
from .denoiser import flow_matching_pair, timesteps_from_sigmas
from .rewards import Reward, RewardContext

# The official target list of train_vdm.py (the released adapters use it too).
TRANSFORMER_LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                            "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")

IntRange = int | tuple[int, int]
FloatRange = float | tuple[float, float]


@dataclass
class RewardSettings:
    """Reward fine-tuning settings; the defaults are the official ones (see the module docstring)."""

    # LoRA on the transformer
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = TRANSFORMER_LORA_TARGETS
    # optimiser
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    # rollout: a number, or a (low, high) range drawn per step (integers inclusive)
    num_steps: IntRange = (10, 50)
    num_grad_steps: int = 2  # K random steps with gradients, besides the last one
    guidance_scale: FloatRange = (4.0, 6.0)
    sampler: str = "unipc"
    flow_shift: float = 3.0
    negative_prompt: str = ""
    prompt_template: Callable[[str], str] | None = wrap_prompt  # None: the prompt as is
    num_frames: int | None = None  # None: the decoder config's resolutions
    height: int | None = None
    width: int | None = None
    # rendering
    render_size: int | tuple[int, int] = 64
    num_views: int | None = None  # None: every frame's camera (official)
    # regulariser and EMA
    regularizer_weight: float = 1.0
    ema_decay: float = 0.99
    ema_warmup: bool = True  # decay min((1 + step) / (10 + step), ema_decay)
    gradient_checkpointing: bool = False  # transformer blocks and the VAE decode (the official run checkpoints both)
    seed: int = 0  # every random draw of the trainer (noise, steps, guidance, views, σ, ε)

    def __post_init__(self) -> None:
        _check_range("num_steps", self.num_steps, int, 1)
        _check_range("guidance_scale", self.guidance_scale, (int, float), 0.0)
        for name in ("num_grad_steps", "lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "num_grad_steps" else 1):
                raise Vist3AInputError(f"{name} must be a {'non-negative' if name == 'num_grad_steps' else 'positive'} "
                                       f"integer, got {value!r}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise Vist3AInputError(f"ema_decay must lie in [0, 1], got {self.ema_decay}")
        if self.regularizer_weight < 0 or self.lr <= 0 or self.grad_clip <= 0:
            raise Vist3AInputError("regularizer_weight must be >= 0, lr and grad_clip > 0")
        if self.num_views is not None and (not isinstance(self.num_views, int) or self.num_views < 1):
            raise Vist3AInputError(f"num_views must be a positive integer or None, got {self.num_views!r}")
        size = _pair(self.render_size)
        if min(size) < 1:
            raise Vist3AInputError(f"render_size must be positive, got {self.render_size!r}")


def _check_range(name: str, value, kind, low) -> None:
    values = value if isinstance(value, tuple) else (value,)
    ok = len(values) in (1, 2) and all(isinstance(v, kind) and not isinstance(v, bool) and v >= low for v in values)
    if not ok or (len(values) == 2 and values[0] > values[1]):
        raise Vist3AInputError(f"{name} must be a number >= {low} or a (low, high) pair, got {value!r}")


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


@dataclass
class RegularizerBatch:
    """Real data for the flow-matching regulariser: diffusion-space latents (VAE latents
    normalised with ``normalize_latents``) and their captions (used as is, no template)."""

    latents: Tensor  # [B, 16, T_lat, h, w]
    captions: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.latents, Tensor) or self.latents.dim() != 5:
            raise Vist3AInputError("regularizer latents must be a [B, C, T_lat, h, w] tensor")
        if len(self.captions) != self.latents.shape[0]:
            raise Vist3AInputError(f"{self.latents.shape[0]} regularizer latents but {len(self.captions)} captions")


def normalize_latents(vae_latents: Tensor, vae_config) -> Tensor:  # [B, z, T, h, w]
    """VAE latents → diffusion space, ``(z − mean) · (1/std)`` (the official form)."""
    mean, std = latent_statistics(vae_config, vae_latents.device, torch.float32)
    return (vae_latents.float() - mean) * (1.0 / std)


# --- LoRA and its EMA ----------------------------------------------------------------------


def add_transformer_lora(transformer: nn.Module, settings: RewardSettings, seed: int = 0):
    """Inject a trainable PEFT LoRA into ``transformer`` in place; returns the ``PeftModel``
    (for saving). The transformer object itself keeps working as before, LoRA included."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    if any(isinstance(m, LoraLayer) for m in transformer.modules()):
        raise Vist3AInputError("the transformer already carries an unmerged LoRA; load the generator "
                               "with the adapter merged (or without it) before reward training")
    config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                        init_lora_weights=True, target_modules=list(settings.lora_targets))
    transformer.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # lora_A's Kaiming init from ``seed``, not the global stream
        torch.manual_seed(seed)
        return get_peft_model(transformer, config)


class EmaLora:
    """Exponential moving average of trainable weights, kept in float32.

    ``update(step)``: ``ema = d·ema + (1 − d)·w`` with ``d = min((1 + step)/(10 + step), decay)``
    (``warmup``) or ``d = decay``. ``applied()`` swaps the averages into the model and back.
    """

    def __init__(self, parameters: nn.Module | Mapping[str, nn.Parameter], decay: float = 0.99, *,
                 warmup: bool = True) -> None:
        if not 0.0 <= decay <= 1.0:
            raise Vist3AInputError(f"EMA decay must lie in [0, 1], got {decay}")
        named = parameters.named_parameters() if isinstance(parameters, nn.Module) else parameters.items()
        self.parameters = {name: p for name, p in named if p.requires_grad}
        if not self.parameters:
            raise Vist3AInputError("EmaLora got no trainable parameters")
        self.decay, self.warmup = decay, warmup
        self.shadow = {name: p.detach().float().clone() for name, p in self.parameters.items()}

    def decay_at(self, step: int) -> float:
        return min((1 + step) / (10 + step), self.decay) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = self.decay_at(step)
        for name, p in self.parameters.items():
            self.shadow[name].mul_(d).add_(p.detach().float(), alpha=1.0 - d)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in the model for the duration of the block, the raw ones after."""
        backup = {name: p.detach().clone() for name, p in self.parameters.items()}
        try:
            with torch.no_grad():
                for name, p in self.parameters.items():
                    p.copy_(self.shadow[name].to(p.dtype))
            yield
        finally:
            with torch.no_grad():
                for name, p in self.parameters.items():
                    p.copy_(backup[name])

    def state_dict(self) -> dict[str, Tensor]:
        return {name: t.clone() for name, t in self.shadow.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise Vist3AInputError(f"EMA state names differ: missing {sorted(set(self.shadow) - set(state))[:3]}, "
                                   f"unexpected {sorted(set(state) - set(self.shadow))[:3]}")
        for name, t in state.items():
            self.shadow[name].copy_(t)


def save_peft_adapter(peft_model, folder: str | Path) -> Path:
    """``adapter_config.json`` + ``adapter_model.safetensors`` as the released adapters hold them
    (no model card; target modules sorted so the file does not depend on set order). Written
    beside ``folder`` and renamed into place, replacing an existing adapter folder."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        peft_model.save_pretrained(staging)
        (staging / "README.md").unlink(missing_ok=True)
        config_file = staging / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config["target_modules"] = sorted(config["target_modules"])
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


# --- the rollout, decoding and rendering ---------------------------------------------------


def rollout(transformer: nn.Module, scheduler, noise: Tensor,  # [B, C, T, h, w] float32
            context: Tensor,  # [2B, L, D] = [cond; uncond] or [B, L, D]
            *, guidance_scale: float, grad_steps: set[int]) -> Tensor:  # [B, C, T, h, w]
    """The sampler loop with gradients only at ``grad_steps`` (the official recipe): the
    transformer input is detached at every step; other steps run under ``no_grad``; the
    solver's updates keep the graph of earlier velocities. Timesteps must already be set."""
    latents, batch = noise, noise.shape[0]
    for i, t in enumerate(scheduler.timesteps):
        with torch.set_grad_enabled(i in grad_steps):
            velocity = predict_velocity(transformer, latents.detach(), t, context)
            velocity = apply_guidance(velocity, batch, guidance_scale)
        latents = scheduler.step(velocity.float(), t, latents.float(), return_dict=False)[0]
    return latents


def decode_with_grad(vae: nn.Module, vae_latents: Tensor,  # [B, z, T_lat, h, w] -> [B, 3, T, H, W]
                     *, checkpoint: bool = False) -> Tensor:
    """VAE frames in [-1, 1], differentiable (the inference ``decode`` runs under no_grad).
    ``checkpoint``: keep no activations, re-run the decode in the backward pass (diffusers'
    Wan VAE has no per-block checkpointing; the official run used its own VAE copy that has)."""
    def run(z: Tensor) -> Tensor:
        return vae.decode(z.to(vae.dtype), return_dict=False)[0]

    if checkpoint and torch.is_grad_enabled():
        frames = torch.utils.checkpoint.checkpoint(run, vae_latents, use_reentrant=False)
    else:
        frames = run(vae_latents)
    return frames.float().clamp(-1.0, 1.0)


def render_views(output: DecoderOutput, view_indices: Tensor,  # [V]
                 size: tuple[int, int], background: Sequence[float] | None = None,
                 config: RasterConfig = RasterConfig()) -> tuple[Tensor, Tensor]:  # [B, V, 3, h, w], [B, V, 1, h, w]
    """Colour and alpha of each batch entry's Gaussians seen from its predicted cameras
    ``view_indices`` (reference rasterizer, float32, differentiable)."""
    height, width = size
    g = output.gaussians
    pixel_scale = torch.tensor([width, height, 1.0], device=output.intrinsics.device)[:, None]
    colours, alphas = [], []
    for b, n in enumerate(output.num_gaussians):
        xyzw = g.rotations[b, :n].float()
        gaussians = (g.means[b, :n].float(), torch.cat([xyzw[:, 3:], xyzw[:, :3]], dim=-1),  # → w first
                     g.scales[b, :n].float(), g.opacities[b, :n].float(),
                     g.harmonics[b, :n].float().transpose(-1, -2))  # [n, K, 3]
        bg = None if background is None else torch.tensor(background, dtype=torch.float32, device=g.means.device)
        views = [rasterize_gaussians(*gaussians, torch.linalg.inv(output.extrinsics[b, v].float()),
                                     output.intrinsics[b, v].float() * pixel_scale, width, height, bg, config)
                 for v in view_indices.tolist()]
        colours.append(torch.stack([r.color.permute(2, 0, 1) for r in views]))
        alphas.append(torch.stack([r.alpha.permute(2, 0, 1) for r in views]))
    return torch.stack(colours), torch.stack(alphas)


def flow_matching_loss(transformer: nn.Module, latents: Tensor,  # [B, C, T, h, w] diffusion space
                       prompt_embeds: Tensor,  # [B, L, D]
                       generator: torch.Generator) -> Tensor:  # []
    """The official regulariser: σ ~ U(0, 1) per sample, ``x_σ = (1 − σ) x₀ + σ ε``, MSE of the
    prediction at timestep ``1000 σ`` against the velocity ``ε − x₀``."""
    x0 = latents.float()
    sigma = torch.rand(x0.shape[0], generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    noisy, target = flow_matching_pair(x0, noise, sigma)
    pred = transformer(hidden_states=noisy.to(transformer.dtype), timestep=timesteps_from_sigmas(sigma),
                       encoder_hidden_states=prompt_embeds.to(transformer.dtype), return_dict=False)[0]
    return F.mse_loss(pred.float(), target)


# --- the trainer ---------------------------------------------------------------------------


@dataclass
class RolloutDraw:
    """The random choices of one rollout (drawn from the trainer's generator)."""

    num_steps: int
    grad_steps: set[int]
    guidance_scale: float
    noise: Tensor  # [B, C, T, h, w]
    view_indices: Tensor  # [V]


class RewardTrainer:
    """LoRA reward fine-tuning of ``generator``'s transformer through the frozen VAE and
    ``decoder``. ``step`` returns reward values, loss terms and the gradient norm."""

    def __init__(self, generator, decoder: StitchedDecoder, rewards: Sequence[Reward],
                 settings: RewardSettings | None = None) -> None:
        self.settings = settings = settings or RewardSettings()
        self.rewards = _check_rewards(rewards)
        self.generator, self.decoder = generator, decoder
        for frozen in (generator.vae, generator.text_encoder.text_encoder, decoder):
            frozen.eval().requires_grad_(False)
        self.transformer = generator.transformer
        self.peft_model = add_transformer_lora(self.transformer, settings, settings.seed)
        self.transformer.train()
        if settings.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.lora_parameters = {n: p for n, p in self.transformer.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(list(self.lora_parameters.values()), lr=settings.lr,
                                           betas=settings.betas, weight_decay=settings.weight_decay)
        self.ema = EmaLora(self.lora_parameters, settings.ema_decay, warmup=settings.ema_warmup)
        self.rng = torch.Generator().manual_seed(settings.seed)
        self.step_index = 0
        self.video_size = self._video_size()

    def _video_size(self) -> tuple[int, int, int]:
        res, s = self.decoder.config.resolutions, self.settings
        return (s.num_frames or res.num_frames, s.height or res.vae_resolution, s.width or res.vae_resolution)

    # --- one optimisation step ---------------------------------------------------------------

    def step(self, prompts: str | Sequence[str], regularizer_batch: RegularizerBatch | tuple | None = None, *,
             noise: Tensor | None = None) -> dict[str, float]:
        """One update. ``noise``: explicit initial latents [B, 16, T_lat, h, w] (else drawn).

        Returns ``reward/<name>`` (unweighted), ``loss/reward`` (−Σ w·r), ``loss/flow_matching``
        (unweighted; absent without a batch), ``loss/total``, ``grad_norm`` (before clipping),
        ``skipped`` (1.0 when a non-finite gradient norm skipped the update), and the rollout's
        ``num_steps``, ``guidance_scale``. Gradients stay in ``.grad`` until the next step.
        """
        self.optimizer.zero_grad(set_to_none=True)
        metrics: dict[str, float] = {}
        total = 0.0
        # 1. flow-matching regulariser on real data (backward first: its graph is freed early)
        if regularizer_batch is not None and self.settings.regularizer_weight > 0:
            fm = self.regularizer_loss(regularizer_batch)
            (self.settings.regularizer_weight * fm).backward()
            metrics["loss/flow_matching"] = float(fm.detach())
            total += self.settings.regularizer_weight * metrics["loss/flow_matching"]
        # 2. rollout → VAE → stitched decoder → renders → rewards
        draw = self.draw(len(_prompt_list(prompts)), noise)
        values = self.rewards_of(self.context(prompts, draw, with_grad=True))
        reward_loss = -sum(r.weight * values[r.name] for r in self.rewards)
        reward_loss.backward()
        metrics.update({f"reward/{name}": float(v.detach()) for name, v in values.items()})
        metrics["loss/reward"] = float(reward_loss.detach())
        metrics["loss/total"] = total + metrics["loss/reward"]
        # 3. clip, update (skipped on a non-finite norm, as the official loop does), EMA
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.lora_parameters.values()), self.settings.grad_clip)
        skipped = not torch.isfinite(grad_norm)
        if not skipped:
            self.optimizer.step()
            self.ema.update(self.step_index)
        self.step_index += 1
        metrics.update(grad_norm=float(grad_norm), skipped=float(skipped), num_steps=float(draw.num_steps),
                       guidance_scale=draw.guidance_scale)
        return metrics

    @torch.no_grad()
    def score(self, prompts: str | Sequence[str], *, noise: Tensor | None = None,
              ema: bool = False) -> dict[str, float]:
        """The rewards of one rollout without training (``ema``: with the EMA weights)."""
        draw = self.draw(len(_prompt_list(prompts)), noise)
        with self.ema.applied() if ema else contextlib.nullcontext():
            values = self.rewards_of(self.context(prompts, draw, with_grad=False))
        return {f"reward/{name}": float(v) for name, v in values.items()}

    def regularizer_loss(self, batch: RegularizerBatch | tuple) -> Tensor:
        if isinstance(batch, tuple):
            batch = RegularizerBatch(*batch)
        embeds = self.generator.encode_prompt(list(batch.captions))
        return flow_matching_loss(self.transformer, batch.latents.to(self.generator.device), embeds, self.rng)

    # --- the pieces of a rollout ---------------------------------------------------------------

    def draw(self, batch: int, noise: Tensor | None = None) -> RolloutDraw:
        """Steps, gradient steps, guidance, noise and views for one rollout."""
        s = self.settings
        num_steps = self._uniform_int(s.num_steps)
        chosen = torch.randperm(num_steps, generator=self.rng)[:s.num_grad_steps].tolist()
        guidance = s.guidance_scale
        if isinstance(guidance, tuple):
            guidance = guidance[0] + (guidance[1] - guidance[0]) * float(torch.rand((), generator=self.rng))
        num_frames, height, width = self.video_size
        shape = self.generator.latent_shape(batch, num_frames, height, width)
        if noise is None:
            noise = torch.randn(shape, generator=self.rng)
        elif tuple(noise.shape) != tuple(shape):
            raise Vist3AInputError(f"noise must have shape {list(shape)}, got {list(noise.shape)}")
        order = torch.randperm(num_frames, generator=self.rng)
        views = order[: s.num_views] if s.num_views is not None else order
        return RolloutDraw(num_steps, {*chosen, num_steps - 1}, float(guidance),
                           noise.to(self.generator.device, torch.float32), views)

    def _uniform_int(self, value: IntRange) -> int:
        if isinstance(value, int):
            return value
        return int(torch.randint(value[0], value[1] + 1, (), generator=self.rng))

    def context(self, prompts: str | Sequence[str], draw: RolloutDraw, *, with_grad: bool) -> RewardContext:
        """Roll out, decode, reconstruct and render: everything the rewards read."""
        s, gen = self.settings, self.generator
        prompts = _prompt_list(prompts)
        # 1. text: template-wrapped prompts, and the negative prompt (cached by the encoder)
        texts = [s.prompt_template(p) if s.prompt_template else p for p in prompts]
        negative = gen.encode_prompt([s.negative_prompt], allow_empty=True)
        embeds = guidance_context(gen.encode_prompt(texts), negative, draw.guidance_scale).to(gen.device)
        # 2. sampler rollout, gradients at the drawn steps
        scheduler = make_scheduler(s.sampler, s.flow_shift, gen.components.scheduler_config)
        scheduler.set_timesteps(draw.num_steps, device=gen.device)
        scheduler.set_begin_index(0)
        latents = rollout(self.transformer, scheduler, draw.noise, embeds, guidance_scale=draw.guidance_scale,
                          grad_steps=draw.grad_steps if with_grad else set())
        # 3. de-normalise, decode with the VAE (differentiable), resize as the official training does
        vae_latents = gen.denormalize(latents)
        frames = decode_with_grad(gen.vae, vae_latents, checkpoint=s.gradient_checkpointing)
        size = self.decoder.frame_size(tuple(vae_latents.shape[-2:]))
        frames = F.interpolate(frames, size=(frames.shape[2], *size), mode="trilinear", align_corners=True)
        # 4. stitched decoder → Gaussians and cameras
        decoded = self.decoder(vae_latents, frames)
        # 5. render the drawn views; the decoded frames of the same views at the render size
        render_size = _pair(s.render_size)
        views, alpha = render_views(decoded, draw.view_indices, render_size,
                                    self.decoder.config.decoder_cfg.get("background_color"))
        picked = frames[:, :, draw.view_indices.to(frames.device)].transpose(1, 2)  # [B, V, 3, H, W]
        view_frames = F.interpolate(picked.flatten(0, 1), size=render_size, mode="bilinear", antialias=True,
                                    align_corners=False).unflatten(0, picked.shape[:2])
        return RewardContext(prompts=prompts, texts=texts, latents=latents, vae_latents=vae_latents, frames=frames,
                             decoded=decoded, view_indices=draw.view_indices, views=views,
                             view_frames=((view_frames + 1) / 2).clamp(0, 1), view_alpha=alpha,
                             step=self.step_index)

    def rewards_of(self, context: RewardContext) -> dict[str, Tensor]:
        values = {}
        for reward in self.rewards:
            value = reward(context)
            if not torch.isfinite(value):
                raise FloatingPointError(f"reward {reward.name!r} is not finite ({float(value)})")
            values[reward.name] = value
        return values

    # --- saving ----------------------------------------------------------------------------

    def save_adapter(self, folder: str | Path, *, ema: bool = True) -> Path:
        """The (EMA) LoRA as a PEFT adapter folder, loadable by ``WanGenerator.from_folder(wan, folder)``
        and ``Vist3A.load(model, lora=folder)``; the raw weights are back in place afterwards."""
        with self.ema.applied() if ema else contextlib.nullcontext():
            return save_peft_adapter(self.peft_model, folder)


def _prompt_list(prompts: str | Sequence[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise Vist3AInputError("prompts must be a non-empty list of non-empty strings")
    return prompts


def _check_rewards(rewards: Sequence[Reward]) -> list[Reward]:
    rewards = list(rewards)
    if not rewards:
        raise Vist3AInputError("reward training needs at least one reward")
    for reward in rewards:
        if not isinstance(reward, Reward):
            raise Vist3AInputError(f"rewards must be Reward(name, weight, fn) objects, got {type(reward).__name__}")
    names = [r.name for r in rewards]
    if len(set(names)) != len(names):
        raise Vist3AInputError(f"reward names must be unique, got {names}")
    return rewards
