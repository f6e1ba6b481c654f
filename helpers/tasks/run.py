"""Florence-2's 15 tasks: what each one asks for, what it answers, and how to run it on any model.

One prompt format covers captioning, detection, grounding, segmentation, region understanding and OCR: a task
token (``<OD>``), optionally followed by text (a phrase, or a region written as four ``<loc_N>`` tokens). This
module holds the task table, turns user input into valid prompts with helpful errors, loads images of any mode,
converts pixel boxes to and from Florence-2's 1000-bin location tokens, and runs a task on *any* model object with
a transformers-style ``generate`` (PyTorch ``Florence2ForConditionalGeneration`` or ``helpers.runtime.ov_model``'s
``OVFlorence2Model``) — so the notebooks compare backends with the same code. torch is optional: with an
``OVFlorence2Model`` the inputs are numpy arrays, and without torch the answers are parsed with
:mod:`helpers.tasks.numpy_postprocessing` (same results).

Taught in ``notebooks/04_captioning.ipynb`` (task table, ``run_task``, cascaded caption → grounding),
``05_detection.ipynb``, ``06_grounding.ipynb``, ``07_segmentation.ipynb``, ``08_region_understanding.ipynb``
(``box_to_loc`` / ``loc_to_box`` / ``parse_region``) and ``09_ocr.ipynb``; ``10_interactive_demo.ipynb`` uses the
``hint`` of each task.
"""

from __future__ import annotations

import difflib
import math
import re
from numbers import Real
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from helpers.runtime.generation import TORCH_AVAILABLE

__all__ = [
    "ANSWER_KEYS",
    "CASCADED_TASKS",
    "DEFAULT_MAX_NEW_TOKENS",
    "MAX_NEW_TOKENS_LIMIT",
    "PIXEL_BOX_HINT",
    "SCORED_TASKS",
    "FAMILY_NOTEBOOKS",
    "TASKS",
    "CascadedTaskSpec",
    "SupportsGenerate",
    "TaskSpec",
    "answer_rows",
    "box_to_loc",
    "build_prompt",
    "check_generate_kwargs",
    "format_region",
    "load_image",
    "check_box_answer",
    "loc_to_box",
    "looks_like_pixel_box",
    "parse_pixel_box",
    "parse_region",
    "resolve_task",
    "run_cascaded_task",
    "run_task",
    "run_tasks_batch",
]

Family = Literal["caption", "detection", "grounding", "segmentation", "region", "ocr"]
TextKind = Literal["none", "text", "region"]
AnswerKind = Literal["text", "bboxes", "polygons", "open_vocabulary", "quad_boxes"]


@dataclass(frozen=True)
class TaskSpec:
    """One Florence-2 task. Taught in ``notebooks/04_captioning.ipynb``.

    ``text_kind`` is ``"none"`` (the token alone), ``"text"`` (free text after the token) or ``"region"`` (four
    ``<loc_N>`` tokens, or a pixel box that :func:`build_prompt` converts). ``answer_kind`` names the structure
    ``processor.post_process_generation`` returns: a string, ``{"bboxes", "labels"}``, ``{"polygons", "labels"}``,
    the open-vocabulary dict ``{"bboxes", "bboxes_labels", "polygons", "polygons_labels"}`` or
    ``{"quad_boxes", "labels"}``. ``hint`` is one line telling a user what to type.
    """

    token: str
    name: str
    family: Family
    needs_text: bool
    text_kind: TextKind
    answer_kind: AnswerKind
    hint: str


#: Keys of the answer dict for each ``answer_kind`` (an empty tuple means the answer is a plain string).
ANSWER_KEYS: dict[str, tuple[str, ...]] = {
    "text": (),
    "bboxes": ("bboxes", "labels"),
    "polygons": ("polygons", "labels"),
    "open_vocabulary": ("bboxes", "bboxes_labels", "polygons", "polygons_labels"),
    "quad_boxes": ("quad_boxes", "labels"),
}

#: The notebook that teaches each family of tasks.
FAMILY_NOTEBOOKS: dict[str, str] = {
    "caption": "notebooks/04_captioning.ipynb",
    "detection": "notebooks/05_detection.ipynb",
    "grounding": "notebooks/06_grounding.ipynb",
    "segmentation": "notebooks/07_segmentation.ipynb",
    "region": "notebooks/08_region_understanding.ipynb",
    "ocr": "notebooks/09_ocr.ipynb",
}

_NO_TEXT = "No text needed: leave the text box empty."
_REGION_EXAMPLE = "<loc_100><loc_200><loc_500><loc_700>"
_REGION_HINT = (
    f"Type a region as four location tokens x1 y1 x2 y2 in 0..999, e.g. {_REGION_EXAMPLE}, "
    "or pass a pixel box (x1, y1, x2, y2)."
)

_TASK_LIST = (
    TaskSpec("<CAPTION>", "Caption", "caption", False, "none", "text", _NO_TEXT),
    TaskSpec("<DETAILED_CAPTION>", "Detailed caption", "caption", False, "none", "text", _NO_TEXT),
    TaskSpec("<MORE_DETAILED_CAPTION>", "More detailed caption", "caption", False, "none", "text", _NO_TEXT),
    TaskSpec("<OD>", "Object detection", "detection", False, "none", "bboxes", _NO_TEXT),
    TaskSpec("<DENSE_REGION_CAPTION>", "Dense region caption", "detection", False, "none", "bboxes", _NO_TEXT),
    TaskSpec("<REGION_PROPOSAL>", "Region proposal", "detection", False, "none", "bboxes", _NO_TEXT),
    TaskSpec("<OCR>", "OCR", "ocr", False, "none", "text", _NO_TEXT),
    TaskSpec("<OCR_WITH_REGION>", "OCR with regions", "ocr", False, "none", "quad_boxes", _NO_TEXT),
    TaskSpec(
        "<CAPTION_TO_PHRASE_GROUNDING>", "Phrase grounding", "grounding", True, "text", "bboxes",
        "Type a caption whose phrases to locate, e.g. 'A red car parked next to a tree'.",
    ),
    TaskSpec(
        "<OPEN_VOCABULARY_DETECTION>", "Open-vocabulary detection", "grounding", True, "text", "open_vocabulary",
        "Type the name of the object to find, e.g. 'bicycle'.",
    ),
    TaskSpec(
        "<REFERRING_EXPRESSION_SEGMENTATION>", "Referring expression segmentation", "segmentation", True, "text",
        "polygons", "Describe the object to outline, e.g. 'the dog on the left'.",
    ),
    TaskSpec("<REGION_TO_SEGMENTATION>", "Region to segmentation", "segmentation", True, "region", "polygons",
             _REGION_HINT),
    TaskSpec("<REGION_TO_CATEGORY>", "Region to category", "region", True, "region", "text", _REGION_HINT),
    TaskSpec("<REGION_TO_DESCRIPTION>", "Region to description", "region", True, "region", "text", _REGION_HINT),
    TaskSpec("<REGION_TO_OCR>", "Region to OCR", "ocr", True, "region", "text", _REGION_HINT),
)  # fmt: skip

#: All 15 Florence-2 tasks, keyed by task token.
TASKS: dict[str, TaskSpec] = {spec.token: spec for spec in _TASK_LIST}


#: Tasks whose answers have places (boxes, polygons, quadrilaterals), so each instance can get a confidence score
#: (:mod:`helpers.outputs.scores`); text answers have none.
SCORED_TASKS: tuple[str, ...] = tuple(token for token, spec in TASKS.items() if spec.answer_kind != "text")


@dataclass(frozen=True)
class CascadedTaskSpec:
    """Caption the image, then ground the caption's phrases: boxes for everything the caption mentions.
    Taught in ``notebooks/06_grounding.ipynb``."""

    name: str
    caption_task: str
    grounding_task: str = "<CAPTION_TO_PHRASE_GROUNDING>"
    hint: str = _NO_TEXT


#: The three cascades, one per caption level, keyed by name (e.g. ``"<CAPTION> + <CAPTION_TO_PHRASE_GROUNDING>"``).
CASCADED_TASKS: dict[str, CascadedTaskSpec] = {
    f"{caption} + <CAPTION_TO_PHRASE_GROUNDING>": CascadedTaskSpec(
        f"{caption} + <CAPTION_TO_PHRASE_GROUNDING>", caption
    )
    for caption in ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
}

#: Upper bound on ``max_new_tokens`` whatever the model (a typo like 100000 should fail fast, not run for hours).
MAX_NEW_TOKENS_LIMIT = 4096
#: Used only when the model's generation config sets no ``max_new_tokens``: transformers' fallback
#: ``max_length=20`` would cut answers in the middle of a box.
DEFAULT_MAX_NEW_TOKENS = 1024


# ----------------------------------------------------------------------------------------------------------------
# Task names and prompts
# ----------------------------------------------------------------------------------------------------------------


def _bare(name: str) -> str:
    """``" od "``, ``"<od>"``, ``"region to category"`` → ``"OD"``, ``"OD"``, ``"REGION_TO_CATEGORY"``."""
    bare = name.strip()
    bare = bare[1:] if bare.startswith("<") else bare
    bare = bare[:-1] if bare.endswith(">") else bare
    return re.sub(r"[\s\-]+", "_", bare.strip()).upper()


def resolve_task(task: str) -> str:
    """Return the canonical task token for ``task``. Taught in ``notebooks/04_captioning.ipynb``.

    Names are case-insensitive, the angle brackets are optional and spaces/hyphens count as underscores, so
    ``"od"``, ``"<od>"`` and ``"OD"`` all give ``"<OD>"``; display names work too (``"object detection"``,
    ``"OCR with regions"``). An unknown name raises ``ValueError`` listing the valid
    tasks and suggesting the nearest one.
    """
    if not isinstance(task, str):
        raise TypeError(f"task must be a string such as '<OD>', got {type(task).__name__}.")
    token = f"<{_bare(task)}>"
    if token in TASKS:
        return token
    by_name = {_bare(spec.name): spec.token for spec in TASKS.values()}  # "object detection" -> "<OD>"
    if _bare(task) in by_name:
        return by_name[_bare(task)]
    valid = ", ".join(TASKS)
    if _find_cascade(task) is not None:
        raise ValueError(f"{task!r} is a cascaded task: run it with run_cascaded_task(). Single tasks: {valid}.")
    names = {**{_bare(t): t for t in TASKS}, **by_name}
    close = difflib.get_close_matches(_bare(task), list(names), n=1, cutoff=0.5)
    suggestion = f" Did you mean {names[close[0]]!r}?" if close else ""
    raise ValueError(f"Unknown task {task!r}.{suggestion} Valid tasks (case-insensitive, brackets optional): {valid}.")


def _check_image_size(image_size: Sequence[float]) -> tuple[float, float]:
    try:
        width, height = (float(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (width, height) in pixels, e.g. image.size; got {image_size!r}.")
    if not (width > 0 and height > 0 and math.isfinite(width) and math.isfinite(height)):
        raise ValueError(f"image_size must be two positive numbers (width, height); got {image_size!r}.")
    return width, height


def build_prompt(
    task: str,
    text_input: str | Sequence[float] | None = None,
    *,
    image_size: Sequence[float] | None = None,
) -> str:
    """The text to give the processor: task token plus text, e.g. ``"<CAPTION_TO_PHRASE_GROUNDING>a red car"``.

    Validates that text is given exactly when the task needs it. Region tasks accept a region string
    (``"<loc_100><loc_200><loc_500><loc_700>"``, checked by :func:`parse_region`) or a pixel box ``(x1, y1, x2, y2)``,
    which needs ``image_size=(width, height)`` to convert (see :func:`box_to_loc`).
    Taught in ``notebooks/04_captioning.ipynb`` and ``08_region_understanding.ipynb``.
    """
    spec = TASKS[resolve_task(task)]
    if not spec.needs_text:
        if text_input is not None and not (isinstance(text_input, str) and not text_input.strip()):
            raise ValueError(
                f"{spec.token} ({spec.name}) takes no text input, but got {text_input!r}. Drop the text, or pick a "
                f"task that takes text: {', '.join(t for t, s in TASKS.items() if s.needs_text)}."
            )
        return spec.token
    if text_input is None or (isinstance(text_input, str) and not text_input.strip()):
        raise ValueError(f"{spec.token} ({spec.name}) needs a text input. {spec.hint}")
    if spec.text_kind == "region":
        return spec.token + _region_text(spec, text_input, image_size)
    if not isinstance(text_input, str):
        raise TypeError(f"{spec.token} needs text (a string), got {type(text_input).__name__}. {spec.hint}")
    # The processor finds task tokens anywhere in the prompt: "<OD>" inside a phrase would hijack the task.
    hijack = [token for token in TASKS if token in text_input]
    if hijack:
        raise ValueError(
            f"The text input {text_input!r} contains the task token {hijack[0]}, which the processor would treat "
            "as a second task. Remove it from the text."
        )
    return spec.token + text_input.strip()


def _region_text(spec: TaskSpec, text_input: Any, image_size: Sequence[float] | None) -> str:
    if isinstance(text_input, str) and looks_like_pixel_box(text_input):
        text_input = parse_pixel_box(text_input)  # "55,42,146,133" from a command line or a text box
    if isinstance(text_input, str):
        return format_region(parse_region(text_input))
    if image_size is None:
        raise ValueError(
            f"{spec.token} got the pixel box {text_input!r}; converting it to location tokens needs the image size. "
            "Pass image_size=image.size, or give a region string like " + _REGION_EXAMPLE + "."
        )
    return box_to_loc(text_input, image_size)


# ----------------------------------------------------------------------------------------------------------------
# Regions: Florence-2 writes coordinates as 1000 bins per axis, <loc_0> .. <loc_999>
# ----------------------------------------------------------------------------------------------------------------

_BINS = 1000
#: One Florence-2 location token, ``<loc_0>`` … ``<loc_999>`` (group 1: the bin).
LOCATION_TOKEN = re.compile(r"<loc_([0-9]+)>")
_LOC_TOKEN = LOCATION_TOKEN


def _region_error(problem: str) -> ValueError:
    return ValueError(
        f"{problem} A region is four location tokens x1 y1 x2 y2 (left, top, right, bottom), each 0..999, "
        f"e.g. {_REGION_EXAMPLE}; box_to_loc() builds one from a pixel box."
    )


#: How to type a region as pixels (the demo's text box, the command line's --text).
PIXEL_BOX_HINT = "Type the region as a pixel box x1, y1, x2, y2 (left, top, right, bottom), e.g. 100, 80, 400, 360"
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def looks_like_pixel_box(text: str) -> bool:
    """True for text made only of numbers and separators (``"55,42,146,133"``, ``"(55 42 146 133)"``)."""
    return bool(_NUMBER.search(text)) and not re.search(r"[^\s,;()\[\]]", _NUMBER.sub(" ", text))


def parse_pixel_box(text: str | Sequence[float]) -> tuple[float, float, float, float]:
    """``"100, 80, 400, 360"`` (commas, spaces or brackets) or a 4-number sequence → ``(x1, y1, x2, y2)``.
    Taught in ``notebooks/10_interactive_demo.ipynb``.

    Raises ``ValueError`` naming the expected format when there are not exactly four finite numbers.
    """
    if isinstance(text, str):
        if "<loc_" in text:
            raise ValueError(f"{text!r} is a region in <loc_N> tokens, not a pixel box; pass it as the text instead.")
        if not looks_like_pixel_box(text):
            raise ValueError(f"The region {text!r} contains something that is not a number. {PIXEL_BOX_HINT}.")
        values = [float(v) for v in _NUMBER.findall(text)]
    else:
        try:
            values = [float(v) for v in text]
        except (TypeError, ValueError):
            raise ValueError(f"The region {text!r} is not four numbers. {PIXEL_BOX_HINT}.")
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"The region {text!r} has {len(values)} numbers; it needs exactly 4. {PIXEL_BOX_HINT}.")
    x1, y1, x2, y2 = values
    return x1, y1, x2, y2


def format_region(bins: Sequence[int]) -> str:
    """``(100, 200, 500, 700)`` → ``"<loc_100><loc_200><loc_500><loc_700>"``, validating like :func:`parse_region`.
    Taught in ``notebooks/08_region_understanding.ipynb``."""
    values = tuple(bins)
    if len(values) != 4 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        raise _region_error(f"Need four integer bins, got {bins!r}.")
    x1, y1, x2, y2 = (int(v) for v in values)
    if not all(0 <= v < _BINS for v in (x1, y1, x2, y2)):
        raise _region_error(f"Bins {values} must each lie in 0..999.")
    if x1 > x2 or y1 > y2:
        raise _region_error(f"Bins {values} are not ordered: need x1 <= x2 and y1 <= y2.")
    return "".join(f"<loc_{v}>" for v in (x1, y1, x2, y2))


def parse_region(text: str) -> tuple[int, int, int, int]:
    """Validate a region string and return its bins ``(x1, y1, x2, y2)``. Taught in
    ``notebooks/08_region_understanding.ipynb``.

    Exactly four ``<loc_N>`` tokens, 0 <= N <= 999, written without leading zeros (the tokenizer only knows
    ``<loc_7>``, not ``<loc_007>``), with x1 <= x2 and y1 <= y2. Whitespace around and between tokens is ignored.
    Anything else raises ``ValueError`` with an example of a valid region.
    """
    if not isinstance(text, str):
        raise TypeError(f"A region must be a string like {_REGION_EXAMPLE}, got {type(text).__name__}.")
    compact = re.sub(r">\s+<", "><", text.strip())
    if not compact:
        raise _region_error("The region is empty.")
    leftover = _LOC_TOKEN.sub("", compact)
    if leftover:
        raise _region_error(f"{text!r} contains {leftover[:40]!r}, which is not a <loc_N> token.")
    digits = _LOC_TOKEN.findall(compact)
    if len(digits) != 4:
        raise _region_error(f"{text!r} has {len(digits)} location tokens; a region needs exactly 4.")
    for d in digits:
        if len(d) > 3:
            raise _region_error(f"<loc_{d}> is out of range.")
        if d != str(int(d)):
            raise _region_error(f"<loc_{d}> has leading zeros; write <loc_{int(d)}>.")
    x1, y1, x2, y2 = (int(d) for d in digits)
    if x1 > x2 or y1 > y2:
        raise _region_error(f"{text!r} is not ordered: need x1 <= x2 and y1 <= y2.")
    return x1, y1, x2, y2


def box_to_loc(box_xyxy_pixels: Sequence[float], image_size: Sequence[float], *, clip: bool = False) -> str:
    """Pixel box ``(x1, y1, x2, y2)`` on an image of ``image_size=(width, height)`` → region string.
    Taught in ``notebooks/08_region_understanding.ipynb``.

    Quantises exactly like Florence-2's own post-processor (``Florence2PostProcessor.quantize``): bin =
    floor(coordinate / (size / 1000)), clamped to 0..999. Coordinates run from 0 to width/height inclusive. A box
    reaching outside the image raises ``ValueError`` (it usually means swapped width/height or a box from another
    image); ``clip=True`` clamps it to the image instead.
    """
    width, height = _check_image_size(image_size)
    if isinstance(box_xyxy_pixels, (str, bytes)):
        raise ValueError(f"A pixel box is four numbers (x1, y1, x2, y2), got the string {box_xyxy_pixels!r}.")
    try:
        items = list(box_xyxy_pixels)
        values = [float(v) for v in items if not isinstance(v, bool)]
    except (TypeError, ValueError):
        items, values = [], []
    if len(items) != 4 or len(values) != 4 or not all(map(math.isfinite, values)):
        raise ValueError(f"A pixel box is four finite numbers (x1, y1, x2, y2), got {box_xyxy_pixels!r}.")
    x1, y1, x2, y2 = values
    if x1 > x2 or y1 > y2:
        raise ValueError(
            f"Box {box_xyxy_pixels!r} is not (left, top, right, bottom): need x1 <= x2 and y1 <= y2. "
            "Reorder the coordinates (a (x, y, w, h) box needs x2 = x + w, y2 = y + h)."
        )
    inside = 0 <= x1 and x2 <= width and 0 <= y1 and y2 <= height
    if not inside and not clip:
        raise ValueError(
            f"Box {box_xyxy_pixels!r} reaches outside the {width:g}×{height:g} (width×height) image; coordinates "
            "must lie in 0..width and 0..height. Check the box and image_size, or pass clip=True to clamp it."
        )
    x1, x2 = (min(max(v, 0.0), width) for v in (x1, x2))
    y1, y2 = (min(max(v, 0.0), height) for v in (y1, y2))
    per_bin_w, per_bin_h = width / _BINS, height / _BINS

    def quantize(value: float, per_bin: float) -> int:
        return min(max(math.floor(value / per_bin), 0), _BINS - 1)

    return format_region(
        (quantize(x1, per_bin_w), quantize(y1, per_bin_h), quantize(x2, per_bin_w), quantize(y2, per_bin_h))
    )


def check_box_answer(answer: Any, boxes_key: str = "bboxes", labels_key: str = "labels") -> int:
    """How many boxes a well-formed box answer holds; ``ValueError`` naming what is wrong otherwise (a missing key,
    a label count that differs from the box count, a box that is not four numbers, a label that is not text).
    Structure only: it does not judge whether the boxes are right. Taught in ``notebooks/05_detection.ipynb``
    (and used again in ``06_grounding``)."""
    if not isinstance(answer, dict) or boxes_key not in answer or labels_key not in answer:
        got = sorted(answer) if isinstance(answer, dict) else type(answer).__name__
        raise ValueError(f"A box answer needs the keys {boxes_key!r} and {labels_key!r}; got {got}.")
    boxes, labels = answer[boxes_key], answer[labels_key]
    if len(boxes) != len(labels):
        raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels: a box answer has one label per box.")
    for box in boxes:
        if len(box) != 4 or not all(isinstance(value, Real) for value in box):
            raise ValueError(f"Not a box of four numbers (x1, y1, x2, y2): {box}")
    if not all(isinstance(label, str) for label in labels):
        raise ValueError(f"Labels must be strings, got {[type(label).__name__ for label in labels]}.")
    return len(boxes)


def loc_to_box(loc_string: str, image_size: Sequence[float]) -> tuple[float, float, float, float]:
    """Region string → pixel box at the bin centres, like ``Florence2PostProcessor.dequantize``.
    Taught in ``notebooks/08_region_understanding.ipynb``.

    Returns floats; ``post_process_generation`` truncates the same centres to ints (``int(v)`` gives its values).
    """
    width, height = _check_image_size(image_size)
    x1, y1, x2, y2 = parse_region(loc_string)
    per_bin_w, per_bin_h = width / _BINS, height / _BINS
    return (x1 + 0.5) * per_bin_w, (y1 + 0.5) * per_bin_h, (x2 + 0.5) * per_bin_w, (y2 + 0.5) * per_bin_h


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------


def _max_pixels() -> int | None:
    # Pillow's own decompression-bomb limit, so users tune one knob: PIL.Image.MAX_IMAGE_PIXELS.
    return Image.MAX_IMAGE_PIXELS


def _check_dimensions(image: Image.Image, source: str) -> None:
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"{source} has zero size ({width}×{height}); pass an image with at least one pixel.")
    limit = _max_pixels()
    if limit is not None and width * height > limit:
        raise ValueError(
            f"{source} is {width}×{height} = {width * height:,} pixels, above the {limit:,}-pixel safety limit "
            "(decompression-bomb protection). Florence-2 sees 768×768 anyway: downscale it first "
            "(image.thumbnail((4096, 4096))), or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file."
        )


def _gray_to_8bit(values: np.ndarray, full_scale: float) -> Image.Image:
    scaled = np.nan_to_num(values.astype(np.float64), nan=0.0) * (255.0 / full_scale)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))  # 2-D uint8 → "L"


_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})  # not "LAB": its "A" is a colour axis


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB, without the silent clipping of ``convert("RGB")`` on high-bit-depth images."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16"):
        # Pillow's convert() clips 16-bit values at 255 (a mostly white image); scale the full range instead.
        return _gray_to_8bit(np.asarray(image), 65535.0).convert("RGB")
    if mode == "I":
        # 32-bit ints: Pillow's container for 16-bit PNG/TIFF in some versions, so scale 16-bit data as such.
        values = np.asarray(image)
        return _gray_to_8bit(values, 65535.0 if values.max(initial=0) > 255 else 255.0).convert("RGB")
    if mode == "F":
        # Float images are usually 0..1 (normalised) or 0..255.
        values = np.asarray(image)
        finite = values[np.isfinite(values)]
        return _gray_to_8bit(values, 1.0 if finite.size and finite.max() <= 1.0 else 255.0).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        # Transparent pixels hide arbitrary colours (often black); show them as white, as a viewer would.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ValueError(f"Cannot convert an image of mode {mode!r} to RGB ({error}); convert it yourself first.")


def load_image(image: Image.Image | str | Path) -> Image.Image:
    """Load and normalise an image for Florence-2: returns a new 8-bit RGB ``PIL.Image``.
    Taught in ``notebooks/04_captioning.ipynb``.

    Accepts a PIL image or a path. Applies the EXIF orientation (phone photos are stored sideways), composites
    transparency on white, and scales 16-bit and float images to 8 bits. Raises ``FileNotFoundError`` for a missing
    path and ``ValueError`` for an empty, unreadable, truncated, zero-size or absurdly large image (more than
    ``PIL.Image.MAX_IMAGE_PIXELS``), each naming the fix.
    """
    if isinstance(image, Image.Image):
        source = f"The {image.mode} image"
        _check_dimensions(image, source)
        try:
            image.load()  # a lazily opened file may still be truncated
        except OSError as error:
            raise ValueError(f"{source} could not be decoded ({error}); re-save or re-download the file.")
        return _to_rgb(ImageOps.exif_transpose(image))
    if not isinstance(image, (str, Path)):
        raise TypeError(f"image must be a PIL.Image.Image or a file path, got {type(image).__name__}.")
    return _load_path(Path(image))


def _load_path(path: Path) -> Image.Image:
    if not path.exists():
        raise FileNotFoundError(f"Image file not found: {path}. Check the path (relative to {Path.cwd()}).")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; pass the path of an image file inside it.")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes); re-download or re-export the image.")
    source = f"Image {path}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we raise our own, clearer error
            opened = Image.open(path)
    except Image.DecompressionBombError:
        limit = _max_pixels()
        raise ValueError(
            f"{source} is far above the {limit:,}-pixel safety limit (decompression-bomb protection). Downscale it "
            "with another tool, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file."
        )
    except UnidentifiedImageError:
        raise ValueError(
            f"{path} is not an image Pillow can read (JPEG, PNG, WebP, TIFF, BMP, GIF, ...). Check the file type."
        )
    except OSError as error:  # a recognised header followed by garbage fails while Pillow parses the header
        raise ValueError(f"{source} is truncated or corrupt ({error}); re-download or re-save it.") from error
    with opened:
        _check_dimensions(opened, source)  # before decoding: the header already says how big it is
        try:
            opened.load()
        except OSError as error:
            raise ValueError(f"{source} is truncated or corrupt ({error}); re-download or re-save it.")
        return _to_rgb(ImageOps.exif_transpose(opened))


# ----------------------------------------------------------------------------------------------------------------
# Running tasks on any model with a transformers-style generate
# ----------------------------------------------------------------------------------------------------------------


class SupportsGenerate(Protocol):
    """PyTorch ``Florence2ForConditionalGeneration``, ``helpers.runtime.ov_model.OVFlorence2Model``, or anything alike."""

    def generate(self, **kwargs: Any) -> Any: ...


def _text_positions(model: Any) -> int | None:
    """How many positions the BART encoder/decoder embeds (1024 for the real models), if the model says."""
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None)
    limit = getattr(text_config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) else None


def _check_count(name: str, value: Any, minimum: int) -> None:
    """``num_beams``/``min_new_tokens``-style settings: a whole number of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be a whole number, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}.")


def check_generate_kwargs(model: Any, generate_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Validate the generation arguments a user gave (``max_new_tokens`` 1..4096 and within the model's positions,
    ``num_beams`` >= 1, ``min_new_tokens`` >= 0 and <= ``max_new_tokens``) and return them, with the default
    ``max_new_tokens`` filled in when the model's generation config has none; everything not given (``num_beams``
    …) comes from that config. :mod:`helpers.cli.batch` calls it before the first image."""
    kwargs = dict(generate_kwargs)
    for name, minimum in (("num_beams", 1), ("num_return_sequences", 1), ("min_new_tokens", 0)):
        if kwargs.get(name) is not None:
            _check_count(name, kwargs[name], minimum)
    if kwargs.get("min_new_tokens") is not None and isinstance(kwargs.get("max_new_tokens"), int):
        if kwargs["min_new_tokens"] > kwargs["max_new_tokens"]:
            raise ValueError(f"min_new_tokens={kwargs['min_new_tokens']} is more than max_new_tokens="
                             f"{kwargs['max_new_tokens']}; lower it or raise max_new_tokens.")  # fmt: skip
    positions = _text_positions(model)
    if "max_new_tokens" not in kwargs:
        config = getattr(model, "generation_config", None)
        if getattr(config, "max_new_tokens", None) is None:
            kwargs["max_new_tokens"] = min(DEFAULT_MAX_NEW_TOKENS, positions or DEFAULT_MAX_NEW_TOKENS)
        return kwargs
    value = kwargs["max_new_tokens"]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"max_new_tokens must be an integer, got {value!r}.")
    if not 1 <= value <= MAX_NEW_TOKENS_LIMIT:
        raise ValueError(
            f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS_LIMIT}, got {value}. Florence-2 answers rarely "
            "need more than 1024; omit it to use the model's default."
        )
    if positions is not None and value > positions:
        # The decoder's learned position table ends there: going further fails deep inside with an IndexError.
        raise ValueError(f"max_new_tokens={value} exceeds this model's {positions} decoder positions; use at most "
                         f"{positions}.")  # fmt: skip
    return kwargs


def prepare_inputs(model: Any, inputs: Any) -> Any:
    positions = _text_positions(model)
    length = inputs["input_ids"].shape[-1]
    if positions is not None and length > positions:
        raise ValueError(
            f"The prompt is {length} tokens (image tokens included); this model's encoder holds {positions}. "
            "Shorten the text input."
        )
    if _is_torch_module(model):
        # Only floating tensors change dtype, so pixel_values follow an fp16/bf16 model; ids stay integers.
        inputs = inputs.to(device=model.device, dtype=model.dtype)
    return inputs


def _is_torch_module(model: Any) -> bool:
    # A torch model means torch is already imported: look it up instead of importing it (it may not be installed).
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def _tensor_type(model: Any) -> str:
    """What the processor should return: torch tensors for a PyTorch model, numpy arrays for anything else."""
    return "pt" if _is_torch_module(model) else "np"


def _post_process(processor: Any, text: str, task: str, image_size: tuple[int, int]) -> dict[str, Any]:
    if not TORCH_AVAILABLE:
        from helpers.tasks.numpy_postprocessing import use_numpy_post_processing

        use_numpy_post_processing(processor)  # transformers' dequantize needs torch; this gives the same answers
    return processor.post_process_generation(text, task=task, image_size=image_size)


def _sequences(output: Any) -> list[list[int]]:
    ids = getattr(output, "sequences", output)  # return_dict_in_generate=True gives an output object
    return ids.tolist() if hasattr(ids, "tolist") else [list(row) for row in ids]


def eos_ids(model: Any, processor: Any) -> set[int]:
    """The token ids that end an answer: the model's generation config's EOS and the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
    return ids | {processor.tokenizer.eos_token_id}


def cut_after_eos(row: list[int], eos_ids: set[int]) -> list[int]:
    """Drop the padding that batched generation appends after a finished answer (position 0 is the decoder start
    token, which is EOS in Florence-2, so the search starts at 1)."""
    for i in range(1, len(row)):
        if row[i] in eos_ids:
            return row[: i + 1]
    return row


def answer_rows(sequences: Iterable[list[int]], ends: set[int], images: int, caller: str) -> list[list[int]]:
    """One generated row per image, the padding after its end-of-answer token cut off (:func:`cut_after_eos`);
    ``ValueError`` when ``generate`` returned another number of sequences than there are images (what
    ``num_return_sequences`` does), naming ``caller``."""
    rows = [cut_after_eos(row, ends) for row in sequences]
    if len(rows) != images:
        raise ValueError(
            f"generate returned {len(rows)} sequences for {images} images; do not pass num_return_sequences to "
            f"{caller}."
        )
    return rows


def run_task(
    model: SupportsGenerate,
    processor: Any,
    image: Image.Image | str | Path,
    task: str,
    text_input: str | Sequence[float] | None = None,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Run one Florence-2 task on one image; returns ``{task_token: answer}`` exactly like
    ``processor.post_process_generation``. Taught in ``notebooks/04_captioning.ipynb`` … ``09_ocr.ipynb``.

    ``model`` is anything with a transformers-style ``generate`` (PyTorch or ``OVFlorence2Model``). ``task`` is
    resolved by :func:`resolve_task` (``"od"`` works; the key is the canonical ``"<OD>"``). Region tasks accept a
    pixel box as ``text_input``. ``generate_kwargs`` override the model's generation config (e.g. ``num_beams=1``
    for speed); ``max_new_tokens`` must be 1..4096 and fit the model.
    """
    token = resolve_task(task)
    picture = load_image(image)
    prompt = build_prompt(token, text_input, image_size=picture.size)
    kwargs = check_generate_kwargs(model, generate_kwargs)
    inputs = prepare_inputs(model, processor(text=prompt, images=picture, return_tensors=_tensor_type(model)))
    ids = _sequences(model.generate(**inputs, **kwargs))
    text = processor.batch_decode(ids, skip_special_tokens=False)[0]
    return _post_process(processor, text, token, picture.size)


def batch_prompts(
    images: Sequence[Image.Image | str | Path],
    token: str,
    text_inputs: str | Sequence[str | Sequence[float] | None] | None,
    *,
    single: str,
) -> tuple[list[Image.Image], list[str]]:
    """The loaded images of a batch and one prompt per image (``text_inputs``: ``None``, one string for all, or one
    entry per image). ``single`` names the one-image function the error suggests for a lone image."""
    if isinstance(images, (str, Path, Image.Image)) or not isinstance(images, Sequence) or not images:
        raise ValueError(f"images must be a non-empty list of images or paths; for one image use {single}().")
    pictures = [load_image(image) for image in images]
    if text_inputs is None or isinstance(text_inputs, str):
        texts: list[Any] = [text_inputs] * len(pictures)
    else:
        texts = list(text_inputs)
        if len(texts) != len(pictures):
            raise ValueError(
                f"Got {len(pictures)} images but {len(texts)} text inputs; give one text input per image "
                "(or a single string for all)."
            )
    return pictures, [build_prompt(token, text, image_size=pic.size) for text, pic in zip(texts, pictures)]


def run_tasks_batch(
    model: SupportsGenerate,
    processor: Any,
    images: Sequence[Image.Image | str | Path],
    task: str,
    text_inputs: str | Sequence[str | Sequence[float] | None] | None = None,
    **generate_kwargs: Any,
) -> list[dict[str, Any]]:
    """Run one task on several images in a single ``generate`` call; returns one ``{task: answer}`` per image.
    Taught in ``notebooks/11_speed.ipynb``.

    ``text_inputs`` is ``None``, one string for every image, or a list with one entry (string, pixel box or None)
    per image. Prompts of different lengths are padded; answers are post-processed with each image's own size.
    """
    token = resolve_task(task)
    pictures, prompts = batch_prompts(images, token, text_inputs, single="run_task")
    kwargs = check_generate_kwargs(model, generate_kwargs)
    inputs = prepare_inputs(
        model, processor(text=prompts, images=pictures, return_tensors=_tensor_type(model), padding=True)
    )
    ends = eos_ids(model, processor)
    rows = answer_rows(_sequences(model.generate(**inputs, **kwargs)), ends, len(pictures), "run_tasks_batch")
    texts_out = processor.batch_decode(rows, skip_special_tokens=False)
    return [_post_process(processor, text, token, pic.size) for text, pic in zip(texts_out, pictures)]


def _find_cascade(name: str) -> CascadedTaskSpec | None:
    key = re.sub(r"\s+", "", name).upper()
    for spec in CASCADED_TASKS.values():
        if re.sub(r"\s+", "", spec.name) == key:
            return spec
    return None


def run_cascaded_task(
    model: SupportsGenerate,
    processor: Any,
    image: Image.Image | str | Path,
    cascaded_task: str,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Caption the image, then locate the caption's phrases. Taught in ``notebooks/06_grounding.ipynb``.

    Returns ``{caption_task: caption, "<CAPTION_TO_PHRASE_GROUNDING>": {"bboxes", "labels"}}``, e.g. for
    ``"<DETAILED_CAPTION> + <CAPTION_TO_PHRASE_GROUNDING>"`` (names in :data:`CASCADED_TASKS`). An empty caption
    gives an empty grounding without a second ``generate`` call.
    """
    if not isinstance(cascaded_task, str) or (spec := _find_cascade(cascaded_task)) is None:
        raise ValueError(f"Unknown cascaded task {cascaded_task!r}; choose one of: {', '.join(CASCADED_TASKS)}.")
    picture = load_image(image)
    caption = run_task(model, processor, picture, spec.caption_task, **generate_kwargs)[spec.caption_task]
    if not caption.strip():  # nothing to ground; an empty phrase prompt would only make the model babble
        grounding: Any = {"bboxes": [], "labels": []}
    else:
        grounding = run_task(model, processor, picture, spec.grounding_task, caption, **generate_kwargs)[
            spec.grounding_task
        ]
    return {spec.caption_task: caption, spec.grounding_task: grounding}
