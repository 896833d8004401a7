"""Entry point of the ``peftexport`` console script."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Optional

import typer

from .app import app

# Every cli/cmd_*.py registers its commands on import; their heavy imports stay
# inside the command functions so `peftexport --help` is quick.
for _mod in sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name.startswith("cmd_")):
    importlib.import_module(f"{__package__}.{_mod}")


def _version(value: bool) -> None:
    if value:
        from peft_export import __version__

        typer.echo(f"peftexport {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """peftexport: PEFT for Segment Anything, exact merge, verified export."""


def main() -> None:
    app(prog_name="peftexport")  # also under `python -m peft_export.cli` and torchrun
