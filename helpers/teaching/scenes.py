"""Generated scenes with exact ground truth, and every task's answer written in Florence-2's own format.

A scene is one to four coloured shapes (circle, square, triangle; five colours; several sizes) on a plain or
gradient background, and in about half of the scenes one rendered word. Because the generator placed everything,
the right answer to every task is known exactly:

=================================  ==========================================================================
task                               target text (what the decoder is taught to write)
=================================  ==========================================================================
``<CAPTION>``                      ``a red circle and two blue squares``
``<OD>``                           ``red circle<loc_…>×4blue square<loc_…>×4<loc_…>×4`` (one label per group)
``<CAPTION_TO_PHRASE_GROUNDING>``  ``a red circle<loc_…>×4two blue squares<loc_…>×8`` (phrases of the input)
``<REGION_TO_CATEGORY>``           ``red circle<loc_…>×4`` (the category, then the region it was asked about)
``<OCR>``                          ``moon`` (empty when the scene has no word)
``<OCR_WITH_REGION>``              ``moon<loc_…>×8`` (a quadrilateral: top-left, top-right, bottom-right, bottom-left)
=================================  ==========================================================================

Coordinates are quantised exactly like Florence-2's post-processor (:func:`helpers.tasks.box_to_loc`), so
``processor.post_process_generation`` turns a target back into the ground-truth boxes (to within one bin).
Groups, boxes and phrases are ordered left to right, so one image has exactly one right answer per task.

Everything is deterministic: scene ``index`` of seed ``seed`` is the same picture on every machine (Python's
``random`` seeded with a string, Pillow's basic text layout). Training uses seed 0; :data:`HELD_OUT_SEED` is
kept for evaluation. Taught in ``notebooks/12_fine_tune.ipynb``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from helpers.samples import font
from helpers.tasks import box_to_loc, parse_region

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
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three", 4: "four"}

#: The tasks the teaching model is trained on (Florence-2 task tokens).
TEACHING_TASKS: tuple[str, ...] = (
    "<CAPTION>", "<OD>", "<CAPTION_TO_PHRASE_GROUNDING>", "<REGION_TO_CATEGORY>", "<OCR>", "<OCR_WITH_REGION>",
)  # fmt: skip
#: Scene sizes (width, height) drawn from when none is given: square and 4:3 both ways, like photos. The processor
#: resizes every image to the model's square input, so the model learns to read squashed shapes too.
SCENE_SIZES: tuple[tuple[int, int], ...] = ((320, 320), (320, 320), (384, 288), (288, 384), (320, 240))
#: Seed of the held-out scenes the quality script and the tests evaluate on (training uses other seeds).
HELD_OUT_SEED = 1_000_003

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class SceneObject:
    """One shape: ``box`` is its pixel extent ``(x1, y1, x2, y2)`` (x2/y2 exclusive, so width = x2 - x1)."""

    colour: str
    shape: str
    box: Box

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class SceneText:
    """One rendered word and the box of its ink."""

    text: str
    box: Box
    font_name: str


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
    """Light sky over darker grass (like ``helpers.samples.render_shapes_scene``), horizon at a random height."""
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


def make_scene(
    seed: int, index: int = 0, *, size: tuple[int, int] | None = None, word_probability: float = 0.5
) -> Scene:
    """Draw scene ``index`` of the stream ``seed``: deterministic, with exact ground truth. ``size`` (width,
    height) defaults to one of :data:`SCENE_SIZES`, picked by the seed. Taught in ``notebooks/12_fine_tune.ipynb``."""
    rng = random.Random(f"florence2-teaching-scene/{seed}/{index}/{size}")
    width, height = size = tuple(size) if size is not None else rng.choice(SCENE_SIZES)
    if width < 96 or height < 96:
        raise ValueError(f"Scenes need at least 96×96 pixels so shapes and words fit; got {width}×{height}.")
    image = _draw_background(rng, size)
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
        word = rng.choice(WORDS)
        font_name = rng.choice(FONTS)
        word_font = font(font_name, max(10, round(side * rng.uniform(0.07, 0.12))))
        left, top, right, bottom = draw.textbbox((0, 0), word, font=word_font)
        box = _place(rng, right - left, bottom - top, size, [o.box for o in objects], gap)
        if box is not None:
            region = image.crop(box).convert("L").resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))
            ink = (rng.randint(235, 255),) * 3 if region < 128 else (rng.randint(0, 40),) * 3
            draw.text((box[0] - left, box[1] - top), word, font=word_font, fill=ink)
            text = SceneText(word, box, font_name)
    return Scene(image, tuple(objects), text, seed, index)


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
    with :func:`helpers.plotting.draw_answer` and for scoring."""
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
    for the dense pre-training of the vision tower (:mod:`helpers.teaching.train`). Shapes are filled exactly as
    drawn; a word fills its box."""
    mask = Image.new("L", scene.size, 0)
    draw = ImageDraw.Draw(mask)
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        value = 1 + CATEGORIES.index(obj.label)
        if obj.shape == "circle":
            draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=value)
        elif obj.shape == "square":
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=value)
        else:
            draw.polygon([((x1 + x2 - 1) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=value)
    if scene.text is not None:
        x1, y1, x2, y2 = scene.text.box
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=len(LABEL_CLASSES) - 1)
    return np.asarray(mask.resize(size, Image.Resampling.NEAREST))


def examples(scene: Scene, rng: random.Random | None = None) -> list[tuple[str, str]]:
    """One ``(prompt, target)`` pair per task of :data:`TEACHING_TASKS` for this scene.

    ``rng`` picks the variable parts (which phrases to ground and in which order, which object's region to ask
    about); ``None`` gives the fixed choice (the full caption, the leftmost object) used for evaluation.
    """
    scene_groups = groups(scene)
    phrases = [g.phrase for g in scene_groups]
    if rng is not None and len(phrases) > 1 and rng.random() < 0.4:
        phrases = rng.sample(phrases, rng.randint(1, len(phrases)))
    ordered = sorted(scene.objects, key=lambda o: _order(o.box))
    obj = rng.choice(ordered) if rng is not None else ordered[0]
    pairs = [
        ("<CAPTION>", caption(scene)),
        ("<OD>", od_target(scene)),
        ("<CAPTION_TO_PHRASE_GROUNDING>" + join_phrases(phrases), grounding_target(scene, phrases)),
        (region_prompt(scene, obj), region_target(scene, obj)),
        ("<OCR>", ocr_target(scene)),
        ("<OCR_WITH_REGION>", ocr_with_region_target(scene)),
    ]
    return pairs
