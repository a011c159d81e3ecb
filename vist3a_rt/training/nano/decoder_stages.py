"""The 3D half of the nano recipe: ``recon`` → ``layer_search`` → ``stitch``.

``recon``         trains the AnySplat-architecture network from scratch on world clips at its
                  input size (``training.recon``), then measures novel-view PSNR (views half-way
                  between the input frames), depth and camera errors on held-out compositions;
                  writes an AnySplat folder (config.json + model.safetensors).
``layer_search``  captures VAE latents and every DINO block's activations on clips the network
                  never trained on and ranks the blocks by the ridge fit of the stitching conv
                  (``training.layer_search``; the consistent padding variant: our own fit is
                  also evaluated with the conv's padding).
``stitch``        cuts the network at the winning block, starts the stitching conv from its
                  fit and distils the network into the stitched decoder (LoRA, official loss
                  weights); writes an official ``anysplat_stitched.pth``.
"""

from __future__ import annotations

import dataclasses
import json

import torch

from ...decoder.loading import load_reconstruction_model
from ...decoder.network import ReconstructionModel
from ..adapters import AnySplatFeatureSource, WanLatentSource
from ..layer_search import capture_features, layer_search
from ..recon import ReconSettings, ReconTrainer, evaluate
from ..stitch import StitchSettings, StitchTrainer, build_student, distillation_losses
from .data import novel_views, stream_indices
from .video_stages import load_trained_vae
from .workspace import TrainLoop

ANYSPLAT_FOLDER, STITCHED_FILE = "anysplat", "anysplat_stitched.pth"


def anysplat_folder_config(cfg) -> dict:
    """The released AnySplat folder's config.json: encoder and decoder settings."""
    return {"encoder_cfg": dataclasses.asdict(cfg.encoder), "decoder_cfg": cfg.decoder_cfg}


def _recon_state(model, trainer: ReconTrainer) -> dict:
    return {"model": model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(), "global_step": trainer.global_step,
            "generator": trainer.generator.get_state()}


def train_recon(run) -> dict:
    s, ws = run.settings, run.workspace
    cfg = run.decoder_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed + 4)
        model = ReconstructionModel(cfg)
    settings = ReconSettings(lr=s.recon_lr, warmup_steps=s.recon_warmup, seed=s.seed,
                             weights={"rgb_self": s.recon_rgb_self, "camera": s.recon_camera_weight},
                             frames_per_step=None if s.recon_frames is None else tuple(s.recon_frames),
                             render_every=s.recon_render_every)
    trainer = ReconTrainer(model, settings)
    state = ws.load_state("recon")
    if state is not None:
        model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.global_step = state["global_step"]
        trainer.generator.set_state(state["generator"])
    clips = run.clips("train")
    loop = TrainLoop(ws, "recon", s.recon_budget, trainer.global_step,
                     lambda: ws.save_state("recon", _recon_state(model, trainer)), log_every=10)
    for step in loop:
        b = clips.network_batch(stream_indices("recon", step, s.recon_batch))
        loop.record(trainer.step(b["video"], b["depth"], b["camtoworld"], b["intrinsics"]))
    model.eval()
    folder = ws.stage_dir("recon") / ANYSPLAT_FOLDER
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(anysplat_folder_config(cfg), indent=2) + "\n")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    metrics = evaluate_recon(run, model, s.eval_clips_recon)
    return {"steps": trainer.global_step, **{f"heldout_{k}": v for k, v in metrics.items()}, "seconds": loop.seconds}


def evaluate_recon(run, model, count: int) -> dict:
    """Novel-view PSNR etc. of ``model`` on the first ``count`` held-out clips."""
    heldout = run.clips("heldout")
    clips, novel = [], []
    for index in range(count):
        sample = heldout.network.sample(index)
        clips.append((sample["video"], sample["depth"], sample["camtoworld"], sample["intrinsics"]))
        novel.append(novel_views(heldout.network, index))
    return evaluate(model, clips, novel)


def load_trained_recon(run, stitching_location: str | None = None) -> ReconstructionModel:
    folder = run.workspace.root / "recon" / ANYSPLAT_FOLDER
    cfg = run.decoder_config(stitching_location)
    return load_reconstruction_model(cfg, folder).requires_grad_(False)


@torch.no_grad()
def search_layer(run) -> dict:
    s, ws = run.settings, run.workspace
    vae, model = load_trained_vae(run), load_trained_recon(run)
    latents = WanLatentSource(vae, torch.Generator().manual_seed(s.seed))
    clips = run.clips("train")

    def batches():
        for step in range(s.layer_search_clips // 4):
            indices = stream_indices("layer_search", step, 4)
            yield clips.video_batch(indices)["video"], clips.network_batch(indices)["video"]

    features = capture_features(latents, AnySplatFeatureSource(model), batches())
    result = layer_search(features, model.config.stitching.stitching_layer_config, padding="consistent")
    result.extra["inputs"] = {"clips": features.num_videos, "source": "nano world, train split"}
    result.save(ws.stage_dir("layer_search"))
    print(result.table())
    return {"block": result.best.block, "mse": {f.block: f.mse for f in result.fits}}


def stitched_config(run):
    return run.decoder_config(run.workspace.done_record("layer_search")["block"])


def _stitch_state(student, trainer: StitchTrainer, steps: int) -> dict:
    return {"student": student.state_dict(), "optimizer": trainer.optimizer.state_dict(), "steps": steps}


def train_stitch(run) -> dict:
    from ..layer_search import INIT_FILE
    from safetensors.torch import load_file

    s, ws = run.settings, run.workspace
    block = ws.done_record("layer_search")["block"]
    teacher = load_trained_recon(run, block)
    init = load_file(str(ws.root / "layer_search" / INIT_FILE))
    student = build_student(teacher, init)
    trainer = StitchTrainer(teacher, student, StitchSettings(mode="lora", lr=s.stitch_lr))
    state = ws.load_state("stitch")
    steps = 0
    if state is not None:
        student.load_state_dict(state["student"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        steps = state["steps"]
    vae = load_trained_vae(run)
    sampler = torch.Generator().manual_seed(s.seed + 5)
    clips = run.clips("train")
    counter = {"steps": steps}
    loop = TrainLoop(ws, "stitch", s.stitch_budget, steps,
                     lambda: ws.save_state("stitch", _stitch_state(student, trainer, counter["steps"])),
                     log_every=10)
    for step in loop:
        indices = stream_indices("stitch", step, s.stitch_batch)
        with torch.no_grad():
            latent = vae.encode(clips.video_batch(indices)["video"]).latent_dist.sample(sampler)
        loop.record(trainer.step(latent, clips.network_batch(indices)["video"]))
        counter["steps"] = step + 1
    trainer.save(ws.stage_dir("stitch") / STITCHED_FILE)
    return {"steps": counter["steps"], "block": block, **heldout_distillation(run, vae, teacher, student),
            "seconds": loop.seconds}


@torch.no_grad()
def heldout_distillation(run, vae, teacher, student, count: int = 8) -> dict:
    """Distillation loss terms of the stitched student on held-out clips (posterior means)."""
    heldout = run.clips("heldout")
    student.eval()
    totals: dict[str, float] = {}
    for index in range(count):
        latent = vae.encode(heldout.video_batch([index])["video"]).latent_dist.mean
        frames = heldout.network_batch([index])["video"]
        for k, v in distillation_losses(student(latent, frames), teacher(frames)).items():
            totals[k] = totals.get(k, 0.0) + float(v) / count
    student.train()
    return {"heldout_distill_total": totals["total"], "heldout_distill_depth": totals["depth"]}


__all__ = ["load_trained_recon", "search_layer", "stitched_config", "train_recon", "train_stitch"]
