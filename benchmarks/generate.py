"""End-to-end ``generate`` on one model (default: the embedded nano): stage times, preview share, CLI wall time.

Three measurements, all on the same model, prompt and settings, in one run:

1. In-process: ``Vist3A.load`` once, one warm-up generation, then ``--repeats`` generations;
   median and spread of each stage (text, denoise, VAE decode, 3D decode, total) plus the
   preview render with the fastest rasterizer ("auto": the C++ one when built) and, as the
   baseline, with the torch reference rasterizer — the preview's share of the end-to-end time
   with each (issue 7's before / after).
2. Fresh process: ``vist3a-rt generate PROMPT --out TMP`` end to end (Python start, imports,
   load, generation, PLY + cameras + preview written), median of ``--cli-repeats``.
3. Load: the in-process ``Vist3A.load`` time (cold imports excluded: they happened in 2's
   processes and in this one before the clock started).

    python benchmarks/generate.py [--model nano] [--prompt "..."] [--repeats 5] [--cli-repeats 3]
                                  [--threads 2] [--reference-preview] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_PROMPT = "a red cube left of a blue sphere"


def main() -> int:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from vist3a_rt import Vist3A
    from vist3a_rt.pipeline.preview import render_preview
    from vist3a_rt.pipeline.result import DEFAULT_PREVIEW_FRAMES, DEFAULT_PREVIEW_SIZE

    start = time.perf_counter()
    model = Vist3A.load(args.model)
    load_s = time.perf_counter() - start
    model.generate(args.prompt, seed=0)  # warm-up: caches, allocator, lazy imports
    runs = []
    for i in range(args.repeats):
        result = model.generate(args.prompt, seed=i)
        timings = dict(result.timings)
        for backend in ["auto"] + (["torch"] if args.reference_preview and i == 0 else []):
            start = time.perf_counter()
            render_preview(result.scene, result.cameras, num_frames=DEFAULT_PREVIEW_FRAMES,
                           size=DEFAULT_PREVIEW_SIZE, backend=backend)
            timings[f"preview_{backend}"] = time.perf_counter() - start
        runs.append(timings)
    cli = [run_cli(args) for _ in range(args.cli_repeats)]
    summary = summarize(runs, cli, load_s, args, model)
    print_table(summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": runs, "cli_s": cli}, indent=2) + "\n")
    return 0


def run_cli(args) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        command = ["vist3a-rt", "generate", args.prompt, "--model", args.model, "--out", f"{tmp}/out"]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        elapsed = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"CLI run failed ({done.returncode}): {done.stderr[-2000:]}")
        return elapsed


def summarize(runs: list[dict], cli: list[float], load_s: float, args, model) -> dict:
    stages = {key: _stats([r[key] for r in runs if key in r]) for key in runs[0]}
    if "preview_torch" in runs[0]:
        stages["preview_torch"] = _stats([runs[0]["preview_torch"]])
    total = stages["total"]["median"]
    share = {f"preview_share_{b}": stages[f"preview_{b}"]["median"] / (total + stages[f"preview_{b}"]["median"])
             for b in ("auto", "torch") if f"preview_{b}" in stages}
    return {"model": args.model, "prompt": args.prompt, "threads": args.threads, "repeats": args.repeats,
            "settings": {k: v for k, v in vars(model.defaults).items()}, "load_s": load_s, "stages": stages,
            "generate_plus_preview_s": total + stages["preview_auto"]["median"], **share,
            "cli_wall_s": _stats(cli) if cli else None}


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def print_table(summary: dict) -> None:
    print(f"model {summary['model']}, {summary['threads']} threads, {summary['repeats']} runs, "
          f"load {summary['load_s']:.2f} s")
    print(f"{'stage':<16}{'median s':>10}{'min':>9}{'max':>9}")
    for name, s in summary["stages"].items():
        print(f"{name:<16}{s['median']:>10.3f}{s['min']:>9.3f}{s['max']:>9.3f}")
    print(f"generate + preview (fastest rasterizer): {summary['generate_plus_preview_s']:.2f} s")
    for key in ("preview_share_auto", "preview_share_torch"):
        if key in summary:
            print(f"{key}: {100 * summary[key]:.1f} % of generate + preview")
    if "preview_torch" in summary["stages"]:
        ratio = summary["stages"]["preview_torch"]["median"] / summary["stages"]["preview_auto"]["median"]
        print(f"preview: fastest rasterizer {ratio:.1f}x faster than the torch reference")
    if summary["cli_wall_s"]:
        c = summary["cli_wall_s"]
        print(f"CLI end to end (fresh process, files written): median {c['median']:.2f} s "
              f"(min {c['min']:.2f}, max {c['max']:.2f}, n {c['n']})")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nano")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cli-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--reference-preview", action="store_true",
                        help="also time the preview with the torch reference rasterizer (slow; once)")
    parser.add_argument("--json", default=None)
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(main())
