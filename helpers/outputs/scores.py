"""Confidence scores for Florence-2's boxes, polygons and OCR regions, from the generation's own token probabilities.

Florence-2 writes a detection as text: a label followed by location tokens, e.g.
``car<loc_52><loc_332><loc_932><loc_774>``. Its post-processor turns that text into ``{"bboxes", "labels"}`` but
keeps no confidence, so tools built on it report 1.0 for everything. Here every answer instance gets a score:

* **Token probability** — while generating, transformers hands back the scores of every step
  (``output_scores=True``). For each generated token we take its probability under the distribution that step chose
  from: ``softmax`` of that step's processed scores (after transformers' logits processors such as the no-repeat
  n-gram ban or a forced token; renormalised, so greedy, beam search and sampling all give probabilities in [0, 1]).
  For beam search, ``beam_indices`` says which beam each token of the returned sequence came from.
* **Instance** — the tokens that make up one instance of the post-processed answer: its label tokens plus its location
  tokens (4 for a box, 8 for an OCR quadrilateral, all of a polygon's). An object label followed by two boxes gives
  two instances that share the label tokens.
* **Score** — the geometric mean of the instance's token probabilities, ``exp(mean(log p))``: 1.0 when the model was
  certain of every token, independent of how many tokens the label has. ``reduce="min"`` gives the probability of
  the least certain token instead (stricter: one doubtful coordinate sinks the instance).

Scores are added beside the answer, which stays exactly what :func:`helpers.tasks.run.run_task` returns:
``answer["scores"]`` for boxes, polygons and OCR quadrilaterals, and ``answer["bboxes_scores"]`` /
``answer["polygons_scores"]`` for ``<OPEN_VOCABULARY_DETECTION>`` (whose answer has both kinds).

Which tokens form which instance is found by reading the generated text with the same grammar as transformers'
``Florence2PostProcessor`` while tracking where each character came from; ``tests/test_scores.py`` checks on random
token sequences that this reading finds exactly the post-processor's instances. Text answers (captions, OCR
without regions, region-to-text tasks) have no instances and are refused with a clear error.

Which generator: scores need transformers' ``generate`` (``output_scores``), so on an ``OVFlorence2Model`` the scored
path runs ``generation="transformers"`` while :func:`helpers.tasks.run.run_task` takes the faster numpy loop by default.
At f32 (``EXACT_CONFIG``) both give the same tokens (``tests/test_scores.py``). At the CPU's default bf16 precision the
two loops round differently, so where two beams nearly tie they can choose differently (seen on 2 of 8 teaching
scenes, from token 6–7). For the exact answers the scores belong to, pass ``generation="transformers"`` to
``run_task`` too (``tests/test_scores.py::test_scored_answers_are_the_transformers_generators_answers``).

Memory: generate keeps one vocabulary-sized row of scores per step and beam until it returns (about 0.2 MB per
token and beam for the real models' 51k-token vocabulary); lower ``max_new_tokens`` for very long answers.

Taught in ``notebooks/05_detection.ipynb`` (scores on detections; ``reduce``); used by :mod:`helpers.cli.batch`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from helpers.tasks.run import (
    SCORED_TASKS,
    answer_rows,
    TASKS,
    batch_prompts,
    eos_ids,
    prepare_inputs,
    check_generate_kwargs,
    load_image,
    resolve_task,
)

__all__ = [
    "SCORED_TASKS",
    "Instance",
    "Reduce",
    "find_instances",
    "run_task_with_scores",
    "run_tasks_batch_with_scores",
    "score_answer",
    "token_log_probs",
]

Reduce = Literal["geometric_mean", "min"]

#: Where the scores go in each kind of answer (answer key holding the instances → key of their scores).
SCORE_KEYS: dict[str, str] = {
    "bboxes": "scores",
    "polygons": "scores",
    "quad_boxes": "scores",
}
_OPEN_VOCABULARY_SCORE_KEYS = {"bboxes": "bboxes_scores", "polygons": "polygons_scores"}


@dataclass(frozen=True)
class Instance:
    """One instance of an answer as it was generated. Taught in ``notebooks/05_detection.ipynb``.

    ``kind`` is ``"bboxes"``, ``"polygons"`` or ``"quad_boxes"`` (the answer key it lands in); ``label`` is the text
    the post-processor reads for it; ``shapes`` holds the location bins (0..999) of its box, quadrilateral or
    polygons as the post-processor keeps them (one tuple per polygon, a trailing unpaired bin dropped); ``tokens``
    are the positions, in the generated sequence, of the tokens it was made from (label tokens, then every location
    token, an unpaired one included).
    """

    kind: str
    label: str
    shapes: tuple[tuple[int, ...], ...]
    tokens: tuple[int, ...]


# ----------------------------------------------------------------------------------------------------------------
# Reading the generated text: which characters (and so which tokens) make each instance
# ----------------------------------------------------------------------------------------------------------------

_LOC = r"<loc_\d+>"
_LOC_VALUE = re.compile(r"<loc_(\d+)>")
# A box answer: a run of text (no "<") followed by four or more location tokens; or, when labels may be empty
# (<REGION_PROPOSAL>), the location tokens alone. Every four consecutive locations are one box.
_LABELLED_BOXES = re.compile(rf"([^<]+)((?:{_LOC}){{4,}})")
_BARE_BOXES = re.compile(rf"()((?:{_LOC}){{4,}})")
_FOUR_LOCS = re.compile(rf"(?:{_LOC}){{4}}")
# Where a label ends: before the first location token or box tag. The label must not run over a line break.
_LABEL = re.compile(r"^\s*(.*?)(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_)")
# Polygon answers use location tokens, <sep> between polygons of one object, and <poly>..</poly> around objects.
_POLY_UNIT = rf"(?:{_LOC}|<sep>|<poly>|</poly>)"
_LABELLED_POLYGONS = re.compile(rf"[^<]+{_POLY_UNIT}{{4,}}")
_BARE_POLYGONS = re.compile(rf"{_POLY_UNIT}{{4,}}")
_POLY_LABEL = re.compile(r"^\s*(.*?)(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_|<poly>)")
_POLY_OBJECT = re.compile(r"<poly>(.*?)</poly>")
_POLYGON = re.compile(rf"((?:{_LOC})+)(?:<sep>|$)")
_LEADING_LOC = re.compile(rf"^{_LOC}")
# OCR with regions: any text (shortest match), then eight location tokens (a quadrilateral).
_QUAD = re.compile(r"(.+?)" + _LOC * 8)

#: The post-processor drops these strings from the text before reading it (in this order).
_DROPPED = ("<s>", "</s>", "<pad>")


class _Text:
    """The generated text with, for every character, the index of the token it came from."""

    def __init__(self, processor: Any, token_ids: Sequence[int]) -> None:
        # Ids past the tokenizer (real checkpoints pad the vocabulary to 51328; a model can emit a padding id) have
        # no text: batch_decode drops them, so they are left out here too, keeping every other token's index.
        known = [i for i, token in enumerate(token_ids) if 0 <= int(token) < len(processor.tokenizer)]
        # The post-processor's own decoder: one string per token, special tokens written out.
        full, spans = processor.post_processor.decode_with_spans([int(token_ids[i]) for i in known])
        owner = [0] * len(full)
        for index, (start, end) in enumerate(spans):
            owner[start:end] = [known[index]] * (end - start)
        text, keep = full, list(range(len(full)))
        for dropped in _DROPPED:  # like str.replace(dropped, ""), remembering where each kept character was
            gone = {i for m in re.finditer(re.escape(dropped), text) for i in range(m.start(), m.end())}
            keep = [k for i, k in enumerate(keep) if i not in gone]
            text = "".join(ch for i, ch in enumerate(text) if i not in gone)
        self.text = text
        self._owner = [owner[k] for k in keep]

    def tokens(self, start: int, end: int) -> list[int]:
        """Indices of the tokens behind characters ``start:end`` of :attr:`text`, in order, without repeats."""
        return list(dict.fromkeys(self._owner[start:end]))


def _stripped(text: str, start: int, end: int) -> tuple[int, int]:
    """The span ``start:end`` of ``text`` without surrounding whitespace (empty spans stay empty)."""
    piece = text[start:end]
    left = len(piece) - len(piece.lstrip())
    right = len(piece.rstrip())
    return (start + left, start + right) if right > left else (start, start)


def _box_instances(
    doc: _Text, *, labelled: bool, banned: frozenset[str] = frozenset(), ascii_labels: bool = True
) -> list[Instance]:
    text, found = doc.text, []
    for match in (_LABELLED_BOXES if labelled else _BARE_BOXES).finditer(text):
        phrase = _LABEL.search(text[match.start() : match.end()])
        if phrase is None:
            continue
        label_start, label_end = _stripped(text, match.start(), match.start() + phrase.end())
        label = text[label_start:label_end]
        if label in banned:
            continue
        if ascii_labels:
            label = label.encode("ascii", "ignore").decode("ascii")
        label_tokens = doc.tokens(label_start, label_end)
        for box in _FOUR_LOCS.finditer(text, match.start(2), match.end(2)):
            locs = list(_LOC_VALUE.finditer(text, box.start(), box.end()))
            bins = tuple(int(m.group(1)) for m in locs)
            loc_tokens = [t for m in locs for t in doc.tokens(m.start(), m.end())]
            found.append(Instance("bboxes", label, (bins,), tuple(dict.fromkeys(label_tokens + loc_tokens))))
    return found


def _polygon_instances(doc: _Text, *, labelled: bool) -> list[Instance]:
    text, found = doc.text, []
    for match in (_LABELLED_POLYGONS if labelled else _BARE_POLYGONS).finditer(text):
        start, chunk = match.start(), match.group()
        lead = _LEADING_LOC.match(chunk)
        offset = lead.end() if lead else 0  # a location token right at the start is not part of the label
        phrase = _POLY_LABEL.search(chunk[offset:])
        if phrase is None:
            continue
        label_start, label_end = _stripped(text, start + offset, start + offset + phrase.end())
        label_tokens = doc.tokens(label_start, label_end)
        if "<poly>" in chunk and "</poly>" in chunk:
            objects = [(start + m.start(1), start + m.end(1)) for m in _POLY_OBJECT.finditer(chunk)]
        else:
            objects = [(start, match.end())]
        for obj_start, obj_end in objects:
            polygons = list(_POLYGON.finditer(text[obj_start:obj_end]))
            if not polygons:
                continue
            shapes, loc_tokens = [], []
            for polygon in polygons:
                locs = list(_LOC_VALUE.finditer(text, obj_start + polygon.start(1), obj_start + polygon.end(1)))
                bins = [int(m.group(1)) for m in locs]
                shapes.append(tuple(bins[: len(bins) - len(bins) % 2]))  # points are (x, y) pairs
                loc_tokens += [t for m in locs for t in doc.tokens(m.start(), m.end())]
            label = text[label_start:label_end]
            found.append(Instance("polygons", label, tuple(shapes), tuple(dict.fromkeys(label_tokens + loc_tokens))))
    return found


def _quad_instances(doc: _Text) -> list[Instance]:
    text, found = doc.text, []
    for match in _QUAD.finditer(text):
        label_start, label_end = _stripped(text, match.start(1), match.end(1))
        locs = list(_LOC_VALUE.finditer(text, match.end(1), match.end()))
        bins = tuple(int(m.group(1)) for m in locs)
        tokens = doc.tokens(label_start, label_end) + [t for m in locs for t in doc.tokens(m.start(), m.end())]
        found.append(Instance("quad_boxes", text[label_start:label_end], (bins,), tuple(dict.fromkeys(tokens))))
    return found


def _parse_type(processor: Any, task: str) -> str:
    return processor.tasks_answer_post_processing_type.get(task, "pure_text")


def find_instances(processor: Any, token_ids: Sequence[int], task: str) -> list[Instance]:
    """The instances of ``task``'s answer in a generated sequence, in the order of the post-processed answer.
    Taught in ``notebooks/05_detection.ipynb``.

    ``token_ids`` is one generated sequence as ``generate`` returns it (decoder start token first); the
    :attr:`Instance.tokens` index into it. Raises ``ValueError`` for tasks whose answer is plain text.
    """
    token = resolve_task(task)
    parse_type = _parse_type(processor, token)
    doc = _Text(processor, token_ids)
    banned = frozenset(getattr(processor.post_processor, "banned_grounding_tokens", ()))
    if parse_type == "description_with_bboxes":
        return _box_instances(doc, labelled=True)
    if parse_type == "bboxes":
        return _box_instances(doc, labelled=False)
    if parse_type == "phrase_grounding":
        return _box_instances(doc, labelled=True, banned=banned)
    if parse_type == "description_with_polygons":
        return _polygon_instances(doc, labelled=True)
    if parse_type == "polygons":
        return _polygon_instances(doc, labelled=False)
    if parse_type == "description_with_bboxes_or_polygons":
        if "<poly>" in doc.text:
            return _polygon_instances(doc, labelled=True)
        return _box_instances(doc, labelled=True)
    if parse_type == "ocr":
        return _quad_instances(doc)
    raise ValueError(
        f"{token} answers with text, which has no boxes or regions to score. Tasks with scores: "
        f"{', '.join(SCORED_TASKS)}."
    )


# ----------------------------------------------------------------------------------------------------------------
# Token probabilities from generate's output
# ----------------------------------------------------------------------------------------------------------------


def token_log_probs(output: Any) -> torch.Tensor:
    """Log-probability of every generated token, shape ``(rows, steps)``; column ``t`` belongs to
    ``output.sequences[:, t + 1]`` (position 0 is the decoder start token). Taught in ``notebooks/05_detection.ipynb``.

    ``output`` is what ``generate(..., output_scores=True, return_dict_in_generate=True)`` returns, from greedy
    search, sampling or beam search (whose ``beam_indices`` say which beam row each token came from). Each step's
    scores are renormalised with ``log_softmax``. Positions past a beam's end are ``0.0``.
    """
    sequences, scores = output.sequences, getattr(output, "scores", None)
    if not scores:
        raise ValueError("generate was not asked for scores: pass output_scores=True, return_dict_in_generate=True.")
    rows = sequences.shape[0]
    beams = getattr(output, "beam_indices", None)
    steps = min(len(scores), sequences.shape[1] - 1)
    result = torch.zeros(rows, steps, dtype=torch.float64)
    for t in range(steps):
        log_probs = torch.log_softmax(scores[t].double(), dim=-1)
        if beams is None:
            if log_probs.shape[0] != rows:
                raise ValueError(
                    f"generate returned {rows} sequences but {log_probs.shape[0]} score rows without beam indices; "
                    "do not pass num_return_sequences."
                )
            source = torch.arange(rows)
        else:
            source = beams[:, t] if t < beams.shape[1] else torch.full((rows,), -1)
        valid = source >= 0
        result[valid, t] = log_probs[source[valid], sequences[valid, t + 1]]
    return result


def _reduce(log_probs: Sequence[float], reduce: Reduce) -> float:
    if not log_probs:
        return 1.0  # nothing was generated for this instance, so nothing was uncertain
    value = min(log_probs) if reduce == "min" else math.fsum(log_probs) / len(log_probs)
    return min(max(math.exp(value), 0.0), 1.0)


def score_answer(
    processor: Any,
    token_ids: Sequence[int],
    log_probs: Sequence[float],
    task: str,
    answer: dict[str, Any],
    *,
    reduce: Reduce = "geometric_mean",
) -> dict[str, Any]:
    """A copy of ``answer`` (the post-processed answer of ``token_ids``) with the scores of its instances added.
    Taught in ``notebooks/05_detection.ipynb``.

    ``log_probs[t]`` is the log-probability of ``token_ids[t + 1]`` (see :func:`token_log_probs`). Raises
    ``RuntimeError`` if the instances found in the tokens do not match the answer (please report it).
    """
    _check_reduce(reduce)
    token = resolve_task(task)
    instances = find_instances(processor, token_ids, token)

    def score(instance: Instance) -> float:
        return _reduce([float(log_probs[i - 1]) for i in instance.tokens if 1 <= i <= len(log_probs)], reduce)

    scored = dict(answer)
    keys = _OPEN_VOCABULARY_SCORE_KEYS if TASKS[token].answer_kind == "open_vocabulary" else SCORE_KEYS
    for kind, score_key in keys.items():
        if kind not in answer:
            continue
        of_kind = [instance for instance in instances if instance.kind == kind]
        if len(of_kind) != len(answer[kind]):
            raise RuntimeError(
                f"{token}: found {len(of_kind)} {kind} in the generated tokens but the answer has "
                f"{len(answer[kind])}; scores cannot be aligned. Please report this with the generated text."
            )
        scored[score_key] = [score(instance) for instance in of_kind]
    return scored


# ----------------------------------------------------------------------------------------------------------------
# Running tasks with scores
# ----------------------------------------------------------------------------------------------------------------


def _check_reduce(reduce: str) -> None:
    if reduce not in ("geometric_mean", "min"):
        raise ValueError(f"reduce must be 'geometric_mean' or 'min', got {reduce!r}.")


def _check_scored(token: str) -> None:
    if token not in SCORED_TASKS:
        raise ValueError(
            f"{token} answers with text, which has no boxes or regions to score; use helpers.tasks.run.run_task for it. "
            f"Tasks with scores: {', '.join(SCORED_TASKS)}."
        )


def _generate_with_scores(model: Any, inputs: Any, kwargs: dict[str, Any]) -> Any:
    if kwargs.get("num_return_sequences", 1) != 1:
        raise ValueError("num_return_sequences is not supported with scores: answers are one per image.")
    kwargs = {**kwargs, "output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad():
        return model.generate(**inputs, **kwargs)


def run_tasks_batch_with_scores(
    model: Any,
    processor: Any,
    images: Sequence[Image.Image | str | Path],
    task: str,
    text_inputs: str | Sequence[str | Sequence[float] | None] | None = None,
    *,
    reduce: Reduce = "geometric_mean",
    **generate_kwargs: Any,
) -> list[dict[str, Any]]:
    """Like :func:`helpers.tasks.run.run_tasks_batch` (one ``generate`` call for all images), each answer with its
    instances' scores. Taught in ``notebooks/11_speed.ipynb``; used by :mod:`helpers.cli.batch`."""
    token = resolve_task(task)
    _check_scored(token)
    _check_reduce(reduce)
    pictures, prompts = batch_prompts(images, token, text_inputs, single="run_task_with_scores")
    kwargs = check_generate_kwargs(model, generate_kwargs)
    inputs = prepare_inputs(model, processor(text=prompts, images=pictures, return_tensors="pt", padding=True))
    output = _generate_with_scores(model, inputs, kwargs)
    log_probs = token_log_probs(output)
    ends = eos_ids(model, processor)
    rows = answer_rows(output.sequences.tolist(), ends, len(pictures), "run_tasks_batch_with_scores")
    answers = []
    for row, picture, row_log_probs in zip(rows, pictures, log_probs.tolist()):
        text = processor.batch_decode([row], skip_special_tokens=False)[0]
        answer = processor.post_process_generation(text, task=token, image_size=picture.size)[token]
        answers.append({token: score_answer(processor, row, row_log_probs, token, answer, reduce=reduce)})
    return answers


def run_task_with_scores(
    model: Any,
    processor: Any,
    image: Image.Image | str | Path,
    task: str,
    text_input: str | Sequence[float] | None = None,
    *,
    reduce: Reduce = "geometric_mean",
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Run one task like :func:`helpers.tasks.run.run_task` and add a confidence score to every instance.
    Taught in ``notebooks/05_detection.ipynb``.

    Returns ``{task: answer}`` where ``answer`` is exactly ``run_task``'s plus ``"scores"`` (one per box, polygon
    or OCR quadrilateral, in order), or ``"bboxes_scores"`` / ``"polygons_scores"`` for
    ``<OPEN_VOCABULARY_DETECTION>``. A score is the geometric mean of the probabilities of the instance's label and
    location tokens (``reduce="min"``: their minimum). Works with PyTorch and ``OVFlorence2Model``, greedy, beam
    search or sampling. Text-only tasks raise ``ValueError`` (see :data:`SCORED_TASKS`).
    """
    token = resolve_task(task)
    _check_scored(token)
    picture = load_image(image)
    return run_tasks_batch_with_scores(
        model, processor, [picture], token, [text_input], reduce=reduce, **generate_kwargs
    )[0]
