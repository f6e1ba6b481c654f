"""Train a small Florence-2 on generated scenes, on the CPU, reproducibly: the teaching model.

The shipped model (``helpers/data/teaching-model``, v4) was made in seven rounds, each one command
(``training.json`` beside the weights records the commands, seeds, thread counts and minutes)::

    # rounds 1 and 2 (v1: six tasks, classic scenes): random weights, then new scenes with soft location targets
    python -m helpers.course.teaching.train --output build/teaching-round1 --steps 2000 --seed 0
    python -m helpers.course.teaching.train --output build/teaching-v1 --init-from build/teaching-round1 \
        --pretrain-steps 0 --steps 1000 --seed 1 --learning-rate 5e-4
    # round 3 (v2): all 15 tasks on classic and varied scenes, 6 of a scene's examples per step, from v1
    python -m helpers.course.teaching.train --output build/teaching-v2 --init-from build/teaching-v1 \
        --pretrain-steps 0 --steps 1000 --seed 2 --learning-rate 1e-3 --tasks-per-scene 6 --max-minutes 80
    # round 4 (v3): the tasks furthest from their aim always (--focus), 3 other examples per scene, from v2
    python -m helpers.course.teaching.train --output build/teaching-v3 --init-from build/teaching-v2 \
        --pretrain-steps 0 --steps 800 --seed 3 --learning-rate 7e-4 --tasks-per-scene 3 --max-minutes 68 \
        --focus '<OCR>' '<REGION_TO_OCR>' '<OCR_WITH_REGION>' '<DENSE_REGION_CAPTION>' \
        '<REFERRING_EXPRESSION_SEGMENTATION>' '<DETAILED_CAPTION>'
    # rounds 5-7 (v4): reading. The word heads read the tokens the word covers (--word-read cells); the OCR tasks
    # always train. Round 6 was cut at step 750 (captions fell with only weak tasks in focus); round 7 balances.
    python -m helpers.course.teaching.train --output build/teaching-v5 --init-from build/teaching-v3 \
        --pretrain-steps 400 --pretrain-learning-rate 1e-3 --steps 500 --seed 5 --learning-rate 5e-4 \
        --tasks-per-scene 3 --aux-weight 1.0 --word-read cells --max-minutes 38 \
        --focus '<OCR>' '<REGION_TO_OCR>' '<OCR_WITH_REGION>' '<DETAILED_CAPTION>' '<MORE_DETAILED_CAPTION>'
    python -m helpers.course.teaching.train --output build/teaching-v6 --init-from build/teaching-v5 \
        --pretrain-steps 0 --steps 2800 --seed 6 --learning-rate 5e-4 --threads 2 --tasks-per-scene 3 \
        --aux-weight 1.0 --word-read cells --stop-after 750 \
        --focus '<OCR>' '<REGION_TO_OCR>' '<OCR_WITH_REGION>' '<DENSE_REGION_CAPTION>' \
        '<REFERRING_EXPRESSION_SEGMENTATION>' '<OPEN_VOCABULARY_DETECTION>' '<DETAILED_CAPTION>'
    python -m helpers.course.teaching.train --output build/teaching-v4 --init-from build/teaching-v6 \
        --pretrain-steps 0 --steps 2000 --seed 7 --learning-rate 4e-4 --threads 2 --tasks-per-scene 6 \
        --aux-weight 1.0 --word-read cells --max-minutes 68 --focus '<OCR>' '<REGION_TO_OCR>' '<OCR_WITH_REGION>' '<CAPTION>'

``--max-minutes`` stops a round after the step that passes a wall-clock budget (round 3 finished its 1000 steps in
73 minutes, inside it; ``training.json`` records ``steps_done``); ``--stop-after N`` repeats a run cut short by the
budget exactly, whatever the machine's speed.

What it does (each part is one function below, so a notebook can show them one at a time):

1. :func:`build_model` — a small Florence-2 in transformers' native layout, built with :mod:`helpers.course.tiny`'s
   tokenizer, processor and config builders: 192-pixel input (37 image tokens instead of the real models' 577), a
   4-stage DaViT vision tower and a 3+3-layer BART of width 160, 4.7M parameters. Weights keep transformers' normal
   initialisation (std 0.02), not the wide random weights of the parity model.
2. :func:`make_batch` — fresh scenes every step (:mod:`helpers.course.teaching.scenes`; the data never repeats), the
   ``(prompt, target)`` pairs of every task (or ``tasks_per_scene`` of them) per scene, tokenised; padding in the
   labels becomes ``-100`` (ignored). :func:`make_length_batches` splits a step's pairs by length.
3. :func:`training_loss` — teacher forcing: ``Florence2ForConditionalGeneration`` takes ``labels`` and shifts them
   right itself. The vision tower runs once per *image*, not once per task: its features are scattered into each
   task's ``<image>`` positions, exactly as the model's own ``forward`` does.
4. :func:`train` — stage 1 pre-trains the vision tower on dense labels (:class:`AuxiliaryHeads`), stage 2 trains
   everything on the tasks with AdamW, warm-up and cosine decay, gradient clipping. Why two stages: trained
   end to end from random weights, the model learned the *language* of the answers and ignored the pictures — after
   500 steps its loss was the same with the images swapped between scenes (:func:`image_use` measures exactly that;
   it is logged). The real Florence-2 starts from a pre-trained image encoder for the same reason.
5. :func:`save_model` — ``save_pretrained`` for model and processor, with a generation config like the real
   checkpoints' (3 beams; see :func:`teaching_generation_config` for ``no_repeat_ngram_size``).

Threads: one by default. On a 2-core machine shared with other jobs, two PyTorch threads were 5–7× *slower* than
one (measured: 5–7 s instead of 0.75 s per step; the threads wait for each other whenever one is descheduled).
Reproducible: the same arguments and thread count give the same weights. Taught in ``notebooks/12_fine_tune.ipynb``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from helpers.course.model_kind import MODEL_KIND_KEY
from helpers.course.teaching.scenes import (
    CATEGORIES,
    COLOURS,
    SHAPE_KINDS,
    TEACHING_TASKS,
    WORDS,
    Scene,
    examples,
    label_map,
    training_scene,
)
from helpers.course.tiny import (
    VISION_STRIDE,
    TinyArchitecture,
    build_config,
    build_generation_config,
    build_processor,
    build_tokenizer,
)

#: The teaching model's size: big enough to learn the 15 tasks in a few CPU hours, small enough to ship (19 MB in fp32).
TEACHING_ARCHITECTURE = TinyArchitecture(
    vision_dims=(32, 64, 128, 192),
    vision_heads=(1, 2, 4, 6),
    vision_depths=(1, 1, 2, 1),
    text_width=160,
    text_layers=3,
    text_heads=4,
    text_ffn=512,
    window_size=6,  # divides every stage's grid at 192 px (48, 24, 12, 6): no padded windows
)
#: Input size: 192 px gives 6×6 + 1 = 37 image tokens (the real models: 768 px, 577 tokens).
IMAGE_SIZE = 192
#: Longest answer the teaching model needs (the paragraph caption of four shapes and a word is about 160 tokens);
#: also bounds a bad answer.
MAX_NEW_TOKENS = 192


@dataclass
class TrainConfig:
    """Everything that determines the trained weights (written next to them as ``training.json``)."""

    steps: int = 2000
    seed: int = 0
    scenes_per_step: int = 8
    learning_rate: float = 1.5e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    threads: int = 1
    pretrain_steps: int = 300
    pretrain_scenes_per_step: int = 16
    pretrain_learning_rate: float = 2e-3
    aux_weight: float = 0.5
    init_from: str | None = None
    loc_sigma: float = 6.0
    tasks_per_scene: int = 0  # 0: every example of every scene; else this many, drawn per scene and step
    # Task tokens whose examples are always drawn, on top of ``tasks_per_scene`` others: a later round spends its
    # steps on the tasks the quality table says are furthest from their aim.
    focus_tasks: tuple[str, ...] = ()
    # What the auxiliary word heads read (:class:`AuxiliaryHeads`): "pooled" (the shipped model's rounds) or "cells".
    word_read: str = "pooled"


#: The auxiliary word heads' inputs: the pooled image token, or the grid tokens the word covers.
WORD_READS = ("pooled", "cells")
#: Each final image token predicts a SUBCELLS × SUBCELLS patch of the scene's label map during pre-training.
SUBCELLS = 4
#: Scene indices of the pre-training stage start here, so the two stages never draw the same scene.
PRETRAIN_SCENE_OFFSET = 50_000_000


#: The label map's classes split into a colour map and a shape map: in a short measured comparison the factorised
#: targets were learned several times faster than the 17 joint classes.
_COLOUR_OF = torch.tensor([0] + [1 + list(COLOURS).index(c.split()[0]) for c in CATEGORIES] + [len(COLOURS) + 1])
_SHAPE_OF = torch.tensor([0] + [1 + SHAPE_KINDS.index(c.split()[1]) for c in CATEGORIES] + [len(SHAPE_KINDS) + 1])
#: The label map's class id of a word's box (the last of ``LABEL_CLASSES``).
TEXT_CLASS = len(_COLOUR_OF) - 1
#: Largest image grid the position heads handle (a 192-pixel input has 6 × 6 tokens).
MAX_GRID = 16
#: Background covers most of the label map; its weight in the loss keeps the heads from answering "background".
BACKGROUND_WEIGHT = 0.3


class AuxiliaryHeads(torch.nn.Module):
    """Training-only linear heads; they are not part of Florence-2 and are not saved with it.

    ``*_dense`` reads each of the 36 spatial image tokens and predicts, for the 4×4 patch of the label map it covers
    (8×8 pixels each at 192 px), the colour (background, five colours, text) and the shape (background, three
    shapes, text): that teaches what is where to within 8 pixels. ``*_word`` predicts which word, if any, the scene
    shows: from the pooled image token (``word_read="pooled"``, every round of the shipped model), or from the mean
    of the grid tokens the word's box covers (``"cells"``, :func:`word_features`) — in the pooled token a 15-pixel
    word is a small share, and the shipped model never learned to read. ``*_where`` predicts each grid token's row and column: the BART
    encoder otherwise loses where a token is (measured: a linear probe found a token's row in the encoder's output
    only 44–57% of the time, against 98% before the encoder), and without it the decoder cannot write
    coordinates — ``<OD>`` learned x but not y. ``vision_*`` read the vision tower's output (through the
    projector), ``encoder_*`` the BART encoder's output at the image positions, so the encoder keeps the image
    information available to the decoder instead of washing it out.
    """

    def __init__(self, width: int, word_read: str = "pooled") -> None:
        super().__init__()
        if word_read not in WORD_READS:
            raise ValueError(f"word_read must be one of {', '.join(WORD_READS)}, got {word_read!r}")
        self.word_read = word_read
        dense_out = SUBCELLS * SUBCELLS * (len(COLOURS) + 2 + len(SHAPE_KINDS) + 2)
        self.vision_dense = torch.nn.Linear(width, dense_out)
        self.vision_word = torch.nn.Linear(width, len(WORDS) + 1)
        self.encoder_dense = torch.nn.Linear(width, dense_out)
        self.encoder_word = torch.nn.Linear(width, len(WORDS) + 1)
        self.vision_where = torch.nn.Linear(width, 2 * MAX_GRID)
        self.encoder_where = torch.nn.Linear(width, 2 * MAX_GRID)

    def _loss(self, dense_head, word_head, where_head, tokens, dense, words) -> tuple[torch.Tensor, float, float]:
        # Florence-2's projector puts the pooled (mean) token first, then the grid tokens in raster order.
        cells, subcells = dense.shape[1], SUBCELLS * SUBCELLS
        grid = math.isqrt(cells)
        n_colours, n_shapes = len(COLOURS) + 2, len(SHAPE_KINDS) + 2
        logits = dense_head(tokens[:, 1 : 1 + cells]).view(len(tokens), cells, subcells, n_colours + n_shapes)
        colour, shape = _COLOUR_OF[dense], _SHAPE_OF[dense]
        weight_c = torch.ones(n_colours)
        weight_c[0] = BACKGROUND_WEIGHT
        weight_s = torch.ones(n_shapes)
        weight_s[0] = BACKGROUND_WEIGHT
        loss = torch.nn.functional.cross_entropy(
            logits[..., :n_colours].flatten(0, 2), colour.flatten(), weight=weight_c
        )
        loss = loss + torch.nn.functional.cross_entropy(
            logits[..., n_colours:].flatten(0, 2), shape.flatten(), weight=weight_s
        )
        word_logits = word_head(word_features(tokens, dense) if self.word_read == "cells" else tokens[:, 0])
        loss = loss + torch.nn.functional.cross_entropy(word_logits, words)
        # Where is each token? Its row and column, so the absolute position survives to the decoder.
        where = where_head(tokens[:, 1 : 1 + cells]).view(len(tokens), grid, grid, 2, MAX_GRID)[..., :grid]
        rows = torch.arange(grid).view(1, grid, 1).expand(len(tokens), grid, grid)
        cols = torch.arange(grid).view(1, 1, grid).expand(len(tokens), grid, grid)
        loss = loss + torch.nn.functional.cross_entropy(where[..., 0, :].flatten(0, 2), rows.flatten())
        loss = loss + torch.nn.functional.cross_entropy(where[..., 1, :].flatten(0, 2), cols.flatten())
        objects = dense > 0
        right = (logits[..., :n_colours].argmax(-1) == colour) & (logits[..., n_colours:].argmax(-1) == shape)
        accuracy = right[objects].float().mean().item() if objects.any() else 0.0
        return loss, accuracy, (word_logits.argmax(-1) == words).float().mean().item()

    def vision_loss(self, tokens, dense, words):
        return self._loss(self.vision_dense, self.vision_word, self.vision_where, tokens, dense, words)

    def encoder_loss(self, tokens, dense, words):
        return self._loss(self.encoder_dense, self.encoder_word, self.encoder_where, tokens, dense, words)


def word_features(tokens: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """What the word heads read, per scene: the mean of the grid tokens whose label-map patch holds part of the
    word's box, or the pooled image token (first) for a scene without a word. ``tokens`` is
    ``(scenes, 1 + cells, width)``, ``dense`` the :func:`dense_targets` patches ``(scenes, cells, SUBCELLS²)``."""
    cells = dense.shape[1]
    text_cells = (dense == TEXT_CLASS).any(-1, keepdim=True).to(tokens.dtype)  # (scenes, cells, 1)
    written = text_cells.sum(1)  # how many cells the word covers; 0 without a word
    word_read = (tokens[:, 1 : 1 + cells] * text_cells).sum(1) / written.clamp(min=1)
    return torch.where(written > 0, word_read, tokens[:, 0])


def build_model(
    seed: int = 0,
    *,
    architecture: TinyArchitecture = TEACHING_ARCHITECTURE,
    image_size: int = IMAGE_SIZE,
    structured: bool = True,
):
    """An untrained small Florence-2 and its processor. Returns ``(model, processor)``.

    Every weight keeps transformers' normal initialisation except, with ``structured``, two position tables that
    from scratch would take thousands of steps to find their order: the ``<loc_N>`` token embeddings
    (:func:`structure_location_embeddings`) and the image's 2D position embeddings (:func:`structure_image_positions`).
    """
    from transformers import Florence2ForConditionalGeneration

    torch.manual_seed(seed)
    processor = build_teaching_processor(seed, image_size)
    tokenizer = processor.tokenizer
    vocab_size = (len(tokenizer) + 63) // 64 * 64
    config = build_config(vocab_size, tokenizer.image_token_id, architecture)
    model = Florence2ForConditionalGeneration(config)
    model.generation_config = teaching_generation_config()
    if structured:
        structure_location_embeddings(model, processor)
        structure_image_positions(model)
    return model, processor


def build_teaching_processor(seed: int = 0, image_size: int = IMAGE_SIZE):
    """The teaching model's processor (tokenizer, image processor, post-processing rules), built offline without
    weights: what :func:`build_model` gives its model, and what the tests parse targets with."""
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_tokenizer(Path(scratch), seed=seed)
    return build_processor(tokenizer, image_size)


def teaching_generation_config():
    """The real checkpoints' generation settings (beam search with 3 beams, forced BOS/EOS), with two changes:

    * ``no_repeat_ngram_size=0``: with 3 (the real value) beam search may never write the same three tokens twice.
      The teaching model's small BPE vocabulary spells words in pieces (``two`` is ``t w o``), so a correct
      grounding answer such as ``two red circles<loc…>two blue squares<loc…>`` would be forbidden. Measured with
      ``python -m helpers.course.teaching.quality --no-repeat-ngram 3`` (see the model's README).
    * ``max_new_tokens`` = :data:`MAX_NEW_TOKENS` instead of 1024: every right answer is far shorter.
    """
    config = build_generation_config()
    config.no_repeat_ngram_size = 0
    config.max_new_tokens = MAX_NEW_TOKENS
    return config


def structure_location_embeddings(model, processor) -> None:
    """Give the 1000 ``<loc_N>`` embeddings an order: row N becomes a sinusoidal code of N (periods from 2000 bins
    down to 4), scaled to the other rows' mean norm, so neighbouring bins are similar vectors.

    The embedding is tied to the output layer, so a hidden state that encodes a position as sines and cosines scores
    the bins near it highest: coordinates become a smooth readout instead of 1000 unrelated classes, each learned
    from the few examples that use it. (Measured: after 3300 steps with unordered embeddings, neighbouring bins
    were no more alike than distant ones and <OD> mAP@0.5 stayed near 0.01.)
    """
    first = processor.tokenizer.convert_tokens_to_ids("<loc_0>")
    weight = model.get_input_embeddings().weight
    width = weight.shape[1]
    periods = torch.logspace(math.log10(2000.0), math.log10(4.0), width // 2)
    angles = 2 * math.pi * torch.arange(1000, dtype=torch.float32)[:, None] / periods[None, :]
    codes = torch.zeros(1000, width)
    codes[:, 0 : 2 * (width // 2) : 2] = torch.cos(angles)
    codes[:, 1 : 2 * (width // 2) : 2] = torch.sin(angles)
    with torch.no_grad():
        others = torch.cat([weight[:first], weight[first + 1000 :]])
        scale = others.norm(dim=1).mean() / codes.norm(dim=1).mean()
        weight[first : first + 1000] = codes * scale


def structure_image_positions(model, scale: float = 1.0) -> None:
    """Start the projector's learned 2D position embeddings (one row and one column table, added to the image
    features) as sinusoidal codes with standard deviation ``scale``.

    Florence-2 initialises them with std 0.02 while the image features they are added to are about 1: from scratch,
    a token then hardly knows where in the picture it is, and the decoder could not learn where things are.
    (Measured before this: a linear probe read a token's row from the encoder output only 57% of the time, and
    ``<OD>`` y coordinates did not follow the objects at all — boxes stayed put when the image was flipped.)
    """
    embed = model.model.multi_modal_projector.image_position_embed
    with torch.no_grad():
        for table in (embed.row_embeddings.weight, embed.column_embeddings.weight):
            count, width = table.shape
            periods = torch.logspace(math.log10(4.0 * count), math.log10(2.0), (width + 1) // 2)
            angles = 2 * math.pi * torch.arange(count, dtype=torch.float32)[:, None] / periods[None, :]
            codes = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)[:, :width]
            table.copy_(codes / codes.std() * scale)


def _grid(processor) -> int:
    return processor.image_processor.size["height"] // VISION_STRIDE


def dense_targets(scenes: list[Scene], grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Label-map patches ``(scenes, grid², SUBCELLS²)`` and word ids ``(scenes,)`` for :class:`AuxiliaryHeads`."""
    side = grid * SUBCELLS
    maps = np.stack([label_map(scene, (side, side)) for scene in scenes]).astype(np.int64)
    patches = maps.reshape(len(scenes), grid, SUBCELLS, grid, SUBCELLS).transpose(0, 1, 3, 2, 4)
    words = [WORDS.index(scene.text.text) if scene.text else len(WORDS) for scene in scenes]
    return torch.from_numpy(patches.reshape(len(scenes), grid * grid, SUBCELLS * SUBCELLS).copy()), torch.tensor(words)


def draw_pairs(scenes: list[Scene], rng: random.Random, tasks_per_scene: int = 0,
               focus_tasks: Sequence[str] = ()) -> list[tuple[int, str, str]]:  # fmt: skip
    """``(scene number, prompt, target)`` for the scenes' examples (:func:`helpers.course.teaching.scenes.examples`;
    with ``tasks_per_scene``, that many of each scene's, drawn with ``rng``, plus every example of a task in
    ``focus_tasks``)."""
    rows = []
    for i, scene in enumerate(scenes):
        pairs = examples(scene, rng)
        focused = [pair for pair in pairs if pair[0].startswith(tuple(focus_tasks))] if focus_tasks else []
        others = [pair for pair in pairs if pair not in focused]
        if tasks_per_scene and tasks_per_scene < len(others):
            others = rng.sample(others, tasks_per_scene)
        rows.extend((i, prompt, target) for prompt, target in [*focused, *others])
    return rows


def make_batch(scenes: list[Scene], processor, rng: random.Random, tasks_per_scene: int = 0,
               rows: list[tuple[int, str, str]] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Tokenise the ``(prompt, target)`` pairs of every scene (:func:`draw_pairs`), or the given ``rows``.

    Returns ``pixel_values`` (one per scene), ``image_index`` (the scene of each row), ``input_ids``,
    ``attention_mask``, ``labels`` (target ids with padding set to ``-100``), and the pre-training targets
    ``dense`` and ``words`` (one per scene, see :func:`dense_targets`).
    """
    rows = rows if rows is not None else draw_pairs(scenes, rng, tasks_per_scene)
    image_index = [i for i, _, _ in rows]
    prompts = [prompt for _, prompt, _ in rows]
    targets = [target for _, _, target in rows]
    images = [scene.image for scene in scenes]
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    # The processor expands each task token to its prompt text and prepends the <image> placeholders.
    text = processor(text=prompts, images=[images[i] for i in image_index], return_tensors="pt", padding=True)
    labels = processor.tokenizer(targets, return_tensors="pt", padding=True)["input_ids"]
    labels[labels == processor.tokenizer.pad_token_id] = -100
    dense, words = dense_targets(scenes, _grid(processor))
    return {
        "pixel_values": pixel_values,
        "image_index": torch.tensor(image_index),
        "input_ids": text["input_ids"],
        "attention_mask": text["attention_mask"],
        "labels": labels,
        "dense": dense,
        "words": words,
    }


def make_length_batches(scenes: list[Scene], processor, rng: random.Random, tasks_per_scene: int = 0,
                        buckets: int = 2, focus_tasks: Sequence[str] = ()) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """:func:`make_batch` split into ``buckets`` batches of similar prompt + target length: a paragraph caption
    beside a one-word OCR answer would otherwise pad every row to the paragraph (measured: 2× faster steps)."""
    rows = sorted(draw_pairs(scenes, rng, tasks_per_scene, focus_tasks), key=lambda row: len(row[1]) + len(row[2]))
    size = math.ceil(len(rows) / buckets)
    return [make_batch(scenes, processor, rng, rows=rows[i : i + size]) for i in range(0, len(rows), size)]


def location_soft_loss(logits: torch.Tensor, labels: torch.Tensor, first_loc_id: int, sigma: float) -> torch.Tensor:
    """Cross-entropy where a ``<loc_N>`` target is a Gaussian over the neighbouring bins (``sigma`` in bins).

    With plain cross-entropy ``<loc_500>`` and ``<loc_501>`` are as different as ``<loc_500>`` and ``<loc_9>``:
    each of the 1000 bins has to be learned on its own from the few examples that use it. A soft target tells the
    model that a bin next to the right one is nearly right, which teaches coordinates far faster (the same idea as
    the "distribution focal loss" of object detectors). Other tokens keep their one-hot targets.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    valid = labels != -100
    safe = labels.clamp(min=0)
    loss = -log_probs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    bins = safe - first_loc_id
    is_loc = valid & (bins >= 0) & (bins < 1000)
    if is_loc.any():
        centre = bins[is_loc].unsqueeze(-1).float()
        grid = torch.arange(1000, dtype=torch.float32)
        target = torch.softmax(-((grid - centre) ** 2) / (2 * sigma**2), dim=-1)
        loc_log_probs = log_probs[is_loc][:, first_loc_id : first_loc_id + 1000]
        loss = loss.masked_scatter(is_loc, -(target * loc_log_probs).sum(-1))
    return loss[valid].mean()


def training_loss(model, batch: dict[str, torch.Tensor], *, heads: AuxiliaryHeads | None = None,
                  loc_sigma: float = 0.0, first_loc_id: int | None = None):  # fmt: skip
    """Cross-entropy of the targets under teacher forcing, running the vision tower once per image.
    ``loc_sigma > 0`` uses :func:`location_soft_loss` (needs ``first_loc_id``, the id of ``<loc_0>``).

    With ``heads``, returns ``(loss, aux_loss, aux_accuracy, word_accuracy)``: the auxiliary losses of the vision
    tower and of the encoder at the image positions too, the share of object pixels the encoder's head gets right
    and the share of scenes whose word (or "no word") it names (see :class:`AuxiliaryHeads`).
    """
    features = model.get_image_features(batch["pixel_values"]).pooler_output  # (images, image tokens, width)
    input_ids = batch["input_ids"]
    embeddings = model.get_input_embeddings()(input_ids)
    placeholders = (input_ids == model.config.image_token_id).unsqueeze(-1)
    embeddings = embeddings.masked_scatter(placeholders, features[batch["image_index"]].to(embeddings.dtype))
    output = model(inputs_embeds=embeddings, attention_mask=batch["attention_mask"], labels=batch["labels"])
    lm_loss = output.loss
    if loc_sigma > 0:
        lm_loss = location_soft_loss(output.logits, batch["labels"], first_loc_id, loc_sigma)
    if heads is None:
        return lm_loss
    image_tokens = features.shape[1]  # the processor puts the image placeholders first in every row
    encoded = output.encoder_last_hidden_state[:, :image_tokens]
    index = batch["image_index"]
    aux, accuracy, word_accuracy = heads.encoder_loss(encoded, batch["dense"][index], batch["words"][index])
    vision_aux, _, _ = heads.vision_loss(features, batch["dense"], batch["words"])
    return lm_loss, aux + vision_aux, accuracy, word_accuracy


def image_use(model, batch: dict[str, torch.Tensor]) -> float:
    """How much the model uses the images: its loss with the batch's images swapped between scenes, minus its loss
    with the right images. About 0 means the model ignores the pictures (answers from language habits alone)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        right = training_loss(model, batch).item()
        swapped = training_loss(model, {**batch, "pixel_values": batch["pixel_values"].roll(1, 0)}).item()
    model.train(was_training)
    return swapped - right


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak (``step`` counts stage-2 steps)."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _part(name: str) -> str:
    if name.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
        return "vision"
    return "text"


def train(
    model,
    processor,
    config: TrainConfig,
    *,
    log_every: int = 50,
    checkpoint: Path | None = None,
    checkpoint_every: int = 250,
    log=print,
    history: list[dict] | None = None,
    max_minutes: float | None = None,
    stop_after: int | None = None,
    snapshot=None,
) -> list[float]:
    """Train ``model`` in place; returns the language-model loss of every stage-2 step (``history``, if given,
    receives every logged line as a dict).

    Stage 1 (``pretrain_steps``): only the vision tower and projector learn, from the dense labels of
    :class:`AuxiliaryHeads` — the real Florence-2 also starts from a pre-trained image encoder. Trained from scratch
    end to end, the model learned its answers' language first and then ignored the images (measured: equal loss
    with swapped images after 500 steps). Stage 2 (``steps``): everything learns the tasks, with the auxiliary
    loss kept at ``aux_weight`` on the encoder's output.

    With ``checkpoint``, model, heads, optimiser and step are saved there every ``checkpoint_every`` steps and a
    run restarted with the same arguments continues from the last one (a busy shared machine may kill long jobs);
    ``snapshot`` (a function of the step) is called at the same moments, e.g. to save the model so far. With
    ``max_minutes``, training stops after the first step that ends past that wall-clock budget (the run is then
    shorter than ``config.steps``; the history says where it stopped). ``stop_after`` stops after that many steps
    (counting both stages) without changing the schedule: it repeats a budget-stopped run exactly.
    """
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    heads = AuxiliaryHeads(model.config.text_config.d_model, config.word_read)
    groups: dict[tuple[str, bool], list] = {}
    for name, parameter in [*model.named_parameters(), *(("heads." + n, p) for n, p in heads.named_parameters())]:
        part = "heads" if name.startswith("heads.") else _part(name)
        groups.setdefault((part, parameter.dim() >= 2 and "embed" not in name), []).append(parameter)
    optimizer = torch.optim.AdamW(
        [
            {"params": params, "weight_decay": config.weight_decay if decays else 0.0, "part": part}
            for (part, decays), params in groups.items()
        ],
        lr=config.learning_rate,
        betas=(0.9, 0.98),
    )
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    losses: list[float] = []
    history = history if history is not None else []
    start_step = 0
    if checkpoint is not None and (checkpoint / "state.pt").exists():
        state = torch.load(checkpoint / "state.pt", weights_only=True)
        if state["config"] == asdict(config):
            model.load_state_dict(state["model"])
            heads.load_state_dict(state["heads"])
            optimizer.load_state_dict(state["optimizer"])
            losses, start_step = state["losses"], state["step"]
            history[:] = state["history"]
            log(f"resuming from step {start_step} ({checkpoint})")
    probe = make_batch([training_scene(config.seed, 90_000_000 + i) for i in range(6)], processor, random.Random(0))
    grid = _grid(processor)
    first_loc_id = processor.tokenizer.convert_tokens_to_ids("<loc_0>")
    total = config.pretrain_steps + config.steps
    model.train()
    started = time.perf_counter()
    recent: dict[str, list[float]] = {}
    for step in range(start_step, total):
        stage = 1 if step < config.pretrain_steps else 2
        # Each step's scenes and choices depend only on (seed, step): resuming gives the same run.
        rng = random.Random(f"florence2-teaching-batch/{config.seed}/{step}")
        if stage == 1:
            n = config.pretrain_scenes_per_step
            scenes = [training_scene(config.seed, PRETRAIN_SCENE_OFFSET + step * n + i) for i in range(n)]
            pixel_values = processor.image_processor([s.image for s in scenes], return_tensors="pt")["pixel_values"]
            dense, words = dense_targets(scenes, grid)
            rate = config.pretrain_learning_rate * min(1.0, (step + 1) / 20)
            for group in optimizer.param_groups:
                group["lr"] = rate if group["part"] in ("vision", "heads") else 0.0
            features = model.get_image_features(pixel_values).pooler_output
            loss, accuracy, word_accuracy = heads.vision_loss(features, dense, words)
            values = {"vision loss": loss.item(), "object pixels right": accuracy, "words right": word_accuracy}
        else:
            s = step - config.pretrain_steps
            scenes = [
                training_scene(config.seed, s * config.scenes_per_step + i) for i in range(config.scenes_per_step)
            ]
            batches = make_length_batches(scenes, processor, rng, config.tasks_per_scene,
                                          focus_tasks=config.focus_tasks)  # fmt: skip
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(s, config)
            parts = [training_loss(model, batch, heads=heads, loc_sigma=config.loc_sigma, first_loc_id=first_loc_id)
                     for batch in batches]  # fmt: skip
            lm_loss = sum(part[0] for part in parts) / len(parts)
            aux = sum(part[1] for part in parts) / len(parts)
            accuracy, word_accuracy = parts[0][2], parts[0][3]
            loss = lm_loss + config.aux_weight * aux
            losses.append(lm_loss.item())
            values = {"loss": lm_loss.item(), "aux loss": aux.item(), "object pixels right": accuracy,
                      "words right": word_accuracy}  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.clip_norm)
        optimizer.step()
        for key, value in values.items():
            recent.setdefault(key, []).append(value)
        done = step + 1
        if log_every and (done % log_every == 0 or done == total or done == config.pretrain_steps):
            means = {key: sum(v) / len(v) for key, v in recent.items()}
            if stage == 2:
                means["image use"] = image_use(model, probe)
            history.append({"step": done, "stage": stage, **{k: round(v, 4) for k, v in means.items()}})
            per_step = (time.perf_counter() - started) / (done - start_step)
            log(f"stage {stage} step {done:5d}/{total}  " + "  ".join(f"{k} {v:.3f}" for k, v in means.items())
                + f"  {per_step:.2f} s/step  ~{(total - done) * per_step / 60:.0f} min left")  # fmt: skip
            recent = {}
        if checkpoint is not None and (done % checkpoint_every == 0) and done < total:
            checkpoint.mkdir(parents=True, exist_ok=True)
            state = {"model": model.state_dict(), "heads": heads.state_dict(), "optimizer": optimizer.state_dict(),
                     "step": done, "losses": losses, "history": history, "config": asdict(config)}  # fmt: skip
            torch.save(state, checkpoint / "state.tmp")
            (checkpoint / "state.tmp").replace(checkpoint / "state.pt")
        if snapshot is not None and done % checkpoint_every == 0 and done < total:
            model.eval()
            snapshot(done)
            model.train()
        if stop_after is not None and done >= stop_after and done < total:
            log(f"stopping after step {done} of {total} as asked")
            history.append({"step": done, "stage": stage, "stopped": "--stop-after"})
            break
        if max_minutes is not None and (time.perf_counter() - started) / 60 >= max_minutes and done < total:
            log(f"wall-clock budget of {max_minutes} min reached after step {done} of {total}: stopping here")
            history.append({"step": done, "stage": stage, "stopped": "wall-clock budget"})
            break
    model.eval()
    return losses


def save_model(model, processor, output_dir: str | Path, *, training: dict | None = None) -> Path:
    """``save_pretrained`` model and processor into ``output_dir`` (replaced atomically); ``training`` (the
    config and timings) goes to ``training.json`` beside them."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        # The mark lessons read with helpers.course.model_kind.model_kind: this model knows shape scenes only.
        setattr(model.config, MODEL_KIND_KEY, "teaching")
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if training is not None:
            (staging / "training.json").write_text(json.dumps(training, indent=2) + "\n")
        keep = output_dir / "README.md"  # a hand-written model card survives retraining
        if keep.exists():
            shutil.copy2(keep, staging / "README.md")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def train_teaching_model(output_dir: str | Path, config: TrainConfig, *, log=print, resume: bool = True,
                         max_minutes: float | None = None, stop_after: int | None = None,
                         command: str | None = None) -> Path:  # fmt: skip
    """Build, train and save the teaching model. Returns ``output_dir``. While it trains, the model so far is saved
    every 250 steps to ``<output_dir>-latest`` (so a run cut short still leaves something to evaluate)."""
    output_dir = Path(output_dir)
    if config.init_from:  # a second round: continue from a trained model (its processor comes along)
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        model = Florence2ForConditionalGeneration.from_pretrained(config.init_from, trust_remote_code=False)
        processor = AutoProcessor.from_pretrained(config.init_from, trust_remote_code=False)
        model.generation_config = teaching_generation_config()
    else:
        model, processor = build_model(config.seed)
    parameters = sum(p.numel() for p in model.parameters())
    log(f"teaching model: {parameters / 1e6:.2f}M parameters, {IMAGE_SIZE} px input; stage 1: "
        f"{config.pretrain_steps} steps of {config.pretrain_scenes_per_step} scenes; stage 2: {config.steps} steps "
        f"of {config.scenes_per_step} scenes × {config.tasks_per_scene or 'all'} tasks; {config.threads} thread(s)")  # fmt: skip
    checkpoint = output_dir.parent / f".{output_dir.name}.checkpoint" if resume else None
    started = time.perf_counter()
    history: list[dict] = []
    latest = output_dir.parent / f"{output_dir.name}-latest"

    def snapshot(step: int) -> None:
        save_model(model, processor, latest, training={"config": asdict(config), "step": step, "history": history})
        log(f"saved the model after step {step} to {latest}")

    losses = train(model, processor, config, checkpoint=checkpoint, log=log, history=history,
                   max_minutes=max_minutes, stop_after=stop_after, snapshot=snapshot)  # fmt: skip
    seconds = time.perf_counter() - started
    training = {
        "command": command,
        "config": asdict(config),
        "max_minutes": max_minutes,
        "stop_after": stop_after,
        "steps_done": history[-1]["step"] if history else 0,
        "architecture": asdict(TEACHING_ARCHITECTURE),
        "image_size": IMAGE_SIZE,
        "parameters": parameters,
        "wall_seconds_this_run": round(seconds, 1),
        "first_loss": round(losses[0], 4) if losses else None,
        "final_loss_mean_last_50": round(sum(losses[-50:]) / max(1, len(losses[-50:])), 4),
        "torch": torch.__version__,
        "history": history,
    }
    save_model(model, processor, output_dir, training=training)
    if checkpoint is not None:
        shutil.rmtree(checkpoint, ignore_errors=True)
    log(f"saved {output_dir} after {seconds / 60:.1f} min; final loss {training['final_loss_mean_last_50']}")
    return output_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m helpers.course.teaching.train", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--output", type=Path, required=True, help="folder to write (replaced when done)")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--scenes-per-step", type=int, default=TrainConfig.scenes_per_step)
    parser.add_argument("--learning-rate", type=float, default=TrainConfig.learning_rate)
    parser.add_argument("--threads", type=int, default=TrainConfig.threads)
    parser.add_argument("--pretrain-steps", type=int, default=TrainConfig.pretrain_steps,
                        help="stage 1: vision tower pre-training steps (0 skips it)")  # fmt: skip
    parser.add_argument("--pretrain-learning-rate", type=float, default=TrainConfig.pretrain_learning_rate,
                        help="stage 1's peak learning rate (lower it when continuing from trained weights)")  # fmt: skip
    parser.add_argument("--aux-weight", type=float, default=TrainConfig.aux_weight)
    parser.add_argument("--word-read", choices=WORD_READS, default=TrainConfig.word_read,
                        help="what the auxiliary word heads read: the pooled image token (the shipped rounds) or "
                        "the grid tokens the word covers")  # fmt: skip
    parser.add_argument("--loc-sigma", type=float, default=TrainConfig.loc_sigma,
                        help="soft targets for <loc_N> tokens: a Gaussian of this width in bins (0: plain)")  # fmt: skip
    parser.add_argument("--init-from", type=Path, default=None,
                        help="continue from this trained model folder instead of random weights")  # fmt: skip
    parser.add_argument("--tasks-per-scene", type=int, default=TrainConfig.tasks_per_scene,
                        help="examples drawn per scene and step (0: all of them)")  # fmt: skip
    parser.add_argument("--focus", nargs="+", default=[], metavar="TASK",
                        help="task tokens whose examples every scene always trains on (on top of --tasks-per-scene)")  # fmt: skip
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="wall-clock budget: stop (and save) after the step that passes it")  # fmt: skip
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after this many steps, schedule unchanged (repeats a budget-stopped run)")  # fmt: skip
    parser.add_argument("--no-resume", action="store_true", help="ignore a checkpoint left by an interrupted run")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.scenes_per_step < 1:
        parser.error("--steps and --scenes-per-step must be at least 1")
    config = TrainConfig(
        steps=args.steps, seed=args.seed, scenes_per_step=args.scenes_per_step,
        learning_rate=args.learning_rate, warmup_steps=min(TrainConfig.warmup_steps, max(1, args.steps // 10)),
        threads=args.threads, pretrain_steps=args.pretrain_steps, aux_weight=args.aux_weight,
        pretrain_learning_rate=args.pretrain_learning_rate, word_read=args.word_read,
        init_from=str(args.init_from) if args.init_from else None, loc_sigma=args.loc_sigma,
        tasks_per_scene=args.tasks_per_scene, focus_tasks=tuple(args.focus),
    )  # fmt: skip
    unknown = [task for task in args.focus if task not in TEACHING_TASKS]
    if unknown:
        parser.error(f"--focus: {', '.join(unknown)} not a teaching task; choose from {', '.join(TEACHING_TASKS)}")
    if args.max_minutes is not None and args.max_minutes <= 0:
        parser.error("--max-minutes must be positive")
    if args.stop_after is not None and args.stop_after < 1:
        parser.error("--stop-after must be at least 1")
    command = "python -m helpers.course.teaching.train " + " ".join(argv if argv is not None else sys.argv[1:])
    train_teaching_model(args.output, config, log=lambda line: print(line, file=sys.stderr, flush=True),
                         resume=not args.no_resume, max_minutes=args.max_minutes, stop_after=args.stop_after,
                         command=command)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
