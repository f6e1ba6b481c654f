"""Generated scenes with exact ground truth, and every task's answer written in Florence-2's own format.

A scene is one to four coloured shapes (circle, square, triangle; five colours; three sizes) on a plain, gradient,
textured or landscape background, and in about half of the scenes one rendered word. Two renderers draw them:
``classic`` (the first teaching model's: plain shapes, 240–384 px) and ``varied`` (any size from 240 to 400 px,
supersampled or aliased edges, outlines of several widths and colours, tilted triangles, noise, blur, JPEG, larger
words in more fonts), so a model learns shapes rather than one way of drawing them (:func:`training_scene` mixes
them). Because the generator placed everything, the right answer to every Florence-2 task is known exactly:

=======================================  ====================================================================
task                                     target text (what the decoder is taught to write)
=======================================  ====================================================================
``<CAPTION>``                            ``a red circle and two blue squares``
``<DETAILED_CAPTION>``                   ``The image shows a large red circle at the top left, … and the word
                                         moon at the bottom.`` (size, colour, shape, position, the word)
``<MORE_DETAILED_CAPTION>``              ``The image shows three shapes on a dark background. There is a large
                                         red circle at the top left. … The word moon is written in light
                                         letters at the bottom.``
``<OD>``                                 ``red circle<loc_…>×4blue square<loc_…>×4<loc_…>×4`` (label per group)
``<DENSE_REGION_CAPTION>``               ``large red circle<loc_…>×4small blue square<loc_…>×4`` (per shape)
``<REGION_PROPOSAL>``                    ``<loc_…>×4`` per shape
``<CAPTION_TO_PHRASE_GROUNDING>``        ``a red circle<loc_…>×4two blue squares<loc_…>×8`` (phrases of any of
                                         the three caption levels, so the caption-then-grounding cascades work)
``<REFERRING_EXPRESSION_SEGMENTATION>``  ``<loc_…>×2n`` the outline polygon of every shape the expression names
                                         (``red circle`` or ``large red circle``), polygons joined by ``<sep>``
``<REGION_TO_SEGMENTATION>``             the outline polygon of the shape in the region
``<OPEN_VOCABULARY_DETECTION>``          ``red circle<loc_…>×4…`` every shape the query names (``red circle``,
                                         ``circle``), empty when none
``<REGION_TO_CATEGORY>``                 ``red circle<loc_…>×4`` (the category, then the region it was asked about)
``<REGION_TO_DESCRIPTION>``              ``a large red circle at the top left``
``<REGION_TO_OCR>``                      ``moon`` (asked about the word's region)
``<OCR>``                                ``moon`` (empty when the scene has no word)
``<OCR_WITH_REGION>``                    ``moon<loc_…>×8`` (quadrilateral: top-left, top-right, bottom-right,
                                         bottom-left)
=======================================  ====================================================================

Coordinates are quantised exactly like Florence-2's post-processor (:func:`helpers.tasks.run.box_to_loc`), so
``processor.post_process_generation`` turns a target back into the ground truth (to within one bin).
Groups, boxes and phrases are ordered left to right, so one image has exactly one right answer per task.

Everything is deterministic: scene ``index`` of seed ``seed`` is the same picture on every machine (Python's
``random`` seeded with a string, Pillow's basic text layout). Training uses seeds 0, 1, …; :data:`HELD_OUT_SEED`
is kept for evaluation. Taught in ``notebooks/12_fine_tune.ipynb``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from helpers.course.samples import font
from helpers.tasks.run import box_to_loc, parse_region

#: Shape colour name -> RGB (each object's fill is jittered around it).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 200, 25),
    "purple": (135, 50, 175),
}
SHAPE_KINDS: tuple[str, ...] = ("circle", "square", "triangle")
#: Every ``<OD>`` / ``<REGION_TO_CATEGORY>`` label the teaching model knows: "red circle", "red square", …
CATEGORIES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOURS for s in SHAPE_KINDS)
#: Words that may appear in a scene (a closed vocabulary: the teaching model reads these, not arbitrary text).
WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "moon", "tree", "fish", "bird", "cake", "milk", "rain", "snow", "ship",
    "lamp", "door", "park", "city", "music", "hello", "OPEN", "STOP", "EXIT", "SALE", "TAXI", "HOTEL",
)  # fmt: skip
FONTS: tuple[str, ...] = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
#: The varied renderer's fonts (matplotlib's bundled set): the classic four plus obliques, italics and bold mono.
VARIED_FONTS: tuple[str, ...] = (
    *FONTS, "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSansMono-Bold.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf",
)  # fmt: skip
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three", 4: "four"}
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
#: Size words by a shape's extent relative to the scene's shorter side (``classic`` draws any extent from 0.13 to
#: 0.34; ``varied`` draws from :data:`SIZE_BANDS`, which keep a gap between the words).
SIZE_WORDS: tuple[str, ...] = ("small", "medium", "large")
SIZE_LIMITS: tuple[float, float] = (0.195, 0.275)
SIZE_BANDS: dict[str, tuple[float, float]] = {"small": (0.12, 0.18), "medium": (0.21, 0.26), "large": (0.29, 0.36)}
#: Where a shape is, by the third of the picture its centre falls in (row, column).
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
    (1, 0): "on the left", (1, 1): "in the middle", (1, 2): "on the right",
    (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right",
}  # fmt: skip
#: Corners of the outline polygon written for a circle (the segmentation tasks).
CIRCLE_POINTS = 12

#: The tasks the teaching model is trained on: all of Florence-2's task tokens.
TEACHING_TASKS: tuple[str, ...] = (
    "<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>", "<OD>", "<DENSE_REGION_CAPTION>",
    "<REGION_PROPOSAL>", "<CAPTION_TO_PHRASE_GROUNDING>", "<REFERRING_EXPRESSION_SEGMENTATION>",
    "<REGION_TO_SEGMENTATION>", "<OPEN_VOCABULARY_DETECTION>", "<REGION_TO_CATEGORY>", "<REGION_TO_DESCRIPTION>",
    "<REGION_TO_OCR>", "<OCR>", "<OCR_WITH_REGION>",
)  # fmt: skip
#: Scene sizes (width, height) drawn from when none is given: square and 4:3 both ways, like photos. The processor
#: resizes every image to the model's square input, so the model learns to read squashed shapes too.
SCENE_SIZES: tuple[tuple[int, int], ...] = ((320, 320), (320, 320), (384, 288), (288, 384), (320, 240))
#: The varied renderer picks width and height independently in this range (pixels).
VARIED_SIDES: tuple[int, int] = (240, 400)
#: Share of :func:`training_scene` scenes drawn by the classic renderer (the rest: varied).
CLASSIC_SHARE = 0.25
STYLES: tuple[str, ...] = ("classic", "varied")
#: Seed of the held-out scenes the quality script and the tests evaluate on (training uses other seeds).
HELD_OUT_SEED = 1_000_003

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class SceneObject:
    """One shape: ``box`` is its pixel extent ``(x1, y1, x2, y2)`` (x2/y2 exclusive, so width = x2 - x1)."""

    colour: str
    shape: str
    box: Box
    apex: float = 0.5  # a triangle's top corner, as a fraction of its width from the left

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class SceneText:
    """One rendered word and the box of its ink."""

    text: str
    box: Box
    font_name: str
    ink: str = "dark"  # "dark" or "light" letters


@dataclass(frozen=True)
class Group:
    """All objects of one category, as the caption names them: ``phrase`` is e.g. ``"two blue squares"``."""

    label: str
    phrase: str
    boxes: tuple[Box, ...]


@dataclass(frozen=True)
class Scene:
    """A generated picture and its exact ground truth."""

    image: Image.Image
    objects: tuple[SceneObject, ...]
    text: SceneText | None
    seed: int
    index: int
    style: str = "classic"
    background: str = "light"  # "dark" or "light", as the more detailed caption says

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


# ----------------------------------------------------------------------------------------------------------------
# Drawing


def _jitter(rng: random.Random, colour: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in colour)  # type: ignore[return-value]


def _background_colour(rng: random.Random) -> tuple[int, int, int]:
    """A muted colour (grey with a slight tint), dark or light, that no shape colour can be mistaken for."""
    grey = rng.choice([rng.randint(25, 90), rng.randint(150, 245)])
    return tuple(min(255, max(0, grey + rng.randint(-22, 22))) for _ in range(3))  # type: ignore[return-value]


def _draw_background(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    width, height = size
    start = _background_colour(rng)
    kind = rng.choice(["plain", "plain", "vertical", "horizontal", "diagonal", "landscape"])
    if kind == "plain":
        return Image.new("RGB", size, start)
    if kind == "landscape":
        return _landscape(rng, size)
    end = _background_colour(rng)
    x = np.linspace(0.0, 1.0, width)[None, :]
    y = np.linspace(0.0, 1.0, height)[:, None]
    ramp = {"vertical": y + 0 * x, "horizontal": x + 0 * y, "diagonal": (x + y) / 2}[kind]
    mask = Image.fromarray(np.rint(ramp * 255).astype(np.uint8))
    return Image.composite(Image.new("RGB", size, end), Image.new("RGB", size, start), mask)


def _landscape(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """Light sky over darker grass (like ``helpers.course.samples.render_shapes_scene``), horizon at a random height."""
    width, height = size
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    horizon = int(height * rng.uniform(0.45, 0.75))
    sky, grass = _jitter(rng, (150, 195, 245), 15), _jitter(rng, (120, 185, 90), 15)
    for y in range(height):
        if y < horizon:
            t = y / max(horizon, 1)
            colour = (int(sky[0] + 60 * t), int(sky[1] + 35 * t), sky[2])
        else:
            t = (y - horizon) / max(height - horizon, 1)
            colour = (int(grass[0] - 40 * t), int(grass[1] - 50 * t), int(grass[2] - 30 * t))
        draw.line((0, y, width, y), fill=tuple(min(255, max(0, c)) for c in colour))
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject, fill: tuple[int, int, int], outline: bool) -> None:
    x1, y1, x2, y2 = obj.box
    last = (x1, y1, x2 - 1, y2 - 1)  # Pillow's boxes include their last pixel; ours end before it
    edge = tuple(max(c - 80, 0) for c in fill) if outline else None
    if obj.shape == "circle":
        draw.ellipse(last, fill=fill, outline=edge, width=2)
    elif obj.shape == "square":
        draw.rectangle(last, fill=fill, outline=edge, width=2)
    else:
        draw.polygon([((x1 + x2 - 1) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=fill, outline=edge, width=2)


def _gap_free(box: Box, taken: Sequence[Box], gap: int) -> bool:
    x1, y1, x2, y2 = box
    return all(x2 + gap <= a1 or a2 + gap <= x1 or y2 + gap <= b1 or b2 + gap <= y1 for a1, b1, a2, b2 in taken)


def _place(rng: random.Random, w: int, h: int, size: tuple[int, int], taken: Sequence[Box], gap: int) -> Box | None:
    width, height = size
    margin = 2
    if w > width - 2 * margin or h > height - 2 * margin:
        return None
    for _ in range(60):
        x = rng.randint(margin, width - margin - w)
        y = rng.randint(margin, height - margin - h)
        box = (x, y, x + w, y + h)
        if _gap_free(box, taken, gap):
            return box
    return None


def _plan_objects(rng: random.Random) -> list[tuple[str, str]]:
    """1–4 (colour, shape) pairs; a third of the scenes repeat one category so counts (two, three…) get taught."""
    count = rng.randint(1, 4)
    plan = []
    if count >= 2 and rng.random() < 0.35:
        repeated = (rng.choice(list(COLOURS)), rng.choice(SHAPE_KINDS))
        plan = [repeated] * rng.randint(2, count)
    while len(plan) < count:
        plan.append((rng.choice(list(COLOURS)), rng.choice(SHAPE_KINDS)))
    rng.shuffle(plan)
    return plan


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    width, height = (int(v) for v in size)
    if width < 96 or height < 96:
        raise ValueError(f"Scenes need at least 96×96 pixels so shapes and words fit; got {width}×{height}.")
    return width, height


def _luminance(image: Image.Image, box: Box | None = None) -> float:
    region = image.crop(box) if box is not None else image
    return float(region.convert("L").resize((1, 1), Image.Resampling.BOX).getpixel((0, 0)))


def _background_word(image: Image.Image) -> str:
    return "dark" if _luminance(image) < 128 else "light"


def make_scene(
    seed: int,
    index: int = 0,
    *,
    size: tuple[int, int] | None = None,
    word_probability: float = 0.5,
    style: str = "classic",
) -> Scene:
    """Draw scene ``index`` of the stream ``seed``: deterministic, with exact ground truth. ``size`` (width,
    height) defaults to one of :data:`SCENE_SIZES` (``classic``) or any size in :data:`VARIED_SIDES` (``varied``),
    picked by the seed. ``style`` is the renderer (see the module's docstring). Taught in
    ``notebooks/12_fine_tune.ipynb``."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}; got {style!r}.")
    if style == "varied":
        return _varied_scene(seed, index, size, word_probability)
    rng = random.Random(f"florence2-teaching-scene/{seed}/{index}/{size}")
    width, height = size = _check_size(size) if size is not None else rng.choice(SCENE_SIZES)
    image = _draw_background(rng, size)
    background = _background_word(image)
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    gap = max(3, side // 64)

    objects: list[SceneObject] = []
    for colour, shape in _plan_objects(rng):
        extent = round(side * rng.uniform(0.13, 0.34))
        box = _place(rng, extent, extent, size, [o.box for o in objects], gap)
        if box is None:
            continue  # no room left: the scene simply has fewer shapes (the ground truth follows what was drawn)
        obj = SceneObject(colour, shape, box)
        _draw_shape(draw, obj, _jitter(rng, COLOURS[colour], 15), outline=rng.random() < 0.4)
        objects.append(obj)

    text = None
    if rng.random() < word_probability:
        text = _draw_word(rng, image, objects, gap, FONTS, (0.07, 0.12), 10, _classic_ink)
    return Scene(image, tuple(objects), text, seed, index, "classic", background)


def _classic_ink(rng: random.Random, background: float) -> tuple[int, int, int]:
    return (rng.randint(235, 255),) * 3 if background < 128 else (rng.randint(0, 40),) * 3  # type: ignore[return-value]


def _varied_ink(rng: random.Random, background: float) -> tuple[int, int, int]:
    return _jitter(rng, (20, 20, 20) if background >= 128 else (240, 240, 240), 18)


def _draw_word(rng: random.Random, image: Image.Image, objects: Sequence[SceneObject], gap: int, fonts: Sequence[str],
               heights: tuple[float, float], min_size: int, ink_for) -> SceneText | None:  # fmt: skip
    """Write one word of :data:`WORDS` where it overlaps nothing, in a font of ``fonts`` sized a fraction
    ``heights`` of the shorter side, in an ink ``ink_for(rng, background luminance)``; None when it does not fit."""
    draw = ImageDraw.Draw(image)
    word = rng.choice(WORDS)
    font_name = rng.choice(fonts)
    word_font = font(font_name, max(min_size, round(min(image.size) * rng.uniform(*heights))))
    left, top, right, bottom = draw.textbbox((0, 0), word, font=word_font)
    box = _place(rng, right - left, bottom - top, image.size, [o.box for o in objects], gap)
    if box is None:
        return None
    ink = ink_for(rng, _luminance(image, box))
    draw.text((box[0] - left, box[1] - top), word, font=word_font, fill=ink)
    return SceneText(word, box, font_name, "light" if ink[0] > 128 else "dark")


def training_scene(seed: int, index: int) -> Scene:
    """Scene ``index`` of stream ``seed`` as training and evaluation draw them: :data:`CLASSIC_SHARE` of them by
    the classic renderer, the rest by the varied one (the choice is part of the seed)."""
    chooser = random.Random(f"florence2-teaching-style/{seed}/{index}")
    return make_scene(seed, index, style="classic" if chooser.random() < CLASSIC_SHARE else "varied")


def _varied_background(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """The classic backgrounds plus textures: noise, soft stripes, blotches, checks (all muted, no shape colour)."""
    image = _draw_background(rng, size)
    kind = rng.choice(["none", "noise", "stripes", "blotches", "checks"])
    width, height = size
    if kind == "noise":
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(3, 12), (height, width, 1))
        return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    base = _luminance(image)
    shade = int(base + (rng.randint(10, 25) if base < 128 else -rng.randint(10, 25)))
    tint = _jitter(rng, (shade, shade, shade), 8)
    if kind == "stripes":
        step = rng.randint(12, 40)
        for offset in range(-height, width, 2 * step):
            draw.polygon([(offset, 0), (offset + step, 0), (offset + step + height, height), (offset + height, height)],
                         fill=tint)  # fmt: skip
    elif kind == "blotches":
        for _ in range(rng.randint(3, 9)):
            r = rng.randint(15, 70)
            x, y = rng.randint(0, width), rng.randint(0, height)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tint)
    elif kind == "checks":
        step = rng.randint(16, 48)
        for row in range(0, height, step):
            for col in range(0, width, step):
                if (row // step + col // step) % 2:
                    draw.rectangle((col, row, col + step - 1, row + step - 1), fill=tint)
    return image


def _outline_colour(rng: random.Random, fill: tuple[int, int, int]) -> tuple[int, int, int]:
    kind = rng.choice(["darker", "darker", "black", "white", "lighter"])
    if kind == "black":
        return (rng.randint(0, 30),) * 3  # type: ignore[return-value]
    if kind == "white":
        return (rng.randint(225, 255),) * 3  # type: ignore[return-value]
    delta = -rng.randint(50, 110) if kind == "darker" else rng.randint(40, 90)
    return tuple(min(255, max(0, c + delta)) for c in fill)  # type: ignore[return-value]


def _varied_scene(seed: int, index: int, size: tuple[int, int] | None, word_probability: float) -> Scene:
    rng = random.Random(f"florence2-teaching-scene/varied/{seed}/{index}/{size}")
    low, high = VARIED_SIDES
    width, height = size = _check_size(size) if size is not None else (rng.randint(low, high), rng.randint(low, high))
    background = _varied_background(rng, size)
    background_word = _background_word(background)
    scale = rng.choice([1, 1, 2, 3])  # draw at 2× or 3× and shrink: smooth edges; 1×: aliased ones
    canvas = background.resize((width * scale, height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    side = min(width, height)
    gap = max(3, side // 64)
    objects: list[SceneObject] = []
    for colour, shape in _plan_objects(rng):
        low_extent, high_extent = SIZE_BANDS[rng.choice(SIZE_WORDS)]
        extent = round(side * rng.uniform(low_extent, high_extent))
        box = _place(rng, extent, extent, size, [o.box for o in objects], gap)
        if box is None:
            continue
        apex = rng.uniform(0.25, 0.75) if shape == "triangle" and rng.random() < 0.4 else 0.5
        obj = SceneObject(colour, shape, box, apex)
        fill = _jitter(rng, COLOURS[colour], 28)
        outline = _outline_colour(rng, fill) if rng.random() < 0.5 else None
        line_width = rng.randint(1, max(1, extent // 12)) * scale
        fill_shape(draw, obj, fill, scale=scale, outline=outline, width=line_width)
        objects.append(obj)
    image = canvas.resize(size, Image.Resampling.LANCZOS) if scale > 1 else canvas
    text = None
    if rng.random() < word_probability:
        text = _draw_word(rng, image, objects, gap, VARIED_FONTS, (0.09, 0.16), 14, _varied_ink)
    image = _degrade(rng, image)
    return Scene(image, tuple(objects), text, seed, index, "varied", background_word)


def _degrade(rng: random.Random, image: Image.Image) -> Image.Image:
    """Blur, sensor noise or JPEG compression, each now and then, as photos of drawings have."""
    from io import BytesIO

    from PIL import ImageFilter

    if rng.random() < 0.2:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.2)))
    if rng.random() < 0.2:
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(2, 8), (image.height, image.width, 3))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
    if rng.random() < 0.2:
        buffer = BytesIO()
        image.save(buffer, format="JPEG", quality=rng.randint(35, 85))
        image = Image.open(BytesIO(buffer.getvalue())).convert("RGB")
    return image


def triangle_corners(obj: SceneObject, scale: int = 1) -> list[tuple[float, float]]:
    """A triangle's three corners in Pillow's inclusive pixel coordinates (top, bottom right, bottom left)."""
    x1, y1, x2, y2 = (v * scale for v in obj.box)
    return [(x1 + obj.apex * (x2 - 1 - x1), y1), (x2 - 1, y2 - 1), (x1, y2 - 1)]


def fill_shape(draw: ImageDraw.ImageDraw, obj: SceneObject, fill, *, scale: int = 1, outline=None,
               width: int = 1) -> None:  # fmt: skip
    """Draw ``obj`` filled with ``fill`` (a colour or a label id) on a canvas ``scale`` times the scene's size."""
    x1, y1, x2, y2 = (v * scale for v in obj.box)
    last = (x1, y1, x2 - 1, y2 - 1)
    if obj.shape == "circle":
        draw.ellipse(last, fill=fill, outline=outline, width=width)
    elif obj.shape == "square":
        draw.rectangle(last, fill=fill, outline=outline, width=width)
    else:
        draw.polygon(triangle_corners(obj, scale), fill=fill, outline=outline, width=width)


def iter_scenes(seed: int, count: int, *, start: int = 0, size: tuple[int, int] | None = None) -> Iterator[Scene]:
    """Scenes ``start`` … ``start + count - 1`` of the stream ``seed``."""
    for index in range(start, start + count):
        yield make_scene(seed, index, size=size)


# ----------------------------------------------------------------------------------------------------------------
# Ground truth in Florence-2's formats


def _order(box: Box) -> tuple[int, int]:
    return box[0], box[1]


def groups(scene: Scene) -> list[Group]:
    """The scene's objects grouped by category, groups and boxes ordered left to right."""
    by_label: dict[str, list[Box]] = {}
    for obj in sorted(scene.objects, key=lambda o: _order(o.box)):
        by_label.setdefault(obj.label, []).append(obj.box)
    result = []
    for label, boxes in by_label.items():
        count = len(boxes)
        noun = label + ("s" if count > 1 else "")
        result.append(Group(label, f"{COUNT_WORDS[count]} {noun}", tuple(boxes)))
    return result


def join_phrases(phrases: Sequence[str]) -> str:
    """``["a red circle", "two blue squares", "a green triangle"]`` → ``"a red circle, two blue squares and a
    green triangle"``."""
    phrases = list(phrases)
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene: Scene) -> str:
    """The ``<CAPTION>`` answer: every group, left to right. The word in the scene is not part of the caption."""
    return join_phrases([g.phrase for g in groups(scene)])


def _locs(box: Box, size: tuple[int, int]) -> str:
    return box_to_loc(box, size)


def od_target(scene: Scene) -> str:
    """The ``<OD>`` answer: each label once, followed by all its boxes (a format the post-processor reads as one
    box per label; writing every label once keeps beam search's ``no_repeat_ngram_size`` out of the way)."""
    return "".join(g.label + "".join(_locs(b, scene.size) for b in g.boxes) for g in groups(scene))


def grounding_target(scene: Scene, phrases: Sequence[str]) -> str:
    """The ``<CAPTION_TO_PHRASE_GROUNDING>`` answer for a caption made of ``phrases`` (each a group's phrase)."""
    by_phrase = {g.phrase: g for g in groups(scene)}
    unknown = [p for p in phrases if p not in by_phrase]
    if unknown:
        raise ValueError(f"Phrases {unknown} are not in this scene; use the phrases of groups(scene).")
    return "".join(p + "".join(_locs(b, scene.size) for b in by_phrase[p].boxes) for p in phrases)


def region_prompt(scene: Scene, obj: SceneObject) -> str:
    """The ``<REGION_TO_CATEGORY>`` prompt for one object."""
    return "<REGION_TO_CATEGORY>" + _locs(obj.box, scene.size)


def region_target(scene: Scene, obj: SceneObject) -> str:
    """The ``<REGION_TO_CATEGORY>`` answer: the category, then the region (as the real checkpoints write it)."""
    return obj.label + _locs(obj.box, scene.size)


def _quad(box: Box, size: tuple[int, int]) -> str:
    x1, y1, x2, y2 = parse_region(_locs(box, size))
    return "".join(f"<loc_{v}>" for v in (x1, y1, x2, y1, x2, y2, x1, y2))


def ocr_target(scene: Scene) -> str:
    """The ``<OCR>`` answer: the word, or an empty string."""
    return scene.text.text if scene.text else ""


def ocr_with_region_target(scene: Scene) -> str:
    """The ``<OCR_WITH_REGION>`` answer: the word and its quadrilateral, or an empty string."""
    return scene.text.text + _quad(scene.text.box, scene.size) if scene.text else ""


def od_answer(scene: Scene) -> dict[str, list]:
    """Ground truth in the post-processed ``<OD>`` shape ``{'bboxes', 'labels'}`` (exact pixel boxes), for drawing
    with :func:`helpers.outputs.plotting.draw_answer` and for scoring."""
    ordered = sorted(scene.objects, key=lambda o: _order(o.box))
    return {"bboxes": [[float(v) for v in o.box] for o in ordered], "labels": [o.label for o in ordered]}


def ocr_with_region_answer(scene: Scene) -> dict[str, list]:
    """Ground truth in the post-processed ``<OCR_WITH_REGION>`` shape ``{'quad_boxes', 'labels'}``."""
    if scene.text is None:
        return {"quad_boxes": [], "labels": []}
    x1, y1, x2, y2 = (float(v) for v in scene.text.box)
    return {"quad_boxes": [[x1, y1, x2, y1, x2, y2, x1, y2]], "labels": [scene.text.text]}


#: Classes of :func:`label_map`: 0 is background, then every category of :data:`CATEGORIES`, then text.
LABEL_CLASSES: tuple[str, ...] = ("background", *CATEGORIES, "text")


def label_map(scene: Scene, size: tuple[int, int]) -> np.ndarray:
    """Per-pixel class ids of the scene (see :data:`LABEL_CLASSES`) sampled on a ``size`` = (width, height) grid,
    for the dense pre-training of the vision tower (:mod:`helpers.course.teaching.train`). Shapes are filled exactly as
    drawn; a word fills its box."""
    mask = Image.new("L", scene.size, 0)
    draw = ImageDraw.Draw(mask)
    for obj in scene.objects:
        fill_shape(draw, obj, 1 + CATEGORIES.index(obj.label))
    if scene.text is not None:
        x1, y1, x2, y2 = scene.text.box
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=len(LABEL_CLASSES) - 1)
    return np.asarray(mask.resize(size, Image.Resampling.NEAREST))


# ----------------------------------------------------------------------------------------------------------------
# Words for sizes and places, and the detailed captions


def _ordered(scene: Scene) -> list[SceneObject]:
    return sorted(scene.objects, key=lambda o: _order(o.box))


def size_word(scene: Scene, obj: SceneObject) -> str:
    """``small``, ``medium`` or ``large``: the shape's extent against the scene's shorter side (:data:`SIZE_LIMITS`)."""
    ratio = (obj.box[2] - obj.box[0]) / min(scene.size)
    return SIZE_WORDS[sum(ratio >= limit for limit in SIZE_LIMITS)]


def position_phrase(scene: Scene, box: Box) -> str:
    """``"at the top left"`` … ``"in the middle"`` …: the third of the picture (row, column) the box's centre is in."""
    width, height = scene.size
    column = min(2, int(3 * (box[0] + box[2]) / 2 / width))
    row = min(2, int(3 * (box[1] + box[3]) / 2 / height))
    return POSITIONS[(row, column)]


def dense_label(scene: Scene, obj: SceneObject) -> str:
    """The ``<DENSE_REGION_CAPTION>`` label: ``"large red circle"``."""
    return f"{size_word(scene, obj)} {obj.label}"


def describe(scene: Scene, obj: SceneObject) -> str:
    """The phrase the detailed captions use for one shape (and ground): ``"a large red circle"``."""
    return f"a {dense_label(scene, obj)}"


def region_description(scene: Scene, obj: SceneObject) -> str:
    """The ``<REGION_TO_DESCRIPTION>`` answer: ``"a large red circle at the top left"``."""
    return f"{describe(scene, obj)} {position_phrase(scene, obj.box)}"


def detailed_caption(scene: Scene) -> str:
    """The ``<DETAILED_CAPTION>`` answer: every shape with its size and place, left to right, then the word."""
    parts = [region_description(scene, obj) for obj in _ordered(scene)]
    if scene.text is not None:
        parts.append(f"the word {scene.text.text} {position_phrase(scene, scene.text.box)}")
    return f"The image shows {join_phrases(parts)}."


def more_detailed_caption(scene: Scene) -> str:
    """The ``<MORE_DETAILED_CAPTION>`` answer: a paragraph (how many shapes on what background, one sentence per
    shape, the word and the colour of its letters)."""
    count = len(scene.objects)
    sentences = [
        f"The image shows {NUMBER_WORDS[count]} shape{'s' if count > 1 else ''} on a {scene.background} background."
    ]
    sentences += [f"There is {region_description(scene, obj)}." for obj in _ordered(scene)]
    if scene.text is not None:
        where = position_phrase(scene, scene.text.box)
        sentences.append(f"The word {scene.text.text} is written in {scene.text.ink} letters {where}.")
    return " ".join(sentences)


# ----------------------------------------------------------------------------------------------------------------
# Targets of the other tasks


def _point_loc(x: float, y: float, size: tuple[int, int]) -> str:
    """One polygon corner as two location tokens, quantised like :func:`helpers.tasks.run.box_to_loc`."""
    width, height = size
    bx = min(999, max(0, int(x / (width / 1000))))
    by = min(999, max(0, int(y / (height / 1000))))
    return f"<loc_{bx}><loc_{by}>"


def outline(obj: SceneObject, size: tuple[int, int]) -> list[tuple[float, float]]:
    """The shape's outline polygon in pixels: a square's 4 corners, a triangle's 3, a circle's
    :data:`CIRCLE_POINTS` (on a radius a little larger than the circle's, so the polygon has the circle's area)."""
    x1, y1, x2, y2 = obj.box
    if obj.shape == "square":
        return [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
    if obj.shape == "triangle":
        return [(x1 + obj.apex * (x2 - x1), y1), (x2, y2), (x1, y2)]
    n = CIRCLE_POINTS
    radius = (x2 - x1) / 2 * math.sqrt(2 * math.pi / (n * math.sin(2 * math.pi / n)))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    width, height = size
    return [
        (min(width, max(0.0, cx + radius * math.sin(2 * math.pi * k / n))),
         min(height, max(0.0, cy - radius * math.cos(2 * math.pi * k / n))))
        for k in range(n)
    ]  # fmt: skip


def polygon_target(scene: Scene, objects: Sequence[SceneObject]) -> str:
    """The segmentation answer for ``objects``: each outline as location pairs, polygons joined by ``<sep>``."""
    return "<sep>".join("".join(_point_loc(x, y, scene.size) for x, y in outline(o, scene.size)) for o in objects)


def dense_target(scene: Scene) -> str:
    """The ``<DENSE_REGION_CAPTION>`` answer: every shape's size-colour-shape label and box, left to right."""
    return "".join(dense_label(scene, o) + _locs(o.box, scene.size) for o in _ordered(scene))


def proposal_target(scene: Scene) -> str:
    """The ``<REGION_PROPOSAL>`` answer: every shape's box, left to right, without labels."""
    return "".join(_locs(o.box, scene.size) for o in _ordered(scene))


def matching(scene: Scene, query: str) -> list[SceneObject]:
    """The shapes a query names, left to right: a category (``red circle``), a shape (``circle``) or a size,
    colour and shape (``large red circle``)."""
    return [o for o in _ordered(scene) if query in (o.label, o.shape, dense_label(scene, o))]


def open_vocabulary_target(scene: Scene, query: str) -> str:
    """The ``<OPEN_VOCABULARY_DETECTION>`` answer: the query once, then the box of every shape it names (empty
    when none)."""
    found = matching(scene, query)
    return query + "".join(_locs(o.box, scene.size) for o in found) if found else ""


def object_grounding_target(scene: Scene) -> str:
    """The grounding answer for a detailed caption: each shape's phrase (:func:`describe`) and box, in the order
    the caption names them."""
    return "".join(describe(scene, o) + _locs(o.box, scene.size) for o in _ordered(scene))


def caption_for(scene: Scene, task: str) -> str:
    """The answer of one of the three caption tasks."""
    return {"<CAPTION>": caption, "<DETAILED_CAPTION>": detailed_caption,
            "<MORE_DETAILED_CAPTION>": more_detailed_caption}[task](scene)  # fmt: skip


def polygons_answer(scene: Scene, objects: Sequence[SceneObject]) -> dict[str, list]:
    """Ground truth in the post-processed segmentation shape ``{'polygons', 'labels'}`` (exact outlines)."""
    return {"polygons": [[[v for point in outline(o, scene.size) for v in point] for o in objects]], "labels": [""]}


def examples(scene: Scene, rng: random.Random | None = None) -> list[tuple[str, str]]:
    """``(prompt, target)`` pairs for every task of :data:`TEACHING_TASKS` on this scene (grounding three times:
    once per caption level, for the caption-then-grounding cascades; ``<REGION_TO_OCR>`` only when the scene has
    a word).

    ``rng`` picks the variable parts (which phrases to ground, which object to ask about, which query to detect or
    segment); ``None`` gives the fixed choice (the full caption, the leftmost object and its category) used for
    evaluation.
    """
    scene_groups = groups(scene)
    phrases = [g.phrase for g in scene_groups]
    if rng is not None and len(phrases) > 1 and rng.random() < 0.4:
        phrases = rng.sample(phrases, rng.randint(1, len(phrases)))
    ordered = _ordered(scene)
    obj = rng.choice(ordered) if rng is not None else ordered[0]
    region_obj = rng.choice(ordered) if rng is not None else ordered[0]
    query = obj.label
    expression = obj.label
    if rng is not None:
        query = rng.choice([obj.label, obj.label, obj.label, obj.shape, rng.choice(CATEGORIES)])
        expression = rng.choice([obj.label, dense_label(scene, obj)])
    pairs = [  # the first teaching model's six tasks first, in its order
        ("<CAPTION>", caption(scene)),
        ("<OD>", od_target(scene)),
        ("<CAPTION_TO_PHRASE_GROUNDING>" + join_phrases(phrases), grounding_target(scene, phrases)),
        (region_prompt(scene, obj), region_target(scene, obj)),
        ("<OCR>", ocr_target(scene)),
        ("<OCR_WITH_REGION>", ocr_with_region_target(scene)),
        ("<DETAILED_CAPTION>", detailed_caption(scene)),
        ("<MORE_DETAILED_CAPTION>", more_detailed_caption(scene)),
        ("<DENSE_REGION_CAPTION>", dense_target(scene)),
        ("<REGION_PROPOSAL>", proposal_target(scene)),
        ("<CAPTION_TO_PHRASE_GROUNDING>" + detailed_caption(scene), object_grounding_target(scene)),
        ("<CAPTION_TO_PHRASE_GROUNDING>" + more_detailed_caption(scene), object_grounding_target(scene)),
        ("<REFERRING_EXPRESSION_SEGMENTATION>" + expression, polygon_target(scene, matching(scene, expression))),
        ("<REGION_TO_SEGMENTATION>" + _locs(region_obj.box, scene.size), polygon_target(scene, [region_obj])),
        ("<OPEN_VOCABULARY_DETECTION>" + query, open_vocabulary_target(scene, query)),
        ("<REGION_TO_DESCRIPTION>" + _locs(region_obj.box, scene.size), region_description(scene, region_obj)),
    ]
    if scene.text is not None:
        pairs.append(("<REGION_TO_OCR>" + _locs(scene.text.box, scene.size), scene.text.text))
    return pairs
