"""Sample images shipped with the collection, and the generators of the synthetic ones.

Every notebook needs pictures that are there offline, with a licence we can redistribute. Two kinds ship in
``helpers/data/images/`` (sources and licences in ``helpers/data/images/LICENSES.md``):

* real photos copied from packages already installed in the environment (matplotlib and scikit-learn sample data);
* synthetic images drawn here with Pillow: text for OCR, a receipt, a scene of coloured shapes, and one held-out
  scene of the teaching model (:func:`teaching_scene`). They are generated deterministically *and* saved, so
  nothing is generated at run time; ``python -m helpers.course.samples --regenerate`` rewrites them after a generator
  changes.

:func:`lesson_image` picks a lesson's picture for the model it runs: the teaching model (see
:func:`helpers.course.model_kind.model_kind`) only knows shape scenes, so it gets the teaching scene instead of a photo.

Taught in ``notebooks/00_setup.ipynb`` (what ships and why) and used by every task notebook
(``04_captioning`` to ``09_ocr``) to pick an input image.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:  # helpers.course.teaching.scenes imports this module, so it is imported inside the functions
    from helpers.course.model_kind import ModelKind
    from helpers.course.teaching.scenes import Scene

#: Folder holding the shipped images (inside the installed package, so it works from any working directory).
IMAGES_DIR: Path = Path(__file__).resolve().parents[1] / "data" / "images"

#: Sample name -> file name in :data:`IMAGES_DIR`.
SAMPLE_IMAGES: dict[str, str] = {
    "grace_hopper": "grace_hopper.jpg",
    "pagoda": "pagoda.jpg",
    "flower": "flower.jpg",
    "text": "text.png",
    "receipt": "receipt.png",
    "shapes": "shapes.png",
    "teaching_scene": "teaching_scene.png",
}

#: Sample name -> one-line description (what the picture shows and which tasks it suits).
SAMPLE_DESCRIPTIONS: dict[str, str] = {
    "grace_hopper": "Photo: portrait of Grace Hopper in naval uniform before a flag (captioning, detection, grounding).",
    "pagoda": "Photo: a tiered Chinese tower above a lake, trees in front (captioning, detection, segmentation).",
    "flower": "Photo: an orange dahlia on a dark green background (captioning, segmentation).",
    "text": "Generated: lines of text in several fonts, sizes and colours (OCR, OCR with region).",
    "receipt": "Generated: a shop receipt with items, prices and a total (OCR, OCR with region, region to OCR).",
    "shapes": "Generated: coloured shapes on a sky and grass background (detection, grounding, segmentation).",
    "teaching_scene": "Generated: a held-out teaching scene (never trained on) with three shapes and a word; what "
    "the offline teaching model is shown instead of photos (captioning, detection, grounding, region, OCR).",
}

#: Shape scene size used by the shipped ``shapes.png``.
SHAPES_SCENE_SIZE: tuple[int, int] = (640, 480)


def list_samples() -> list[str]:
    """Names of all shipped samples, in display order. Taught in ``notebooks/00_setup.ipynb``."""
    return list(SAMPLE_IMAGES)


def _check_name(name: str) -> str:
    """Return the canonical sample name; accept the file name too ("text.png") since both appear in docs."""
    if isinstance(name, str):
        key = name.strip().lower()
        if key in SAMPLE_IMAGES:
            return key
        for sample, file_name in SAMPLE_IMAGES.items():
            if key == file_name.lower():
                return sample
    raise ValueError(
        f"Unknown sample {name!r}. Valid names: {', '.join(SAMPLE_IMAGES)}. See helpers.course.samples.list_samples()."
    )


def sample_path(name: str) -> Path:
    """Path of the shipped file for sample ``name``. Taught in ``notebooks/00_setup.ipynb``.

    Raises ``ValueError`` listing the valid names for an unknown name, and ``FileNotFoundError`` (with the fix) if
    the package was installed without its data.
    """
    path = IMAGES_DIR / SAMPLE_IMAGES[_check_name(name)]
    if not path.is_file():
        raise FileNotFoundError(
            f"Sample file {path} is missing. Reinstall the package (`pip install -e .`) so helpers/data ships, "
            "or run `python -m helpers.course.samples --regenerate` for the generated samples."
        )
    return path


def load_sample(name: str) -> Image.Image:
    """Load sample ``name`` as an RGB ``PIL.Image``. Taught in ``notebooks/04_captioning.ipynb``.

    The file is read fully and closed, so the returned image does not hold a file handle.
    """
    with Image.open(sample_path(name)) as image:
        return image.convert("RGB")


# --- generators -------------------------------------------------------------------------------------------------


def font(name: str = "DejaVuSans.ttf", size: int = 24) -> ImageFont.FreeTypeFont:
    """A TrueType font from matplotlib's bundled DejaVu/STIX set (always installed with the collection).

    The BASIC layout engine is forced: with libraqm the glyph placement may differ between installations, and the
    generators must be deterministic. Taught in ``notebooks/09_ocr.ipynb``.
    """
    import matplotlib  # only the generators need it; loading samples does not

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name
    if not path.is_file():
        raise FileNotFoundError(f"Font {name!r} is not in {path.parent}; pick one of the .ttf files listed there.")
    return ImageFont.truetype(str(path), size=size, layout_engine=ImageFont.Layout.BASIC)


#: (text, font file, size, RGB colour) for each line of the OCR sample.
DEFAULT_TEXT_LINES: tuple[tuple[str, str, int, tuple[int, int, int]], ...] = (
    ("Florence-2 on OpenVINO", "DejaVuSans-Bold.ttf", 44, (20, 20, 20)),
    ("The quick brown fox jumps over the lazy dog.", "DejaVuSerif.ttf", 26, (30, 30, 30)),
    ("Opening hours: Mon-Fri 09:00 - 17:30", "DejaVuSansMono.ttf", 24, (10, 60, 140)),
    ("Call +1 555 0142 or write to info@example.com", "DejaVuSans-Oblique.ttf", 22, (40, 40, 40)),
    ("SALE -30%", "DejaVuSerif-Bold.ttf", 56, (200, 30, 30)),
    ("Grüße aus Zürich, café crème 3,50 €", "DejaVuSans.ttf", 24, (20, 100, 40)),
    ("small print: terms and conditions apply", "DejaVuSans.ttf", 16, (90, 90, 90)),
)


def render_text_image(
    lines: Sequence[tuple[str, str, int, tuple[int, int, int]]] = DEFAULT_TEXT_LINES,
    *,
    size: tuple[int, int] = (768, 432),
    background: tuple[int, int, int] = (250, 248, 240),
) -> Image.Image:
    """Render ``lines`` of (text, font file, size, colour) top to bottom, for OCR. Taught in ``notebooks/09_ocr.ipynb``.

    Deterministic: same arguments, same pixels. Lines that do not fit are simply cut off by the image border.
    """
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    y = 28
    for index, (text, font_name, font_size, colour) in enumerate(lines):
        line_font = font(font_name, font_size)
        # Alternate left and indented starts so OCR-with-region boxes are not all aligned.
        x = 32 if index % 2 == 0 else 64
        if font_name.endswith("Bold.ttf") and font_size >= 50:
            # A banner: text on a coloured band exercises OCR on a non-white background.
            left, top, right, bottom = draw.textbbox((x, y), text, font=line_font)
            draw.rectangle((left - 14, top - 10, right + 14, bottom + 10), fill=(255, 225, 80))
        draw.text((x, y), text, font=line_font, fill=colour)
        y += int(font_size * 1.55) + 6
    return image


#: (item, quantity, unit price) lines of the default receipt.
DEFAULT_RECEIPT_ITEMS: tuple[tuple[str, int, str], ...] = (
    ("Espresso", 2, "2.40"),
    ("Croissant", 3, "1.85"),
    ("Orange juice", 1, "3.90"),
    ("Bagel, cream cheese", 1, "4.25"),
    ("Sparkling water", 2, "1.60"),
)


def render_receipt(
    items: Sequence[tuple[str, int, str]] = DEFAULT_RECEIPT_ITEMS,
    *,
    store: str = "CORNER CAFE",
    address: str = "12 Market Street, Springfield",
    date: str = "2024-05-17  08:42",
    tax_rate: str = "0.08",
) -> Image.Image:
    """Render a receipt: header, item lines with right-aligned prices, tax and a correct total.

    Prices are ``Decimal`` strings so the printed total is exact. Taught in ``notebooks/09_ocr.ipynb``.
    """
    mono = font("DejaVuSansMono.ttf", 20)
    mono_bold = font("DejaVuSansMono-Bold.ttf", 22)
    title = font("DejaVuSans-Bold.ttf", 34)
    small = font("DejaVuSans.ttf", 17)
    paper_w, margin, line_h = 420, 28, 30
    paper_h = 150 + len(items) * line_h + 190  # header + item lines + totals and footer (the layout below)
    canvas = Image.new("RGB", (paper_w + 120, paper_h + 80), (96, 78, 62))  # a dark wooden table
    draw = ImageDraw.Draw(canvas)
    left, top = 60, 40
    draw.rectangle((left + 6, top + 6, left + paper_w + 6, top + paper_h + 6), fill=(60, 48, 38))  # shadow
    draw.rectangle((left, top, left + paper_w, top + paper_h), fill=(252, 252, 247))
    x0, x1 = left + margin, left + paper_w - margin

    def centred(y: int, text: str, text_font: ImageFont.FreeTypeFont) -> None:
        width = draw.textlength(text, font=text_font)
        draw.text((left + (paper_w - width) / 2, y), text, font=text_font, fill=(25, 25, 25))

    def row(y: int, label: str, amount: str, text_font: ImageFont.FreeTypeFont) -> None:
        draw.text((x0, y), label, font=text_font, fill=(25, 25, 25))
        draw.text((x1 - draw.textlength(amount, font=text_font), y), amount, font=text_font, fill=(25, 25, 25))

    def separator(y: int) -> None:
        for x in range(x0, x1, 12):
            draw.line((x, y, x + 6, y), fill=(120, 120, 120), width=2)

    y = top + 22
    centred(y, store, title)
    y += 50
    centred(y, address, small)
    y += 26
    centred(y, date, small)
    y += 36
    separator(y)
    y += 16
    subtotal = Decimal("0")
    for name, quantity, price in items:
        amount = Decimal(price) * quantity
        subtotal += amount
        row(y, f"{quantity} x {name}"[:26], f"{amount:.2f}", mono)
        y += line_h
    separator(y + 4)
    y += 20
    tax = (subtotal * Decimal(tax_rate)).quantize(Decimal("0.01"))
    row(y, "Subtotal", f"{subtotal:.2f}", mono)
    y += line_h
    row(y, f"Tax {Decimal(tax_rate) * 100:.0f}%", f"{tax:.2f}", mono)
    y += line_h + 6
    row(y, "TOTAL", f"{subtotal + tax:.2f}", mono_bold)
    y += line_h + 8
    separator(y)
    y += 22
    centred(y, "Thank you for your visit!", small)
    return canvas


#: The shapes of the scene: (label, kind, relative box x1, y1, x2, y2, RGB fill).
SHAPES: tuple[tuple[str, str, float, float, float, float, tuple[int, int, int]], ...] = (
    ("red circle", "ellipse", 0.08, 0.50, 0.30, 0.79, (220, 40, 40)),
    ("blue square", "rectangle", 0.38, 0.42, 0.58, 0.69, (40, 80, 210)),
    ("green triangle", "triangle", 0.66, 0.36, 0.93, 0.78, (30, 150, 60)),
    ("yellow star", "star", 0.72, 0.05, 0.90, 0.29, (250, 200, 20)),
    ("purple ellipse", "ellipse", 0.25, 0.08, 0.55, 0.28, (140, 60, 170)),
)


def _star(box: tuple[float, float, float, float], points: int = 5) -> list[tuple[float, float]]:
    """Vertices of a star inscribed in ``box`` (outer and inner radius alternate)."""
    import math

    x1, y1, x2, y2 = box
    cx, cy, radius = (x1 + x2) / 2, (y1 + y2) / 2, min(x2 - x1, y2 - y1) / 2
    vertices = []
    for i in range(points * 2):
        r = radius if i % 2 == 0 else radius * 0.45
        angle = -math.pi / 2 + i * math.pi / points
        vertices.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return vertices


def _shape_boxes(size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    width, height = size
    return [
        (round(x1 * width), round(y1 * height), round(x2 * width), round(y2 * height))
        for _, _, x1, y1, x2, y2, _ in SHAPES
    ]


def render_shapes_scene(size: tuple[int, int] = SHAPES_SCENE_SIZE) -> Image.Image:
    """Draw :data:`SHAPES` on a sky-and-grass background. Taught in ``notebooks/05_detection.ipynb``.

    Deterministic; the exact boxes are available from :func:`shapes_scene_answer` as ground truth.
    """
    width, height = size
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    horizon = int(height * 0.62)
    for y in range(height):  # vertical gradients: light sky, then darker grass
        if y < horizon:
            t = y / max(horizon, 1)
            colour = (int(150 + 60 * t), int(195 + 35 * t), 245)
        else:
            t = (y - horizon) / max(height - horizon, 1)
            colour = (int(120 - 40 * t), int(185 - 50 * t), int(90 - 30 * t))
        draw.line((0, y, width, y), fill=colour)
    for (label, kind, *_, fill), box in zip(SHAPES, _shape_boxes(size)):
        outline = tuple(max(c - 70, 0) for c in fill)
        if kind == "ellipse":
            draw.ellipse(box, fill=fill, outline=outline, width=3)
        elif kind == "rectangle":
            draw.rectangle(box, fill=fill, outline=outline, width=3)
        elif kind == "triangle":
            x1, y1, x2, y2 = box
            draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=fill, outline=outline, width=3)
        elif kind == "star":
            draw.polygon(_star(box), fill=fill, outline=outline, width=3)
    return image


def shapes_scene_answer(size: tuple[int, int] = SHAPES_SCENE_SIZE) -> dict[str, list]:
    """Ground truth of :func:`render_shapes_scene` in the ``<OD>`` answer shape ``{'bboxes', 'labels'}``.

    Lets ``notebooks/05_detection.ipynb`` show :func:`helpers.outputs.plotting.draw_answer` before any model runs. For the
    star the box is the box it was drawn in, which is a little larger than the star itself.
    """
    return {
        "bboxes": [[float(v) for v in box] for box in _shape_boxes(size)],
        "labels": [label for label, *_ in SHAPES],
    }


#: The shipped teaching scene: scene ``TEACHING_SCENE_INDEX`` of the held-out stream
#: (:data:`helpers.course.teaching.scenes.HELD_OUT_SEED`, never used in training). Picked, among the held-out scenes
#: with a triangle, a red circle, a blue square and a word, as one where the shipped teaching model (v4, OpenVINO
#: fp16) answers right what the lessons ask of it: captions, boxes, dense captions, grounding, segmentation, region
#: category and description of the square and circle, and all three reading tasks. One detail is wrong: the most
#: detailed caption calls the word's dark letters light.
#: Every lesson prints the measured rates beside its answers, so a picked scene is never passed off as typical.
TEACHING_SCENE_INDEX = 60635


def teaching_scene() -> Scene:
    """The shipped ``teaching_scene`` sample with its exact ground truth (objects, word and their boxes), from the
    scene generator :func:`helpers.course.teaching.scenes.make_scene`. Taught in ``notebooks/05_detection.ipynb``."""
    from helpers.course.teaching.scenes import HELD_OUT_SEED, make_scene

    return make_scene(HELD_OUT_SEED, TEACHING_SCENE_INDEX)


def teaching_scene_answer() -> dict[str, list]:
    """Ground truth of the teaching scene in the ``<OD>`` answer shape ``{'bboxes', 'labels'}``, left to right
    (like :func:`shapes_scene_answer` for the shapes scene). Taught in ``notebooks/05_detection.ipynb``."""
    from helpers.course.teaching.scenes import od_answer

    return od_answer(teaching_scene())


def lesson_sample(name: str, kind: ModelKind) -> str:
    """The sample a lesson shows where it asks for ``name``, given the kind of model it runs
    (:func:`helpers.course.model_kind.model_kind`). Taught in ``notebooks/04_captioning.ipynb``.

    Real and random models get ``name``. The teaching model only learned generated shape scenes, so on a photo,
    a document or the star-and-ellipse shapes scene its answers would be meaningless: it gets the teaching scene,
    and one printed line says so.
    """
    name = _check_name(name)
    if kind != "teaching" or name == "teaching_scene":
        return name
    print(
        f"ℹ️  The teaching model knows only generated shape scenes, so it is shown the held-out teaching scene "
        f"instead of {name!r}."
    )
    return "teaching_scene"


def lesson_image(name: str, kind: ModelKind) -> Image.Image:
    """:func:`load_sample` of :func:`lesson_sample`: the picture a lesson shows a model of this kind. Taught in
    ``notebooks/04_captioning.ipynb``."""
    return load_sample(lesson_sample(name, kind))


def lesson_sample_path(name: str, kind: ModelKind) -> Path:
    """:func:`sample_path` of :func:`lesson_sample`, for the "Try it yourself" cells that take a file."""
    return sample_path(lesson_sample(name, kind))


def render_teaching_scene() -> Image.Image:
    """The picture of :func:`teaching_scene` (the generator of the shipped ``teaching_scene.png``)."""
    return teaching_scene().image


#: Generated sample name -> generator (called with no arguments to produce the shipped file).
GENERATORS: dict[str, Callable[[], Image.Image]] = {
    "text": render_text_image,
    "receipt": render_receipt,
    "shapes": render_shapes_scene,
    "teaching_scene": render_teaching_scene,
}


def regenerate_samples(output_dir: Path | str | None = None) -> list[Path]:
    """Re-render every generated sample into ``output_dir`` (default: the shipped folder); return the paths.

    Taught in ``notebooks/00_setup.ipynb``. Photos are not touched: they come from other packages (see LICENSES.md).
    """
    folder = Path(output_dir) if output_dir is not None else IMAGES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, generate in GENERATORS.items():
        path = folder / SAMPLE_IMAGES[name]
        generate().save(path, optimize=True)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m helpers.course.samples [--regenerate [--output-dir DIR]]``: list the samples, or re-render generated ones."""
    parser = argparse.ArgumentParser(prog="python -m helpers.course.samples", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--regenerate",
        action="store_true",
        help="rewrite the generated samples (text, receipt, shapes, teaching_scene)",
    )
    parser.add_argument("--output-dir", type=Path, default=None, help=f"where to write them (default: {IMAGES_DIR})")
    args = parser.parse_args(argv)
    if args.regenerate:
        for path in regenerate_samples(args.output_dir):
            print(f"wrote {path} ({path.stat().st_size // 1024} KB)")
        return 0
    for name in list_samples():
        print(f"{name:14s} {SAMPLE_IMAGES[name]:18s} {SAMPLE_DESCRIPTIONS[name]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
