"""From per-pixel head channels to 3D Gaussians, as the official pose-free AnySplat encoder does.

Steps: select the pixels (all, or those of a validity mask) or fuse them per voxel
(``voxelize``), pad the per-batch lists to a common count (``pad_tensor_list``), map the
density logit to an opacity (``map_pdf_to_opacity``), and turn the 82 remaining channels
into scales, rotations and spherical harmonics (``GaussianAdapter``, the official
"unified" adapter; its config's gaussian_scale_min/max are not used by it).

Layouts are the official ones: rotations are xyzw (scalar last), harmonics [.., 3, K]
with colour as the outer index; feature channels are [density logit, 3 scale, 4 rotation,
3·K SH] followed (in the head output) by one confidence channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import Vist3AInputError
from .geometry import quaternion_to_matrix

SCALE_FACTOR = 0.001  # scales = min(0.001 · softplus(s), 0.3)
SCALE_MAX = 0.3
QUAT_EPS = 1e-8
FEATURE_PAD = -1e10  # padded Gaussians get density logit -1e10, i.e. opacity 0
POINT_PAD = -1e4


@dataclass
class GaussianParams:
    """Batched Gaussians in the official layout (N may include padding)."""

    means: Tensor  # [B, N, 3]
    covariances: Tensor  # [B, N, 3, 3]
    harmonics: Tensor  # [B, N, 3, K]
    opacities: Tensor  # [B, N]
    scales: Tensor  # [B, N, 3]
    rotations: Tensor  # [B, N, 4] xyzw


def map_pdf_to_opacity(pdf: Tensor, global_step: int = 0, initial: float = 0.0, final: float = 0.0,
                       warm_up: int = 1) -> Tensor:
    """Official opacity schedule: 0.5·(1 − (1−p)^e + p^(1/e)), e = 2^x, x warmed from initial to final."""
    x = initial + min(global_step / warm_up, 1) * (final - initial)
    exponent = 2 ** x
    return 0.5 * (1 - (1 - pdf) ** exponent + pdf ** (1 / exponent))


def sh_mask(sh_degree: int) -> Tensor:
    """[(degree+1)²] weights: 1 for degree 0, 0.1·0.25^l for degree l (damps view dependence)."""
    mask = torch.ones((sh_degree + 1) ** 2, dtype=torch.float32)
    for degree in range(1, sh_degree + 1):
        mask[degree ** 2:(degree + 1) ** 2] = 0.1 * 0.25 ** degree
    return mask


def build_covariance(scales: Tensor, rotations: Tensor) -> Tensor:
    """scales [..., 3], xyzw quaternions [..., 4] -> R S Sᵀ Rᵀ [..., 3, 3]."""
    scale = scales.diag_embed()
    rot = quaternion_to_matrix(rotations, eps=QUAT_EPS)
    return rot @ scale @ scale.transpose(-1, -2) @ rot.transpose(-1, -2)


class GaussianAdapter(nn.Module):
    """Pose-free ("unified") adapter: raw channels [..., 7 + 3K] -> scales, rotations, SH, covariances."""

    def __init__(self, sh_degree: int = 4) -> None:
        super().__init__()
        self.sh_degree = sh_degree
        self.register_buffer("sh_mask", sh_mask(sh_degree), persistent=False)

    @property
    def d_sh(self) -> int:
        return (self.sh_degree + 1) ** 2

    @property
    def d_in(self) -> int:
        return 7 + 3 * self.d_sh

    def forward(self, means: Tensor, opacities: Tensor, raw: Tensor) -> GaussianParams:
        # means: [B, N, 3]; opacities: [B, N]; raw: [B, N, 7 + 3K]
        if raw.shape[-1] != self.d_in:
            raise Vist3AInputError(f"raw Gaussian channels must be {self.d_in}, got {list(raw.shape)}")
        scales, rotations, sh = raw.split((3, 4, 3 * self.d_sh), dim=-1)
        scales = (SCALE_FACTOR * F.softplus(scales)).clamp_max(SCALE_MAX)
        rotations = rotations / (rotations.norm(dim=-1, keepdim=True) + QUAT_EPS)
        harmonics = sh.unflatten(-1, (3, self.d_sh)) * self.sh_mask
        return GaussianParams(means=means, covariances=build_covariance(scales, rotations), harmonics=harmonics,
                              opacities=opacities, scales=scales, rotations=rotations)


def voxelize(points: Tensor, features: Tensor, conf: Tensor, voxel_size: float) -> tuple[Tensor, Tensor]:
    """Fuse points [N, 3] and features [N, C] per voxel with confidence-softmax weights (conf [N]).

    Voxel ids are round(point / voxel_size) (half to even) as int32; voxels come out as the
    unique id rows in lexicographic order. Returns fused points [M, 3] and features [M, C].
    """
    ids = (points / voxel_size).round().int()
    _, inverse = torch.unique(ids, dim=0, return_inverse=True)
    num_voxels = int(inverse.max()) + 1 if inverse.numel() else 0
    conf_max = conf.new_full((num_voxels,), float("-inf")).scatter_reduce(0, inverse, conf, reduce="amax")
    conf_exp = torch.exp(conf - conf_max[inverse])
    total = conf.new_zeros(num_voxels).index_add(0, inverse, conf_exp)
    weights = (conf_exp / (total[inverse] + 1e-6)).unsqueeze(-1)
    fused_points = points.new_zeros(num_voxels, points.shape[-1]).index_add(0, inverse, points * weights)
    fused_features = features.new_zeros(num_voxels, features.shape[-1]).index_add(0, inverse, features * weights)
    return fused_points, fused_features


def pad_tensor_list(tensors: list[Tensor], value: float) -> Tensor:
    """Stack [N_i, ...] tensors into [B, max N_i, ...], filling the tail rows with ``value``."""
    count = max(t.shape[0] for t in tensors)
    padded = [torch.cat([t, t.new_full((count - t.shape[0], *t.shape[1:]), value)]) for t in tensors]
    return torch.stack(padded)


def scene_scale(points: Tensor) -> Tensor:
    """Mean distance of all points [B, S, H, W, 3] from the origin, clipped at 1e-8 (0-d)."""
    return points.flatten(2, 3).norm(dim=-1).mean().clip(min=1e-8)


def gaussians_from_pixels(head_out: Tensor, points: Tensor, adapter: GaussianAdapter, *,
                          voxel_size: float | None = None, valid_mask: Tensor | None = None,
                          global_step: int = 0, opacity_mapping: tuple[float, float, int] = (0.0, 0.0, 1),
                          ) -> GaussianParams:
    """Gaussian head output [B, S, 1+D+1, H, W] + world points [B, S, H, W, 3] -> Gaussians.

    With ``voxel_size`` the pixels are fused per voxel; otherwise each pixel (or each pixel
    of ``valid_mask`` [B, S, H, W]) is one Gaussian, in (frame, row, col) order. Batches
    with fewer Gaussians are padded (opacity 0, means −1e4). ``opacity_mapping`` is the
    official (initial, final, warm_up).
    """
    feats_all, conf_all = head_out[:, :, :-1], head_out[:, :, -1]
    point_list, feat_list = [], []
    for b in range(head_out.shape[0]):
        feats = feats_all[b].permute(0, 2, 3, 1)  # [S, H, W, 1+D]
        if voxel_size is not None:
            pts, fts = voxelize(points[b].flatten(0, 2), feats.flatten(0, 2), conf_all[b].flatten(), voxel_size)
        elif valid_mask is not None:
            pts, fts = points[b][valid_mask[b]], feats[valid_mask[b]]
        else:
            pts, fts = points[b].flatten(0, 2), feats.flatten(0, 2)
        point_list.append(pts)
        feat_list.append(fts)
    feats, means = pad_tensor_list(feat_list, FEATURE_PAD), pad_tensor_list(point_list, POINT_PAD)
    opacities = map_pdf_to_opacity(feats[..., 0].sigmoid(), global_step, *opacity_mapping)
    return adapter(means, opacities, feats[..., 1:])
