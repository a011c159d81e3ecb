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

Optimized graphs are cached: graph optimization at ``ORT_ENABLE_ALL`` is most of a session's
creation time (nano, loaded 2-core box: 0.99 s for the five stages, 0.19 s from optimized
graphs). On the CPU provider the first session of a graph saves onnxruntime's optimized graph
(``optimized_model_filepath``) into the cache directory, and later sessions load that with
optimization off. The optimized graph holds layouts chosen for this CPU (NCHWc blocks sized to
its vector width), so its cache key covers the source graph's sha256, the onnxruntime version and
the CPU's model and flags. Directory: ``$VIST3A_CACHE_DIR`` (empty: no cache), else
``$XDG_CACHE_HOME/vist3a-rt`` or ``~/.cache/vist3a-rt``, subfolder ``onnxruntime``; entries are
written atomically, an unreadable one is rebuilt, and an unwritable directory just means no
cache. Graphs with external data files are not cached.

Tensors go in and come out as torch tensors (zero-copy on the CPU); with a GPU provider they
are copied through host memory (binding I/O to device buffers is future work).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import Vist3AInputError
from . import BackendUnavailableError

log = logging.getLogger(__name__)
CACHE_ENV_VARIABLE = "VIST3A_CACHE_DIR"
DEFAULT_CACHE = object()  # OnnxRuntimeBackend's cache_dir: default_cache_dir()

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


def session_options(*, intra_op_threads: int | None = None, allow_spinning: bool = False, optimize: bool = True,
                    save_optimized: Path | None = None):
    """onnxruntime ``SessionOptions`` as chosen in the module docstring (``optimize=False``: for a
    graph that is already optimized; ``save_optimized``: where to write the optimized graph)."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize \
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if save_optimized is not None:
        options.optimized_model_filepath = str(save_optimized)
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
                 intra_op_threads: int | None = None, cache_dir: Path | None = None,
                 graph_sha256: str | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise Vist3AInputError(f"ONNX model not found: {path}")
        self.path, self.contract = path, contract
        self.cached_graph: Path | None = None  # the optimized graph this session was loaded from or saved
        self.session = self._session(list(providers), intra_op_threads, cache_dir, graph_sha256)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def _session(self, providers: list[str], threads: int | None, cache_dir: Path | None, graph_sha256: str | None):
        """A session on the cached optimized graph when there is one, else on the graph (saving
        its optimized form into the cache when it can; see the module docstring)."""
        ort = import_onnxruntime()
        cached = optimized_graph_path(self.path, providers, cache_dir, graph_sha256)
        if cached is not None and cached.is_file():
            try:
                session = ort.InferenceSession(str(cached), sess_options=session_options(
                    intra_op_threads=threads, optimize=False), providers=providers)
                self.cached_graph = cached
                return session
            except Exception as err:  # noqa: BLE001 - a damaged cache entry is rebuilt below
                log.warning("cached optimized graph %s is unusable (%s); rebuilding it", cached, err)
        staged = None
        if cached is not None:
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                staged = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
            except OSError:
                staged = None
        session = ort.InferenceSession(str(self.path), sess_options=session_options(
            intra_op_threads=threads, save_optimized=staged), providers=providers)
        if staged is not None:
            try:
                staged.replace(cached)
                self.cached_graph = cached
            except OSError as err:
                log.debug("optimized graph not cached: %s", err)
                staged.unlink(missing_ok=True)
        return session

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


def default_cache_dir() -> Path | None:
    """Where optimized graphs are cached (see the module docstring); None: not cached."""
    chosen = os.environ.get(CACHE_ENV_VARIABLE)
    if chosen is not None:
        return Path(chosen) / "onnxruntime" if chosen else None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vist3a-rt" / "onnxruntime"


def optimized_graph_path(graph: Path, providers: Sequence[str], cache_dir: Path | None,
                         graph_sha256: str | None = None) -> Path | None:
    """The cache entry for ``graph``'s optimized form on this CPU and onnxruntime, or None when it
    is not cached (no cache directory, a provider other than the CPU's, external data)."""
    if cache_dir is None or list(providers) != ["CPUExecutionProvider"]:
        return None
    if graph.with_name(f"{graph.name}.data").exists():
        return None
    if graph_sha256 is None:
        graph_sha256 = hashlib.sha256(graph.read_bytes()).hexdigest()
    key = hashlib.sha256("|".join([graph_sha256, import_onnxruntime().__version__, "ORT_ENABLE_ALL",
                                   cpu_signature()]).encode()).hexdigest()
    return Path(cache_dir) / f"{graph.stem}.{key[:24]}.onnx"


def cpu_signature() -> str:
    """This CPU's model name and instruction-set flags (what onnxruntime's layout choices depend on)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        fields = [line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() in
                  ("model name", "flags", "Features", "CPU part")]
        return "|".join(dict.fromkeys(fields))
    except OSError:
        return f"{platform.machine()}|{platform.processor()}"


def _device_of(inputs: Mapping[str, Tensor]) -> torch.device:
    return next((t.device for t in inputs.values() if isinstance(t, Tensor)), torch.device("cpu"))


class OnnxRuntimeBackend:
    """Exported stages run through onnxruntime, one session per stage.

    ``models``: stage name → an ``OnnxArtifact`` (from ``vist3a_rt.export.onnx_export``) or the
    path of an exported ``.onnx`` (its sidecar, when present, supplies the contract); an object
    with a ``sha256`` attribute spares hashing the graph for the cache key. ``cache_dir``: the
    optimized-graph cache (default ``default_cache_dir()``; None for no cache).
    """

    name = "onnxruntime"

    def __init__(self, models: Mapping[str, Any], *, device: str = "cpu", providers: Sequence[str] | None = None,
                 intra_op_threads: int | None = None, cache_dir: Any = DEFAULT_CACHE) -> None:
        self.providers = choose_providers(device, providers)
        self.intra_op_threads = intra_op_threads or physical_cores()
        cache_dir = default_cache_dir() if cache_dir is DEFAULT_CACHE else cache_dir
        self._stages = {stage: OnnxRuntimeStage(*_path_and_contract(model), providers=self.providers,
                                                intra_op_threads=self.intra_op_threads, cache_dir=cache_dir,
                                                graph_sha256=getattr(model, "sha256", None))
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
