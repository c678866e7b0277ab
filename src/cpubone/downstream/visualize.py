"""Pictures of detections and segmentations that a person can read, at any image size.

- Colours come from the class names: a class whose name names a colour is drawn in it ("green_disc" green,
  "sky" sky blue; matplotlib's xkcd survey names, then CSS4 names), two classes naming the same colour get
  a lighter and a darker shade of it, and the rest take distinct palette colours (tab20, tab20b, tab20c,
  then evenly spread hues). "background" / "other" (ADE20K's label 0) is left untinted.
- Small images are enlarged by an integer factor (nearest neighbour: every original pixel stays a sharp
  square) until the longer side is at least ``min_side``, so labels can be set in a legible font.
- Detection labels are tags in the box colour, kept inside the picture and placed so that they do not
  overlap (above the box, else inside it, else below, left or right aligned; highest score first).
- Segmentation overlays get dark class outlines and a legend beside the image listing every class present with
  its colour and pixel share.

Pillow and numpy only (matplotlib's colour tables when installed); no torch.
"""
from __future__ import annotations

import colorsys
import math
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["class_colors", "draw_detections", "draw_segmentation", "place_tag", "save_png", "UNTINTED"]

RGB = Tuple[int, int, int]
PathLike = Union[str, os.PathLike]
# class names that mean "no object here": drawn without a tint
UNTINTED = ("background", "other", "others", "unlabeled", "void")
MIN_SIDE = 384  # pictures are enlarged until their longer side reaches this (labels need room)


# --- colours -----------------------------------------------------------------------------------
def _named_colour(name: str) -> Optional[RGB]:
    """The colour a class name names: the whole name, else its words from the first ("light_blue_car" ->
    light blue, "green_disc" -> green). None when no word is a colour name."""
    try:
        from matplotlib import colors as mcolors
    except ImportError:  # matplotlib is optional here: without it every class takes a palette colour
        return None
    words = [w for w in re.split(r"[\s_\-/.,]+", name.lower()) if w]
    candidates = [" ".join(words)] + [" ".join(words[i:i + 2]) for i in range(len(words) - 1)] + words
    for c in candidates:
        for key in (f"xkcd:{c}", c.replace(" ", "")):  # xkcd: what people call the colour; then CSS4
            if key in mcolors.XKCD_COLORS or key in mcolors.CSS4_COLORS:
                r, g, b = mcolors.to_rgb(mcolors.XKCD_COLORS.get(key) or mcolors.CSS4_COLORS[key])
                return round(r * 255), round(g * 255), round(b * 255)
    return None


def _palette() -> List[RGB]:
    try:
        import matplotlib  # optional here: without it the palette is empty and classes take evenly spread hues

        return [tuple(round(255 * v) for v in matplotlib.colormaps[m](i)[:3])
                for m in ("tab20", "tab20b", "tab20c") for i in range(20)]
    except ImportError:
        return []


def _shade(c: RGB, k: int) -> RGB:
    """The k-th variant of a colour already taken: alternately lighter and darker, further each time."""
    t = 0.35 * ((k + 1) // 2) / (1 + 0.35 * ((k + 1) // 2))
    target = 255 if k % 2 else 0
    return tuple(round(v + (target - v) * t) for v in c)


def _distance(a: RGB, b: RGB) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def class_colors(names: Sequence[str]) -> List[RGB]:
    """One RGB colour per class name (see the module docstring); deterministic for a list of names."""
    out: List[Optional[RGB]] = [None] * len(names)
    seen: Dict[RGB, int] = {}
    for i, n in enumerate(names):
        c = _named_colour(n)
        if c is not None:
            k = seen.get(c, 0)
            seen[c] = k + 1
            out[i] = c if k == 0 else _shade(c, k)
    taken = [c for c in out if c is not None]
    free = [c for c in _palette() if all(_distance(c, t) > 60 for t in taken)]
    extra = 0
    for i in range(len(names)):
        if out[i] is None:
            if free:
                out[i] = free.pop(0)
            else:  # beyond 60 classes: evenly spread hues at two lightness levels
                h = (extra * 0.618034) % 1.0
                r, g, b = colorsys.hls_to_rgb(h, 0.45 if extra % 2 else 0.6, 0.75)
                out[i] = (round(r * 255), round(g * 255), round(b * 255))
                extra += 1
    return list(out)  # type: ignore[arg-type]


def _text_colour(bg: RGB) -> RGB:
    # relative luminance (sRGB weights): dark text on light tags, white on dark ones
    return (0, 0, 0) if 0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2] > 140 else (255, 255, 255)


# --- shared layout -----------------------------------------------------------------------------
def _as_rgb_array(image) -> np.ndarray:
    """(H, W, 3) uint8 from a PIL image, an (H, W, 3) array or a (3, H, W) uint8 tensor-like."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) or (3, H, W) uint8, got shape {arr.shape} {arr.dtype}")
    return arr


def _scale_for(h: int, w: int, min_side: int) -> int:
    return max(1, math.ceil(min_side / max(h, w)))


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _font_size(w: int, h: int) -> int:
    return int(min(24, max(12, round(max(w, h) / 40))))


def _fit(draw: ImageDraw.ImageDraw, text: str, font, max_w: int) -> str:
    """``text``, shortened with an ellipsis until it is at most ``max_w`` pixels wide."""
    if draw.textlength(text, font=font) <= max_w:
        return text
    while len(text) > 1 and draw.textlength(text + "…", font=font) > max_w:
        text = text[:-1]
    return text + "…"


def _overlap(a: Tuple[int, int, int, int], b: Tuple[int, int, int, int]) -> int:
    """Shared area of two inclusive pixel rectangles."""
    w = min(a[2], b[2]) - max(a[0], b[0]) + 1
    h = min(a[3], b[3]) - max(a[1], b[1]) + 1
    return max(0, w) * max(0, h)


# --- detection ---------------------------------------------------------------------------------
def place_tag(box: Tuple[int, int, int, int], size: Tuple[int, int], canvas: Tuple[int, int],
              placed: Sequence[Tuple[int, int, int, int]], inset: int = 1) -> Tuple[int, int, int, int]:
    """Where the label tag of ``box`` goes: the first of above / inside the top / below / inside the bottom
    (left, then right aligned) that lies in the canvas and overlaps no ``placed`` tag; else the free row
    nearest the box's top edge (tags of a crowd of boxes stack); else the spot overlapping least.
    Boxes and tags are inclusive pixel rectangles (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    tw, th = size
    W, H = canvas

    def spot(tx: int, ty: int) -> Tuple[int, int, int, int]:
        tx, ty = min(max(0, tx), W - tw), min(max(0, ty), H - th)
        return tx, ty, tx + tw - 1, ty + th - 1

    def clash(r: Tuple[int, int, int, int]) -> int:
        return sum(_overlap(r, p) for p in placed)

    spots = [spot(tx, ty) for ty in (y0 - th, y0 + inset, y1 + 1, y1 - th - inset + 1) for tx in (x0, x1 - tw + 1)]
    free = [r for r in spots if clash(r) == 0]
    if free:
        return free[0]
    rows = sorted(range(0, max(1, H - th + 1)), key=lambda ty: abs(ty - (y0 - th)))
    free = [r for ty in rows for r in (spot(x0, ty), spot(x1 - tw + 1, ty)) if clash(r) == 0]
    return free[0] if free else min(spots, key=clash)


def draw_detections(image, boxes: Sequence[Sequence[float]], labels: Sequence[int], classes: Sequence[str],
                    scores: Optional[Sequence[float]] = None, min_side: int = MIN_SIDE) -> Image.Image:
    """The image with one box and one label tag per detection.

    Args:
        image: (H, W, 3) uint8 array, (3, H, W) uint8 tensor or PIL image.
        boxes: XYXY in the image's pixels.
        labels: class index of each box, into ``classes``.
        classes: all class names (colours are assigned over the whole list, so they do not depend on which
            classes an image happens to show).
        scores: shown after the name when given.
        min_side: enlarge small images until the longer side is at least this (1 keeps the size).
    """
    arr = _as_rgb_array(image)
    h, w = arr.shape[:2]
    s = _scale_for(h, w, min_side)
    pic = Image.fromarray(arr).resize((w * s, h * s), Image.NEAREST) if s > 1 else Image.fromarray(arr.copy())
    W, H = pic.size
    colours = class_colors(classes)
    draw = ImageDraw.Draw(pic)
    fs = _font_size(W, H)
    font = _font(fs)
    line = max(1, round(fs / 7))
    pad = max(1, fs // 6)
    order = sorted(range(len(boxes)), key=lambda i: -(scores[i] if scores is not None else 0.0))
    rects = []
    for i in order:
        x0, y0, x1, y1 = (float(v) * s for v in boxes[i])
        x0, y0 = min(max(0.0, x0), W - 1), min(max(0.0, y0), H - 1)
        x1, y1 = min(max(x0 + 1, x1), W), min(max(y0 + 1, y1), H)
        rects.append((i, (round(x0), round(y0), round(x1) - 1, round(y1) - 1)))
        draw.rectangle(rects[-1][1], outline=colours[int(labels[i])], width=line)
    placed: List[Tuple[int, int, int, int]] = []
    for i, (x0, y0, x1, y1) in rects:
        colour = colours[int(labels[i])]
        score = f" {float(scores[i]):.2f}" if scores is not None else ""
        # a name too long for the picture is shortened, the score kept
        text = _fit(draw, classes[int(labels[i])], font, W - 2 * pad - round(draw.textlength(score, font=font))) + score
        tag = place_tag((x0, y0, x1, y1), (round(draw.textlength(text, font=font)) + 2 * pad, fs + 2 * pad),
                        (W, H), placed, line)
        placed.append(tag)
        draw.rectangle(tag, fill=colour)
        draw.text((tag[0] + pad, (tag[1] + tag[3]) / 2), text, fill=_text_colour(colour), font=font, anchor="lm")
    return pic


# --- segmentation ------------------------------------------------------------------------------
def draw_segmentation(image, label_map, classes: Sequence[str], alpha: float = 0.5,
                      min_side: int = MIN_SIDE) -> Image.Image:
    """The image with each class tinted in its colour and outlined, and a legend to the right listing the
    classes present (largest share first) with their colour and share of the pixels.

    Args:
        image: (H, W, 3) uint8 array, (3, H, W) uint8 tensor or PIL image.
        label_map: (H, W) class indices into ``classes``.
        alpha: tint opacity in [0, 1]; outlines are drawn opaque.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}: the tint opacity must be in [0, 1]")
    arr = _as_rgb_array(image)
    labels = np.asarray(label_map)
    if labels.shape != arr.shape[:2]:
        raise ValueError(f"label map shape {labels.shape} != image size {arr.shape[:2]}")
    h, w = arr.shape[:2]
    s = _scale_for(h, w, min_side)
    if s > 1:
        arr = arr.repeat(s, 0).repeat(s, 1)
        labels = labels.repeat(s, 0).repeat(s, 1)
    colours = np.asarray(class_colors(classes), np.float32).reshape(-1, 3)
    tinted = np.asarray([n.lower() not in UNTINTED for n in classes])
    out = arr.astype(np.float32)
    tint = tinted[labels]
    out[tint] = (1 - alpha) * out[tint] + alpha * colours[labels[tint]]
    # outlines: a pixel whose right or lower neighbour has another class, in a dark shade of its class's
    # colour (visible even where the tint matches the object's own colour)
    edge = np.zeros(labels.shape, bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edge &= tint
    out[edge] = 0.55 * colours[labels[edge]]
    pic = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))

    ids, counts = np.unique(np.asarray(label_map), return_counts=True)
    present = sorted(zip(ids.tolist(), counts.tolist()), key=lambda t: -t[1])
    total = int(counts.sum())
    W, H = pic.size
    fs = _font_size(W, H)
    font = _font(fs)
    pad, row = fs // 2, round(fs * 1.5)
    probe = ImageDraw.Draw(pic)
    lines = [f"{classes[k]}  {100 * n / total:.1f}%" + ("" if tinted[k] else " (no tint)") for k, n in present]
    text_w = max(int(probe.textlength(t, font=font)) for t in lines)
    legend_w = pad + fs + pad + text_w + pad
    canvas = Image.new("RGB", (W + legend_w, max(H, pad + row * len(lines) + pad)), (255, 255, 255))
    canvas.paste(pic, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for j, ((k, _), text) in enumerate(zip(present, lines)):
        y = pad + j * row
        sw = (W + pad, y + (row - fs) // 2, W + pad + fs - 1, y + (row - fs) // 2 + fs - 1)
        draw.rectangle(sw, fill=tuple(int(v) for v in colours[k]) if tinted[k] else None, outline=(0, 0, 0))
        draw.text((W + 2 * pad + fs, y + row // 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    return canvas


def save_png(picture: Image.Image, path: PathLike) -> Path:
    """Write ``picture`` as PNG (whatever the suffix), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG")
    return path
