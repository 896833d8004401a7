"""What ``predict``'s resumable paths (large images, volumes slab by slab) say about a stopped
run: the line a resumed run starts with, and the line Ctrl-C ends with."""

from __future__ import annotations

from typing import Any, Callable, Dict, List

import typer

from .app import echo


def say_resuming(jobs: List[Dict[str, Any]], total_steps: Callable[[Dict[str, Any]], int]) -> None:
    """One line per job that goes on from a stopped run: its partial output and how far it got."""
    from peft_export.predict.large_state import steps_done

    for job in (j for j in jobs if j["resumed"]):
        echo(f"{job['image']}: finishing the stopped run's last steps ({job['out']})" if job["finished"] else
             f"{job['image']}: resuming the stopped run in {job['partial']} ({steps_done(job)} of "
             f"{total_steps(job)} steps done)")


def interrupted(where: str, how: str) -> typer.Exit:
    """Ctrl-C: one line saying what is kept and how to go on; exit 130."""
    import sys

    print(f"interrupted: {where}; {how}", file=sys.stderr)
    return typer.Exit(130)
