"""Where the pieces of a model are: the official folder layout, or explicit paths.

A user assembles the released files as::

    model/
      wan/                    a Wan2.1-T2V-*-Diffusers folder as released
      lora/                   optional: the released PEFT adapter folder (vist3a_*_lora_ema)
      anysplat/               the released AnySplat folder: config.json + model.safetensors
      anysplat_stitched.pth   as released
      vist3a.json             optional: overrides of the official settings
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, Vist3AInputError


@dataclass(frozen=True)
class ModelPaths:
    wan: Path
    anysplat: Path
    stitched: Path
    lora: Path | None = None
    config: Path | None = None  # vist3a.json

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelPaths":
        root = Path(folder)
        if not root.is_dir():
            raise Vist3AInputError(f"model folder not found: {root}")
        missing = [name for name in ("wan", "anysplat", "anysplat_stitched.pth") if not (root / name).exists()]
        if missing:
            raise CheckpointError(f"model folder {root} is missing {missing} (expected wan/, anysplat/, "
                                  "anysplat_stitched.pth, and optionally lora/ and vist3a.json)")
        lora = root / "lora" if (root / "lora").is_dir() else None
        config = root / "vist3a.json" if (root / "vist3a.json").is_file() else None
        return cls(wan=root / "wan", anysplat=root / "anysplat", stitched=root / "anysplat_stitched.pth",
                   lora=lora, config=config)

    def with_overrides(self, **paths: str | Path | None) -> "ModelPaths":
        """Explicit paths replace the folder's (None leaves a piece as it is)."""
        values = {k: Path(v) for k, v in paths.items() if v is not None}
        unknown = set(values) - {"wan", "anysplat", "stitched", "lora", "config"}
        if unknown:
            raise Vist3AInputError(f"unknown model pieces {sorted(unknown)}")
        return ModelPaths(**{**self.__dict__, **values})

    @classmethod
    def explicit(cls, *, wan, anysplat, stitched, lora=None, config=None) -> "ModelPaths":
        if wan is None or anysplat is None or stitched is None:
            raise Vist3AInputError("explicit model paths need wan, anysplat and stitched")
        paths = cls(Path(wan), Path(anysplat), Path(stitched), None if lora is None else Path(lora),
                    None if config is None else Path(config))
        for name in ("wan", "anysplat", "stitched"):
            if not getattr(paths, name).exists():
                raise CheckpointError(f"model piece {name!r} not found: {getattr(paths, name)}")
        return paths
