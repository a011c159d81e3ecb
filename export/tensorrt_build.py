"""TensorRT engines for an exported bundle: ``build_engines(bundle_dir, precision="fp16")``.

One engine per ONNX stage of the bundle (``bundle/onnx``), written to ``bundle/engines`` under a
name that says what it is specific to (``vist3a_rt.backends.tensorrt_backend.engine_file_name``)::

    engines/denoiser.h100-80gb-hbm3.sm90.fp16.trt10.3.plan
    engines/denoiser.h100-80gb-hbm3.sm90.fp16.trt10.3.plan.json     build record (written last)
    engines/timing_cache.h100-80gb-hbm3.sm90.trt10.3.bin            tactic timings, shared by all builds

Per stage:

1. the stage's export contract (from the exporter's sidecar beside the ``.onnx``) gives the
   optimization profile: each input's (min, opt, max) shape, checked against the ONNX graph's
   inputs first (names, ranks, dtypes, static sizes; every profile-dynamic axis must be
   symbolic in the graph) so a stale or foreign ONNX fails here, not deep inside TensorRT;
2. the engine is skipped when a plan of the same name exists whose record matches: the
   sha256 of the ONNX (model file and external weights), precision, profile, full TensorRT
   version, GPU and workspace limit, and whose size is the recorded one;
3. otherwise the ONNX is parsed (``trt.OnnxParser``), the profile, precision flag (fp16 /
   bf16; fp32 leaves TensorRT's default TF32 on) and workspace limit are set, the persistent
   timing cache is loaded, the engine is built with ``build_serialized_network``, the updated
   timing cache is saved, then the plan and, last, its record are renamed into place.

Which ONNX files form the bundle: ``manifest.json``'s ``"stages"`` when it names them (each
entry a dict with an ``"onnx"`` path relative to the bundle and the stage's ``"contract"``, or
else the exporter's sidecar beside the file), otherwise every exporter sidecar in
``bundle/onnx`` (one artifact per stage; several for one stage is an error).

Steps 1 and 2 need only ``onnx``; step 3 needs ``tensorrt`` and a CUDA GPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vist3a_rt.backends.tensorrt_backend import (ENGINE_PRECISIONS, EngineRecord, EngineTarget, current_target,
                                                 engine_file_name, import_tensorrt, timing_cache_file_name)
from vist3a_rt.errors import Vist3AInputError

from .onnx_export import ExportError, OnnxArtifact
from .spec import POINTS, ExportContract

log = logging.getLogger(__name__)

# Builder flags per precision (TensorRT ``BuilderFlag`` member names). The graph's I/O stays float32
# either way: the flags let TensorRT choose reduced-precision kernels inside the engine.
PRECISION_FLAGS = {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",)}
# ONNX TensorProto element types of the tensors a contract may use.
ONNX_ELEMENT_TYPES = {1: "float32", 10: "float16", 16: "bfloat16", 6: "int32", 7: "int64", 9: "bool"}
_HASH_CHUNK = 16 * 2**20

Shape = tuple[int, ...]


@dataclass(frozen=True)
class StageOnnx:
    """One stage of a bundle: its ONNX file and export contract."""

    stage: str
    onnx: Path
    contract: ExportContract


@dataclass(frozen=True)
class EngineStep:
    """What ``build_engines`` does for one stage: build the engine or keep the one there."""

    stage: StageOnnx
    plan: Path
    expected: EngineRecord  # the record a valid plan has (build time and size aside)
    up_to_date: bool
    reason: str  # why it is (not) rebuilt


@dataclass(frozen=True)
class EngineArtifact:
    stage: str
    plan: Path
    record: EngineRecord
    skipped: bool  # True: a valid engine was already there


# --- the bundle's stages -------------------------------------------------------------------------


def bundle_stages(bundle_dir: str | Path) -> list[StageOnnx]:
    """The ONNX stages of a bundle (see the module docstring for where they are listed)."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise Vist3AInputError(f"bundle folder not found: {bundle_dir}")
    listed = _manifest_stage_entries(bundle_dir)
    if listed is not None:
        return [_stage_from_entry(bundle_dir, stage, entry) for stage, entry in listed.items()]
    by_stage: dict[str, list[OnnxArtifact]] = {}
    for sidecar in sorted((bundle_dir / "onnx").glob("*.json")):
        artifact = OnnxArtifact.load(sidecar)
        by_stage.setdefault(artifact.stage, []).append(artifact)
    if not by_stage:
        raise Vist3AInputError(f"{bundle_dir} has no exported ONNX stages (no sidecars in {bundle_dir / 'onnx'}); "
                               "export the model first (vist3a-rt export)")
    several = {stage: [a.path.name for a in artifacts] for stage, artifacts in by_stage.items() if len(artifacts) > 1}
    if several:
        raise Vist3AInputError(f"{bundle_dir / 'onnx'} holds several exports of one stage: {several}; "
                               "remove the stale ones or list the current ones in manifest.json")
    return [StageOnnx(stage, a.path, a.contract) for stage, (a,) in sorted(by_stage.items())]


def _manifest_stage_entries(bundle_dir: Path) -> dict[str, Mapping] | None:
    manifest = bundle_dir / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        stages = json.loads(manifest.read_text()).get("stages")
    except (json.JSONDecodeError, AttributeError) as err:
        raise Vist3AInputError(f"{manifest} is not a JSON object: {err}") from None
    if not isinstance(stages, Mapping) or not all(isinstance(v, Mapping) and "onnx" in v for v in stages.values()):
        return None
    return dict(stages)


def _stage_from_entry(bundle_dir: Path, stage: str, entry: Mapping) -> StageOnnx:
    """A manifest entry: its ``"onnx"`` path, and its ``"contract"`` or else the exporter's sidecar."""
    path = bundle_dir / entry["onnx"]
    if not path.is_file():
        raise Vist3AInputError(f"stage {stage!r}: ONNX file not found: {path}")
    if "contract" in entry:
        return StageOnnx(stage, path, ExportContract.from_dict(entry["contract"]))
    artifact = OnnxArtifact.load(path)
    if artifact.stage != stage:
        raise Vist3AInputError(f"{path.name} is an export of stage {artifact.stage!r}, listed as {stage!r}")
    return StageOnnx(stage, path, artifact.contract)


# --- the optimization profile --------------------------------------------------------------------


@dataclass(frozen=True)
class GraphInput:
    name: str
    dtype: str  # "float32", "int64", ... or "onnx type N"
    dims: tuple[int | None, ...]  # None: symbolic (dynamic) axis


def onnx_graph_inputs(onnx_path: str | Path) -> list[GraphInput]:
    """The graph's real inputs (initializers listed as inputs by old exporters left out); reads
    the model without its external weights."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    inputs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
        inputs.append(GraphInput(value.name, ONNX_ELEMENT_TYPES.get(tensor.elem_type, f"onnx type {tensor.elem_type}"),
                                 dims))
    return inputs


def profile_shapes(contract: ExportContract,
                   graph_inputs: Sequence[GraphInput]) -> dict[str, tuple[Shape, Shape, Shape]]:
    """The TensorRT optimization profile of a stage: input name -> (min, opt, max) shape, for every
    input with a symbolic axis in the graph, after checking the graph's inputs against the contract."""
    graph = {g.name: g for g in graph_inputs}
    if set(graph) != set(contract.input_names):
        raise Vist3AInputError(f"{contract.stage}: the ONNX graph's inputs are {sorted(graph)}, its contract's "
                               f"are {sorted(contract.input_names)}; re-export the stage")
    contract_shapes = contract.profile_shapes()
    profile = {}
    for spec in contract.inputs:
        shapes = contract_shapes[spec.name]
        _check_graph_input(contract.stage, graph[spec.name], str(spec.dtype).removeprefix("torch."), shapes)
        if None in graph[spec.name].dims:
            profile[spec.name] = shapes
    return profile


def _check_graph_input(stage: str, graph_input: GraphInput, dtype: str, shapes: tuple[Shape, Shape, Shape]) -> None:
    name, dims = graph_input.name, graph_input.dims
    where = f"{stage}: ONNX input {name!r}"
    if graph_input.dtype != dtype:
        raise Vist3AInputError(f"{where} is {graph_input.dtype}, the contract says {dtype}")
    if len(dims) != len(shapes[0]):
        raise Vist3AInputError(f"{where} has rank {len(dims)}, the contract's shapes have rank {len(shapes[0])}")
    for axis, dim in enumerate(dims):
        sizes = {point: shape[axis] for point, shape in zip(POINTS, shapes)}
        if dim is not None and set(sizes.values()) != {dim}:
            raise Vist3AInputError(f"{where} fixes axis {axis} at {dim}, but the contract's profile gives "
                                   f"{sizes}; re-export the stage")


# --- what to build, what to keep ------------------------------------------------------------------


def onnx_sha256(onnx_path: str | Path) -> str:
    """sha256 over the model file and its external-data files (by name, in name order)."""
    import onnx

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    locations = sorted({entry.value for t in model.graph.initializer for entry in t.external_data
                        if entry.key == "location"})
    digest = hashlib.sha256()
    for path in [onnx_path, *(onnx_path.parent / location for location in locations)]:
        if not path.is_file():
            raise Vist3AInputError(f"{onnx_path.name} refers to external data {path.name}, which is missing")
        digest.update(f"{path.name}\n".encode())
        with path.open("rb") as file:
            while chunk := file.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def expected_record(stage: StageOnnx, target: EngineTarget, precision: str, *,
                    workspace_bytes: int | None = None) -> EngineRecord:
    """The record a valid engine of ``stage`` has (``plan_bytes`` and ``build_seconds`` unknown: 0)."""
    profile = profile_shapes(stage.contract, onnx_graph_inputs(stage.onnx))
    return EngineRecord(stage=stage.stage, plan_file=engine_file_name(stage.stage, target, precision), plan_bytes=0,
                        onnx_file=stage.onnx.name, onnx_sha256=onnx_sha256(stage.onnx), precision=precision,
                        target=target, profile={name: [list(s) for s in shapes] for name, shapes in profile.items()},
                        contract=stage.contract.to_dict(), workspace_bytes=workspace_bytes)


# Fields a valid engine's record must share with the expected one (the rest describe the build).
_MATCHING_FIELDS = ("format", "stage", "plan_file", "onnx_sha256", "precision", "target", "profile", "contract",
                    "workspace_bytes")


def engine_status(plan: Path, expected: EngineRecord) -> tuple[bool, str]:
    """(up to date, why): whether the plan at ``plan`` is a valid build of ``expected``."""
    if not plan.is_file():
        return False, "no engine yet"
    try:
        record = EngineRecord.load(plan)
    except Vist3AInputError as err:
        return False, f"no usable build record ({err})"
    if record.format != expected.format:
        return False, f"build record format {record.format}, expected {expected.format}"
    if record.target.tensorrt_version != expected.target.tensorrt_version:
        built, here = record.target.tensorrt_version, expected.target.tensorrt_version
        return False, f"built with TensorRT {built}, this is {here}"
    for name in _MATCHING_FIELDS:
        if getattr(record, name) != getattr(expected, name):
            return False, f"{name.replace('_', ' ')} changed since the engine was built"
    if plan.stat().st_size != record.plan_bytes:
        return False, f"plan is {plan.stat().st_size} bytes, its record says {record.plan_bytes} (incomplete write?)"
    return True, "valid engine exists"


def plan_engine_steps(bundle_dir: str | Path, target: EngineTarget, precision: str = "fp16", *,
                      stages: Sequence[str] | None = None, workspace_bytes: int | None = None,
                      force: bool = False) -> list[EngineStep]:
    """For each (selected) stage of the bundle: its engine's path and whether it must be built."""
    check_precision(precision)
    available = bundle_stages(bundle_dir)
    names = [s.stage for s in available]
    unknown = set(stages or ()) - set(names)
    if unknown:
        raise Vist3AInputError(f"the bundle has no stages {sorted(unknown)}; it has {names}")
    engines_dir = Path(bundle_dir) / "engines"
    steps = []
    for stage in available:
        if stages is not None and stage.stage not in stages:
            continue
        expected = expected_record(stage, target, precision, workspace_bytes=workspace_bytes)
        plan = engines_dir / expected.plan_file
        up_to_date, reason = (False, "forced") if force else engine_status(plan, expected)
        steps.append(EngineStep(stage, plan, expected, up_to_date, reason))
    return steps


def check_precision(precision: str) -> None:
    if precision not in ENGINE_PRECISIONS:
        raise Vist3AInputError(f"engine precision must be one of {ENGINE_PRECISIONS}, got {precision!r}")


# --- building ------------------------------------------------------------------------------------


def build_engines(bundle_dir: str | Path, precision: str = "fp16", *, stages: Sequence[str] | None = None,
                  workspace_bytes: int | None = None, force: bool = False, device: int | str | None = None,
                  echo: Callable[[str], None] = log.info) -> list[EngineArtifact]:
    """Build (or keep) one engine per ONNX stage of ``bundle_dir``; see the module docstring."""
    trt = import_tensorrt()
    target = current_target(device)
    steps = plan_engine_steps(bundle_dir, target, precision, stages=stages, workspace_bytes=workspace_bytes,
                              force=force)
    engines_dir = Path(bundle_dir) / "engines"
    engines_dir.mkdir(exist_ok=True)
    timing_cache = engines_dir / timing_cache_file_name(target)
    artifacts = []
    for step in steps:
        if step.up_to_date:
            echo(f"{step.stage.stage}: {step.plan.name} is up to date, build skipped")
            artifacts.append(EngineArtifact(step.stage.stage, step.plan, EngineRecord.load(step.plan), skipped=True))
            continue
        echo(f"{step.stage.stage}: building {step.plan.name} ({step.reason})")
        artifacts.append(_build_step(trt, step, timing_cache, workspace_bytes))
        echo(f"{step.stage.stage}: built in {artifacts[-1].record.build_seconds:.1f} s")
    return artifacts


def _build_step(trt, step: EngineStep, timing_cache: Path, workspace_bytes: int | None) -> EngineArtifact:
    start = time.perf_counter()
    plan_bytes = build_serialized_engine(trt, step.stage.onnx, step.expected.profile, step.expected.precision,
                                         timing_cache=timing_cache, workspace_bytes=workspace_bytes)
    record = dataclasses.replace(step.expected, plan_bytes=len(plan_bytes),
                                 build_seconds=round(time.perf_counter() - start, 3))
    _write_atomically(step.plan, plan_bytes)
    record.write(step.plan)  # last: a plan without its record is never taken as valid
    return EngineArtifact(step.stage.stage, step.plan, record, skipped=False)


def build_serialized_engine(trt, onnx_path: Path, profile: Mapping[str, Sequence[Sequence[int]]], precision: str, *,
                            timing_cache: Path | None = None, workspace_bytes: int | None = None) -> bytes:
    """Parse ``onnx_path`` and build a serialized engine with one optimization profile."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    _check_network_inputs(network, profile, onnx_path.name)
    config = builder.create_builder_config()
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    for flag in PRECISION_FLAGS[precision]:
        if not hasattr(trt.BuilderFlag, flag):
            raise Vist3AInputError(f"TensorRT {trt.__version__} has no {flag} builder flag ({precision} engines)")
        config.set_flag(getattr(trt.BuilderFlag, flag))
    optimization_profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.items():
        optimization_profile.set_shape(name, tuple(low), tuple(opt), tuple(high))
    config.add_optimization_profile(optimization_profile)
    _use_timing_cache(config, timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path.name} (see its log above)")
    if timing_cache is not None:
        _write_atomically(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def _check_network_inputs(network, profile: Mapping[str, Sequence[Sequence[int]]], onnx_name: str) -> None:
    """Every input TensorRT sees as dynamic (a -1 dim) needs a profile entry, and only those have one."""
    dynamic = {network.get_input(i).name for i in range(network.num_inputs) if -1 in tuple(network.get_input(i).shape)}
    if dynamic != set(profile):
        raise ExportError(f"{onnx_name}: TensorRT sees dynamic inputs {sorted(dynamic)}, the profile sizes "
                          f"{sorted(profile)}")


def _use_timing_cache(config, path: Path | None) -> None:
    if path is None:
        return
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s does not fit this TensorRT / GPU; starting an empty one", path.name)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _write_atomically(path: Path, data: bytes) -> None:
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_bytes(data)
    staged.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vist3a_rt.export.tensorrt_build BUNDLE [--precision fp16] [--force]``."""
    import argparse

    parser = argparse.ArgumentParser(description="Build TensorRT engines for an exported bundle.")
    parser.add_argument("bundle")
    parser.add_argument("--precision", default="fp16", choices=ENGINE_PRECISIONS)
    parser.add_argument("--stages", default=None, help="comma-separated stage names (default: all)")
    parser.add_argument("--workspace-gib", type=float, default=None)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    workspace = None if args.workspace_gib is None else int(args.workspace_gib * 2**30)
    stages = args.stages.split(",") if args.stages else None
    try:
        artifacts = build_engines(args.bundle, args.precision, stages=stages, workspace_bytes=workspace,
                                  force=args.force, echo=print)
    except Vist3AInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for artifact in artifacts:
        print(artifact.plan)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
