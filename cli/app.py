"""The Typer app and what every command shares: error handling and common options."""

from __future__ import annotations

import functools
import sys
import warnings
from typing import Callable, TypeVar

import typer

app = typer.Typer(
    name="peftexport",
    help="Parameter-efficient finetuning of Segment Anything for biomedical images: train adapters, "
    "merge them exactly, export verified ONNX/TensorRT, benchmark and evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

F = TypeVar("F", bound=Callable)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def command(name: str, help: str, short: str | None = None) -> Callable[[F], F]:
    """Register a command whose user errors end as one line on stderr and exit code 2.

    ``short`` is the one line `peftexport --help` shows (kept under 56 characters).
    """

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            from peft_export.errors import PeftExportError

            warnings.showwarning = _one_line_warning
            try:
                return fn(*args, **kwargs)
            except PeftExportError as exc:
                print(f"error: {exc}", file=sys.stderr)
                raise typer.Exit(2) from None
            except KeyboardInterrupt:
                print("interrupted", file=sys.stderr)
                raise typer.Exit(130) from None

        app.command(name=name, help=help, short_help=short or help)(run)
        return fn

    return wrap


def echo(text: str = "") -> None:
    typer.echo(text)
