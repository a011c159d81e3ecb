"""A tiny, random VIST3A model folder in exactly the official on-disk layout.

``write_tiny_model(path)`` writes what a user assembles from the released files (see
``vist3a_rt.pipeline.model_folder``), at the toy sizes of ``shared/fixtures/e2e_tiny``::

    model/
      wan/                    WanPipeline.save_pretrained: tiny transformer, VAE, UMT5 encoder,
                              a small trained Unigram tokenizer, the official UniPC scheduler
      lora/                   (with_lora) a PEFT adapter of the transformer, non-zero lora_B
      anysplat/               config.json {encoder_cfg, decoder_cfg} + model.safetensors
      anysplat_stitched.pth   torch.save {lora, stitching_layer, mask_token, cls_token, register_tokens}
      vist3a.json             the fixtures' config layout (architecture constants, stitching, resolutions)

so tests and benchmarks can run the whole load path (diffusers, transformers, PEFT, our
decoder loader) without the fixtures. Weights are each module's own initialisation plus
0.02 x normal noise; nothing is trained, but the text conditioning and the camera are made
to behave (see ``_strengthen_text_conditioning`` and ``_sane_camera``).

The writer is deterministic: the same arguments give the same bytes (every component is
seeded on its own, the tokenizer's trained vocabulary is re-scored deterministically, and
nothing time-dependent is written). It writes into a temporary folder beside ``path`` and
renames it into place, so a reader never sees a half-written model.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..checkpoints.lora import parse_lora_spec
from ..checkpoints.official import stitched_names
from ..decoder.config import DecoderConfig, EncoderConfig
from ..decoder.loading import lora_targets, meta_parameters
from ..decoder.network import ReconstructionModel, StitchedDecoder
from ..errors import ConfigError

# The official orbit-camera prompt template and negative prompt (VIST3A inference_t23d.py).
ORBIT_PROMPT_TEMPLATE = ("The camera rotates around the scene, maintaining constant distance: `{prompt}`. "
                         "The orbiting trajectory captures 3D structure and consistency.")
OFFICIAL_NEGATIVE_PROMPT = (
    "Background blur, Blurred background, Blurred scene, Artifacts, not aesthetic, not realistic, "
    "rendered noise, low quality movement, low quality video, low quality image, deformed, disfigured, "
    "distorted, extra limbs, cloned face, skinny, glitchy, double torso, extra arms, extra hands, "
    "mangled fingers, missing lips, ugly face, distorted legs, fused fingers, too many fingers, long neck")

# Words the tokenizer is trained on, besides the two strings above: enough to spell simple scenes.
COMMON_WORDS = tuple(dict.fromkeys("""
a an the of on in at to with by for from under over above below behind beside between near next into onto
and or but not no very too many much more most some all each every this that these those its their his her
is are was be been being has have had do does made make makes sits stands lies rests floats hangs grows
one two three four five six seven eight ten small large big tiny huge tall short long wide narrow round flat
thin thick old new bright dark light shiny matte glossy smooth rough soft hard wet dry warm cold clean dirty
red orange yellow green blue purple pink brown black white gray grey gold silver beige teal cyan magenta
cube sphere ball box cone cylinder pyramid torus ring disk plane block brick tile stone rock pebble
table chair desk sofa bed lamp shelf door window wall floor roof ceiling stairs fence bench stool cabinet
cup mug bowl plate bottle glass vase jar pot pan kettle spoon fork knife teapot basket bag shoe hat
book pen pencil paper clock phone laptop screen keyboard camera lens guitar piano drum violin toy robot
car truck bus bicycle boat ship train rocket tractor wheel engine
tree flower plant leaf grass bush forest garden park field meadow mountain hill valley river lake sea ocean
beach island desert snow ice water fire sand mud cloud sky sun moon star rain wind
house home building tower castle bridge church temple street road city town village room kitchen bathroom
dog cat bird fish horse cow sheep pig duck chicken rabbit mouse bear lion tiger elephant monkey frog
person man woman child boy girl people head hair eye eyes nose mouth ear ears hand hands arm arms leg legs
foot feet finger fingers face body neck torso lips
apple banana lemon bread cake pie pizza cheese egg carrot tomato potato
wooden wood metal metallic plastic ceramic marble concrete leather fabric cotton velvet golden
painted rusty polished carved broken vintage modern antique futuristic cartoon realistic detailed
photo picture image video scene view shot close closeup top side front back left right center corner
morning evening night day sunset sunrise shadow shadows lighting lights reflection
""".split()))

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as in UMT5
STITCHED_LORA_SPEC = "r4,a8,d0.0,f0"
TRANSFORMER_LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                            "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")  # official train_vdm.py
LATENT_CHANNELS = 16
NOISE_STD = 0.02
# The sizes the official code hard-codes ("architecture_constants"); the other fields are "architecture_fixed".
ARCHITECTURE_CONSTANTS = ("img_size", "patch_size", "embed_dim", "agg_depth", "agg_num_heads", "dino_depth",
                          "dino_num_heads", "cam_num_heads", "dpt_features", "dpt_out_channels", "gs_features",
                          "gs_out_channels", "gs_head_features_1", "gs_head_features_2")

# Per-component seed offsets: each component is seeded on its own, so e.g. dropping the LoRA
# leaves every other file byte-identical.
_SEED_OFFSETS = {"transformer": 1, "vae": 2, "text_encoder": 3, "lora": 4, "anysplat": 5, "stitched": 6}


def write_tiny_model(path: str | Path, *, seed: int = 0, with_lora: bool = True, embed_dim: int = 32,
                     resolution: int = 48, feedforward_resolution: int = 42, num_frames: int = 13,
                     overwrite: bool = False) -> Path:
    """Write a tiny random model folder at ``path`` and return it.

    ``embed_dim``: the AnySplat / DINO width E (a multiple of 8); ``resolution``: the VAE /
    video size in pixels (a multiple of 16: the VAE downsamples by 8, the stitching conv by 2);
    ``feedforward_resolution``: the AnySplat input size, 14 px per stitched token (so
    ``14 * resolution / 16``); ``num_frames``: video frames, 4·k + 1. An existing ``path`` is
    an error unless ``overwrite``.
    """
    target = Path(path)
    cfg = tiny_decoder_config(embed_dim=embed_dim, resolution=resolution,
                              feedforward_resolution=feedforward_resolution, num_frames=num_frames)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists (pass overwrite=True to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the model folder is an ordinary one
    try:
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
            transformer = _write_wan(staging / "wan", seed)
            if with_lora:
                _write_transformer_lora(staging / "lora", transformer, seed)
            base = _write_anysplat(staging / "anysplat", cfg, seed)
            torch.save(_stitched_checkpoint(cfg, base, seed), staging / "anysplat_stitched.pth")
            (staging / "vist3a.json").write_text(json.dumps(vist3a_config(cfg, seed), indent=2) + "\n")
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


# --- configuration --------------------------------------------------------------------------------


def tiny_decoder_config(*, embed_dim: int = 32, resolution: int = 48, feedforward_resolution: int = 42,
                        num_frames: int = 13) -> DecoderConfig:
    """The tiny decoder config (the fixtures' architecture at width ``embed_dim``); checks the sizes."""
    if embed_dim < 8 or embed_dim % 8:
        raise ConfigError(f"embed_dim must be a positive multiple of 8 (4 heads with even RoPE halves, "
                          f"16 camera heads on 2E), got {embed_dim}")
    if resolution < 16 or resolution % 16:
        raise ConfigError(f"resolution must be a positive multiple of 16 (VAE /8, stitching conv /2), got {resolution}")
    grid = resolution // 16
    if feedforward_resolution != 14 * grid:
        raise ConfigError(f"feedforward_resolution must be 14 px per stitched token: {14 * grid} for "
                          f"resolution {resolution} ({grid}x{grid} tokens), got {feedforward_resolution}")
    if num_frames < 1 or num_frames % 4 != 1:
        raise ConfigError(f"num_frames must be 4*k + 1 (Wan's temporal compression), got {num_frames}")
    return DecoderConfig.from_dict({
        "anysplat": {"encoder_cfg": dataclasses.asdict(_encoder_config()),
                     "decoder_cfg": {"name": "splatting_cuda", "background_color": [1.0, 1.0, 1.0],
                                     "make_scale_invariant": False}},
        "architecture_constants": {
            "img_size": 518, "patch_size": 14, "embed_dim": embed_dim, "agg_depth": 24, "agg_num_heads": 4,
            "dino_depth": 4, "dino_num_heads": 4, "cam_num_heads": 16, "dpt_features": 32,
            "dpt_out_channels": [16, 32, 64, 64], "gs_features": 32, "gs_out_channels": [16, 32, 64, 64],
            "gs_head_features_1": 16, "gs_head_features_2": 16},
        "stitching": {"stitching_layer_location": "enc_blocks_2",
                      "stitching_layer_config": f"conv3d_k5x3x3_o{embed_dim}_s1x2x2_p2x1x1",
                      "lora_config": STITCHED_LORA_SPEC},
        "resolutions": {"vae_resolution": resolution, "feedforward_resolution": feedforward_resolution,
                        "num_frames": num_frames, "latent_frames": (num_frames - 1) // 4 + 1,
                        "latent_channels": LATENT_CHANNELS},
    })


def _encoder_config() -> EncoderConfig:
    """The fixtures' AnySplat encoder_cfg: the official default YAML with the stitched-model overrides."""
    return EncoderConfig(
        anchor_feat_dim=128, voxel_size=0.05, freeze_module="patch_embed", voxelize=False,
        backbone={"name": "croco", "model": "ViTLarge_BaseDecoder", "patch_embed_cls": "PatchEmbedDust3R",
                  "asymmetry_decoder": True, "intrinsics_embed_loc": "encoder", "intrinsics_embed_degree": 4,
                  "intrinsics_embed_type": "token"},
        visualizer={"num_samples": 8, "min_resolution": 256, "export_ply": False})


def vist3a_config(cfg: DecoderConfig, seed: int) -> dict:
    """``vist3a.json``, laid out like the fixtures' ``config.json``."""
    arch = dataclasses.asdict(cfg.architecture)
    res = cfg.resolutions
    spec = parse_lora_spec(cfg.stitching.lora_config)
    with meta_parameters():
        lora_modules = sorted(lora_targets(StitchedDecoder(cfg), spec))
    return {
        "tiny_model": {"writer": "vist3a_rt.testing.tiny_model.write_tiny_model", "seed": seed},
        "anysplat": {"encoder_cfg": dataclasses.asdict(cfg.encoder), "decoder_cfg": cfg.decoder_cfg},
        "architecture_constants": {k: arch[k] for k in ARCHITECTURE_CONSTANTS},
        "architecture_fixed": {k: v for k, v in arch.items() if k not in ARCHITECTURE_CONSTANTS},
        "stitching": {"stitching_layer_location": cfg.stitching.stitching_layer_location,
                      "stitched_layer_index": cfg.stitching.stitched_layer_index,
                      "stitching_layer_config": cfg.stitching.stitching_layer_config,
                      "lora_config": cfg.stitching.lora_config,
                      "lora_module_names": lora_modules},
        "resolutions": {"vae_resolution": res.vae_resolution, "feedforward_resolution": res.feedforward_resolution,
                        "patch_grid": res.vae_resolution // 16, "latent_hw": res.vae_resolution // 8,
                        "num_frames": res.num_frames, "latent_frames": res.latent_frames,
                        "latent_channels": res.latent_channels},
    }


# --- wan/ and lora/ (diffusers, transformers, PEFT) -----------------------------------------------


def _write_wan(folder: Path, seed: int) -> nn.Module:
    """``WanPipeline.save_pretrained`` of tiny random components; returns the transformer (for the LoRA)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _train_tokenizer()
    torch.manual_seed(seed * 100 + _SEED_OFFSETS["transformer"])
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)
    _add_noise(transformer, seed, "transformer")
    _strengthen_text_conditioning(transformer)
    torch.manual_seed(seed * 100 + _SEED_OFFSETS["vae"])
    vae = AutoencoderKLWan(base_dim=4, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                           attn_scales=[], temperal_downsample=[False, True, True])
    _add_noise(vae, seed, "vae")
    torch.manual_seed(seed * 100 + _SEED_OFFSETS["text_encoder"])
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dropout_rate=0.0, layer_norm_epsilon=1e-6, scalable_attention=True, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0))
    _add_noise(text_encoder, seed, "text_encoder")
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0,
                                        num_train_timesteps=1000)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)
    with _no_progress_bars():
        pipe.save_pretrained(folder, safe_serialization=True)
    _name_tokenizer_class(folder)
    return transformer


def _strengthen_text_conditioning(transformer: nn.Module) -> None:
    """Scale the text projection's second layer and every cross-attention output by 4: at random
    init the conditional and unconditional predictions differ by only ~1% rms, too little for
    guidance tests to see (the fixture did the same)."""
    with torch.no_grad():
        layers = [transformer.condition_embedder.text_embedder.linear_2]
        layers += [block.attn2.to_out[0] for block in transformer.blocks]
        for layer in layers:
            layer.weight.mul_(4.0)
            layer.bias.mul_(4.0)


@contextlib.contextmanager
def _no_progress_bars():
    """transformers shows a progress bar for writing a one-file model; hide it, then restore."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def _name_tokenizer_class(folder: Path) -> None:
    """transformers 5 saves the tokenizer class as ``TokenizersBackend``; name it
    ``PreTrainedTokenizerFast`` (as the fixture does) so transformers 4.x loads it too."""
    for file, update in ((folder / "model_index.json", lambda d: d.update(tokenizer=["transformers",
                                                                                     "PreTrainedTokenizerFast"])),
                         (folder / "tokenizer" / "tokenizer_config.json",
                          lambda d: d.update(tokenizer_class="PreTrainedTokenizerFast"))):
        data = json.loads(file.read_text())
        update(data)
        file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_transformer_lora(folder: Path, transformer: nn.Module, seed: int) -> None:
    """A PEFT adapter (r 8, alpha 16, the official targets) with seeded non-zero lora_B."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed * 100 + _SEED_OFFSETS["lora"])  # lora_A: PEFT's Kaiming-uniform init
    model = get_peft_model(transformer, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                   target_modules=list(TRANSFORMER_LORA_TARGETS)))
    generator = _generator(seed, "lora")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(folder)
    (folder / "README.md").unlink(missing_ok=True)  # PEFT's model card; the released folder has none
    config_file = folder / "adapter_config.json"  # PEFT writes target_modules from a set: fix the order
    config = json.loads(config_file.read_text())
    config["target_modules"] = sorted(config["target_modules"])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --- the tokenizer --------------------------------------------------------------------------------


def _train_tokenizer():
    """A SentencePiece-style Unigram tokenizer trained in memory on the template, the negative
    prompt and ``COMMON_WORDS``, wrapped as a ``PreTrainedTokenizerFast``.

    The tokenizers trainer is not deterministic (hash-map order moves its scores by up to
    ~2e-4), so only its piece set is kept and each piece is scored by its log frequency as a
    substring of the training words: same pieces, same scores, same bytes on every run.
    """
    corpus = [ORBIT_PROMPT_TEMPLATE.format(prompt="a red cube on a wooden table"), OFFICIAL_NEGATIVE_PROMPT,
              *COMMON_WORDS]
    trained = unigram_tokenizer()
    pieces = trained_pieces(trained, corpus, vocab_size=1000)
    vocab = [(t, 0.0) for t in SPECIAL_TOKENS] + _score_pieces(pieces, _pretokenized_words(trained, corpus))
    return fast_tokenizer(unigram_tokenizer(vocab))


def unigram_tokenizer(vocab: list[tuple[str, float]] | None = None):
    """A ``tokenizers.Tokenizer`` with a Unigram model (untrained if ``vocab`` is None; ids in
    ``vocab`` order, ``<unk>`` at ``SPECIAL_TOKENS``' index) and SentencePiece-style text handling:
    NFKC, runs of spaces collapsed, ``▁`` marking each space-separated word."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    model = models.Unigram() if vocab is None else models.Unigram(vocab, unk_id=SPECIAL_TOKENS.index("<unk>"),
                                                                  byte_fallback=False)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    return tok


def trained_pieces(tok, corpus: list[str], *, vocab_size: int) -> list[str]:
    """The sorted piece set (special tokens excluded) the Unigram trainer learns on ``corpus``
    with ``tok``'s text handling; its scores are dropped (they are not deterministic)."""
    from tokenizers import trainers

    tok.train_from_iterator(corpus, trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), unk_token="<unk>", show_progress=False))
    return sorted(set(tok.get_vocab()) - set(SPECIAL_TOKENS))


def fast_tokenizer(tok):
    """``tok`` (a scored Unigram from ``unigram_tokenizer``) with UMT5's special tokens and
    end-of-sequence post-processing, wrapped as a ``PreTrainedTokenizerFast`` (512 tokens, right padding)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   model_max_length=512, padding_side="right", truncation_side="right")


def _pretokenized_words(tok, corpus: list[str]) -> Counter:
    words: Counter = Counter()
    for text in corpus:
        normalized = tok.normalizer.normalize_str(text)
        words.update(word for word, _ in tok.pre_tokenizer.pre_tokenize_str(normalized))
    return words


def _score_pieces(pieces: list[str], words: Counter) -> list[tuple[str, float]]:
    """Each piece's log relative frequency as a substring of the words, most frequent first."""
    longest = max(map(len, pieces))
    substrings: Counter = Counter()
    for word, n in words.items():
        for i in range(len(word)):
            for j in range(i + 1, min(len(word), i + longest) + 1):
                substrings[word[i:j]] += n
    total = sum(substrings[p] for p in pieces)
    scored = [(p, round(math.log(max(substrings[p], 1) / total), 6)) for p in pieces]
    return sorted(scored, key=lambda item: (-item[1], item[0]))


# --- anysplat/ and anysplat_stitched.pth ----------------------------------------------------------


def _write_anysplat(folder: Path, cfg: DecoderConfig, seed: int) -> dict[str, torch.Tensor]:
    """The released AnySplat folder: hub config + random weights under the official names."""
    from safetensors.torch import save_file

    torch.manual_seed(seed * 100 + _SEED_OFFSETS["anysplat"])
    model = ReconstructionModel(cfg)
    _add_noise(model, seed, "anysplat")
    _sane_camera(model, cfg.architecture.cam_num_iterations)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(
        {"encoder_cfg": dataclasses.asdict(cfg.encoder), "decoder_cfg": cfg.decoder_cfg}, indent=2) + "\n")
    save_file(state, folder / "model.safetensors")
    return state


def _sane_camera(model: nn.Module, num_iterations: int) -> None:
    """Make the last pose layer small, with a bias that sums over the refinement iterations to
    quaternion ≈ identity and field of view ≈ 1 rad (pose encoding: T (3), quat xyzw (4), fov_h, fov_w):
    random poses put cameras anywhere, and an unusable camera makes every downstream number noise."""
    fc2 = model.get_submodule("encoder.camera_head.pose_branch.fc2")
    with torch.no_grad():
        fc2.weight.mul_(0.05)
        fc2.bias[3:6] = 0.0
        fc2.bias[6:9] = 1.0 / num_iterations  # quaternion w, fov_h, fov_w


def _stitched_checkpoint(cfg: DecoderConfig, base: dict[str, torch.Tensor], seed: int) -> dict:
    """The official training-save layout: LoRA A/B (and biases) of every targeted module of the
    stitched network, the stitching conv, and the three DINO special tokens."""
    torch.manual_seed(seed * 100 + _SEED_OFFSETS["stitched"])
    stitched = StitchedDecoder(cfg)  # real init of the stitching conv and the tokens
    generator = _generator(seed, "stitched")
    noisy = {k: v + NOISE_STD * torch.randn(v.shape, generator=generator)
             for k, v in stitched.state_dict().items() if k.startswith("stitching_layer.") or _is_dino_token(k)}
    base_name = stitched_names(base, cfg.stitching.stitched_layer_index)
    spec = parse_lora_spec(cfg.stitching.lora_config)
    lora: dict[str, torch.Tensor] = {}
    for name in lora_targets(stitched, spec):
        module = stitched.get_submodule(name)
        lora_A, lora_B = _lora_factors(module, spec.r, generator)
        lora[f"{name}.lora_A"] = lora_A
        if module.bias is not None:  # "lora_only" bias mode saves (trained) biases of LoRA layers
            bias = base[base_name[f"{name}.bias"]]
            lora[f"{name}.bias"] = bias + 0.01 * torch.randn(bias.shape, generator=generator)
        lora[f"{name}.lora_B"] = lora_B
    prefix = "encoder.aggregator.patch_embed."
    return {"lora": lora,
            "stitching_layer": {"weight": noisy["stitching_layer.weight"], "bias": noisy["stitching_layer.bias"]},
            "mask_token": noisy[prefix + "mask_token"], "cls_token": noisy[prefix + "cls_token"],
            "register_tokens": noisy[prefix + "register_tokens"]}


def _lora_factors(module: nn.Module, r: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Official shapes: Linear A (r, in), B (out, r); Conv2d (k x k) A (r·k, in·k), B (out·k, r·k).
    A gets LoRA's Kaiming-uniform init (bound 1/sqrt(fan_in)), B 0.03 x normal (non-zero)."""
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size[0]
        a_shape, b_shape = (r * k, module.in_channels * k), (module.out_channels * k, r * k)
    else:
        a_shape, b_shape = (r, module.in_features), (module.out_features, r)
    bound = 1.0 / math.sqrt(a_shape[1])
    lora_A = (torch.rand(a_shape, generator=generator) * 2 - 1) * bound
    return lora_A, 0.03 * torch.randn(b_shape, generator=generator)


def _is_dino_token(key: str) -> bool:
    return key.removeprefix("encoder.aggregator.patch_embed.") in ("mask_token", "cls_token", "register_tokens")


# --- helpers ---------------------------------------------------------------------------------------


def _generator(seed: int, component: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100 + 50 + _SEED_OFFSETS[component])


def _add_noise(model: nn.Module, seed: int, component: str) -> None:
    """0.02 x normal on every parameter, so no tensor is left all-zero (norm biases, zero-inits)."""
    generator = _generator(seed, component)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            param.add_(NOISE_STD * torch.randn(param.shape, generator=generator))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _move_into_place(staging: Path, target: Path) -> None:
    if target.exists():  # overwrite: swap the old folder out first, then drop it
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


# --- CLI -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vist3a_rt.testing.tiny_model",
                                     description="Write a tiny random VIST3A model folder (official layout).")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-lora", dest="with_lora", action="store_false", help="omit the lora/ adapter")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        path = write_tiny_model(args.out_dir, seed=args.seed, with_lora=args.with_lora, overwrite=args.overwrite)
    except (FileExistsError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"wrote {path} ({size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
