"""Florence-2's ``generate`` in numpy: greedy and beam search, token for token like transformers' (5.23), no torch.

Used by deployments without torch: :class:`helpers.runtime.ov_model.OVFlorence2Model` runs :func:`generate` when torch is
not installed, or when asked with ``generation="numpy"``. No notebook teaches it; ``notebooks/02_convert.ipynb``
teaches the OpenVINO parts it drives.

It covers what Florence-2's generation config uses: greedy search, beam search (``num_beams``, ``length_penalty``,
``early_stopping`` True / False / ``"never"``, ``num_return_sequences`` <= ``num_beams``), the logits processors
``no_repeat_ngram_size``, ``min_length`` / ``min_new_tokens``, ``forced_bos_token_id``, ``forced_eos_token_id``,
the lengths ``max_length`` / ``max_new_tokens``, EOS stopping, padding after a finished answer and batches with padded
prompts. Anything else (sampling, scores, other processors …) raises :class:`UnsupportedGenerationError`, which says
to install torch: silently ignoring an argument would give answers that differ from transformers'.

Defaults and validation are transformers' own: the generation config is resolved with ``GenerationConfig`` exactly as
``GenerationMixin._prepare_generation_config`` does. Each step below names the transformers method it reproduces
(``transformers/generation/utils.py`` and ``logits_process.py``), so the two can be read side by side.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:  # transformers (and with it torch, when installed) is imported when a generation starts
    from transformers import GenerationConfig

__all__ = [
    "LogitsProcessors",
    "SpecialTokens",
    "SupportsDecoderSteps",
    "UnsupportedGenerationError",
    "beam_search",
    "generate",
    "greedy_search",
    "log_softmax",
    "resolve_generation_config",
    "top_k",
]

#: Generation settings this module implements; every other setting must keep its neutral default.
SUPPORTED_SETTINGS = frozenset({
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "early_stopping", "num_beams", "length_penalty",
    "no_repeat_ngram_size", "forced_bos_token_id", "forced_eos_token_id", "num_return_sequences", "pad_token_id",
    "bos_token_id", "eos_token_id", "decoder_start_token_id",
})  # fmt: skip
#: Settings that do not change which tokens greedy or beam search choose (sampling knobs only act with do_sample).
IGNORED_SETTINGS = frozenset({
    "transformers_version", "_from_model_config", "use_cache", "cache_implementation", "cache_config",
    "max_cache_len", "compile_config", "disable_compile", "prefill_chunk_size", "is_assistant",
    "temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff",
})  # fmt: skip
#: transformers' stand-in for "impossible" in beam search bookkeeping (a float32 constant, like theirs).
NEG_LARGE = np.float32(-1.0e9)


class UnsupportedGenerationError(ValueError):
    """A generation setting the numpy generator does not implement; the message names the fix (install torch)."""


class SupportsDecoderSteps(Protocol):
    """What :func:`generate` needs from a model: OpenVINO's ``OVFlorence2Model`` provides it."""

    generation_config: GenerationConfig

    def encode(
        self, input_ids: np.ndarray, pixel_values: np.ndarray | None, attention_mask: np.ndarray | None
    ) -> np.ndarray:
        """Prompt (and images) -> encoder hidden states ``[batch, source, width]``."""

    def decoder_step(
        self,
        decoder_input_ids: np.ndarray,
        encoder_hidden_states: np.ndarray,
        encoder_attention_mask: np.ndarray,
        beam_idx: np.ndarray,
        *,
        new_sequence: bool,
    ) -> np.ndarray:
        """One decoder step -> float32 logits ``[rows, new tokens, vocab]``. The model keeps the K/V cache; it
        reorders the cache rows by ``beam_idx`` first, and starts from an empty cache when ``new_sequence``."""


# ----------------------------------------------------------------------------------------------------------------
# Settings: transformers' GenerationConfig resolves them, we only check that we implement them
# ----------------------------------------------------------------------------------------------------------------


def _install_torch_hint(what: str) -> str:
    return (
        f"{what} is not available without torch: the numpy generator implements greedy and beam search only. "
        "Install torch (pip install torch==2.13.0, see requirements.txt) to use transformers' generate, "
        "or drop the argument."
    )


def _neutral_settings() -> dict[str, Any]:
    from transformers import GenerationConfig

    neutral = GenerationConfig()
    neutral.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
    return vars(neutral)


def resolve_generation_config(
    model_config: GenerationConfig, generation_config: GenerationConfig | None = None, **kwargs: Any
) -> tuple[GenerationConfig, bool]:
    """The effective generation config and whether ``max_length`` fell back to transformers' default (20 new tokens).

    Same priority as ``GenerationMixin._prepare_generation_config``: keyword arguments > ``generation_config`` >
    the model's saved config > transformers' global defaults. Raises :class:`UnsupportedGenerationError` for
    anything this module does not implement, and ``ValueError`` (from ``GenerationConfig.validate``) for invalid values.
    """
    from transformers import GenerationConfig

    has_default_max_length = (
        kwargs.get("max_length") is None
        and (generation_config is None or generation_config.max_length is None)
        and model_config.max_length is None
    )
    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    config.update(**model_config.to_dict(), defaults_only=True, allow_custom_entries=True)
    config.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
    unused = config.update(**kwargs)
    if unused:
        raise UnsupportedGenerationError(_install_torch_hint(f"The argument(s) {sorted(unused)}"))
    _check_supported(config)
    return config, has_default_max_length


def supports(model_config: GenerationConfig, generation_config: GenerationConfig | None = None, **kwargs: Any) -> bool:
    """True when this module implements the request (greedy or beam search with the supported settings).
    Invalid values count as supported, so that :func:`generate` raises transformers' own message for them."""
    try:
        resolve_generation_config(model_config, generation_config, **kwargs)
    except UnsupportedGenerationError:
        return False
    except ValueError:
        return True
    return True


def _check_supported(config: GenerationConfig) -> None:
    if config.do_sample:
        raise UnsupportedGenerationError(_install_torch_hint("Sampling (do_sample=True)"))
    neutral = _neutral_settings()
    changed = sorted(
        name
        for name, default in neutral.items()
        if name not in SUPPORTED_SETTINGS | IGNORED_SETTINGS and not _is_off(getattr(config, name, default), default)
    )
    if changed:
        values = ", ".join(f"{name}={getattr(config, name)!r}" for name in changed)
        raise UnsupportedGenerationError(_install_torch_hint(f"The setting(s) {values}"))
    if config.early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {config.early_stopping!r}.")


def _is_off(value: Any, default: Any) -> bool:
    # False and None both mean "not used" for the flags without a global default (e.g. renormalize_logits).
    return value == default or (default is None and value is False)


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids generation needs, filled in like ``GenerationMixin._prepare_special_tokens``."""

    eos: tuple[int, ...]  # empty: no EOS, generation only stops at max_length
    pad: int | None  # written after a finished answer; defaults to the first EOS
    decoder_start: int

    @classmethod
    def from_config(cls, config: GenerationConfig) -> SpecialTokens:
        eos = config.eos_token_id
        eos_ids = () if eos is None else tuple(int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]))
        pad = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else None)
        start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.bos_token_id
        if start is None:
            raise ValueError("Set `decoder_start_token_id` (or `bos_token_id`) in the generation config.")
        return cls(eos_ids, pad, int(start))


def _lengths(
    config: GenerationConfig, has_default_max_length: bool, prompt_length: int, max_positions: int | None
) -> tuple[int, int]:
    """``(max_length, min_length)`` counted with the decoder prompt, like ``_prepare_generated_length``."""
    if config.max_new_tokens is not None:
        max_length = config.max_new_tokens + prompt_length
    elif has_default_max_length:
        max_length = config.max_length + prompt_length
        if max_positions is not None:
            max_length = min(max_length, max_positions)
    else:
        max_length = config.max_length
    min_length = config.min_new_tokens + prompt_length if config.min_new_tokens is not None else config.min_length
    if prompt_length >= max_length:
        raise ValueError(
            f"Input length of decoder_input_ids is {prompt_length}, but `max_length` is set to {max_length}. "
            "Increase `max_length` or, better yet, set `max_new_tokens`."
        )
    return max_length, min_length


# ----------------------------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------------------------


def _torch_vector_lanes() -> int:
    """float32 lanes of torch's CPU kernels here: 16 with AVX-512, else 8 (AVX2). Only sets the summation order."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy moved its private CPU table: fall back to the common AVX2 width
        return 8
    return 16 if features.get("AVX512F") else 8


TORCH_VECTOR_LANES = _torch_vector_lanes()


def _sum_like_torch(values: np.ndarray, lanes: int = TORCH_VECTOR_LANES) -> np.ndarray:
    """float32 sum over the last axis in the order of torch's ``vec::map_reduce_all``: one running sum per vector
    lane, the tail added to the first lanes, then the lanes halved pairwise."""
    rows, size = values.shape
    full = size - size % lanes
    if full == 0:
        return values.sum(axis=-1, dtype=np.float32)
    accumulated = np.cumsum(values[:, :full].reshape(rows, -1, lanes), axis=1, dtype=np.float32)[:, -1]
    accumulated[:, : size - full] += values[:, full:]
    while accumulated.shape[1] > 1:
        half = accumulated.shape[1] // 2
        accumulated = accumulated[:, :half] + accumulated[:, half:]
    return accumulated[:, 0]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 log-softmax of ``[rows, vocab]`` computed as torch's CPU kernel does: ``(x - max) - log(sum(exp))``.

    Beam search compares summed log-probabilities, so they should be torch's to the last bit. The summation order
    is torch's; exp and log are rounded correctly (via float64) where torch uses SLEEF's (<= 1 ulp), so a row can
    still differ from torch's by an ulp (96-98% of rows were bit-identical on random logits, 51k vocabulary).
    """
    logits = np.asarray(logits, dtype=np.float32)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exps = np.exp(shifted.astype(np.float64)).astype(np.float32)
    log_sum = np.log(_sum_like_torch(exps).astype(np.float64)).astype(np.float32)
    return shifted - log_sum[:, None]


def top_k(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``torch.topk`` along the last axis of a 2-D array: values and indices, largest first, ties to the lower index.

    torch leaves the order of exactly equal values to ``std::partial_sort`` / ``std::nth_element`` (not index
    order). In this beam search exact ties only occur among placeholders (-1e9 for "no hypothesis yet", -inf for
    forbidden tokens, the identical beams of the first step), whose order never reaches the returned tokens.
    """
    k = min(k, values.shape[-1])
    # torch.topk ranks NaN above every number (a row of only -inf logits turns into NaN in log-softmax).
    ranked = np.where(np.isnan(values), np.inf, values)
    # Partition finds the k-th largest value; every entry at least that large (ties included) is then sorted stably.
    kth = -np.partition(-ranked, k - 1, axis=-1)[:, k - 1 : k]
    indices = np.empty((values.shape[0], k), dtype=np.int64)
    for row, (row_values, threshold) in enumerate(zip(ranked, kth)):
        candidates = np.flatnonzero(row_values >= threshold)
        order = np.argsort(-row_values[candidates], kind="stable")[:k]
        indices[row] = candidates[order]
    return np.take_along_axis(values, indices, axis=-1), indices


@dataclass(frozen=True)
class LogitsProcessors:
    """The logits processors of Florence-2's generation config, applied in transformers' order
    (``GenerationMixin._get_logits_processor``): no-repeat n-grams, minimum length, minimum new tokens, forced BOS,
    forced EOS. ``scores`` are raw logits in greedy search and log-probabilities in beam search, as in transformers."""

    max_length: int
    prompt_length: int
    eos: tuple[int, ...]
    no_repeat_ngram_size: int = 0
    min_length: int = 0
    min_new_tokens: int | None = None
    forced_bos: int | None = None
    forced_eos: tuple[int, ...] | None = None

    @classmethod
    def from_config(
        cls, config: GenerationConfig, tokens: SpecialTokens, max_length: int, min_length: int, prompt_length: int
    ) -> LogitsProcessors:
        forced_eos = config.forced_eos_token_id
        if forced_eos is not None and not isinstance(forced_eos, (list, tuple)):
            forced_eos = [forced_eos]
        return cls(
            max_length=max_length,
            prompt_length=prompt_length,
            eos=tokens.eos,
            no_repeat_ngram_size=config.no_repeat_ngram_size or 0,
            min_length=min_length or 0,
            min_new_tokens=config.min_new_tokens,
            forced_bos=config.forced_bos_token_id,
            forced_eos=None if forced_eos is None else tuple(int(i) for i in forced_eos),
        )

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Process ``scores`` ``[rows, vocab]`` in place (and return them) after ``input_ids`` ``[rows, length]``."""
        length = input_ids.shape[1]
        if self.no_repeat_ngram_size > 0:
            ban_repeated_ngrams(input_ids, scores, self.no_repeat_ngram_size)
        too_short = self.min_length > 0 and length < self.min_length
        too_few_new = bool(self.min_new_tokens) and length - self.prompt_length < self.min_new_tokens
        if self.eos and (too_short or too_few_new):
            scores[:, [i for i in self.eos if i < scores.shape[1]]] = -np.inf
        if self.forced_bos is not None and length == 1:
            _force(scores, [self.forced_bos])
        if self.forced_eos is not None and length == self.max_length - 1:
            _force(scores, list(self.forced_eos))
        return scores


def _force(scores: np.ndarray, token_ids: list[int]) -> None:
    """Only ``token_ids`` stay possible, with score 0 (``ForcedBOS/EOSTokenLogitsProcessor``)."""
    scores[:] = -np.inf
    scores[:, token_ids] = 0.0


def ban_repeated_ngrams(input_ids: np.ndarray, scores: np.ndarray, ngram_size: int) -> None:
    """``NoRepeatNGramLogitsProcessor``: a token that would repeat an n-gram already in the row gets -inf."""
    length = input_ids.shape[1]
    if length < ngram_size:
        return
    windows = np.lib.stride_tricks.sliding_window_view(input_ids, ngram_size, axis=1)  # [rows, windows, n]
    prefix = input_ids[:, length + 1 - ngram_size :]  # the last n-1 tokens
    matches = (windows[..., :-1] == prefix[:, None, :]).all(axis=-1)
    rows, starts = np.nonzero(matches)
    banned = windows[rows, starts, -1]
    inside = banned < scores.shape[1]  # ids beyond the logits cannot be generated anyway
    scores[rows[inside], banned[inside]] = -np.inf


# ----------------------------------------------------------------------------------------------------------------
# The decoding loops
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Decoder:
    """Runs the model's decoder over ``rows`` sequences that share the encoder output of their batch item."""

    model: SupportsDecoderSteps
    encoder_hidden_states: np.ndarray
    encoder_attention_mask: np.ndarray
    started: bool = False

    def next_logits(self, sequences: np.ndarray, beam_idx: np.ndarray) -> np.ndarray:
        """float32 logits ``[rows, vocab]`` for the token after ``sequences``; the cache holds the earlier tokens."""
        new_tokens = sequences if not self.started else sequences[:, -1:]
        logits = self.model.decoder_step(
            np.ascontiguousarray(new_tokens, dtype=np.int64),
            self.encoder_hidden_states,
            self.encoder_attention_mask,
            np.ascontiguousarray(beam_idx, dtype=np.int32),
            new_sequence=not self.started,
        )
        self.started = True
        return np.asarray(logits[:, -1, :], dtype=np.float32)


def _hits_stopping_criteria(sequences: np.ndarray, max_length: int, eos: tuple[int, ...]) -> np.ndarray:
    """``MaxLengthCriteria`` or ``EosTokenCriteria`` per row of ``sequences`` ``[rows, length]``."""
    done = np.full(sequences.shape[0], sequences.shape[1] >= max_length)
    if eos:
        done |= np.isin(sequences[:, -1], eos)
    return done


def greedy_search(
    decoder: _Decoder, start_ids: np.ndarray, processors: LogitsProcessors, tokens: SpecialTokens
) -> np.ndarray:
    """The greedy branch of ``GenerationMixin._sample``: argmax of the processed logits (first index on ties, like
    ``torch.argmax``); rows that finished get ``pad`` until every row has finished or ``max_length`` is reached."""
    sequences = start_ids
    rows = sequences.shape[0]
    unfinished = np.ones(rows, dtype=bool)
    beam_idx = np.arange(rows, dtype=np.int32)
    while True:
        scores = processors(sequences, decoder.next_logits(sequences, beam_idx))
        next_tokens = scores.argmax(axis=-1)
        if tokens.eos:
            next_tokens = np.where(unfinished, next_tokens, tokens.pad)
        sequences = np.concatenate([sequences, next_tokens[:, None]], axis=1)
        unfinished &= ~_hits_stopping_criteria(sequences, processors.max_length, tokens.eos)
        if not unfinished.any():
            return sequences


@dataclass
class _Beams:
    """Beam search state per batch item, shaped like transformers' ``_beam_search``: ``[batch, beams, ...]``."""

    running_sequences: np.ndarray  # int64 [batch, beams, max_length], unfilled positions hold the fill token
    running_scores: np.ndarray  # float32 [batch, beams] summed log-probabilities of the open beams
    running_beam_indices: np.ndarray  # int32 [batch, beams, max_length - prompt]: flat row each token came from
    sequences: np.ndarray  # the finished hypotheses, best first
    scores: np.ndarray  # their length-penalised scores (NEG_LARGE for empty slots)
    beam_indices: np.ndarray
    finished: np.ndarray  # bool [batch, beams]: slot holds a finished hypothesis
    can_improve: np.ndarray  # bool [batch, 1]: an open beam may still beat the worst finished one

    @classmethod
    def start(cls, start_ids: np.ndarray, batch: int, beams: int, max_length: int, fill: int) -> _Beams:
        prompt = start_ids.shape[1]
        running = np.full((batch, beams, max_length), fill, dtype=np.int64)
        running[:, :, :prompt] = start_ids.reshape(batch, beams, prompt)
        scores = np.zeros((batch, beams), dtype=np.float32)
        scores[:, 1:] = NEG_LARGE  # only the first beam's candidates count at the first step: the beams are equal
        indices = np.full((batch, beams, max_length - prompt), -1, dtype=np.int32)
        return cls(
            running_sequences=running,
            running_scores=scores,
            running_beam_indices=indices,
            sequences=running.copy(),
            scores=np.full((batch, beams), NEG_LARGE, dtype=np.float32),
            beam_indices=indices.copy(),
            finished=np.zeros((batch, beams), dtype=bool),
            can_improve=np.ones((batch, 1), dtype=bool),
        )


def _gather(array: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """``GenerationMixin._gather_beams``: pick slots ``indices`` ``[batch, k]`` along axis 1."""
    return np.take_along_axis(array, indices.reshape(indices.shape + (1,) * (array.ndim - 2)), axis=1)


def _length_penalised(scores: np.ndarray, length: int, length_penalty: float) -> np.ndarray:
    # torch divides a float32 tensor by a Python float in float32: the divisor is rounded to float32 first.
    return scores / np.float32(length**length_penalty)


@dataclass(frozen=True)
class _BeamSettings:
    batch: int
    beams: int
    keep: int  # candidates kept per step: (number of EOS + 1) * beams, at least 2 * beams
    prompt: int
    max_length: int
    length_penalty: float
    early_stopping: bool | str
    eos: tuple[int, ...]


def beam_search(
    decoder: _Decoder,
    start_ids: np.ndarray,
    processors: LogitsProcessors,
    tokens: SpecialTokens,
    config: GenerationConfig,
    batch: int,
) -> np.ndarray:
    """``GenerationMixin._beam_search`` with ``do_sample=False``; returns ``num_return_sequences`` rows per item."""
    beams = config.num_beams
    settings = _BeamSettings(
        batch=batch,
        beams=beams,
        keep=max(2, 1 + len(tokens.eos)) * beams,
        prompt=start_ids.shape[1],
        max_length=processors.max_length,
        length_penalty=float(config.length_penalty),
        early_stopping=config.early_stopping,
        eos=tokens.eos,
    )
    # transformers: `pad_token_id or eos_token_id[0] if eos_token_id is not None else -1` (a pad id of 0 is falsy).
    fill = (tokens.pad or tokens.eos[0]) if tokens.eos else -1
    state = _Beams.start(start_ids, batch, beams, settings.max_length, fill)
    beam_idx = np.arange(batch * beams, dtype=np.int32)
    length = settings.prompt
    while True:
        flat_sequences = state.running_sequences[:, :, :length].reshape(batch * beams, length)
        log_probs = processors(flat_sequences, log_softmax(decoder.next_logits(flat_sequences, beam_idx)))
        hits = _beam_step(state, settings, log_probs, length)
        beam_idx = state.running_beam_indices[:, :, length - settings.prompt].reshape(-1).astype(np.int32)
        length += 1
        _update_can_improve(state, settings, length)
        if not _beam_search_continues(state, settings, hits):
            break
    return _best_hypotheses(state, settings, config.num_return_sequences or 1)


def _beam_step(state: _Beams, settings: _BeamSettings, log_probs: np.ndarray, length: int) -> np.ndarray:
    """One step of ``_beam_search`` (its parts c to f); returns which kept candidates hit a stopping criterion."""
    batch, beams, keep = settings.batch, settings.beams, settings.keep
    vocab = log_probs.shape[-1]
    totals = (log_probs.reshape(batch, beams, vocab) + state.running_scores[:, :, None]).reshape(batch, beams * vocab)

    # c. `_get_top_k_continuations`: the best `keep` (beam, token) pairs over all beams of an item.
    top_scores, top_flat = top_k(totals, keep)
    source_beam = top_flat // vocab
    top_sequences = _gather(state.running_sequences, source_beam)
    top_sequences[:, :, length] = top_flat % vocab
    top_beam_indices = _gather(state.running_beam_indices, source_beam)
    top_beam_indices[:, :, length - settings.prompt] = source_beam + np.arange(batch)[:, None] * beams

    # d. Which candidates are finished (EOS or max_length).
    hits = _hits_stopping_criteria(
        top_sequences[:, :, : length + 1].reshape(batch * keep, length + 1), settings.max_length, settings.eos
    ).reshape(batch, keep)

    # e. `_get_running_beams_for_next_iteration`: the best unfinished candidates continue.
    open_scores = top_scores + hits.astype(np.float32) * NEG_LARGE
    _, best_open = top_k(open_scores, beams)
    state.running_sequences = _gather(top_sequences, best_open)
    state.running_scores = _gather(open_scores, best_open)
    state.running_beam_indices = _gather(top_beam_indices, best_open)

    # f. `_update_finished_beams`: finished candidates among the top `beams` join the finished hypotheses.
    just_finished = hits.copy()
    just_finished[:, beams:] = False
    penalised = _length_penalised(top_scores, length + 1 - settings.prompt, settings.length_penalty)
    item_full = state.finished.all(axis=-1, keepdims=True) & (settings.early_stopping is True)
    penalised = penalised + item_full.astype(np.float32) * NEG_LARGE
    penalised = penalised + (~state.can_improve).astype(np.float32) * NEG_LARGE
    penalised = penalised + (~just_finished).astype(np.float32) * NEG_LARGE
    merged_scores = np.concatenate([state.scores, penalised], axis=1)
    _, best = top_k(merged_scores, beams)
    state.sequences = _gather(np.concatenate([state.sequences, top_sequences], axis=1), best)
    state.scores = _gather(merged_scores, best)
    state.beam_indices = _gather(np.concatenate([state.beam_indices, top_beam_indices], axis=1), best)
    state.finished = _gather(np.concatenate([state.finished, just_finished], axis=1), best)
    return hits


def _update_can_improve(state: _Beams, settings: _BeamSettings, length: int) -> None:
    """``_check_early_stop_heuristic``: can the best open beam still beat the worst finished hypothesis?"""
    if settings.early_stopping == "never" and settings.length_penalty > 0.0:
        best_length = settings.max_length - settings.prompt  # a longer answer can only score better
    else:
        best_length = length - settings.prompt
    best_open = _length_penalised(state.running_scores[:, :1], best_length, settings.length_penalty)
    worst_finished = np.where(state.finished, state.scores.min(axis=1, keepdims=True), NEG_LARGE)
    state.can_improve &= (best_open > worst_finished).any(axis=-1, keepdims=True)


def _beam_search_continues(state: _Beams, settings: _BeamSettings, hits: np.ndarray) -> bool:
    """``_beam_search_has_unfinished_sequences``."""
    all_full = bool(state.finished.all()) and settings.early_stopping is True
    return bool(state.can_improve.any()) and not all_full and not bool(hits.all())


def _best_hypotheses(state: _Beams, settings: _BeamSettings, num_return_sequences: int) -> np.ndarray:
    """The best finished hypotheses, cut to the longest of them (beam indices of -1 mark unused positions)."""
    sequences = state.sequences[:, :num_return_sequences].reshape(-1, settings.max_length)
    beam_indices = state.beam_indices[:, :num_return_sequences].reshape(sequences.shape[0], -1)
    generated = int((beam_indices != -1).sum(axis=1).max())
    return sequences[:, : settings.prompt + generated]


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------


def generate(
    model: SupportsDecoderSteps,
    input_ids: np.ndarray,
    pixel_values: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
    *,
    generation_config: GenerationConfig | None = None,
    max_positions: int | None = None,
    **kwargs: Any,
) -> np.ndarray:
    """Token ids ``[batch * num_return_sequences, length]`` (int64), the same as transformers' ``generate`` returns
    for the same model, inputs and arguments (greedy or beam search). ``max_positions`` caps transformers' default
    length the way the model config's ``max_position_embeddings`` does there (Florence-2's config has none)."""
    config, has_default_max_length = resolve_generation_config(model.generation_config, generation_config, **kwargs)
    input_ids = np.asarray(input_ids, dtype=np.int64)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be 2-D [batch, length], got shape {input_ids.shape}.")
    if attention_mask is None:
        attention_mask = np.ones(input_ids.shape, dtype=np.int64)
    attention_mask = np.asarray(attention_mask, dtype=np.int64)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {attention_mask.shape}, input_ids {input_ids.shape}; pass both "
                         "from the same processor call.")  # fmt: skip

    tokens = SpecialTokens.from_config(config)
    prompt_length = 1  # the decoder starts from one decoder_start token
    max_length, min_length = _lengths(config, has_default_max_length, prompt_length, max_positions)
    processors = LogitsProcessors.from_config(config, tokens, max_length, min_length, prompt_length)

    batch = input_ids.shape[0]
    beams = config.num_beams or 1
    hidden = model.encode(input_ids, pixel_values, attention_mask)
    # `_expand_inputs_for_generation`: the beams of one item are consecutive rows.
    decoder = _Decoder(model, np.repeat(hidden, beams, axis=0), np.repeat(attention_mask, beams, axis=0))
    start_ids = np.full((batch * beams, prompt_length), tokens.decoder_start, dtype=np.int64)
    if beams == 1:
        return greedy_search(decoder, start_ids, processors, tokens)
    return beam_search(decoder, start_ids, processors, tokens, config, batch)
