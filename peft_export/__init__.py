"""peftexport: PEFT for Segment Anything, exact merge, verified export, torch-free runtime.

The folders are the pipeline, in order; a stage imports only the stages its
``__init__`` names ("May import"), never a later one (tests/test_layout.py checks it):

    models/      build SAM, load checkpoints            peft/     PEFT methods, merge, adapter files
    data/        images, labels, patches, prompts       training/ finetune loop
    merge.py     adapter -> plain checkpoint, verified  export/   ONNX / TensorRT graphs, parity, manifest
    runtime/     torch-free inference (numpy + ORT)     predict/  the runtime on image files
    evaluation/  protocol, model specs, report          bench/    latency and memory, side by side
    improve/     an export's decoder re-trained on       demo.py   the whole pipeline in one call
                 corrected objects, exported anew       cli/      the thin command line (peft_export.cli)

This top-level module imports nothing heavy on purpose: ``peft_export.runtime``
must stay importable in an environment without torch.
"""

from . import _compat

__version__ = "0.2.0"

_compat.install()
