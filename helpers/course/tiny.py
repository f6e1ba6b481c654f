"""Build a tiny Florence-2 with random weights, fully offline.

The real checkpoints live on the Hugging Face hub. Tests, CI and offline classrooms cannot download them, so this
module builds a small model in exactly the same native transformers layout (tokenizer, processor with its
post-processing rules, model, generation config), saved with ``save_pretrained``. Every helper in this package,
and every notebook, accepts the folder it writes in place of a hub id.

Its answers are noise, but they are *deterministic* noise that depends on the image and on the prompt: that is
what a parity test between PyTorch and OpenVINO needs.

Taught in ``notebooks/00_setup.ipynb`` (why an offline model exists) and used by every notebook's parameters cell.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken
from tokenizers.implementations import ByteLevelBPETokenizer
from transformers import (
    BartConfig,
    BartTokenizer,
    CLIPImageProcessorPil,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Florence2Processor,
    Florence2VisionConfig,
    GenerationConfig,
)

from helpers.course.model_kind import MODEL_KIND_KEY
from helpers.folders import remove_stale_staging, staged_folder
from helpers.convert.native_processor import FLORENCE2_EXTRA_TOKENS, IMAGE_TOKEN, POST_PROCESSOR_CONFIG

VISION_STRIDE = 32  # DaViT downsamples by 4 * 2 * 2 * 2


@dataclass(frozen=True)
class TinyArchitecture:
    """Sizes of a tiny Florence-2. The defaults give a ~1M-parameter model; ``large_style`` mimics Florence-2-large,
    whose vision width (last DaViT stage) differs from the projection / text width."""

    vision_dims: tuple[int, int, int, int] = (8, 16, 32, 64)
    vision_heads: tuple[int, int, int, int] = (1, 2, 4, 8)
    vision_depths: tuple[int, int, int, int] = (1, 1, 1, 1)
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_ffn: int = 128
    window_size: int = 12

    @classmethod
    def large_style(cls) -> "TinyArchitecture":
        return cls(vision_dims=(16, 32, 64, 128), vision_heads=(2, 4, 8, 16), text_width=48, text_heads=4)

    @classmethod
    def florence2_base(cls) -> "TinyArchitecture":
        """The full-size Florence-2-base architecture (231M parameters): for speed and memory measurements."""
        return cls(
            vision_dims=(128, 256, 512, 1024),
            vision_heads=(4, 8, 16, 32),
            vision_depths=(1, 1, 9, 1),
            text_width=768,
            text_layers=6,
            text_heads=12,
            text_ffn=3072,
            window_size=12,
        )

    @classmethod
    def florence2_large(cls) -> "TinyArchitecture":
        """The full-size Florence-2-large architecture (0.77 B parameters): for speed and memory measurements."""
        return cls(vision_dims=(256, 512, 1024, 2048), vision_heads=(8, 16, 32, 64), vision_depths=(1, 1, 9, 1),
                   text_width=1024, text_layers=12, text_heads=16, text_ffn=4096, window_size=12)  # fmt: skip


def image_seq_length(image_size: int) -> int:
    """Number of ``<image>`` tokens the processor inserts: one per final-stage patch plus one pooled token."""
    if image_size % VISION_STRIDE:
        raise ValueError(f"image_size must be a multiple of {VISION_STRIDE}, got {image_size}")
    side = image_size // VISION_STRIDE
    return side * side + 1


def _training_corpus(seed: int) -> list[str]:
    """A few thousand caption-like sentences, so the tokenizer learns real English sub-words offline."""
    colours = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "brown", "grey"]
    things = ["car", "dog", "cat", "person", "tree", "house", "circle", "square", "triangle", "sign", "bus",
              "bicycle", "flower", "cup", "book", "table", "chair", "building", "road", "sky", "window", "door"]  # fmt: skip
    places = ["in front of", "next to", "behind", "on top of", "under", "near", "inside"]
    verbs = ["is parked", "is standing", "is sitting", "is shown", "appears", "is visible"]
    rng = random.Random(seed)
    sentences = [
        f"A {c1} {t1} {v} {p} a {c2} {t2}."
        for c1, t1, v, p, c2, t2 in (
            (rng.choice(colours), rng.choice(things), rng.choice(verbs), rng.choice(places),
             rng.choice(colours), rng.choice(things))
            for _ in range(3000)
        )
    ]  # fmt: skip
    prompts = [
        "What does the image describe?", "Describe in detail what is shown in the image.",
        "Describe with a paragraph what is shown in the image.", "Locate the objects with category name in the image.",
        "Locate the objects in the image, with their descriptions.", "Locate the region proposals in the image.",
        "What is the text in the image?", "What is the text in the image, with regions?",
        "Locate the phrases in the caption:", "Locate the in the image with mask", "What is the polygon mask of region",
        "What is the region", "What does the region describe?", "What text is in the region",
        "The quick brown fox jumps over the lazy dog. TOTAL 12.50 RECEIPT CASH CHANGE",
    ]  # fmt: skip
    return sentences + prompts * 20 + [" ".join(w) for w in itertools.permutations(colours[:6], 3)]


def build_tokenizer(work_dir: Path, *, seed: int = 0, vocab_size: int = 1000) -> BartTokenizer:
    """Train a byte-level BPE tokenizer offline and give it Florence-2's added tokens and ``<image>``."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        _training_corpus(seed), vocab_size=vocab_size, min_frequency=2,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False,
    )  # fmt: skip
    bpe.save_model(str(work_dir))
    vocab = json.loads((work_dir / "vocab.json").read_text())
    merges = [tuple(line.split()) for line in (work_dir / "merges.txt").read_text().splitlines()[1:] if line]
    tokenizer = BartTokenizer(vocab=vocab, merges=merges, model_specific_special_tokens={"image_token": IMAGE_TOKEN})
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in FLORENCE2_EXTRA_TOKENS])
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer


def build_processor(tokenizer: BartTokenizer, image_size: int) -> Florence2Processor:
    """A processor configured like the real checkpoints' (ImageNet normalisation, square resize, no crop)."""
    image_processor = CLIPImageProcessorPil(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        do_center_crop=False,
        crop_size={"height": image_size, "width": image_size},
        resample=3,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    image_processor.image_seq_length = image_seq_length(image_size)
    return Florence2Processor(
        image_processor=image_processor, tokenizer=tokenizer, post_processor_config=POST_PROCESSOR_CONFIG
    )


def build_config(vocab_size: int, image_token_id: int, arch: TinyArchitecture) -> Florence2Config:
    """Spell out every size: ``Florence2Config()``'s own text defaults are BART-large, not a tiny model."""
    vision = Florence2VisionConfig(
        embed_dim=list(arch.vision_dims),
        num_heads=list(arch.vision_heads),
        num_groups=list(arch.vision_heads),
        depths=list(arch.vision_depths),
        window_size=arch.window_size,
        projection_dim=arch.text_width,
        drop_path_rate=0.0,
    )
    text = BartConfig(
        vocab_size=vocab_size,
        d_model=arch.text_width,
        encoder_layers=arch.text_layers,
        decoder_layers=arch.text_layers,
        encoder_attention_heads=arch.text_heads,
        decoder_attention_heads=arch.text_heads,
        encoder_ffn_dim=arch.text_ffn,
        decoder_ffn_dim=arch.text_ffn,
        max_position_embeddings=1024,
        scale_embedding=False,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    return Florence2Config(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=image_token_id,
        tie_word_embeddings=True,
    )


def build_generation_config() -> GenerationConfig:
    """The generation defaults the real Florence-2 checkpoints ship (beam search with 3 beams)."""
    return GenerationConfig(
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_bos_token_id=0,
        forced_eos_token_id=2,
        no_repeat_ngram_size=3,
        num_beams=3,
        early_stopping=True,
        max_new_tokens=1024,
    )


def _redraw_weights(model: Florence2ForConditionalGeneration, seed: int, std: float) -> None:
    """With the default std of 0.02 a tiny random model says the same token whatever it sees, which would make a
    parity test blind. Wider weights make the output depend on the image and the prompt."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2 and "pos_idx_to_embed" not in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def _make_answers_end(model: Florence2ForConditionalGeneration, processor: Florence2Processor, pull: float) -> None:
    """Random models rarely emit ``</s>``, so beam search's finished-beam logic would go untested. Pull the EOS row
    of the tied embedding towards the token the model emits most, so answers end at varied lengths."""
    from PIL import Image

    images = [Image.new("RGB", (64, 48), colour) for colour in ("red", "navy", "white")]
    inputs = processor(text=["<OD>", "<CAPTION>", "<OCR>"], images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=24, num_beams=1, do_sample=False)
    counts = torch.bincount(tokens[:, 2:].flatten(), minlength=model.config.text_config.vocab_size)
    counts[:4] = 0  # never pull EOS towards a special token
    frequent = int(counts.argmax())
    embedding = model.get_input_embeddings().weight
    with torch.no_grad():
        embedding[2] = (1 - pull) * embedding[2] + pull * embedding[frequent]


def make_tiny_florence2(
    output_dir: str | Path,
    *,
    seed: int = 0,
    image_size: int = 768,
    large_style: bool = False,
    architecture: TinyArchitecture | None = None,
    weight_std: float | None = 0.2,
    eos_pull: float | None = 0.8,
    vocab_size: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Build and save a tiny random-weight Florence-2 in transformers' native layout. Returns ``output_dir``.

    The folder loads with ``AutoProcessor.from_pretrained`` and ``AutoModelForImageTextToText.from_pretrained``
    exactly like ``florence-community/Florence-2-base-ft``, and converts with ``helpers.convert_florence2``.
    A finished folder is reused unless ``overwrite``; it is written to a temporary folder first and renamed, so an
    interrupted build never looks finished. ``weight_std=None`` keeps transformers' default initialisation,
    ``eos_pull=None`` skips the EOS pull, ``vocab_size`` pads the vocabulary (the real checkpoints use 51328).
    """
    output_dir = Path(output_dir)
    if (output_dir / "model.safetensors").exists() and not overwrite:
        return output_dir
    arch = architecture or (TinyArchitecture.large_style() if large_style else TinyArchitecture())
    torch.manual_seed(seed)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(output_dir)  # what killed builds left (≈1 GB each for base-random)
    with staged_folder(output_dir) as staging:
        tokenizer = build_tokenizer(staging, seed=seed)
        processor = build_processor(tokenizer, image_size)
        padded = (len(tokenizer) + 63) // 64 * 64  # the real checkpoints pad their vocabulary too
        config = build_config(max(padded, vocab_size or 0), tokenizer.image_token_id, arch)
        model = Florence2ForConditionalGeneration(config).eval()
        if weight_std is not None:
            _redraw_weights(model, seed, weight_std)
        if eos_pull is not None:
            _make_answers_end(model, processor, eos_pull)
        model.generation_config = build_generation_config()
        setattr(
            model.config, MODEL_KIND_KEY, "random"
        )  # what helpers.course.model_kind.model_kind reads: answers are noise
        for leftover in ("vocab.json", "merges.txt"):
            (staging / leftover).unlink()
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    return output_dir


#: Presets of :func:`make_random_florence2`: architecture and build options.
RANDOM_PRESETS: dict[str, dict] = {
    "tiny": {},
    "base": {
        "architecture": TinyArchitecture.florence2_base(),
        "weight_std": None,  # transformers' default init: realistic activation scales for speed measurements
        "eos_pull": None,
        "vocab_size": 51328,
    },
    "large": {
        "architecture": TinyArchitecture.florence2_large(),
        "weight_std": None,
        "eos_pull": None,
        "vocab_size": 51328,
    },
}


def make_random_florence2(
    output_dir: str | Path, preset: str = "base", *, seed: int = 0, overwrite: bool = False
) -> Path:
    """Build a random-weight Florence-2 of a named size offline: ``"base"`` is the full Florence-2-base
    architecture (231M parameters, ~0.9 GB) for honest speed and memory measurements, ``"large"`` Florence-2-large's
    (0.77 B, ~3.1 GB); ``"tiny"`` is
    :func:`make_tiny_florence2`'s default. Answers are noise. Used by ``benchmarks/benchmark.py`` and
    ``notebooks/11_speed.ipynb``."""
    if preset not in RANDOM_PRESETS:
        raise ValueError(f"preset must be one of {', '.join(RANDOM_PRESETS)}; got {preset!r}.")
    return make_tiny_florence2(output_dir, seed=seed, overwrite=overwrite, **RANDOM_PRESETS[preset])
