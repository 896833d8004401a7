"""Entry point of the ``peftexport`` console script."""

from __future__ import annotations

from typing import Optional

import typer

from . import cmd_merge  # noqa: F401  (registers commands)
from .app import app


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
    app()
