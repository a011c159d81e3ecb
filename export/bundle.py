"""``export_bundle(source, out)``: a model folder → a self-contained bundle (see ``vist3a_rt.bundle.format``).

Steps, each recorded in the manifest with the key of what it was made from; a step whose file
in the existing bundle still has that key and its recorded sha256 is not redone (its files are
hard-linked into the new bundle):

1. check the source (an official-layout model folder, a recipe's assembled folder, or ``"nano"``)
   and the destination, hash every source file, load the model with the torch pipeline;
2. ``weights/*.safetensors``: the four components' state dicts, LoRA merged, at the bundle
   precision where it applies (``REDUCED_STAGES``);
3. the tokenizer files, the scheduler config, the default negative prompt's embedding;
4. ``onnx/*.onnx``: every stage exported at fp32 (``export_onnx``), then converted for fp16 /
   bf16 bundles (``onnx_precision``);
5. ``manifest.json``, then the new bundle replaces the old one.

Atomicity: the bundle is assembled in a hidden sibling folder and renamed into place when complete,
so ``out`` is always either the previous bundle or the new one; a failure removes the sibling.
A TensorRT ``engines/`` folder of the previous bundle is carried over (each plan's own record
says whether it still fits the ONNX). Bad sources, a destination that is not a bundle, or one that
cannot be written are ``Vist3AInputError``s raised before anything is written.

Precision: fp16 and bf16 apply to the denoiser and the stitched decoder (the bulk of the weights
and of the time); the VAE stays fp32 (Wan's VAE is run in fp32, as diffusers recommends) and so
does the text encoder under fp16 (T5-family activations overflow float16; the official model runs
it in bf16, so a bf16 bundle does convert it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from vist3a_rt.bundle.format import (FORMAT, FORMAT_VERSION, MANIFEST, NEGATIVE_PROMPT_FILE, PRECISIONS,
                                     SCHEDULER_FILE, STAGES, TOKENIZER_DIR, is_bundle, sha256_file, sha256_json,
                                     weights_file)
from vist3a_rt.errors import CheckpointError, Vist3AInputError

log = logging.getLogger(__name__)

BACKENDS = ("onnx", "tensorrt")
REDUCED_STAGES = {"fp32": (), "fp16": ("denoiser", "stitched_decoder"),
                  "bf16": ("text_encoder", "denoiser", "stitched_decoder")}
_WEIGHTS_STAGE = {"text_encoder": "text_encoder", "transformer": "denoiser", "vae": "vae_decoder",
                  "stitched_decoder": "stitched_decoder"}
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOOLS = ("torch", "onnx", "onnxruntime", "onnxscript", "onnx-ir", "safetensors", "tokenizers", "diffusers",
         "transformers", "peft")
CARRIED_OVER = ("engines",)


@dataclass
class ExportStep:
    """One artifact step: ``skipped`` when the previous bundle's valid files were kept."""

    name: str
    skipped: bool
    seconds: float


@dataclass
class ExportReport:
    """What ``export_bundle`` did: the bundle, its manifest, and each step (skipped or made)."""

    bundle: Path
    manifest: dict
    steps: list[ExportStep] = field(default_factory=list)

    @property
    def made(self) -> list[str]:
        return [s.name for s in self.steps if not s.skipped]


def export_bundle(source: str | Path, out: str | Path, *, precision: str = "fp32", backend: str = "onnx",
                  log_step: Callable[[str], None] | None = None) -> ExportReport:
    """Export ``source`` to the bundle directory ``out`` (see the module docstring)."""
    if precision not in PRECISIONS:
        raise Vist3AInputError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if backend not in BACKENDS:
        raise Vist3AInputError(f"export backend must be one of {list(BACKENDS)}, got {backend!r}")
    start = time.perf_counter()
    source_dir, source_label = resolve_source(source)
    out = Path(out).absolute()
    previous = check_destination(out, source_dir)
    source_files = {str(p.relative_to(source_dir)): sha256_file(p)
                    for p in sorted(source_dir.rglob("*")) if p.is_file()}
    model = _load_model(source_dir)
    staging = _make_staging(out)
    try:
        writer = _BundleWriter(staging, model, source_dir, precision, previous, log_step)
        writer.write_all()
        manifest = writer.manifest(source_dir, source_label, source_files, time.perf_counter() - start)
        _write_json(staging / MANIFEST, manifest)
        _carry_over(previous, staging)
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report = ExportReport(out, manifest, writer.steps)
    if backend == "tensorrt":
        build_tensorrt_engines(out, precision)
    return report


# --- source and destination ----------------------------------------------------------------------


def resolve_source(source: str | Path) -> tuple[Path, str]:
    """The model folder and how the manifest names it (``"nano"`` → the embedded model)."""
    from vist3a_rt.models import EMBEDDED_MODELS, embedded_model
    from vist3a_rt.pipeline.model_folder import ModelPaths

    if isinstance(source, str) and source in EMBEDDED_MODELS and not Path(source).exists():
        return embedded_model(source), f"embedded:{source}"
    folder = Path(source).absolute()
    if is_bundle(folder):
        raise Vist3AInputError(f"{folder} is already an exported bundle; export from the model folder it came from")
    ModelPaths.from_folder(folder)  # a precise error naming what is missing
    return folder, str(folder)


def check_destination(out: Path, source_dir: Path) -> Path | None:
    """Refuse destinations that are not (or cannot become) a bundle; return ``out`` when it is one."""
    resolved, source = out.resolve(), source_dir.resolve()
    if resolved == source or source in resolved.parents or resolved in source.parents:
        raise Vist3AInputError(f"the bundle {out} and the source {source_dir} must not contain each other")
    if out.exists() and not out.is_dir():
        raise Vist3AInputError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not is_bundle(out):
        raise Vist3AInputError(f"--out {out} is a non-empty directory that is not a vist3a-rt bundle; "
                               "choose a new path (an existing bundle is updated in place)")
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise Vist3AInputError(f"cannot write the bundle {out}: {ancestor} is not a writable directory")
    return out if is_bundle(out) else None


def _make_staging(out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.exporting-", dir=out.parent))
    except OSError as err:
        raise Vist3AInputError(f"cannot write the bundle {out}: {err.strerror or err}") from None


def _load_model(source_dir: Path):
    from vist3a_rt.pipeline.vist3a import Vist3A

    # the library classes: the bundle records their configs and class names, and saves their tokenizer
    return Vist3A.load(source_dir, backend="torch", dtype=torch.float32, wan_impl="diffusers")


def _swap_into_place(staging: Path, out: Path) -> None:
    if not out.exists():
        staging.rename(out)
        return
    aside = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    out.rename(aside)
    staging.rename(out)
    shutil.rmtree(aside, ignore_errors=True)


def _carry_over(previous: Path | None, staging: Path) -> None:
    for name in CARRIED_OVER if previous is not None else ():
        if (previous / name).is_dir():
            for file in sorted((previous / name).rglob("*")):
                if file.is_file():
                    _link(file, staging / file.relative_to(previous))


def _link(existing: Path, new: Path) -> None:
    new.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(existing, new)
    except OSError:
        shutil.copy2(existing, new)


def _write_json(path: Path, value) -> None:
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_text(json.dumps(value, indent=1, sort_keys=False) + "\n")
    staged.replace(path)


# --- the steps -----------------------------------------------------------------------------------


class _BundleWriter:
    """Writes each artifact into ``root`` (the staging folder), reusing valid ones of ``previous``."""

    def __init__(self, root: Path, model, source_dir: Path, precision: str, previous: Path | None,
                 log_step: Callable[[str], None] | None) -> None:
        from vist3a_rt.pipeline.model_folder import ModelPaths

        self.root, self.model, self.precision = root, model, precision
        self.model_paths = ModelPaths.from_folder(source_dir)
        self.previous = previous
        self.old = _read_old_manifest(previous)
        self.artifacts: dict[str, dict] = {}
        self.stages: dict[str, dict] = {}
        self.steps: list[ExportStep] = []
        self.log_step = log_step or (lambda line: log.info("%s", line))
        self._digests: dict[int, str] = {}

    # the components and their digests

    @property
    def components(self) -> dict[str, torch.nn.Module]:
        generator = self.model.generator
        return {"text_encoder": generator.components.text_encoder, "transformer": generator.transformer,
                "vae": generator.vae, "stitched_decoder": self.model.decoder}

    def digest(self, module: torch.nn.Module) -> str:
        from .onnx_export import weights_digest

        if id(module) not in self._digests:
            self._digests[id(module)] = weights_digest(module)
        return self._digests[id(module)]

    def stage_precision(self, stage: str) -> str:
        return self.precision if stage in REDUCED_STAGES[self.precision] else "fp32"

    def write_all(self) -> None:
        for component, module in self.components.items():
            self.weights(component, module)
        self.tokenizer()
        self.scheduler()
        self.negative_prompt()
        from .contracts import model_stages

        for name, stage in model_stages(self.model).items():
            self.onnx_stage(name, stage)

    # one step: reuse or make

    def step(self, name: str, key: str, files: list[str], make: Callable[[], list[str] | None]) -> list[str]:
        """Reuse ``files`` from the previous bundle when all carry ``key`` and their recorded hash;
        else ``make()`` them (it returns the files it wrote when they are not known beforehand)."""
        start = time.perf_counter()
        reused = bool(files) and self._reusable(key, files)
        if reused:
            for file in files:
                _link(self.previous / file, self.root / file)
                self.artifacts[file] = self.old["artifacts"][file]
        else:
            for file in files:
                (self.root / file).parent.mkdir(parents=True, exist_ok=True)
            files = make() or files
            for file in files:
                path = self.root / file
                self.artifacts[file] = {"sha256": sha256_file(path), "bytes": path.stat().st_size, "key": key}
        seconds = time.perf_counter() - start
        self.steps.append(ExportStep(name, reused, seconds))
        self.log_step(f"{name}: {'valid, kept' if reused else 'written'} ({seconds:.1f} s)")
        return files

    def _reusable(self, key: str, files: list[str]) -> bool:
        if self.previous is None:
            return False
        recorded = self.old.get("artifacts", {})
        for file in files:
            entry, path = recorded.get(file), self.previous / file
            if not entry or entry.get("key") != key or not path.is_file() or path.stat().st_size != entry["bytes"]:
                return False
            if sha256_file(path) != entry["sha256"]:
                log.warning("%s in the existing bundle does not match its recorded sha256; re-exporting it", file)
                return False
        return True

    # the artifacts

    def weights(self, component: str, module: torch.nn.Module) -> None:
        from vist3a_rt.bundle.weights import save_state

        precision = self.stage_precision(_WEIGHTS_STAGE[component])
        file = weights_file(component)
        key = sha256_json({"artifact": file, "weights": self.digest(module), "precision": precision,
                           "format": FORMAT_VERSION, "safetensors": _version("safetensors")})
        self.step(f"weights/{component}", key, [file],
                  lambda: save_state(module.state_dict(), self.root / file, dtype=_DTYPES[precision],
                                     metadata={"component": component, "precision": precision}))

    def tokenizer(self) -> None:
        tokenizer = self.model.generator.components.tokenizer
        files = [f"{TOKENIZER_DIR}/tokenizer.json", f"{TOKENIZER_DIR}/tokenizer_config.json"]
        source = self.model_paths.wan / "tokenizer"
        key = sha256_json({"artifact": TOKENIZER_DIR, "format": FORMAT_VERSION,
                           "transformers": _version("transformers"),
                           "files": {p.name: sha256_file(p) for p in sorted(source.iterdir()) if p.is_file()}})

        def make() -> None:
            scratch = Path(tempfile.mkdtemp(dir=self.root))
            try:
                tokenizer.save_pretrained(scratch)
                for file in files:
                    if not (scratch / Path(file).name).is_file():
                        raise CheckpointError(f"the source tokenizer cannot be saved as {Path(file).name} "
                                              "(the bundle needs a fast tokenizer: tokenizer.json)")
                    (scratch / Path(file).name).replace(self.root / file)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)

        self.step("tokenizer", key, files, make)

    def scheduler(self) -> None:
        source = self.model_paths.wan / "scheduler" / "scheduler_config.json"
        key = sha256_json({"artifact": SCHEDULER_FILE, "source": sha256_file(source)})
        self.step("scheduler", key, [SCHEDULER_FILE],
                  lambda: shutil.copyfile(source, self.root / SCHEDULER_FILE) and None)

    def negative_prompt(self) -> None:
        from vist3a_rt.bundle.weights import save_state
        from vist3a_rt.generator.text import OFFICIAL_NEGATIVE_PROMPT

        text_encoder = self.components["text_encoder"]
        key = sha256_json({"artifact": NEGATIVE_PROMPT_FILE, "text": OFFICIAL_NEGATIVE_PROMPT,
                           "weights": self.digest(text_encoder), "tokenizer": self.artifacts[
                               f"{TOKENIZER_DIR}/tokenizer.json"]["sha256"], "format": FORMAT_VERSION,
                           "torch": torch.__version__})

        def make() -> None:
            embedding = self.model.generator.encode_prompt([OFFICIAL_NEGATIVE_PROMPT], allow_empty=True)[0]
            save_state({"embedding": embedding.float()}, self.root / NEGATIVE_PROMPT_FILE,
                       metadata={"text": OFFICIAL_NEGATIVE_PROMPT})

        self.step("negative_prompt", key, [NEGATIVE_PROMPT_FILE], make)

    def onnx_stage(self, name: str, stage) -> None:
        from .onnx_export import artifact_key, export_onnx
        from .onnx_precision import conversion_key, convert_artifact

        precision = self.stage_precision(name)
        fp32_key = artifact_key(stage, precision="fp32")
        key = fp32_key if precision == "fp32" else conversion_key(fp32_key, precision)
        old = self.old.get("stages", {}).get(name, {})

        def make() -> list[str]:
            onnx_dir = self.root / "onnx"
            onnx_dir.mkdir(exist_ok=True)
            fp32 = self._previous_fp32(name, fp32_key) if precision != "fp32" else None
            if precision == "fp32":
                artifact = export_onnx(stage, onnx_dir)
            elif fp32 is not None:  # the previous bundle has this stage's fp32 graph: convert it
                artifact = convert_artifact(fp32, onnx_dir, precision)
            else:
                scratch = Path(tempfile.mkdtemp(prefix=".fp32-", dir=self.root))
                try:
                    artifact = convert_artifact(export_onnx(stage, scratch), onnx_dir, precision)
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
            return [_relative(self.root, p) for p in _artifact_files(artifact)]

        files = self.step(f"onnx/{name}", key, old.get("files", []) if old.get("key") == key else [], make)
        artifact = _artifact_of(self.root / next(f for f in files if f.endswith(".onnx")))
        self.stages[name] = {
            "onnx": _relative(self.root, artifact.path),
            "external_data": _relative(self.root, artifact.external_data) if artifact.external_data else None,
            "files": files, "key": key, "precision": precision, "exporter": artifact.exporter,
            "fallback_reason": artifact.fallback_reason, "opset": artifact.opset,
            "export_seconds": artifact.export_seconds, "contract": artifact.contract.to_dict()}

    def _previous_fp32(self, name: str, fp32_key: str):
        """The previous bundle's valid fp32 artifact of stage ``name`` with key ``fp32_key``, if any."""
        old = self.old.get("stages", {}).get(name, {})
        if old.get("key") != fp32_key or not self._reusable(fp32_key, old.get("files", [])):
            return None
        return _artifact_of(self.previous / old["onnx"])

    # the manifest

    def manifest(self, source_dir: Path, source_label: str, source_files: dict, seconds: float) -> dict:
        model, generator = self.model, self.model.generator
        vae_config = generator.vae.config
        settings = model.defaults
        _, _, T_lat, h, w = generator.latent_shape(1, settings.num_frames, settings.height, settings.width)
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "family": _family(source_dir), "precision": self.precision,
            "stage_precisions": {name: self.stage_precision(name) for name in STAGES},
            "created_with": {"vist3a-rt": _version("vist3a-rt"), "git_commit": _git_commit(),
                             **{tool: _version(tool) for tool in TOOLS}},
            "source": {"path": source_label, "files": source_files, "digest": sha256_json(source_files)},
            "generation": {"defaults": asdict(settings),
                           "max_sequence_length": generator.text_encoder.max_sequence_length,
                           "latent_shape": [1, vae_config.z_dim, T_lat, h, w],
                           "frame_size": list(model.decoder.frame_size((h, w))),
                           "closed_vocabulary": bool(model.closed_vocabulary)},
            "configs": {"text_encoder": json.loads(generator.components.text_encoder.config.to_json_string()),
                        "transformer": _plain(dict(generator.transformer.config)),
                        "vae": _plain(dict(vae_config)), "stitched_decoder": model.decoder.config.to_dict()},
            "classes": {name: f"{type(module).__module__.split('.')[0]}.{type(module).__name__}"
                        for name, module in self.components.items()},
            "latents": {"mean": list(vae_config.latents_mean), "std": list(vae_config.latents_std),
                        "z_dim": vae_config.z_dim, "scale_factor_temporal": vae_config.scale_factor_temporal,
                        "scale_factor_spatial": vae_config.scale_factor_spatial},
            "negative_prompt": {"file": NEGATIVE_PROMPT_FILE, "text": _official_negative_prompt()},
            "tokenizer": TOKENIZER_DIR, "scheduler": SCHEDULER_FILE,
            "weights": {name: weights_file(name) for name in self.components},
            "stages": self.stages,
            "artifacts": dict(sorted(self.artifacts.items())),
            "export": {"seconds": round(seconds, 2),
                       "steps": {s.name: {"skipped": s.skipped, "seconds": round(s.seconds, 2)} for s in self.steps}},
        }


def _read_old_manifest(previous: Path | None) -> dict:
    if previous is None:
        return {}
    try:
        manifest = json.loads((previous / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return manifest if manifest.get("format_version") == FORMAT_VERSION else {}


def _artifact_of(path: Path):
    from .onnx_export import OnnxArtifact

    return dataclasses.replace(OnnxArtifact.load(path.with_suffix(".json")), skipped=True)


def _artifact_files(artifact) -> list[Path]:
    return [artifact.path, artifact.sidecar] + ([artifact.external_data] if artifact.external_data else [])


def _relative(root: Path, path: Path) -> str:
    return str(Path(path).relative_to(root))


def _family(source_dir: Path) -> str:
    """``nano`` for models made by the nano recipe (their manifest says so), else ``wan-anysplat``."""
    try:
        return "nano" if json.loads((source_dir / "manifest.json").read_text()).get("model") == "vist3a-nano" \
            else "wan-anysplat"
    except (OSError, ValueError, AttributeError):
        return "wan-anysplat"


def _official_negative_prompt() -> str:
    from vist3a_rt.generator.text import OFFICIAL_NEGATIVE_PROMPT

    return OFFICIAL_NEGATIVE_PROMPT


def _plain(config: dict) -> dict:
    """A diffusers config as JSON values (tuples → lists)."""
    return json.loads(json.dumps(config, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def _git_commit() -> str | None:
    """The commit of the vist3a-rt checkout this code runs from (``+dirty`` with local edits), if any."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10,
                                check=False)
        if commit.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=False)
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


# --- TensorRT --------------------------------------------------------------------------------------


def build_tensorrt_engines(bundle: Path, precision: str):
    """Engines for the bundle's stages, when TensorRT and the engine builder are installed."""
    import importlib
    import importlib.util

    from vist3a_rt.backends import BackendUnavailableError

    if importlib.util.find_spec("tensorrt") is None:
        raise BackendUnavailableError(
            f"TensorRT is not installed here, so no engines were built; the ONNX bundle {bundle} is complete. "
            "On a machine with an NVIDIA GPU: pip install tensorrt, then run the same `vist3a-rt export "
            "--backend tensorrt` command again (the ONNX steps are skipped, only engines/*.plan are built)")
    try:
        builder = importlib.import_module("vist3a_rt.export.tensorrt_build")
    except ModuleNotFoundError as err:
        raise BackendUnavailableError(f"this vist3a-rt has no TensorRT engine builder ({err}); the ONNX bundle "
                                      f"{bundle} is complete") from None
    return builder.build_engines(bundle, precision)
