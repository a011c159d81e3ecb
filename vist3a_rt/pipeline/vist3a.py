"""``Vist3A``: prompt → Wan latents → stitched AnySplat decoder → Gaussian scene.

The loop is visible and numbered, diffusers-style; every stage is timed.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..decoder import DecoderConfig, StitchedDecoder
from ..decoder.loading import load_stitched_decoder, resolve_config
from ..errors import Vist3AInputError
from ..models import EMBEDDED_MODELS, embedded_model
from .model_folder import ModelPaths
from .result import GenerationResult



@dataclass
class GenerationSettings:
    """What a generation depends on besides the prompt; defaults are the official values."""

    num_steps: int = 50
    guidance_scale: float = 7.5
    sampler: str = "unipc"
    flow_shift: float = 5.0
    num_frames: int = 13
    height: int = 512
    width: int = 512
    negative_prompt: str | None = None  # None: the official negative prompt
    use_prompt_template: bool = True


class Vist3A:
    """A loaded text-to-3D model: ``Vist3A.load(source).generate(prompt, seed=0)``."""

    def __init__(self, generator, decoder: StitchedDecoder, *, source: str, device: torch.device,
                 dtype: torch.dtype, defaults: GenerationSettings) -> None:
        self.generator = generator
        self.decoder = decoder
        self.source = source
        self.device = device
        self.dtype = dtype
        self.defaults = defaults

    # --- loading -----------------------------------------------------------------------------

    @classmethod
    def load(cls, source: str | Path = "nano", *, backend: str = "auto", device: str = "cpu",
             dtype: torch.dtype = torch.float32, use_lora: bool = True, wan_impl: str | None = None,
             **paths) -> "Vist3A":
        """Load from a model folder laid out as released (see ``ModelPaths``), optionally with
        explicit ``wan=``, ``lora=``, ``anysplat=``, ``stitched=``, ``config=`` paths; or
        ``source=None`` with all explicit paths. A bundle directory (``vist3a-rt export``) loads
        through ``vist3a_rt.bundle`` (backends "onnxruntime", "torch"; "auto" picks onnxruntime).

        ``wan_impl``: which classes run the Wan video half of a model folder: "native" (the
        runtime's own torch modules; no diffusers/transformers/peft import: the fast cold start,
        inference only) or "diffusers" (the library classes: the reference, and what training,
        evaluation and export build on; needed for gradients through the VAE). Default: the
        ``VIST3A_WAN_IMPL`` environment variable, else "native"."""
        from ..bundle.format import is_bundle

        if source is not None and source not in EMBEDDED_MODELS and is_bundle(source):
            from ..bundle import load_bundle

            return load_bundle(source, backend=backend, device=device, dtype=dtype, **paths)
        if backend not in ("auto", "torch"):
            raise Vist3AInputError(f"backend {backend!r} needs an exported bundle (`vist3a-rt export --checkpoint "
                                   f"{source} --out BUNDLE`, then load BUNDLE); a model folder runs on 'torch'")
        from ..generator.loading import resolve_impl

        wan_impl = resolve_impl(wan_impl, default="native")
        model_paths = _resolve_paths(source, paths)
        torch_device = _check_device(device)
        from ..generator import WanGenerator  # diffusers/transformers load lazily, and only for impl="diffusers"

        timings: dict[str, float] = {}
        with _timed(timings, "load_generator"):
            generator = WanGenerator.from_folder(model_paths.wan, model_paths.lora if use_lora else None,
                                                 dtype=dtype, device=torch_device, impl=wan_impl)
        with _timed(timings, "load_decoder"):
            config = resolve_config(model_paths.config, model_paths.anysplat)
            decoder = load_stitched_decoder(config, model_paths.anysplat, model_paths.stitched,
                                            dtype=dtype, device=torch_device)
        model = cls(generator, decoder, source=str(source), device=torch_device, dtype=dtype,
                    defaults=_defaults_from(config))
        model.closed_vocabulary = _closed_vocabulary(model_paths)
        model.load_timings = timings
        return model

    # --- generation --------------------------------------------------------------------------

    def generate(self, prompt: str, *, seed: int = 0, latents: torch.Tensor | None = None,
                 progress: bool = False, **overrides) -> GenerationResult:
        settings = self._settings(overrides)
        timings: dict[str, float] = {}
        _check_prompt(prompt)
        with torch.inference_mode():
            # 1. encode the (template-wrapped) prompt; the negative prompt's embedding is cached
            with _timed(timings, "text"):
                prompt_embeds, negative_embeds = self._encode(prompt, settings)
            # 2. denoise from seeded noise (or the given initial latents)
            with _timed(timings, "denoise"):
                final_latents = self._denoise(prompt_embeds, negative_embeds, settings, seed, latents, progress)
            # 3. de-normalize with the VAE statistics
            latent = self.generator.denormalize(final_latents)
            # 4. decode frames with the VAE, resize them to the decoder's input resolution
            with _timed(timings, "vae_decode"):
                frames = self.generator.decode(latent)
                frames = self.generator.resize_frames(frames, self.decoder.frame_size(tuple(latent.shape[-2:])))
            # 5. stitched decoder: latents + frames → Gaussians and cameras
            with _timed(timings, "decode_3d"):
                output = self.decoder(latent, frames)
            # 6. the scene, pruned of Gaussians that can never be seen
            scene, cameras = output.to_scene().prune(), output.cameras()
        timings["total"] = sum(timings.values())
        return GenerationResult(prompt=prompt, scene=scene, cameras=cameras, timings=timings,
                                settings={**asdict(settings), "seed": seed, "model": self.source,
                                          "backend": "torch", "device": str(self.device),
                                          "dtype": str(self.dtype).removeprefix("torch.")},
                                seed=seed, latents=final_latents, frames=frames)

    def _settings(self, overrides: dict) -> GenerationSettings:
        unknown = set(overrides) - set(GenerationSettings.__dataclass_fields__)
        if unknown:
            raise Vist3AInputError(f"unknown generation settings {sorted(unknown)}")
        values = {**asdict(self.defaults), **{k: v for k, v in overrides.items() if v is not None}}
        return GenerationSettings(**values)

    closed_vocabulary = False  # a model trained on a fixed word list (nano): warn about other words

    def _encode(self, prompt: str, settings: GenerationSettings):
        from ..generator.text import OFFICIAL_NEGATIVE_PROMPT, wrap_prompt

        if self.closed_vocabulary:
            from ..generator.text import warn_unknown_words

            warn_unknown_words(self.generator.components.tokenizer, prompt)

        text = wrap_prompt(prompt) if settings.use_prompt_template else prompt
        negative = OFFICIAL_NEGATIVE_PROMPT if settings.negative_prompt is None else settings.negative_prompt
        return self.generator.encode_prompt([text]), self.generator.encode_prompt([negative], allow_empty=True)

    def _denoise(self, prompt_embeds, negative_embeds, settings, seed, latents, progress):
        bar = _progress_bar(settings.num_steps) if progress else None
        try:
            return self.generator.sample(
                prompt_embeds, negative_embeds, num_frames=settings.num_frames, height=settings.height,
                width=settings.width, num_steps=settings.num_steps, guidance_scale=settings.guidance_scale,
                sampler=settings.sampler, flow_shift=settings.flow_shift, seed=seed, latents=latents,
                callback=None if bar is None else (lambda *args, **kwargs: bar.update(1)))
        finally:
            if bar is not None:
                bar.close()


def _resolve_paths(source, paths: dict) -> ModelPaths:
    if source in EMBEDDED_MODELS:
        return ModelPaths.from_folder(embedded_model(source)).with_overrides(**paths)
    if source is None:
        return ModelPaths.explicit(**paths)
    return ModelPaths.from_folder(source).with_overrides(**paths)


def _closed_vocabulary(paths: ModelPaths) -> bool:
    """Nano-style models record in their manifest that their tokenizer knows only the world's words."""
    import json

    manifest = paths.wan.parent / "manifest.json"
    try:
        return json.loads(manifest.read_text()).get("model") == "vist3a-nano"
    except (OSError, ValueError, AttributeError):
        return False


def _defaults_from(config: DecoderConfig) -> GenerationSettings:
    res = config.resolutions
    return GenerationSettings(num_frames=res.num_frames, height=res.vae_resolution, width=res.vae_resolution)


def _check_device(device: str) -> torch.device:
    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise Vist3AInputError(f"bad device {device!r}: {err}") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise Vist3AInputError("device 'cuda' requested but CUDA is not available on this machine")
    return torch_device


def _check_prompt(prompt) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise Vist3AInputError("the prompt is empty")


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="denoising", unit="step", leave=False)


@contextmanager
def _timed(timings: dict, stage: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
