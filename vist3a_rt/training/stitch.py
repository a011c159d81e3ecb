"""``stitch``: fine-tune the stitched decoder to reproduce the original network (distillation).

The teacher is the unstitched reconstruction network on RGB frames; the student is the same
network cut after ``enc_blocks_k``, fed video latents through the stitching Conv3d (initialised
from layer search) plus the same frames for its heads. No labels: the loss compares every
output the official recipe compares (depth and its gradients, Gaussians, Gaussian-head
features and confidence, depth confidence, cameras and every pose-refinement step), with the
official weights. LoRA (official naming, so the result saves as an official
``anysplat_stitched.pth``) or full fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoints.lora import parse_lora_spec
from ..checkpoints.official import DINO_TOKENS, stitched_names
from ..decoder.network import DecoderOutput, ReconstructionModel, StitchedDecoder
from ..errors import Vist3AInputError
from .lora import add_lora, lora_state_dict

# Official weights of the distillation terms (VIST3A's AnySplat task loss).
LOSS_WEIGHTS = {"depth": 1.0, "depth_grad": 0.005, "means": 1.0, "covariances": 1.0, "harmonics": 1.0,
                "opacities": 1.0, "scales": 10.0, "rotations": 1.0, "head_conf": 0.01, "depth_conf": 0.01,
                "head_features": 0.1, "extrinsics": 1.0, "intrinsics": 1.0, "pose_encodings": 1.0}


def build_student(teacher: ReconstructionModel, stitching_init: dict[str, Tensor] | None = None) -> StitchedDecoder:
    """A stitched decoder carrying the teacher's weights (cut, DINO blocks renumbered) and the
    stitching conv from layer search (``{"weight", "bias"}``) or its default init."""
    student = StitchedDecoder(teacher.config)
    teacher_state = teacher.state_dict()
    names = stitched_names(teacher_state, teacher.config.stitching.stitched_layer_index)
    state = {new: teacher_state[old].detach().clone() for new, old in names.items()}
    if stitching_init is not None:
        state.update({f"stitching_layer.{k}": v.detach().clone() for k, v in stitching_init.items()})
    result = student.load_state_dict(state, strict=False)
    allowed = set() if stitching_init is not None else {"stitching_layer.weight", "stitching_layer.bias"}
    if set(result.missing_keys) - allowed or result.unexpected_keys:
        raise Vist3AInputError(f"teacher and student disagree: missing {result.missing_keys[:4]}, "
                               f"unexpected {result.unexpected_keys[:4]}")
    return student


def _gradient_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """L1 of finite differences along dims 1 and 2, clamped at 100 (the official term, applied to
    depth [B, T, H, W, 1] exactly as the official code does: across frames and rows)."""
    diff = prediction - target
    along_2 = (diff[:, :, 1:] - diff[:, :, :-1]).abs().clamp(max=100)
    along_1 = (diff[:, 1:] - diff[:, :-1]).abs().clamp(max=100)
    return (along_2.sum() + along_1.sum()) / (prediction.shape[0] * prediction.shape[1] * prediction.shape[2])


def gradient_loss_multi_scale(prediction: Tensor, target: Tensor, scales: int = 4) -> Tensor:
    total = prediction.new_zeros(())
    for scale in range(scales):
        step = 2 ** scale
        total = total + _gradient_loss(prediction[:, ::step, ::step], target[:, ::step, ::step])
    return total / scales


def distillation_losses(student: DecoderOutput, teacher: DecoderOutput) -> dict[str, Tensor]:
    """Weighted L1 terms between student and teacher outputs, plus ``total``."""
    s, t = student, teacher
    raw_s, raw_t = s.head_features, t.head_features
    terms = {
        "depth": F.l1_loss(s.depth, t.depth),
        "depth_grad": gradient_loss_multi_scale(s.depth, t.depth),
        **{name: F.l1_loss(getattr(s.gaussians, name), getattr(t.gaussians, name))
           for name in ("means", "covariances", "harmonics", "opacities", "scales", "rotations")},
        "head_conf": F.l1_loss(raw_s[:, :, -1], raw_t[:, :, -1]),
        "depth_conf": F.l1_loss(s.depth_conf, t.depth_conf),
        "head_features": F.l1_loss(raw_s[:, :, :-1], raw_t[:, :, :-1]),
        "extrinsics": F.l1_loss(s.extrinsics, t.extrinsics),
        "intrinsics": F.l1_loss(s.intrinsics, t.intrinsics),
        "pose_encodings": sum(F.l1_loss(a, b) for a, b in zip(s.pose_encodings, t.pose_encodings))
        / len(s.pose_encodings),
    }
    weighted = {name: value * LOSS_WEIGHTS[name] for name, value in terms.items()}
    weighted["total"] = sum(weighted.values())
    return weighted


@dataclass
class StitchSettings:
    mode: str = "lora"  # "lora" (official) or "full"
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0


class StitchTrainer:
    """One optimiser over the stitching conv, the DINO special tokens and LoRA (or everything)."""

    def __init__(self, teacher: ReconstructionModel, student: StitchedDecoder, settings: StitchSettings) -> None:
        if settings.mode not in ("lora", "full"):
            raise Vist3AInputError(f"stitch mode must be 'lora' or 'full', got {settings.mode!r}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student.train()
        self.settings = settings
        self.spec = parse_lora_spec(student.config.stitching.lora_config)
        if settings.mode == "lora":
            add_lora(student, self.spec)
        else:
            student.requires_grad_(True)
        for param in self._always_trained():
            param.requires_grad_(True)
        params = [p for p in student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)

    def _always_trained(self) -> list[nn.Parameter]:
        dino = self.student.encoder.aggregator.patch_embed
        return [*self.student.stitching_layer.parameters(), *(getattr(dino, name) for name in DINO_TOKENS)]

    def step(self, latent: Tensor, frames: Tensor) -> dict[str, float]:
        """One update on a batch: latent [B,16,T_lat,h,w] (de-normalised), frames [B,3,T,H,W] in [-1,1]."""
        with torch.no_grad():
            target = self.teacher(frames)
        losses = distillation_losses(self.student(latent, frames), target)
        self.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.settings.grad_clip)
        self.optimizer.step()
        return {name: float(value.detach()) for name, value in losses.items()}

    def checkpoint(self) -> dict:
        """The official ``anysplat_stitched.pth`` layout (LoRA mode) — loadable by
        ``vist3a_rt.load_stitched_decoder`` with the same config and base weights."""
        if self.settings.mode != "lora":
            raise Vist3AInputError("full fine-tuning has no official checkpoint layout; use full_state_dict()")
        dino = self.student.encoder.aggregator.patch_embed
        return {"lora": lora_state_dict(self.student),
                "stitching_layer": {k: v.detach().clone() for k, v in self.student.stitching_layer.state_dict().items()},
                **{name: getattr(dino, name).detach().clone() for name in DINO_TOKENS}}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(self.checkpoint(), tmp)
        tmp.replace(path)
        return path
