"""``assemble``: the recipe's result as a model folder in the released layout, plus a manifest.

    assemble/model/        what ships: wan/ (reward LoRA merged), anysplat/, anysplat_stitched.pth,
                           vist3a.json, layer_search.json, manifest.json
    assemble/pre_reward/   the same model before reward fine-tuning (the evaluation's baseline)

``install_embedded(model_dir)`` copies a model folder into the package (``vist3a_rt/models/nano``),
where ``Vist3A.load("nano")`` finds it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from ...errors import Vist3AInputError
from .decoder_stages import ANYSPLAT_FOLDER, STITCHED_FILE, stitched_config
from .workspace import write_json

MODEL, PRE_REWARD, MANIFEST = "model", "pre_reward", "manifest.json"
SIZE_LIMIT_BYTES = 40 * 1024 * 1024  # the embedded model's budget (issue 5)


def assemble(run) -> dict:
    from ...generator.wan import WanGenerator
    from ...testing.tiny_model import vist3a_config
    from ..nano_models import save_wan_folder

    ws = run.workspace
    out = ws.stage_dir("assemble")
    records = {stage: ws.done_record(stage) for stage in _done_stages(ws)}
    cfg = stitched_config(run)
    folders = {}
    for name, lora in ((PRE_REWARD, None), (MODEL, ws.root / "reward" / "lora")):
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out))
        generator = WanGenerator.from_folder(ws.root / "denoiser" / "wan", lora)  # LoRA merged at load
        save_wan_folder(generator.components, staging / "wan")
        shutil.copytree(ws.root / "recon" / ANYSPLAT_FOLDER, staging / "anysplat")
        shutil.copy2(ws.root / "stitch" / STITCHED_FILE, staging / "anysplat_stitched.pth")
        shutil.copy2(ws.root / "layer_search" / "layer_search.json", staging / "layer_search.json")
        config = vist3a_config(cfg, run.settings.seed)
        config.pop("tiny_model")
        config["nano"] = {"recipe": "vist3a_rt.training.nano", "preset": run.settings.preset,
                          "stage": name, "seed": run.settings.seed}
        (staging / "vist3a.json").write_text(json.dumps(config, indent=2) + "\n")
        write_json(staging / MANIFEST, manifest(staging, records, run, with_reward=lora is not None))
        target = out / name
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        folders[name] = target
    size = folder_bytes(folders[MODEL])
    if size > SIZE_LIMIT_BYTES:
        raise Vist3AInputError(f"the assembled model is {size / 2**20:.1f} MiB, over the "
                               f"{SIZE_LIMIT_BYTES / 2**20:.0f} MiB budget of the embedded model")
    return {"model": str(folders[MODEL]), "pre_reward": str(folders[PRE_REWARD]), "bytes": size}


def _done_stages(ws) -> list[str]:
    from .recipe import STAGES

    return [s for s in STAGES if s != "assemble" and ws.is_done(s)]


def manifest(folder: Path, records: dict, run, *, with_reward: bool) -> dict:
    """How the folder was made: command, commit, settings, per-stage metrics and wall time, file hashes."""
    stages = {name: {k: v for k, v in record.items() if k not in ("settings",)} for name, record in records.items()}
    return {"model": "vist3a-nano", "reward_finetuned": with_reward,
            "commands": sorted({r["command"] for r in records.values() if r.get("command")}),
            "settings": run.settings.to_dict(), "stages": stages,
            "total_wall_s": round(sum(r.get("wall_s", 0.0) for r in records.values()), 1),
            "files": {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
                      for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def install_embedded(model_dir: str | Path) -> Path:
    """Copy an assembled model folder into the package (replacing the previous one atomically)."""
    source = Path(model_dir)
    if not (source / MANIFEST).is_file():
        raise Vist3AInputError(f"{source} is not an assembled nano model (no {MANIFEST})")
    from ...models import embedded_model_dir

    target = embedded_model_dir("nano")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".nano.", dir=target.parent))
    shutil.copytree(source, staging, dirs_exist_ok=True)
    if target.exists():
        old = target.with_name(".nano.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old)
    else:
        staging.rename(target)
    return target
