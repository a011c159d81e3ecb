"""Reward functions for reward fine-tuning of the video denoiser (see ``training.reward``).

A reward is ``Reward(name, weight, fn)``: ``fn(context) -> scalar tensor``, **higher is better**,
differentiable in whatever it reads from the ``RewardContext`` (one rollout's prompts, decoded
frames, stitched-decoder output and rendered views). The trainer minimises
``-Σ weight · reward``; a reward may ignore any part of the context.

Built in:

* ``consistency``: 3D consistency — the views rendered from the predicted Gaussians at the
  predicted cameras against the VAE-decoded frames of the same views (PSNR or negative MSE).
* ``faithfulness``: prompt faithfulness from an ``AttributeClassifier`` (a small CNN that
  predicts which colours and shapes an image shows), scored against the attributes a
  caller-supplied parser reads from the prompt.

The official recipe scores renders and one decoded frame with PickScore + a CLIP model; those
need web-scale weights, so these two stand in for them at nano scale (documented in
``training.reward``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError, Vist3AInputError

if TYPE_CHECKING:
    from ..decoder.network import DecoderOutput


@dataclass
class RewardContext:
    """Everything one rollout produced, for the reward functions. B prompts, V rendered views.

    Every tensor carries the graph back to the trainable LoRA weights (frames and renders both).
    """

    prompts: list[str]  # as given to the trainer (what a prompt parser should read)
    texts: list[str]  # what the text encoder saw (after the prompt template)
    latents: Tensor  # [B, 16, T_lat, h, w] final latents, diffusion-space (normalised)
    vae_latents: Tensor  # [B, 16, T_lat, h, w] de-normalised (what the VAE and decoder read)
    frames: Tensor  # [B, 3, T, H, W] in [-1, 1], VAE-decoded, resized to the decoder's input
    decoded: "DecoderOutput"  # Gaussians [B, N, ...], cameras [B, T, ...] of the stitched decoder
    view_indices: Tensor  # [V] int64: the frames whose cameras were rendered
    views: Tensor  # [B, V, 3, h, w] in [0, 1]: renders at the predicted cameras
    view_frames: Tensor  # [B, V, 3, h, w] in [0, 1]: the decoded frames of those views, resized to h x w
    view_alpha: Tensor  # [B, V, 1, h, w] accumulated opacity of the renders
    step: int = 0  # the trainer's optimisation step


RewardFn = Callable[[RewardContext], Tensor]


@dataclass(frozen=True)
class Reward:
    """A named, weighted reward: ``fn(context)`` returns a scalar tensor, higher is better."""

    name: str
    weight: float
    fn: RewardFn

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", self.name):
            raise Vist3AInputError(f"reward name must be a non-empty word ([A-Za-z0-9_-]), got {self.name!r}")
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight)):
            raise Vist3AInputError(f"reward {self.name!r}: weight must be a finite number, got {self.weight!r}")
        if not callable(self.fn):
            raise Vist3AInputError(f"reward {self.name!r}: fn must be callable, got {type(self.fn).__name__}")

    def __call__(self, context: RewardContext) -> Tensor:
        value = self.fn(context)
        if not isinstance(value, Tensor) or value.numel() != 1:
            shape = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise Vist3AInputError(f"reward {self.name!r} must return a scalar tensor, got {shape}")
        return value.reshape(())


# --- 3D consistency ------------------------------------------------------------------------


CONSISTENCY_METRICS = ("psnr", "neg_mse")


def consistency_reward(views: Tensor,  # [..., 3, h, w] in [0, 1] rendered
                       frames: Tensor,  # [..., 3, h, w] in [0, 1] decoded, same views
                       metric: str = "psnr") -> Tensor:  # []
    """Agreement of renders and decoded frames, averaged over views.

    ``"psnr"``: mean over views of ``-10 log10(MSE)`` (peak 1; MSE floored at 1e-10);
    ``"neg_mse"``: ``-MSE`` over all pixels.
    """
    if metric not in CONSISTENCY_METRICS:
        raise Vist3AInputError(f"unknown consistency metric {metric!r}; choose one of {CONSISTENCY_METRICS}")
    if views.shape != frames.shape or views.dim() < 3 or views.shape[-3] != 3:
        raise Vist3AInputError(f"views {list(views.shape)} and frames {list(frames.shape)} must both be "
                               "[..., 3, h, w] of one shape")
    squared = (views.float() - frames.float()).square()
    if metric == "neg_mse":
        return -squared.mean()
    per_view = squared.flatten(-3).mean(-1).clamp_min(1e-10)
    return (-10.0 * torch.log10(per_view)).mean()


def consistency(weight: float = 1.0, metric: str = "psnr", *, name: str = "consistency") -> Reward:
    """The 3D-consistency reward on a rollout: ``context.views`` against ``context.view_frames``."""
    if metric not in CONSISTENCY_METRICS:
        raise Vist3AInputError(f"unknown consistency metric {metric!r}; choose one of {CONSISTENCY_METRICS}")
    return Reward(name, weight, lambda context: consistency_reward(context.views, context.view_frames, metric))


# --- prompt faithfulness -------------------------------------------------------------------


@dataclass(frozen=True)
class TargetAttributes:
    """What a prompt asks for: colour and shape class names (each listed once)."""

    colours: tuple[str, ...] = ()
    shapes: tuple[str, ...] = ()


class AttributeLogits(NamedTuple):
    colour: Tensor  # [N, num_colours]
    shape: Tensor  # [N, num_shapes]


class AttributeClassifier(nn.Module):
    """A small CNN: images [N, 3, H, W] in [0, 1] (any size ≥ 16) → colour and shape logits.

    Four stride-2 3x3 conv blocks (GroupNorm, SiLU), then average- and max-pooled features
    (max pooling keeps small objects visible) into two linear heads. ``multi_label``: each class
    is an independent present/absent probability (sigmoid; scenes of several objects), else
    one softmax distribution per head. The constructor arguments are the config
    (``config`` / ``save`` / ``load`` round-trip them).
    """

    def __init__(self, colours: Sequence[str], shapes: Sequence[str], *, width: int = 16,
                 multi_label: bool = True) -> None:
        super().__init__()
        self.colours, self.shapes = _class_names(colours, "colours"), _class_names(shapes, "shapes")
        if not isinstance(width, int) or width < 4 or width % 4:
            raise Vist3AInputError(f"width must be a positive multiple of 4, got {width!r}")
        self.width, self.multi_label = width, bool(multi_label)
        channels = (3, width, 2 * width, 4 * width, 4 * width)
        self.features = nn.Sequential(*(_conv_block(c_in, c_out) for c_in, c_out in zip(channels, channels[1:])))
        self.colour_head = nn.Linear(2 * channels[-1], len(self.colours))
        self.shape_head = nn.Linear(2 * channels[-1], len(self.shapes))

    @property
    def config(self) -> dict:
        return {"colours": list(self.colours), "shapes": list(self.shapes), "width": self.width,
                "multi_label": self.multi_label}

    def forward(self, images: Tensor) -> AttributeLogits:  # [N, 3, H, W] in [0, 1]
        if images.dim() != 4 or images.shape[1] != 3 or min(images.shape[-2:]) < 16:
            raise Vist3AInputError(f"images must be [N, 3, H, W] with H, W >= 16, got {list(images.shape)}")
        x = self.features(images.to(self.colour_head.weight.dtype) * 2 - 1)
        pooled = torch.cat([x.mean(dim=(-2, -1)), x.amax(dim=(-2, -1))], dim=1)
        return AttributeLogits(self.colour_head(pooled), self.shape_head(pooled))

    def log_probabilities(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """(log p(class), log p(not class)) per class; for softmax heads the second is unused."""
        if self.multi_label:
            return F.logsigmoid(logits), F.logsigmoid(-logits)
        log_p = logits.log_softmax(-1)
        return log_p, torch.log1p(-log_p.exp().clamp(max=1 - 1e-6))

    def targets(self, attributes: TargetAttributes) -> tuple[Tensor, Tensor]:
        """Multi-hot target vectors [num_colours], [num_shapes] for ``attributes``."""
        return (_multi_hot(attributes.colours, self.colours, "colour"),
                _multi_hot(attributes.shapes, self.shapes, "shape"))

    def save(self, folder: str | Path) -> Path:
        """``config.json`` + ``model.safetensors`` in ``folder`` (created)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(folder / "model.safetensors"))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "AttributeClassifier":
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            config = json.loads((folder / "config.json").read_text())
            model = cls(**config)
            model.load_state_dict(load_file(str(folder / "model.safetensors")))
        except (OSError, json.JSONDecodeError, TypeError, RuntimeError) as err:
            raise CheckpointError(f"cannot load an AttributeClassifier from {folder}: {err}") from None
        return model.eval()


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(4, c_out), nn.SiLU())


def _class_names(names: Sequence[str], what: str) -> tuple[str, ...]:
    names = tuple(names) if not isinstance(names, str) else ()
    if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise Vist3AInputError(f"{what} must be a non-empty list of distinct names, got {names!r}")
    return names


def _multi_hot(wanted: Sequence[str], names: tuple[str, ...], what: str) -> Tensor:
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise Vist3AInputError(f"unknown {what} classes {unknown}; the classifier knows {list(names)}")
    return torch.tensor([float(n in wanted) for n in names])


def faithfulness_reward(classifier: AttributeClassifier,
                        views: Tensor,  # [N, 3, H, W] in [0, 1]: images of one scene
                        target_attributes: TargetAttributes) -> Tensor:  # []
    """How well the images show what the prompt asks for, as a mean log-likelihood (≤ 0).

    Multi-label classifier: the negative binary cross-entropy against the multi-hot targets
    (prompted classes present, the others absent), averaged over classes, both heads and the
    images. Softmax classifier: the mean log-probability of the prompted classes. A head
    with no prompted class (e.g. the prompt names no colour) is left out.
    """
    logits = classifier(views)
    terms = []
    for head, target in zip(logits, classifier.targets(target_attributes)):
        if not target.any():
            continue
        target = target.to(head.device, head.dtype)
        log_yes, log_no = classifier.log_probabilities(head)
        if classifier.multi_label:
            terms.append((target * log_yes + (1 - target) * log_no).mean())
        else:
            terms.append((log_yes * target).sum(-1).mean() / target.sum())
    if not terms:
        raise Vist3AInputError(f"target attributes {target_attributes} name no colour and no shape")
    return torch.stack(terms).mean()


PromptParser = Callable[[str], TargetAttributes]
FAITHFULNESS_SOURCES = ("views", "frames")


def faithfulness(classifier: AttributeClassifier, parse: PromptParser, weight: float = 1.0, *,
                 sources: Sequence[str] = FAITHFULNESS_SOURCES, name: str = "faithfulness") -> Reward:
    """Prompt faithfulness on a rollout: ``faithfulness_reward`` of each prompt's rendered views
    and/or decoded frames (``sources``), averaged over prompts and sources. ``parse`` reads the
    target attributes from the prompt as the user gave it. The classifier is frozen here."""
    sources = tuple(sources)
    if not sources or set(sources) - set(FAITHFULNESS_SOURCES):
        raise Vist3AInputError(f"sources must be a non-empty subset of {FAITHFULNESS_SOURCES}, got {sources}")
    classifier.eval().requires_grad_(False)

    def score(context: RewardContext) -> Tensor:
        images = {"views": context.views, "frames": context.view_frames}
        values = [faithfulness_reward(classifier, images[source][b], parse(prompt))
                  for b, prompt in enumerate(context.prompts) for source in sources]
        return torch.stack(values).mean()

    return Reward(name, weight, score)


@dataclass(frozen=True)
class KeywordParser:
    """A plain prompt parser: every colour / shape class name that appears as a word (case-
    insensitive; ``synonyms`` map extra words to class names, e.g. ``{"ball": "sphere"}``)."""

    colours: tuple[str, ...]
    shapes: tuple[str, ...]
    synonyms: dict[str, str] = field(default_factory=dict)

    @classmethod
    def for_classifier(cls, classifier: AttributeClassifier, synonyms: dict[str, str] | None = None) -> "KeywordParser":
        return cls(classifier.colours, classifier.shapes, dict(synonyms or {}))

    def __call__(self, prompt: str) -> TargetAttributes:
        words = [self.synonyms.get(w, w) for w in re.findall(r"[a-z]+", prompt.lower())]
        pick = lambda names: tuple(n for n in names if n.lower() in words)  # noqa: E731
        return TargetAttributes(pick(self.colours), pick(self.shapes))
