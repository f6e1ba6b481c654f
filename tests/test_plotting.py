"""helpers.outputs.plotting: what gets drawn where, robustness on any model output, and the matplotlib wrapper."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from helpers.outputs.plotting import ANSWER_KINDS, PALETTE, answer_kind, draw_answer, plot_answer
from helpers.tasks.run import ANSWER_KEYS, TASKS

GREY = (128, 128, 128)
SIZE = (200, 150)


@pytest.fixture
def grey() -> Image.Image:
    return Image.new("RGB", SIZE, GREY)


def px(image: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return image.getpixel((x, y))


def changed(image: Image.Image) -> np.ndarray:
    """Mask of pixels that differ from the uniform grey input."""
    return np.any(np.asarray(image) != np.array(GREY, dtype=np.uint8), axis=-1)


# --- answer_kind ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        ("a cat on a mat", "text"),
        ("", "text"),
        ({"bboxes": [[1, 2, 3, 4]], "labels": ["cat"]}, "bboxes"),
        ({"bboxes": [], "labels": []}, "bboxes"),
        ({"bboxes": np.zeros((0, 4)), "labels": []}, "bboxes"),
        ({"polygons": [[[1, 2, 3, 4, 5, 6]]], "labels": [""]}, "polygons"),
        ({"bboxes": [], "bboxes_labels": [], "polygons": [], "polygons_labels": []}, "open_vocabulary"),
        ({"quad_boxes": [[0, 0, 9, 0, 9, 9, 0, 9]], "labels": ["hi"]}, "quad_boxes"),
        ({"<OD>": {"bboxes": [], "labels": []}}, "bboxes"),  # the whole post_process_generation result
        ({"<CAPTION>": "a cat"}, "text"),
    ],
)
def test_answer_kind(answer: object, kind: str) -> None:
    assert answer_kind(answer) == kind
    assert kind in ANSWER_KINDS


def test_drawing_and_the_task_table_share_one_answer_vocabulary() -> None:
    """Each task's ``answer_kind`` is what answer_kind() calls an answer with that task's keys."""
    assert set(ANSWER_KINDS) == set(ANSWER_KEYS)
    for token, spec in TASKS.items():
        keys = ANSWER_KEYS[spec.answer_kind]
        answer = {key: [] for key in keys} if keys else "text"
        assert answer_kind(answer) == spec.answer_kind, token
        assert token in ANSWER_KINDS[spec.answer_kind]


@pytest.mark.parametrize(
    "answer",
    [None, 42, 3.5, [], [[1, 2, 3, 4]], {}, {"foo": 1}, {"bboxes": "1 2 3 4"}, {"labels": ["x"]}, {"a": 1, "b": 2}],
)
def test_not_an_answer_raises_naming_the_shapes(grey: Image.Image, answer: object) -> None:
    with pytest.raises(ValueError, match="bboxes") as error:
        answer_kind(answer)
    for key in ("quad_boxes", "polygons", "bboxes_labels", "str"):
        assert key in str(error.value)
    with pytest.raises(ValueError, match="Not a Florence-2 answer"):
        draw_answer(grey, "<OD>", answer)


# --- what is drawn where ----------------------------------------------------------------------------------------


def test_box_outline_drawn_and_far_pixels_untouched(grey: Image.Image) -> None:
    out = draw_answer(grey, "<REGION_PROPOSAL>", {"bboxes": [[40, 40, 120, 100]], "labels": [""]}, line_width=3)
    for x, y in [(40, 70), (41, 70), (120, 70), (80, 40), (80, 100), (40, 40), (120, 100)]:
        assert px(out, x, y) != GREY, (x, y)
    for x, y in [(80, 70), (45, 70), (115, 95), (5, 5), (199, 149), (150, 70), (80, 130)]:
        assert px(out, x, y) == GREY, (x, y)
    # Nothing but the outline changed: its area is about the perimeter times the line width.
    assert 3 * 2 * (80 + 60) * 0.8 < changed(out).sum() < 3 * 2 * (80 + 60) * 1.2


def test_label_drawn_above_the_box_with_contrasting_text(grey: Image.Image) -> None:
    plain = draw_answer(grey, "<OD>", {"bboxes": [[40, 60, 120, 100]], "labels": [""]})
    labelled = draw_answer(grey, "<OD>", {"bboxes": [[40, 60, 120, 100]], "labels": ["cat"]})
    new = changed(labelled) & ~changed(plain)
    ys, xs = np.nonzero(new)
    assert new.sum() > 100
    assert ys.max() < 60 and xs.min() >= 40  # the label box sits on top of the box's top-left corner
    colours = {tuple(c) for c in np.asarray(labelled)[new]}
    assert len(colours) > 2  # a filled background plus text in another colour (and anti-aliasing)


def test_labels_never_show_location_tokens(grey: Image.Image) -> None:
    """A region task's answer repeats its region as <loc_N> tokens; drawn as a label, only the words remain."""
    box = [[40, 60, 120, 100]]
    raw = draw_answer(grey, "<OD>", {"bboxes": box, "labels": ["blue square<loc_191><loc_108><loc_505><loc_344>"]})
    words = draw_answer(grey, "<OD>", {"bboxes": box, "labels": ["blue square"]})
    assert np.array_equal(np.asarray(raw), np.asarray(words))


def test_a_label_wider_than_the_image_is_shortened_to_fit(grey: Image.Image) -> None:
    """Text never runs off the picture: the label's last columns are its padding (one colour), not cut glyphs."""
    long_label = "abcdefghijklmnopqrstuvwxyz" * 2  # no spaces: glyphs everywhere along the line
    out = draw_answer(grey, "<OD>", {"bboxes": [[10, 60, 60, 100]], "labels": [long_label]})
    plain = draw_answer(grey, "<OD>", {"bboxes": [[10, 60, 60, 100]], "labels": [""]})
    label = changed(out) & ~changed(plain)
    rows = np.nonzero(label.any(axis=1))[0]
    right_edge = np.asarray(out)[rows][:, -2:].reshape(-1, 3)
    assert len({tuple(p) for p in right_edge}) == 1, "glyphs reach the image's edge: the label runs off the picture"


def test_label_moves_inside_when_no_room_above(grey: Image.Image) -> None:
    out = draw_answer(grey, "<OD>", {"bboxes": [[30, 0, 150, 120]], "labels": ["at the top"]})
    ys, _ = np.nonzero(changed(out))
    assert ys.min() == 0 and changed(out)[5:20, 40:60].any()


def test_polygon_fill_blends_interior_and_can_be_turned_off(grey: Image.Image) -> None:
    answer = {"polygons": [[[20, 20, 180, 20, 100, 140]]], "labels": ["roof"]}
    filled = draw_answer(grey, "<REFERRING_EXPRESSION_SEGMENTATION>", answer, colors=["#ff0000"])
    inside = px(filled, 100, 60)
    assert inside != GREY
    assert inside[0] > GREY[0] and inside[1] < GREY[1]  # blended towards red, not painted over
    assert px(filled, 190, 140) == GREY  # outside the triangle
    hollow = draw_answer(grey, "<REFERRING_EXPRESSION_SEGMENTATION>", answer, fill_polygons=False)
    assert px(hollow, 100, 60) == GREY
    assert px(hollow, 100, 20) != GREY  # the outline is still there


def test_polygon_with_several_parts_fills_each(grey: Image.Image) -> None:
    answer = {"polygons": [[[10, 10, 50, 10, 50, 50, 10, 50], [120, 80, 180, 80, 180, 140, 120, 140]]], "labels": [""]}
    out = draw_answer(grey, "<REGION_TO_SEGMENTATION>", answer)
    assert px(out, 30, 30) != GREY and px(out, 150, 110) != GREY and px(out, 90, 70) == GREY


def test_quad_boxes_outlined_not_filled(grey: Image.Image) -> None:
    answer = {"quad_boxes": [[30, 60, 170, 50, 175, 110, 35, 120]], "labels": [""]}
    out = draw_answer(grey, "<OCR_WITH_REGION>", answer, line_width=2)
    assert px(out, 100, 55) != GREY  # on the slanted top edge
    assert px(out, 100, 85) == GREY  # inside: text must stay readable


def test_open_vocabulary_draws_boxes_and_polygons(grey: Image.Image) -> None:
    answer = {
        "bboxes": [[10, 10, 60, 60]],
        "bboxes_labels": ["a"],
        "polygons": [[[120, 80, 190, 80, 190, 140]]],
        "polygons_labels": ["b"],
    }
    out = draw_answer(grey, "<OPEN_VOCABULARY_DETECTION>", answer)
    assert px(out, 10, 35) != GREY and px(out, 180, 110) != GREY


def test_text_answer_returns_an_unchanged_copy(grey: Image.Image) -> None:
    out = draw_answer(grey, "<CAPTION>", "a grey square")
    assert out is not grey and out.tobytes() == grey.tobytes()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_original_image_is_never_modified(mode: str) -> None:
    image = Image.new("RGB", SIZE, GREY).convert(mode)
    before = image.tobytes()
    answer = {"polygons": [[[20, 20, 180, 20, 100, 140]]], "labels": ["x"]}
    out = draw_answer(image, "<REFERRING_EXPRESSION_SEGMENTATION>", answer)
    assert image.tobytes() == before and image.mode == mode
    assert out.mode == "RGB" and out.size == SIZE and out.tobytes() != image.convert("RGB").tobytes()


def test_numpy_image_and_path_accepted(grey: Image.Image, tmp_path: Path) -> None:
    answer = {"bboxes": [[40, 40, 120, 100]], "labels": ["x"]}
    array = np.asarray(grey).copy()
    expected = draw_answer(grey, "<OD>", answer).tobytes()
    assert draw_answer(array, "<OD>", answer).tobytes() == expected
    assert (array == GREY).all()
    grey.save(tmp_path / "grey.png")
    assert draw_answer(tmp_path / "grey.png", "<OD>", answer).tobytes() == expected
    with pytest.raises(TypeError, match="PIL.Image"):
        draw_answer(12, "<OD>", answer)


def test_swapped_corners_draw_the_same_box(grey: Image.Image) -> None:
    a = draw_answer(grey, "<OD>", {"bboxes": [[40, 40, 120, 100]], "labels": ["x"]})
    b = draw_answer(grey, "<OD>", {"bboxes": [[120, 100, 40, 40]], "labels": ["x"]})
    assert a.tobytes() == b.tobytes()


def test_zero_area_box_still_visible(grey: Image.Image) -> None:
    out = draw_answer(grey, "<OD>", {"bboxes": [[50, 20, 50, 80]], "labels": [""]}, line_width=1)
    assert px(out, 50, 50) != GREY and px(out, 60, 50) == GREY


def test_box_partly_outside_is_clipped_to_the_border(grey: Image.Image) -> None:
    out = draw_answer(grey, "<OD>", {"bboxes": [[-500, 50, 100, 5000]], "labels": [""]}, line_width=2)
    assert px(out, 0, 100) != GREY and px(out, 100, 100) != GREY and px(out, 50, 100) == GREY


@pytest.mark.parametrize(
    "box",
    [[300, 300, 400, 400], [-90, -90, -10, -10], [1e300, 0, 2e300, 10], [math.nan, 10, 50, 50], [10, 10, math.inf, 50]],
)
def test_unusable_box_is_skipped(grey: Image.Image, box: list[float]) -> None:
    out = draw_answer(grey, "<OD>", {"bboxes": [box, [40, 40, 120, 100]], "labels": ["bad", "good"]})
    reference = draw_answer(grey, "<OD>", {"bboxes": [[40, 40, 120, 100]], "labels": ["good"]})
    assert out.tobytes() == reference.tobytes()


def test_non_finite_polygon_points_are_dropped(grey: Image.Image) -> None:
    clean = draw_answer(grey, "<REGION_TO_SEGMENTATION>", {"polygons": [[[20, 20, 180, 20, 100, 140]]], "labels": [""]})
    dirty = draw_answer(
        grey,
        "<REGION_TO_SEGMENTATION>",
        {"polygons": [[[20, 20, math.nan, 5, 180, 20, 100, 140, math.inf, 1, 7]]], "labels": [""]},  # odd count too
    )
    assert dirty.tobytes() == clean.tobytes()


def test_mismatched_label_counts(grey: Image.Image) -> None:
    boxes = [[10, 30, 60, 80], [100, 30, 150, 80]]
    few = draw_answer(grey, "<OD>", {"bboxes": boxes, "labels": ["one"]})
    assert px(few, 100, 55) != GREY  # the box without a label is still drawn
    many = draw_answer(grey, "<OD>", {"bboxes": boxes[:1], "labels": ["one", "two", "three"]})
    assert px(many, 100, 55) == GREY
    none = draw_answer(grey, "<OD>", {"bboxes": boxes})
    assert px(none, 10, 55) != GREY and px(none, 100, 55) != GREY


def test_scores_are_shown_next_to_the_label(grey: Image.Image) -> None:
    without = draw_answer(grey, "<OD>", {"bboxes": [[10, 60, 190, 140]], "labels": ["cat"]})
    scored = draw_answer(grey, "<OD>", {"bboxes": [[10, 60, 190, 140]], "labels": ["cat"], "scores": [0.93]})
    assert changed(scored).sum() > changed(without).sum()  # a wider label box
    assert px(scored, 10, 100) == px(without, 10, 100)  # same colour: it depends on the label, not the score


def test_colour_per_label_is_consistent(grey: Image.Image) -> None:
    first = draw_answer(grey, "<OD>", {"bboxes": [[10, 30, 60, 80], [100, 30, 150, 80]], "labels": ["cat", "dog"]})
    second = draw_answer(
        Image.new("RGB", (300, 300), (0, 0, 0)), "<OD>", {"bboxes": [[200, 200, 280, 280]], "labels": ["dog"]}
    )
    assert px(first, 100, 55) == px(second, 200, 240)  # "dog" keeps its colour in another image, in another place
    assert px(first, 10, 55) != px(first, 100, 55)  # two labels in one image get different colours
    repeated = draw_answer(grey, "<OD>", {"bboxes": [[10, 30, 60, 80], [100, 30, 150, 80]], "labels": ["dog", "dog"]})
    assert px(repeated, 10, 55) == px(repeated, 100, 55)


def test_many_labels_get_distinct_colours_until_the_palette_runs_out(grey: Image.Image) -> None:
    n = len(PALETTE)
    boxes = [[5 + 15 * i, 10, 12 + 15 * i, 140] for i in range(n)]
    out = draw_answer(grey, "<OD>", {"bboxes": boxes, "labels": [f"class {i}" for i in range(n)]}, line_width=1)
    assert len({px(out, 5 + 15 * i, 100) for i in range(n)}) == n


def test_explicit_colours(grey: Image.Image) -> None:
    answer = {"bboxes": [[10, 30, 60, 80], [100, 30, 150, 80]], "labels": ["dog", "cat"]}
    out = draw_answer(grey, "<OD>", answer, colors={"cat": "#00ff00"})
    assert px(out, 100, 55) == (0, 255, 0)
    out = draw_answer(grey, "<OD>", answer, colors=[(255, 0, 0)])
    assert px(out, 10, 55) == (255, 0, 0) and px(out, 100, 55) == (255, 0, 0)  # one colour for all


@pytest.mark.parametrize(
    "kwargs",
    [
        {"colors": ["not-a-colour"]},
        {"colors": []},
        {"colors": [(1, 2)]},
        {"line_width": 0},
        {"font_size": -3},
        {"line_width": math.nan},
    ],
)
def test_bad_options_raise_with_the_fix(grey: Image.Image, kwargs: dict) -> None:
    with pytest.raises(ValueError, match="colou?r|positive"):
        draw_answer(grey, "<OD>", {"bboxes": [[10, 10, 50, 50]], "labels": ["x"]}, **kwargs)


def test_long_and_unicode_labels_are_drawn_within_the_image(grey: Image.Image) -> None:
    long = "a very long dense region caption " * 20
    for label in [long, "Grüße — 東京 🐱 \u200b\x00\n tab\t", None, 17]:
        out = draw_answer(grey, "<DENSE_REGION_CAPTION>", {"bboxes": [[150, 100, 199, 149]], "labels": [label]})
        assert out.size == SIZE
    out = draw_answer(grey, "<DENSE_REGION_CAPTION>", {"bboxes": [[150, 100, 199, 149]], "labels": [long]})
    _, xs = np.nonzero(changed(out))
    assert xs.min() < 150  # shifted left so the (shortened) label stays readable inside the image


def test_real_post_processed_answers(grey: Image.Image, tmp_path: Path) -> None:
    """Answers straight from transformers' Florence2Processor.post_process_generation are drawn."""
    from helpers.course.tiny import build_processor, build_tokenizer

    processor = build_processor(build_tokenizer(tmp_path), 768)
    loc = "<loc_250><loc_250><loc_750><loc_750>"
    cases = {
        "<OD>": f"cat{loc}",
        "<REGION_PROPOSAL>": loc,
        "<CAPTION_TO_PHRASE_GROUNDING>": f"a cat{loc}",
        "<REFERRING_EXPRESSION_SEGMENTATION>": "<loc_250><loc_250><loc_750><loc_250><loc_750><loc_750><loc_250><loc_750>",
        "<OPEN_VOCABULARY_DETECTION>": f"cat{loc}",
        "<OCR_WITH_REGION>": "hi<loc_250><loc_250><loc_750><loc_250><loc_750><loc_750><loc_250><loc_750>",
        "<CAPTION>": "a grey square",
    }
    for task, text in cases.items():
        result = processor.post_process_generation(text=text, task=task, image_size=SIZE)
        out = draw_answer(grey, task, result[task])
        assert (px(out, 50, 75) != GREY) == (task != "<CAPTION>"), task  # the left edge at x = 0.25 * 200
        assert draw_answer(grey, task, result).tobytes() == out.tobytes()  # the whole dict works too


# --- never crash on arbitrary model output ----------------------------------------------------------------------

coordinate = st.one_of(
    st.floats(-20, 220),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(),
    st.text(max_size=3),
)
coordinates = st.lists(coordinate, max_size=12)
label = st.one_of(st.none(), st.text(max_size=80), st.integers(), st.just(""))
labels = st.one_of(st.lists(label, max_size=6), st.none(), st.text(max_size=5))
polygon_instance = st.one_of(st.lists(coordinates, max_size=3), coordinates)
answers = st.one_of(
    st.text(max_size=50),
    st.fixed_dictionaries(
        {"bboxes": st.lists(coordinates, max_size=6), "labels": labels},
        optional={"scores": st.lists(st.one_of(st.floats(allow_nan=True), st.none()), max_size=6)},
    ),
    st.fixed_dictionaries({"polygons": st.lists(polygon_instance, max_size=5), "labels": labels}),
    st.fixed_dictionaries(
        {
            "bboxes": st.lists(coordinates, max_size=4),
            "bboxes_labels": labels,
            "polygons": st.lists(polygon_instance, max_size=4),
            "polygons_labels": labels,
        }
    ),
    st.fixed_dictionaries({"quad_boxes": st.lists(coordinates, max_size=6), "labels": labels}),
)
image_sizes = st.sampled_from([(64, 48), (1, 1), (17, 90), (0, 0)])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answer=answers, size=image_sizes, fill=st.booleans())
def test_draw_answer_never_raises(answer: object, size: tuple[int, int], fill: bool) -> None:
    image = Image.new("RGB", size, GREY)
    out = draw_answer(image, "<TASK>", answer, fill_polygons=fill)
    assert out.mode == "RGB" and out.size == size
    assert image.tobytes() == Image.new("RGB", size, GREY).tobytes()


far_left = st.floats(-1e9, -20)
outside_answers = st.one_of(
    st.fixed_dictionaries(
        {"bboxes": st.lists(st.lists(far_left, min_size=4, max_size=4), max_size=4), "labels": labels}
    ),
    st.fixed_dictionaries(
        {
            "polygons": st.lists(st.lists(st.lists(far_left, min_size=6, max_size=12), max_size=2), max_size=3),
            "labels": labels,
        }
    ),
    st.fixed_dictionaries(
        {"quad_boxes": st.lists(st.lists(far_left, min_size=8, max_size=8), max_size=4), "labels": labels}
    ),
)


@settings(max_examples=60, deadline=None)
@given(answer=outside_answers)
def test_shapes_entirely_outside_the_image_draw_nothing(answer: dict) -> None:
    image = Image.new("RGB", (64, 48), GREY)
    assert draw_answer(image, "<TASK>", answer, line_width=2).tobytes() == image.tobytes()


# --- plot_answer --------------------------------------------------------------------------------------------------


@pytest.fixture
def pyplot():
    """pyplot with only the figures each test makes closed afterwards (nothing the user made)."""
    import matplotlib.pyplot as plt

    before = set(plt.get_fignums())
    yield plt
    for number in set(plt.get_fignums()) - before:
        plt.close(number)


def test_plot_answer_shows_text_answers_as_caption(grey: Image.Image, pyplot) -> None:
    import matplotlib

    backend = matplotlib.get_backend()
    fig = plot_answer(grey, "<CAPTION>", "A grey square on nothing at all.")
    (ax,) = fig.axes
    assert ax.get_title() == "<CAPTION>"
    assert "A grey square on nothing at all." in ax.get_xlabel()
    assert np.asarray(ax.images[0].get_array()).shape[:2] == (SIZE[1], SIZE[0])
    assert matplotlib.get_backend() == backend


def test_plot_answer_draws_into_given_axes_without_new_figures(grey: Image.Image, pyplot) -> None:
    mine, (left, right) = pyplot.subplots(1, 2)
    numbers = pyplot.get_fignums()
    answer = {"bboxes": [[40, 40, 120, 100]], "labels": ["cat"]}
    fig = plot_answer(grey, "<OD>", answer, title="detections", ax=right)
    assert fig is mine and pyplot.get_fignums() == numbers and pyplot.fignum_exists(mine.number)
    assert right.get_title() == "detections" and "1 box" in right.get_xlabel() and not left.images
    shown = np.asarray(right.images[0].get_array())
    assert np.array_equal(shown, np.asarray(draw_answer(grey, "<OD>", answer)))


def test_plot_answer_long_caption_is_wrapped_and_bad_input_raises(grey: Image.Image, pyplot) -> None:
    fig = plot_answer(grey, "<MORE_DETAILED_CAPTION>", "word " * 400)
    lines = fig.axes[0].get_xlabel().splitlines()
    assert 1 < len(lines) <= 13 and max(map(len, lines)) <= 90
    with pytest.raises(ValueError, match="Not a Florence-2 answer"):
        plot_answer(grey, "<OD>", [1, 2, 3])
    with pytest.raises(TypeError, match="Axes"):
        plot_answer(grey, "<OD>", "x", ax="not axes")
