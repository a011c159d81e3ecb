"""ONNX export of a stage: ``export_onnx(stage, out_dir)`` → a checked, content-addressed ``.onnx``.

Steps: trace with ``torch.export`` at the contract's trace sizes and dynamic shapes, translate with
the dynamo ONNX exporter (its onnxscript optimizer folds constants and drops dead code), check
the graph's inputs and outputs against the contract (names, dtypes, static sizes, every dynamic
axis still dynamic) and name their dims after the contract, save (weights in an external
``.onnx.data`` file when they pass ``external_data_threshold``, 2 GiB by default: protobuf's
limit), run ``onnx.checker`` (full check) and ONNX shape inference on the file. If tracing or
translation fails, the TorchScript exporter is tried for that stage instead, and the artifact
records which exporter made it and why.

Artifacts are content-addressed: the key hashes the weights, the source of every module class
involved, the contract, the precision, the opset and the tool versions. ``<stage>.<precision>.
<key[:16]>.onnx`` sits next to a ``.json`` sidecar written last; an export whose sidecar matches
the key and whose files have their recorded sizes is skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from torch import Tensor, nn

from vist3a_rt.errors import Vist3AInputError

from .spec import Axis, ExportContract, ExportStage, TensorSpec

log = logging.getLogger(__name__)

OPSET = 20
PRECISIONS = ("fp32",)
EXTERNAL_DATA_THRESHOLD = 2 * 1024 ** 3  # protobuf cannot serialize a model of 2 GiB or more
ARTIFACT_FORMAT = 1  # bump when the layout of artifacts or sidecars changes
TOOLS = ("torch", "onnx", "onnxscript", "onnx-ir")
_TORCH_DTYPES = {torch.float32: "FLOAT", torch.float16: "FLOAT16", torch.bfloat16: "BFLOAT16", torch.int64: "INT64",
                 torch.int32: "INT32", torch.bool: "BOOL"}


class ExportError(RuntimeError):
    """The exporter produced no usable graph (an internal failure, not a user error)."""


@dataclass(frozen=True)
class OnnxArtifact:
    """An exported stage on disk and how it was made."""

    stage: str
    path: Path
    key: str
    precision: str
    opset: int
    exporter: str  # "dynamo" or "torchscript"
    export_seconds: float
    contract: ExportContract
    external_data: Path | None = None
    fallback_reason: str | None = None  # why the dynamo exporter was not used
    skipped: bool = False  # True when an existing valid artifact was returned

    @property
    def sidecar(self) -> Path:
        return self.path.with_suffix(".json")

    @classmethod
    def load(cls, path: str | Path) -> "OnnxArtifact":
        """The artifact described by ``path``'s sidecar (``path``: the ``.onnx`` or the ``.json``)."""
        sidecar = Path(path).with_suffix(".json")
        try:
            info = json.loads(sidecar.read_text())
            return cls(stage=info["stage"], path=sidecar.with_name(info["model_file"]), key=info["key"],
                       precision=info["precision"], opset=info["opset"], exporter=info["exporter"],
                       export_seconds=info["export_seconds"], contract=ExportContract.from_dict(info["contract"]),
                       external_data=sidecar.with_name(info["data_file"]) if info["data_file"] else None,
                       fallback_reason=info["fallback_reason"])
        except FileNotFoundError:
            raise Vist3AInputError(f"no export sidecar at {sidecar}") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise Vist3AInputError(f"export sidecar {sidecar} is unreadable: {err}") from None


def export_onnx(stage: ExportStage, out_dir: str | Path, *, precision: str = "fp32", opset: int = OPSET,
                force: bool = False, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> OnnxArtifact:
    """Export ``stage`` to ``out_dir`` (or return the valid artifact already there, ``skipped=True``)."""
    _check_precision(stage, precision)
    out_dir = Path(out_dir)
    key = artifact_key(stage, precision=precision, opset=opset)
    stem = f"{stage.name}.{precision}.{key[:16]}"
    existing = None if force else valid_artifact(out_dir / f"{stem}.onnx", key)
    if existing is not None:
        log.info("%s: valid artifact %s exists, export skipped", stage.name, existing.path.name)
        return existing
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{stem}.", dir=out_dir))
    try:
        return _export_into(stage, staging, out_dir, stem, key, precision, opset, external_data_threshold)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _export_into(stage: ExportStage, staging: Path, out_dir: Path, stem: str, key: str, precision: str,
                 opset: int, external_data_threshold: int) -> OnnxArtifact:
    start = time.perf_counter()
    model, exporter, fallback_reason = _to_onnx_ir(stage, staging, opset)
    staged = staging / f"{stem}.onnx"
    data_file = _save(model, staged, external_data_threshold)
    check_onnx_file(staged)
    seconds = time.perf_counter() - start
    files = [staged] + ([staging / data_file] if data_file else [])
    for file in files:
        file.replace(out_dir / file.name)
    artifact = OnnxArtifact(stage=stage.name, path=out_dir / staged.name, key=key, precision=precision, opset=opset,
                            exporter=exporter, export_seconds=seconds, contract=stage.contract,
                            external_data=out_dir / data_file if data_file else None, fallback_reason=fallback_reason)
    _write_sidecar(artifact)
    log.info("%s: exported with the %s exporter in %.1f s -> %s", stage.name, exporter, seconds, artifact.path)
    return artifact


def _check_precision(stage: ExportStage, precision: str) -> None:
    if precision not in PRECISIONS:
        raise Vist3AInputError(f"precision {precision!r} cannot be exported yet; supported: {list(PRECISIONS)}")
    dtypes = {p.dtype for p in stage.module.parameters() if p.is_floating_point()}
    if dtypes - {torch.float32}:
        raise Vist3AInputError(f"{stage.name}: an fp32 export needs float32 weights, the module has "
                               f"{sorted(str(d) for d in dtypes)}; load the model in float32")


# --- exporting -----------------------------------------------------------------------------------


def _to_onnx_ir(stage: ExportStage, staging: Path, opset: int):
    """The stage as an ``onnx_ir.Model`` whose I/O follows the contract: dynamo exporter first,
    then the TorchScript exporter. Returns (model, exporter name, why dynamo was not used)."""
    try:
        return _dynamo_export(stage, opset), "dynamo", None
    except Exception as err:  # noqa: BLE001 - any exporter failure means: try the other exporter
        reason = f"{type(err).__name__}: {_first_lines(str(err))}"
        log.warning("%s: dynamo export failed (%s); trying the TorchScript exporter", stage.name, reason)
    try:
        return _torchscript_export(stage, staging, opset), "torchscript", reason
    except Exception as err:
        raise ExportError(f"{stage.name}: both exporters failed.\n  dynamo: {reason}\n  torchscript: "
                          f"{type(err).__name__}: {_first_lines(str(err))}") from err


def _dynamo_export(stage: ExportStage, opset: int):
    contract = stage.contract
    args = tuple(contract.sample_inputs("trace").values())
    program = torch.export.export(stage.module, args, dynamic_shapes=contract.dynamic_shapes(), strict=False)
    with _quiet_logger("torch.onnx._internal.exporter._registration"):  # "torchvision is not installed" x4
        onnx_program = torch.onnx.export(program, args, dynamo=True, input_names=contract.input_names,
                                         output_names=contract.output_names, opset_version=opset, optimize=True,
                                         verbose=False)
    conform_io(onnx_program.model, contract)
    return onnx_program.model


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _torchscript_export(stage: ExportStage, staging: Path, opset: int):
    import onnx_ir as ir
    import onnxscript.optimizer

    contract = stage.contract
    path = staging / "torchscript" / "model.onnx"
    path.parent.mkdir()
    args = tuple(contract.sample_inputs("trace").values())
    with torch.no_grad():
        torch.onnx.export(stage.module, args, str(path), dynamo=False, input_names=contract.input_names,
                          output_names=contract.output_names, dynamic_axes=contract.dynamic_axes(),
                          opset_version=opset)
    model = ir.load(path)
    conform_io(model, contract)
    return onnxscript.optimizer.optimize(model)


def _first_lines(text: str, count: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[:count])


def conform_io(model, contract: ExportContract) -> None:
    """Check an ``onnx_ir.Model``'s inputs and outputs against ``contract`` and name their dynamic
    dims after it. A static axis the exporter left symbolic is pinned to its size; a dynamic axis
    the exporter made static is an ``ExportError`` (the trace specialized it)."""
    import onnx_ir as ir

    dynamic = set(contract.profile.dynamic_dims)
    opt = contract.profile.sizes("opt")
    for kind, values, specs in (("input", model.graph.inputs, contract.inputs),
                                ("output", model.graph.outputs, contract.outputs)):
        names, expected = [v.name for v in values], [s.name for s in specs]
        if names != expected:
            raise ExportError(f"{contract.stage}: graph {kind}s are {names}, the contract says {expected}")
        for value, spec in zip(values, specs):
            _check_dtype(contract.stage, value, spec)
            value.shape = ir.Shape(_conformed_dims(contract.stage, value, spec, dynamic, opt))


def _check_dtype(stage: str, value, spec: TensorSpec) -> None:
    if value.dtype is None or value.dtype.name != _TORCH_DTYPES.get(spec.dtype):
        raise ExportError(f"{stage}: {value.name!r} is {value.dtype}, the contract says {spec.dtype}")


def _conformed_dims(stage: str, value, spec: TensorSpec, dynamic: set[str], opt: Mapping[str, int]) -> list:
    import onnx_ir as ir

    dims = list(value.shape) if value.shape is not None else [None] * len(spec.axes)
    if len(dims) != len(spec.axes):
        raise ExportError(f"{stage}: {value.name!r} has rank {len(dims)}, the contract says {len(spec.axes)}")
    result = []
    for i, (dim, axis) in enumerate(zip(dims, spec.axes)):
        if isinstance(axis, Axis) and axis.dim in dynamic:
            if isinstance(dim, int):
                raise ExportError(f"{stage}: axis {i} ({axis.name}) of {value.name!r} came out static ({dim}): "
                                  "the trace specialized a dynamic dim")
            result.append(ir.SymbolicDim(axis.name))
            continue
        size = axis if isinstance(axis, int) else axis.size(opt)
        if isinstance(dim, int) and dim != size:
            raise ExportError(f"{stage}: axis {i} of {value.name!r} is {dim}, the contract says {size}")
        result.append(size)
    return result


def _save(model, path: Path, external_data_threshold: int) -> str | None:
    """Save the model; past the threshold its weights go to ``<name>.data`` beside it (returns
    that file's name; tensors under 256 bytes stay inline, as onnx_ir does)."""
    import onnx_ir as ir

    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if weight_bytes < external_data_threshold:
        ir.save(model, path)
        return None
    data_file = f"{path.name}.data"
    ir.save(model, path, external_data=data_file)
    return data_file if (path.parent / data_file).is_file() else None


def check_onnx_file(path: str | Path) -> None:
    """``onnx.checker`` (full: includes strict shape inference), then shape inference written into
    the file (value_info for every intermediate tensor). Works for models with external data."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
        onnx.shape_inference.infer_shapes_path(str(path), str(path), check_type=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ExportError(f"{Path(path).name} failed the ONNX checks: {_first_lines(str(err))}") from err


# --- content addressing --------------------------------------------------------------------------


def artifact_key(stage: ExportStage, *, precision: str = "fp32", opset: int = OPSET) -> str:
    """sha256 over what determines the artifact: weights, code, contract, precision, opset, tools."""
    recipe = {"format": ARTIFACT_FORMAT, "stage": stage.name, "contract": stage.contract.to_dict(),
              "weights": weights_digest(stage.module), "code": code_digest(stage.module), "precision": precision,
              "opset": opset, "tools": tool_versions()}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def weights_digest(module: nn.Module) -> str:
    """sha256 of every parameter and buffer: name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _tensor_bytes(tensor: Tensor) -> memoryview:
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def code_digest(module: nn.Module) -> str:
    """sha256 over the source files of every module class in ``module`` and of this package (as a
    set of file hashes, so it does not depend on where they are installed): an edit to the model
    code, ours or a library's, invalidates the artifacts built from it."""
    files = {Path(__file__), Path(inspect.getsourcefile(ExportContract))}
    files |= {Path(source) for sub in module.modules() if (source := inspect.getsourcefile(type(sub)))}
    hashes = sorted(hashlib.sha256(file.read_bytes()).hexdigest() for file in files)
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()


def tool_versions() -> dict[str, str]:
    versions = {}
    for tool in TOOLS:
        try:
            versions[tool] = metadata.version(tool)
        except metadata.PackageNotFoundError:
            versions[tool] = "absent"
    return versions


def valid_artifact(path: Path, key: str) -> OnnxArtifact | None:
    """The artifact at ``path`` if its sidecar names ``key`` and its files have the recorded sizes."""
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        info = json.loads(sidecar.read_text())
        artifact = OnnxArtifact.load(sidecar)
    except (Vist3AInputError, json.JSONDecodeError):
        return None
    files = [artifact.path] + ([artifact.external_data] if artifact.external_data else [])
    sizes = info.get("file_sizes", {})
    if info.get("key") != key or any(not f.is_file() or f.stat().st_size != sizes.get(f.name) for f in files):
        return None
    return dataclasses.replace(artifact, skipped=True)


def _write_sidecar(artifact: OnnxArtifact) -> None:
    files = [artifact.path] + ([artifact.external_data] if artifact.external_data else [])
    info = {"key": artifact.key, "stage": artifact.stage, "precision": artifact.precision, "opset": artifact.opset,
            "exporter": artifact.exporter, "fallback_reason": artifact.fallback_reason,
            "export_seconds": round(artifact.export_seconds, 3), "model_file": artifact.path.name,
            "data_file": artifact.external_data.name if artifact.external_data else None,
            "file_sizes": {f.name: f.stat().st_size for f in files}, "tools": tool_versions(),
            "contract": artifact.contract.to_dict()}
    staged = artifact.sidecar.with_suffix(".json.tmp")
    staged.write_text(json.dumps(info, indent=2) + "\n")
    staged.replace(artifact.sidecar)
