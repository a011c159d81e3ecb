"""The video half of the nano recipe: ``vae`` → ``latents`` → ``denoiser``.

``vae``       trains the Wan VAE on random windows and crops of world clips (a short window
              trains both the causal first-frame path and the 4-frame groups, and a crop the
              same convolutions, at a fraction of a full clip's cost: more updates per hour), then measures the latent statistics on full 13-frame clips and its
              held-out reconstruction PSNR.
``latents``   encodes a fixed set of training clips once (posterior means, raw VAE space):
              the denoiser's data set, the reward stage's regulariser data.
``denoiser``  trains the UMT5 text encoder and the Wan transformer jointly by flow matching on
              those latents, captions re-drawn from each clip's scene graph half of the time
              (varied phrasing of the same scene), EMA of the weights; writes the Wan folder.
"""

from __future__ import annotations

import numpy as np
import torch

from ..denoiser import DenoiserTrainer
from ..nano_models import build_text_encoder, build_tokenizer, build_transformer, build_vae, save_wan_folder, \
    scheduler_config
from ..reward import normalize_latents
from ..vae import VaeTrainer, fit_latent_statistics
from ..world import VOCABULARY, make_caption
from ..world.scene_graph import SceneGraph
from .data import random_crops, random_windows, stream_indices
from .workspace import Budget, TrainLoop

VAE_MODEL, LATENTS_FILE, WAN_FOLDER = "model", "latents.pt", "wan"


def train_vae(run) -> dict:
    s, config, ws = run.settings, run.nano, run.workspace
    vae = build_vae(config, seed=s.seed)
    trainer = VaeTrainer(vae, lr=s.vae_lr, seed=s.seed)
    state = ws.load_state("vae")
    if state is not None:
        trainer.load_state_dict(state)
    clips = run.clips("train")
    loop = TrainLoop(ws, "vae", s.vae_budget, trainer.steps, lambda: ws.save_state("vae", trainer.state_dict()))
    for step in loop:
        videos = clips.video_batch(stream_indices("vae", step, s.vae_batch))["video"]
        draw = torch.Generator().manual_seed(s.seed * 7919 + step)
        loop.record(trainer.step(random_crops(random_windows(videos, s.vae_window, draw), s.vae_crop, draw)))
    # full 13-frame clips from here on: statistics on training clips, PSNR on held-out ones
    stats_batches = (clips.video_batch(stream_indices("latents", -1 - i, 4))["video"]  # before the latents set
                     for i in range(s.vae_stat_clips // 4))
    mean, std = fit_latent_statistics(vae, stats_batches)
    heldout = run.clips("heldout")
    evaluation = [trainer.evaluate(heldout.video_batch(range(i, i + 4))["video"])
                  for i in range(0, s.eval_clips_vae, 4)]
    vae.eval().save_pretrained(ws.stage_dir("vae") / VAE_MODEL, safe_serialization=True)
    return {"steps": trainer.steps, "heldout_psnr": float(np.mean([e["psnr"] for e in evaluation])),
            "heldout_l1": float(np.mean([e["l1"] for e in evaluation])), "latent_std_mean": float(np.mean(std)),
            "latent_mean_abs": float(np.mean(np.abs(mean))), "seconds": loop.seconds}


def load_trained_vae(run):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(run.workspace.root / "vae" / VAE_MODEL).eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(run) -> dict:
    """Posterior means of ``latent_clips`` training clips (raw VAE space) + their scene graphs."""
    s, ws = run.settings, run.workspace
    vae = load_trained_vae(run)
    clips = run.clips("train")
    state = ws.load_state("latents") or {"latents": [], "scenes": [], "indices": []}
    done = len(state["indices"])
    loop = TrainLoop(ws, "latents", Budget(s.latent_clips // 8), done // 8,
                     lambda: ws.save_state("latents", state), log_every=10)
    for step in loop:
        batch = clips.video_batch(stream_indices("latents", step, 8))
        state["latents"].append(vae.encode(batch["video"]).latent_dist.mean.to(torch.float32))
        state["scenes"].extend(batch["scene"])
        state["indices"].extend(batch["index"])
    latents = torch.cat(state["latents"])
    torch.save({"latents": latents, "scenes": state["scenes"], "indices": state["indices"]},
               ws.stage_dir("latents") / LATENTS_FILE)
    return {"clips": int(latents.shape[0]), "seconds": loop.seconds}


def load_latents(run) -> dict:
    return torch.load(run.workspace.root / "latents" / LATENTS_FILE, map_location="cpu", weights_only=False)


class CaptionSampler:
    """A clip's stored caption, or (with probability ``redraw``) a fresh phrasing of its scene."""

    def __init__(self, scenes: list[dict], redraw: float, seed: int) -> None:
        self.scenes, self.redraw = scenes, redraw
        self.rng = np.random.default_rng(seed)

    def __call__(self, index: int) -> str:
        scene = self.scenes[index]
        if self.rng.random() >= self.redraw:
            return scene["caption"]
        return make_caption(SceneGraph.from_dict(scene), self.rng)


def train_denoiser(run) -> dict:
    s, config, ws = run.settings, run.nano, run.workspace
    vae = load_trained_vae(run)
    data = load_latents(run)
    diffusion = normalize_latents(data["latents"], vae.config)
    tokenizer = build_tokenizer(VOCABULARY)
    text_encoder = build_text_encoder(config, len(tokenizer), seed=s.seed + 1)
    transformer = build_transformer(config, seed=s.seed + 2)
    trainer = DenoiserTrainer(transformer, text_encoder, tokenizer, lr=s.denoiser_lr, text_encoder_lr=s.denoiser_lr,
                              flow_shift=config.flow_shift, ema_decay=s.denoiser_ema, seed=s.seed)
    state = ws.load_state("denoiser")
    if state is not None:
        trainer.load_state_dict(state)
    captions = CaptionSampler(data["scenes"], redraw=0.5, seed=s.seed + trainer.steps)
    order = torch.Generator().manual_seed(s.seed + 17 * trainer.steps)
    loop = TrainLoop(ws, "denoiser", s.denoiser_budget, trainer.steps,
                     lambda: ws.save_state("denoiser", trainer.state_dict()), log_every=50)
    for _ in loop:
        pick = torch.randint(0, diffusion.shape[0], (s.denoiser_batch,), generator=order)
        loop.record(trainer.step(diffusion[pick], [captions(i) for i in pick.tolist()]))
    held = slice(0, 16)  # the first clips: a fixed validation number for the log (they are trained on)
    metrics = trainer.evaluate(diffusion[held], [sc["caption"] for sc in data["scenes"][held]])
    from ...generator.loading import WanComponents

    with trainer.ema_weights():
        components = WanComponents(tokenizer=tokenizer, text_encoder=text_encoder.eval(),
                                   transformer=transformer.eval(), vae=vae, scheduler_config=scheduler_config(config))
        save_wan_folder(components, ws.stage_dir("denoiser") / WAN_FOLDER, overwrite=True)
    return {"steps": trainer.steps, "train_fm_loss": metrics["loss"], "seconds": loop.seconds}


__all__ = ["encode_latents", "load_latents", "load_trained_vae", "train_denoiser", "train_vae"]
