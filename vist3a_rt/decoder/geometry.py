"""Camera geometry of the AnySplat decoder: pose encodings, extrinsics, unprojection.

Conventions (VGGT's): OpenCV camera axes (x right, y down, z forward); a pose encoding
is [B, S, 9] = [T (3), quaternion xyzw (4), fov_h, fov_w]; the extrinsics it decodes to
are camera-from-world [R | T] (3x4); intrinsics are in pixels with the principal point at
the image centre. Op order follows the official code where it changes float32 results.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import Vist3AInputError

FOCAL_EPS = 1e-3  # added to tan(fov / 2) before dividing, as VGGT does


def quaternion_to_matrix(quaternions: Tensor, eps: float = 0.0) -> Tensor:
    """Scalar-last (xyzw) quaternions [..., 4] -> rotation matrices [..., 3, 3].

    The quaternion need not be unit: the products are scaled by 2 / (|q|² + eps).
    """
    x, y, z, w = torch.unbind(quaternions, dim=-1)
    two_s = 2.0 / ((quaternions * quaternions).sum(dim=-1) + eps)
    rows = (
        (1 - two_s * (y * y + z * z), two_s * (x * y - z * w), two_s * (x * z + y * w)),
        (two_s * (x * y + z * w), 1 - two_s * (x * x + z * z), two_s * (y * z - x * w)),
        (two_s * (x * z - y * w), two_s * (y * z + x * w), 1 - two_s * (x * x + y * y)),
    )
    flat = torch.stack([entry for row in rows for entry in row], dim=-1)
    return flat.reshape(quaternions.shape[:-1] + (3, 3))


def decode_pose_encoding(pose_enc: Tensor, image_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """pose_enc [B, S, 9] -> (camera-from-world extrinsics [B, S, 3, 4], pixel intrinsics [B, S, 3, 3])."""
    if pose_enc.dim() != 3 or pose_enc.shape[-1] != 9:
        raise Vist3AInputError(f"pose encoding must be [B, S, 9], got {list(pose_enc.shape)}")
    height, width = image_hw
    rotation = quaternion_to_matrix(pose_enc[..., 3:7])
    extrinsics = torch.cat([rotation, pose_enc[..., :3, None]], dim=-1)
    fy = (height / 2.0) / (torch.tan(pose_enc[..., 7] / 2.0) + FOCAL_EPS)
    fx = (width / 2.0) / (torch.tan(pose_enc[..., 8] / 2.0) + FOCAL_EPS)
    intrinsics = pose_enc.new_zeros(pose_enc.shape[:2] + (3, 3))
    intrinsics[..., 0, 0], intrinsics[..., 1, 1] = fx, fy
    intrinsics[..., 0, 2], intrinsics[..., 1, 2] = width / 2, height / 2
    intrinsics[..., 2, 2] = 1.0
    return extrinsics, intrinsics


def closed_form_inverse_se3(se3: Tensor) -> Tensor:
    """Rigid transforms [N, 3|4, 4] -> their inverses [N, 4, 4] as [Rᵀ | −Rᵀ T; 0 0 0 1]."""
    if se3.dim() != 3 or se3.shape[-2:] not in ((3, 4), (4, 4)):
        raise Vist3AInputError(f"se3 must be [N, 3, 4] or [N, 4, 4], got {list(se3.shape)}")
    rot_t = se3[:, :3, :3].transpose(1, 2)
    inverse = torch.eye(4, dtype=se3.dtype, device=se3.device).repeat(len(se3), 1, 1)
    inverse[:, :3, :3] = rot_t
    inverse[:, :3, 3:] = -torch.bmm(rot_t, se3[:, :3, 3:])
    return inverse


def unproject_depth(depth: Tensor, extrinsics: Tensor, intrinsics: Tensor) -> Tensor:
    """Depth [B, S, H, W(, 1)] -> world points [B, S, H, W, 3] at integer pixel coordinates.

    extrinsics [B, S, 3, 4] camera-from-world, intrinsics [B, S, 3, 3] in pixels; pixel
    (v, u) is unprojected at u = 0..W−1, v = 0..H−1 (no half-pixel offset, as officially).
    """
    if depth.dim() == 5:
        depth = depth.squeeze(-1)
    b, s, h, w = depth.shape
    depth, k = depth.flatten(0, 1), intrinsics.flatten(0, 1)
    u = torch.arange(w, device=depth.device)[None, None, :]
    v = torch.arange(h, device=depth.device)[None, :, None]
    x_cam = (u - k[:, 0, 2, None, None]) * depth / k[:, 0, 0, None, None]
    y_cam = (v - k[:, 1, 2, None, None]) * depth / k[:, 1, 1, None, None]
    cam = torch.stack((x_cam, y_cam, depth), dim=-1)
    homo = torch.cat((cam, torch.ones_like(cam[..., :1])), dim=-1).flatten(1, 2)  # [N, H·W, 4]
    cam_to_world = closed_form_inverse_se3(extrinsics.flatten(0, 1))
    world = torch.bmm(cam_to_world, homo.transpose(1, 2)).transpose(1, 2)[..., :3]
    return world.reshape(b, s, h, w, 3)


def camera_to_world(extrinsics: Tensor) -> Tensor:
    """Camera-from-world [..., 3, 4] -> camera-to-world [..., 4, 4] by a general 4x4 inverse (official)."""
    bottom = extrinsics.new_tensor([0.0, 0.0, 0.0, 1.0]).expand(*extrinsics.shape[:-2], 1, 4)
    # linalg.inv has no bf16/fp16 kernels: invert in float32 (a no-op cast in the float32 path)
    return torch.linalg.inv(torch.cat([extrinsics, bottom], dim=-2).float()).to(extrinsics.dtype)


def normalize_intrinsics(intrinsics: Tensor, image_hw: tuple[int, int]) -> Tensor:
    """Pixel intrinsics [..., 3, 3] -> row 0 divided by W, row 1 by H (so cx, cy become 0.5)."""
    height, width = image_hw
    return torch.stack([intrinsics[..., 0, :] / width, intrinsics[..., 1, :] / height, intrinsics[..., 2, :]], dim=-2)
