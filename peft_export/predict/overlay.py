"""Coloured masks and prompts drawn onto an image, in numpy (no torch).

Drawing is plain numpy; writing the PNG uses Pillow when it is installed and a
small zlib PNG writer otherwise (the torch-free runtime environment).
"""

from __future__ import annotations

import colorsys
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import PeftExportError
from ..runtime.intensity import normalize_intensity

POSITIVE = (0, 220, 0)
NEGATIVE = (230, 0, 0)
BOX = (255, 210, 0)
MASK = (30, 144, 255)


def label_colors(n: int, seed: int = 0) -> np.ndarray:
    """(n, 3) uint8 colours, well apart in hue (golden-ratio steps), bright enough on dark images."""
    hues = (seed * 0.137 + np.arange(n) * 0.618033988749895) % 1.0
    sats = 0.65 + 0.3 * ((np.arange(n) * 7) % 3) / 2
    rgb = [colorsys.hsv_to_rgb(h, s, 1.0) for h, s in zip(hues, sats)]
    return (np.asarray(rgb, np.float64).reshape(-1, 3) * 255).round().astype(np.uint8)


def display_image(image: np.ndarray, rule: Optional[dict] = None) -> np.ndarray:
    """Any 2D/RGB(A) image -> uint8 HxWx3, normalised as the model sees it."""
    rgb = normalize_intensity(np.asarray(image), rule)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of a mask with a 4-neighbour outside it."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _blend(out: np.ndarray, where: np.ndarray, color, alpha: float) -> None:
    c = np.asarray(color, np.float32)
    out[where] = (1 - alpha) * out[where] + alpha * c


def _disc(out: np.ndarray, x: float, y: float, r: int, color) -> None:
    h, w = out.shape[:2]
    y0, y1 = max(int(y) - r - 2, 0), min(int(y) + r + 3, h)
    x0, x1 = max(int(x) - r - 2, 0), min(int(x) + r + 3, w)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1]
    d = np.hypot(xx + 0.5 - x, yy + 0.5 - y)
    region = out[y0:y1, x0:x1]
    region[d <= r + 1.5] = 0  # dark rim keeps the marker visible on any colour
    region[d <= r] = color


def _rectangle(out: np.ndarray, box: Sequence[float], thickness: int, color) -> None:
    h, w = out.shape[:2]
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x0, x1 = np.clip([x0, x1], 0, w - 1)
    y0, y1 = np.clip([y0, y1], 0, h - 1)
    t = thickness
    out[y0 : min(y0 + t, h), x0 : x1 + 1] = color
    out[max(y1 - t + 1, 0) : y1 + 1, x0 : x1 + 1] = color
    out[y0 : y1 + 1, x0 : min(x0 + t, w)] = color
    out[y0 : y1 + 1, max(x1 - t + 1, 0) : x1 + 1] = color


def render_overlay(
    image: np.ndarray,
    masks: Optional[np.ndarray] = None,
    labels: Optional[np.ndarray] = None,
    points: Optional[np.ndarray] = None,
    point_labels: Optional[np.ndarray] = None,
    box: Optional[Sequence[float]] = None,
    alpha: float = 0.45,
    rule: Optional[dict] = None,
) -> np.ndarray:
    """uint8 HxWx3 picture: the image, masks (K,H,W bool) or instance ``labels`` (HxW int) in
    colour with outlines, points (green positive, red negative) and the box outline."""
    out = display_image(image, rule).astype(np.float32)
    h, w = out.shape[:2]
    if masks is not None:
        masks = np.asarray(masks, bool).reshape(-1, h, w)
        colors = [MASK] if len(masks) == 1 else label_colors(len(masks))
        for m, c in zip(masks, colors):
            _blend(out, m, c, alpha)
            _blend(out, _boundary(m), c, 1.0)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (h, w):
            raise PeftExportError(f"overlay: labels shape {labels.shape} does not match image {(h, w)}")
        ids = np.unique(labels[labels > 0])
        colors = label_colors(len(ids))
        lut = np.zeros((int(ids.max()) + 1 if len(ids) else 1, 3), np.float32)
        lut[ids] = colors
        fg = labels > 0
        out[fg] = (1 - alpha) * out[fg] + alpha * lut[labels[fg]]
        # Boundaries between touching instances too, not only against background.
        edge = np.zeros((h, w), bool)
        edge[1:, :] |= labels[1:, :] != labels[:-1, :]
        edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
        edge &= fg
        out[edge] = lut[labels[edge]]
    out = out.round().clip(0, 255).astype(np.uint8)
    size = max(h, w)
    if box is not None:
        _rectangle(out, box, max(1, size // 200), BOX)
    if points is not None:
        pts = np.asarray(points, np.float64).reshape(-1, 2)
        lbl = np.ones(len(pts)) if point_labels is None else np.asarray(point_labels).reshape(-1)
        r = max(2, size // 120)
        for (x, y), lab in zip(pts, lbl):
            _disc(out, x, y, r, POSITIVE if lab > 0 else NEGATIVE)
    return out


def overlay_legend(points=None, point_labels=None, box=None) -> list[tuple[tuple[int, int, int], str]]:
    """Legend entries for what ``render_overlay`` drew from a prompt."""
    legend = [(MASK, "mask")]
    if box is not None:
        legend.append((BOX, "box prompt"))
    if points is not None:
        lbl = np.ones(len(points)) if point_labels is None else np.asarray(point_labels).reshape(-1)
        if (lbl > 0).any():
            legend.append((POSITIVE, "positive point"))
        if (lbl <= 0).any():
            legend.append((NEGATIVE, "negative point"))
    return legend


HEADER_BG = (32, 32, 32)
HEADER_FG = (235, 235, 235)
MIN_CANVAS_WIDTH = 160  # narrower pictures are enlarged (whole-pixel factor) so the text stays readable


def annotate(picture: np.ndarray, title: str, legend: Sequence[tuple[Sequence[int], str]] = ()) -> np.ndarray:
    """The picture under a header with ``title`` (wrapped) and a colour ``legend`` [(rgb, label)].

    The canvas is exactly as wide as the picture (no empty strip) and the picture sits at the
    bottom: ``result[-h:]`` is ``picture``. A picture narrower than ``MIN_CANVAS_WIDTH`` is first
    enlarged by a whole factor (nearest neighbour), so the PNG is never smaller than the image.
    Text needs Pillow; without it (a bare runtime install) the picture is returned unchanged.
    """
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        return picture
    if picture.shape[1] < MIN_CANVAS_WIDTH:
        k = -(-MIN_CANVAS_WIDTH // picture.shape[1])
        picture = np.repeat(np.repeat(picture, k, axis=0), k, axis=1)
    h, w = picture.shape[:2]
    width = w
    try:
        font = ImageFont.load_default(size=13)  # scalable with FreeType (Pillow >= 10.1)
    except TypeError:
        font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(probe.textbbox((0, 0), "Ag", font=font)[3]) + 4
    pad = 6

    def wrap(text: str) -> list[str]:
        lines, line = [], ""
        for word in text.split(" "):
            trial = f"{line} {word}".strip()
            if line and probe.textlength(trial, font=font) > width - 2 * pad:
                lines.append(line)
                line = word
            else:
                line = trial
        return lines + [line]

    lines = wrap(title)
    # legend entries flow left to right, wrapping like words
    rows: list[list[tuple[Sequence[int], str, int]]] = [[]]
    x = pad
    for color, label in legend:
        item_w = line_h + int(probe.textlength(label, font=font)) + 14
        if rows[-1] and x + item_w > width - pad:
            rows.append([])
            x = pad
        rows[-1].append((color, label, x))
        x += item_w
    band = pad + line_h * (len(lines) + (len(rows) if legend else 0)) + pad
    canvas = Image.new("RGB", (width, band + h), HEADER_BG)
    canvas.paste(Image.fromarray(np.ascontiguousarray(picture, np.uint8)), (0, band))
    draw = ImageDraw.Draw(canvas)
    y = pad
    for text in lines:
        draw.text((pad, y), text, fill=HEADER_FG, font=font)
        y += line_h
    for row in rows if legend else []:
        for color, label, x in row:
            box = line_h - 6
            draw.rectangle([x, y + 2, x + box, y + 2 + box], fill=tuple(int(c) for c in color), outline=HEADER_FG)
            draw.text((x + box + 5, y), label, fill=HEADER_FG, font=font)
        y += line_h
    return np.asarray(canvas)


def save_png(rgb: np.ndarray, path: str | os.PathLike) -> None:
    """Write uint8 HxWx3 as PNG to ``path`` whatever its suffix (Pillow, else a small zlib writer).

    No matplotlib fallback: matplotlib needs Pillow itself, and its imsave adds an alpha channel.
    """
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    try:
        from PIL import Image
    except ImportError:
        _write_png_zlib(rgb, Path(path))
        return
    Image.fromarray(rgb).save(Path(path), format="PNG")


def _write_png_zlib(rgb: np.ndarray, path: Path) -> None:
    """Minimal 8-bit RGB PNG (filter 0 on every row), standard library only."""
    import struct
    import zlib

    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise PeftExportError(f"{path}: expected an HxWx3 image, got {rgb.shape}")
    h, w = rgb.shape[:2]
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
                     + chunk(b"IEND", b""))
