"""Pinhole cameras: one view (``Camera``) and a per-frame sequence (``Cameras``).

Conventions (the official decoder's): OpenCV camera axes (x right, y down, z forward),
extrinsics stored camera-to-world, intrinsics in pixels for an image of ``width`` x ``height``.
The decoder predicts intrinsics normalized by the image size; ``Cameras.from_normalized``
scales them back.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import Vist3AInputError


def _check_matrix(name: str, value: torch.Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(value, torch.Tensor):
        raise Vist3AInputError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if tuple(value.shape[-len(shape):]) != shape:
        raise Vist3AInputError(f"{name} must end in shape {list(shape)}, got {list(value.shape)}")
    if not torch.isfinite(value).all():
        raise Vist3AInputError(f"{name} has non-finite values")


@dataclass
class Camera:
    """One view: ``camtoworld`` [4,4], pixel intrinsics ``K`` [3,3], image ``width`` x ``height``."""

    camtoworld: torch.Tensor  # [4, 4]
    K: torch.Tensor  # [3, 3]
    width: int
    height: int

    def __post_init__(self) -> None:
        _check_matrix("camtoworld", self.camtoworld, (4, 4))
        _check_matrix("K", self.K, (3, 3))
        if self.camtoworld.dim() != 2 or self.K.dim() != 2:
            raise Vist3AInputError("Camera holds a single view; use Cameras for a sequence")
        if int(self.width) < 1 or int(self.height) < 1:
            raise Vist3AInputError(f"image size must be positive, got {self.width}x{self.height}")
        self.width, self.height = int(self.width), int(self.height)

    @property
    def worldtocam(self) -> torch.Tensor:  # [4, 4]
        return torch.linalg.inv(self.camtoworld)

    @classmethod
    def look_at(cls, eye, target, up=(0.0, -1.0, 0.0), fov_y_deg: float = 50.0,
                width: int = 256, height: int = 256) -> "Camera":
        """An OpenCV-convention camera at ``eye`` looking at ``target`` (``up`` is image-up, i.e. -y)."""
        eye_t, target_t, up_t = (torch.as_tensor(v, dtype=torch.float32) for v in (eye, target, up))
        forward = torch.nn.functional.normalize(target_t - eye_t, dim=0)
        right = torch.nn.functional.normalize(torch.linalg.cross(forward, up_t), dim=0)
        down = torch.linalg.cross(forward, right)
        c2w = torch.eye(4)
        c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, forward, eye_t
        focal = 0.5 * height / math.tan(math.radians(fov_y_deg) / 2)
        K = torch.tensor([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]])
        return cls(c2w, K, width, height)


@dataclass
class Cameras:
    """A sequence of views sharing one image size: ``camtoworld`` [T,4,4], ``K`` [T,3,3] in pixels."""

    camtoworld: torch.Tensor  # [T, 4, 4]
    K: torch.Tensor  # [T, 3, 3]
    width: int
    height: int

    def __post_init__(self) -> None:
        _check_matrix("camtoworld", self.camtoworld, (4, 4))
        _check_matrix("K", self.K, (3, 3))
        if self.camtoworld.dim() != 3 or self.K.dim() != 3 or len(self.camtoworld) != len(self.K):
            raise Vist3AInputError(
                f"Cameras needs camtoworld [T,4,4] and K [T,3,3] with the same T, got "
                f"{list(self.camtoworld.shape)} and {list(self.K.shape)}")
        self.width, self.height = int(self.width), int(self.height)

    def __len__(self) -> int:
        return self.camtoworld.shape[0]

    def __getitem__(self, index: int) -> Camera:
        return Camera(self.camtoworld[index], self.K[index], self.width, self.height)

    @classmethod
    def from_normalized(cls, camtoworld: torch.Tensor, K_normalized: torch.Tensor,
                        width: int, height: int) -> "Cameras":
        """From the decoder's normalized intrinsics (row 0 divided by W, row 1 by H)."""
        scale = torch.tensor([width, height, 1.0], dtype=K_normalized.dtype, device=K_normalized.device)
        return cls(camtoworld, K_normalized * scale[:, None], width, height)

    def to_json_dict(self) -> dict:
        frames = []
        for c2w, K in zip(self.camtoworld.double().tolist(), self.K.double().tolist()):
            frames.append({"camtoworld": c2w, "fx": K[0][0], "fy": K[1][1], "cx": K[0][2], "cy": K[1][2]})
        return {"convention": "opencv", "extrinsics": "camera_to_world",
                "width": self.width, "height": self.height, "frames": frames}

    @classmethod
    def from_json_dict(cls, data: dict) -> "Cameras":
        try:
            frames = data["frames"]
            c2w = torch.tensor([f["camtoworld"] for f in frames], dtype=torch.float32)
            K = torch.tensor([[[f["fx"], 0.0, f["cx"]], [0.0, f["fy"], f["cy"]], [0.0, 0.0, 1.0]]
                              for f in frames], dtype=torch.float32)
            return cls(c2w.reshape(-1, 4, 4), K.reshape(-1, 3, 3), data["width"], data["height"])
        except (KeyError, TypeError, ValueError) as err:
            raise Vist3AInputError(f"not a cameras.json layout: {err!r}") from err

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json_dict(), indent=1))

    @classmethod
    def load_json(cls, path: str | Path) -> "Cameras":
        return cls.from_json_dict(json.loads(Path(path).read_text()))
