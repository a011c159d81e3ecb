"""WanGenerator on a tiny random Wan model: equal to diffusers' WanPipeline, LoRA merge equal to
PEFT's unmerged adapter, precise errors on bad input, reproducible seeded noise."""

import json
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

from vist3a_rt.errors import CheckpointError, Vist3AInputError
from vist3a_rt.generator import WanGenerator, initial_noise, make_scheduler, resize_frames
from vist3a_rt.generator.sampling import apply_guidance, predict_velocity

FRAMES, HEIGHT, WIDTH = 5, 32, 32  # latent [1, 16, 2, 4, 4]
LATENT = (1, 16, 2, 4, 4)
WORDS = ("a red cube on blue sphere wooden table the camera rotates around scene maintaining constant "
         "distance orbiting trajectory captures 3d structure and consistency blur low quality").split()
LORA_TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)


def perturb(module: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module.eval()


def tiny_pipeline():
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(WORDS) + 3, d_model=16, d_kv=4, num_heads=2, d_ff=32,
                                               num_layers=1, relative_attention_num_buckets=8,
                                               feed_forward_proj="gated-gelu", dropout_rate=0.0))
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=16, out_channels=16, text_dim=16, freq_dim=16, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=tiny_tokenizer(), text_encoder=perturb(text_encoder), vae=perturb(vae, 0.02),
                       scheduler=scheduler, transformer=perturb(transformer))


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan")
    tiny_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def generator(wan_dir):
    return WanGenerator.from_folder(wan_dir)


@pytest.fixture(scope="module")
def lora_dir(wan_dir, tmp_path_factory):
    """A random PEFT LoRA (all B non-zero) on the official target modules, saved as PEFT does."""
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig, get_peft_model

    transformer = WanTransformer3DModel.from_pretrained(wan_dir, subfolder="transformer")
    peft_model = get_peft_model(transformer, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    folder = tmp_path_factory.mktemp("lora")
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def embeds(generator):
    return generator.encode_prompt(["a red cube on a wooden table"]), generator.encode_prompt(["blur low quality"])


def diffusers_scheduler(sampler: str):
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if sampler == "unipc":  # the official construction, independent of make_scheduler
        return UniPCMultistepScheduler(prediction_type="flow_prediction", num_train_timesteps=1000,
                                       use_flow_sigmas=True, flow_shift=5.0)
    return FlowMatchEulerDiscreteScheduler(shift=5.0)


# --- equal to diffusers ----------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["unipc", "euler"])
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_sample_matches_wan_pipeline(generator, embeds, sampler, guidance):
    from diffusers import WanPipeline

    c = generator.components
    pipe = WanPipeline(tokenizer=c.tokenizer, text_encoder=c.text_encoder, vae=c.vae, transformer=c.transformer,
                       scheduler=diffusers_scheduler(sampler))
    noise = initial_noise(LATENT, seed=7, device="cpu")
    prompt_embeds, negative_embeds = embeds
    expected = pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, latents=noise,
                    num_frames=FRAMES, height=HEIGHT, width=WIDTH, num_inference_steps=8, guidance_scale=guidance,
                    output_type="latent").frames
    ours = generator.sample(prompt_embeds, negative_embeds, num_frames=FRAMES, height=HEIGHT, width=WIDTH,
                            num_steps=8, guidance_scale=guidance, sampler=sampler, latents=noise)
    assert ours.shape == LATENT and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_encode_prompt_matches_wan_pipeline(generator):
    from diffusers import WanPipeline

    c = generator.components
    pipe = WanPipeline(tokenizer=c.tokenizer, text_encoder=c.text_encoder, vae=c.vae, transformer=c.transformer,
                       scheduler=diffusers_scheduler("unipc"))
    prompts = ["a red  cube &amp; the   sphere ", "camera"]
    expected, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=512)
    ours = generator.encode_prompt(prompts)
    assert ours.shape == (2, 512, 16)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    n_real = len(c.tokenizer("camera").input_ids)
    assert torch.all(ours[1, n_real:] == 0) and torch.all(ours[1, :n_real].abs().sum(-1) > 0)


def test_scheduler_from_folder_equals_official_construction(generator):
    ours = make_scheduler("unipc", 5.0, generator.components.scheduler_config)  # folder says flow_shift 3.0
    official = diffusers_scheduler("unipc")
    for s in (ours, official):
        s.set_timesteps(50)
    assert torch.equal(ours.timesteps, official.timesteps)
    assert torch.equal(ours.sigmas, official.sigmas)


def test_batched_guidance_equals_two_passes(generator, embeds):
    prompt_embeds, negative_embeds = embeds
    latents, t = initial_noise(LATENT, 0, "cpu"), torch.tensor(700)
    with torch.no_grad():
        batched = predict_velocity(generator.transformer, latents, t, torch.cat([prompt_embeds, negative_embeds]))
        cond = predict_velocity(generator.transformer, latents, t, prompt_embeds)
        uncond = predict_velocity(generator.transformer, latents, t, negative_embeds)
    torch.testing.assert_close(batched, torch.cat([cond, uncond]), atol=1e-5, rtol=0)  # ulps
    torch.testing.assert_close(apply_guidance(batched, 1, 5.0), uncond + 5.0 * (cond - uncond), atol=1e-5, rtol=0)
    assert apply_guidance(cond, 1, 5.0) is cond


# --- LoRA ------------------------------------------------------------------------------------


def test_lora_merged_equals_peft_unmerged(wan_dir, lora_dir, generator, embeds):
    from diffusers import WanTransformer3DModel
    from peft import PeftModel

    merged = WanGenerator.from_folder(wan_dir, lora_dir).transformer
    unmerged = PeftModel.from_pretrained(WanTransformer3DModel.from_pretrained(wan_dir, subfolder="transformer"),
                                         lora_dir).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    latents, t, context = initial_noise(LATENT, 0, "cpu"), torch.tensor(500), torch.cat(embeds)
    kwargs = dict(hidden_states=latents.repeat(2, 1, 1, 1, 1), timestep=t.expand(2), encoder_hidden_states=context,
                  return_dict=False)
    with torch.no_grad():
        ours, peft_out, base = merged(**kwargs)[0], unmerged(**kwargs)[0], generator.transformer(**kwargs)[0]
    torch.testing.assert_close(ours, peft_out, atol=1e-5, rtol=0)
    assert (ours - base).abs().max() > 1e-3  # the LoRA does something


def _edit_adapter(lora_dir, tmp_path, **changes):
    folder = tmp_path / "lora"
    shutil.copytree(lora_dir, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_lora_with_foreign_targets_is_rejected(wan_dir, lora_dir, tmp_path):
    bad = _edit_adapter(lora_dir, tmp_path, target_modules=LORA_TARGETS + ["attn3.to_q", "mlp.fc1"])
    with pytest.raises(CheckpointError, match=r"\['attn3.to_q', 'mlp.fc1'\] do not exist") as info:
        WanGenerator.from_folder(wan_dir, bad)
    assert isinstance(info.value, Vist3AInputError)  # exit code 2


def test_lora_missing_files(wan_dir, lora_dir, tmp_path):
    folder = tmp_path / "lora"
    shutil.copytree(lora_dir, folder)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing adapter_model.safetensors"):
        WanGenerator.from_folder(wan_dir, folder)
    with pytest.raises(CheckpointError, match="LoRA adapter folder not found"):
        WanGenerator.from_folder(wan_dir, tmp_path / "nowhere")


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("missing, message", [
    ("vae", "has no vae/ subfolder"),
    ("tokenizer", "has no tokenizer/ subfolder"),
    ("model_index.json", "missing model_index.json"),
    ("transformer/diffusion_pytorch_model.safetensors", "transformer/ holds no weights"),
])
def test_missing_piece_of_wan_folder(wan_dir, tmp_path, missing, message):
    folder = tmp_path / "wan"
    shutil.copytree(wan_dir, folder)
    target = folder / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(CheckpointError, match=message):
        WanGenerator.from_folder(folder)


def test_float16_on_cpu_is_rejected(wan_dir):
    with pytest.raises(Vist3AInputError, match="float16 on the CPU"):
        WanGenerator.from_folder(wan_dir, dtype=torch.float16)


@pytest.mark.parametrize("prompts", ["", "   \n", ["ok", " "]])
def test_empty_prompt(generator, prompts):
    with pytest.raises(Vist3AInputError, match="empty"):
        generator.encode_prompt(prompts)


def test_empty_negative_prompt_allowed_on_request(generator):
    assert generator.encode_prompt([""], allow_empty=True).shape == (1, 512, 16)


@pytest.mark.parametrize("change, message", [
    (dict(num_frames=14), r"num_frames must be 4k\+1 .* got 14; nearest: 13 or 17"),
    (dict(height=50), r"height must be a multiple of 16 .* got 50"),
    (dict(width=24), r"width must be a multiple of 16 .* got 24"),
    (dict(num_steps=0), r"num_steps must be an integer >= 1, got 0"),
    (dict(guidance_scale=-1.0), r"guidance_scale must be >= 0"),
    (dict(sampler="ddim"), r"unknown sampler 'ddim'"),
    (dict(flow_shift=0.0), r"flow_shift must be a positive number"),
    (dict(latents=torch.zeros(1, 16, 3, 4, 4)), r"latents have shape \[1, 16, 3, 4, 4\], expected \[1, 16, 2, 4, 4\]"),
    (dict(latents=torch.full(LATENT, float("nan"))), r"NaN or infinite"),
])
def test_bad_sampling_arguments(generator, embeds, change, message):
    kwargs = dict(num_frames=FRAMES, height=HEIGHT, width=WIDTH, num_steps=2, seed=0) | change
    with pytest.raises(Vist3AInputError, match=message):
        generator.sample(*embeds, **kwargs)


def test_bad_embeddings(generator, embeds):
    with pytest.raises(Vist3AInputError, match=r"prompt_embeds must be \[batch, tokens, 16\]"):
        generator.sample(torch.zeros(1, 512, 8), embeds[1], num_frames=FRAMES, height=HEIGHT, width=WIDTH)


# --- noise, callback, text cache -------------------------------------------------------------


def test_seeded_noise_is_reproducible(generator, embeds):
    expected = torch.randn(LATENT, generator=torch.Generator().manual_seed(3))
    assert torch.equal(initial_noise(LATENT, 3, "cpu"), expected)
    run = lambda seed: generator.sample(*embeds, num_frames=FRAMES, height=HEIGHT, width=WIDTH, num_steps=3,
                                        seed=seed)
    first, second, other = run(3), run(3), run(4)
    assert torch.equal(first, second) and not torch.equal(first, other)
    from_noise = generator.sample(*embeds, num_frames=FRAMES, height=HEIGHT, width=WIDTH, num_steps=3,
                                  latents=expected)
    assert torch.equal(first, from_noise)


def test_callback_sees_every_step(generator, embeds):
    seen = []
    final = generator.sample(*embeds, num_frames=FRAMES, height=HEIGHT, width=WIDTH, num_steps=4, seed=0,
                             callback=lambda i, t, latents: seen.append((i, int(t), latents.clone())))
    assert [i for i, _, _ in seen] == [0, 1, 2, 3]
    assert seen[0][1] == 999 and all(a[1] > b[1] for a, b in zip(seen, seen[1:]))
    assert torch.equal(seen[-1][2], final)


def test_text_cache_encodes_each_string_once(wan_dir):
    gen = WanGenerator.from_folder(wan_dir)
    calls = []
    gen.text_encoder.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    negative = gen.encode_prompt(["blur low quality"])
    again = gen.encode_prompt(["blur low quality"])
    batch = gen.encode_prompt(["a red cube", "blur low quality"])
    assert len(calls) == 2 and torch.equal(negative, again) and torch.equal(batch[1:], negative)
    assert batch.shape == (2, 512, 16)


def test_overlong_prompt_is_truncated_with_warning(generator):
    long_prompt = " ".join(["cube"] * 600)
    with pytest.warns(UserWarning, match="601 tokens .* truncated"):
        embedding = generator.encode_prompt([long_prompt])
    assert embedding.shape == (1, 512, 16) and torch.all(embedding[0].abs().sum(-1) > 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generator.encode_prompt([" ".join(["cube"] * 511)])  # 511 + eos fits


# --- latents ---------------------------------------------------------------------------------


def test_denormalize_and_decode(generator):
    latents = initial_noise(LATENT, 1, "cpu")
    denorm = generator.denormalize(latents)
    config = generator.vae.config
    mean = torch.tensor(config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(config.latents_std).view(1, 16, 1, 1, 1)
    assert torch.equal(denorm, latents / (1.0 / std) + mean)
    torch.testing.assert_close(denorm, latents * std + mean, atol=1e-5, rtol=0)
    frames = generator.decode(denorm)
    assert frames.shape == (1, 3, FRAMES, HEIGHT, WIDTH) and frames.abs().max() <= 1.0


def test_resize_is_per_frame_bilinear_with_half_pixel_centres():
    frames = torch.rand(2, 3, 5, 32, 32) * 2 - 1
    resized = resize_frames(frames, 28)
    per_frame = F.interpolate(frames.transpose(1, 2).flatten(0, 1), size=(28, 28), mode="bilinear",
                              align_corners=False).unflatten(0, (2, 5)).transpose(1, 2)
    assert resized.shape == (2, 3, 5, 28, 28)
    torch.testing.assert_close(resized, per_frame, atol=1e-6, rtol=0)
    assert resize_frames(frames, (20, 24)).shape == (2, 3, 5, 20, 24)


def test_truncated_weights_name_the_subfolder(wan_dir, tmp_path):
    folder = tmp_path / "wan"
    shutil.copytree(wan_dir, folder)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot load vae/"):
        WanGenerator.from_folder(folder)


def test_lora_without_weights_for_a_target(wan_dir, lora_dir, tmp_path):
    bad = _edit_adapter(lora_dir, tmp_path, target_modules=LORA_TARGETS + ["ffn.net.2"])
    with pytest.raises(CheckpointError, match=r"no LoRA weights for 2 targeted modules, e.g. \['blocks.0.ffn.net.2'"):
        WanGenerator.from_folder(wan_dir, bad)


def test_bfloat16_runs_with_float32_latents(wan_dir, lora_dir, embeds):
    gen = WanGenerator.from_folder(wan_dir, lora_dir, dtype=torch.bfloat16)
    assert gen.transformer.dtype == torch.bfloat16 and gen.vae.dtype == torch.float32
    out = gen.sample(*embeds, num_frames=FRAMES, height=HEIGHT, width=WIDTH, num_steps=2, seed=0)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert gen.encode_prompt(["a red cube"]).dtype == torch.bfloat16
