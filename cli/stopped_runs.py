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


def _let_zarr_io_end(timeout: float = 10.0) -> None:
    """zarr 3 reads and writes on its own event-loop thread. Ctrl-C stops the step waiting for
    them, not them; left pending, asyncio reports each at exit on stderr, after our line."""
    import asyncio

    try:
        from zarr.core import sync
    except ImportError:
        return
    loop = (getattr(sync, "loop", None) or [None])[0]  # zarr 3's I/O loop (another zarr: nothing to wait for)
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    async def rest() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    try:
        asyncio.run_coroutine_threadsafe(rest(), loop).result(timeout + 1)
    except Exception:  # noqa: BLE001 - a message's tidiness is not worth a traceback
        pass


def interrupted(where: str, how: str) -> typer.Exit:
    """Ctrl-C: one line saying what is kept and how to go on (the last line); exit 130."""
    import sys

    _let_zarr_io_end()
    print(f"interrupted: {where}; {how}", file=sys.stderr)
    return typer.Exit(130)
