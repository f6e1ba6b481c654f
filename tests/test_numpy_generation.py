"""The numpy generator (no torch) must give transformers' tokens: same OpenVINO model, same inputs, same arguments.

Each test runs ``OVFlorence2Model.generate`` twice on one model, with ``generation="transformers"`` (transformers'
``GenerationMixin.generate``) and ``generation="numpy"`` (:mod:`helpers.runtime.numpy_generation`), and for the task table
also PyTorch's ``generate``. f32 precision (EXACT_CONFIG), so any difference is the generator's.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.florence2.processing_florence2 import Florence2PostProcessor

from helpers.convert.conversion import convert_florence2
from helpers.runtime.numpy_generation import UnsupportedGenerationError, log_softmax, top_k
from helpers.tasks.numpy_postprocessing import NumpyFlorence2PostProcessor, use_numpy_post_processing
from helpers.runtime.ov_model import EXACT_CONFIG, OVFlorence2Model
from helpers.tasks.run import TASKS, build_prompt

MAX_NEW_TOKENS = 32
#: A text input for each kind of task (none, free text, region).
EXAMPLE_TEXT = {
    "none": None, "text": "a red car next to a green tree", "region": "<loc_100><loc_150><loc_600><loc_700>",
}  # fmt: skip


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def ov_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> OVFlorence2Model:
    folder = convert_florence2(tiny_model_dir, tmp_path_factory.mktemp("ov") / "tiny-fp32", "fp32", verbose=False)
    return OVFlorence2Model(folder, "CPU", EXACT_CONFIG, cache_dir=None)


def both(model: OVFlorence2Model, inputs, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """(transformers' tokens, numpy generator's tokens) for the same call."""
    expected = model.generate(**inputs, generation="transformers", **kwargs).numpy()
    actual = model.generate(**inputs, generation="numpy", **kwargs)
    assert isinstance(actual, torch.Tensor), "torch inputs give a torch tensor back, whichever generator runs"
    actual = actual.numpy()
    assert actual.dtype == np.int64
    return expected, actual


def assert_same(expected: np.ndarray, actual: np.ndarray, what: str) -> None:
    assert expected.shape == actual.shape, f"{what}: shapes differ {expected.shape} vs {actual.shape}"
    mismatch = np.argwhere(expected != actual)
    assert mismatch.size == 0, f"{what}: first mismatch at {mismatch[0].tolist()}"


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam3"])
@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_matches_transformers_and_pytorch(task, num_beams, ov_model, tiny_processor, tiny_torch_model):
    image = noise_image(160, 120, seed=len(task))
    prompt = build_prompt(task, EXAMPLE_TEXT[TASKS[task].text_kind])
    inputs = tiny_processor(text=prompt, images=image, return_tensors="pt")
    kwargs = {"max_new_tokens": MAX_NEW_TOKENS, "num_beams": num_beams}
    expected, actual = both(ov_model, inputs, **kwargs)
    assert_same(expected, actual, f"{task} beams={num_beams} vs transformers")
    with torch.no_grad():
        assert_same(tiny_torch_model.generate(**inputs, **kwargs).numpy(), actual, f"{task} vs PyTorch")


def test_numpy_inputs_give_the_same_tokens(ov_model, tiny_processor):
    """``return_tensors="np"`` (what a torch-free deployment passes) and ``"pt"`` give the same answer."""
    image = noise_image(100, 80, 3)
    from_numpy = ov_model.generate(**tiny_processor(text="<OD>", images=image, return_tensors="np"), generation="numpy",
                                   max_new_tokens=12)  # fmt: skip
    from_torch = ov_model.generate(**tiny_processor(text="<OD>", images=image, return_tensors="pt"), generation="numpy",
                                   max_new_tokens=12)  # fmt: skip
    assert isinstance(from_numpy, np.ndarray) and isinstance(from_torch, torch.Tensor)
    assert_same(from_torch.numpy(), from_numpy, "np vs pt inputs")


@pytest.mark.parametrize(
    "kwargs, generator",
    [
        ({"num_beams": 3}, "numpy"),
        ({"num_beams": 1}, "numpy"),
        ({"do_sample": True}, "transformers"),
        ({"output_scores": True, "return_dict_in_generate": True}, "transformers"),
    ],
)
def test_auto_takes_numpy_when_it_can_and_transformers_otherwise(
    kwargs, generator, ov_model, tiny_processor, monkeypatch
):
    """The default generator is numpy (faster) for greedy and beam search; sampling and scores go to transformers."""
    from helpers.runtime import numpy_generation

    calls = []
    real_generate = numpy_generation.generate
    monkeypatch.setattr(numpy_generation, "generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    inputs = tiny_processor(text="<OD>", images=noise_image(64, 64, 0), return_tensors="pt")
    ov_model.generate(**inputs, max_new_tokens=4, **kwargs)
    assert bool(calls) == (generator == "numpy"), (kwargs, calls)


@pytest.mark.parametrize(
    "kwargs",
    [{"num_beams": 1}, {"num_beams": 3}, {"num_beams": 4, "num_return_sequences": 2}],
    ids=["greedy", "beam3", "beam4-return2"],
)
def test_batch_with_padded_prompts(kwargs, ov_model, tiny_processor):
    images = [noise_image(160, 120, 1), noise_image(90, 300, 2), noise_image(64, 64, 0)]
    prompts = ["<OD>", build_prompt("<CAPTION_TO_PHRASE_GROUNDING>", EXAMPLE_TEXT["text"]), "<CAPTION>"]
    inputs = tiny_processor(text=prompts, images=images, return_tensors="pt", padding=True)
    assert (inputs["attention_mask"] == 0).any(), "the prompts should need padding"
    expected, actual = both(ov_model, inputs, max_new_tokens=MAX_NEW_TOKENS, **kwargs)
    assert_same(expected, actual, f"batch {kwargs}")


def frequent_token(model: OVFlorence2Model, inputs) -> int:
    """A token the model emits mid-answer: declared as EOS, it makes answers end at varied lengths (the tiny
    random model seldom emits its real EOS, which would leave finished beams and early stopping untested)."""
    ids = model.generate(**inputs, generation="numpy", max_new_tokens=MAX_NEW_TOKENS, num_beams=1)[0, 2:]
    values, counts = np.unique(ids, return_counts=True)
    return int(values[counts.argmax()])


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
@pytest.mark.parametrize("length_penalty", [1.0, 0.5, 2.0, -1.0])
def test_early_stopping_and_length_penalty(early_stopping, length_penalty, ov_model, tiny_processor):
    lengths = []
    for seed, task in enumerate(["<OD>", "<CAPTION>", "<OCR>", "<REGION_PROPOSAL>"]):
        inputs = tiny_processor(text=task, images=noise_image(64, 64, seed), return_tensors="pt")
        kwargs = {
            "max_new_tokens": MAX_NEW_TOKENS, "num_beams": 3, "early_stopping": early_stopping,
            "length_penalty": length_penalty, "eos_token_id": frequent_token(ov_model, inputs),
        }  # fmt: skip
        expected, actual = both(ov_model, inputs, **kwargs)
        assert_same(expected, actual, f"{task} {kwargs}")
        lengths.append(actual.shape[1])
    if length_penalty <= 1.0:  # a larger penalty rewards length: the best hypotheses may all run to max_length
        assert min(lengths) < MAX_NEW_TOKENS + 1, "no beam finished early: finished hypotheses are untested"


def test_no_repeat_ngram_size_is_applied(ov_model, tiny_processor):
    found_effect = False
    for seed, task in enumerate(["<OD>", "<CAPTION>", "<OCR>", "<REGION_PROPOSAL>", "<DETAILED_CAPTION>"]):
        inputs = tiny_processor(text=task, images=noise_image(96, 96, seed), return_tensors="pt")
        results = {}
        for size in (0, 1, 2, 3):
            for beams in (1, 3):
                expected, actual = both(ov_model, inputs, max_new_tokens=24, num_beams=beams, no_repeat_ngram_size=size)
                assert_same(expected, actual, f"{task} no_repeat_ngram_size={size} beams={beams}")
                results[size, beams] = actual
        for (size, _), ids in results.items():
            if size:
                row = ids[0, :-1].tolist()  # the last token may be the forced EOS, which overrides the ban
                grams = [tuple(row[i : i + size]) for i in range(len(row) - size + 1)]
                assert len(grams) == len(set(grams)), f"a {size}-gram repeats in {row}"
        found_effect |= any(not np.array_equal(results[0, b], results[2, b]) for b in (1, 3))
    assert found_effect, "no_repeat_ngram_size never changed an answer: the test is blind"


@pytest.mark.parametrize("num_beams", [1, 3])
def test_min_new_tokens_and_min_length(num_beams, ov_model, tiny_processor):
    inputs = tiny_processor(text="<CAPTION>", images=noise_image(64, 64, 1), return_tensors="pt")
    eos = frequent_token(ov_model, inputs)
    base = {"max_new_tokens": MAX_NEW_TOKENS, "num_beams": num_beams, "eos_token_id": eos}
    expected, actual = both(ov_model, inputs, **base)
    assert_same(expected, actual, "no minimum")
    free_length = actual.shape[1]
    for extra in ({"min_new_tokens": free_length + 3}, {"min_length": free_length + 3}, {"min_new_tokens": 5}):
        expected, actual = both(ov_model, inputs, **base, **extra)
        assert_same(expected, actual, str(extra))
        minimum = extra.get("min_new_tokens", extra.get("min_length", 0) - 1)
        assert eos not in actual[0, 1 : 1 + minimum].tolist(), f"EOS before the minimum with {extra}"


def test_lengths_and_forced_tokens(ov_model, tiny_processor):
    inputs = tiny_processor(text="<OCR>", images=noise_image(80, 80, 4), return_tensors="pt")
    for kwargs in (
        {"max_new_tokens": 1, "num_beams": 3},
        {"max_new_tokens": 2},
        {"max_length": 7, "max_new_tokens": None, "num_beams": 3},
        {"max_new_tokens": None},  # transformers' default of 20 new tokens
        {"max_new_tokens": 9, "forced_bos_token_id": None, "forced_eos_token_id": None, "num_beams": 2},
    ):
        expected, actual = both(ov_model, inputs, **kwargs)
        assert_same(expected, actual, str(kwargs))
    ids = ov_model.generate(**inputs, generation="numpy", max_new_tokens=6, num_beams=1)
    assert ids[0, 1] == 0 and ids[0, -1] == 2, "forced BOS first and forced EOS at max_length"


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"do_sample": True}, "Sampling"),
        ({"output_scores": True, "return_dict_in_generate": True}, "output_scores"),
        ({"repetition_penalty": 1.3}, "repetition_penalty"),
        ({"bad_words_ids": [[5]]}, "bad_words_ids"),
        ({"num_beam_groups": 3, "diversity_penalty": 0.5, "num_beams": 3}, "diversity_penalty"),
        ({"not_an_argument": 1}, "not_an_argument"),
    ],
)
def test_unsupported_arguments_raise_and_name_the_fix(kwargs, named, ov_model, tiny_processor):
    inputs = tiny_processor(text="<OD>", images=noise_image(64, 64, 0), return_tensors="np")
    with pytest.raises(UnsupportedGenerationError, match="Install torch") as error:
        ov_model.generate(**inputs, generation="numpy", max_new_tokens=4, **kwargs)
    assert named in str(error.value)


def test_generation_choice_is_validated(ov_model):
    with pytest.raises(ValueError, match="'auto', 'transformers' or 'numpy'"):
        OVFlorence2Model(ov_model.model_dir, "CPU", generation="jax")
    numpy_model = OVFlorence2Model(ov_model.model_dir, "CPU", EXACT_CONFIG, cache_dir=None, generation="numpy")
    ids = numpy_model.generate(input_ids=np.array([[0, 2]]), max_new_tokens=3)  # text only: no pixel_values
    assert isinstance(ids, np.ndarray)


def test_log_softmax_and_top_k_follow_torch():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((64, 1600)) * 4).astype(np.float32)
    expected = torch.log_softmax(torch.from_numpy(logits), dim=-1).numpy()
    ours = log_softmax(logits)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, rtol=0, atol=4e-6)
    # Bit-identical rows for most: torch's summation order is reproduced, only SLEEF's exp/log rounding differs.
    assert (ours == expected).all(axis=1).mean() > 0.8
    values = torch.from_numpy(logits[:, :300])
    top_values, top_indices = top_k(logits[:, :300], 6)
    reference = torch.topk(values, 6)
    assert np.array_equal(top_values, reference.values.numpy())
    assert np.array_equal(top_indices, reference.indices.numpy())


def test_top_k_ranks_nan_first_like_torch():
    """A row of only -inf logits becomes NaN after log-softmax; torch.topk ranks NaN first, and so must we
    (found by the soak test at default precision: an empty candidate list crashed the beam search)."""
    values = np.array([[0.5, np.nan, -np.inf, 2.0, np.nan], [-np.inf] * 5], dtype=np.float32)
    values[1] = log_softmax(values[1:2])[0]  # all NaN
    top_values, top_indices = top_k(values, 3)
    reference = torch.topk(torch.from_numpy(values), 3)
    assert np.isnan(top_values[0, :2]).all() and top_values[0, 2] == 2.0 and top_indices[0, 2] == 3
    assert set(top_indices[0, :2]) == set(reference.indices[0, :2].tolist()) == {1, 4}
    assert np.isnan(top_values[1]).all() and len(set(top_indices[1])) == 3


# ---- post-processing without torch ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1, 1), (7, 3), (160, 120), (333, 999), (640, 480), (1023, 767), (4095, 3001)])
def test_numpy_dequantize_and_quantize_equal_torch(size, tiny_processor):
    torch_post = tiny_processor.post_processor
    numpy_post = NumpyFlorence2PostProcessor(config=torch_post.parse_task_config, tokenizer=torch_post.tokenizer)
    bins = np.arange(1000)
    boxes = np.stack([bins, bins[::-1], (bins * 7) % 1000, (bins * 13) % 1000], axis=1)
    for locations in (boxes, boxes[:, :2]):
        expected = torch_post.dequantize(torch.tensor(locations), size=size)
        actual = numpy_post.dequantize(locations, size=size)
        assert actual.dtype == np.int32 and np.array_equal(actual, expected.numpy())
    pixels = np.random.default_rng(size[0]).random((500, 4)).astype(np.float32) * np.float32(max(size))
    expected = torch_post.quantize(torch.from_numpy(pixels), size=size)
    assert np.array_equal(numpy_post.quantize(pixels, size=size), expected.numpy())


def test_numpy_post_processing_gives_the_same_answers(tiny_processor):
    numpy_processor = use_numpy_post_processing(copy.deepcopy(tiny_processor))
    assert isinstance(numpy_processor.post_processor, NumpyFlorence2PostProcessor)
    assert type(tiny_processor.post_processor) is Florence2PostProcessor  # the original is untouched
    loc = "".join(f"<loc_{v}>" for v in (12, 250, 640, 999))
    poly = "".join(f"<loc_{v}>" for v in (5, 7, 400, 9, 401, 600, 3, 598, 77))
    quad = "".join(f"<loc_{v}>" for v in (10, 20, 300, 20, 300, 90, 10, 90))
    texts = {
        "<OD>": f"</s><s>car{loc}tree{loc}</s>",
        "<REGION_PROPOSAL>": f"<s>{loc}{loc}</s>",
        "<CAPTION_TO_PHRASE_GROUNDING>": f"<s>a red car{loc}{loc}</s>",
        "<REFERRING_EXPRESSION_SEGMENTATION>": f"<s>{poly}</s>",
        "<OPEN_VOCABULARY_DETECTION>": f"<s>bicycle{loc}bus<poly>{poly}</poly></s>",
        "<OCR_WITH_REGION>": f"<s>HELLO{quad}world{quad}</s>",
        "<CAPTION>": "<s>a caption</s>",
    }
    for size in [(160, 120), (333, 777), (1, 1)]:
        for task, text in texts.items():
            expected = tiny_processor.post_process_generation(text, task=task, image_size=size)
            assert numpy_processor.post_process_generation(text, task=task, image_size=size) == expected, task
