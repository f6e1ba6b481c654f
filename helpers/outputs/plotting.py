"""Draw any Florence-2 answer on an image.

``Florence2Processor.post_process_generation`` returns ``{task: answer}``; the inner answer has one of five shapes
(see :data:`ANSWER_KINDS`): plain text, boxes, polygons, boxes *and* polygons, or OCR quadrilaterals.
:func:`draw_answer` draws any of them on a copy of the image, :func:`plot_answer` shows the result with matplotlib
(text answers become the caption), and :func:`answer_kind` says which shape an answer has.

Model output is untrusted: a small or quantized model can emit boxes with x2 < x1, coordinates far outside the
image, polygons with two points, more labels than boxes... Drawing skips or repairs such items instead of failing,
because a plot of a bad answer is exactly what a learner needs to see. Only something that is not an answer at all
raises ``ValueError``.

Taught in ``notebooks/05_detection.ipynb``; also used in ``06_grounding``, ``07_segmentation``,
``08_region_understanding``, ``09_ocr`` and ``10_interactive_demo``.
"""

from __future__ import annotations

import functools
import math
import textwrap
import unicodedata
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageColor, ImageDraw, ImageFont

from helpers.outputs.export import ExportInstance
from helpers.tasks.run import LOCATION_TOKEN, TASKS, AnswerKind

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: A colour Pillow understands: a name ("red"), "#rrggbb", or an (r, g, b) tuple.
Color = str | tuple[int, int, int]
Point = tuple[float, float]

#: The shape of each answer kind of :data:`helpers.tasks.run.ANSWER_KEYS` (one vocabulary: the task table's).
_ANSWER_SHAPES: dict[AnswerKind, str] = {
    "text": "a str",
    "bboxes": "{'bboxes': [[x1, y1, x2, y2], ...], 'labels': [...]} with optional 'scores'",
    "polygons": "{'polygons': [[[x1, y1, x2, y2, ...], ...], ...], 'labels': [...]}",
    "open_vocabulary": "{'bboxes': [...], 'bboxes_labels': [...], 'polygons': [...], 'polygons_labels': [...]}",
    "quad_boxes": "{'quad_boxes': [[x1, y1, x2, y2, x3, y3, x4, y4], ...], 'labels': [...]}",
}

#: Answer kind -> the shape it has and the tasks producing it (used in error messages too).
ANSWER_KINDS: dict[AnswerKind, str] = {
    kind: f"{shape} ({', '.join(token for token, spec in TASKS.items() if spec.answer_kind == kind)})"
    for kind, shape in _ANSWER_SHAPES.items()
}

#: Default colours, saturated enough to stand out on photos; a label keeps its colour across images.
PALETTE: tuple[str, ...] = (
    "#e6262e",
    "#1f9e3a",
    "#2563eb",
    "#f28c0f",
    "#9333ea",
    "#0fb5c9",
    "#db2777",
    "#84cc16",
    "#facc15",
    "#0d9488",
    "#a16207",
    "#4f46e5",
)

#: Labels longer than this are cut with an ellipsis: a dense caption must not cover the whole image.
MAX_LABEL_CHARS = 48
#: Alpha (0-255) of polygon fills: the object stays visible under its mask.
FILL_ALPHA = 90


# --- recognising answers ----------------------------------------------------------------------------------------


def _as_list(value: Any) -> list | None:
    """A plain list from lists, tuples, numpy arrays or tensors; ``None`` -> []; anything else -> None."""
    if value is None:
        return []
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    return None


def _unwrap(answer: Any) -> Any:
    """Accept the whole ``{task: answer}`` result too: a common slip is passing it instead of ``result[task]``."""
    if isinstance(answer, Mapping) and len(answer) == 1:
        (key,) = answer
        if isinstance(key, str) and key.startswith("<") and key.endswith(">"):
            return answer[key]
    return answer


def answer_kind(answer: Any) -> AnswerKind:
    """Which of the :data:`ANSWER_KINDS` ``answer`` is: "text", "bboxes", "polygons", "open_vocabulary" or "quad_boxes"
    (the task table's ``answer_kind`` names).

    Accepts the inner answer or the whole ``{task: answer}`` dict. Raises ``ValueError`` naming the expected shapes
    for anything else. Taught in ``notebooks/05_detection.ipynb``.
    """
    answer = _unwrap(answer)
    if isinstance(answer, str):
        return "text"
    if isinstance(answer, Mapping):

        def is_list(key: str) -> bool:
            return key in answer and _as_list(answer[key]) is not None

        if is_list("quad_boxes"):
            return "quad_boxes"
        if ("bboxes_labels" in answer or "polygons_labels" in answer) and (is_list("bboxes") or is_list("polygons")):
            return "open_vocabulary"
        if is_list("polygons"):
            return "polygons"
        if is_list("bboxes"):
            return "bboxes"
    described = f"a dict with keys {sorted(map(str, answer))}" if isinstance(answer, Mapping) else type(answer).__name__
    expected = "\n".join(f"  - {kind}: {shape}" for kind, shape in ANSWER_KINDS.items())
    raise ValueError(
        f"Not a Florence-2 answer: got {described}. Expected one of:\n{expected}\n"
        "Pass the answer from processor.post_process_generation(...)[task] (or the whole dict it returns)."
    )


# --- cleaning coordinates and labels ----------------------------------------------------------------------------


def _to_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return math.nan  # unparsable numbers are dropped like NaN


def _flat_numbers(raw: Any) -> list[float]:
    """Flatten one level of nesting, so [x1, y1, ...] and [[x1, y1], ...] both work; junk becomes NaN."""
    values = _as_list(raw)
    if values is None:
        return []
    flat: list[float] = []
    for item in values:
        inner = None if isinstance(item, (str, bytes)) else _as_list(item)
        if inner is not None and item is not None:
            flat.extend(_to_float(v) for v in inner)
        else:
            flat.append(_to_float(item))
    return flat


def _clean_box(raw: Any, size: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """Sorted corners clipped to the image; None if unusable or entirely outside."""
    values = _flat_numbers(raw)[:4]
    if len(values) < 4 or not all(math.isfinite(v) for v in values):
        return None
    width, height = size
    x1, x2 = sorted(values[0::2])
    y1, y2 = sorted(values[1::2])
    if x2 < 0 or y2 < 0 or x1 > width - 1 or y1 > height - 1:
        return None
    return max(x1, 0.0), max(y1, 0.0), min(x2, width - 1.0), min(y2, height - 1.0)


def _clean_points(raw: Any, size: tuple[int, int]) -> list[Point]:
    """(x, y) pairs from a flat coordinate list: odd trailing value and non-finite pairs dropped.

    Points are clamped to a generous frame around the image: Pillow needs coordinates that fit a C int, and
    anything that far out is invisible anyway.
    """
    values = _flat_numbers(raw)
    limit = 4.0 * max(size) + 1000.0
    points = []
    for x, y in zip(values[0::2], values[1::2]):
        if math.isfinite(x) and math.isfinite(y):
            points.append((min(max(x, -limit), limit), min(max(y, -limit), limit)))
    return points


def _polygon_parts(raw: Any, size: tuple[int, int]) -> tuple[list[Point], ...]:
    """Parts of one segmentation instance; also accepts a single flat list instead of a list of them."""
    values = _as_list(raw) or []
    if values and all(_as_list(v) is None or isinstance(v, (str, bytes)) for v in values):
        values = [values]  # a bare [x1, y1, ...] instead of [[x1, y1, ...]]
    parts = (_clean_points(part, size) for part in values)
    return tuple(part for part in parts if len(part) >= 2)


def _label_text(raw: Any) -> str:
    """A single printable line: ``<loc_N>`` tokens (a region task's answer repeats its region) and control
    characters removed, whitespace collapsed, length capped."""
    if raw is None:
        text = ""
    elif isinstance(raw, bytes):
        text = raw.decode("utf-8", "replace")
    else:
        text = str(raw)
    # Lone surrogates cannot be encoded for the font engine; control/format characters would break the layout.
    text = text.encode("utf-8", "replace").decode("utf-8")
    text = LOCATION_TOKEN.sub(" ", text)
    text = "".join(" " if unicodedata.category(ch).startswith(("C", "Z")) else ch for ch in text)
    text = " ".join(text.split())
    if len(text) > MAX_LABEL_CHARS:
        text = text[: MAX_LABEL_CHARS - 1].rstrip() + "…"
    return text


def _with_score(label: str, score: Any) -> str:
    value = _to_float(score) if score is not None else math.nan
    return f"{label} {value:.2f}".strip() if math.isfinite(value) else label


def _labels(answer: Mapping, key: str) -> list:
    """The label list under ``key``; a lone string counts as one label, anything unusable as none."""
    raw = answer.get(key)
    if isinstance(raw, (str, bytes)):
        return [raw]
    return _as_list(raw) or []


def _flat(points: Sequence[Point]) -> list[float]:
    return [value for point in points for value in point]


def _points(flat: Sequence[float]) -> list[Point]:
    return list(zip(flat[0::2], flat[1::2]))


def _bounds(parts: Sequence[Sequence[Point]]) -> tuple[float, float, float, float]:
    xs = [x for part in parts for x, _ in part]
    ys = [y for part in parts for _, y in part]
    return min(xs), min(ys), max(xs), max(ys)


def _instances(kind: str, answer: Mapping, size: tuple[int, int]) -> list[tuple[ExportInstance, str]]:
    """The drawable instances, each with what its colour depends on (its label, or its position when it has none).

    The same :class:`~helpers.outputs.export.ExportInstance` the exports use, but read leniently: labels are matched
    by position (missing ones are empty: a count mismatch is common), junk coordinates are dropped, boxes are
    clipped to the image, polygon parts of two points are kept (drawn as a line)."""
    instances: list[tuple[ExportInstance, str]] = []

    def add_boxes(boxes_key: str, labels_key: str, scores_key: str | None) -> None:
        labels = _labels(answer, labels_key)
        scores = _as_list(answer.get(scores_key)) if scores_key else None
        for i, raw in enumerate(_as_list(answer.get(boxes_key)) or []):
            box = _clean_box(raw, size)
            if box is None:
                continue
            label = _label_text(labels[i] if i < len(labels) else None)
            score = _to_float(scores[i]) if scores and i < len(scores) and scores[i] is not None else None
            instances.append((ExportInstance(label, box, [], score, "bboxes"), label or f"#{boxes_key}{i}"))

    def add_shapes(shapes_key: str, labels_key: str, *, quads: bool) -> None:
        labels = _labels(answer, labels_key)
        for i, raw in enumerate(_as_list(answer.get(shapes_key)) or []):
            if quads:  # one flat list of 4 corners per text region
                points = _clean_points(raw, size)
                parts = (points,) if len(points) >= 2 else ()
            else:
                parts = _polygon_parts(raw, size)
            if not parts:
                continue
            label = _label_text(labels[i] if i < len(labels) else None)
            outlines = [_flat(part) for part in parts]
            instance = ExportInstance(label, _bounds(parts), outlines, None, "quad_boxes" if quads else "polygons")
            instances.append((instance, label or f"#{shapes_key}{i}"))

    if kind == "bboxes":
        add_boxes("bboxes", "labels", "scores")
    elif kind == "polygons":
        add_shapes("polygons", "labels", quads=False)
    elif kind == "open_vocabulary":
        add_boxes("bboxes", "bboxes_labels", None)
        add_shapes("polygons", "polygons_labels", quads=False)
    elif kind == "quad_boxes":
        add_shapes("quad_boxes", "labels", quads=True)
    return instances


# --- colours and fonts ------------------------------------------------------------------------------------------


def _rgb(colour: Any) -> tuple[int, int, int]:
    """Parse one colour, with an error that says what is accepted."""
    try:
        if isinstance(colour, str):
            return ImageColor.getrgb(colour)[:3]
        values = [int(round(float(c))) for c in colour][:3]
        if len(values) == 3:
            return tuple(min(max(v, 0), 255) for v in values)  # type: ignore[return-value]
    except (TypeError, ValueError):
        pass
    raise ValueError(f"colors: {colour!r} is not a colour; use a name ('red'), '#rrggbb' or an (r, g, b) tuple.")


class _ColourPicker:
    """Colour per label: a hash of the label picks the palette slot, so "dog" is the same colour in every image;
    if that slot is already used by another label in this drawing, the next free one is taken."""

    def __init__(self, colors: Sequence[Color] | Mapping[str, Color] | None):
        explicit = colors if isinstance(colors, Mapping) else {}
        palette = PALETTE if colors is None or isinstance(colors, Mapping) else colors
        if isinstance(palette, str) or (
            isinstance(palette, tuple) and len(palette) in (3, 4) and all(isinstance(c, (int, float)) for c in palette)
        ):
            palette = [palette]  # one colour given on its own: use it for everything
        self.palette = [_rgb(c) for c in palette]
        if not self.palette:
            raise ValueError("colors: an empty list; pass None for the default palette or at least one colour.")
        self.explicit = {str(k): _rgb(v) for k, v in explicit.items()}
        self.assigned: dict[str, tuple[int, int, int]] = {}

    def __call__(self, key: str) -> tuple[int, int, int]:
        if key not in self.assigned:
            if key in self.explicit:
                self.assigned[key] = self.explicit[key]
            else:
                n = len(self.palette)
                start = zlib.crc32(key.encode("utf-8", "replace")) % n
                taken = set(self.assigned.values())
                slots = [self.palette[(start + i) % n] for i in range(n)]
                self.assigned[key] = next((c for c in slots if c not in taken), slots[0])
        return self.assigned[key]


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans Bold from matplotlib (wide Unicode coverage); Pillow's built-in font if that ever fails."""
    try:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"
        return ImageFont.truetype(str(path), size=size)
    except (ImportError, OSError):
        return ImageFont.load_default(size=size)


def _text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light label backgrounds, white on dark ones."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def _positive(name: str, value: float | None, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of pixels, got {value!r}; pass None for an automatic size.")
    return max(1, round(value))


# --- drawing ----------------------------------------------------------------------------------------------------


def _to_rgb_copy(image: Any) -> Image.Image:
    """A new RGB image, whatever came in, so the caller's image is never modified."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")  # convert always returns a new image, even from RGB
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    if hasattr(image, "__array_interface__"):
        return Image.fromarray(image).convert("RGB")
    raise TypeError(
        f"image must be a PIL.Image, a uint8 numpy array or a file path, got {type(image).__name__}; "
        "load one with helpers.course.samples.load_sample(name) or PIL.Image.open(path)."
    )


def _draw_label(
    draw: ImageDraw.ImageDraw, size: tuple[int, int], text: str, anchor: Point, colour: tuple[int, int, int], font: Any
) -> None:
    """Text on a filled box above ``anchor`` (inside the shape if there is no room above), kept within the image."""
    width, height = size
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(2, round((bottom - top) * 0.2))
    while len(text) > 1 and right - left + 2 * pad > width - 2:  # too wide for the image: shorten, never overflow
        text = text[:-2].rstrip() + "…"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    box_w, box_h = right - left + 2 * pad, bottom - top + 2 * pad
    x = min(max(anchor[0], 0), max(width - box_w, 0))
    y = anchor[1] - box_h
    if y < 0:
        y = min(max(anchor[1], 0), max(height - box_h, 0))
    draw.rectangle((x, y, x + box_w - 1, y + box_h - 1), fill=colour)
    draw.text((x + pad - left, y + pad - top), text, font=font, fill=_text_colour(colour))


def _visible(instance: ExportInstance, size: tuple[int, int]) -> bool:
    """Whether any of the instance lies on the image (boxes were clipped to it already)."""
    x1, y1, x2, y2 = instance.box
    return x2 >= 0 and y2 >= 0 and x1 <= size[0] - 1 and y1 <= size[1] - 1


def draw_answer(
    image: Image.Image,
    task: str,
    answer: Any,
    *,
    fill_polygons: bool = True,
    colors: Sequence[Color] | Mapping[str, Color] | None = None,
    line_width: int | None = None,
    font_size: int | None = None,
) -> Image.Image:
    """Draw a Florence-2 answer on a new RGB copy of ``image`` (the original is not modified).

    ``answer`` is ``processor.post_process_generation(...)[task]`` (the whole dict works too); ``task`` is the task
    token, e.g. ``"<OD>"``. Text answers draw nothing (:func:`plot_answer` shows them as the caption). Boxes, polygons
    and OCR quads get an outline in their label's colour and the label on a filled box; polygons are also filled
    half-transparently unless ``fill_polygons=False``.

    ``colors``: ``None`` (default palette), a list of colours to use as the palette, or a ``{label: colour}`` dict.
    ``line_width`` / ``font_size`` default to a size proportional to the image.

    Unusable items (non-finite or far-outside coordinates, polygons under 2 points) are skipped, not fatal; only an
    answer of no known shape raises ``ValueError``. Taught in ``notebooks/05_detection.ipynb``.
    """
    kind = answer_kind(answer)  # validate first, so a wrong answer fails before any work
    answer = _unwrap(answer)
    canvas = _to_rgb_copy(image)
    size = canvas.size
    if kind == "text" or min(size) == 0:
        return canvas
    line = _positive("line_width", line_width, max(2, round(min(size) / 160)))
    font = _font(_positive("font_size", font_size, min(max(round(min(size) / 30), 12), 36)))
    pick = _ColourPicker(colors)
    drawn = _instances(kind, answer, size)
    instances = [instance for instance, _ in drawn]
    colours = [pick(key) for _, key in drawn]
    filled = [fill_polygons and instance.kind == "polygons" for instance in instances]

    # Fills go on a separate transparent layer so they blend with the photo instead of hiding it.
    if any(filled):
        overlay = Image.new("RGBA", size, (0, 0, 0, 0))
        overlay_draw = ImageDraw.Draw(overlay)
        for inst, colour, fill in zip(instances, colours, filled):
            for outline in inst.polygons if fill else ():
                if len(outline) >= 6:
                    overlay_draw.polygon(_points(outline), fill=(*colour, FILL_ALPHA))
        canvas = Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB")

    draw = ImageDraw.Draw(canvas)
    for inst, colour in zip(instances, colours):
        if not inst.polygons:
            draw.rectangle(inst.box, outline=colour, width=line)
        for outline in inst.polygons:
            part = _points(outline)
            closed = part + [part[0]] if len(part) >= 3 else part
            draw.line(closed, fill=colour, width=line, joint="curve")
    # Labels last, so no outline crosses a label.
    for inst, colour in zip(instances, colours):
        shown = _with_score(inst.label, inst.score)
        if shown and _visible(inst, size):
            _draw_label(draw, size, shown, (inst.box[0], inst.box[1]), colour, font)
    return canvas


# --- matplotlib -------------------------------------------------------------------------------------------------


def _summary(kind: str, answer: Any) -> str:
    """A short caption for drawn answers, so an empty result is visibly empty rather than silently blank."""
    counts = []
    for key, one, many in (
        ("bboxes", "box", "boxes"),
        ("polygons", "polygon", "polygons"),
        ("quad_boxes", "text region", "text regions"),
    ):
        items = _as_list(answer.get(key)) if key in answer else None
        if items is not None:
            counts.append(f"{len(items)} {one if len(items) == 1 else many}")
    return ", ".join(counts) or kind


def plot_answer(
    image: Image.Image,
    task: str,
    answer: Any,
    *,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Show ``image`` with ``answer`` drawn on it (via :func:`draw_answer`) and return the matplotlib ``Figure``.

    Text answers (captions, OCR, region-to-text) are written under the image; other answers get a count of what
    was drawn there. The title defaults to ``task``. With ``ax`` the plot goes into your axes and their figure is
    returned; without it a new pyplot figure is made (in a notebook, write ``fig = plot_answer(...)`` or end the
    line with ``;`` so it is not shown twice). The backend is left as configured and no figure is closed.
    Taught in ``notebooks/05_detection.ipynb`` and ``notebooks/04_captioning.ipynb``.
    """
    drawn = draw_answer(image, task, answer)
    inner = _unwrap(answer)
    kind = answer_kind(inner)
    if kind == "text":
        text = " ".join(LOCATION_TOKEN.sub(" ", inner).split()) or "(empty answer)"
        lines = textwrap.wrap(text, width=90)
        caption = "\n".join(lines[:12] + (["…"] if len(lines) > 12 else []))
    else:
        caption = _summary(kind, inner)
    if ax is None:
        import matplotlib.pyplot as plt  # lazily: draw_answer alone never needs pyplot

        width, height = drawn.size
        n_lines = caption.count("\n") + 1
        fig_h = min(max(8.0 * height / max(width, 1) + 0.6 + 0.22 * n_lines, 2.0), 14.0)
        fig, ax = plt.subplots(figsize=(8.0, fig_h), layout="constrained")
    elif not hasattr(ax, "imshow"):
        raise TypeError(f"ax must be a matplotlib Axes, got {type(ax).__name__}; omit it to get a new figure.")
    else:
        try:
            fig = ax.get_figure(root=True)  # the top figure even when ax lives in a subfigure
        except TypeError:  # matplotlib < 3.10
            fig = ax.figure
    ax.imshow(drawn)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title if title is not None else str(task or ""))
    ax.set_xlabel(caption, fontsize=10, loc="left" if kind == "text" else "center")
    return fig
