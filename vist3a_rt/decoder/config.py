"""Configuration of the AnySplat-architecture decoder (stitched or not).

The on-disk layout is the one of the official artifacts and of our fixtures' ``config.json``:

``anysplat``              ``{"encoder_cfg": …, "decoder_cfg": …}`` — AnySplat's own hub config
``architecture_constants`` sizes the official code hard-codes (widths, depths, heads, DPT widths)
``architecture_fixed``     structural constants the official code hard-codes (taps, eps, …)
``stitching``              cut location, stitching-conv spec, LoRA spec
``resolutions``            VAE / feed-forward resolutions and frame counts

Every field has the official value as its default, so the released weights need no extra
file; a released AnySplat folder's ``config.json`` (just ``encoder_cfg``/``decoder_cfg``) is
accepted as the ``anysplat`` section. Unknown keys inside the schema sections are errors
(the official dataclasses reject them too); unknown top-level sections are ignored.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError


@dataclass
class OpacityMapping:
    initial: float = 0.0
    final: float = 0.0
    warm_up: int = 1


@dataclass
class GaussianAdapterConfig:
    gaussian_scale_min: float = 0.5
    gaussian_scale_max: float = 15.0
    sh_degree: int = 4


@dataclass
class EncoderConfig:
    """AnySplat's ``encoder_cfg`` (official EncoderAnySplatCfg fields). Values are those of the
    official default encoder YAML; ``pred_head_type``/``intermediate_layer_idx`` are the values
    the stitched model needs and ``voxelize`` is what the released AnySplat reportedly uses."""

    name: str = "anysplat"
    anchor_feat_dim: int = 83
    voxel_size: float = 0.001
    n_offsets: int = 2
    d_feature: int = 32
    add_view: bool = False
    num_monocular_samples: int = 32
    backbone: dict = field(default_factory=dict)  # croco settings; unused by the AnySplat encoder
    visualizer: dict = field(default_factory=dict)  # training-time visualisation; unused
    gaussian_adapter: GaussianAdapterConfig = field(default_factory=GaussianAdapterConfig)
    apply_bounds_shim: bool = True
    opacity_mapping: OpacityMapping = field(default_factory=OpacityMapping)
    gaussians_per_pixel: int = 1
    num_surfaces: int = 1
    gs_params_head_type: str = "dpt_gs"
    input_mean: tuple = (0.5, 0.5, 0.5)
    input_std: tuple = (0.5, 0.5, 0.5)
    pretrained_weights: str = ""
    pose_free: bool = True
    pred_pose: bool = True
    gt_pose_to_pts: bool = False
    gs_prune: bool = False
    opacity_threshold: float = 0.001
    gs_keep_ratio: float = 1.0
    pred_head_type: str = "depth"
    freeze_backbone: bool = False
    freeze_module: str = "None"
    distill: bool = False
    render_conf: bool = False
    opacity_conf: bool = False
    conf_threshold: float = 0.1
    intermediate_layer_idx: list = field(default_factory=lambda: [4, 11, 17, 23])
    voxelize: bool = True


@dataclass
class ArchitectureConfig:
    """Sizes and structural constants; defaults are the official AnySplat (VGGT-1B) values."""

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    agg_depth: int = 24
    agg_num_heads: int = 16
    dino_depth: int = 24
    dino_num_heads: int = 16
    cam_num_heads: int = 16
    dpt_features: int = 256
    dpt_out_channels: list = field(default_factory=lambda: [256, 512, 1024, 1024])
    gs_features: int = 256
    gs_out_channels: list = field(default_factory=lambda: [256, 512, 1024, 1024])
    gs_head_features_1: int = 128
    gs_head_features_2: int = 128
    # --- structural constants the official code hard-codes ("architecture_fixed") ---
    num_register_tokens: int = 4
    dino_mlp_ratio: float = 4.0
    agg_mlp_ratio: float = 4.0
    agg_qk_norm: bool = True
    rope_freq: float = 100.0
    agg_layerscale_init: float = 0.01
    dino_layerscale_init: float = 1.0
    dino_interpolate_antialias: bool = True
    dino_interpolate_offset: float = 0.0
    dino_layernorm_eps: float = 1e-6
    agg_layernorm_eps: float = 1e-5
    cam_trunk_depth: int = 4
    cam_num_iterations: int = 4
    cam_layerscale_init: float = 0.01
    aa_order: list = field(default_factory=lambda: ["frame", "global"])
    aa_block_size: int = 1
    stitched_intermediate_layer_idx: list = field(default_factory=lambda: [4, 11, 17, 23])
    depth_head: dict = field(default_factory=lambda: {"output_dim": 2, "activation": "exp",
                                                      "conf_activation": "expp1"})
    gs_head: dict = field(default_factory=lambda: {"output_dim": 84, "raw_gs_dim": 83})
    frames_chunk_size: int = 8


@dataclass
class StitchingConfig:
    """Where the reconstruction network is cut and how latents enter it (official VIST3A values)."""

    stitching_layer_location: str = "enc_blocks_2"
    stitching_layer_config: str = "conv3d_k5x3x3_o1024_s1x2x2_p2x1x1"
    lora_config: str = "r64,a32,d0.0,f0"
    latent_channels: int = 16
    temporal_compression: int = 4  # Wan VAE: T = 4 * (T_lat - 1) + 1

    @property
    def stitched_layer_index(self) -> int:
        prefix, _, index = self.stitching_layer_location.rpartition("_")
        if prefix != "enc_blocks" or not index.isdigit():
            raise ConfigError(f"stitching location must look like 'enc_blocks_<k>', "
                              f"got {self.stitching_layer_location!r}")
        return int(index)


@dataclass
class Resolutions:
    vae_resolution: int = 512
    feedforward_resolution: int = 448
    num_frames: int = 13
    latent_frames: int = 4
    latent_channels: int = 16


@dataclass
class DecoderConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder_cfg: dict = field(default_factory=lambda: {"name": "splatting_cuda",
                                                       "background_color": [1.0, 1.0, 1.0],
                                                       "make_scale_invariant": False})
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    stitching: StitchingConfig = field(default_factory=StitchingConfig)
    resolutions: Resolutions = field(default_factory=Resolutions)

    @classmethod
    def from_dict(cls, data: dict) -> "DecoderConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"decoder config must be a dict, got {type(data).__name__}")
        anysplat = data.get("anysplat", {k: data[k] for k in ("encoder_cfg", "decoder_cfg") if k in data})
        architecture = {**data.get("architecture_constants", {}), **data.get("architecture_fixed", {})}
        config = cls(
            encoder=_build(EncoderConfig, anysplat.get("encoder_cfg", {}), "anysplat.encoder_cfg"),
            architecture=_build(ArchitectureConfig, architecture, "architecture"),
            stitching=_build(StitchingConfig, _known(StitchingConfig, data.get("stitching", {})), "stitching"),
            resolutions=_build(Resolutions, _known(Resolutions, data.get("resolutions", {})), "resolutions"),
        )
        if "decoder_cfg" in anysplat:
            config.decoder_cfg = dict(anysplat["decoder_cfg"])
        config.validate()
        return config

    @classmethod
    def load(cls, source: "str | Path | dict | DecoderConfig | None") -> "DecoderConfig":
        """From a config object, a dict, a JSON file, or None (all official defaults)."""
        if source is None:
            return cls()
        if isinstance(source, DecoderConfig):
            return source
        if isinstance(source, dict):
            return cls.from_dict(source)
        path = Path(source)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ConfigError(f"decoder config not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"decoder config {path} is not valid JSON: {err}") from None

    def to_dict(self) -> dict:
        arch = dataclasses.asdict(self.architecture)
        return {"anysplat": {"encoder_cfg": dataclasses.asdict(self.encoder), "decoder_cfg": self.decoder_cfg},
                "architecture_constants": arch,
                "stitching": dataclasses.asdict(self.stitching),
                "resolutions": dataclasses.asdict(self.resolutions)}

    def validate(self) -> None:
        arch = self.architecture
        if arch.embed_dim % arch.agg_num_heads or arch.embed_dim % arch.dino_num_heads:
            raise ConfigError(f"embed_dim {arch.embed_dim} must be divisible by the head counts")
        if (2 * arch.embed_dim) % arch.cam_num_heads:
            raise ConfigError(f"camera-head width {2 * arch.embed_dim} not divisible by {arch.cam_num_heads} heads")
        if not 0 < self.stitching.stitched_layer_index <= arch.dino_depth:
            raise ConfigError(f"stitching location {self.stitching.stitching_layer_location!r} is outside "
                              f"the {arch.dino_depth} DINO blocks")
        self._validate_stitching_conv()
        self._validate_fixed_structure()
        if self.encoder.opacity_conf and self.encoder.voxelize:
            raise ConfigError("opacity_conf works per pixel and cannot be combined with voxelize "
                              "(the official code fails on that combination too)")
        if self.encoder.pred_head_type != "depth":
            raise ConfigError("only pred_head_type 'depth' is supported (the stitched forward needs the depth head)")
        taps = arch.stitched_intermediate_layer_idx
        if not taps or max(taps) >= arch.agg_depth or min(taps) < 0:
            raise ConfigError(f"tapped aggregator layers {taps} must lie in [0, {arch.agg_depth})")


    def _validate_fixed_structure(self) -> None:
        """Structural constants the official code hard-codes and we implement only at their
        official values: anything else is refused rather than silently ignored."""
        arch = self.architecture
        fixed = {"aa_order": (arch.aa_order, ["frame", "global"]), "aa_block_size": (arch.aa_block_size, 1),
                 "dino_interpolate_antialias": (arch.dino_interpolate_antialias, True),
                 "dino_interpolate_offset": (arch.dino_interpolate_offset, 0.0)}
        for name, (value, official) in fixed.items():
            if value != official:
                raise ConfigError(f"architecture {name}={value!r} is not supported (only the official {official!r})")
        raw = 1 + 7 + 3 * (self.encoder.gaussian_adapter.sh_degree + 1) ** 2  # density + scale/rot + SH
        if arch.gs_head.get("raw_gs_dim", raw) != raw or arch.gs_head.get("output_dim", raw + 1) != raw + 1:
            raise ConfigError(f"gs_head {arch.gs_head} does not fit sh_degree {self.encoder.gaussian_adapter.sh_degree} "
                              f"(expected raw_gs_dim {raw}, output_dim {raw + 1})")

    def _validate_stitching_conv(self) -> None:
        from .stitching import parse_conv_spec  # the conv-spec grammar lives with the layer

        spec = parse_conv_spec(self.stitching.stitching_layer_config)
        if spec.dim != 3:
            raise ConfigError(f"the stitching layer needs a conv3d spec, got {self.stitching.stitching_layer_config!r}")
        if spec.out_channels != self.architecture.embed_dim:
            raise ConfigError(f"stitching conv {self.stitching.stitching_layer_config!r} outputs "
                              f"{spec.out_channels} channels but the network width is {self.architecture.embed_dim}")


# Keys the fixtures' sections carry for documentation (parsed fields, lists) that are not settings.
_DERIVED_KEYS = {"stitched_layer_index", "conv_spec", "lora_parsed", "lora_module_names",
                 "lora_merged_for_forward", "patch_grid", "latent_hw"}


def _known(cls, data: dict) -> dict:
    return {k: v for k, v in data.items() if k not in _DERIVED_KEYS}


def _build(cls, data: dict, section: str):
    if not isinstance(data, dict):
        raise ConfigError(f"config section {section!r} must be an object, got {type(data).__name__}")
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown keys in config section {section!r}: {unknown}")
    values: dict[str, Any] = {}
    for key, value in data.items():
        nested = {"opacity_mapping": OpacityMapping, "gaussian_adapter": GaussianAdapterConfig}.get(key)
        values[key] = _build(nested, value, f"{section}.{key}") if nested and isinstance(value, dict) else value
    try:
        return cls(**values)
    except TypeError as err:
        raise ConfigError(f"bad config section {section!r}: {err}") from None
