"""Export contracts per stage: what each stage of the runtime looks like from outside.

Each stage (text encoder, denoiser, VAE decoder, stitched decoder) gets an ``ExportStage``: an
``ExportContract`` (names, axes, dtypes, profile: see ``spec``) and an ``nn.Module`` wrapper that
takes and returns tensors only, in the contract's order, built from a loaded model's own
modules. ``model_stages(model)`` gives a loaded ``Vist3A``'s stages as a bundle holds them: the
denoiser split in two (``denoiser_split``: its text context once per prompt, then the step).

Stages and their contracts::

    text_encoder      input_ids, attention_mask [batch, L] int64 → embeddings [batch, L, D]
                      (zero at and after each prompt's length; L = the pipeline's padded length)
    denoiser          latents [batch, C, latent_frames, p·patch_rows, p·patch_cols],
                      timestep [batch], encoder_hidden_states [batch, L, D_text] → velocity
                      (batch = 2B: the conditional and unconditional halves in one call);
                      in a bundle, ``denoiser_split``'s pair instead: denoiser_context
                      (text → every block's cross-attention keys and values) and the step
                      (latents, timestep, context → velocity), latent sizes fixed per export
    vae_decoder       latents [batch, z, T_lat, h, w] (de-normalised) → frames [batch, 3, T, 8h, 8w]
                      in [-1, 1]. T_lat is fixed per export: diffusers decodes frame by frame
                      through a causal feature cache, a loop the exporter unrolls. h, w are
                      static by default (the stitched decoder is), dynamic on request.
    stitched_decoder  latent [batch, C, latent_frames, h, w], frames [batch, 3, T, H, W]
                      (T = 4·latent_frames − 3, H×W the decoder's input size) → one Gaussian per
                      pixel (means, scales, rotations xyzw, harmonics [.., 3, K], opacities),
                      extrinsics (camera-to-world), intrinsics (normalised), depth, depth_conf.
                      Spatial sizes are static: the DPT heads compute their UV code from the
                      image size in Python floats, which the exporter specializes.

Not exportable (``ExportUnsupportedError``): a stitched decoder that voxelizes (the number of
Gaussians depends on the data) or selects pixels by confidence (``render_conf``,
``opacity_conf``: data-dependent masks and quantiles).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from vist3a_rt.errors import Vist3AInputError

from .spec import Axis, ExportContract, ExportStage, ExportUnsupportedError, Profile, TensorSpec

if TYPE_CHECKING:
    from vist3a_rt.decoder import StitchedDecoder
    from vist3a_rt.pipeline import Vist3A

__all__ = ["STAGES", "Axis", "ExportContract", "ExportStage", "ExportUnsupportedError", "Profile", "TensorSpec",
           "text_encoder_stage", "denoiser_stage", "vae_decoder_stage", "stitched_decoder_stage", "model_stages",
           "TextEncoderStage", "DenoiserStage", "VAEDecoderStage", "StitchedDecoderStage"]

STAGES = ("text_encoder", "denoiser_context", "denoiser", "vae_decoder", "stitched_decoder")


def _profile(default: Profile, given: Profile | None, stage: str) -> Profile:
    if given is None:
        return default
    if set(given.dims) != set(default.dims):
        raise Vist3AInputError(f"a {stage} profile sizes the dims {sorted(default.dims)}, got {sorted(given.dims)}")
    return given


def _check_equal(a, b) -> None:
    """Tell ``torch.export`` two sizes are equal (a no-op in eager mode and under TorchScript tracing)."""
    if not torch.jit.is_tracing():
        torch._check(a == b)


# --- text encoder --------------------------------------------------------------------------------


class TextEncoderStage(nn.Module):
    """input_ids, attention_mask [B, L] int64 → embeddings [B, L, D] (``encode_tokens``)."""

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        from vist3a_rt.generator.text import encode_tokens

        return encode_tokens(self.text_encoder, input_ids, attention_mask)


def text_encoder_stage(text_encoder: nn.Module, *, sequence_length: int = 512,
                       profile: Profile | None = None) -> ExportStage:
    """The UMT5 encoder on token ids padded to ``sequence_length`` (the pipeline pads to 512)."""
    config = text_encoder.config
    L = sequence_length
    contract = ExportContract(
        "text_encoder",
        inputs=(TensorSpec("input_ids", (Axis("batch"), L), torch.int64, "integers", 0, config.vocab_size),
                TensorSpec("attention_mask", (Axis("batch"), L), torch.int64, "prefix_mask")),
        outputs=(TensorSpec("embeddings", (Axis("batch"), L, config.d_model)),),
        profile=_profile(Profile({"batch": 1}, {"batch": 1}, {"batch": 4}), profile, "text_encoder"),
        notes="embeddings are exactly zero at and after each row's attention-mask length")
    return ExportStage(contract, TextEncoderStage(text_encoder))


# --- denoiser ------------------------------------------------------------------------------------


class DenoiserStage(nn.Module):
    """latents [2B, C, T, h, w], timestep [2B], encoder_hidden_states [2B, L, D] → velocity."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, latents: Tensor, timestep: Tensor, encoder_hidden_states: Tensor) -> Tensor:
        return self.transformer(hidden_states=latents, timestep=timestep,
                                encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


def denoiser_stage(transformer: nn.Module, *, latent_frames: int, latent_height: int, latent_width: int,
                   text_tokens: int = 512, profile: Profile | None = None) -> ExportStage:
    """The Wan transformer's flow prediction; opt is the CFG batch (2) at the given latent size.

    The default profile spans batch 1–8 and latent sizes from 1 patch to twice the opt size
    (capped by the transformer's RoPE table, ``rope_max_seq_len`` positions per axis).
    """
    config = transformer.config
    pt, ph, pw = config.patch_size
    if pt != 1:
        raise ExportUnsupportedError(f"denoiser export assumes temporal patch size 1 (Wan 2.1), got {pt}")
    if latent_height % ph or latent_width % pw:
        raise Vist3AInputError(f"latent size {latent_height}x{latent_width} is not a multiple of the patch {ph}x{pw}")
    opt = {"batch": 2, "latent_frames": latent_frames, "patch_rows": latent_height // ph,
           "patch_cols": latent_width // pw}
    cap = config.rope_max_seq_len
    default = Profile({d: 1 for d in opt}, opt, {"batch": 8, **{d: max(opt[d], min(2 * opt[d], cap))
                                                               for d in opt if d != "batch"}})
    latent_axes = (Axis("batch"), config.in_channels, Axis("latent_frames"),
                   Axis("patch_rows", ph, label="latent_height"), Axis("patch_cols", pw, label="latent_width"))
    contract = ExportContract(
        "denoiser",
        inputs=(TensorSpec("latents", latent_axes),
                TensorSpec("timestep", (Axis("batch"),), values="uniform", low=0.0, high=1000.0),
                TensorSpec("encoder_hidden_states", (Axis("batch"), text_tokens, config.text_dim))),
        outputs=(TensorSpec("velocity", (Axis("batch"), config.out_channels, *latent_axes[2:])),),
        profile=_profile(default, profile, "denoiser"),
        notes="batch is 2B with classifier-free guidance: rows [cond; uncond]")
    return ExportStage(contract, DenoiserStage(transformer))


# --- VAE decoder ---------------------------------------------------------------------------------


class VAEDecoderStage(nn.Module):
    """De-normalised latents [B, z, T_lat, h, w] → frames [B, 3, T, 8h, 8w] in [-1, 1]."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: Tensor) -> Tensor:
        from vist3a_rt.generator.latents import decode

        with _whole_batch_decoding(self.vae):
            return decode(self.vae, latents)


@contextlib.contextmanager
def _whole_batch_decoding(vae: nn.Module) -> Iterator[None]:
    """diffusers' optional batch slicing / spatial tiling loop over data-sized chunks: off while
    decoding (the native decoder has neither)."""
    if not hasattr(vae, "use_slicing"):
        yield
        return
    saved = vae.use_slicing, vae.use_tiling
    vae.use_slicing = vae.use_tiling = False
    try:
        yield
    finally:
        vae.use_slicing, vae.use_tiling = saved


def vae_decoder_stage(vae: nn.Module, *, latent_frames: int, latent_height: int, latent_width: int,
                      profile: Profile | None = None) -> ExportStage:
    """The Wan VAE decoder; the latent frame count is fixed (see the module docstring)."""
    config = vae.config
    st, ss = config.scale_factor_temporal, config.scale_factor_spatial
    opt = {"batch": 1, "latent_height": latent_height, "latent_width": latent_width}
    default = Profile({**opt, "batch": 1}, opt, {**opt, "batch": 4})
    B = Axis("batch")
    frames_axes = (B, 3, st * (latent_frames - 1) + 1, Axis("latent_height", ss, label="height"),
                   Axis("latent_width", ss, label="width"))
    contract = ExportContract(
        "vae_decoder",
        inputs=(TensorSpec("latents", (B, config.z_dim, latent_frames, Axis("latent_height"), Axis("latent_width"))),),
        outputs=(TensorSpec("frames", frames_axes, values="uniform", low=-1.0, high=1.0),),
        profile=_profile(default, profile, "vae_decoder"),
        notes=f"latent frames fixed at {latent_frames}: the frame-by-frame causal decode is unrolled")
    return ExportStage(contract, VAEDecoderStage(vae))


# --- stitched decoder ----------------------------------------------------------------------------


VAE_SPATIAL_COMPRESSION = 8  # Wan VAE: latent h, w = frame H, W / 8


class StitchedDecoderStage(nn.Module):
    """latent, frames → per-pixel Gaussians, cameras and depth (``StitchedDecoder``'s
    non-voxelized path with no confidence selection, every pixel one Gaussian)."""

    def __init__(self, decoder: "StitchedDecoder") -> None:
        super().__init__()
        check_stitched_exportable(decoder)
        self.decoder = decoder

    def forward(self, latent: Tensor,  # [B, C, T_lat, h, w] de-normalised VAE latents
                frames: Tensor,  # [B, 3, T, H, W] in [-1, 1], T = 4 (T_lat - 1) + 1
                ) -> tuple[Tensor, ...]:
        from vist3a_rt.decoder.geometry import decode_pose_encoding, normalize_intrinsics

        decoder, encoder = self.decoder, self.decoder.encoder
        compression = decoder.config.stitching.temporal_compression
        _check_equal(frames.shape[0], latent.shape[0])
        _check_equal(frames.shape[2], compression * (latent.shape[2] - 1) + 1)
        dtype = decoder.stitching_layer.weight.dtype
        images = (frames.to(dtype).transpose(1, 2) + 1) / 2  # [B, T, 3, H, W] in [0, 1]
        tokens = decoder.stitching_layer(latent.to(dtype))  # [B, E, T, rows, cols]
        grid = tuple(tokens.shape[-2:])
        taps, patch_start = encoder.aggregator.forward_stitched(tokens.permute(0, 2, 3, 4, 1).flatten(2, 3), grid)
        image_hw = tuple(images.shape[-2:])
        pose_encoding = encoder.camera_head(taps[-1])[-1]  # the last refinement
        camera_from_world, K = decode_pose_encoding(pose_encoding, image_hw)
        with _unchunked(encoder.depth_head, encoder.gaussian_param_head):
            depth, depth_conf = encoder.depth_head(taps, images, patch_start)
            head_out = encoder.gaussian_param_head(taps, images, patch_start)
        gaussians = self._pixel_gaussians(head_out, world_points(depth, camera_from_world, K))
        return (gaussians.means, gaussians.scales, gaussians.rotations, gaussians.harmonics, gaussians.opacities,
                rigid_inverse(camera_from_world), normalize_intrinsics(K, image_hw), depth, depth_conf)

    def _pixel_gaussians(self, head_out: Tensor,  # [B, T, 1+D+1, H, W]
                         points: Tensor):  # [B, T, H, W, 3]
        """``gaussians_from_pixels`` with no mask, batched (that function loops over the batch in
        Python, which would fix the batch at export): pixel order (frame, row, col), no padding."""
        from vist3a_rt.decoder.gaussians import map_pdf_to_opacity

        encoder = self.decoder.encoder
        mapping = encoder.config.encoder.opacity_mapping
        feats = head_out[:, :, :-1].permute(0, 1, 3, 4, 2).flatten(1, 3)  # [B, N, 1+D]
        opacities = map_pdf_to_opacity(feats[..., 0].sigmoid(), 0, mapping.initial, mapping.final, mapping.warm_up)
        return encoder.gaussian_adapter(points.flatten(1, 3), opacities, feats[..., 1:])


@contextlib.contextmanager
def _unchunked(*heads: nn.Module) -> Iterator[None]:
    """The DPT heads loop over frame chunks (a memory saving with identical results); a loop over
    a dynamic frame count cannot be exported, so run all frames as one chunk."""
    saved = [head.frames_chunk_size for head in heads]
    for head in heads:
        head.frames_chunk_size = None
    try:
        yield
    finally:
        for head, size in zip(heads, saved):
            head.frames_chunk_size = size


def rigid_inverse(camera_from_world: Tensor) -> Tensor:  # [..., 3, 4] -> [..., 4, 4]
    """The inverse of [R | t; 0 0 0 1] as [R⁻¹ | −R⁻¹t; 0 0 0 1], R⁻¹ from the adjugate.

    The torch decoder inverts the 4x4 with ``torch.linalg.inv`` (LU), which ONNX has no operator
    for; the adjugate formula is a general 3x3 inverse too (no orthogonality assumed) and
    agrees with it to float32 rounding.
    """
    R, t = camera_from_world[..., :3], camera_from_world[..., 3:]
    r0, r1, r2 = R.unbind(-2)
    cofactors = torch.stack([torch.linalg.cross(r1, r2), torch.linalg.cross(r2, r0), torch.linalg.cross(r0, r1)],
                            dim=-1)  # columns of adj(R)
    det = (r0 * cofactors[..., 0]).sum(-1)[..., None, None]
    R_inv = cofactors / det
    top = torch.cat([R_inv, -(R_inv @ t)], dim=-1)
    bottom = torch.cat([torch.zeros_like(top[..., :1, :3]), torch.ones_like(top[..., :1, 3:])], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def world_points(depth: Tensor,  # [B, T, H, W, 1]
                 camera_from_world: Tensor,  # [B, T, 3, 4]
                 K: Tensor) -> Tensor:  # [B, T, 3, 3] pixel intrinsics -> [B, T, H, W, 3]
    """``geometry.unproject_depth`` in batched form, same arithmetic (pixel (v, u) at integer
    coordinates, camera-to-world as [Rᵀ | −Rᵀt]); that function sizes a buffer with ``len()``,
    which would fix the batch and frame count at export."""
    z = depth.squeeze(-1)
    H, W = z.shape[-2:]
    u = torch.arange(W, device=z.device)[None, None, None, :]
    v = torch.arange(H, device=z.device)[None, None, :, None]
    x = (u - K[..., 0, 2, None, None]) * z / K[..., 0, 0, None, None]
    y = (v - K[..., 1, 2, None, None]) * z / K[..., 1, 1, None, None]
    camera = torch.stack((x, y, z, torch.ones_like(z)), dim=-1).flatten(2, 3)  # [B, T, H·W, 4]
    R_t = camera_from_world[..., :3].transpose(-1, -2)
    world_from_camera = torch.cat([R_t, -(R_t @ camera_from_world[..., 3:])], dim=-1)  # [B, T, 3, 4]
    return (camera @ world_from_camera.transpose(-1, -2)).unflatten(2, (H, W))


def check_stitched_exportable(decoder: "StitchedDecoder") -> None:
    """Raise ``ExportUnsupportedError`` for decoder settings whose output size depends on the data."""
    enc = decoder.config.encoder
    if enc.voxelize:
        raise ExportUnsupportedError(
            "the stitched decoder voxelizes its Gaussians (encoder_cfg.voxelize=true): the number of "
            "Gaussians depends on the predicted geometry, which a static graph cannot express. Export "
            "supports the per-pixel path only; set voxelize=false in the model's config to export it")
    for name in ("render_conf", "opacity_conf"):
        if getattr(enc, name):
            raise ExportUnsupportedError(
                f"the stitched decoder selects pixels by confidence (encoder_cfg.{name}=true): a batch-wide "
                "quantile and a data-dependent mask; export supports render_conf=false, opacity_conf=false only")


def stitched_decoder_stage(decoder: "StitchedDecoder", *, latent_frames: int | None = None,
                           latent_hw: tuple[int, int] | None = None,
                           profile: Profile | None = None) -> ExportStage:
    """The stitched decoder at a fixed spatial size (default latent: the config's VAE resolution / 8).

    Dims: batch (default 1–4) and latent_frames (default 2 to twice the config's count).
    """
    check_stitched_exportable(decoder)
    res, compression = decoder.config.resolutions, decoder.config.stitching.temporal_compression
    T_lat = latent_frames or res.latent_frames
    h, w = latent_hw or (res.vae_resolution // VAE_SPATIAL_COMPRESSION,) * 2
    H, W = decoder.frame_size((h, w))
    K = decoder.encoder.gaussian_adapter.d_sh
    opt = {"batch": 1, "latent_frames": T_lat}
    default = Profile({"batch": 1, "latent_frames": min(2, T_lat)}, opt, {"batch": 4, "latent_frames": 2 * T_lat})
    B, T = Axis("batch"), Axis("latent_frames", compression, 1 - compression, label="frames")
    N = Axis("latent_frames", compression * H * W, (1 - compression) * H * W, label="gaussians")  # one per pixel
    contract = ExportContract(
        "stitched_decoder",
        inputs=(TensorSpec("latent", (B, decoder.config.stitching.latent_channels, Axis("latent_frames"), h, w)),
                TensorSpec("frames", (B, 3, T, H, W), values="uniform", low=-1.0, high=1.0)),
        outputs=(TensorSpec("means", (B, N, 3)), TensorSpec("scales", (B, N, 3)), TensorSpec("rotations", (B, N, 4)),
                 TensorSpec("harmonics", (B, N, 3, K)), TensorSpec("opacities", (B, N)),
                 TensorSpec("extrinsics", (B, T, 4, 4)), TensorSpec("intrinsics", (B, T, 3, 3)),
                 TensorSpec("depth", (B, T, H, W, 1)), TensorSpec("depth_conf", (B, T, H, W))),
        profile=_profile(default, profile, "stitched_decoder"),
        notes="one Gaussian per pixel in (frame, row, col) order; rotations xyzw; harmonics [.., 3, K] "
              "colour-outer; extrinsics camera-to-world; intrinsics normalised by W and H")
    return ExportStage(contract, StitchedDecoderStage(decoder))


# --- all stages of a loaded model ----------------------------------------------------------------


def model_stages(model: "Vist3A") -> dict[str, ExportStage]:
    """Every stage of a loaded ``Vist3A`` (``STAGES``) with default profiles around its default
    generation size; the denoiser step's latent sizes are static (as the VAE's frame count and
    the stitched decoder's size are): its shape arithmetic folds into constants."""
    from .denoiser_split import denoiser_context_stage, denoiser_step_stage

    settings, generator = model.defaults, model.generator
    _, _, T_lat, h, w = generator.latent_shape(1, settings.num_frames, settings.height, settings.width)
    L = generator.text_encoder.max_sequence_length
    return {
        "text_encoder": text_encoder_stage(generator.text_encoder.text_encoder, sequence_length=L),
        "denoiser_context": denoiser_context_stage(generator.transformer, text_tokens=L),
        "denoiser": denoiser_step_stage(generator.transformer, latent_frames=T_lat, latent_height=h,
                                        latent_width=w, text_tokens=L, static_latents=True),
        "vae_decoder": vae_decoder_stage(generator.vae, latent_frames=T_lat, latent_height=h, latent_width=w),
        "stitched_decoder": stitched_decoder_stage(model.decoder, latent_frames=T_lat, latent_hw=(h, w)),
    }
