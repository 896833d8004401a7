"""Stage 7b, predict: the runtime applied to image files (masks as TIFF, scores as JSON, overlay PNGs).

May import: runtime, data, errors, fsutil (no torch: it serves deployments).
"""

from .images import EVERYTHING_DEFAULTS, parse_box, parse_points, predict_images, read_image
from .overlay import label_colors, render_overlay, save_png

__all__ = ["EVERYTHING_DEFAULTS", "label_colors", "parse_box", "parse_points", "predict_images", "read_image",
           "render_overlay", "save_png"]
