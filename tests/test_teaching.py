"""The teaching model: scene generator, training loop, shipped weights, quality script, offline default."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest

from helpers.course.teaching import TEACHING_MODEL_DIR, teaching_model_available
from helpers.course.teaching.quality import average_precision, char_accuracy, edit_distance, iou, strip_locations
from helpers.course.teaching.scenes import (
    CATEGORIES,
    COLOURS,
    COUNT_WORDS,
    HELD_OUT_SEED,
    TEACHING_TASKS,
    caption,
    examples,
    groups,
    make_scene,
    od_answer,
    od_target,
    ocr_with_region_target,
    training_scene,
)


@pytest.fixture(scope="module")
def processor():
    """A processor with the teaching model's tokenizer and post-processing rules (built offline, no weights)."""
    from helpers.course.teaching.train import build_teaching_processor

    return build_teaching_processor()


# ------------------------------------------------------------------------------------------------ the generator


def test_scenes_are_deterministic():
    a, b = make_scene(7, 3), make_scene(7, 3)
    assert a.image.tobytes() == b.image.tobytes()
    assert (a.objects, a.text, a.size) == (b.objects, b.text, b.size)
    others = [make_scene(7, 4), make_scene(8, 3)]
    assert all(o.image.tobytes() != a.image.tobytes() for o in others)


@pytest.mark.parametrize("index", range(40))
def test_ground_truth_matches_the_pixels_and_the_caption(index):
    scene = make_scene(HELD_OUT_SEED, index)
    width, height = scene.size
    pixels = np.asarray(scene.image).astype(int)
    assert 1 <= len(scene.objects) <= 4
    boxes = [o.box for o in scene.objects] + ([scene.text.box] if scene.text else [])
    for x1, y1, x2, y2 in boxes:
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
    for i, a in enumerate(boxes):  # nothing overlaps, so every box is fully visible
        for b in boxes[i + 1 :]:
            assert iou(a, b) == 0.0
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        # A point surely inside the shape (a triangle is widest near its base) has the shape's colour.
        cx, cy = (x1 + x2) // 2, (y1 + 3 * y2) // 4 if obj.shape == "triangle" else (y1 + y2) // 2
        assert np.abs(pixels[cy, cx] - np.array(COLOURS[obj.colour])).max() <= 15, (obj, pixels[cy, cx])
        assert obj.label in CATEGORIES
    # The caption names every object exactly once, with the right count.
    counts = {}
    for phrase in re.split(r", | and ", caption(scene)):
        number, colour, shape = phrase.split(" ")
        count = {word: n for n, word in COUNT_WORDS.items()}[number]
        assert shape.endswith("s") == (count > 1), phrase
        counts[f"{colour} {shape.removesuffix('s')}"] = count
    expected = {}
    for obj in scene.objects:
        expected[obj.label] = expected.get(obj.label, 0) + 1
    assert counts == expected


@pytest.mark.parametrize("index", range(12))
def test_targets_parse_back_to_the_ground_truth(processor, index):
    """Florence-2's own post-processor reads every target back into the exact boxes (within one location bin)."""
    scene = make_scene(HELD_OUT_SEED, index)
    size = scene.size
    bin_w, bin_h = size[0] / 1000, size[1] / 1000

    def close(a, b):  # within one bin, plus the post-processor's truncation to whole pixels
        return all(abs(u - v) <= (bin_w if k % 2 == 0 else bin_h) + 1 for k, (u, v) in enumerate(zip(a, b)))

    parsed = processor.post_process_generation(f"<s>{od_target(scene)}</s>", task="<OD>", image_size=size)["<OD>"]
    truth = od_answer(scene)
    assert parsed["labels"] == truth["labels"]
    assert all(close(p, t) for p, t in zip(parsed["bboxes"], truth["bboxes"]))

    pairs = dict(examples(scene))
    grounding_prompt = next(p for p in pairs if p.startswith("<CAPTION_TO_PHRASE_GROUNDING>"))
    assert grounding_prompt.removeprefix("<CAPTION_TO_PHRASE_GROUNDING>") == caption(scene)
    answer = processor.post_process_generation(
        f"<s>{pairs[grounding_prompt]}</s>", task="<CAPTION_TO_PHRASE_GROUNDING>", image_size=size
    )["<CAPTION_TO_PHRASE_GROUNDING>"]
    assert answer["labels"] == [g.phrase for g in groups(scene) for _ in g.boxes]

    if scene.text is not None:
        ocr = processor.post_process_generation(
            f"<s>{ocr_with_region_target(scene)}</s>", task="<OCR_WITH_REGION>", image_size=size
        )["<OCR_WITH_REGION>"]
        assert ocr["labels"] == [scene.text.text]
        quad = ocr["quad_boxes"][0]
        x1, y1, x2, y2 = scene.text.box
        assert close(quad, [x1, y1, x2, y1, x2, y2, x1, y2])
    # Every target survives the tokenizer unchanged (the decoder can write it).
    for prompt, target in examples(scene, random.Random(index)):
        ids = processor.tokenizer(target)["input_ids"]
        assert processor.tokenizer.decode(ids, skip_special_tokens=False) == f"<s>{target}</s>"
    assert [p for p, _ in examples(scene)][0] == TEACHING_TASKS[0]


# ------------------------------------------------------------------------------------------------ the metrics


def test_metrics_on_hand_made_cases():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert edit_distance("kitten", "sitting") == 3
    assert char_accuracy("moon", "moon") == 1.0 and char_accuracy("", "") == 1.0
    assert char_accuracy("mood", "moon") == 0.75 and char_accuracy("", "cat") == 0.0
    assert strip_locations("red circle<loc_1><loc_2><loc_3><loc_4>") == "red circle"
    truths = [[("a", (0, 0, 10, 10)), ("a", (20, 20, 30, 30))], [("b", (0, 0, 10, 10))]]
    perfect = [[("a", (0, 0, 10, 10), 0.9), ("a", (20, 20, 30, 30), 0.8)], [("b", (1, 1, 10, 10), 0.7)]]
    assert average_precision(perfect, truths) == {"a": 1.0, "b": 1.0}
    # A duplicate is a false positive; ranked below the true hits it costs nothing, ranked above it costs precision.
    duplicate_low = [perfect[0] + [("a", (0, 0, 10, 10), 0.1)], perfect[1]]
    assert average_precision(duplicate_low, truths)["a"] == 1.0
    duplicate_high = [[("a", (0, 0, 10, 10), 0.95), ("a", (0, 0, 10, 10), 0.9)], []]
    assert average_precision(duplicate_high, truths)["a"] == pytest.approx(0.5)  # recall 0.5 at precision 1
    missed = [[("a", (0, 0, 10, 10), 1.0), ("a", (50, 50, 60, 60), 1.0)], [("b", (0, 0, 10, 10), 1.0)]]
    assert average_precision(missed, truths) == {"a": pytest.approx(0.25), "b": 1.0}  # one point: P 0.5 × R 0.5


# ------------------------------------------------------------------------------------------------ training


def test_five_training_steps_lower_the_loss():
    import torch

    from helpers.course.teaching.train import TrainConfig, build_model, make_batch, train, training_loss

    model, processor = build_model(seed=0)
    config = TrainConfig(steps=5, seed=0, scenes_per_step=2, learning_rate=1e-3, warmup_steps=1, pretrain_steps=0)
    seen = [training_scene(0, i) for i in range(2)]  # the first step's scenes (stage 2 starts at scene 0)

    def loss() -> float:
        with torch.no_grad():
            return training_loss(
                model, make_batch(seen, processor, random.Random("florence2-teaching-batch/0/0"))
            ).item()

    model.eval()
    before = loss()
    history = []
    losses = train(model, processor, config, log_every=5, log=lambda line: None, history=history)
    after = loss()
    assert len(losses) == 5 and all(np.isfinite(losses))
    assert after < before - 0.5, (before, after, losses)
    assert history[-1]["stage"] == 2 and "image use" in history[-1]


def test_training_is_reproducible():
    """Same seed, same steps, same thread count: the same weights, bit for bit (both stages)."""
    import torch

    from helpers.course.teaching.train import TrainConfig, build_model, train

    config = TrainConfig(steps=2, seed=3, scenes_per_step=1, pretrain_steps=1, pretrain_scenes_per_step=2)
    weights = []
    for _ in range(2):
        model, processor = build_model(seed=3)
        train(model, processor, config, log_every=0)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    """The checkpoint loads with ``torch.load(weights_only=True)`` (no pickled code) and a resumed run ends with
    the weights of an uninterrupted one."""
    import torch

    from helpers.course.teaching.train import TrainConfig, build_model, train

    config = TrainConfig(steps=2, seed=4, scenes_per_step=1, pretrain_steps=0, tasks_per_scene=3)
    model, processor = build_model(seed=4)
    train(model, processor, config, log_every=0)
    uninterrupted = model.state_dict()

    checkpoint = tmp_path / "checkpoint"
    model, processor = build_model(seed=4)
    train(model, processor, config, log_every=0, checkpoint=checkpoint, checkpoint_every=1)  # leaves step 1 behind
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    assert state["step"] == 1
    lines: list[str] = []
    model, processor = build_model(seed=4)
    train(model, processor, config, log_every=0, checkpoint=checkpoint, log=lines.append)
    assert any("resuming from step 1" in line for line in lines), lines
    resumed = model.state_dict()
    assert all(torch.equal(uninterrupted[name], resumed[name]) for name in uninterrupted)


def test_pretraining_targets_follow_the_shapes():
    from helpers.course.teaching.scenes import LABEL_CLASSES, WORDS, label_map
    from helpers.course.teaching.train import SUBCELLS, dense_targets

    scene = make_scene(HELD_OUT_SEED, 3)
    grid = 6
    patches, words = dense_targets([scene], grid)
    assert patches.shape == (1, grid * grid, SUBCELLS * SUBCELLS)
    full = label_map(scene, (grid * SUBCELLS, grid * SUBCELLS))
    # Reassembling the patches gives the label map back, and every object's class appears in it.
    rebuilt = patches[0].reshape(grid, grid, SUBCELLS, SUBCELLS).permute(0, 2, 1, 3).reshape(grid * SUBCELLS, -1)
    assert np.array_equal(rebuilt.numpy(), full)
    for obj in scene.objects:
        assert (full == LABEL_CLASSES.index(obj.label)).any()
    assert int(words[0]) == (WORDS.index(scene.text.text) if scene.text else len(WORDS))


# ------------------------------------------------------------------------------------------------ shipped model


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    assert teaching_model_available(), f"the teaching model must ship in {TEACHING_MODEL_DIR}"
    model = AutoModelForImageTextToText.from_pretrained(TEACHING_MODEL_DIR).eval()
    return model, AutoProcessor.from_pretrained(TEACHING_MODEL_DIR)


def test_shipped_model_is_small_and_native():
    files = {p.name: p.stat().st_size for p in TEACHING_MODEL_DIR.iterdir() if p.is_file()}
    assert {"config.json", "model.safetensors", "generation_config.json", "processor_config.json"} <= set(files)
    assert sum(files.values()) <= 20 * 1024 * 1024, files
    assert not any(name.endswith((".py", ".bin", ".pt")) for name in files), "native layout, safetensors only"
    assert json.loads((TEACHING_MODEL_DIR / "config.json").read_text())["model_type"] == "florence2"


def test_shipped_model_finds_the_shapes_of_held_out_scenes(shipped):
    """A real quality check: on scenes it never saw, <OD> boxes a shape with the right label at IoU >= 0.5 in most
    scenes, and the caption is often exactly right (the model card reports mAP@0.5 about 0.7 on 100 scenes)."""
    from helpers.tasks.run import run_task

    model, processor = shipped
    found, exact, answers = 0, 0, []
    for index in range(10):
        scene = make_scene(HELD_OUT_SEED, index)
        answer = run_task(model, processor, scene.image, "<OD>")["<OD>"]
        truth = list(zip(od_answer(scene)["labels"], od_answer(scene)["bboxes"]))
        found += any(
            label == t_label and iou(box, t_box) >= 0.5
            for label, box in zip(answer["labels"], answer["bboxes"])
            for t_label, t_box in truth
        )
        exact += run_task(model, processor, scene.image, "<CAPTION>")["<CAPTION>"] == caption(scene)
        answers.append((truth, answer))
    assert found >= 7, f"only {found} of 10 held-out scenes have a right box: {answers}"
    assert exact >= 4, f"only {exact} of 10 captions are exactly right"


def test_quality_script_runs_on_three_scenes(tmp_path, capsys):
    from helpers.course.teaching.quality import METRICS, main

    out = tmp_path / "quality.json"
    code = main([
        "--model", str(TEACHING_MODEL_DIR), "--scenes", "3", "--backends", "pytorch,int8",
        "--cache-dir", str(tmp_path / "converted"), "--json", str(out),
    ])  # fmt: skip
    assert code == 0
    table = capsys.readouterr().out
    assert "| <OD> mAP@0.5 |" in table and "OpenVINO int8" in table
    report = json.loads(out.read_text())
    for backend in ("pytorch", "int8"):
        results = report["results"][backend]
        assert all(0.0 <= results[key] <= 1.0 for key in METRICS), results
        assert results["od_map50"] > 0.3, results  # three held-out scenes: loose, but far above a random model


# ------------------------------------------------------------------------------------------------ offline default


def test_teaching_name_and_offline_fallback(tmp_path, monkeypatch, capsys):
    from helpers.course import checkpoints as models

    assert models.resolve_model(models.TEACHING_MODEL) == str(TEACHING_MODEL_DIR)
    monkeypatch.setenv("FLORENCE2_MODELS_DIR", str(tmp_path / "cache"))  # nothing converted there
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    assert models.resolve_model(models.DEFAULT_MODEL) == str(TEACHING_MODEL_DIR)
    printed = capsys.readouterr().out
    assert "hub is unreachable" in printed and "TEACHING model" in printed


def test_the_word_heads_read_where_the_word_is_written():
    """The tokens of the cells the word's box covers decide what the word heads see; a scene without a word gives the
    pooled token. (v3's heads read only the pooled token, and v3 never learned to read.)"""
    import torch

    from helpers.course.teaching.train import TEXT_CLASS, dense_targets, word_features

    scenes = [training_scene(5, i) for i in range(40)]
    worded = next(i for i, s in enumerate(scenes) if s.text is not None)
    plain = next(i for i, s in enumerate(scenes) if s.text is None)
    dense, _ = dense_targets([scenes[worded], scenes[plain]], 6)
    tokens = torch.randn(2, 1 + 36, 8)
    text_cells = (dense[0] == TEXT_CLASS).any(-1)
    assert text_cells.any() and not text_cells.all()
    features = word_features(tokens, dense)
    assert torch.allclose(features[0], tokens[0, 1:][text_cells].mean(0))
    assert torch.equal(features[1], tokens[1, 0])
    moved = tokens.clone()
    moved[0, 0] += 5.0  # the pooled token
    moved[0, 1:][~text_cells] += 5.0  # and every cell away from the word
    assert torch.allclose(word_features(moved, dense)[0], features[0])
