"""The ``vist3a-rt`` command line: a thin layer over the Python API.

Exit codes: 0 success, 2 bad input (``Vist3AInputError``), 1 internal failure.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from pathlib import Path

import click

from . import __version__
from .errors import Vist3AInputError


def _module_version(name: str) -> str:
    if importlib.util.find_spec(name) is None:
        return "not installed"
    try:
        from importlib.metadata import version
        return version(name.replace("_", "-"))
    except Exception:  # noqa: BLE001 - a version lookup must never break `info`
        return "installed"


def _info_lines() -> list[str]:
    import torch

    cuda = torch.cuda.is_available()
    return [
        f"vist3a-rt {__version__}",
        f"python {platform.python_version()} on {platform.machine()} ({platform.system()})",
        f"torch {torch.__version__}; CUDA {'available: ' + torch.cuda.get_device_name(0) if cuda else 'not available'}",
        f"threads {torch.get_num_threads()}",
        "optional: " + ", ".join(f"{m} {_module_version(m)}" for m in
                                 ("onnxruntime", "tensorrt", "triton", "diffusers", "transformers", "peft")),
        "render backends: " + ", ".join(_render_backends()),
        "embedded model (nano): " + _embedded_summary(),
    ]


def _embedded_summary() -> str:
    from .models import embedded_manifest, embedded_model_dir

    manifest = embedded_manifest("nano")
    if manifest is None:
        return f"not installed (expected at {embedded_model_dir('nano')})"
    size = sum(f["bytes"] for f in manifest.get("files", {}).values())
    return f"installed, {size / 2**20:.1f} MiB, {embedded_model_dir('nano')}"


def _render_backends() -> list[str]:
    from .rendering import available_backends

    return available_backends()


@click.group()
@click.version_option(__version__, prog_name="vist3a-rt")
def cli() -> None:
    """vist3a-rt: text-to-3D Gaussian splats, VIST3A style."""


@cli.command()
def info() -> None:
    """Versions, available backends and devices, and where the embedded model is."""
    for line in _info_lines():
        click.echo(line)


@cli.command()
@click.argument("prompt", required=False)
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False, path_type=Path),
              help="A text file with one prompt per line (blank lines and lines starting with # skipped); "
                   "each prompt gets its own folder under --out and the seed base+index.")
@click.option("--model", default="nano", show_default=True,
              help="'nano' (embedded) or a model folder laid out as released (wan/, anysplat/, anysplat_stitched.pth).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: out/<prompt-slug>). Must not exist or be empty.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--steps", type=int, default=None, help="Denoising steps (official: 50).")
@click.option("--guidance", type=float, default=None, help="Classifier-free guidance scale (official: 7.5).")
@click.option("--frames", type=int, default=None, help="Video frames, 4k+1 (official: 13).")
@click.option("--height", type=int, default=None)
@click.option("--width", type=int, default=None)
@click.option("--negative-prompt", default=None, help="Replaces the official negative prompt.")
@click.option("--sampler", type=click.Choice(["unipc", "euler"]), default=None)
@click.option("--device", default="cpu", show_default=True)
@click.option("--backend", default="auto", show_default=True)
@click.option("--wan-impl", type=click.Choice(["native", "diffusers"]), default=None,
              help="Classes that run the Wan video half of a model folder: the runtime's own (native) or "
                   "diffusers/transformers (the reference). Default: $VIST3A_WAN_IMPL, else native.")
@click.option("--no-preview", is_flag=True, help="Skip the preview video.")
@click.option("--preview-frames", type=int, default=None, help="Frames of the preview orbit video.")
@click.option("--preview-size", type=int, default=None, help="Longer side of the preview video in pixels.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--threads", default="auto", show_default=True,
              help="CPU threads for torch: a number, or auto (the cores the load average leaves idle, at least 1).")
def generate(prompt, prompts_file, model, out_dir, seed, steps, guidance, frames, height, width,
             negative_prompt, sampler, device, backend, wan_impl, no_preview, preview_frames, preview_size,
             overwrite, threads) -> None:
    """Generate a 3D Gaussian scene from PROMPT (or from each line of --prompts)."""
    import torch

    from .threads import resolve_threads

    torch.set_num_threads(resolve_threads(threads))
    from .pipeline import Vist3A
    from .pipeline.batch import plan_jobs
    from .pipeline.result import DEFAULT_PREVIEW_FRAMES, DEFAULT_PREVIEW_SIZE

    jobs = plan_jobs(prompt, prompts_file, out_dir, seed)
    from .generator.loading import resolve_impl

    rt = Vist3A.load(model, backend=backend, device=device, wan_impl=resolve_impl(wan_impl, default="native"))
    settings = dict(num_steps=steps, guidance_scale=guidance, num_frames=frames, height=height, width=width,
                    negative_prompt=negative_prompt, sampler=sampler)
    for job in jobs:
        result = rt.generate(job.prompt, seed=job.seed, progress=True, **settings)
        written = result.save(job.out_dir, preview=not no_preview, overwrite=overwrite,
                              preview_frames=DEFAULT_PREVIEW_FRAMES if preview_frames is None else preview_frames,
                              preview_size=DEFAULT_PREVIEW_SIZE if preview_size is None else preview_size)
        click.echo(f"{written}  ({len(result.scene)} Gaussians, {result.timings['total']:.2f} s, "
                   f"{torch.get_num_threads()} threads)")


@cli.command("eval")
@click.option("--model", default="nano", show_default=True,
              help="'nano' (embedded) or a model folder laid out as released.")
@click.option("--baseline", default=None,
              help="A model folder (e.g. before reward fine-tuning) to compare on the same prompts and seeds.")
@click.option("--clips", type=int, default=8, show_default=True, help="Held-out clips for sections 1-3 (0 skips).")
@click.option("--prompts", type=int, default=64, show_default=True,
              help="Held-out captions for sections 4-6 (0 skips).")
@click.option("--steps", type=int, default=None, help="Denoising steps (default: the model's).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Held-out stream, noise draws, base of the generation seeds.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("out/eval"), show_default=True,
              help="Folder for report.md and report.json (created; earlier reports there are replaced).")
@click.option("--device", default="cpu", show_default=True)
def eval_command(model, baseline, clips, prompts, steps, seed, out_dir, device) -> None:
    """Evaluate a model on the procedural world's held-out compositions: report.md + report.json."""
    from .evaluation import EvalSettings, check_output_folder, run_eval, write_report

    settings = EvalSettings(model=model, baseline=baseline, clips=clips, prompts=prompts, steps=steps, seed=seed,
                            device=device)
    check_output_folder(out_dir)
    report = run_eval(settings, command=settings.command_line(out_dir),
                      log=lambda line: click.echo(line, err=True))
    for path in write_report(report, out_dir):
        click.echo(path)


def _register_training_commands() -> None:
    from .training.cli import train  # light: the subcommands import their heavy modules lazily

    cli.add_command(train)


_register_training_commands()

from .cli_bench import bench_command  # noqa: E402 - light: the bench modules load when it runs

cli.add_command(bench_command)

from .cli_export import export_command  # noqa: E402 - light: the exporter loads on first use

cli.add_command(export_command)


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, standalone_mode=False)
    except Vist3AInputError as err:
        click.echo(f"error: {err}", err=True)
        return 2
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        return 1
    except click.ClickException as err:
        err.show()
        return 2
    except click.exceptions.Exit as done:  # --help / --version
        return done.exit_code
    except Exception as err:  # noqa: BLE001 - the CLI's contract: internal failures exit 1 with a message
        click.echo(f"internal error ({type(err).__name__}): {err}", err=True)
        if os.environ.get("VIST3A_DEBUG"):
            raise
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
