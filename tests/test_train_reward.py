"""``reward`` fine-tuning on a tiny random model (5 frames, 32 px video, 24 px renders, 3 sampling
steps): gradients reach the LoRA only, a few steps raise the consistency reward, the regulariser,
EMA and the saved PEFT adapter, the attribute classifier, and custom rewards."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import vist3a_rt as vr  # noqa: E402
from vist3a_rt.errors import Vist3AInputError  # noqa: E402
from vist3a_rt.generator import WanGenerator, make_scheduler  # noqa: E402
from vist3a_rt.testing import write_tiny_model  # noqa: E402
from vist3a_rt.training import rewards as R  # noqa: E402
from vist3a_rt.training.reward import (TRANSFORMER_LORA_TARGETS, EmaLora, RegularizerBatch,  # noqa: E402
                                       RewardSettings, RewardTrainer, rollout)

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = "a red cube"
FRAMES, RES = 5, 32
COLOURS, SHAPES = ("red", "green", "blue"), ("cube", "sphere")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("reward") / "model", num_frames=FRAMES, resolution=RES,
                            feedforward_resolution=14 * RES // 16)


def settings(**changes) -> RewardSettings:
    base = dict(num_steps=3, num_grad_steps=1, guidance_scale=5.0, render_size=24, lr=5e-3, seed=0)
    return RewardSettings(**{**base, **changes})


def make_trainer(model_dir, rewards=None, **changes) -> RewardTrainer:
    model = vr.Vist3A.load(model_dir, use_lora=False, wan_impl="diffusers")  # gradients through the VAE
    return RewardTrainer(model.generator, model.decoder, rewards or [R.consistency()], settings(**changes))


def fixed_noise(trainer: RewardTrainer, seed: int = 1) -> torch.Tensor:
    shape = trainer.generator.latent_shape(1, FRAMES, RES, RES)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def regularizer(trainer: RewardTrainer) -> RegularizerBatch:
    shape = trainer.generator.latent_shape(2, FRAMES, RES, RES)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    return RegularizerBatch(latents, ["a red cube", "a blue sphere"])


# --- gradients ------------------------------------------------------------------------------


def test_gradients_reach_the_lora_and_nothing_else(model_dir):
    trainer = make_trainer(model_dir)
    metrics = trainer.step(PROMPT, regularizer(trainer), noise=fixed_noise(trainer))
    assert math.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0 and metrics["skipped"] == 0

    lora = trainer.lora_parameters
    assert len(lora) == 2 * len(TRANSFORMER_LORA_TARGETS) * 2  # A and B, every target, 2 blocks
    assert all(".lora_A." in name or ".lora_B." in name for name in lora)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora.values())
    assert all(p.grad.abs().sum() > 0 for name, p in lora.items() if ".lora_B." in name)
    frozen = [(name, p) for name, p in trainer.transformer.named_parameters() if name not in lora]
    frozen += list(trainer.generator.vae.named_parameters()) + list(trainer.decoder.named_parameters())
    frozen += list(trainer.generator.text_encoder.text_encoder.named_parameters())
    assert frozen and all(p.grad is None and not p.requires_grad for _, p in frozen)


class _RecordingTransformer(nn.Module):
    """Stands in for the Wan transformer: records grad mode and input per call."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.calls: list[tuple[bool, bool]] = []

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        self.calls.append((torch.is_grad_enabled(), hidden_states.requires_grad))
        return (self.scale * hidden_states,)


def test_rollout_has_gradients_only_at_the_chosen_steps():
    transformer, scheduler = _RecordingTransformer(), make_scheduler("unipc", 3.0)
    scheduler.set_timesteps(5)
    noise, context = torch.randn(1, 4, 1, 2, 2), torch.zeros(2, 3, 8)
    latents = rollout(transformer, scheduler, noise, context, guidance_scale=4.0, grad_steps={1, 4})
    assert [grad for grad, _ in transformer.calls] == [False, True, False, False, True]
    assert not any(input_requires_grad for _, input_requires_grad in transformer.calls)  # inputs detached
    assert latents.requires_grad
    (grad,) = torch.autograd.grad(latents.sum(), transformer.scale)
    assert torch.isfinite(grad) and grad != 0


def test_draw_picks_k_steps_plus_the_last(model_dir):
    trainer = make_trainer(model_dir, num_steps=(6, 9), num_grad_steps=2, guidance_scale=(4.0, 6.0), num_views=2)
    for _ in range(5):
        draw = trainer.draw(1)
        assert 6 <= draw.num_steps <= 9 and 4.0 <= draw.guidance_scale <= 6.0
        assert draw.num_steps - 1 in draw.grad_steps and 2 <= len(draw.grad_steps) <= 3
        assert len(draw.view_indices) == 2 and draw.view_indices.max() < FRAMES


# --- training moves the reward --------------------------------------------------------------


def test_a_few_steps_raise_the_consistency_reward(model_dir):
    trainer = make_trainer(model_dir)
    noise = fixed_noise(trainer)
    before = trainer.score(PROMPT, noise=noise)["reward/consistency"]
    losses = [trainer.step(PROMPT, noise=noise)["loss/total"] for _ in range(5)]
    after = trainer.score(PROMPT, noise=noise)["reward/consistency"]
    assert after > before + 0.2, (before, after)  # measured: 17.66 -> 18.09 dB
    assert losses[-1] < losses[0], losses


def test_regularizer_term_is_finite_and_positive(model_dir):
    trainer = make_trainer(model_dir, regularizer_weight=0.5)
    batch = regularizer(trainer)
    metrics = trainer.step(PROMPT, (batch.latents, batch.captions), noise=fixed_noise(trainer))
    fm = metrics["loss/flow_matching"]
    assert math.isfinite(fm) and fm > 0
    assert metrics["loss/total"] == pytest.approx(metrics["loss/reward"] + 0.5 * fm)
    with pytest.raises(Vist3AInputError, match="captions"):
        RegularizerBatch(batch.latents, ["only one"])


# --- EMA and the saved adapter --------------------------------------------------------------


def test_ema_lags_the_weights_and_equals_them_with_decay_zero(model_dir):
    lagging, tracking = make_trainer(model_dir), make_trainer(model_dir, ema_decay=0.0)
    for trainer in (lagging, tracking):
        for _ in range(2):
            trainer.step(PROMPT, noise=fixed_noise(trainer))
    raw = {n: p.detach().float() for n, p in lagging.lora_parameters.items()}
    assert any(not torch.equal(lagging.ema.shadow[n], raw[n]) for n in raw)
    assert all(torch.equal(tracking.ema.shadow[n], p.detach().float()) for n, p in tracking.lora_parameters.items())
    with lagging.ema.applied():
        assert all(torch.equal(p.detach(), lagging.ema.shadow[n]) for n, p in lagging.lora_parameters.items())
    assert all(torch.equal(p.detach(), raw[n]) for n, p in lagging.lora_parameters.items())  # swapped back


def test_ema_update_rule():
    layer = nn.Linear(2, 2)
    ema = EmaLora(layer, decay=0.99)
    start = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.update(0)  # warm-up decay min(1/10, 0.99) = 0.1
    torch.testing.assert_close(ema.shadow["weight"], 0.1 * start + 0.9 * (start + 1.0))
    assert EmaLora(layer, decay=0.99, warmup=False).decay_at(0) == 0.99
    with pytest.raises(Vist3AInputError):
        EmaLora(layer, decay=1.5)


def test_saved_ema_adapter_is_a_released_style_peft_folder(model_dir, tmp_path):
    trainer = make_trainer(model_dir)
    for _ in range(2):
        trainer.step(PROMPT, noise=fixed_noise(trainer))
    folder = trainer.save_adapter(tmp_path / "vist3a_tiny_lora_ema")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    released = json.loads((model_dir / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (config["r"], config["lora_alpha"]) == (8, 16)
    assert sorted(config["target_modules"]) == sorted(released["target_modules"])
    from safetensors.torch import load_file

    saved, released_tensors = load_file(folder / "adapter_model.safetensors"), load_file(
        model_dir / "lora" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in released_tensors.items()}
    for name, value in trainer.ema.shadow.items():  # the EMA weights, not the raw ones
        key = "base_model.model." + name.replace(".default.", ".")
        torch.testing.assert_close(saved[key], value)

    # loads back merged, and changes the transformer output
    inputs = dict(hidden_states=torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(3)),
                  timestep=torch.tensor([700.0]), encoder_hidden_states=trainer.generator.encode_prompt(PROMPT),
                  return_dict=False)
    with torch.no_grad():
        plain = WanGenerator.from_folder(model_dir / "wan").transformer(**inputs)[0]
        merged = WanGenerator.from_folder(model_dir / "wan", lora_dir=folder).transformer(**inputs)[0]
        with trainer.ema.applied():
            unmerged = trainer.transformer(**inputs)[0]
    assert (merged - plain).abs().max() > 1e-4
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    first = "blocks.0.attn1.to_q.weight"
    through_vist3a = vr.Vist3A.load(model_dir, lora=folder, wan_impl="diffusers").generator.transformer.state_dict()[first]
    through_generator = WanGenerator.from_folder(model_dir / "wan", lora_dir=folder).transformer.state_dict()[first]
    torch.testing.assert_close(through_vist3a, through_generator)


# --- rewards ----------------------------------------------------------------------------------


def test_attribute_classifier_shapes_and_round_trip(tmp_path):
    torch.manual_seed(0)
    classifier = R.AttributeClassifier(COLOURS, SHAPES, width=8)
    for size in (16, 24, 37):
        logits = classifier(torch.rand(3, 3, size, size))
        assert logits.colour.shape == (3, len(COLOURS)) and logits.shape.shape == (3, len(SHAPES))
    images = torch.rand(4, 3, 24, 24, requires_grad=True)
    value = R.faithfulness_reward(classifier, images, R.TargetAttributes(("red",), ("cube",)))
    assert value.dim() == 0 and value < 0
    (grad,) = torch.autograd.grad(value, images)
    assert grad.abs().sum() > 0
    softmax = R.AttributeClassifier(COLOURS, SHAPES, width=8, multi_label=False)
    assert R.faithfulness_reward(softmax, images, R.TargetAttributes(("red", "blue"), ())) < 0

    loaded = R.AttributeClassifier.load(classifier.save(tmp_path / "classifier"))
    assert loaded.config == classifier.config
    torch.testing.assert_close(loaded(images.detach()).colour, classifier.eval()(images.detach()).colour)

    with pytest.raises(Vist3AInputError, match="unknown colour"):
        R.faithfulness_reward(classifier, images, R.TargetAttributes(("purple",), ()))
    with pytest.raises(Vist3AInputError, match="H, W >= 16"):
        classifier(torch.rand(1, 3, 8, 8))
    parse = R.KeywordParser.for_classifier(classifier, synonyms={"ball": "sphere"})
    assert parse("A Red cube left of a blue ball") == R.TargetAttributes(("red", "blue"), ("cube", "sphere"))


def test_consistency_reward_metrics():
    views = torch.full((2, 3, 3, 8, 8), 0.5)
    assert R.consistency_reward(views, views + 0.1) == pytest.approx(20.0, abs=1e-4)  # MSE 0.01
    assert R.consistency_reward(views, views + 0.1, "neg_mse") == pytest.approx(-0.01, abs=1e-6)
    with pytest.raises(Vist3AInputError):
        R.consistency_reward(views, views[:1])


def test_custom_rewards_plug_in(model_dir):
    classifier = R.AttributeClassifier(COLOURS, SHAPES, width=8)
    seen = {}

    def brightness(context: R.RewardContext) -> torch.Tensor:
        seen.update(prompts=context.prompts, texts=context.texts, views=context.views.shape,
                    frames=context.frames.shape, means=context.decoded.means.shape)
        return context.views.mean()

    rewards = [R.consistency(0.1, "neg_mse"), R.Reward("brightness", 0.5, brightness),
               R.faithfulness(classifier, R.KeywordParser.for_classifier(classifier), 2.0)]
    trainer = make_trainer(model_dir, rewards, num_views=2)
    metrics = trainer.step(PROMPT, noise=fixed_noise(trainer))
    expected = -(0.1 * metrics["reward/consistency"] + 0.5 * metrics["reward/brightness"]
                 + 2.0 * metrics["reward/faithfulness"])
    assert metrics["loss/reward"] == pytest.approx(expected, rel=1e-5)
    assert seen["prompts"] == [PROMPT] and PROMPT in seen["texts"][0]  # wrapped in the orbit sentence
    assert seen["views"] == (1, 2, 3, 24, 24) and seen["frames"][:3] == (1, 3, FRAMES)
    assert all(p.grad is None for p in classifier.parameters())  # the classifier stays frozen

    with pytest.raises(Vist3AInputError, match="unique"):
        make_trainer(model_dir, [R.consistency(), R.consistency()])
    with pytest.raises(Vist3AInputError, match="scalar"):
        bad = make_trainer(model_dir, [R.Reward("per_view", 1.0, lambda c: c.views.mean(dim=(2, 3, 4)))], num_views=2)
        bad.step(PROMPT, noise=fixed_noise(bad))
    with pytest.raises(Vist3AInputError):
        R.Reward("has space", 1.0, brightness)
