"""VIST3A-nano's video half: the official architectures (UMT5 encoder, Wan VAE, Wan transformer)
at toy sizes, a word-level tokenizer for the procedural world, and the official folder layout.

``NanoConfig.from_name("nano")`` is the shipped model; ``"micro"`` is for tests. The builders
return plain diffusers / transformers modules, so the trainers in ``vae.py`` and ``denoiser.py``
and the runtime (``WanGenerator.from_folder`` on what ``save_wan_folder`` writes) see exactly
the classes the official 1.3B model uses.

Sizes of ``"nano"`` and why. Timings: this 2-core CPU, float32, torch 2.13, median of 3–5;
"1 thread" numbers were taken while other jobs shared the machine (one thread is immune to
that; two OpenMP threads on a busy machine run up to 10x slower), "2 threads" on an idle one.

* Clips: 13 frames × 96×96 (the official 13 frames; 96 px is about the smallest size at which
  the world's primitives keep a recognisable shape and colour, and a multiple of 16 as the
  stitched decoder needs) → latent [16, 4, 12, 12] → 4·6·6 = **144 transformer tokens per
  clip** (the official 512² clip has 4096). Text: the runtime's fixed 512 positions, of which a
  world caption inside the orbit template uses ~40.
* Text encoder: UMT5, d_model 64, 2 layers, 4 heads (d_kv 16), gated-GELU d_ff 128, vocabulary
  = world words + orbit template + negative prompt (~250 pieces for a 30-word world):
  **0.1 M parameters**. It only has to tell a few dozen words apart and bind colour to shape
  by position; encoding one prompt takes 20 ms.
* VAE: ``AutoencoderKLWan``, z_dim 16, ``temperal_downsample`` [False, True, True] (4× time),
  dim_mult [1, 2, 4, 4] (8× space), base_dim 16, 1 res block per stage: **2.6 M parameters**.
  base_dim sets the cost (2 threads, idle; per clip in a batch of 2 / decode of one clip):
  8: 0.6 s / 0.25 s, 12: ~0.7 s / 0.4 s, 16: 0.95 s / 0.8 s, 24: 3.2 s / 1.4 s. 16 is the
  widest that keeps both training (1 thread: 3.1 s per step of 2 clips, 6.1 s per 4; ~1.7 h
  per 4k clips) and the decode (0.8 s) affordable; a second res block (3.6 M) cost +60 %.
* Transformer: ``WanTransformer3DModel``, patch (1, 2, 2), dim 128 (4 heads × 32), 4 layers,
  FFN 256, freq_dim 64, text_dim 64: **0.96 M parameters**. A training step on 8 clips takes
  0.27 s (1 thread; 0.19 s with 2 idle threads), with or without training the text encoder
  jointly, so 20k steps take 1–1.5 h (dim 192 / 6 layers: 3.3 M, 0.46 s; dim 256: 6.1 M,
  0.64 s). Sampling with CFG takes 0.5 s for 20 steps and 1.25 s for the official 50 (1 thread).
* Together: 3.6 M parameters, a 14.6 MB Wan folder (float32 safetensors), leaving most of
  the 40 MB budget to the reconstruction network; text + 20 steps + decode ≈ 1.3 s of the
  5 s generate budget.
* ``flow_shift`` 5.0, the official sampler's: the denoiser is trained with timesteps shifted the
  same way (``denoiser.py``), so the runtime's default sampler settings need no nano special case.

``"micro"`` (tests): 5 frames × 32×32 → latent [16, 2, 4, 4], 8 tokens; every width 4–32.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError
from ..generator.loading import WanComponents, set_offline_defaults
from ..generator.text import WORD, OFFICIAL_NEGATIVE_PROMPT, PROMPT_TEMPLATE, unknown_words, warn_unknown_words
from ..testing import tiny_model

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import PreTrainedTokenizerFast, UMT5EncoderModel

LATENT_CHANNELS = 16  # Wan 2.1's z_dim; the stitching layer and every checkpoint assume it
OPENING_MARKS = ("`", '"', "(", "[")  # split off word starts by the nano tokenizer's normaliser


@dataclass(frozen=True)
class NanoConfig:
    """Sizes of the three video-half networks and of the clips they work on."""

    # clips
    num_frames: int = 13
    height: int = 96
    width: int = 96
    # text encoder (UMT5)
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_ff: int = 128
    # VAE (AutoencoderKLWan): 8x space from len(dim_mult) - 1 = 3 stages, 4x time
    vae_base_dim: int = 16
    vae_dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    vae_res_blocks: int = 1
    # transformer (WanTransformer3DModel)
    dit_dim: int = 128
    dit_heads: int = 4
    dit_layers: int = 4
    dit_ffn: int = 256
    dit_freq_dim: int = 64
    # sampling (the official sampler's shift; training samples timesteps with it too)
    flow_shift: float = 5.0

    def __post_init__(self) -> None:
        if (self.num_frames - 1) % 4 or self.num_frames < 1:
            raise ConfigError(f"num_frames must be 4k+1 (the VAE compresses time by 4), got {self.num_frames}")
        for name in ("height", "width"):
            if getattr(self, name) % 16:
                raise ConfigError(f"{name} must be a multiple of 16 (VAE 8x, patch 2x), got {getattr(self, name)}")
        for name, dim, heads in (("text", self.text_dim, self.text_heads), ("dit", self.dit_dim, self.dit_heads)):
            if dim % heads:
                raise ConfigError(f"{name}_dim {dim} is not divisible by {name}_heads {heads}")
        if len(self.vae_dim_mult) != 4:
            raise ConfigError(f"vae_dim_mult needs 4 entries (3 downsampling stages = 8x), got {self.vae_dim_mult}")

    @classmethod
    def from_name(cls, name: str) -> "NanoConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown nano preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]

    def latent_shape(self, batch: int = 1) -> tuple[int, int, int, int, int]:
        """[B, 16, T_lat, h, w] of one batch of clips."""
        return (batch, LATENT_CHANNELS, (self.num_frames - 1) // 4 + 1, self.height // 8, self.width // 8)

    @property
    def tokens_per_clip(self) -> int:
        """Transformer sequence length of one clip (patch 1×2×2 over the latent)."""
        _, _, t, h, w = self.latent_shape()
        return t * (h // 2) * (w // 2)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "NanoConfig":
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown NanoConfig fields {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


PRESETS = {
    "nano": NanoConfig(),
    "micro": NanoConfig(num_frames=5, height=32, width=32, text_dim=32, text_layers=2, text_heads=4, text_ff=64,
                        vae_base_dim=4, dit_dim=32, dit_heads=2, dit_layers=2, dit_ffn=64, dit_freq_dim=32),
}


# --- the networks ----------------------------------------------------------------------------------


def build_text_encoder(config: NanoConfig, vocab_size: int, *, seed: int = 0) -> "UMT5EncoderModel":
    """A UMT5 encoder (the official Wan text encoder's class and options) at ``config``'s size."""
    set_offline_defaults()
    from transformers import UMT5Config, UMT5EncoderModel

    umt5 = UMT5Config(vocab_size=vocab_size, d_model=config.text_dim, d_kv=config.text_dim // config.text_heads,
                      d_ff=config.text_ff, num_layers=config.text_layers, num_heads=config.text_heads,
                      feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                      relative_attention_max_distance=128, dropout_rate=0.0, layer_norm_epsilon=1e-6,
                      scalable_attention=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    with _seeded(seed):
        return UMT5EncoderModel(umt5)


def build_vae(config: NanoConfig, *, seed: int = 0) -> "AutoencoderKLWan":
    """A Wan 2.1 VAE (z 16, 4x time, 8x space). Latent statistics start as mean 0 / std 1 (the
    identity normalisation) until ``vae.fit_latent_statistics`` measures them."""
    set_offline_defaults()
    from diffusers import AutoencoderKLWan

    with _seeded(seed):
        return AutoencoderKLWan(base_dim=config.vae_base_dim, z_dim=LATENT_CHANNELS, dim_mult=list(config.vae_dim_mult),
                                num_res_blocks=config.vae_res_blocks, attn_scales=[],
                                temperal_downsample=[False, True, True], latents_mean=[0.0] * LATENT_CHANNELS,
                                latents_std=[1.0] * LATENT_CHANNELS)


def build_transformer(config: NanoConfig, *, seed: int = 0) -> "WanTransformer3DModel":
    """A Wan 2.1 text-to-video transformer, patch (1, 2, 2), reading ``config.text_dim`` text features."""
    set_offline_defaults()
    from diffusers import WanTransformer3DModel

    with _seeded(seed):
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=config.dit_heads,
            attention_head_dim=config.dit_dim // config.dit_heads, in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS, text_dim=config.text_dim, freq_dim=config.dit_freq_dim,
            ffn_dim=config.dit_ffn, num_layers=config.dit_layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6)


def scheduler_config(config: NanoConfig) -> dict:
    """The official UniPC flow-matching scheduler's config at ``config.flow_shift``."""
    set_offline_defaults()
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=config.flow_shift, num_train_timesteps=1000)
    return dict(scheduler.config)


def build_components(config: NanoConfig, vocabulary: Iterable[str], *, seed: int = 0) -> WanComponents:
    """Tokenizer (trained on ``vocabulary``) and freshly initialised text encoder, transformer and VAE."""
    tokenizer = build_tokenizer(vocabulary)
    return WanComponents(tokenizer=tokenizer,
                         text_encoder=build_text_encoder(config, len(tokenizer), seed=seed + 1),
                         transformer=build_transformer(config, seed=seed + 2),
                         vae=build_vae(config, seed=seed + 3),
                         scheduler_config=scheduler_config(config))


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG for a module's initialisation, leaving the caller's RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --- the tokenizer ---------------------------------------------------------------------------------


def build_tokenizer(vocabulary: Iterable[str], *, subword_pieces: int = 256) -> "PreTrainedTokenizerFast":
    """A lower-casing SentencePiece-style Unigram tokenizer in which every word of ``vocabulary``
    (words or whole captions), of the orbit template and of the official negative prompt is one
    piece, and every other word still encodes (as sub-word pieces and single characters; no
    ``<unk>`` for printable ASCII).

    The piece set is the words, the Unigram trainer's sub-word pieces (``subword_pieces`` at
    most) and the characters; scores are deterministic (log frequencies, see tiny_model), and
    every sub-word / character piece is scored below the rarest word, so no split of a known
    word can outscore the word itself.
    """
    text = [*vocabulary, PROMPT_TEMPLATE.format(prompt=""), OFFICIAL_NEGATIVE_PROMPT]
    tok = _lowercasing(tiny_model.unigram_tokenizer())
    words = Counter(w for line in text for w in WORD.findall(tok.normalizer.normalize_str(line)))
    if not words:
        raise ConfigError("the tokenizer vocabulary holds no words")
    word_pieces = {f"▁{w}": n for w, n in words.items()}
    corpus = [" ".join(words.elements()), *text]
    others = set(tiny_model.trained_pieces(tok, corpus, vocab_size=len(word_pieces) + subword_pieces))
    others |= {c for line in corpus for c in tok.normalizer.normalize_str(line)} | set(_ascii_characters())
    others |= {"▁", *(f"▁{c}" for c in OPENING_MARKS)}
    others -= set(word_pieces) | {" "}
    vocab = _scored_vocab(word_pieces, sorted(others), tok, corpus)
    return tiny_model.fast_tokenizer(_lowercasing(tiny_model.unigram_tokenizer(vocab)))


def _lowercasing(tok):
    """``tok`` with lower-casing after its normaliser ("Red cube" and "red cube" are one prompt) and
    opening quotes / brackets set apart, so that the template's `` `{prompt}` `` leaves the
    prompt's first word a whole word."""
    from tokenizers import Regex, normalizers

    tok.normalizer = normalizers.Sequence([
        tok.normalizer, normalizers.Lowercase(), *(normalizers.Replace(c, f" {c} ") for c in OPENING_MARKS),
        normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip()])
    return tok


def _ascii_characters() -> list[str]:
    return [chr(c) for c in range(33, 127) if not chr(c).isupper()]


def _scored_vocab(word_pieces: dict[str, int], others: list[str], tok, corpus: list[str]) -> list[tuple[str, float]]:
    """Special tokens, then words by log frequency, then the other pieces shifted below the rarest word."""
    total = sum(word_pieces.values())
    words = sorted(((p, round(math.log(n / total), 6)) for p, n in word_pieces.items()), key=lambda x: (-x[1], x[0]))
    floor = words[-1][1] - 1.0
    scored = tiny_model._score_pieces(others, tiny_model._pretokenized_words(tok, corpus))
    return [(t, 0.0) for t in tiny_model.SPECIAL_TOKENS] + words + [(p, round(s + floor, 6)) for p, s in scored]


# --- the official folder ---------------------------------------------------------------------------


def save_wan_folder(components: WanComponents, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``components`` as ``WanPipeline.save_pretrained`` does (the released diffusers layout,
    safetensors), atomically: a reader never sees a half-written folder. Loads back with
    ``WanGenerator.from_folder(path)``."""
    set_offline_defaults()
    from diffusers import UniPCMultistepScheduler, WanPipeline

    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists (pass overwrite=True to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o777 & ~tiny_model._umask())
    try:
        pipe = WanPipeline(tokenizer=components.tokenizer, text_encoder=components.text_encoder,
                           vae=components.vae, transformer=components.transformer,
                           scheduler=UniPCMultistepScheduler.from_config(components.scheduler_config))
        with tiny_model._no_progress_bars():
            pipe.save_pretrained(staging, safe_serialization=True)
        tiny_model._name_tokenizer_class(staging)
        tiny_model._move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def parameter_counts(components: WanComponents) -> dict[str, int]:
    """Parameters of each network (for logs and the manifest)."""
    return {name: sum(p.numel() for p in getattr(components, name).parameters())
            for name in ("text_encoder", "transformer", "vae")}


__all__ = ["NanoConfig", "PRESETS", "LATENT_CHANNELS", "build_text_encoder", "build_vae", "build_transformer",
           "build_tokenizer", "build_components", "scheduler_config", "unknown_words", "warn_unknown_words",
           "save_wan_folder", "parameter_counts"]
