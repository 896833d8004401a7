"""The widget's controls (Qt only, no behaviour): export, image, interactive, "Segment all", save,
progress and status. ``widget.SegmentWidget`` connects them to what they do."""

from __future__ import annotations

import os

from qtpy.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel,
                            QLineEdit, QProgressBar, QPushButton, QSpinBox, QVBoxLayout, QWidget)

from ..runtime.manifest import PRECISIONS
from ..volume import PROJECTIONS, PROPAGATION_DEFAULTS
from .automatic import AIS_PARAMS, EVERYTHING_PARAMS
from .form import ParamForm
from .volume import MERGE_PARAMS, PROPAGATION_PARAMS, TRACK_PARAMS

BACKENDS = ("onnxruntime", "openvino")


class Panel(QWidget):
    """The controls; subclasses provide load_export, compute_embedding, commit, clear,
    toggle_polarity, segment_all, embed_volume, segment_object_in_volume, segment_all_3d,
    track_objects, save, cancel, _on_adapter, _on_image and _on_polarity."""

    # ---- the form ------------------------------------------------------------------------------

    def _build(self) -> None:
        outer = QVBoxLayout(self)
        box = QGroupBox("Export")
        form = QFormLayout(box)
        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("export folder (manifest.json)")
        browse = QPushButton("…")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.path_edit)
        row.addWidget(browse)
        form.addRow("folder", row)
        self.backend_box = _combo(BACKENDS, "onnxruntime: ONNX Runtime (CPU); openvino: Intel's runtime (CPU)")
        self.precision_box = _combo(PRECISIONS, "Encoder precision; the export must have it (int8: faster on CPU; "
                                    "bf16: with openvino, on CPUs with native bfloat16)")
        self.threads_box = QSpinBox()
        self.threads_box.setRange(0, os.cpu_count() or 64)
        self.threads_box.setToolTip("Intra-op threads of the runtime; 0: its default (all cores)")
        self.load_button = QPushButton("Load export")
        self.load_button.clicked.connect(lambda: self.load_export())
        self.adapter_box = _combo((), "Adapter of a shared-trunk export (one trunk, one head per adapter)")
        self.adapter_box.currentTextChanged.connect(self._on_adapter)
        for label, widget in (("backend", self.backend_box), ("precision", self.precision_box),
                              ("threads", self.threads_box), ("", self.load_button), ("adapter", self.adapter_box)):
            form.addRow(label, widget)
        outer.addWidget(box)

        box = QGroupBox("Image")
        form = QFormLayout(box)
        self.image_box = _combo((), "2D gray or RGB image; a stack or time series is segmented slice by slice")
        self.image_box.currentTextChanged.connect(lambda _: self._on_image())
        self.embed_button = QPushButton("Compute embedding")
        self.embed_button.clicked.connect(lambda: self.compute_embedding())
        form.addRow("layer", self.image_box)
        form.addRow("", self.embed_button)
        outer.addWidget(box)

        box = QGroupBox("Interactive")
        col = QVBoxLayout(box)
        self.negative_box = QCheckBox("new points are negative (Shift-N)")
        self.negative_box.setToolTip("Points layer 'point prompts': click to add (green: object, red: background); "
                                     "Shapes layer 'box prompts': draw a rectangle around the object")
        self.negative_box.toggled.connect(self._on_polarity)
        row = QHBoxLayout()
        for text, slot, tip in (("Commit (Shift-C)", self.commit, "Add the current object as a new label"),
                                ("Clear (Shift-X)", self.clear, "Remove the prompts and the current object")):
            button = QPushButton(text)
            button.setToolTip(tip)
            button.clicked.connect(lambda _=False, slot=slot: slot())
            row.addWidget(button)
            setattr(self, "commit_button" if text.startswith("Commit") else "clear_button", button)
        col.addWidget(self.negative_box)
        col.addLayout(row)
        outer.addWidget(box)

        box = QGroupBox("Segment all")
        col = QVBoxLayout(box)
        self.ais_form, self.everything_form = ParamForm(AIS_PARAMS), ParamForm(EVERYTHING_PARAMS)
        self.everything_form.hide()
        self.all_button = QPushButton("Segment all")
        self.all_button.setToolTip("Automatic instance segmentation with the export's instance decoder when it has "
                                   "one (micro-sam's AIS), otherwise SAM's segment-everything (a point grid)")
        self.all_button.clicked.connect(lambda: self.segment_all())
        for w in (self.ais_form, self.everything_form, self.all_button):
            col.addWidget(w)
        outer.addWidget(box)
        outer.addWidget(self._build_volume())

        self.save_button = QPushButton("Save labels…")
        self.save_button.setToolTip("The selected Labels layer (else the image's objects) to .tif or .zarr, with "
                                    "the export's name and version")
        self.save_button.clicked.connect(lambda: self.save())
        self.progress, self.cancel_button, row = progress_row(lambda: self.cancel())
        self.status = QLabel("Load an export to start.")
        self.status.setWordWrap(True)
        outer.addWidget(self.save_button)
        outer.addLayout(row)
        outer.addWidget(self.status)
        outer.addStretch()

    def _build_volume(self) -> QGroupBox:
        """z-stack or movie: shown only for an image layer with one axis before rows and columns."""
        box = self.volume_group = QGroupBox("Volume / movie")
        col = QVBoxLayout(box)
        self.volume_note = QLabel()  # what a SAM 2 export offers here (``volume.VolumeActions._volume_controls``)
        self.volume_note.setWordWrap(True)
        self.volume_note.hide()
        self.store_edit = QLineEdit()
        self.store_edit.setPlaceholderText("embeddings: in memory, or a folder .zarr to keep them")
        self.store_edit.setToolTip("A zarr store of every plane's embeddings, written on the first run and reopened "
                                   "later without an encoder run (refused if another export or stack made it). "
                                   "CLI --embeddings.")
        self.embed_volume_button = _button("Embed all planes", lambda: self.embed_volume(),
                                           "Encode every plane once (in a worker; Cancel keeps the planes done)")
        self.projection_box = _combo(PROJECTIONS, "Prompts carried from plane to plane (micro-sam's projection "
                                     "modes). CLI --projection.")
        self.projection_box.setCurrentText(PROPAGATION_DEFAULTS["projection"])
        self.propagation_form = ParamForm(PROPAGATION_PARAMS)
        self.propagation_form.layout().insertRow(0, "projection", self.projection_box)
        self.stop_row = QWidget()  # both propagation methods (SAM 2 too): shown beside the button, not in the form
        stops = QHBoxLayout(self.stop_row)
        stops.setContentsMargins(0, 0, 0, 0)
        self.stop_lower_box = QCheckBox("stop at lowest")
        self.stop_upper_box = QCheckBox("stop at highest")
        for b, where, flag in ((self.stop_lower_box, "below the lowest", "lower"),
                               (self.stop_upper_box, "above the highest", "upper")):
            b.setToolTip(f"Nothing {where} prompted slice: prompt the object's end slice and the propagation "
                         f"stops there. CLI --stop-{flag}.")
            stops.addWidget(b)
        self.propagate_button = _button("Segment object in volume", lambda: self.segment_object_in_volume(),
                                        "Carry the object prompted on one or a few slices through the stack; between "
                                        "two prompted slices it is filled in from both; Commit adds it")
        self.merge_form = ParamForm(MERGE_PARAMS)
        self.all_3d_button = _button("Segment all (3D)", lambda: self.segment_all_3d(),
                                     "Every plane segmented as Segment all does (its parameters above), the objects "
                                     "merged across z (multicut)")
        self.track_form = ParamForm(TRACK_PARAMS)
        self.divisions_box = QCheckBox("divisions")
        self.divisions_box.setChecked(True)
        self.divisions_box.setToolTip("Link a track's end to two new tracks (dividing cells). CLI --divisions.")
        self.track_form.layout().addRow("", self.divisions_box)
        self.track_button = _button("Track", lambda: self.track_objects(),
                                    "Every frame segmented as Segment all does, the objects linked over time: "
                                    "tracked labels and a Tracks layer")
        for w in (self.volume_note, self.store_edit, self.embed_volume_button, self.propagation_form, self.stop_row,
                  self.propagate_button, self.merge_form, self.all_3d_button, self.track_form, self.track_button):
            col.addWidget(w)
        box.hide()
        return box

    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Export folder", self.path_edit.text())
        if path:
            self.path_edit.setText(path)

    def _say(self, text: str) -> None:
        self.status.setText(text)

    def _show_progress(self, busy: bool, done: int = 0, total: int = 0) -> None:
        show_progress(self.progress, self.cancel_button, busy, done, total)


def progress_row(cancel) -> tuple:
    """A progress bar and a Cancel button (hidden until work runs) in one row: (bar, button, row)."""
    progress = QProgressBar()
    progress.setRange(0, 0)  # busy indicator until a task reports steps
    button = QPushButton("Cancel")
    button.setToolTip("Stop the running work; results that arrive afterwards are dropped")
    button.clicked.connect(lambda: cancel())
    row = QHBoxLayout()
    row.addWidget(progress)
    row.addWidget(button)
    progress.hide()
    button.hide()
    return progress, button, row


def show_progress(progress: QProgressBar, button: QPushButton, busy: bool, done: int = 0, total: int = 0) -> None:
    """The bar: hidden when idle, steps when the running task reports them, else a busy indicator."""
    progress.setVisible(busy)
    button.setVisible(busy)
    progress.setRange(0, total if busy else 0)
    progress.setValue(done)


def _combo(items, tooltip: str) -> QComboBox:
    box = QComboBox()
    box.addItems(list(items))
    box.setToolTip(tooltip)
    return box


def _button(text: str, slot, tooltip: str) -> QPushButton:
    button = QPushButton(text)
    button.setToolTip(tooltip)
    button.clicked.connect(lambda _=False: slot())
    return button
