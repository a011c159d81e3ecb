"""``BundlePipeline``: an exported bundle run through onnxruntime, with core dependencies only.

The same ``generate()`` contract and ``GenerationResult`` as the torch pipeline (``Vist3A``), and
the same steps; what runs them differs:

1. prompt → cleaned, template-wrapped text → ids (``tokenizers``, ``bundle.text``) → the
   text-encoder graph → its used positions (``bundle.context``) → the denoiser-context graph
   (every block's cross-attention keys and values); both cached per exact string, the default
   negative prompt's embedding comes from the bundle;
2. seeded noise (``initial_noise``, same numbers as the torch path) → the flow sampler
   (``bundle.samplers``) stepping on the CFG-batched denoiser-step graph;
3. de-normalisation with the bundle's VAE latent statistics;
4. the VAE-decoder graph, then the frames resized to the stitched decoder's input (torch);
5. the stitched-decoder graph → per-pixel Gaussians and cameras;
6. the scene, pruned of Gaussians that can never be seen.

Sizes: the bundle's graphs fix the frame count (the VAE decoder unrolls its frame loop) and the
frame size (the stitched decoder's spatial size); other sizes are refused with a precise error.

Nothing on this path imports diffusers or transformers (a test checks ``sys.modules``).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch

from ..errors import Vist3AInputError
from ..generator import latents as latent_ops
from ..generator.sampling import apply_guidance, check_initial_latents, check_steps_and_guidance, initial_noise
from ..generator.text import check_prompts, warn_unknown_words, wrap_prompt
from ..pipeline.result import GenerationResult
from ..pipeline.vist3a import GenerationSettings, _check_prompt, _progress_bar, _timed
from ..scene import Cameras, GaussianScene
from . import context as text_context
from .format import read_manifest
from .samplers import make_sampler
from .text import BundleTokenizer, clean_prompt
from .weights import load_state


class BundlePipeline:
    """A loaded bundle: ``BundlePipeline.load(bundle).generate(prompt, seed=0)``."""

    backend_name = "onnxruntime"

    def __init__(self, root: Path, manifest: dict, backend, tokenizer: BundleTokenizer, *, device: str,
                 cache_size: int = 16) -> None:
        self.root, self.manifest, self.backend, self.tokenizer = root, manifest, backend, tokenizer
        self.source = str(root)
        self.device = torch.device(device)
        self.dtype = torch.float32  # graph inputs and outputs are float32 at every bundle precision
        generation = manifest["generation"]
        self.defaults = GenerationSettings(**generation["defaults"])
        self.closed_vocabulary = generation["closed_vocabulary"]
        self.max_sequence_length = generation["max_sequence_length"]
        self.latent_shape = tuple(generation["latent_shape"])
        self.frame_size = tuple(generation["frame_size"])
        latents = manifest["latents"]
        self.latent_statistics = SimpleNamespace(z_dim=latents["z_dim"], latents_mean=latents["mean"],
                                                 latents_std=latents["std"])
        self.scheduler_config = json.loads((root / manifest["scheduler"]).read_text())
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()  # prompt → embeddings [1, L, D]
        self._contexts: dict[str, tuple[torch.Tensor, int]] = {}  # prompt → (context, used length), same keys
        negative = manifest["negative_prompt"]
        self._remember(negative["text"], load_state(root / negative["file"])["embedding"][None])
        self.load_timings: dict[str, float] = {}

    @classmethod
    def load(cls, bundle: str | Path, *, device: str = "cpu", providers=None,
             intra_op_threads: int | None = None) -> BundlePipeline:
        """Open ``bundle`` with one onnxruntime session per stage (``device``: "cpu" or "cuda")."""
        from vist3a_rt.export.spec import ExportContract

        from ..backends.onnxruntime_backend import OnnxRuntimeBackend

        timings: dict[str, float] = {}
        root = Path(bundle)
        with _timed(timings, "manifest"):
            manifest = read_manifest(root)
        with _timed(timings, "sessions"):
            artifacts = manifest["artifacts"]
            models = {name: SimpleNamespace(path=root / stage["onnx"], sha256=artifacts[stage["onnx"]]["sha256"],
                                            contract=ExportContract.from_dict(stage["contract"]))
                      for name, stage in manifest["stages"].items()}
            backend = OnnxRuntimeBackend(models, device=device, providers=providers,
                                         intra_op_threads=intra_op_threads)
        with _timed(timings, "tokenizer"):
            tokenizer = BundleTokenizer(root / manifest["tokenizer"])
        model = cls(root, manifest, backend, tokenizer, device=device)
        model.load_timings = timings
        return model

    # --- generation ------------------------------------------------------------------------------

    def generate(self, prompt: str, *, seed: int = 0, latents: torch.Tensor | None = None,
                 progress: bool = False, **overrides) -> GenerationResult:
        settings = self._settings(overrides)
        timings: dict[str, float] = {}
        _check_prompt(prompt)
        self._check_size(settings)
        check_steps_and_guidance(settings.num_steps, settings.guidance_scale)
        with torch.inference_mode():
            # 1. encode the (template-wrapped) prompt into the denoiser context; the negative prompt's is cached
            with _timed(timings, "text"):
                context, log_counts = text_context.join(self._encode(prompt, settings), self.max_sequence_length)
            # 2. denoise from seeded noise (or the given initial latents)
            with _timed(timings, "denoise"):
                final_latents = self._denoise(context, log_counts, settings, seed, latents, progress)
            # 3. de-normalize with the VAE statistics
            latent = latent_ops.denormalize(final_latents, self.latent_statistics)
            # 4. decode frames with the VAE, resize them to the decoder's input resolution
            with _timed(timings, "vae_decode"):
                frames = self.backend.run("vae_decoder", {"latents": latent})["frames"]
                frames = latent_ops.resize_frames(frames, self.frame_size)
            # 5. stitched decoder: latents + frames → Gaussians and cameras
            with _timed(timings, "decode_3d"):
                output = self.backend.run("stitched_decoder", {"latent": latent, "frames": frames})
            # 6. the scene, pruned of Gaussians that can never be seen
            scene, cameras = scene_of(output).prune(), cameras_of(output, self.frame_size)
        timings["total"] = sum(timings.values())
        return GenerationResult(prompt=prompt, scene=scene, cameras=cameras, timings=timings,
                                settings={**asdict(settings), "seed": seed, "model": self.source,
                                          "backend": self.backend_name, "device": str(self.device),
                                          "dtype": "float32", "bundle_precision": self.manifest["precision"]},
                                seed=seed, latents=final_latents, frames=frames)

    def _settings(self, overrides: dict) -> GenerationSettings:
        unknown = set(overrides) - set(GenerationSettings.__dataclass_fields__)
        if unknown:
            raise Vist3AInputError(f"unknown generation settings {sorted(unknown)}")
        return GenerationSettings(**{**asdict(self.defaults), **{k: v for k, v in overrides.items() if v is not None}})

    def _check_size(self, settings: GenerationSettings) -> None:
        fixed = (self.defaults.num_frames, self.defaults.height, self.defaults.width)
        asked = (settings.num_frames, settings.height, settings.width)
        if asked != fixed:
            raise Vist3AInputError(
                f"this bundle was exported for {fixed[0]} frames of {fixed[1]}x{fixed[2]} px, got {asked[0]} frames "
                f"of {asked[1]}x{asked[2]}: its graphs fix the frame count (the VAE decoder's frame loop is "
                "unrolled) and the frame size (the stitched decoder's); use backend='torch' or re-export")

    # --- text ------------------------------------------------------------------------------------

    def _encode(self, prompt: str, settings: GenerationSettings) -> list[tuple[torch.Tensor, int]]:
        """The denoiser contexts of the CFG batch: [cond] or [cond, uncond] (see ``_context``)."""
        if self.closed_vocabulary:
            warn_unknown_words(self.tokenizer, prompt)
        contexts = [self._context(wrap_prompt(prompt) if settings.use_prompt_template else prompt)]
        if settings.guidance_scale > 1.0:
            negative = self.manifest["negative_prompt"]["text"] if settings.negative_prompt is None \
                else settings.negative_prompt
            contexts.append(self._context(negative, allow_empty=True))
        return contexts

    def encode_prompt(self, prompt: str, *, allow_empty: bool = False) -> torch.Tensor:
        """Text embeddings [1, L, D] of one prompt (cached per exact string)."""
        (prompt,) = check_prompts(prompt, allow_empty=allow_empty)
        if prompt in self._cache:
            self._cache.move_to_end(prompt)
            return self._cache[prompt]
        ids, mask = self.tokenizer.encode([clean_prompt(prompt)], self.max_sequence_length)
        embedding = self.backend.run("text_encoder", {"input_ids": ids, "attention_mask": mask})["embeddings"]
        self._remember(prompt, embedding)
        return embedding

    def _context(self, prompt: str, *, allow_empty: bool = False) -> tuple[torch.Tensor, int]:
        """The denoiser context [1, K, C] of a prompt's used positions and their count (cached
        with its embedding)."""
        embedding = self.encode_prompt(prompt, allow_empty=allow_empty)
        if prompt not in self._contexts:
            trimmed, used = text_context.trim(embedding)
            context = self.backend.run("denoiser_context", {"encoder_hidden_states": trimmed})["context"]
            self._contexts[prompt] = (context, used)
        return self._contexts[prompt]

    def _remember(self, prompt: str, embedding: torch.Tensor) -> None:
        self._cache[prompt] = embedding
        self._contexts.pop(prompt, None)
        while len(self._cache) > max(self.cache_size, 1):
            self._contexts.pop(self._cache.popitem(last=False)[0], None)

    # --- denoising -------------------------------------------------------------------------------

    def _denoise(self, context, log_counts, settings: GenerationSettings, seed, latents, progress):
        sampler = make_sampler(settings.sampler, settings.num_steps, settings.flow_shift, self.scheduler_config)
        if latents is None:
            latents = initial_noise(self.latent_shape, seed, "cpu")
        else:
            check_initial_latents(latents, self.latent_shape)
            latents = latents.to("cpu", torch.float32)
        bar = _progress_bar(settings.num_steps) if progress else None
        try:
            for t in sampler.timesteps:
                hidden = latents.repeat(context.shape[0], 1, 1, 1, 1)
                timestep = t.to(torch.float32).expand(hidden.shape[0]).contiguous()
                velocity = self.backend.run("denoiser", {"latents": hidden, "timestep": timestep, "context": context,
                                                         "context_log_counts": log_counts})["velocity"]
                latents = sampler.step(apply_guidance(velocity, latents.shape[0], settings.guidance_scale), latents)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return latents


def scene_of(output: dict, batch_index: int = 0) -> GaussianScene:
    """The stitched-decoder graph's per-pixel Gaussians as a scene (as ``DecoderOutput.to_scene``:
    w-first quaternions, SH coefficients [N, K, 3])."""
    xyzw = output["rotations"][batch_index]
    return GaussianScene.from_unnormalized(
        means=output["means"][batch_index], scales=output["scales"][batch_index],
        rotations=torch.cat([xyzw[:, 3:], xyzw[:, :3]], dim=-1),
        sh=output["harmonics"][batch_index].transpose(-1, -2).contiguous(),
        # onnxruntime's vectorised sigmoid can land an ulp above 1 (seen: 1.0000001 at 2 threads)
        opacities=output["opacities"][batch_index].clamp(0.0, 1.0))


def cameras_of(output: dict, frame_size: tuple[int, int], batch_index: int = 0) -> Cameras:
    H, W = frame_size
    return Cameras.from_normalized(output["extrinsics"][batch_index], output["intrinsics"][batch_index], W, H)
