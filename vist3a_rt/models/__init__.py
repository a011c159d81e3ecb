"""Models shipped inside the package: ``nano/`` (VIST3A-nano, trained by ``vist3a-rt train nano``)
in the released folder layout, with the ``manifest.json`` of the run that produced it."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError

EMBEDDED_MODELS = ("nano",)
MANIFEST = "manifest.json"


def embedded_model_dir(name: str = "nano") -> Path:
    """Where the package keeps embedded model ``name`` (the folder may be absent)."""
    return Path(__file__).resolve().parent / name


def embedded_model(name: str = "nano") -> Path:
    """The folder of embedded model ``name``; CheckpointError when this install lacks it."""
    folder = embedded_model_dir(name)
    if not (folder / MANIFEST).is_file():
        raise CheckpointError(f"the embedded model {name!r} is not installed at {folder}; reinstall vist3a-rt "
                              "(`pip install -e .` from a checkout that has vist3a_rt/models/nano) or rebuild it "
                              "with `vist3a-rt train nano --out DIR` and `vist3a-rt train install DIR/assemble/model`")
    return folder


def embedded_manifest(name: str = "nano") -> dict | None:
    """The manifest of embedded model ``name``, or None when it is not installed."""
    path = embedded_model_dir(name) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None
