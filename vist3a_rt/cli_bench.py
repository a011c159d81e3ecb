"""``vist3a-rt bench``: the click command over ``vist3a_rt.bench`` (registered in ``cli.py``)."""

from __future__ import annotations

from pathlib import Path

import click

from .errors import Vist3AInputError


@click.command("bench")
@click.option("--model", default="nano", show_default=True,
              help="'nano' (embedded), a model folder laid out as released, or an exported bundle.")
@click.option("--torch-model", default=None,
              help="What the torch baseline loads instead of --model: e.g. --model BUNDLE --torch-model nano "
                   "compares the bundle's graphs with the embedded model's eager torch pipeline.")
@click.option("--backends", default="torch,onnxruntime,tensorrt", show_default=True,
              help="Comma-separated backends; torch eager always runs as the baseline. One that cannot "
                   "run here gets a row saying why.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--repeats", type=int, default=5, show_default=True, help="Timed runs per backend.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed runs before them.")
@click.option("--steps", type=int, default=None, help="Denoising steps (default: the model's).")
@click.option("--prompt", default=None, help="The prompt of every run.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", default=None,
              help="Thread counts, comma-separated (e.g. 2,1): every backend is measured at each (torch "
                   "threads; onnxruntime intra-op threads). Default: torch's current setting, onnxruntime's "
                   "default (the physical cores).")
@click.option("--cold-start/--no-cold-start", default=True, show_default=True,
              help="Also time a fresh process per backend: import + load until the first denoising step.")
@click.option("--preview-frames", type=int, default=None, help="Frames of the preview video in the with-preview run.")
@click.option("--preview-size", type=int, default=None, help="Longer side of the preview in pixels.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the full report (every statistic) to this JSON file.")
def bench_command(model, torch_model, backends, device, repeats, warmup, steps, prompt, seed, threads, cold_start,
                  preview_frames, preview_size, json_path) -> None:
    """Per-stage and end-to-end latency, memory and cold start of each backend against torch."""
    from .bench import DEFAULT_PROMPT, BenchSettings, format_report, run_bench, write_json

    names = tuple(name.strip() for name in backends.split(",") if name.strip())
    if not names:
        raise Vist3AInputError("--backends names no backend")
    if threads is not None:
        try:
            threads = tuple(int(count) for count in threads.split(","))
        except ValueError:
            raise Vist3AInputError(f"--threads takes comma-separated integers, got {threads!r}") from None
    previews = {k: v for k, v in (("preview_frames", preview_frames), ("preview_size", preview_size)) if v is not None}
    settings = BenchSettings(model=model, torch_model=torch_model, backends=names, device=device, repeats=repeats,
                             warmup=warmup, steps=steps, prompt=prompt or DEFAULT_PROMPT, seed=seed, threads=threads,
                             cold_start=cold_start, **previews)
    report = run_bench(settings, log=lambda line: click.echo(line, err=True))
    click.echo(format_report(report))
    if json_path is not None:
        click.echo(f"wrote {write_json(report, json_path)}")
