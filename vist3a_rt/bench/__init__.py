"""``vist3a-rt bench``: per-stage latency, end to end, memory, cold start and arithmetic rate of
every backend, against torch eager in the same run, with output agreement beside the speed.

* ``runner`` — ``BenchSettings``, ``run_bench(settings)`` → the report (a JSON-ready dict);
* ``stages`` — one generation's stage timings through the public API;
* ``cold_start`` — a fresh process from launch to its first denoising step;
* ``flops`` — FLOPs of one denoiser forward, the measured fp32 matmul rate;
* ``agreement`` — latent error and rendered-view PSNR against torch;
* ``memory``, ``stats`` — peak RSS / GPU memory; median, quartiles, min, max;
* ``table`` — the report as text, and as a JSON file.
"""

from .runner import BACKENDS, DEFAULT_PROMPT, BenchSettings, run_bench
from .table import format_report, write_json

__all__ = ["BACKENDS", "DEFAULT_PROMPT", "BenchSettings", "run_bench", "format_report", "write_json"]
