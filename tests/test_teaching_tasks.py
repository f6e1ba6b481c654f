"""Teaching model v2: every task's target parses back through transformers' own Florence-2 post-processor into
the ground truth, the varied renderer draws what its ground truth says, and the quality scorers give a perfect
score to the ground truth and a lower one to wrong answers."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest

from helpers.course.teaching.quality import (
    AIMS,
    CASCADES,
    METRICS,
    box_recall_precision,
    mask_iou,
    mentioned_shapes,
    names_every_shape,
    score,
    shortfalls,
    task_inputs,
)
from helpers.course.teaching.scenes import (
    COLOURS,
    HELD_OUT_SEED,
    SIZE_BANDS,
    TEACHING_TASKS,
    VARIED_SIDES,
    caption_for,
    examples,
    grounding_target,
    groups,
    make_scene,
    matching,
    object_grounding_target,
    size_word,
    polygon_target,
    training_scene,
)
from helpers.tasks.run import TASKS, box_to_loc


@pytest.fixture(scope="module")
def processor():
    """A processor with the teaching model's tokenizer and post-processing rules (built offline, no weights)."""
    from helpers.course.teaching.train import build_teaching_processor

    return build_teaching_processor()


def scenes_of_both_styles(count: int) -> list:
    return [make_scene(HELD_OUT_SEED, i, style=("classic", "varied")[i % 2]) for i in range(count)]


def parse(processor, task: str, target: str, size) -> object:
    return processor.post_process_generation(f"<s>{target}</s>", task=task, image_size=size)[task]


def true_answers(processor, scenes) -> dict[str, list]:
    """What a perfect model answers on the evaluation inputs: each target, post-processed like a model's output."""
    answers: dict[str, list] = {}
    for scene in scenes:
        pairs = examples(scene)  # no rng: the evaluation's choices (full caption, leftmost object)
        seen: set[str] = set()
        for prompt, target in pairs:
            task = prompt[: prompt.index(">") + 1]
            if task in seen:  # grounding of the detailed captions: the cascades, below
                continue
            seen.add(task)
            answers.setdefault(task, []).append(parse(processor, task, target, scene.size))
        for cascade, caption_task in CASCADES.items():
            target = (grounding_target(scene, [g.phrase for g in groups(scene)]) if caption_task == "<CAPTION>"
                      else object_grounding_target(scene))  # fmt: skip
            answers.setdefault(cascade, []).append(
                parse(processor, "<CAPTION_TO_PHRASE_GROUNDING>", target, scene.size)
            )
    return answers


# ------------------------------------------------------------------------------------------------ the generator


def test_every_task_has_a_target_and_an_evaluation_input():
    assert set(TEACHING_TASKS) == set(TASKS)  # all 15 Florence-2 tasks
    scene = next(s for s in scenes_of_both_styles(10) if s.text is not None)
    tasks = [p[: p.index(">") + 1] for p, _ in examples(scene)]
    assert set(tasks) == set(TASKS)
    assert tasks.count("<CAPTION_TO_PHRASE_GROUNDING>") == 3  # one per caption level, for the cascades
    assert set(task_inputs(scene)) == {t for t, spec in TASKS.items() if spec.needs_text}


@pytest.mark.parametrize("index", range(16))
def test_targets_round_trip_through_the_real_post_processor(processor, index):
    scene = scenes_of_both_styles(16)[index]
    size = scene.size
    bin_w, bin_h = size[0] / 1000, size[1] / 1000

    def close(a, b):  # within one bin, plus the post-processor's truncation to whole pixels
        return len(a) == len(b) and all(
            abs(u - v) <= (bin_w if k % 2 == 0 else bin_h) + 1 for k, (u, v) in enumerate(zip(a, b))
        )

    ordered = sorted(scene.objects, key=lambda o: (o.box[0], o.box[1]))
    for prompt, target in examples(scene, random.Random(index)):
        task = prompt[: prompt.index(">") + 1]
        answer = parse(processor, task, target, size)
        if task == "<DENSE_REGION_CAPTION>":
            assert answer["labels"] == [f"{size_word(scene, o)} {o.label}" for o in ordered]
            assert all(close(b, o.box) for b, o in zip(answer["bboxes"], ordered))
        elif task == "<REGION_PROPOSAL>":
            assert all(close(b, o.box) for b, o in zip(answer["bboxes"], ordered)) and len(answer["bboxes"]) == len(
                ordered
            )
        elif task == "<OPEN_VOCABULARY_DETECTION>":
            query = prompt.removeprefix(task)
            found = matching(scene, query)
            assert answer["bboxes_labels"] == [query] * len(found)
            assert all(close(b, o.box) for b, o in zip(answer["bboxes"], found))
        elif task in ("<REFERRING_EXPRESSION_SEGMENTATION>", "<REGION_TO_SEGMENTATION>"):
            text = prompt.removeprefix(task)
            if task == "<REGION_TO_SEGMENTATION>":
                objects = [o for o in ordered if text == box_to_loc(o.box, size)][:1]
            else:
                objects = matching(scene, text)
            assert len(answer["polygons"][0]) == len(objects)
            assert mask_iou(answer, objects, size) >= 0.85, (task, text)
        elif task == "<CAPTION_TO_PHRASE_GROUNDING>":
            assert all(label and label in prompt for label in answer["labels"])
        elif task in ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>"):
            assert answer == caption_for(scene, task)
            assert names_every_shape(answer, scene, with_word=task != "<CAPTION>")
        # Every target survives the tokenizer unchanged (the decoder can write it).
        ids = processor.tokenizer(target)["input_ids"]
        assert processor.tokenizer.decode(ids, skip_special_tokens=False) == f"<s>{target}</s>"


def test_a_repeated_category_segments_into_one_polygon_per_shape(processor):
    scene = next(s for s in (training_scene(HELD_OUT_SEED, i) for i in range(200))
                 if any(len(g.boxes) > 1 for g in groups(s)))  # fmt: skip
    label = next(g.label for g in groups(scene) if len(g.boxes) > 1)
    answer = parse(
        processor, "<REFERRING_EXPRESSION_SEGMENTATION>", polygon_target(scene, matching(scene, label)), scene.size
    )
    assert len(answer["polygons"][0]) == len(matching(scene, label)) >= 2
    assert mask_iou(answer, matching(scene, label), scene.size) >= 0.85


def test_varied_scenes_are_deterministic_and_vary():
    a, b = make_scene(5, 9, style="varied"), make_scene(5, 9, style="varied")
    assert a.image.tobytes() == b.image.tobytes() and a.objects == b.objects and a.text == b.text
    scenes = [make_scene(HELD_OUT_SEED, i, style="varied") for i in range(30)]
    sizes = {s.size for s in scenes}
    low, high = VARIED_SIDES
    assert len(sizes) > 20 and all(low <= w <= high and low <= h <= high for w, h in sizes)
    assert {s.background for s in scenes} == {"dark", "light"}
    assert len({s.text.font_name for s in scenes if s.text}) >= 4
    assert any(o.apex != 0.5 for s in scenes for o in s.objects)  # tilted triangles
    styles = [training_scene(0, i).style for i in range(60)]
    assert 0.1 < styles.count("classic") / 60 < 0.4


@pytest.mark.parametrize("index", range(20))
def test_varied_ground_truth_matches_the_pixels(index):
    scene = make_scene(HELD_OUT_SEED, index, style="varied")
    pixels = np.asarray(scene.image).astype(int)
    side = min(scene.size)
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        assert 0 <= x1 < x2 <= scene.size[0] and 0 <= y1 < y2 <= scene.size[1]
        low, high = SIZE_BANDS[size_word(scene, obj)]
        assert low - 0.01 <= (x2 - x1) / side <= high + 0.01  # drawn sizes keep a gap between the size words
        cx, cy = (x1 + x2) // 2, (y1 + 3 * y2) // 4 if obj.shape == "triangle" else (y1 + y2) // 2
        if obj.shape == "triangle":  # the widest row, under the apex
            cx = round(x1 + (obj.apex + (0.5 - obj.apex) * 0.75) * (x2 - x1))
        patch = pixels[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3).mean(0)
        nearest = min(COLOURS, key=lambda c: np.abs(patch - np.array(COLOURS[c])).sum())
        assert nearest == obj.colour, (obj, patch)


# ------------------------------------------------------------------------------------------------ the scorers


def test_caption_scorer_on_hand_made_cases():
    scene = next(s for s in scenes_of_both_styles(40) if len(s.objects) >= 2 and s.text is not None)
    assert mentioned_shapes("two blue squares and a large red circle") == {"blue square": 2, "red circle": 1}
    detailed = caption_for(scene, "<DETAILED_CAPTION>")
    assert names_every_shape(detailed, scene, with_word=True)
    first = sorted(scene.objects, key=lambda o: (o.box[0], o.box[1]))[0]
    other = next(c for c in COLOURS if c != first.colour)
    assert not names_every_shape(detailed.replace(first.colour, other, 1), scene, with_word=True)
    assert not names_every_shape(detailed.replace(f"the word {scene.text.text}", "the word xyz"), scene, with_word=True)
    assert box_recall_precision([("a", (0, 0, 10, 10)), ("a", (50, 50, 60, 60))], [("a", (1, 1, 10, 10))]) == (1, 2, 1)
    assert box_recall_precision([("b", (0, 0, 10, 10))], [("a", (0, 0, 10, 10))]) == (0, 1, 1)


def test_scorers_give_the_ground_truth_a_perfect_score(processor):
    scenes = scenes_of_both_styles(12)
    metrics = score(scenes, true_answers(processor, scenes))
    assert set(metrics) == set(METRICS)
    for key, value in metrics.items():
        if key.endswith("mask_iou"):  # a circle's outline is a 12-gon: not quite the drawn pixels
            assert value >= 0.9, (key, value)
        else:
            assert value == pytest.approx(1.0), (key, value)
    assert shortfalls(metrics) == {}
    assert set(AIMS) == set(TASKS) | set(CASCADES)


def test_scorers_score_wrong_answers_lower(processor):
    scenes = scenes_of_both_styles(12)
    truth = true_answers(processor, scenes)
    perfect = score(scenes, truth)
    wrong = copy.deepcopy(truth)
    for task, answers in wrong.items():
        for k, answer in enumerate(answers):
            if k % 2:  # break every other scene's answer
                continue
            if isinstance(answer, str):
                answers[k] = "a green cat" if answer else "moon"
            elif answer.get("polygons"):
                answer["polygons"] = [
                    [[v + 40 for v in polygon] for polygon in instance] for instance in answer["polygons"]
                ]
            elif "quad_boxes" in answer:
                answer["labels"] = ["xyz" for _ in answer["labels"]]
            else:
                answer["bboxes"] = [[v + 60 for v in box] for box in answer["bboxes"]]
    broken = score(scenes, wrong)
    for key in METRICS:
        if key == "ocr_empty" and not any(s.text is None for s in scenes[::2]):
            continue
        assert broken[key] < perfect[key] - 0.1, (key, broken[key], perfect[key])
    assert set(shortfalls(broken)) == set(AIMS)
