"""The Typer app and what every command shares: error handling, command order, deprecations."""

from __future__ import annotations

import functools
import os
import re
import sys
import warnings
from typing import Any, Callable, TypeVar

import typer
from typer.core import TyperGroup

try:  # typer >= 0.22 runs on its own copy of click; its exceptions are the ones raised
    from typer import _click as click
except ImportError:  # older typer: click itself
    import click

# `peftexport --help` lists commands in the order a user runs them; commands not named
# here (added later) follow in the order they were registered.
PIPELINE_ORDER = (
    "make-demo-data", "params", "finetune", "merge", "merge-and-export", "predict", "web",
    "evaluate", "improve", "bench", "bench-compare", "demo",
)


# An error the code did not foresee (a bug, or a library's own exception that should have been
# turned into a PeftExportError): exit 1, told apart from bad input (exit 2).
INTERNAL_ERROR_EXIT = 1
DEBUG_ENV = "PEFTEXPORT_DEBUG"
# Packages of the optional extras a command may need: the module's top-level name -> the extra installing it.
TORCH_SIDE = {"torch": "torch", "torchvision": "torch", "segment_anything": "torch", "safetensors": "torch",
              "onnx": "torch", "onnxscript": "torch", "scipy": "torch", "matplotlib": "torch",
              "onnxruntime": "cpu", "openvino": "openvino", "skimage": "ais", "zarr": "zarr",
              "dask": "distributed", "distributed": "distributed", "bioimage_cpp": "volume", "laptrack": "volume",
              "traccuracy": "volume"}


def unexpected_error_line(exc: BaseException) -> str:
    """``error: <Type>: <first line of the message>`` and how to see the traceback."""
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    if len(first) > 300:
        first = first[:297] + "..."
    kind = "out of memory" if isinstance(exc, MemoryError) else type(exc).__name__
    kind = f"{kind}: {first}" if first else kind
    return (f"error: {kind} (unexpected; rerun with {DEBUG_ENV}=1 for the traceback and report it "
            "if the input was valid)")


def usage_error_line(exc: Exception) -> str:
    """Click's usage errors as our one line: ``error: <option>: <problem> (see '... --help')``."""
    ctx = getattr(exc, "ctx", None)
    see = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    message = exc.message.rstrip(".")
    message = message[:1].lower() + message[1:]
    if isinstance(exc, click.exceptions.NoSuchOption):
        hidden = {o for p in (ctx.command.params if ctx is not None else []) if getattr(p, "hidden", False)
                  for o in p.opts}  # deprecated spellings are not suggested
        near = [o for o in exc.possibilities or () if o not in hidden]
        near = f"; did you mean {' or '.join(near)}?" if near else ""
        return f"error: {exc.option_name}: no such option{near}{see}"
    if isinstance(exc, click.exceptions.BadOptionUsage):
        return f"error: {exc.option_name}: {message.replace(repr(exc.option_name) + ' ', '')}{see}"
    param = getattr(exc, "param", None)
    if isinstance(exc, click.exceptions.BadParameter) and param is not None:
        # The long spelling of an option (--out rather than -o); an argument's metavar.
        name = max(param.opts, key=len) if param.param_type_name == "option" else (param.metavar or param.name.upper())
        if isinstance(exc, click.exceptions.MissingParameter):
            return f"error: {name}: required {param.param_type_name} missing{see}"
        return f"error: {name}: {message}{see}"
    unknown = re.match(r"no such command '(.+?)'\.?\s*(.*)", message)
    if unknown:
        near = unknown.group(2)
        return f"error: {unknown.group(1)}: no such command{'; ' + near[:1].lower() + near[1:] if near else ''}{see}"
    subject = ctx.command_path if ctx is not None else "peftexport"
    return f"error: {subject}: {message}{see}"


class PipelineGroup(TyperGroup):
    """Commands in pipeline order; usage errors as one ``error:`` line with exit code 2."""

    def list_commands(self, ctx: Any) -> list[str]:
        known = [n for n in PIPELINE_ORDER if n in self.commands]
        return known + [n for n in self.commands if n not in known]

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.exceptions.UsageError as exc:
            print(usage_error_line(exc), file=sys.stderr)
            sys.exit(2)
        except click.exceptions.ClickException as exc:
            print(f"error: {exc.format_message()}", file=sys.stderr)
            sys.exit(exc.exit_code)
        except typer.Abort:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="peftexport",
    cls=PipelineGroup,
    help="Parameter-efficient finetuning of Segment Anything for biomedical images: train adapters, "
    "merge them exactly, export verified ONNX/TensorRT, segment, evaluate and benchmark.",
    epilog="Every command takes -q/--quiet (no progress output); commands that write files take -o/--out "
    "and replace existing outputs only with --overwrite. Bad input ends with one 'error: ...' line "
    "and exit code 2; an unexpected error ends with one line and exit code 1 (set "
    f"{DEBUG_ENV}=1 for its traceback).",
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
            except (typer.Exit, click.exceptions.ClickException, SystemExit):
                raise
            except ModuleNotFoundError as exc:
                # The core install is torch-free (runtime, predict, web, napari): say which extra is missing.
                extra = TORCH_SIDE.get((exc.name or "").split(".")[0])
                if extra is None:
                    raise
                print(f"error: {name} needs {exc.name}, which is not installed: pip install 'peftexport[{extra}]'",
                      file=sys.stderr)
                raise typer.Exit(2) from None
            except Exception as exc:  # a bug or a library's own error: one line, traceback on request
                if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
                    raise
                print(unexpected_error_line(exc), file=sys.stderr)
                raise typer.Exit(INTERNAL_ERROR_EXIT) from None

        app.command(name=name, help=help, short_help=short or help)(run)
        return fn

    return wrap


def deprecated(old: str, new: str) -> None:
    """One warning line for a spelling kept for one release (listed in CHANGELOG.md)."""
    print(f"warning: {old} is deprecated and will be removed in 0.3; use {new}", file=sys.stderr)


def echo(text: str = "") -> None:
    typer.echo(text)
