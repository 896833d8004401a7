"""How a viewer runs ``improve`` away from itself: ``peftexport improve ... --events`` in a subprocess.

Torch-free (json, subprocess, threading only): the napari widget imports this, never torch.

Protocol: the subprocess writes one JSON object per line on stdout, each with an ``event``:

* ``start``: ``images``, ``train_objects``, ``held_out_objects``, ``steps``;
* ``stage``: ``stage`` (load, before, train, export, after, write) and a ``message`` for a status line;
* ``step``: ``step``, ``total``, ``loss``, ``seconds`` (one per training step: the live loss);
* ``result``: ``result``, the dict ``improve_export`` returns (held-out Dice ``before`` / ``after`` per
  precision, what was held out, the training record); the new export is complete when it arrives;
* ``error``: ``message`` (the same line the command prints on stderr; exit code 2, nothing written);
* ``cancelled``: ``message`` (exit code 130, nothing written).

Everything else (warnings, progress bars) goes to stderr. Cancel: create the file given as
``--cancel-file`` (``ImproveProcess.cancel``); the run stops after the current step or stage and
removes what it wrote. Any line that is not a JSON object is not an event (``parse_event``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from collections import deque
from pathlib import Path
from typing import Iterator, Sequence

# AdamW learning rate of the decoder LoRA, here for the CLI and the viewer alike: chosen on demo data that
# benchmarks/bench_improve.py never scores (benchmarks/improve_lr_study.py: 3e-3 gains faster than 1e-3 and
# ends higher after 60 steps; 1e-2 swings).
DEFAULT_LR = 3e-3

EVENTS = ("start", "stage", "step", "result", "error", "cancelled")


def event_line(event: dict) -> str:
    """One event as its line (no newline inside: JSON escapes them)."""
    return json.dumps(event, separators=(",", ":"), default=str)


def parse_event(line: str) -> dict | None:
    """The event of a stdout line, or None for anything else."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and event.get("event") in EVENTS else None


class ImproveProcess:
    """``peftexport improve EXPORT --images DIR --labels DIR -o OUT --events`` in a subprocess.

        proc = ImproveProcess("export", "imgs", "labels", "export_v2", ["--steps", "40"])
        for event in proc.events():      # blocks line by line: run it in a worker thread of the viewer
            ...                          # progress bar, live loss, the result
        proc.cancel()                    # from any thread; the run ends with a "cancelled" event
    """

    def __init__(self, export: str | os.PathLike, images: str | os.PathLike, labels: str | os.PathLike,
                 out: str | os.PathLike, extra_args: Sequence[str] = (), python: str = sys.executable,
                 env: dict | None = None):
        self._cancel_dir = tempfile.mkdtemp(prefix="peftexport-improve-")
        self.cancel_file = Path(self._cancel_dir) / "cancel"
        cmd = [python, "-m", "peft_export.cli", "improve", str(export), "--images", str(images), "--labels",
               str(labels), "-o", str(out), "--events", "--cancel-file", str(self.cancel_file), *extra_args]
        self.stderr_tail: deque[str] = deque(maxlen=50)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                     env=env)
        self._stderr = threading.Thread(target=self._drain, daemon=True)  # a full stderr pipe would block it
        self._stderr.start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.stderr_tail.append(line.rstrip("\n"))

    def events(self) -> Iterator[dict]:
        """Each event as it arrives, until the process ends."""
        for line in self.proc.stdout:
            event = parse_event(line)
            if event is not None:
                yield event

    def cancel(self) -> None:
        self.cancel_file.touch()

    def wait(self, timeout: float | None = None) -> int:
        code = self.proc.wait(timeout)
        self._stderr.join(timeout=5)
        try:
            self.cancel_file.unlink(missing_ok=True)
            os.rmdir(self._cancel_dir)
        except OSError:
            pass
        return code
