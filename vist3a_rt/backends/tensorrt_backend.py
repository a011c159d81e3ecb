"""The TensorRT backend: serialized engines (``vist3a_rt.export.tensorrt_build``) run on a CUDA GPU.

An engine is specific to the GPU model it was tuned on, its compute capability and the exact
TensorRT version that built it, so its file name carries all three and the precision::

    engines/denoiser.h100-80gb-hbm3.sm90.fp16.trt10.3.plan    (+ .plan.json: the build record)

The record beside each plan (``EngineRecord``) holds the full TensorRT version, the sha256 of
the ONNX it was built from, the stage's export contract and the optimization profile; the
builder uses it to skip engines that are still valid, this backend to refuse a plan built by
another TensorRT and to check input shapes against the contract before running.

Running a stage (``TensorRTStage``):

* inputs are torch CUDA tensors, bound by ``data_ptr`` (no copies; non-contiguous ones are made
  contiguous); each input's shape is set on the execution context, the output shapes are read
  back from it and the outputs allocated as torch tensors on the same device;
* ``execute_async_v3`` is enqueued on the caller's current torch CUDA stream, so it is ordered
  after the kernels that produced the inputs and before those that read the outputs, with no
  extra synchronisation (wrap a call in ``with torch.cuda.stream(s):`` to run it elsewhere);
* ``cuda_graph=True`` (the denoiser by default: ~50 identical calls per prompt) captures the
  enqueue in a ``torch.cuda.CUDAGraph`` over static input and output buffers; each later call
  copies its inputs into the static buffers and replays the graph. One graph is kept: a call
  with other shapes recaptures. TensorRT must run once outside capture before it can be
  captured (it finishes shape-dependent setup lazily), so the first call runs eagerly too.

``tensorrt`` is imported only when a stage is created; without it, or without CUDA, a
``BackendUnavailableError`` says what is missing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import Vist3AInputError
from . import BackendUnavailableError

TENSORRT_MISSING = "tensorrt is not installed (pip install tensorrt-cu12; needs an NVIDIA GPU)"
CUDA_MISSING = "the tensorrt backend needs an NVIDIA GPU, and torch.cuda.is_available() is False here"
ENGINE_PRECISIONS = ("fp32", "fp16", "bf16")
RECORD_FORMAT = 1  # bump when the record's fields change

# TensorRT ``DataType`` member name -> torch dtype. FP8, INT4 and FP4 have no I/O use here (every
# stage's inputs and outputs are float32 or int64; reduced precision lives inside the engine).
TRT_TO_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
                "UINT8": torch.uint8, "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool}
TORCH_TO_TRT = {dtype: name for name, dtype in TRT_TO_TORCH.items()}


def import_tensorrt():
    """The tensorrt module, or a ``BackendUnavailableError`` saying how to install it."""
    try:
        import tensorrt
    except ImportError as err:
        raise BackendUnavailableError(TENSORRT_MISSING) from err
    return tensorrt


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise BackendUnavailableError(CUDA_MISSING)


def torch_dtype(trt_dtype: Any) -> torch.dtype:
    """The torch dtype of a TensorRT ``DataType`` (or its member name, ``"HALF"``)."""
    name = trt_dtype if isinstance(trt_dtype, str) else getattr(trt_dtype, "name", str(trt_dtype))
    name = name.rsplit(".", 1)[-1]
    if name not in TRT_TO_TORCH:
        raise Vist3AInputError(f"TensorRT data type {name} has no torch tensor binding here; "
                               f"supported: {sorted(TRT_TO_TORCH)}")
    return TRT_TO_TORCH[name]


# --- which engine fits this machine --------------------------------------------------------------


@dataclass(frozen=True)
class EngineTarget:
    """What an engine is specific to: the GPU model, its compute capability, the TensorRT version."""

    gpu_name: str  # torch.cuda.get_device_name(), e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: tuple[int, int]  # (9, 0)
    tensorrt_version: str  # tensorrt.__version__, e.g. "10.3.0.26"

    def __post_init__(self) -> None:
        object.__setattr__(self, "compute_capability", tuple(self.compute_capability))
        trt_major_minor(self.tensorrt_version)  # validates

    @property
    def gpu_slug(self) -> str:
        return gpu_slug(self.gpu_name)

    @property
    def sm(self) -> str:
        major, minor = self.compute_capability
        return f"sm{major}{minor}"

    @property
    def trt_tag(self) -> str:
        return "trt{}.{}".format(*trt_major_minor(self.tensorrt_version))

    def to_dict(self) -> dict:
        return {"gpu_name": self.gpu_name, "compute_capability": list(self.compute_capability),
                "tensorrt_version": self.tensorrt_version}

    @classmethod
    def from_dict(cls, data: Mapping) -> "EngineTarget":
        return cls(data["gpu_name"], tuple(data["compute_capability"]), data["tensorrt_version"])


def gpu_slug(gpu_name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100-80gb-hbm3"``: lower case, runs of other characters
    as one dash, the vendor prefix dropped."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")
    slug = slug.removeprefix("nvidia-")
    if not slug:
        raise Vist3AInputError(f"GPU name {gpu_name!r} has no letters or digits to name an engine by")
    return slug


def trt_major_minor(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise Vist3AInputError(f"TensorRT version {version!r} is not of the form MAJOR.MINOR[...]")
    return int(match[1]), int(match[2])


def engine_suffix(target: EngineTarget, precision: str) -> str:
    """``.h100-80gb-hbm3.sm90.fp16.trt10.3.plan``: what follows the stage name in an engine file."""
    if precision not in ENGINE_PRECISIONS:
        raise Vist3AInputError(f"engine precision must be one of {ENGINE_PRECISIONS}, got {precision!r}")
    return f".{target.gpu_slug}.{target.sm}.{precision}.{target.trt_tag}.plan"


def engine_file_name(stage: str, target: EngineTarget, precision: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", stage):
        raise Vist3AInputError(f"stage name {stage!r} must be lower case letters, digits and underscores")
    return stage + engine_suffix(target, precision)


def timing_cache_file_name(target: EngineTarget) -> str:
    """Tactic timings are valid for one GPU model and TensorRT version (any precision, any stage)."""
    return f"timing_cache.{target.gpu_slug}.{target.sm}.{target.trt_tag}.bin"


def find_engines(engines_dir: str | Path, target: EngineTarget, precision: str) -> dict[str, Path]:
    """Stage name -> plan file, for every engine in ``engines_dir`` built for ``target`` at ``precision``."""
    suffix = engine_suffix(target, precision)
    engines_dir = Path(engines_dir)
    plans = sorted(engines_dir.glob(f"*{suffix}")) if engines_dir.is_dir() else []
    return {plan.name[:-len(suffix)]: plan for plan in plans}


def current_target(device: str | torch.device | int | None = None) -> EngineTarget:
    """The ``EngineTarget`` of a CUDA device here (default: the current one)."""
    trt = import_tensorrt()
    require_cuda()
    index = _device_index(device)
    return EngineTarget(torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index),
                        trt.__version__)


def _device_index(device: str | torch.device | int | None) -> int:
    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    device = torch.device(device)
    if device.type != "cuda":
        raise Vist3AInputError(f"the tensorrt backend runs on a CUDA device, not {device}")
    return torch.cuda.current_device() if device.index is None else device.index


# --- the build record beside each plan -----------------------------------------------------------


@dataclass(frozen=True)
class EngineRecord:
    """How a plan was built (written by the builder as ``<plan>.json``, after the plan)."""

    stage: str
    plan_file: str
    plan_bytes: int
    onnx_file: str
    onnx_sha256: str
    precision: str
    target: EngineTarget
    profile: dict[str, list[list[int]]]  # input -> [min, opt, max] shapes (dynamic inputs only)
    contract: dict | None = None  # the stage's ExportContract.to_dict()
    workspace_bytes: int | None = None
    build_seconds: float = 0.0
    format: int = RECORD_FORMAT

    @staticmethod
    def path_for(plan: str | Path) -> Path:
        plan = Path(plan)
        return plan.with_name(plan.name + ".json")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["target"] = self.target.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> "EngineRecord":
        fields = dict(data)
        fields["target"] = EngineTarget.from_dict(fields["target"])
        return cls(**fields)

    @classmethod
    def load(cls, plan: str | Path) -> "EngineRecord":
        path = cls.path_for(plan)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise Vist3AInputError(f"no build record at {path} (engines are built by "
                                   "vist3a_rt.export.tensorrt_build.build_engines)") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise Vist3AInputError(f"engine build record {path} is unreadable: {err}") from None

    def write(self, plan: str | Path) -> Path:
        path = self.path_for(plan)
        staged = path.with_name(path.name + ".tmp")
        staged.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        staged.replace(path)
        return path

    def export_contract(self):
        if self.contract is None:
            return None
        from vist3a_rt.export.spec import ExportContract  # the contract vocabulary lives with the exporter

        return ExportContract.from_dict(self.contract)


# --- running one engine --------------------------------------------------------------------------


@dataclass(frozen=True)
class IOTensor:
    name: str
    is_input: bool
    dtype: torch.dtype


def engine_io(trt, engine) -> list[IOTensor]:
    """The engine's inputs and outputs in engine order."""
    io = []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        mode = engine.get_tensor_mode(name)
        io.append(IOTensor(name, mode == trt.TensorIOMode.INPUT, torch_dtype(engine.get_tensor_dtype(name))))
    return io


@dataclass
class _CapturedGraph:
    key: tuple
    graph: Any  # torch.cuda.CUDAGraph
    inputs: dict[str, Tensor] = field(default_factory=dict)
    outputs: dict[str, Tensor] = field(default_factory=dict)


class TensorRTStage:
    """One engine with its execution context; ``stage(inputs)`` -> outputs by name (see the module
    docstring). ``copy_outputs=False`` returns a CUDA graph's static output buffers themselves,
    which the next call overwrites."""

    def __init__(self, plan: str | Path, *, device: str | torch.device | int | None = None,
                 cuda_graph: bool = False, copy_outputs: bool = True) -> None:
        trt = import_tensorrt()
        require_cuda()
        plan = Path(plan)
        if not plan.is_file():
            raise Vist3AInputError(f"TensorRT engine not found: {plan}")
        self.plan, self.trt = plan, trt
        self.device = torch.device("cuda", _device_index(device))
        self.record = EngineRecord.load(plan) if EngineRecord.path_for(plan).is_file() else None
        self.contract = self.record.export_contract() if self.record else None
        self._check_version(trt)
        self.engine = self._deserialize(trt, plan)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {plan.name} (out of GPU memory?)")
        self.io = engine_io(trt, self.engine)
        self.input_names = [t.name for t in self.io if t.is_input]
        self.cuda_graph, self.copy_outputs = cuda_graph, copy_outputs
        self._graph: _CapturedGraph | None = None

    def _check_version(self, trt) -> None:
        if self.record is not None and self.record.target.tensorrt_version != trt.__version__:
            raise BackendUnavailableError(
                f"{self.plan.name} was built with TensorRT {self.record.target.tensorrt_version}, this is "
                f"{trt.__version__}: engines only load in the version that built them; rebuild them "
                "(vist3a_rt.export.tensorrt_build.build_engines)")

    def _deserialize(self, trt, plan: Path):
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(self.device):
            engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise Vist3AInputError(f"TensorRT cannot load {plan} (see its log above): built for another GPU "
                                   "or TensorRT version, or the file is damaged; rebuild it")
        return engine

    def __call__(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        inputs = self._checked(inputs)
        with torch.cuda.device(self.device):
            if self.cuda_graph:
                return self._replay(inputs)
            outputs = self._bind(inputs)
            self._enqueue(torch.cuda.current_stream(self.device))
            return outputs

    # --- binding and running ---------------------------------------------------------------------

    def _checked(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if set(inputs) != set(self.input_names):
            raise Vist3AInputError(f"{self.plan.name} takes inputs {sorted(self.input_names)}, got {sorted(inputs)}")
        if self.contract is not None:
            self.contract.check_shapes({name: tuple(t.shape) for name, t in inputs.items()})
        checked = {}
        for spec in (t for t in self.io if t.is_input):
            tensor = inputs[spec.name]
            if not isinstance(tensor, Tensor) or tensor.dtype != spec.dtype or tensor.device != self.device:
                got = f"{tensor.dtype} on {tensor.device}" if isinstance(tensor, Tensor) else type(tensor).__name__
                raise Vist3AInputError(f"input {spec.name!r} must be a {spec.dtype} tensor on {self.device}, got {got}")
            checked[spec.name] = tensor.contiguous()
        return checked

    def _bind(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Set input shapes and addresses, allocate outputs of the shapes TensorRT infers, bind them."""
        for name, tensor in inputs.items():
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise Vist3AInputError(f"input {name!r} of shape {list(tensor.shape)} is outside the engine's "
                                       f"profile {self._profile_text(name)} ({self.plan.name})")
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for spec in (t for t in self.io if not t.is_input):
            shape = tuple(self.context.get_tensor_shape(spec.name))
            if any(n < 0 for n in shape):
                raise RuntimeError(f"{self.plan.name}: output {spec.name!r} has a data-dependent shape {shape}, "
                                   "which this backend does not allocate for")
            outputs[spec.name] = torch.empty(shape, dtype=spec.dtype, device=self.device)
            self.context.set_tensor_address(spec.name, outputs[spec.name].data_ptr())
        return outputs

    def _profile_text(self, name: str) -> str:
        low, _, high = self.engine.get_tensor_profile_shape(name, 0)
        return f"[{list(low)} .. {list(high)}]"

    def _enqueue(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to enqueue {self.plan.name} (see its log above)")

    # --- CUDA graph ------------------------------------------------------------------------------

    def _replay(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        key = tuple((name, tuple(t.shape)) for name, t in sorted(inputs.items()))
        if self._graph is None or self._graph.key != key:
            self._graph = None  # free the old buffers before allocating new ones
            self._graph = self._capture(inputs, key)
        for name, tensor in inputs.items():
            self._graph.inputs[name].copy_(tensor)
        self._graph.graph.replay()
        outputs = self._graph.outputs
        return {name: t.clone() for name, t in outputs.items()} if self.copy_outputs else dict(outputs)

    def _capture(self, inputs: Mapping[str, Tensor], key: tuple) -> _CapturedGraph:
        static_inputs = {name: t.clone() for name, t in inputs.items()}
        static_outputs = self._bind(static_inputs)  # allocated on the caller's stream, like every output
        caller = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(caller)
        self._enqueue(side)  # the eager run TensorRT needs before capture, off the caller's stream
        caller.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # TensorRT may touch its own CUDA state from other threads: only this thread's capture matters
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._enqueue(torch.cuda.current_stream(self.device))
        return _CapturedGraph(key, graph, static_inputs, static_outputs)


# --- the backend ---------------------------------------------------------------------------------


class TensorRTBackend:
    """Built engines, one per stage; ``cuda_graph_stages`` replay a captured CUDA graph per call.

    ``engines``: stage name -> plan file. ``TensorRTBackend.from_bundle(bundle)`` finds the
    engines built for this GPU and TensorRT version in ``bundle/engines``.
    """

    name = "tensorrt"

    def __init__(self, engines: Mapping[str, str | Path], *, device: str | torch.device | int | None = None,
                 cuda_graph_stages: Sequence[str] = ("denoiser",)) -> None:
        if not engines:
            raise Vist3AInputError("a TensorRT backend needs at least one engine")
        self._stages = {stage: TensorRTStage(plan, device=device, cuda_graph=stage in cuda_graph_stages)
                        for stage, plan in engines.items()}

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path, *, precision: str = "fp16",
                    device: str | torch.device | int | None = None, **kwargs) -> "TensorRTBackend":
        target = current_target(device)
        engines_dir = Path(bundle_dir) / "engines"
        engines = find_engines(engines_dir, target, precision)
        if not engines:
            raise BackendUnavailableError(
                f"no TensorRT engines for this GPU in {engines_dir} (looked for *{engine_suffix(target, precision)}); "
                "build them with vist3a_rt.export.tensorrt_build.build_engines(bundle, precision=...)")
        return cls(engines, device=device, **kwargs)

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(self._stages)

    def stage(self, name: str) -> TensorRTStage:
        if name not in self._stages:
            raise Vist3AInputError(f"this tensorrt backend has no stage {name!r}; it has {list(self._stages)}")
        return self._stages[name]

    def run(self, stage: str, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self.stage(stage)(inputs)
