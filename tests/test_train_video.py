"""The video half of the nano recipe on the "micro" preset: VAE and denoiser trainers, latent
statistics, the world tokenizer, and the trained model's round trip through the runtime loader.

Data: synthetic clips of a coloured square moving over a coloured background, with captions.
"""

import copy
import json
import warnings

import pytest
import torch

pytest.importorskip("diffusers")

from vist3a_rt.errors import ConfigError, Vist3AInputError  # noqa: E402
from vist3a_rt.generator import (OFFICIAL_NEGATIVE_PROMPT, PROMPT_TEMPLATE, TextEncoder, WanGenerator,  # noqa: E402
                                 denormalize)
from vist3a_rt.generator.sampling import denoise, make_scheduler  # noqa: E402
from vist3a_rt.training.denoiser import (DenoiserTrainer, encode_captions, flow_matching_pair,  # noqa: E402
                                         sample_sigmas, timesteps_from_sigmas)
from vist3a_rt.training.nano_models import (NanoConfig, build_components, build_text_encoder,  # noqa: E402
                                            build_tokenizer, build_transformer, build_vae, parameter_counts,
                                            save_wan_folder, unknown_words, warn_unknown_words)
from vist3a_rt.training.vae import (VaeTrainer, decode_unclamped, fit_latent_statistics,  # noqa: E402
                                    normalized_latents)

pytestmark = pytest.mark.usefixtures("single_thread")

COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0),
           "yellow": (1.0, 1.0, -1.0), "white": (1.0, 1.0, 1.0), "black": (-1.0, -1.0, -1.0)}
MOTIONS = {"left": (-2, 0), "right": (2, 0), "up": (0, -2), "down": (0, 2)}
WORLD_WORDS = ["a", "square", "moving", "on", "background", *COLOURS, *MOTIONS]
MICRO = NanoConfig.from_name("micro")
VAE_STEPS, DENOISER_STEPS = 64, 60


def moving_squares(count: int, config: NanoConfig, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """``count`` clips [count, 3, T, H, W] in [-1, 1] of a square moving over a plain background."""
    g = torch.Generator().manual_seed(seed)
    names, motions = list(COLOURS), list(MOTIONS)
    size, (t, h, w) = config.height // 3, (config.num_frames, config.height, config.width)
    videos, captions = torch.empty(count, 3, t, h, w), []
    for i in range(count):
        fg, bg = (names[j] for j in torch.randperm(len(names), generator=g)[:2].tolist())
        motion = motions[int(torch.randint(len(motions), (), generator=g))]
        (dx, dy), x0, y0 = MOTIONS[motion], *torch.randint(size, h - 2 * size, (2,), generator=g).tolist()
        videos[i] = torch.tensor(COLOURS[bg]).view(3, 1, 1, 1) * 0.6
        for k in range(t):
            x, y = x0 + dx * k, y0 + dy * k
            videos[i, :, k, y:y + size, x:x + size] = torch.tensor(COLOURS[fg]).view(3, 1, 1) * 0.8
        captions.append(f"a {fg} square moving {motion} on a {bg} background")
    return videos, captions


@pytest.fixture(scope="module")
def data():
    return moving_squares(8, MICRO)


@pytest.fixture(scope="module")
def trained_vae(data):
    """A micro VAE after VAE_STEPS steps (batch 2), its step losses, its reconstruction error over
    the data before and after, and fitted latent statistics."""
    videos, _ = data
    vae = build_vae(MICRO, seed=0)
    trainer = VaeTrainer(vae, lr=1e-2, kl_weight=1e-6)  # micro nets take (and need) a high rate
    before = trainer.evaluate(videos)
    losses = [trainer.step(videos[2 * (i % 4):2 * (i % 4) + 2])["loss"] for i in range(VAE_STEPS)]
    after = trainer.evaluate(videos)
    stats = fit_latent_statistics(vae, videos.split(4))
    return vae, losses, stats, (before, after)


@pytest.fixture(scope="module")
def trained_denoiser(data, trained_vae):
    """Micro components whose transformer and text encoder trained DENOISER_STEPS steps on the VAE's
    normalised latents (batch 4, EMA kept), the trainer, and its losses."""
    videos, captions = data
    vae = trained_vae[0]
    components = build_components(MICRO, WORLD_WORDS, seed=0)
    components.vae = vae
    latents = normalized_latents(vae, videos)
    trainer = DenoiserTrainer(components.transformer, components.text_encoder, components.tokenizer, lr=3e-3,
                              text_encoder_lr=3e-3, flow_shift=MICRO.flow_shift, ema_decay=0.9)
    initial_text = {k: v.clone() for k, v in components.text_encoder.state_dict().items()}
    before = trainer.evaluate(latents, captions)
    losses = [trainer.step(latents[4 * (i % 2):4 * (i % 2) + 4], captions[4 * (i % 2):4 * (i % 2) + 4])["loss"]
              for i in range(DENOISER_STEPS)]
    after = trainer.evaluate(latents, captions)
    return components, trainer, losses, initial_text, (before, after)


def mean(values):
    return sum(values) / len(values)


# --- configs and builders --------------------------------------------------------------------------


def test_presets_have_the_documented_sizes():
    nano = NanoConfig.from_name("nano")
    assert nano.latent_shape(2) == (2, 16, 4, 12, 12) and nano.tokens_per_clip == 144
    assert MICRO.latent_shape() == (1, 16, 2, 4, 4) and MICRO.tokens_per_clip == 8
    assert NanoConfig.from_dict(json.loads(json.dumps(nano.to_dict()))) == nano
    with pytest.raises(ConfigError, match="unknown nano preset"):
        NanoConfig.from_name("huge")
    with pytest.raises(ConfigError, match="4k\\+1"):
        NanoConfig(num_frames=12)
    with pytest.raises(ConfigError, match="multiple of 16"):
        NanoConfig(height=100)


def test_nano_networks_are_the_official_classes_at_the_documented_parameter_counts():
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    nano = NanoConfig.from_name("nano")
    with torch.device("meta"):  # shapes only: nothing to initialise
        vae, transformer = build_vae(nano), build_transformer(nano)
    assert isinstance(vae, AutoencoderKLWan) and isinstance(transformer, WanTransformer3DModel)
    assert vae.config.temperal_downsample == [False, True, True] and vae.config.z_dim == 16
    assert tuple(transformer.config.patch_size) == (1, 2, 2) and transformer.config.text_dim == nano.text_dim
    counts = {"vae": sum(p.numel() for p in vae.parameters()),
              "transformer": sum(p.numel() for p in transformer.parameters())}
    assert 2.3e6 < counts["vae"] < 2.9e6 and 0.8e6 < counts["transformer"] < 1.2e6, counts


def test_builders_are_seeded_and_leave_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = build_transformer(MICRO, seed=3), build_transformer(MICRO, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# --- tokenizer -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(WORLD_WORDS)


def test_tokenizer_knows_every_world_template_and_negative_prompt_word(tokenizer):
    text = " ".join(WORLD_WORDS) + " " + PROMPT_TEMPLATE.format(prompt="") + " " + OFFICIAL_NEGATIVE_PROMPT
    assert unknown_words(tokenizer, text) == []
    for word in WORLD_WORDS:  # one piece each, case-insensitive
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1
        assert tokenizer(word.upper()).input_ids == tokenizer(word).input_ids
    # the prompt's first word stays a whole word inside the template's backticks
    pieces = tokenizer.tokenize(PROMPT_TEMPLATE.format(prompt="Red square moving left"))
    start = pieces.index("▁`") + 1
    assert pieces[start:start + 5] == ["▁red", "▁square", "▁moving", "▁left", "▁`"]


def test_unknown_words_are_listed_and_warned_about(tokenizer):
    prompt = "A crimson square moving left on a dodecahedron"
    assert unknown_words(tokenizer, prompt) == ["crimson", "dodecahedron"]
    assert tokenizer.unk_token_id not in tokenizer(prompt).input_ids  # still encodes, as sub-word pieces
    with pytest.warns(UserWarning, match="crimson, dodecahedron"):
        warn_unknown_words(tokenizer, prompt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_unknown_words(tokenizer, "a red square") == []


def test_tokenizer_is_deterministic(tokenizer):
    assert build_tokenizer(WORLD_WORDS).backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


# --- VAE -------------------------------------------------------------------------------------------


def test_vae_loss_falls(trained_vae):
    _, losses, _, (before, after) = trained_vae
    assert torch.isfinite(torch.tensor(losses)).all()
    assert mean(losses[-8:]) < 0.8 * mean(losses[:4]), losses  # noisy: batches and posterior samples differ
    assert after["l1"] < 0.75 * before["l1"] and after["psnr"] > before["psnr"] + 1.0, (before, after)


def test_unclamped_decode_is_diffusers_decode_before_the_clamp(trained_vae):
    vae = trained_vae[0]
    z = 3.0 * torch.randn(MICRO.latent_shape(2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unclamped = decode_unclamped(vae, z)
        assert torch.equal(unclamped.clamp(-1, 1), vae.decode(z).sample)


def test_latent_statistics_are_written_into_the_config_and_normalise_the_data(trained_vae, data):
    vae, _, (mean_, std), _ = trained_vae
    assert vae.config.latents_mean == mean_ and vae.config.latents_std == std and len(mean_) == 16
    latents = normalized_latents(vae, data[0])
    per_channel = latents.transpose(0, 1).flatten(1)
    assert per_channel.mean(1).abs().max() < 1e-4
    assert (per_channel.std(1) - 1).abs().max() < 1e-3
    with torch.no_grad():  # the runtime's de-normalisation inverts it
        z = vae.encode(data[0]).latent_dist.mean
    assert torch.allclose(denormalize(latents, vae.config), z, atol=1e-5)


def test_vae_trainer_rejects_bad_videos(trained_vae):
    trainer = VaeTrainer(trained_vae[0])
    for bad, match in ((torch.zeros(1, 3, 4, 32, 32), "4k\\+1"), (torch.zeros(1, 3, 32, 32), "batch, 3"),
                       (torch.full((1, 3, 5, 32, 32), 2.0), "\\[-1, 1\\]"),
                       (torch.zeros(1, 3, 5, 30, 32), "multiples")):
        with pytest.raises(Vist3AInputError, match=match):
            trainer.step(bad)


# --- denoiser --------------------------------------------------------------------------------------


class VelocityOracle(torch.nn.Module):
    """The exact velocity field towards one clean latent x0: v = (x_σ − x0) / σ with σ = t / 1000."""

    dtype = torch.float32

    def __init__(self, x0: torch.Tensor, sign: float = 1.0) -> None:
        super().__init__()
        self.x0, self.sign = x0, sign

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        sigma = (timestep / 1000.0).view(-1, 1, 1, 1, 1)
        return (self.sign * (hidden_states - self.x0) / sigma,)


def test_training_target_is_the_velocity_the_runtime_samplers_integrate():
    g = torch.Generator().manual_seed(0)
    x0, noise, sigma = torch.randn(3, 16, 2, 4, 4, generator=g), torch.randn(3, 16, 2, 4, 4, generator=g), \
        torch.rand(3, generator=g)
    x_t, target = flow_matching_pair(x0, noise, sigma)
    oracle = VelocityOracle(x0)
    # the trainer's target is the oracle's velocity at the trainer's timestep ...
    assert torch.allclose(oracle(x_t, timesteps_from_sigmas(sigma), None)[0], target, atol=1e-4)
    # ... and the runtime's samplers integrate the oracle's velocity back to x0
    start = torch.randn(1, 16, 2, 4, 4, generator=g)
    for sampler, tolerance in (("euler", 1e-5), ("unipc", 2e-2)):  # UniPC's timesteps are integers: σ ≈ t/1000
        scheduler = make_scheduler(sampler, 5.0)
        out = denoise(VelocityOracle(x0[:1]), scheduler, start, torch.zeros(1, 1, 4), None, num_steps=10,
                      guidance_scale=1.0)
        assert (out - x0[:1]).abs().max() < tolerance, sampler
    wrong = denoise(VelocityOracle(x0[:1], sign=-1.0), make_scheduler("euler", 5.0), start, torch.zeros(1, 1, 4),
                    None, num_steps=10, guidance_scale=1.0)
    assert (wrong - x0[:1]).abs().max() > 1.0


def test_timestep_sampling_follows_the_sampler_shift():
    g = torch.Generator().manual_seed(0)
    plain = sample_sigmas(4000, shift=1.0, generator=g)
    shifted = sample_sigmas(4000, shift=5.0, generator=g)
    logit = sample_sigmas(4000, shift=1.0, mode="logit_normal", generator=g)
    assert 0.0 <= shifted.min() and shifted.max() <= 1.0
    assert abs(plain.mean() - 0.5) < 0.02 and shifted.mean() > 0.7  # shift 5 spends most time at high noise
    assert logit.std() < plain.std()
    with pytest.raises(Vist3AInputError, match="unknown timestep sampling"):
        sample_sigmas(2, shift=1.0, mode="cosine")


def test_caption_encoding_matches_the_runtime_text_encoder(tokenizer):
    encoder = build_text_encoder(MICRO, len(tokenizer)).eval()
    prompts = [PROMPT_TEMPLATE.format(prompt="a red square moving left"), "", OFFICIAL_NEGATIVE_PROMPT]
    with torch.no_grad():
        ours = encode_captions(tokenizer, encoder, prompts)
    runtime = TextEncoder(tokenizer, encoder)(prompts, allow_empty=True)
    assert ours.shape == runtime.shape == (3, 512, MICRO.text_dim)
    assert torch.allclose(ours, runtime, atol=1e-5)


def test_denoiser_loss_falls_and_trains_the_text_encoder_with_an_ema(trained_denoiser):
    components, trainer, losses, initial_text, (before, after) = trained_denoiser
    assert mean(losses[-10:]) < 0.8 * mean(losses[:5]), losses  # noisy: random noise levels
    assert after["loss"] < 0.7 * before["loss"], (before, after)
    text_now = components.text_encoder.state_dict()
    assert any(not torch.equal(text_now[k], v) for k, v in initial_text.items())
    with trainer.ema_weights():
        ema = components.transformer.proj_out.weight.clone()
    assert not torch.equal(ema, components.transformer.proj_out.weight)


def test_caption_dropout_uses_the_unconditional_prompts(trained_denoiser):
    components, trainer, *_ = trained_denoiser
    dropping = DenoiserTrainer(components.transformer, components.text_encoder, components.tokenizer,
                               caption_dropout=1.0, uncond_prompts=[""], seed=1)
    prompts, dropped = dropping._prompts(["a red square", "a blue square"])
    assert prompts == ["", ""] and dropped == 2
    assert trainer._prompts(["a red square"] * 40)[0].count(PROMPT_TEMPLATE.format(prompt="a red square")) > 25


def test_denoiser_trainer_resumes_exactly(trained_denoiser, data, trained_vae):
    components, *_ = trained_denoiser
    latents = normalized_latents(trained_vae[0], data[0][:2])
    trainer = DenoiserTrainer(components.transformer, components.text_encoder, components.tokenizer, lr=1e-4, seed=5)
    state = copy.deepcopy(trainer.state_dict())
    first = [trainer.step(latents, data[1][:2])["loss"] for _ in range(2)]
    trainer.load_state_dict(state)
    assert [trainer.step(latents, data[1][:2])["loss"] for _ in range(2)] == first


def test_denoiser_trainer_rejects_bad_batches(trained_denoiser):
    components, trainer, *_ = trained_denoiser
    with pytest.raises(Vist3AInputError, match="captions"):
        trainer.step(torch.zeros(2, 16, 2, 4, 4), ["one caption"])
    with pytest.raises(Vist3AInputError, match="latents must be"):
        trainer.step(torch.zeros(2, 8, 2, 4, 4), ["a", "b"])
    with pytest.raises(Vist3AInputError, match="ema_decay"):
        DenoiserTrainer(components.transformer, components.text_encoder, components.tokenizer, ema_decay=1.5)


# --- the round trip --------------------------------------------------------------------------------


def test_trained_micro_model_saves_loads_through_the_runtime_and_samples(trained_denoiser, tmp_path):
    components, trainer, *_ = trained_denoiser
    with trainer.ema_weights():
        folder = save_wan_folder(components, tmp_path / "wan")
        saved = {k: v.clone() for k, v in components.transformer.state_dict().items()}
    generator = WanGenerator.from_folder(folder)
    loaded = generator.transformer.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())
    assert generator.vae.config.latents_std == components.vae.config.latents_std
    assert parameter_counts(generator.components) == parameter_counts(components)
    assert unknown_words(generator.components.tokenizer, "A RED square moving left") == []

    prompt = generator.encode_prompt(PROMPT_TEMPLATE.format(prompt="a red square moving left on a blue background"))
    negative = generator.encode_prompt(OFFICIAL_NEGATIVE_PROMPT)
    latents = generator.sample(prompt, negative, num_frames=MICRO.num_frames, height=MICRO.height,
                               width=MICRO.width, num_steps=6, guidance_scale=4.0, seed=0)
    assert latents.shape == MICRO.latent_shape() and torch.isfinite(latents).all()
    frames = generator.decode(generator.denormalize(latents))
    assert frames.shape == (1, 3, MICRO.num_frames, MICRO.height, MICRO.width) and torch.isfinite(frames).all()
    with pytest.raises(FileExistsError):
        save_wan_folder(components, folder)
