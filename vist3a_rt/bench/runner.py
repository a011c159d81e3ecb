"""``run_bench(settings)``: every backend against torch eager, in one process, one report.

Order: the machine's fp32 matmul rate; then torch eager (always; it is the baseline and the
reference), then each other backend: load, warm-up, timed runs (``stages``), agreement of its
first timed run with the torch reference generation (same prompt, seed and settings), for a
bundle's onnxruntime graphs each stage's agreement with the torch module it was exported from
(``agreement.stage_agreement``), peak memory, and a cold start in a fresh process
(``cold_start``). With several thread counts (``threads=(2, 1)``) every backend is measured at
each, one row per (backend, threads); speed-ups are against the first torch row. A backend that
cannot be loaded here gets a row saying why (``status: "unavailable"``), one that breaks while
measured a row with the error (``status: "failed"``); neither stops the others.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import Vist3AInputError
from ..pipeline.result import DEFAULT_PREVIEW_FRAMES, DEFAULT_PREVIEW_SIZE
from .agreement import psnr, stage_agreement, tensor_agreement
from .cold_start import measure_cold_start
from .flops import denoiser_flops, denoiser_inputs, matmul_rate
from .memory import gpu_peak_mib, peak_rss_mib, reset_gpu_peak
from .stages import STAGES, RunSettings, generate, measure_runs, preview_camera, render_view
from .stats import summarize, time_repeats

REPORT_FORMAT = "vist3a-rt/bench"
REPORT_VERSION = 1
BACKENDS = ("torch", "onnxruntime", "tensorrt")
DEFAULT_PROMPT = "a red cube left of a blue sphere"
MATMUL_SIZE = {"cpu": 1024, "cuda": 8192}
SPEEDUP_STAGES = ("denoise_step", "generate", "e2e_no_preview")


@dataclass(frozen=True)
class BenchSettings:
    model: str = "nano"  # "nano", a model folder or a bundle
    torch_model: str | None = None  # what the torch rows load (None: ``model``), e.g. "nano" beside its bundle
    backends: tuple[str, ...] = BACKENDS  # torch is always measured (first): it is the baseline
    device: str = "cpu"
    repeats: int = 5
    warmup: int = 1
    steps: int | None = None  # None: the model's default
    prompt: str = DEFAULT_PROMPT
    seed: int = 0
    threads: tuple[int, ...] | None = None  # None: torch's current setting, onnxruntime's default
    cold_start: bool = True
    matmul_size: int | None = None  # None: MATMUL_SIZE per device type
    preview_frames: int = DEFAULT_PREVIEW_FRAMES
    preview_size: int = DEFAULT_PREVIEW_SIZE

    def __post_init__(self) -> None:
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or not self.backends:
            raise Vist3AInputError(f"unknown backends {unknown}; choose from {list(BACKENDS)}")
        if isinstance(self.threads, int) and not isinstance(self.threads, bool):
            object.__setattr__(self, "threads", (self.threads,))
        if self.threads is not None and (not isinstance(self.threads, tuple) or not self.threads):
            raise Vist3AInputError(f"threads must be thread counts >= 1, got {self.threads!r}")
        for name, low in (("repeats", 1), ("warmup", 0), ("steps", 1), ("matmul_size", 1),
                          ("preview_frames", 1), ("preview_size", 2)):
            _check_int(name, getattr(self, name), low)
        for count in self.threads or ():
            _check_int("threads", count, 1)

    @property
    def ordered_backends(self) -> list[str]:
        return ["torch", *(b for b in dict.fromkeys(self.backends) if b != "torch")]

    @property
    def thread_counts(self) -> tuple[int | None, ...]:
        return tuple(dict.fromkeys(self.threads)) if self.threads else (None,)

    def source(self, backend: str) -> str:
        """What ``backend``'s rows load."""
        return (self.torch_model or self.model) if backend == "torch" else self.model

    def run_settings(self) -> RunSettings:
        return RunSettings(self.prompt, self.seed, self.steps, self.preview_frames, self.preview_size, self.device)


def _check_int(name: str, value, low: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
        raise Vist3AInputError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass
class _Reference:
    """The torch eager generation every backend's first timed run is compared with."""

    result: object
    camera: object = field(repr=False)
    image: torch.Tensor = field(repr=False)


def run_bench(settings: BenchSettings, *, log: Callable[[str], None] = lambda line: None) -> dict:
    """Measure and return the report (a JSON-ready dict; see ``benchmarks/README.md``)."""
    if settings.threads:
        torch.set_num_threads(settings.threads[0])
    device = torch.device(settings.device)
    size = settings.matmul_size or MATMUL_SIZE.get(device.type, 1024)
    log(f"fp32 matmul {size}^3 on {device}")
    report = {"format": REPORT_FORMAT, "version": REPORT_VERSION, "settings": asdict(settings),
              "machine": machine_info(device), "matmul": matmul_rate(device, size=size), "denoiser_flops": None,
              "backends": []}
    reference = None
    default_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="vist3a-bench-") as workdir:
        for backend in settings.ordered_backends:
            for threads in settings.thread_counts:
                torch.set_num_threads(threads or default_threads)
                log(f"{backend}{_at(threads)}: loading {settings.source(backend)}")
                row, model = _load(settings, backend, threads)
                if model is not None:
                    if reference is None:  # torch, first: the reference
                        reference = _reference(model, settings)
                        report["denoiser_flops"] = _flops(model, settings)
                    row.update(_measure(model, backend, threads, settings, reference, report, Path(workdir), log))
                    del model
                    _free(device)
                report["backends"].append(row)
    torch.set_num_threads(default_threads)
    report["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report["bench_peak_rss_mib"] = peak_rss_mib()
    return report


def _at(threads: int | None) -> str:
    return "" if threads is None else f" at {threads} thread{'s' if threads > 1 else ''}"


def machine_info(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    return {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "gpu": torch.cuda.get_device_name(device) if cuda else None}


# --- one backend ---------------------------------------------------------------------------------


def _load(settings: BenchSettings, backend: str, threads: int | None) -> tuple[dict, object]:
    from ..bundle import is_bundle, load_bundle
    from ..pipeline import Vist3A

    row = {"backend": backend, "threads": threads or torch.get_num_threads(), "status": "ok"}
    try:
        start = time.perf_counter()
        if backend == "onnxruntime" and is_bundle(settings.model):
            model = load_bundle(settings.model, backend=backend, device=settings.device, intra_op_threads=threads)
            row["threads"] = model.backend.intra_op_threads
        else:
            model = Vist3A.load(settings.source(backend), backend=backend, device=settings.device)
        row["load_s"] = time.perf_counter() - start
        return row, model
    except (Vist3AInputError, ImportError) as err:
        if backend == "torch":
            raise  # no baseline, no bench: a bad --model or --device
        return {**row, "status": "unavailable", "reason": str(err)}, None


def _measure(model, backend: str, threads: int | None, settings: BenchSettings, reference: _Reference, report: dict,
             workdir: Path, log: Callable[[str], None]) -> dict:
    try:
        reset_gpu_peak(settings.device)
        log(f"{backend}{_at(threads)}: {settings.warmup} warm-up + {settings.repeats} timed runs")
        samples, first = measure_runs(model, settings.run_settings(), repeats=settings.repeats,
                                      warmup=settings.warmup, workdir=workdir / backend)
        row = {"stages": {stage: summarize(samples[stage]) for stage in STAGES},
               "agreement": agreement(first, reference),
               "memory": {"gpu_peak_torch_mib": gpu_peak_mib(settings.device)}}
        if backend == "torch":
            row["stages"]["denoiser_forward"] = _time_transformer(model, settings)
        elif hasattr(model, "manifest"):  # a bundle's graphs: against the modules they were exported from
            log(f"{backend}: every stage against its torch module")
            from ..bundle import load_bundle

            row["agreement"]["stages"] = stage_agreement(model, load_bundle(settings.model, backend="torch"))
        row["denoiser"] = _achieved(report, row["stages"]["denoise_step"]["median"])
        row["speedup_vs_torch"] = _speedup(report, row)
        if settings.cold_start:
            log(f"{backend}{_at(threads)}: cold start in a fresh process")
            row["cold_start"] = _cold_start(settings, backend, threads)
        return row
    except Exception as err:  # noqa: BLE001 - a backend that breaks gets its row; the others still run
        if backend == "torch":
            raise
        return {"status": "failed", "reason": f"{type(err).__name__}: {err}"}


def _reference(model, settings: BenchSettings) -> _Reference:
    """One torch generation, outside the timings, and its first preview view."""
    result = generate(model, settings.run_settings())
    camera = preview_camera(result.cameras, settings.preview_size)
    return _Reference(result, camera, render_view(result.scene, camera))


def agreement(result, reference: _Reference) -> dict:
    """Latents and one rendered view of ``result`` against the torch reference (same seed)."""
    out = {"gaussians": len(result.scene), "reference_gaussians": len(reference.result.scene)}
    if result.latents is not None:
        latents = tensor_agreement(result.latents, reference.result.latents)
        out.update(latents_max_abs=latents["max_abs"], latents_max_rel=latents["max_rel"])
    view_psnr = psnr(render_view(result.scene, reference.camera), reference.image)
    out.update(render_psnr_db=None if math.isinf(view_psnr) else view_psnr, render_exact=math.isinf(view_psnr))
    return out


# --- work and rate -------------------------------------------------------------------------------


def _denoiser_inputs(model, settings: BenchSettings):
    defaults = model.defaults  # what generate uses: the bench overrides only the step count
    shape = model.generator.latent_shape(1, defaults.num_frames, defaults.height, defaults.width)
    cfg_batch = 2 if defaults.guidance_scale > 1 else 1  # [cond; uncond] in one forward
    return denoiser_inputs(model.generator.transformer, shape, model.generator.text_encoder.max_sequence_length,
                           cfg_batch=cfg_batch)


def _flops(model, settings: BenchSettings) -> dict:
    inputs = _denoiser_inputs(model, settings)
    total, by_op = denoiser_flops(model.generator.transformer, inputs)
    return {"per_step": total, "cfg_batch": inputs["hidden_states"].shape[0], "by_op": by_op}


def _time_transformer(model, settings: BenchSettings) -> dict:
    """The torch transformer's forward alone on one step's inputs (no guidance, no solver)."""
    transformer, inputs = model.generator.transformer, _denoiser_inputs(model, settings)
    with torch.inference_mode():
        return summarize(time_repeats(lambda: transformer(**inputs, return_dict=False), repeats=settings.repeats,
                                      warmup=max(1, settings.warmup), device=settings.device))


def _achieved(report: dict, step_seconds: float) -> dict | None:
    flops = report["denoiser_flops"]
    if flops is None:
        return None
    gflops = flops["per_step"] / step_seconds / 1e9
    return {"gflops_per_step": gflops, "fraction_of_matmul": gflops / report["matmul"]["gflops"]}


def _speedup(report: dict, row: dict) -> dict | None:
    torch_row = next((r for r in report["backends"] if r["backend"] == "torch"), None)
    baseline = torch_row["stages"] if torch_row else row["stages"]  # the torch row itself: 1.0
    return {stage: baseline[stage]["median"] / row["stages"][stage]["median"] for stage in SPEEDUP_STAGES}


def _cold_start(settings: BenchSettings, backend: str, threads: int | None) -> dict:
    try:
        return measure_cold_start(settings.source(backend), backend, device=settings.device, prompt=settings.prompt,
                                  seed=settings.seed, threads=threads)
    except Exception as err:  # noqa: BLE001 - reported in the row, like an unavailable backend
        return {"error": f"{type(err).__name__}: {err}"}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
