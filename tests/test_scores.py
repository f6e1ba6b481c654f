"""helpers.outputs.scores: confidence scores from token probabilities, the same on PyTorch and OpenVINO."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from helpers.convert.conversion import convert_florence2
from helpers.runtime.ov_model import EXACT_CONFIG, OVFlorence2Model
from helpers.outputs.scores import (
    SCORED_TASKS,
    find_instances,
    run_task_with_scores,
    run_tasks_batch_with_scores,
    score_answer,
    token_log_probs,
)
from helpers.tasks.run import TASKS, run_task

TEXT = {
    "<CAPTION_TO_PHRASE_GROUNDING>": "A red car next to a green tree",
    "<OPEN_VOCABULARY_DETECTION>": "a bicycle",
    "<REFERRING_EXPRESSION_SEGMENTATION>": "the red car",
    "<REGION_TO_SEGMENTATION>": "<loc_100><loc_150><loc_600><loc_700>",
}
SCORE_KEYS = ("scores", "bboxes_scores", "polygons_scores")


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny_ov_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> OVFlorence2Model:
    folder = convert_florence2(tiny_model_dir, tmp_path_factory.mktemp("ov") / "tiny-fp32", "fp32", verbose=False)
    return OVFlorence2Model(folder, "CPU", EXACT_CONFIG)


def instance_counts(answer: dict) -> dict[str, int]:
    """Score key → number of instances it must cover."""
    if "bboxes_labels" in answer:
        return {"bboxes_scores": len(answer["bboxes"]), "polygons_scores": len(answer["polygons"])}
    for key in ("bboxes", "polygons", "quad_boxes"):
        if key in answer:
            return {"scores": len(answer[key])}
    raise AssertionError(f"not an instance answer: {answer}")


def without_scores(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if k not in SCORE_KEYS}


# ---- the token → instance reading agrees with transformers' post-processor -------------------------------------


def answer_shapes(answer: dict) -> list[tuple[str, str, tuple]]:
    """(kind, label, bins) of every instance; at image size 1000×1000 a pixel coordinate equals its bin."""
    if "quad_boxes" in answer:
        return [("quad_boxes", lab, (tuple(q),)) for q, lab in zip(answer["quad_boxes"], answer["labels"])]
    if "bboxes_labels" in answer:
        return [("bboxes", lab, (tuple(b),)) for b, lab in zip(answer["bboxes"], answer["bboxes_labels"])] + [
            ("polygons", lab, tuple(map(tuple, p))) for p, lab in zip(answer["polygons"], answer["polygons_labels"])
        ]
    if "polygons" in answer:
        return [("polygons", lab, tuple(map(tuple, p))) for p, lab in zip(answer["polygons"], answer["labels"])]
    return [("bboxes", lab, (tuple(b),)) for b, lab in zip(answer["bboxes"], answer["labels"])]


def _pool(processor) -> list[int]:
    tok = processor.tokenizer
    text = tok.convert_tokens_to_ids(tok.tokenize(" car red it the image\n a<b loc_7> poly é  "))
    structure = tok.convert_tokens_to_ids(["<poly>", "</poly>", "<sep>", "<s>", "</s>", "<pad>", "<od>"])
    locs = tok.convert_tokens_to_ids([f"<loc_{v}>" for v in (0, 7, 500, 999)])
    return text + structure + locs * 4  # location tokens often, so that many sequences hold instances


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_instances_are_exactly_the_post_processors(tiny_processor, data) -> None:
    """On arbitrary token soup (labels with line breaks, split characters, stray tags, odd polygons) the instances
    found in the tokens are the post-processed answer's: same kinds, order, bins and labels."""
    pool = _pool(tiny_processor)
    body = data.draw(st.lists(st.sampled_from(pool), max_size=40))
    ids = [2, 0, *body, 2]
    text = tiny_processor.batch_decode([ids], skip_special_tokens=False)[0]
    same_text = text == tiny_processor.post_processor.decode_with_spans(ids)[0]
    for task in SCORED_TASKS:
        answer = tiny_processor.post_process_generation(text, task=task, image_size=(1000, 1000))[task]
        expected = answer_shapes(answer)
        found = find_instances(tiny_processor, ids, task)
        assert [(i.kind, i.shapes) for i in found] == [(k, s) for k, _, s in expected], (task, text)
        if same_text:  # a character split over two tokens reads as two replacement characters token by token
            assert [i.label for i in found] == [lab for _, lab, _ in expected], (task, text)
        for instance in found:
            assert instance.tokens and all(1 <= t < len(ids) for t in instance.tokens)
            names = tiny_processor.tokenizer.convert_ids_to_tokens([ids[t] for t in instance.tokens])
            locs = [name for name in names if name.startswith("<loc_")]
            assert len(locs) >= sum(len(shape) for shape in instance.shapes)


def test_two_boxes_of_one_label_share_the_label_tokens(tiny_processor) -> None:
    tok = tiny_processor.tokenizer
    label = tok.convert_tokens_to_ids(tok.tokenize("red car"))
    locs = tok.convert_tokens_to_ids([f"<loc_{v}>" for v in (1, 2, 3, 4, 5, 6, 7, 8)])
    ids = [2, 0, *label, *locs, 2]
    first, second = find_instances(tiny_processor, ids, "<OD>")
    n = len(label)
    assert first.label == second.label == "red car"
    assert first.tokens == tuple(range(2, 2 + n + 4))
    assert second.tokens == tuple(range(2, 2 + n)) + tuple(range(2 + n + 4, 2 + n + 8))
    assert find_instances(tiny_processor, ids, "<REGION_PROPOSAL>")[0].tokens == tuple(range(2 + n, 2 + n + 4))


# ---- real generations: PyTorch and OpenVINO --------------------------------------------------------------------

CASES = [
    ("<OD>", 1), ("<OD>", 3), ("<REGION_PROPOSAL>", 1), ("<OCR_WITH_REGION>", 1), ("<CAPTION_TO_PHRASE_GROUNDING>", 1),
    ("<OPEN_VOCABULARY_DETECTION>", 1), ("<REFERRING_EXPRESSION_SEGMENTATION>", 3),
]  # fmt: skip


@pytest.mark.slow
def test_pytorch_and_openvino_give_the_same_scores(tiny_processor, tiny_torch_model, tiny_ov_model) -> None:
    instances = 0
    for seed, (task, num_beams) in enumerate(CASES):
        image = noise_image(120, 80, seed)
        kwargs = {"max_new_tokens": 24, "num_beams": num_beams}
        expected = run_task_with_scores(tiny_torch_model, tiny_processor, image, task, TEXT.get(task), **kwargs)[task]
        got = run_task_with_scores(tiny_ov_model, tiny_processor, image, task, TEXT.get(task), **kwargs)[task]
        plain = run_task(tiny_ov_model, tiny_processor, image, task, TEXT.get(task), **kwargs)[task]
        assert without_scores(got) == plain, f"{task}: scores changed the answer"
        assert without_scores(expected) == plain
        for key, count in instance_counts(plain).items():
            assert len(got[key]) == len(expected[key]) == count, (task, key)
            assert all(0.0 <= s <= 1.0 for s in got[key]), (task, got[key])
            np.testing.assert_allclose(got[key], expected[key], atol=1e-4, err_msg=f"{task} beams={num_beams}")
            instances += count
    assert instances >= 5, "too few instances generated for the comparison to mean anything"


def test_batch_scores_equal_single_image_scores(tiny_processor, tiny_ov_model) -> None:
    images = [noise_image(120, 80, 1), noise_image(60, 150, 2)]
    kwargs = {"max_new_tokens": 24, "num_beams": 1}
    batch = run_tasks_batch_with_scores(tiny_ov_model, tiny_processor, images, "<OD>", **kwargs)
    for image, result in zip(images, batch):
        single = run_task_with_scores(tiny_ov_model, tiny_processor, image, "<OD>", **kwargs)
        assert without_scores(result["<OD>"]) == without_scores(single["<OD>"])
        np.testing.assert_allclose(result["<OD>"]["scores"], single["<OD>"]["scores"], atol=1e-5)


def test_min_is_at_most_the_geometric_mean(tiny_processor, tiny_ov_model) -> None:
    inputs = tiny_processor(text="<OD>", images=noise_image(120, 80, 0), return_tensors="pt")
    output = tiny_ov_model.generate(**inputs, max_new_tokens=24, num_beams=3, output_scores=True,
                                    return_dict_in_generate=True)  # fmt: skip
    ids = output.sequences[0].tolist()
    log_probs = token_log_probs(output)[0].tolist()
    text = tiny_processor.batch_decode([ids], skip_special_tokens=False)[0]
    answer = tiny_processor.post_process_generation(text, task="<OD>", image_size=(120, 80))["<OD>"]
    mean = score_answer(tiny_processor, ids, log_probs, "<OD>", answer)["scores"]
    low = score_answer(tiny_processor, ids, log_probs, "<OD>", answer, reduce="min")["scores"]
    assert mean and len(mean) == len(low)
    for instance, m, lo in zip(find_instances(tiny_processor, ids, "<OD>"), mean, low):
        probs = [math.exp(log_probs[t - 1]) for t in instance.tokens]
        assert lo == pytest.approx(min(probs)) and m == pytest.approx(math.prod(probs) ** (1 / len(probs)))
        assert lo <= m + 1e-12


# ---- forced sequences: certainty scores 1, a coin flip on every location scores as defined ---------------------


class ForceSequence(LogitsProcessor):
    """Makes generate write ``target`` (one token per step). With ``tie_locations``, every location token shares
    the top score with one other token, so its probability is exactly 1/2 (greedy keeps the lower id: the target)."""

    def __init__(self, target: list[int], location_ids: set[int], tie_locations: bool = False) -> None:
        self.target, self.location_ids, self.tie = target, location_ids, tie_locations

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - 1  # the decoder start token is already there
        forced = torch.full_like(scores, -float("inf"))
        token = self.target[min(step, len(self.target) - 1)]
        forced[:, token] = 0.0
        if self.tie and token in self.location_ids:
            forced[:, scores.shape[-1] - 1] = 0.0
        return forced


@pytest.mark.parametrize("tie", [False, True], ids=["certain", "coin-flip-locations"])
def test_forced_sequence_scores_as_defined(tiny_processor, tiny_ov_model, tie) -> None:
    tok = tiny_processor.tokenizer
    label = tok.convert_tokens_to_ids(tok.tokenize("red car"))
    locs = tok.convert_tokens_to_ids(["<loc_10>", "<loc_20>", "<loc_300>", "<loc_400>"])
    target = [0, *label, *locs, 2]
    force = ForceSequence(target, set(locs), tie_locations=tie)
    result = run_task_with_scores(tiny_ov_model, tiny_processor, noise_image(100, 100, 0), "<OD>", num_beams=1,
                                  max_new_tokens=20, logits_processor=LogitsProcessorList([force]))["<OD>"]  # fmt: skip
    assert result["labels"] == ["red car"] and len(result["scores"]) == 1
    if not tie:
        assert result["scores"][0] == pytest.approx(1.0, abs=1e-6)
    else:  # geometric mean over len(label) certain tokens and 4 tokens of probability 1/2
        assert result["scores"][0] == pytest.approx(0.5 ** (4 / (len(label) + 4)), abs=1e-6)
        low = run_task_with_scores(tiny_ov_model, tiny_processor, noise_image(100, 100, 0), "<OD>", num_beams=1,
                                   max_new_tokens=20, logits_processor=LogitsProcessorList([force]),
                                   reduce="min")["<OD>"]  # fmt: skip
        assert low["scores"][0] == pytest.approx(0.5, abs=1e-6)


# ---- errors ----------------------------------------------------------------------------------------------------


def test_text_tasks_and_bad_arguments_are_refused(tiny_processor, tiny_ov_model) -> None:
    image = noise_image(50, 50, 0)
    assert set(SCORED_TASKS) == {t for t, spec in TASKS.items() if spec.answer_kind != "text"}
    with pytest.raises(ValueError, match="no boxes or regions to score.*<OD>"):
        run_task_with_scores(tiny_ov_model, tiny_processor, image, "caption")
    with pytest.raises(ValueError, match="reduce must be"):
        run_task_with_scores(tiny_ov_model, tiny_processor, image, "<OD>", reduce="mean", max_new_tokens=4)
    with pytest.raises(ValueError, match="num_return_sequences"):
        run_task_with_scores(tiny_ov_model, tiny_processor, image, "<OD>", max_new_tokens=4, num_beams=2,
                             num_return_sequences=2)  # fmt: skip
    with pytest.raises(ValueError, match="output_scores=True"):
        token_log_probs(tiny_ov_model.generate(**tiny_processor(text="<OD>", images=image, return_tensors="pt"),
                                               max_new_tokens=4, return_dict_in_generate=True))  # fmt: skip


class _EmitPaddingId(LogitsProcessor):
    """Makes the model emit a vocabulary-padding id (past len(tokenizer)) at one step, as a real model can."""

    def __init__(self, padding_id: int, at_length: int) -> None:
        self.padding_id, self.at_length = padding_id, at_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[-1] == self.at_length:
            scores = torch.full_like(scores, -1e9)
            scores[:, self.padding_id] = 0.0
        return scores


def test_scores_survive_vocabulary_padding_ids(tiny_torch_model, tiny_processor) -> None:
    padding_id = len(tiny_processor.tokenizer) + 3
    assert padding_id < tiny_torch_model.config.text_config.vocab_size  # the tiny model pads its vocabulary too
    image = noise_image(64, 48, 3)
    emit = LogitsProcessorList([_EmitPaddingId(padding_id, 4)])
    kwargs = {"max_new_tokens": 16, "num_beams": 1, "logits_processor": emit}
    scored = run_task_with_scores(tiny_torch_model, tiny_processor, image, "<OD>", **kwargs)["<OD>"]
    plain = run_task(tiny_torch_model, tiny_processor, image, "<OD>", **kwargs)["<OD>"]
    assert without_scores(scored) == plain
    assert len(scored["scores"]) == len(plain["bboxes"]) and all(0 <= s <= 1 for s in scored["scores"])


def test_scored_answers_are_the_transformers_generators_answers(tiny_processor, tiny_ov_model) -> None:
    """At default precision (bf16 on this CPU) the scored path and run_task's numpy loop may differ where beams nearly
    tie (documented in helpers.outputs.scores); the scored answers are exactly transformers' generator's, at any precision."""
    default = OVFlorence2Model(tiny_ov_model.model_dir, "CPU", cache_dir=None)
    for seed in range(4):
        image = noise_image(120, 80, 10 + seed)
        kwargs = {"max_new_tokens": 24, "num_beams": 3}
        scored = run_task_with_scores(default, tiny_processor, image, "<OD>", **kwargs)["<OD>"]
        plain = run_task(default, tiny_processor, image, "<OD>", generation="transformers", **kwargs)["<OD>"]
        assert without_scores(scored) == plain, seed
