"""The bench report as text: one column per backend, units in every row label."""

from __future__ import annotations

import json
import math
from pathlib import Path

STAGE_LABELS = {"text": "text (new prompt)", "denoise_step": "one denoising step", "denoiser_forward":
                "  transformer forward alone", "vae_decode": "VAE decode", "decode_3d": "stitched 3D decode",
                "render": "render (1 preview frame)", "save": "save (ply, cameras, meta)",
                "generate": "generate", "e2e_no_preview": "end to end, no preview",
                "e2e_with_preview": "end to end, with preview"}
LABEL_WIDTH = 34
COLUMN_WIDTH = 26


def format_report(report: dict) -> str:
    s, m = report["settings"], report["machine"]
    rows = [r for r in report["backends"] if r["status"] == "ok"]
    lines = [f"vist3a-rt bench: model {s['model']}, device {m['device']}"
             + (f" ({m['gpu']})" if m["gpu"] else "") + f", {m['cpus']} CPUs (load average {_load(m)}), "
             f"{s['repeats']} timed runs after {s['warmup']} warm-up",
             _matmul_line(report), _flops_line(report), ""]
    lines.append(_cells("ms: median [min-max]", [_column(r) for r in rows]))
    for stage, label in STAGE_LABELS.items():
        if any(stage in r["stages"] for r in rows):
            lines.append(_cells(label, [_stage_cell(r["stages"].get(stage)) for r in rows]))
    lines.append(_cells("speed vs torch (end to end)", [_ratio(r["speedup_vs_torch"]["e2e_no_preview"])
                                                        for r in rows]))
    lines.append(_cells("speed vs torch (denoising step)", [_ratio(r["speedup_vs_torch"]["denoise_step"])
                                                            for r in rows]))
    lines.append(_cells("latents vs torch: max abs / rel", [_latents_cell(r["agreement"]) for r in rows]))
    lines.append(_cells("rendered view vs torch: PSNR", [_psnr_cell(r["agreement"]) for r in rows]))
    stages = list(dict.fromkeys(name for r in rows for name in r["agreement"].get("stages", {})))
    for name in stages:
        lines.append(_cells(f"  {name} vs torch: max rel", [_stage_agreement_cell(r["agreement"], name) for r in rows]))
    lines.append(_cells("denoiser GFLOP/s (% of matmul)", [_achieved_cell(r.get("denoiser")) for r in rows]))
    if any(r["memory"]["gpu_peak_torch_mib"] is not None for r in rows):
        lines.append(_cells("GPU peak, torch allocator", [_mib(r["memory"]["gpu_peak_torch_mib"]) for r in rows]))
    if any("cold_start" in r for r in rows):
        lines.append(_cells("cold start to 1st step (s)", [_cold_cell(r.get("cold_start")) for r in rows]))
        lines.append(_cells("peak RSS, fresh process", [_mib(r.get("cold_start", {}).get("peak_rss_mib"))
                                                        for r in rows]))
    lines.append(f"bench process peak RSS: {report['bench_peak_rss_mib']:.0f} MiB")
    others = [r for r in report["backends"] if r["status"] != "ok"]
    if others:
        lines += ["", "not measured:"] + [f"  {r['backend']} ({r['status']}): {r['reason']}" for r in others]
    return "\n".join(lines)


def write_json(report: dict, path: str | Path) -> Path:
    """Write the report atomically; infinities (none are expected) become null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_text(json.dumps(_finite(report), indent=1) + "\n")
    staged.replace(path)
    return path


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _cells(label: str, cells: list[str]) -> str:
    return f"{label:<{LABEL_WIDTH}}" + "".join(f"{c:>{COLUMN_WIDTH}}" for c in cells)


def _stage_cell(stats: dict | None) -> str:
    if stats is None:
        return "-"
    return f"{stats['median'] * 1e3:.1f} [{stats['min'] * 1e3:.1f}-{stats['max'] * 1e3:.1f}]"


def _column(row: dict) -> str:
    threads = row.get("threads")
    return row["backend"] if threads is None else f"{row['backend']} ({threads} thr)"


def _stage_agreement_cell(agreement: dict, stage: str) -> str:
    errors = agreement.get("stages", {}).get(stage)
    return "-" if errors is None else f"{max(errors.values()):.1e}"


def _ratio(value: float) -> str:
    return f"{value:.2f}x"


def _latents_cell(agreement: dict) -> str:
    if "latents_max_abs" not in agreement:
        return "n/a"
    if agreement["latents_max_abs"] == 0:
        return "identical"
    return f"{agreement['latents_max_abs']:.2e} / {agreement['latents_max_rel']:.2e}"


def _psnr_cell(agreement: dict) -> str:
    return "identical" if agreement["render_exact"] else f"{agreement['render_psnr_db']:.1f} dB"


def _achieved_cell(achieved: dict | None) -> str:
    if achieved is None:
        return "n/a"
    return f"{achieved['gflops_per_step']:.2f} ({100 * achieved['fraction_of_matmul']:.1f} %)"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} MiB"


def _cold_cell(cold: dict | None) -> str:
    if cold is None:
        return "-"
    if "error" in cold:
        return "failed (see JSON)"
    return f"{cold['first_step_s']:.2f} (load {cold['load_s']:.2f})"


def _load(machine: dict) -> str:
    """The 1-minute load average at the start and the end of the bench (other processes' work)."""
    start, end = machine.get("load_average"), machine.get("load_average_end")
    if start is None:
        return "n/a"
    return f"{start[0]:.2f}" + ("" if end is None else f" -> {end[0]:.2f}")


def _matmul_line(report: dict) -> str:
    mm = report["matmul"]
    return (f"machine: {mm['dtype']} matmul {mm['size']}^3 at {mm['gflops']:.1f} GFLOP/s "
            f"(median of {mm['seconds']['n']}, {mm['seconds']['median'] * 1e3:.1f} ms)")


def _flops_line(report: dict) -> str:
    flops = report["denoiser_flops"]
    if flops is None:
        return "denoiser: FLOPs not counted"
    return (f"denoiser: {flops['per_step'] / 1e9:.3f} GFLOP per step (one transformer forward, "
            f"batch {flops['cfg_batch']} with guidance; matmuls, convolutions and attention counted)")
