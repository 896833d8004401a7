""""Segment all" parameters as a Qt form: one spin box per ``automatic.Param``, its CLI help as tooltip."""

from __future__ import annotations

from typing import Dict, Sequence

from qtpy.QtWidgets import QDoubleSpinBox, QFormLayout, QSpinBox, QWidget

from .automatic import Param


class ParamForm(QWidget):
    """Spin boxes for ``params``; ``values()`` gives {name: number} for ``segment_all``."""

    def __init__(self, params: Sequence[Param], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.params = tuple(params)
        self.boxes: Dict[str, QSpinBox | QDoubleSpinBox] = {}
        layout = QFormLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        for p in self.params:
            box: QSpinBox | QDoubleSpinBox
            if p.whole:
                box = QSpinBox()
                box.setRange(int(p.minimum), int(p.maximum))
                box.setSingleStep(int(p.step))
                box.setValue(int(p.default))
            else:
                box = QDoubleSpinBox()
                box.setDecimals(3)
                box.setRange(p.minimum, p.maximum)
                box.setSingleStep(p.step)
                box.setValue(float(p.default))
            box.setToolTip(p.tooltip)
            box.setObjectName(p.name)
            layout.addRow(p.label, box)
            layout.labelForField(box).setToolTip(p.tooltip)
            self.boxes[p.name] = box

    def values(self) -> Dict[str, float]:
        return {name: box.value() for name, box in self.boxes.items()}

    def set_values(self, **values: float) -> None:
        for name, value in values.items():
            self.boxes[name].setValue(value)
