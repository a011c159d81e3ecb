"""``vist3a-rt export``: a model folder (or the embedded ``nano``) → a bundle directory.

A thin layer over ``vist3a_rt.export.bundle.export_bundle``; register it with
``cli.add_command(export_command)``. Errors follow the CLI's contract: a ``Vist3AInputError``
(bad source, unwritable or foreign ``--out``, TensorRT missing for ``--backend tensorrt``) exits 2.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command("export")
@click.option("--checkpoint", "source", required=True,
              help="'nano' (embedded), or a model folder laid out as released (wan/, anysplat/, "
                   "anysplat_stitched.pth), e.g. a nano recipe's assemble/model.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="The bundle directory: created, or an existing bundle updated (valid steps are kept).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="fp16/bf16 apply to the denoiser and stitched decoder (bf16 also the text encoder); "
                   "the VAE stays fp32.")
@click.option("--backend", type=click.Choice(["onnx", "tensorrt"]), default="onnx", show_default=True,
              help="tensorrt: the ONNX bundle, then TensorRT engines (needs tensorrt and an NVIDIA GPU).")
def export_command(source: str, out: Path, precision: str, backend: str) -> None:
    """Export a model to a bundle: ONNX graphs, safetensors weights, tokenizer, manifest."""
    from .export.bundle import export_bundle

    report = export_bundle(source, out, precision=precision, backend=backend,
                           log_step=lambda line: click.echo(line, err=True))
    made = report.made
    click.echo(f"{report.bundle}  ({len(made)} of {len(report.steps)} steps made, "
               f"{report.manifest['export']['seconds']:.1f} s)")
