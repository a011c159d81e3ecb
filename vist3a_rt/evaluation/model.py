"""The model under evaluation: the runtime (Wan generator + stitched decoder) and the unstitched
reconstruction network it was stitched from, loaded once from a model folder in the released
layout (``pipeline.model_folder``), with the sizes its config gives."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..decoder.config import DecoderConfig
from ..decoder.loading import load_reconstruction_model, resolve_config
from ..decoder.network import ReconstructionModel, StitchedDecoder
from ..errors import ConfigError
from ..models import EMBEDDED_MODELS, MANIFEST, embedded_model
from ..pipeline.model_folder import ModelPaths
from ..pipeline.vist3a import Vist3A


@dataclass(frozen=True)
class ModelSizes:
    """Where each half of the model works: the video (VAE) size, the network's input size, frames."""

    video: int  # resolutions.vae_resolution: world clips are rendered here for the VAE
    network: int  # resolutions.feedforward_resolution: the reconstruction network's input
    frames: int  # resolutions.num_frames

    @classmethod
    def from_config(cls, config: DecoderConfig) -> ModelSizes:
        res = config.resolutions
        return cls(res.vae_resolution, res.feedforward_resolution, res.num_frames)


@dataclass
class EvalModel:
    source: str
    paths: ModelPaths
    config: DecoderConfig
    runtime: Vist3A  # text → latents → stitched decoder (``runtime.decoder``), VAE in ``runtime.generator``
    reconstruction: ReconstructionModel  # the unstitched network: frames in
    load_seconds: float

    @property
    def vae(self):
        return self.runtime.generator.vae

    @property
    def stitched(self) -> StitchedDecoder:
        return self.runtime.decoder

    @property
    def sizes(self) -> ModelSizes:
        return ModelSizes.from_config(self.config)

    @property
    def background(self) -> torch.Tensor:  # [3] the decoder's render background
        return torch.tensor(self.config.decoder_cfg.get("background_color", [1.0, 1.0, 1.0]), dtype=torch.float32)

    @property
    def manifest(self) -> dict:
        """What the folder's ``manifest.json`` (written by the nano recipe) says the model is; {} without one."""
        try:
            manifest = json.loads((self.paths.stitched.parent / MANIFEST).read_text())
        except (OSError, ValueError):
            return {}
        return {key: manifest[key] for key in ("model", "reward_finetuned") if key in manifest}

    @property
    def layer_search_file(self) -> Path:
        """Where the layer-search table lives when the folder has one: beside the weights."""
        return self.paths.stitched.parent / "layer_search.json"


def model_paths(source: str | Path) -> ModelPaths:
    """The pieces of an embedded model ("nano") or of a model folder, as ``Vist3A.load`` finds them."""
    if str(source) in EMBEDDED_MODELS:
        return ModelPaths.from_folder(embedded_model(str(source)))
    return ModelPaths.from_folder(source)


def load_eval_model(source: str | Path, *, device: str = "cpu") -> EvalModel:
    """Everything the evaluation runs, from one model folder; checks that its sizes agree."""
    paths = model_paths(source)
    start = time.perf_counter()
    runtime = Vist3A.load(str(source), device=device, wan_impl="diffusers")  # the evaluation encodes with the VAE
    config = resolve_config(paths.config, paths.anysplat)
    reconstruction = load_reconstruction_model(config, paths.anysplat, device=device).requires_grad_(False)
    model = EvalModel(str(source), paths, config, runtime, reconstruction, time.perf_counter() - start)
    _check_sizes(model)
    return model


def _check_sizes(model: EvalModel) -> None:
    sizes, vae_config = model.sizes, model.vae.config
    spatial = vae_config.scale_factor_spatial
    if sizes.video % spatial:
        raise ConfigError(f"vae_resolution {sizes.video} is not a multiple of the VAE's factor {spatial}")
    frame = model.stitched.frame_size((sizes.video // spatial,) * 2)
    if frame != (sizes.network, sizes.network):
        raise ConfigError(f"feedforward_resolution {sizes.network} disagrees with the stitched decoder, which "
                          f"reads {frame[0]}x{frame[1]} frames for {sizes.video} px video")
    if (sizes.frames - 1) % vae_config.scale_factor_temporal:
        raise ConfigError(f"num_frames {sizes.frames} is not {vae_config.scale_factor_temporal}k+1")


__all__ = ["EvalModel", "ModelSizes", "load_eval_model", "model_paths"]
