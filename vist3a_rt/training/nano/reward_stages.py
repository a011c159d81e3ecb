"""The last training stages of the nano recipe: ``classifier`` → ``reward``.

``classifier``  trains the reward's attribute classifier (``training.rewards.AttributeClassifier``:
                which colours and shapes an image shows) on frames of world clips at random
                scales between the render size of the reward and the video size, multi-hot
                targets from the scene graphs; held-out accuracy is logged. (The evaluation's
                faithfulness check is a different, classifier-free method.)
``reward``      LoRA reward fine-tuning of the denoiser through the VAE, the stitched decoder
                and the differentiable rasterizer (``training.reward``), rewards: 3D
                consistency (rendered vs decoded views, PSNR) and faithfulness (classifier);
                the flow-matching regulariser on the recipe's latents; EMA adapter saved as a
                PEFT folder. Rewards before and after (EMA) on fixed held-out prompts and noise
                are recorded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...decoder.loading import load_stitched_decoder
from ...generator.text import wrap_prompt
from ..reward import RegularizerBatch, RewardSettings, RewardTrainer, normalize_latents
from ..rewards import AttributeClassifier, KeywordParser, consistency, faithfulness
from ..world import COLOURS, SHAPES
from ..world.captions import SHAPE_WORDS
from .data import stream_indices
from .decoder_stages import ANYSPLAT_FOLDER, STITCHED_FILE, stitched_config
from .video_stages import WAN_FOLDER, CaptionSampler, load_latents
from .workspace import TrainLoop

CLASSIFIER_FOLDER, ADAPTER_FOLDER = "classifier", "lora"
SYNONYMS = {word: shape for shape, words in SHAPE_WORDS.items() for word in words if word != shape}
REWARD_RENDER_SIZE = 48  # the classifier's smallest training size


def attribute_targets(scenes: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    colours = torch.zeros(len(scenes), len(COLOURS))
    shapes = torch.zeros(len(scenes), len(SHAPES))
    for i, scene in enumerate(scenes):
        for obj in scene["objects"]:
            colours[i, list(COLOURS).index(obj["colour"])] = 1
            shapes[i, list(SHAPES).index(obj["shape"])] = 1
    return colours, shapes


def render_size(clips, wanted: int = REWARD_RENDER_SIZE) -> int:
    """A render size of at most ``wanted``, and at most the video size."""
    return min(wanted, clips.video.height)


def classifier_batch(clips, indices: list[int], generator: torch.Generator, frames_per_clip: int = 6):
    """Random frames of the clips at a random size between the reward's render size and the video size."""
    batch = clips.video_batch(indices)
    video = batch["video"]  # [B, 3, T, H, W]
    T = video.shape[2]
    frames_per_clip = min(frames_per_clip, T)
    picks = torch.stack([torch.randperm(T, generator=generator)[:frames_per_clip] for _ in indices])
    images = torch.stack([video[b, :, picks[b]] for b in range(len(indices))]).transpose(1, 2).flatten(0, 1)
    size = int(torch.randint(render_size(clips), video.shape[-1] + 1, (), generator=generator))
    images = F.interpolate((images + 1) / 2, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    colours, shapes = attribute_targets(batch["scene"])
    return images.clamp(0, 1), colours.repeat_interleave(frames_per_clip, 0), shapes.repeat_interleave(frames_per_clip, 0)


def train_classifier(run) -> dict:
    s, ws = run.settings, run.workspace
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed + 6)
        classifier = AttributeClassifier(list(COLOURS), list(SHAPES), width=16, multi_label=True)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=2e-3, weight_decay=1e-4)
    state = ws.load_state("classifier")
    steps = 0
    if state is not None:
        classifier.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        steps = state["steps"]
    clips = run.clips("train")
    counter = {"steps": steps}
    loop = TrainLoop(ws, "classifier", s.classifier_budget, steps, lambda: ws.save_state(
        "classifier", {"model": classifier.state_dict(), "optimizer": optimizer.state_dict(),
                       "steps": counter["steps"]}), log_every=25)
    classifier.train()
    for step in loop:
        images, colours, shapes = classifier_batch(clips, stream_indices("classifier", step, 4),
                                                   torch.Generator().manual_seed(s.seed * 31 + step))
        logits = classifier(images)
        loss = (F.binary_cross_entropy_with_logits(logits.colour, colours)
                + F.binary_cross_entropy_with_logits(logits.shape, shapes))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loop.record({"loss": loss.item()})
        counter["steps"] = step + 1
    classifier.eval().save(ws.stage_dir("classifier") / CLASSIFIER_FOLDER)
    return {"steps": counter["steps"], **classifier_accuracy(run, classifier), "seconds": loop.seconds}


@torch.no_grad()
def classifier_accuracy(run, classifier, clips_count: int = 32) -> dict:
    """Per-frame exact-set accuracy (threshold 0.5) of colours and shapes on held-out clips."""
    heldout = run.clips("heldout")
    images, colours, shapes = classifier_batch(heldout, list(range(clips_count)), torch.Generator().manual_seed(0))
    logits = classifier.eval()(images)
    colour_ok = ((logits.colour > 0) == (colours > 0.5)).all(1).float().mean()
    shape_ok = ((logits.shape > 0) == (shapes > 0.5)).all(1).float().mean()
    return {"heldout_colour_set_accuracy": float(colour_ok), "heldout_shape_set_accuracy": float(shape_ok)}


def reward_settings(run) -> RewardSettings:
    s = run.settings
    # views and size bound memory: the reference rasterizer's autograd graph grows with
    # pixels x overlapping Gaussians (4 views at 48 px of a trained 91k-Gaussian scene: > 23 GB)
    return RewardSettings(lr=s.reward_lr, num_steps=(8, 20), flow_shift=run.nano.flow_shift,
                          render_size=render_size(run.clips("train"), s.reward_render_size),
                          num_views=s.reward_views, gradient_checkpointing=True, seed=s.seed)


def build_reward_trainer(run) -> RewardTrainer:
    from ...generator.wan import WanGenerator

    ws = run.workspace
    generator = WanGenerator.from_folder(ws.root / "denoiser" / WAN_FOLDER)
    decoder = load_stitched_decoder(stitched_config(run), ws.root / "recon" / ANYSPLAT_FOLDER,
                                    ws.root / "stitch" / STITCHED_FILE)
    classifier = AttributeClassifier.load(ws.root / "classifier" / CLASSIFIER_FOLDER)
    parser = KeywordParser.for_classifier(classifier, SYNONYMS)
    rewards = [consistency(weight=0.1), faithfulness(classifier, parser, weight=1.0)]
    return RewardTrainer(generator, decoder, rewards, reward_settings(run))


def _reward_state(trainer: RewardTrainer) -> dict:
    return {"lora": {n: p.detach().clone() for n, p in trainer.lora_parameters.items()},
            "optimizer": trainer.optimizer.state_dict(), "ema": trainer.ema.state_dict(),
            "step": trainer.step_index, "rng": trainer.rng.get_state()}


def probe_scores(run, trainer: RewardTrainer, *, ema: bool, count: int = 6) -> dict:
    """Mean rewards on the first ``count`` held-out captions with fixed noise and rollout draws."""
    heldout = run.clips("heldout")
    rng_state = trainer.rng.get_state()
    trainer.rng.manual_seed(12345)
    totals: dict[str, float] = {}
    for index in range(count):
        caption = heldout.video.sample(index)["caption"]
        for key, value in trainer.score(caption, ema=ema).items():
            totals[key] = totals.get(key, 0.0) + value / count
    trainer.rng.set_state(rng_state)
    return totals


def train_reward(run) -> dict:
    s, ws = run.settings, run.workspace
    trainer = build_reward_trainer(run)
    state = ws.load_state("reward")
    if state is None:
        before = probe_scores(run, trainer, ema=False)
        ws.save_state("reward", {**_reward_state(trainer), "before": before})
        state = ws.load_state("reward")
    before = state["before"]
    with torch.no_grad():
        for name, p in trainer.lora_parameters.items():
            p.copy_(state["lora"][name])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.ema.load_state_dict(state["ema"])
    trainer.step_index = state["step"]
    trainer.rng.set_state(state["rng"])
    data = load_latents(run)
    diffusion = normalize_latents(data["latents"], trainer.generator.vae.config)
    captions = CaptionSampler(data["scenes"], redraw=0.5, seed=s.seed + trainer.step_index)
    prompts = run.clips("train")
    pick = torch.Generator().manual_seed(s.seed + 13 * trainer.step_index)
    loop = TrainLoop(ws, "reward", s.reward_budget, trainer.step_index,
                     lambda: ws.save_state("reward", {**_reward_state(trainer), "before": before}), log_every=5)
    for step in loop:
        prompt = [prompts.video.sample(i)["caption"] for i in stream_indices("reward", step, s.reward_batch)]
        rows = torch.randint(0, diffusion.shape[0], (4,), generator=pick)
        regulariser = RegularizerBatch(diffusion[rows], [wrap_prompt(captions(i)) for i in rows.tolist()])
        loop.record(trainer.step(prompt, regulariser))
    after = probe_scores(run, trainer, ema=True)
    trainer.save_adapter(ws.stage_dir("reward") / ADAPTER_FOLDER, ema=True)
    return {"steps": trainer.step_index, "probe_before": before, "probe_after": after, "seconds": loop.seconds}


__all__ = ["attribute_targets", "build_reward_trainer", "train_classifier", "train_reward"]
