"""Intensity normalisation shared by training, export and the runtime (numpy only).

The rule is a JSON-able dict stored in adapter.json and manifest.json, so a deployed
model normalises its inputs exactly as the images it was finetuned on.
"""

from __future__ import annotations

import numpy as np

from ..errors import PeftExportError

DEFAULT_INTENSITY_RULE: dict = {"name": "percentile", "low": 1.0, "high": 99.8, "uint8": "keep"}

_RULE_NAMES = ("percentile", "none")


def check_intensity_rule(rule: dict | None) -> dict:
    """Return a complete copy of ``rule`` (``None`` -> the default); raise on a bad rule."""
    if rule is None:
        return dict(DEFAULT_INTENSITY_RULE)
    if not isinstance(rule, dict):
        raise PeftExportError(f"intensity rule: expected a dict, got {type(rule).__name__}")
    name = rule.get("name")
    if name not in _RULE_NAMES:
        raise PeftExportError(f"intensity rule: unknown name {name!r} (known: {', '.join(_RULE_NAMES)})")
    full = dict(rule)
    if name == "percentile":
        full.setdefault("low", DEFAULT_INTENSITY_RULE["low"])
        full.setdefault("high", DEFAULT_INTENSITY_RULE["high"])
        low, high = full["low"], full["high"]
        if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and 0 <= low < high <= 100):
            raise PeftExportError(f"intensity rule: need 0 <= low < high <= 100, got low={low!r} high={high!r}")
    uint8 = full.get("uint8")
    if uint8 not in (None, "keep", "normalize"):
        raise PeftExportError(f"intensity rule: 'uint8' must be 'keep' or 'normalize', got {uint8!r}")
    return full


def _to_channels(image: np.ndarray) -> np.ndarray:
    """HxW / HxWx1 / HxWx3 / HxWx4 -> HxWxC with C in (1, 3); alpha is dropped."""
    if image.ndim == 2:
        return image[..., None]
    if image.ndim == 3 and image.shape[-1] in (1, 3):
        return image
    if image.ndim == 3 and image.shape[-1] == 4:
        return image[..., :3]
    raise PeftExportError(
        f"image: unsupported shape {tuple(image.shape)} (expected HxW, HxWx1, HxWx3 or HxWx4)"
    )


def normalize_intensity(image: np.ndarray, rule: dict | None = None) -> np.ndarray:
    """Map an image to float32 HxWx3 RGB in [0, 255] following ``rule``.

    Grayscale is repeated to three channels. For the "percentile" rule the ``low``
    and ``high`` percentiles of all channels together map to 0 and 255 and the
    result is clipped; uint8 input is kept as it is when ``rule["uint8"] == "keep"``.
    A constant image maps to 0. Non-finite values are ignored for the percentiles
    and become 0. Rule "none" only casts and clips.
    """
    rule = check_intensity_rule(rule)
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise PeftExportError(f"image: unsupported dtype {image.dtype}")
    chans = _to_channels(image)
    keep_uint8 = chans.dtype == np.uint8 and rule.get("uint8") == "keep"
    out = chans.astype(np.float32)
    if rule["name"] == "none" or keep_uint8:
        out = np.nan_to_num(out, nan=0.0, posinf=255.0, neginf=0.0)
    else:
        finite = np.isfinite(out)
        values = out[finite] if not finite.all() else out
        if values.size == 0:
            out = np.zeros_like(out)
        else:
            # float64 percentiles: float32 loses precision on large uint32/float ranges
            lo, hi = np.percentile(values.astype(np.float64), [rule["low"], rule["high"]])
            if hi <= lo:
                # nearly constant image with rare outliers: fall back to min..max
                lo, hi = float(values.min()), float(values.max())
            if hi <= lo:
                out = np.zeros_like(out)
            else:
                out = ((out.astype(np.float64) - lo) * (255.0 / (hi - lo))).astype(np.float32)
                out[~finite] = 0.0
    np.clip(out, 0.0, 255.0, out=out)
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return np.ascontiguousarray(out, dtype=np.float32)
