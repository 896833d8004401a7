"""Stage 8, evaluation: the paper's protocol (Dice/IoU per prompt, mSA), model specs -> predictors, the report.

May import: data, runtime, predict, volume, models, peft, errors, fsutil (torch and segment_anything only inside specs' loaders; predict: large.py reads large arrays; volume: --3d and --track).
"""

from .metrics import DEFAULT_THRESHOLDS, dice, iou, matching, mean_segmentation_accuracy, segmentation_accuracy
from .protocol import PROMPT_TYPES, START_TYPES, evaluate_automatic, evaluate_interactive
from .report import evaluate_models, load_raw_samples, markdown_report, write_outputs
from .specs import LoadedModel, ModelSpec, TorchPredictor, load_predictor, parse_model_spec, parse_model_specs

__all__ = [
    "DEFAULT_THRESHOLDS", "LoadedModel", "ModelSpec", "PROMPT_TYPES", "START_TYPES", "TorchPredictor", "dice",
    "evaluate_automatic", "evaluate_interactive", "evaluate_models", "iou", "load_raw_samples", "load_predictor", "markdown_report",
    "matching", "mean_segmentation_accuracy", "parse_model_spec", "parse_model_specs", "segmentation_accuracy",
    "write_outputs",
]
