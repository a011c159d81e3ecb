"""The VGGT camera head: per-frame pose encodings from the aggregator's camera tokens.

Re-implemented from VGGT's ``CameraHead`` as AnySplat uses it. The camera token of every
frame (token 0 of the last tapped aggregator layer, width 2E) is LayerNorm-ed
(``token_norm``), then refined ``num_iterations`` times: the current pose estimate (a learned
``empty_pose_tokens`` at first) is embedded (``embed_pose``) and turned into adaLN shift /
scale / gate (``poseLN_modulation`` = SiLU + Linear); the modulated tokens plus a residual go
through the ``trunk`` (transformer blocks attending across the frames of a sequence), then
``trunk_norm`` and ``pose_branch`` (an Mlp) predict a delta that is added to the estimate.

Pose encoding, 9 numbers per frame: translation (3, linear), quaternion xyzw (4, linear),
field of view (fov_h, fov_w; ReLU). Every iteration's activated estimate is returned.

``fov_straight_through`` (training only, off by default): the ReLU's forward value with an
identity gradient. A field of view whose pre-activation went negative otherwise gets no gradient
ever again (seen in nano training: fov_w stuck at 0 for every frame but the first); the outputs
are bit-identical either way, so a checkpoint trained with it runs unchanged everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import Vist3AInputError
from .layers import Block, Mlp

POSE_ENCODING_DIM = 9  # "absT_quaR_FoV": T (3), quaternion xyzw (4), fov_h, fov_w


class CameraHead(nn.Module):
    """Iterative camera-pose regressor on the camera tokens (official ``CameraHead``)."""

    def __init__(self, dim_in: int = 2048, trunk_depth: int = 4, num_heads: int = 16,
                 mlp_ratio: float = 4.0, init_values: float = 0.01, num_iterations: int = 4,
                 norm_eps: float = 1e-5, adaln_eps: float = 1e-6) -> None:
        super().__init__()
        self.num_iterations = num_iterations
        self.trunk = nn.Sequential(*(
            Block(dim_in, num_heads, mlp_ratio, init_values=init_values, norm_eps=norm_eps)
            for _ in range(trunk_depth)))
        self.token_norm = nn.LayerNorm(dim_in, eps=norm_eps)
        self.trunk_norm = nn.LayerNorm(dim_in, eps=norm_eps)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, POSE_ENCODING_DIM))
        self.embed_pose = nn.Linear(POSE_ENCODING_DIM, dim_in)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim_in, 3 * dim_in))
        self.adaln_norm = nn.LayerNorm(dim_in, elementwise_affine=False, eps=adaln_eps)
        self.pose_branch = Mlp(dim_in, dim_in // 2, POSE_ENCODING_DIM)
        self.fov_straight_through = False

    def forward(self, tokens: Tensor,  # [B, S, T, dim_in]: the last tapped aggregator layer
                ) -> list[Tensor]:  # num_iterations x [B, S, 9], activated
        if tokens.dim() != 4 or tokens.shape[-1] != self.token_norm.normalized_shape[0]:
            raise Vist3AInputError(f"camera head expects tokens [B, S, T, {self.token_norm.normalized_shape[0]}], "
                                   f"got {list(tokens.shape)}")
        pose_tokens = self.token_norm(tokens[:, :, 0])  # [B, S, dim_in]
        B, S, _ = pose_tokens.shape
        estimate, estimates = None, []
        for _ in range(self.num_iterations):
            previous = self.empty_pose_tokens.expand(B, S, -1) if estimate is None else estimate.detach()
            delta = self._refine(pose_tokens, self.embed_pose(previous))
            estimate = delta if estimate is None else estimate + delta
            estimates.append(activate_pose(estimate, self.fov_straight_through and self.training))
        return estimates

    def _refine(self, pose_tokens: Tensor,  # [B, S, dim_in]
                pose_embedding: Tensor,  # [B, S, dim_in]
                ) -> Tensor:  # [B, S, 9] raw delta
        shift, scale, gate = self.poseLN_modulation(pose_embedding).chunk(3, dim=-1)
        modulated = gate * (self.adaln_norm(pose_tokens) * (1 + scale) + shift) + pose_tokens
        return self.pose_branch(self.trunk_norm(self.trunk(modulated)))


def activate_pose(pose_encoding: Tensor,  # [..., 9]
                  straight_through: bool = False) -> Tensor:  # -> [..., 9]
    """Translation and quaternion linear, field of view through ReLU (its gradient the identity's
    when ``straight_through``)."""
    fov = pose_encoding[..., 7:]
    activated = F.relu(fov)
    if straight_through:
        activated = fov + (activated - fov).detach()
    return torch.cat((pose_encoding[..., :7], activated), dim=-1)
