"""WanGenerator against the official end-to-end goldens (../shared/fixtures/e2e_tiny): tokens,
embeddings, timesteps, step-0 predictions, every solver step, de-normalisation, VAE frames and the
feed-forward resize. Tolerances are the fixture README's; the cond/uncond passes run batched."""

import json

import pytest
import torch
from conftest import fixture_dir
from safetensors.torch import load_file

from vist3a_rt.generator import OFFICIAL_NEGATIVE_PROMPT, WanGenerator, make_scheduler, wrap_prompt
from vist3a_rt.generator.sampling import predict_velocity
from vist3a_rt.generator.text import clean_prompt, tokenize


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def fixture():
    root = fixture_dir("e2e_tiny")
    settings = json.loads((root / "settings.json").read_text())
    return root, settings, load_file(root / "golden.safetensors"), load_file(root / "golden_no_lora.safetensors")


@pytest.fixture(scope="module")
def generator(fixture):
    root = fixture[0]
    return WanGenerator.from_folder(root / "model" / "wan", root / "model" / "lora")


@pytest.fixture(scope="module")
def embeds(generator, fixture):
    settings = fixture[1]
    return generator.encode_prompt([wrap_prompt(settings["prompt"])]), generator.encode_prompt([OFFICIAL_NEGATIVE_PROMPT])


@pytest.fixture(scope="module")
def run(generator, embeds, fixture):
    """The official run: final latents and the latents after every step (batched CFG, merged LoRA)."""
    settings, golden = fixture[1], fixture[2]
    steps = []
    final = generator.sample(*embeds, num_frames=settings["num_frames"], height=settings["height"],
                             width=settings["width"], num_steps=settings["num_inference_steps"],
                             guidance_scale=settings["guidance_scale"], flow_shift=settings["flow_shift"],
                             latents=golden["inputs.noise"], callback=lambda i, t, x: steps.append(x.clone()))
    return final, torch.stack(steps)


def close(actual, expected, atol, rtol=0.0):
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def test_official_strings(fixture):
    settings = fixture[1]
    assert wrap_prompt(settings["prompt"]) == settings["wrapped_prompt"]
    assert OFFICIAL_NEGATIVE_PROMPT == settings["negative_prompt"]


def test_tokens_exact(generator, fixture):
    settings, golden = fixture[1], fixture[2]
    for text, key in ((settings["wrapped_prompt"], "prompt"), (settings["negative_prompt"], "negative_prompt")):
        ids, mask = tokenize(generator.components.tokenizer, [clean_prompt(text)])
        assert torch.equal(ids, golden[f"intermediate.{key}_input_ids"])
        assert torch.equal(mask, golden[f"intermediate.{key}_attention_mask"])


def test_prompt_embeddings(embeds, fixture):
    golden = fixture[2]
    close(embeds[0], golden["intermediate.prompt_embeds"], atol=1e-5)
    close(embeds[1], golden["intermediate.negative_prompt_embeds"], atol=1e-5)


def test_timesteps_and_sigmas(fixture):
    golden = fixture[2]
    scheduler = make_scheduler("unipc", fixture[1]["flow_shift"])
    scheduler.set_timesteps(fixture[1]["num_inference_steps"])
    assert torch.equal(scheduler.timesteps, golden["intermediate.scheduler_timesteps"])
    close(scheduler.sigmas, golden["intermediate.scheduler_sigmas"], atol=1e-5)


def test_step0_predictions_with_merged_lora(generator, embeds, fixture):
    golden = fixture[2]
    t = golden["intermediate.scheduler_timesteps"][0]
    with torch.no_grad():
        cond, uncond = predict_velocity(generator.transformer, golden["inputs.noise"], t, torch.cat(embeds)).chunk(2)
    close(cond, golden["intermediate.step0.noise_pred_cond"], atol=1e-5)
    close(uncond, golden["intermediate.step0.noise_pred_uncond"], atol=1e-5)


def test_latents_every_step_and_final(run, fixture):
    golden = fixture[2]
    final, steps = run
    close(steps, golden["intermediate.latents_per_step"], atol=1e-4, rtol=1e-4)
    close(final, golden["intermediate.final_latents"], atol=1e-4, rtol=1e-4)


def test_denormalize_decode_resize(generator, run, fixture):
    settings, golden = fixture[1], fixture[2]
    denorm = generator.denormalize(run[0])
    close(denorm, golden["intermediate.denormalized_latents"], atol=5e-4)
    frames = generator.decode(denorm)
    close(frames, golden["intermediate.decoded_frames"], atol=5e-4)
    close(generator.resize_frames(frames, settings["feedforward_resolution"]),
          golden["intermediate.feedforward_image"], atol=5e-4)


def test_latent_ops_exact_on_golden_inputs(generator, fixture):
    golden = fixture[2]
    assert torch.equal(generator.denormalize(golden["intermediate.final_latents"]),
                       golden["intermediate.denormalized_latents"])
    assert torch.equal(generator.resize_frames(golden["intermediate.decoded_frames"], 42),
                       golden["intermediate.feedforward_image"])


def test_without_lora_matches_golden_no_lora(embeds, run, fixture):
    root, settings, golden, golden_no_lora = fixture
    plain = WanGenerator.from_folder(root / "model" / "wan")
    final = plain.sample(*embeds, num_frames=settings["num_frames"], height=settings["height"],
                         width=settings["width"], num_steps=settings["num_inference_steps"],
                         guidance_scale=settings["guidance_scale"], latents=golden["inputs.noise"])
    close(final, golden_no_lora["intermediate.final_latents"], atol=1e-4, rtol=1e-4)
    assert (run[0] - final).abs().max() > 0.1  # the LoRA was applied in the official run
