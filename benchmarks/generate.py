"""End-to-end ``generate`` on one model (default: the embedded nano): stage times, preview share, CLI wall time.

Four measurements, all on the same model and settings, in one run; each line is printed as it
completes:

1. In-process: ``Vist3A.load`` once, one warm-up generation, then ``--repeats`` generations, each
   with a different prompt (``PROMPTS``, in the nano vocabulary) so the text encoder runs every
   time instead of answering from its cache; wall and process-CPU time of each stage (text,
   denoise, VAE decode, 3D decode, total) and of the default preview (24 frames at 192²) with the
   fastest rasterizer ("auto": the C++ one when built).
2. Reference preview (the baseline, issue 7's "before"), on the first measured run's scene:
   ``--reference-frames N`` renders N of the preview's frames, spread over the orbit, with the
   torch reference rasterizer and with the fastest one, frame by frame: per-frame medians, the
   speed-up, the image difference (max |diff|, PSNR), and an *estimate* of the 24-frame reference
   preview (path setup + 24 x the median frame). ``--reference-preview`` renders all 24 frames
   with the reference through ``render_preview`` itself (slow: minutes on a CPU) and compares
   them with the fastest rasterizer's preview of the same scene.
3. Fresh process: ``vist3a-rt generate PROMPT --out TMP`` end to end (Python start, imports,
   load, generation, PLY + cameras + preview written), median of ``--cli-repeats``.
4. Load: the in-process ``Vist3A.load`` time (cold imports excluded: they happened before the
   clock started).

The preview's share of generate + preview is reported with each rasterizer, in wall time and in
process CPU time (all threads; steadier than wall time on a loaded machine).

    python benchmarks/generate.py [--model nano] [--prompt "..." ...] [--repeats 5] [--cli-repeats 3]
                                  [--threads 2] [--reference-frames 3] [--reference-preview] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

# Captions in the nano model's closed vocabulary (vist3a_rt/training/world/captions.py), all
# different: the text encoder's LRU cache keys on the exact string. An unknown word is an error.
PROMPTS = (
    "a red cube left of a blue sphere",
    "a small green cone on top of a large yellow box",
    "there is a purple cylinder behind an orange ball",
    "a scene with a white sphere in front of a black cube",
    "a big pink block to the right of a brown cone",
    "a tiny blue ball resting on a red cylinder",
    "to the left of a yellow cube there is a green sphere",
    "an orange cone is under a purple block",
)
WARMUP_PROMPT = "a little black cylinder on the ground"  # not in PROMPTS: the measured runs miss the cache
UNKNOWN_WORD_WARNING = "the model's vocabulary does not know"


def main() -> int:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from vist3a_rt import Vist3A
    from vist3a_rt.pipeline.result import DEFAULT_PREVIEW_FRAMES, DEFAULT_PREVIEW_SIZE

    warnings.filterwarnings("error", message=UNKNOWN_WORD_WARNING)  # a prompt outside the vocabulary
    preview = {"num_frames": DEFAULT_PREVIEW_FRAMES, "size": DEFAULT_PREVIEW_SIZE}
    print(f"load: {time.strftime('%H:%M:%S')}, {_load()}", flush=True)
    start = time.perf_counter()
    model = Vist3A.load(args.model)
    load_s = time.perf_counter() - start
    print(f"Vist3A.load({args.model!r}): {load_s:.2f} s; {args.threads} threads", flush=True)
    model.generate(WARMUP_PROMPT, seed=0)  # warm-up: allocator, lazy imports, the negative prompt's embedding
    runs, first = [], None
    for i in range(args.repeats):
        run, result, frames = measure_run(model, args.prompts[i % len(args.prompts)], i, preview)
        runs.append(run)
        first = first or (result, frames)
        print_run(i, run)
    result, auto_frames = first
    reference = {"gaussians": len(result.scene)}
    if args.reference_frames:
        reference["frames"] = reference_frames(result, args.reference_frames, preview)
    cli = [run_cli(args, args.prompts[i % len(args.prompts)], i) for i in range(args.cli_repeats)]
    report(runs, reference, cli, load_s, args, model, preview)
    if args.reference_preview:  # last: it takes longest, and everything else is already reported
        reference["full"] = reference_full(result, auto_frames, preview)
        report(runs, reference, cli, load_s, args, model, preview)
    return 0


def report(runs, reference, cli, load_s, args, model, preview) -> None:
    summary = summarize(runs, reference, cli, load_s, args, model, preview)
    print_summary(summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": runs, "cli_s": cli}, indent=2) + "\n")


# --- in-process generation + fastest preview -----------------------------------------------------

def measure_run(model, prompt: str, seed: int, preview: dict):
    """One generation and its preview with the fastest rasterizer: wall seconds per stage (the
    pipeline's own timings) plus wall and process-CPU seconds of generate and of the preview."""
    from vist3a_rt.pipeline.preview import render_preview

    wall, cpu = time.perf_counter(), time.process_time()
    result = model.generate(prompt, seed=seed)
    run = {"prompt": prompt, **result.timings, "generate_wall": time.perf_counter() - wall,
           "generate_cpu": time.process_time() - cpu, "gaussians": len(result.scene)}
    wall, cpu = time.perf_counter(), time.process_time()
    frames = render_preview(result.scene, result.cameras, backend="auto", **preview)
    run.update(preview_auto_wall=time.perf_counter() - wall, preview_auto_cpu=time.process_time() - cpu)
    return run, result, frames


def print_run(i: int, run: dict) -> None:
    stages = ", ".join(f"{k} {run[k]:.2f}" for k in ("text", "denoise", "vae_decode", "decode_3d", "total"))
    print(f"run {i}: {run['prompt']!r} ({run['gaussians']:,} Gaussians): {stages} s; generate cpu "
          f"{run['generate_cpu']:.2f} s; preview (auto) {run['preview_auto_wall']:.2f} s wall, "
          f"{run['preview_auto_cpu']:.2f} s cpu  [{_load()}]", flush=True)


# --- the reference rasterizer on the same scene --------------------------------------------------

def reference_frames(result, count: int, preview: dict) -> dict:
    """``count`` of the preview's frames, spread over the orbit, rendered with the reference and
    the fastest rasterizer as ``render_preview`` does (drawable Gaussians, white background)."""
    import torch

    from vist3a_rt.pipeline.preview import orbit_cameras
    from vist3a_rt.rendering import render, resolve_backend

    wall, cpu = time.perf_counter(), time.process_time()
    visible = result.scene.prune()
    path = orbit_cameras(result.cameras, preview["num_frames"], preview["size"],
                         target=visible.means.detach().median(dim=0).values)
    setup = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
    fastest = resolve_backend("auto", [visible.means])
    indices = sorted(set(np.linspace(0, preview["num_frames"] - 1, min(count, preview["num_frames"])).round().astype(int).tolist()))
    rows = []
    with torch.inference_mode():
        for index in indices:
            row = {"frame": index}
            for backend in (fastest, "torch"):
                wall, cpu = time.perf_counter(), time.process_time()
                row[backend] = render(visible, path[index], backend=backend, background=(1.0, 1.0, 1.0)).color
                row[f"{backend}_wall"], row[f"{backend}_cpu"] = time.perf_counter() - wall, time.process_time() - cpu
            row.update(image_difference(row.pop(fastest), row.pop("torch")))
            row["fastest"] = fastest
            rows.append(row)
            print(f"reference frame {index}: torch {row['torch_wall']:.2f} s wall / {row['torch_cpu']:.2f} s cpu, "
                  f"'{fastest}' backend {1e3 * row[f'{fastest}_wall']:.1f} ms wall; max |diff| {row['max_abs_diff']:.2e}, "
                  f"PSNR {row['psnr_db']:.1f} dB  [{_load()}]", flush=True)
    return {"setup": setup, "fastest": fastest, "rows": rows}


def reference_full(result, auto_frames: np.ndarray, preview: dict) -> dict:
    """All frames with the reference, through ``render_preview`` (the whole "before" preview)."""
    from vist3a_rt.pipeline.preview import render_preview

    print(f"reference preview, all {preview['num_frames']} frames: started {time.strftime('%H:%M:%S')}", flush=True)
    wall, cpu = time.perf_counter(), time.process_time()
    frames = render_preview(result.scene, result.cameras, backend="torch", progress=True, **preview)  # tqdm: stderr
    full = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
            **image_difference(auto_frames / 255.0, frames / 255.0), "max_abs_diff_uint8": int(
                np.abs(auto_frames.astype(np.int16) - frames.astype(np.int16)).max())}
    print(f"reference preview (torch), {preview['num_frames']} frames: {full['wall']:.1f} s wall, "
          f"{full['cpu']:.1f} s cpu; vs auto: max |diff| {full['max_abs_diff_uint8']}/255, "
          f"PSNR {full['psnr_db']:.1f} dB  [{_load()}]", flush=True)
    return full


def image_difference(a, b) -> dict:
    """max |a - b| and PSNR (peak 1) of two images in [0, 1] (tensors or arrays)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mse = float(np.mean((a - b) ** 2))
    return {"max_abs_diff": float(np.abs(a - b).max()),
            "psnr_db": math.inf if mse == 0 else -10 * math.log10(mse)}


# --- fresh-process CLI ---------------------------------------------------------------------------

def run_cli(args, prompt: str, i: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        command = [_cli_executable(), "generate", prompt, "--model", args.model, "--out", f"{tmp}/out"]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        elapsed = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"CLI run failed ({done.returncode}): {done.stderr[-2000:]}")
        print(f"cli {i}: {prompt!r} {elapsed:.2f} s  [{_load()}]", flush=True)
        return elapsed


def _cli_executable() -> str:
    beside = Path(sys.executable).parent / "vist3a-rt"  # this interpreter's environment first
    return str(beside) if beside.exists() else (shutil.which("vist3a-rt") or sys.exit("vist3a-rt is not installed"))


# --- summary -------------------------------------------------------------------------------------

def summarize(runs: list[dict], reference: dict, cli: list[float], load_s: float, args, model,
              preview: dict) -> dict:
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    stages = {key: _stats([r[key] for r in runs]) for key in keys}
    previews = {"auto rasterizer (measured)": {"wall": stages["preview_auto_wall"]["median"],
                                    "cpu": stages["preview_auto_cpu"]["median"]}}
    if "frames" in reference:
        previews.update(_frame_estimates(reference["frames"], preview["num_frames"]))
    if "full" in reference:
        previews["torch rasterizer (measured, 1 run)"] = {k: reference["full"][k] for k in ("wall", "cpu")}
    generate = {"wall": stages["total"]["median"], "cpu": stages["generate_cpu"]["median"]}
    for p in previews.values():
        p.update({f"share_{k}": p[k] / (generate[k] + p[k]) for k in ("wall", "cpu")})
    return {"model": args.model, "threads": args.threads, "repeats": args.repeats, "prompts": args.prompts,
            "settings": dict(vars(model.defaults)), "preview": preview, "load_s": load_s, "stages": stages,
            "generate_median": generate, "previews": previews, "reference": reference,
            "cli_wall_s": _stats(cli) if cli else None, "load_after": _load()}


def _frame_estimates(frames: dict, num_frames: int) -> dict:
    rows, fastest = frames["rows"], frames["fastest"]
    out = {}
    for backend in ("torch", fastest):
        per_frame = {k: statistics.median(r[f"{backend}_{k}"] for r in rows) for k in ("wall", "cpu")}
        label = f"{backend} rasterizer (estimate: setup + {num_frames} x median of {len(rows)} frames)"
        out[label] = {k: frames["setup"][k] + num_frames * per_frame[k] for k in ("wall", "cpu")}
        out[label].update({f"per_frame_{k}": v for k, v in per_frame.items()})
    return out


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _load() -> str:
    return "load avg " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def print_summary(summary: dict) -> None:
    print(f"\nmodel {summary['model']}, {summary['threads']} threads, {summary['repeats']} runs "
          f"({len(set(summary['prompts']))} prompts), load {summary['load_s']:.2f} s; {summary['load_after']}")
    print(f"{'stage':<20}{'median s':>10}{'min':>9}{'max':>9}")
    for name, s in summary["stages"].items():
        print(f"{name:<20}{s['median']:>10.3f}{s['min']:>9.3f}{s['max']:>9.3f}")
    g = summary["generate_median"]
    print(f"\npreview ({summary['preview']['num_frames']} frames at {summary['preview']['size']}²) against "
          f"generate (median {g['wall']:.2f} s wall, {g['cpu']:.2f} s cpu):")
    for label, p in summary["previews"].items():
        print(f"  {label}: {p['wall']:.2f} s wall, {p['cpu']:.2f} s cpu -> {100 * p['share_wall']:.1f} % of "
              f"generate + preview (wall), {100 * p['share_cpu']:.1f} % (cpu)")
    frames = summary["reference"].get("frames")
    if frames:
        rows, fastest = frames["rows"], frames["fastest"]
        ratio = [r["torch_wall"] / r[f"{fastest}_wall"] for r in rows]
        cpu_ratio = [r["torch_cpu"] / max(r[f"{fastest}_cpu"], 1e-9) for r in rows]
        print(f"per frame ({summary['reference']['gaussians']:,} Gaussians, frames {[r['frame'] for r in rows]}): "
              f"'{fastest}' backend {statistics.median(ratio):.0f}x faster than torch (wall, median of frame ratios; "
              f"cpu {statistics.median(cpu_ratio):.0f}x); max |diff| {max(r['max_abs_diff'] for r in rows):.2e}, "
              f"min PSNR {min(r['psnr_db'] for r in rows):.1f} dB")
    if summary["cli_wall_s"]:
        c = summary["cli_wall_s"]
        print(f"CLI end to end (fresh process, files written): median {c['median']:.2f} s "
              f"(min {c['min']:.2f}, max {c['max']:.2f}, n {c['n']})")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nano")
    parser.add_argument("--prompt", dest="prompts", action="append", default=None,
                        help="prompt for the runs (repeatable: run i uses prompt i mod count); default PROMPTS")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cli-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--reference-frames", type=int, default=0, metavar="N",
                        help="render N of the preview's frames with the torch reference rasterizer too "
                             "(per-frame medians, speed-up, image difference, 24-frame estimate)")
    parser.add_argument("--reference-preview", action="store_true",
                        help="render the whole preview with the torch reference rasterizer (slow; once)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.prompts = args.prompts or list(PROMPTS)
    if args.repeats > len(set(args.prompts)):
        print(f"note: {args.repeats} runs, {len(set(args.prompts))} prompts: later runs reuse cached text "
              "embeddings", file=sys.stderr)
    if args.repeats < 1 or args.reference_frames < 0:
        parser.error("--repeats must be >= 1 and --reference-frames >= 0")
    return args


if __name__ == "__main__":
    sys.exit(main())
