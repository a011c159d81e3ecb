"""Orbit cameras for a scene: ``Cameras`` (OpenCV axes, camera-to-world, pixel K) at any resolution.

Frame k sits at azimuth ``start + span * k / (T - 1)`` (degrees, about world z, measured from +x
towards +y), at the orbit's elevation and distance from its target, looking at the target with
the image's down axis in the plane of world -z. The field of view is fixed, so the same scene
frames identically at every resolution (fx = fy = H / (2 tan(fov_y / 2)), principal point at the
image centre). Computed in float64, returned as float32.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ...scene.cameras import Cameras
from .scene_graph import Orbit


def azimuths_deg(orbit: Orbit) -> np.ndarray:  # [T]
    steps = np.arange(orbit.num_frames, dtype=np.float64) / max(orbit.num_frames - 1, 1)
    return orbit.start_azimuth_deg + orbit.span_deg * steps


def horizontal_axes(azimuth_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """(right, forward) unit vectors in the ground plane of a camera at ``azimuth_deg``."""
    a = math.radians(azimuth_deg)
    return np.array([-math.sin(a), math.cos(a), 0.0]), np.array([-math.cos(a), -math.sin(a), 0.0])


def orbit_cameras(orbit: Orbit, width: int, height: int) -> Cameras:
    """The orbit's ``num_frames`` cameras for ``width`` x ``height`` images."""
    azimuth = np.radians(azimuths_deg(orbit))  # [T]
    elevation = math.radians(orbit.elevation_deg)
    offset = np.stack([math.cos(elevation) * np.cos(azimuth), math.cos(elevation) * np.sin(azimuth),
                       np.full_like(azimuth, math.sin(elevation))], -1)  # [T, 3] target -> eye
    eye = np.asarray(orbit.target, dtype=np.float64) + orbit.distance * offset
    forward = -offset  # unit already
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right, axis=-1, keepdims=True)
    down = np.cross(forward, right)
    c2w = np.tile(np.eye(4), (orbit.num_frames, 1, 1))
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, down, forward, eye
    focal = 0.5 * height / math.tan(math.radians(orbit.fov_y_deg) / 2)
    K = np.array([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]])
    K = np.tile(K, (orbit.num_frames, 1, 1))
    return Cameras(torch.from_numpy(c2w).float(), torch.from_numpy(K).float(), width, height)
