"""The dock widget "Improve the model": from the objects a user committed to a better export,
without leaving napari.

It takes each image layer with a Labels layer of committed objects ("<image> objects" by default;
2D, or the labelled planes of a stack), writes them to a temporary folder, and runs ``peftexport
improve ... --events`` in a separate process (``improve.protocol``: the viewer never imports torch):
held-out objects, decoder LoRA on cached embeddings, merge, export fp32 + int8 through the gate
into a NEW folder, before/after Dice on the held-out objects. The bar counts training steps and
the live loss is shown; Cancel stops the process, which then writes nothing. When it is done the
new export is loaded into the segment widget. The old export is never touched.

Needs the ``[torch]`` extra in the viewer's Python (the process runs there); says so when it is
missing. When the export's recorded torch source is not on this machine, the widget asks for it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from napari.layers import Image, Labels
from qtpy.QtWidgets import (QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QLineEdit,
                            QPushButton, QVBoxLayout, QWidget)

from ..errors import PeftExportError
from ..improve.protocol import DEFAULT_LR, ImproveProcess
from . import layers as L
from .automatic import Param
from .form import ParamForm
from .improve_data import TrainingPair, check_pairs, count_ids, dice_text, next_free, torch_missing, write_dataset
from .panel import progress_row, show_progress
from .worker import Cancelled, Task, Tasks

NONE = "(none)"
NOT_TRAINING = (L.POINTS, L.BOXES, L.CURRENT, "volume object")
IMPROVE_PARAMS = (
    Param("steps", "steps", 60, 1, 100000, 1, "Training steps (one image view each). CLI --steps."),
    Param("holdout", "held out", 0.2, 0.01, 0.9, 0.05,
          "Share of the objects kept out of training for the before/after check. CLI --holdout."),
    Param("rank", "LoRA rank", 8, 1, 256, 1, "Rank of the decoder LoRA. CLI --rank."),
    Param("lr", "learning rate", DEFAULT_LR, 1e-5, 1.0, 1e-4, "AdamW learning rate. CLI --lr."),
)
SEGMENT_WIDGET = "Segment with an export"
NICE = 10  # the training process's niceness (its threads start later and inherit it)


class ImproveWidget(QWidget):
    """napari dock widget; ``improve()`` (the button) and ``cancel()`` can be called by tests and scripts."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.tasks = Tasks(lambda target: True, self._tasks_changed, self._dropped)
        self.events: List[tuple] = []  # (perf_counter, event) of the running or last run, as they arrived
        self.result: Optional[dict] = None
        self._process: Optional[ImproveProcess] = None
        self._out: Optional[Path] = None
        self._build()
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(lambda *_: self._refresh_pairs())
        self._refresh_pairs()
        self.missing_torch = torch_missing()
        if self.missing_torch:
            self.improve_button.setEnabled(False)
            self._say(f"error: {self.missing_torch}")

    # ---- the form ---------------------------------------------------------------------------------

    def _build(self) -> None:
        outer = QVBoxLayout(self)
        box = QGroupBox("Export")
        form = QFormLayout(box)
        self.export_edit = _path_row(form, "improve", "the export to improve (the segment widget's by default)",
                                     lambda edit: self._choose_dir(edit, "Export to improve"))
        self.out_edit = _path_row(form, "new export", "a new folder (written whole at the end, or not at all)",
                                  lambda edit: self._choose_dir(edit, "New export folder"))
        self.source_edit = _path_row(form, "torch source", "asked for when the export's recorded one is missing",
                                     self._choose_source)
        self.source_row = [form.labelForField(self.source_edit.parent()), self.source_edit.parent()]
        outer.addWidget(box)

        box = QGroupBox("Training data (committed labels)")
        self.pairs_form = QFormLayout(box)
        self.pair_boxes: Dict[str, QComboBox] = {}
        outer.addWidget(box)

        self.options = ParamForm(IMPROVE_PARAMS)
        self.options.boxes["lr"].setDecimals(5)
        outer.addWidget(self.options)
        self.improve_button = QPushButton("Improve the model")
        self.improve_button.setToolTip("Train the export's mask decoder on these objects (some held out), merge, export "
                                       "fp32 + int8 into the new folder, load it into the segment widget")
        self.improve_button.clicked.connect(lambda: self.improve())
        outer.addWidget(self.improve_button)
        self.progress, self.cancel_button, row = progress_row(lambda: self.cancel())
        outer.addLayout(row)
        self.loss_label = QLabel("")
        self.status = QLabel("Commit objects with the segment widget, then improve.")
        self.dice_label = QLabel("")
        for label in (self.loss_label, self.status, self.dice_label):
            label.setWordWrap(True)
            outer.addWidget(label)
        outer.addStretch()
        self._show_source(False)

    def _show_source(self, visible: bool) -> None:
        for widget in self.source_row:
            widget.setVisible(visible)

    def _choose_dir(self, edit: QLineEdit, title: str) -> None:
        path = QFileDialog.getExistingDirectory(self, title, edit.text())
        if path:
            edit.setText(path)

    def _choose_source(self, edit: QLineEdit) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "The export's torch source: adapter.safetensors or a checkpoint",
                                              edit.text(), "adapter or checkpoint (*.safetensors *.json *.pth *.pt)")
        if path:
            edit.setText(path)

    def _say(self, text: str) -> None:
        self.status.setText(text)

    def _refresh_pairs(self) -> None:
        """One row per image layer: which Labels layer holds its committed objects."""
        chosen = {name: box.currentText() for name, box in self.pair_boxes.items()}
        while self.pairs_form.rowCount():
            self.pairs_form.removeRow(0)
        self.pair_boxes = {}
        labels = [l.name for l in self.viewer.layers if isinstance(l, Labels) and l.name not in NOT_TRAINING]
        for image in (l for l in self.viewer.layers if isinstance(l, Image)):
            box = QComboBox()
            box.addItems([NONE] + labels)
            default = f"{image.name} objects"
            box.setCurrentText(chosen.get(image.name, default if default in labels else NONE))
            self.pairs_form.addRow(image.name, box)
            self.pair_boxes[image.name] = box

    # ---- running ---------------------------------------------------------------------------------

    def segment_widget(self) -> Any:
        """The plugin's segment widget (opened if it is not)."""
        return self.viewer.window.add_plugin_dock_widget("peftexport", SEGMENT_WIDGET)[1]

    def pairs(self) -> List[TrainingPair]:
        self._refresh_pairs()
        found = []
        for name, box in self.pair_boxes.items():
            if box.currentText() == NONE:
                continue
            image, labels = self.viewer.layers[name], self.viewer.layers[box.currentText()]
            found.append(TrainingPair(name, image.data[0] if image.multiscale else image.data,
                                      labels.data[0] if labels.multiscale else labels.data, bool(image.rgb)))
        return found

    def improve(self) -> Optional[Task]:
        """Check the input, then train, merge and export in a separate process (a worker reads its
        events); returns the task."""
        try:
            if self.missing_torch:
                raise PeftExportError(self.missing_torch)
            if self.tasks.running("improve") is not None:
                raise PeftExportError("already improving: wait, or Cancel")
            export = self._export()
            out = Path(self.out_edit.text().strip()) if self.out_edit.text().strip() else next_free(
                export.with_name(f"{export.name}_improved"))
            if out.exists():
                raise PeftExportError(f"new export {out}: already exists; give a new folder")
            pairs = self.pairs()
            objects = check_pairs(pairs, count_ids)
        except PeftExportError as exc:
            self._say(f"error: {exc}")
            return None
        self.out_edit.setText(str(out))
        values = self.options.values()
        args = ["--steps", str(int(values["steps"])), "--holdout", str(values["holdout"]), "--rank",
                str(int(values["rank"])), "--lr", str(values["lr"])]
        source = self.source_edit.text().strip()
        if source:
            args += ["--source", source]
        self.events, self.result, self._out = [], None, out
        self.dice_label.setText("")
        self.loss_label.setText("")
        self._say(f"improving {export.name} on {objects} objects of {len(pairs)} image(s) …")
        return self.tasks.start("improving the model", lambda task: self._work(task, export, out, pairs, args),
                                on_done=self._done, on_error=self._failed, key="improve")

    def _export(self) -> Path:
        text = self.export_edit.text().strip()
        if not text:
            session = self.segment_widget().session
            if session is None:
                raise PeftExportError("no export: load one in the segment widget, or give it here")
            text = str(session.export_dir)
            self.export_edit.setText(text)
        export = Path(text)
        if not (export / "manifest.json").is_file():
            raise PeftExportError(f"{export}: not an export directory (no manifest.json)")
        return export

    def _work(self, task: Task, export: Path, out: Path, pairs: List[TrainingPair], args: List[str]) -> dict:
        """In a worker: the data to a temporary folder, then the process's events until it ends."""
        data = Path(tempfile.mkdtemp(prefix="peftexport-improve-data-"))
        try:
            write_dataset(pairs, data)
            task.step(0, 0)
            proc = self._process = ImproveProcess(export, data / "images", data / "labels", out, args)
            if hasattr(os, "setpriority"):  # the viewer first; training takes the CPU it leaves
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PROCESS, proc.proc.pid, NICE)
            result, error, stopped = None, None, False
            for event in proc.events():
                self.events.append((time.perf_counter(), event))
                kind = event["event"]
                if kind == "result":
                    result = event["result"]
                elif kind == "error":
                    error = event["message"]
                try:
                    task.step(*((event["step"], event["total"]) if kind == "step" else task.progress))
                except Cancelled:
                    proc.cancel()  # it stops after this step or stage and writes nothing
                    stopped = True
            code = proc.wait()
        finally:
            self._process = None
            shutil.rmtree(data, ignore_errors=True)
        if stopped or task.cancelled:
            raise Cancelled("improving the model")
        if error is not None:
            raise PeftExportError(error)
        if result is None:
            tail = [line for line in proc.stderr_tail if line.strip()]
            raise PeftExportError(f"improve ended with exit code {code}" + (f": {tail[-1]}" if tail else ""))
        return result

    def cancel(self) -> None:
        """Stop the run (the process writes nothing; the old export stays as it is)."""
        if self.tasks.cancel() and self._process is not None:
            self._process.cancel()  # noticed between steps and stages, not only at the next event
        self._say("cancelling …")

    def _tasks_changed(self) -> None:
        running = [t for t in self.tasks]
        show_progress(self.progress, self.cancel_button, bool(running), *(running[-1].progress if running else (0, 0)))
        last = next((e for _, e in reversed(self.events) if e["event"] in ("stage", "step")), None)
        if running and last is not None and last["event"] == "stage":
            self._say(last["message"] + " …")
        if running and last is not None and last["event"] == "step":
            self._say(f"training: step {last['step']} of {last['total']}")
            self.loss_label.setText(f"loss {last['loss']:.4f}")

    def _dropped(self, task: Task, why: str) -> None:
        if self._out is not None and self._out.exists():  # cancelled after the folder was complete
            self._say(f"cancelled too late: {self._out} was written (the old export is unchanged)")
        else:
            self._say(f"cancelled: nothing written; {self.export_edit.text()} is unchanged")

    def _failed(self, exc: Exception) -> None:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "--source" in text:  # the export's recorded torch source is not here: ask for it
            self._show_source(True)
            text += "; choose it under 'torch source' and press Improve again"
        self._say(f"error: {text}")

    def _done(self, out: dict) -> None:
        self.result = out["result"]
        new = Path(self.result["out"])
        self.dice_label.setText(dice_text(self.result))
        segment = self.segment_widget()
        segment.load_export(new)
        self._say(f"new export {new} ({out['end'] - out['start']:.0f} s), loaded into the segment widget")
        self.export_edit.setText(str(new))  # the next round improves this one
        self.out_edit.setText(str(next_free(new.with_name(f"{new.name}_improved"))))
        self.source_edit.clear()
        self._show_source(False)


def _path_row(form: QFormLayout, label: str, placeholder: str, browse) -> QLineEdit:
    edit = QLineEdit()
    edit.setPlaceholderText(placeholder)
    button = QPushButton("…")
    button.clicked.connect(lambda: browse(edit))
    row = QWidget()
    layout = QHBoxLayout(row)
    layout.setContentsMargins(0, 0, 0, 0)
    layout.addWidget(edit)
    layout.addWidget(button)
    form.addRow(label, row)
    return edit
