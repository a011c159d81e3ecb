"""The ``vist3a-rt`` command line: a thin layer over the Python API.

Exit codes: 0 success, 2 bad input (``Vist3AInputError``), 1 internal failure.
"""

from __future__ import annotations

import importlib.util
import platform
import sys

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
        "render backends: torch (reference)",
        "embedded model (nano): not built yet",
    ]


@click.group()
@click.version_option(__version__, prog_name="vist3a-rt")
def cli() -> None:
    """vist3a-rt: text-to-3D Gaussian splats, VIST3A style."""


@cli.command()
def info() -> None:
    """Versions, available backends and devices, and where the embedded model is."""
    for line in _info_lines():
        click.echo(line)


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, standalone_mode=False)
    except Vist3AInputError as err:
        click.echo(f"error: {err}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except click.ClickException as err:
        err.show()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
