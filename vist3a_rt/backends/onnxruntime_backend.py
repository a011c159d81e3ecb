"""The onnxruntime backend: exported stages (``vist3a_rt.export``) run as onnxruntime sessions.

Session settings, and why:

* graph optimization ``ORT_ENABLE_ALL``: constant folding, operator fusions (attention, GELU,
  layer norm, conv + activation) and the CPU provider's blocked (NCHWc) conv layouts; the
  graph is fixed per session, so optimizing it once at load pays off on every call;
* ``intra_op_num_threads`` = physical cores available to this process unless given: a
  hyper-thread sibling shares its core's vector units, so threads beyond the core count only
  add synchronisation; ``inter_op_num_threads`` = 1 with ``ORT_SEQUENTIAL`` execution: every
  stage is one dependent chain of ops, all the parallelism is inside the ops;
* no spin-waiting (``session.intra_op.allow_spinning`` = 0): between ops, idle pool threads
  sleep instead of busy-polling. On a machine whose cores other processes also use, spinning
  threads take CPU from the thread doing the work; measured on the 2-core dev machine with a
  1-thread training job beside it, 2 threads: nano denoiser 88 → 81 ms, VAE 755 → 670 ms,
  stitched decoder 506 → 365 ms without spinning (``benchmarks/README.md``). On a busy machine
  one thread is faster still: pass ``intra_op_threads=1``;
* providers: CPU by default; ``device="cuda"`` asks for the CUDA provider (onnxruntime-gpu),
  and ``providers=[...]`` passes an explicit list (e.g. TensorRT first, CUDA, CPU).

Tensors go in and come out as torch tensors (zero-copy on the CPU); with a GPU provider they
are copied through host memory (binding I/O to device buffers is future work).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import Vist3AInputError
from . import BackendUnavailableError

DEVICE_PROVIDERS = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
}
_ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
              "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(bool)": torch.bool}


def import_onnxruntime():
    """The onnxruntime module, or a ``BackendUnavailableError`` saying how to install it."""
    try:
        import onnxruntime
    except ImportError as err:
        raise BackendUnavailableError(
            "the onnxruntime backend needs onnxruntime, which is not installed: "
            "pip install 'vist3a-rt[onnx]' (CPU) or 'vist3a-rt[gpu]' (CUDA; not both)") from err
    return onnxruntime


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-thread siblings counted once)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:  # no sysfs (not Linux): count logical CPUs
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def session_options(*, intra_op_threads: int | None = None, allow_spinning: bool = False):
    """onnxruntime ``SessionOptions`` as chosen in the module docstring."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads or physical_cores()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    options.log_severity_level = 3  # errors only: the exporter's graphs trigger harmless warnings
    return options


def choose_providers(device: str = "cpu", providers: Sequence[str] | None = None) -> list[str]:
    """The execution providers for ``device``, or ``providers`` as given; the first one must exist."""
    ort = import_onnxruntime()
    available = ort.get_available_providers()
    if providers is None:
        if device not in DEVICE_PROVIDERS:
            raise Vist3AInputError(f"unknown device {device!r} for onnxruntime; choose {sorted(DEVICE_PROVIDERS)}")
        providers = DEVICE_PROVIDERS[device]
    providers = list(providers)
    if not providers or providers[0] not in available:
        hint = " (install onnxruntime-gpu: pip install 'vist3a-rt[gpu]', without onnxruntime)" \
            if providers and providers[0] != "CPUExecutionProvider" else ""
        raise BackendUnavailableError(f"onnxruntime has no {providers[0] if providers else 'provider'} here; "
                                      f"available: {available}{hint}")
    return [p for p in providers if p in available]


class OnnxRuntimeStage:
    """One exported stage in an onnxruntime session; ``stage(inputs)`` → outputs by name.

    With the stage's contract (from its export sidecar), input shapes are checked against the
    exported profile first; otherwise only names, dtypes and ranks are checked.
    """

    def __init__(self, path: str | Path, contract: Any = None, *, providers: Sequence[str] = ("CPUExecutionProvider",),
                 options: Any = None) -> None:
        ort = import_onnxruntime()
        path = Path(path)
        if not path.is_file():
            raise Vist3AInputError(f"ONNX model not found: {path}")
        self.path, self.contract = path, contract
        self.session = ort.InferenceSession(str(path), sess_options=options or session_options(),
                                            providers=list(providers))
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def __call__(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        feeds, device = self._feeds(inputs), _device_of(inputs)
        outputs = self.session.run(self.output_names, feeds)
        return {name: torch.from_numpy(out).to(device) for name, out in zip(self.output_names, outputs)}

    def _feeds(self, inputs: Mapping[str, Tensor]) -> dict[str, Any]:
        names = set(inputs)
        if names != set(self.inputs):
            raise Vist3AInputError(f"{self.path.name} takes inputs {sorted(self.inputs)}, got {sorted(names)}")
        if self.contract is not None:
            self.contract.check_shapes({name: tuple(t.shape) for name, t in inputs.items()})
        return {name: self._array(name, tensor) for name, tensor in inputs.items()}

    def _array(self, name: str, tensor: Tensor):
        spec = self.inputs[name]
        dtype = _ORT_TYPES.get(spec.type)
        if not isinstance(tensor, Tensor) or tensor.dtype != dtype:
            got = tensor.dtype if isinstance(tensor, Tensor) else type(tensor).__name__
            raise Vist3AInputError(f"input {name!r} must be a {dtype} tensor, got {got}")
        if tensor.dim() != len(spec.shape):
            raise Vist3AInputError(f"input {name!r} must have {len(spec.shape)} axes {spec.shape}, "
                                   f"got shape {list(tensor.shape)}")
        return tensor.detach().to("cpu").contiguous().numpy()


def _device_of(inputs: Mapping[str, Tensor]) -> torch.device:
    return next((t.device for t in inputs.values() if isinstance(t, Tensor)), torch.device("cpu"))


class OnnxRuntimeBackend:
    """Exported stages run through onnxruntime, one session per stage.

    ``models``: stage name → an ``OnnxArtifact`` (from ``vist3a_rt.export.onnx_export``) or the
    path of an exported ``.onnx`` (its sidecar, when present, supplies the contract).
    """

    name = "onnxruntime"

    def __init__(self, models: Mapping[str, Any], *, device: str = "cpu", providers: Sequence[str] | None = None,
                 intra_op_threads: int | None = None) -> None:
        self.providers = choose_providers(device, providers)
        self.intra_op_threads = intra_op_threads or physical_cores()
        options = session_options(intra_op_threads=self.intra_op_threads)
        self._stages = {stage: OnnxRuntimeStage(*_path_and_contract(model), providers=self.providers,
                                                options=options)
                        for stage, model in models.items()}

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(self._stages)

    def stage(self, name: str) -> OnnxRuntimeStage:
        if name not in self._stages:
            raise Vist3AInputError(f"this onnxruntime backend has no stage {name!r}; it has {list(self._stages)}")
        return self._stages[name]

    def run(self, stage: str, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self.stage(stage)(inputs)


def _path_and_contract(model: Any) -> tuple[Path, Any]:
    if hasattr(model, "path") and hasattr(model, "contract"):
        return Path(model.path), model.contract
    path = Path(model)
    if path.with_suffix(".json").is_file():
        from vist3a_rt.export.onnx_export import OnnxArtifact  # the sidecar format lives with the exporter

        return path, OnnxArtifact.load(path).contract
    return path, None
