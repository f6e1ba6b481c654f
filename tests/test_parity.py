"""OpenVINO output must equal transformers' PyTorch generate token for token (f32 precision, same weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from helpers.convert.conversion import convert_florence2
from helpers.runtime.ov_model import DECODER_DEFAULTS, EXACT_CONFIG, OVFlorence2Model
from helpers.course.tiny import make_tiny_florence2

#: Every Florence-2 task with a text input where it needs one (regions as <loc_…> bins).
PROMPTS = {
    "<CAPTION>": "<CAPTION>",
    "<DETAILED_CAPTION>": "<DETAILED_CAPTION>",
    "<MORE_DETAILED_CAPTION>": "<MORE_DETAILED_CAPTION>",
    "<OD>": "<OD>",
    "<DENSE_REGION_CAPTION>": "<DENSE_REGION_CAPTION>",
    "<REGION_PROPOSAL>": "<REGION_PROPOSAL>",
    "<OCR>": "<OCR>",
    "<OCR_WITH_REGION>": "<OCR_WITH_REGION>",
    "<CAPTION_TO_PHRASE_GROUNDING>": "<CAPTION_TO_PHRASE_GROUNDING>A red car next to a green tree",
    "<REFERRING_EXPRESSION_SEGMENTATION>": "<REFERRING_EXPRESSION_SEGMENTATION>the red car",
    "<REGION_TO_SEGMENTATION>": "<REGION_TO_SEGMENTATION><loc_100><loc_150><loc_600><loc_700>",
    "<OPEN_VOCABULARY_DETECTION>": "<OPEN_VOCABULARY_DETECTION>a bicycle",
    "<REGION_TO_CATEGORY>": "<REGION_TO_CATEGORY><loc_52><loc_332><loc_932><loc_774>",
    "<REGION_TO_DESCRIPTION>": "<REGION_TO_DESCRIPTION><loc_0><loc_0><loc_500><loc_999>",
    "<REGION_TO_OCR>": "<REGION_TO_OCR><loc_300><loc_300><loc_700><loc_600>",
}
MAX_NEW_TOKENS = 32


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="session")
def tiny_ov_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_florence2(tiny_model_dir, tmp_path_factory.mktemp("ov") / "tiny-fp32", "fp32", verbose=False)


@pytest.fixture(scope="session")
def tiny_ov_model(tiny_ov_dir: Path) -> OVFlorence2Model:
    return OVFlorence2Model(tiny_ov_dir, "CPU", EXACT_CONFIG)


def assert_same_tokens(torch_ids: torch.Tensor, ov_ids: torch.Tensor, what: str) -> None:
    assert torch_ids.shape == ov_ids.shape, f"{what}: shapes differ {tuple(torch_ids.shape)} vs {tuple(ov_ids.shape)}"
    mismatch = (torch_ids != ov_ids).nonzero()
    assert mismatch.numel() == 0, f"{what}: first mismatch at {mismatch[0].tolist()}"


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam3"])
@pytest.mark.parametrize("task", list(PROMPTS))
def test_every_task_matches_pytorch(task, num_beams, tiny_processor, tiny_torch_model, tiny_ov_model):
    image = noise_image(160, 120, seed=len(task))
    inputs = tiny_processor(text=PROMPTS[task], images=image, return_tensors="pt")
    kwargs = {"max_new_tokens": MAX_NEW_TOKENS, "num_beams": num_beams}
    with torch.no_grad():
        expected = tiny_torch_model.generate(**inputs, **kwargs)
    assert_same_tokens(expected, tiny_ov_model.generate(**inputs, **kwargs), f"{task} beams={num_beams}")


def test_tiny_model_answers_depend_on_image_and_prompt(tiny_processor, tiny_torch_model):
    """Guards the parity tests against a blind model that says the same thing whatever it sees."""
    answers = set()
    for seed, prompt in [(0, "<OD>"), (1, "<OD>"), (0, "<CAPTION>")]:
        inputs = tiny_processor(text=prompt, images=noise_image(96, 96, seed), return_tensors="pt")
        answers.add(tuple(tiny_torch_model.generate(**inputs, max_new_tokens=16, num_beams=1)[0].tolist()))
    assert len(answers) == 3


def test_some_answers_end_before_the_limit(tiny_processor, tiny_torch_model, tiny_ov_model):
    """Finished beams and early stopping are only exercised when some answers emit </s>."""
    lengths = []
    for task in ["<OD>", "<CAPTION>", "<OCR>", "<REGION_PROPOSAL>"]:
        for seed in range(3):
            inputs = tiny_processor(text=task, images=noise_image(64, 64, seed), return_tensors="pt")
            ids = tiny_ov_model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, num_beams=3)
            with torch.no_grad():
                assert_same_tokens(
                    tiny_torch_model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, num_beams=3), ids, task
                )
            lengths.append(ids.shape[1])
    assert min(lengths) < MAX_NEW_TOKENS + 1, "no answer ended early: EOS handling is untested"


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam3"])
def test_batch_of_two_sizes_matches_pytorch_and_single_runs(num_beams, tiny_processor, tiny_torch_model, tiny_ov_model):
    images = [noise_image(160, 120, 1), noise_image(90, 300, 2)]
    prompts = ["<OD>", PROMPTS["<CAPTION_TO_PHRASE_GROUNDING>"]]  # different lengths: padded prompts
    inputs = tiny_processor(text=prompts, images=images, return_tensors="pt", padding=True)
    kwargs = {"max_new_tokens": MAX_NEW_TOKENS, "num_beams": num_beams}
    ov_batch = tiny_ov_model.generate(**inputs, **kwargs)
    with torch.no_grad():
        assert_same_tokens(tiny_torch_model.generate(**inputs, **kwargs), ov_batch, "batch")
    for row, (image, prompt) in enumerate(zip(images, prompts)):
        single = tiny_ov_model.generate(**tiny_processor(text=prompt, images=image, return_tensors="pt"), **kwargs)[0]
        batched = ov_batch[row][: single.shape[0]]
        assert torch.equal(single, batched), f"row {row} differs from its single-image run"
        assert (ov_batch[row][single.shape[0] :] == tiny_processor.tokenizer.pad_token_id).all()


def test_the_vision_encoder_runs_one_static_image_per_call(tiny_processor, tiny_ov_model):
    """Compiled with a static batch of one (the CPU plugin's specialised kernels: a w8a8 vision call 1.04 s static
    against 1.71 s dynamic, base model), it still answers a batch: each image's features equal its own call's."""
    compiled_shape = tiny_ov_model.ov_vision_encoder.inputs[0].get_partial_shape()
    assert compiled_shape.is_static and compiled_shape[0].get_length() == 1
    images = [noise_image(160, 120, 3), noise_image(90, 300, 4), noise_image(64, 64, 5)]
    pixels = tiny_processor.image_processor(images, return_tensors="np")["pixel_values"]
    tiny_ov_model.image_cache.clear()
    together = tiny_ov_model.image_features(pixels)
    tiny_ov_model.image_cache.clear()
    alone = np.concatenate([tiny_ov_model.image_features(pixels[i : i + 1]) for i in range(3)])
    assert together.shape[0] == 3 and np.array_equal(together, alone)


def test_sampling_matches_pytorch_with_the_same_seed(tiny_processor, tiny_torch_model, tiny_ov_model):
    inputs = tiny_processor(text="<CAPTION>", images=noise_image(128, 128, 5), return_tensors="pt")
    kwargs = {"max_new_tokens": 20, "do_sample": True, "num_beams": 1, "top_k": 50}
    torch.manual_seed(7)
    expected = tiny_torch_model.generate(**inputs, **kwargs)
    torch.manual_seed(7)
    assert_same_tokens(expected, tiny_ov_model.generate(**inputs, **kwargs), "sampling")


def test_generation_arguments_are_honoured(tiny_processor, tiny_ov_model):
    inputs = tiny_processor(text="<OD>", images=noise_image(64, 64, 3), return_tensors="pt")
    ids = tiny_ov_model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, num_beams=1)
    assert ids.shape[1] <= 1 + 5 + 1  # decoder start + 5 new (+ forced BOS counted among them)
    longer = tiny_ov_model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, num_beams=1)
    assert longer.shape[1] == 13


def test_second_task_on_same_image_reuses_image_features(tiny_processor, tiny_ov_dir):
    model = OVFlorence2Model(tiny_ov_dir, "CPU", EXACT_CONFIG, image_cache_size=2)
    image = noise_image(100, 100, 9)
    model.generate(**tiny_processor(text="<OD>", images=image, return_tensors="pt"), max_new_tokens=4)
    assert len(model.image_cache) == 1
    model.generate(**tiny_processor(text="<CAPTION>", images=image, return_tensors="pt"), max_new_tokens=4)
    assert len(model.image_cache) == 1
    off = OVFlorence2Model(tiny_ov_dir, "CPU", EXACT_CONFIG, image_cache_size=0)
    off.generate(**tiny_processor(text="<OD>", images=image, return_tensors="pt"), max_new_tokens=4)
    assert len(off.image_cache) == 0


def test_releasing_vision_memory_keeps_every_answer(tiny_processor, tiny_ov_dir):
    """The vision encoder's buffers are freed after each call by default: later images must not see stale data."""
    kept = OVFlorence2Model(tiny_ov_dir, "CPU", EXACT_CONFIG, image_cache_size=0, release_vision_memory=False)
    released = OVFlorence2Model(tiny_ov_dir, "CPU", EXACT_CONFIG, image_cache_size=0)
    assert released.release_vision_memory and not kept.release_vision_memory
    images = [noise_image(120, 90, seed) for seed in (21, 22, 23)]
    pixel_batches = [tiny_processor(text="<OD>", images=image, return_tensors="np")["pixel_values"] for image in images]
    pixel_batches.append(np.concatenate(pixel_batches[:2]))  # a batch after single images: other buffer shapes
    for pixels in [*pixel_batches, pixel_batches[0]]:
        np.testing.assert_array_equal(released.image_features(pixels), kept.image_features(pixels))


def test_fast_davit_layout_computes_what_transformers_computes(tiny_torch_model):
    """The conversion traces DaViT's blocks with rewritten layout switches; they must compute the same features."""
    from transformers.models.florence2 import modeling_florence2 as florence2

    from helpers.convert.conversion import _fast_davit_layout

    classes = (
        florence2.Florence2VisionSpatialBlock,
        florence2.Florence2VisionChannelBlock,
        florence2.Florence2VisionChannelAttention,
    )
    originals = [cls.forward for cls in classes]
    pixels = torch.randn(2, 3, 768, 768, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tiny_torch_model.get_image_features(pixels).pooler_output
        with pytest.raises(KeyboardInterrupt), _fast_davit_layout():
            assert all(cls.forward is not forward for cls, forward in zip(classes, originals))
            rewritten = tiny_torch_model.get_image_features(pixels).pooler_output
            raise KeyboardInterrupt  # an interrupted conversion must restore transformers' classes too
    assert all(cls.forward is forward for cls, forward in zip(classes, originals))
    torch.testing.assert_close(rewritten, expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize(
    "variant",
    [{"image_size": 384, "large_style": True, "seed": 3}, {"image_size": 512, "large_style": False, "seed": 11}],
    ids=["384px-large-style", "512px-base-style"],
)
def test_unseen_configurations_convert_and_match(variant, tmp_path):
    """A Florence-2 whose sizes no other test uses: image size from the processor, vision width != text width."""
    source = make_tiny_florence2(tmp_path / "src", **variant)
    processor = AutoProcessor.from_pretrained(source)
    torch_model = AutoModelForImageTextToText.from_pretrained(source).eval()
    ov_model = OVFlorence2Model(convert_florence2(source, tmp_path / "ov", "fp32", verbose=False), "CPU", EXACT_CONFIG)
    for task, prompt in PROMPTS.items():
        inputs = processor(text=prompt, images=noise_image(200, 150, len(task)), return_tensors="pt")
        for num_beams in (1, 3):
            kwargs = {"max_new_tokens": 16, "num_beams": num_beams}
            with torch.no_grad():
                expected = torch_model.generate(**inputs, **kwargs)
            assert_same_tokens(expected, ov_model.generate(**inputs, **kwargs), f"{variant} {task} beams={num_beams}")


def test_repeated_calls_at_default_precision_give_the_same_answer(tiny_processor, tiny_model_dir, tmp_path):
    """At the device's default precision (bf16 here) answers may differ from PyTorch, but never between two
    identical calls: state, shared input buffers and caches must not leak from one generate into the next."""
    from helpers.course.samples import load_sample

    folder = convert_florence2(tiny_model_dir, tmp_path / "fp16", "fp16", verbose=False)
    OVFlorence2Model(folder, "CPU", image_cache_size=0)  # fills the compiled-model cache
    model = OVFlorence2Model(folder, "CPU", image_cache_size=0)  # loads from it, as every later session does
    image = load_sample("shapes")
    runs = [
        # fresh input tensors each call, as a user's loop would make them
        model.generate(
            **tiny_processor(text="<OD>", images=image, return_tensors="pt"),
            max_new_tokens=MAX_NEW_TOKENS,
            num_beams=num_beams,
        )
        for num_beams in (3, 3, 3, 1, 1, 1)  # same shapes back to back: the case a stale buffer would hit
    ]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2]), "beam search changed between calls"
    assert torch.equal(runs[3], runs[4]) and torch.equal(runs[3], runs[5]), "greedy search changed between calls"


def test_beam_search_logits_stay_finite_at_default_precision(tiny_processor, tiny_model_dir, tmp_path):
    """With the CPU plugin's default u8 KV cache (OpenVINO 2026.4), a beam search that reordered the cache gave
    NaN/inf logits in about one fresh load in three. The decoder now compiles with DECODER_DEFAULTS (f16 KV cache):
    twelve fresh loads at default precision, each running greedy and beam search, never see a non-finite logit."""
    from helpers.course.samples import load_sample

    folder = convert_florence2(tiny_model_dir, tmp_path / "int8", "int8", verbose=False)
    inputs = tiny_processor(text="<OD>", images=load_sample("grace_hopper"), return_tensors="np")
    for load in range(12):
        model = OVFlorence2Model(folder, "CPU", cache_dir=None)
        assert model.compile_config("decoder")["KV_CACHE_PRECISION"] == DECODER_DEFAULTS["KV_CACHE_PRECISION"]
        non_finite: list[int] = []
        decoder_step = model.decoder_step

        def watched_step(*args, **kwargs):
            logits = decoder_step(*args, **kwargs)
            non_finite.append(int((~np.isfinite(logits)).sum()))
            return logits

        model.decoder_step = watched_step
        for num_beams in (1, 1, 3, 1, 3):
            model.image_cache.clear()
            ids = model.generate(**inputs, num_beams=num_beams, min_new_tokens=8, max_new_tokens=8)
            assert ids.shape[1] == 9, f"load {load}, beams {num_beams}: {ids.tolist()} is not 8 forced tokens"
        assert not any(non_finite), f"load {load}: non-finite logits in decoder steps {non_finite}"


def test_cross_attention_keys_are_stored_transposed(tiny_ov_dir: Path):
    """Cross-attention keys live in state as [batch, heads, head_dim, source], so no step transposes them again
    (the parity tests above check that the rewritten attention still gives PyTorch's tokens)."""
    import openvino as ov

    decoder = ov.Core().read_model(tiny_ov_dir / "decoder.xml")
    reads = {
        op.get_attributes()["variable_id"]: op for op in decoder.get_ordered_ops() if op.get_type_name() == "ReadValue"
    }
    cross_keys = [read for name, read in reads.items() if name.startswith("past_cross.") and name.endswith(".key")]
    assert cross_keys, "no cross-attention key state in the decoder"
    for read in cross_keys:
        assert read.input_value(0).get_node().get_type_name() == "Transpose"
        consumers = {target.get_node().get_type_name() for target in read.output(0).get_target_inputs()}
        assert consumers == {"Assign", "MatMul"}, consumers


def test_tied_embedding_is_stored_once(tiny_model_dir: Path, tiny_ov_dir: Path):
    """The fp32 IR holds every weight exactly once: no larger than the safetensors checkpoint (which stores the
    tied embedding / output projection once) plus a little graph metadata."""
    checkpoint = (tiny_model_dir / "model.safetensors").stat().st_size
    ir_weights = sum(path.stat().st_size for path in tiny_ov_dir.glob("*.bin"))
    embedding = tiny_torch_embedding_bytes(tiny_model_dir)
    assert sorted(p.name for p in tiny_ov_dir.glob("*.xml")) == ["decoder.xml", "encoder.xml", "vision_encoder.xml"]
    assert ir_weights < checkpoint + embedding / 2, f"IR weights {ir_weights} B vs checkpoint {checkpoint} B"


def tiny_torch_embedding_bytes(model_dir: Path) -> int:
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(model_dir).text_config
    return text.vocab_size * text.d_model * 4


@pytest.mark.parametrize("weight_format", ["int8", "int4"])
def test_compressed_formats_convert_and_answer_well_formed(weight_format, tiny_model_dir, tiny_processor, tmp_path):
    from helpers.tasks.run import ANSWER_KEYS, TASKS, run_task

    folder = convert_florence2(tiny_model_dir, tmp_path / weight_format, weight_format, verbose=False)
    fp32_bytes = (tiny_model_dir / "model.safetensors").stat().st_size
    assert sum(p.stat().st_size for p in folder.glob("*.bin")) < 0.6 * fp32_bytes
    model = OVFlorence2Model(folder, "CPU")
    image = noise_image(200, 150, 21)
    for task in ["<CAPTION>", "<OD>", "<CAPTION_TO_PHRASE_GROUNDING>", "<REGION_TO_SEGMENTATION>", "<OCR_WITH_REGION>"]:
        text = PROMPTS[task][len(task) :] or None
        answer = run_task(model, tiny_processor, image, task, text, max_new_tokens=24)[task]
        keys = ANSWER_KEYS[TASKS[task].answer_kind]
        if keys:
            assert set(answer) >= set(keys), f"{weight_format} {task}: {answer}"
            lengths = {len(answer[k]) for k in keys if k in ("bboxes", "labels", "polygons", "quad_boxes")}
            assert len(lengths) <= 1, f"{weight_format} {task}: instance lists of different lengths {answer}"
        else:
            assert isinstance(answer, str)
