"""The generation strategies of :class:`helpers.runtime.ov_model.OVFlorence2Model`, behind one protocol.

A strategy turns prompt token ids (and pixels) into answer token ids by calling the model's two OpenVINO steps,
``encode(...)`` once and ``decoder_step(...)`` once per token. There are two, and both give PyTorch's tokens at f32:

* :class:`NumpyGeneration` (``"numpy"``): :mod:`helpers.runtime.numpy_generation`, greedy and beam search written
  in numpy after transformers' own methods. No torch in the loop, so it also runs where only
  ``requirements-inference.txt`` is installed.
* :class:`TransformersGeneration` (``"transformers"``): transformers' own ``GenerationMixin.generate`` driving the
  same two steps (:mod:`helpers.runtime.hf_generation`, imported on first use because it needs torch): sampling,
  scores, every logits processor and stopping criterion.

The default, ``"auto"``, is numpy for every request it implements (greedy and beam search with the usual settings)
and transformers for the rest. Taught in ``notebooks/02_convert.ipynb`` and measured in ``notebooks/11_speed.ipynb``.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal, Protocol

import numpy as np

from helpers.runtime import numpy_generation

#: True when torch is installed: transformers' ``generate`` can run then.
TORCH_AVAILABLE = importlib.util.find_spec("torch") is not None

GeneratorName = Literal["auto", "transformers", "numpy"]


class GenerationStrategy(Protocol):
    """Who runs ``generate``: the loop that calls ``model.encode`` once and ``model.decoder_step`` per token."""

    name: str

    def supports(self, model: Any, generate_kwargs: dict[str, Any]) -> bool:
        """Whether this strategy implements the request (``generate_kwargs`` over the model's generation config)."""
        ...

    def generate(
        self, model: Any, input_ids: Any, pixel_values: Any, attention_mask: Any, **generate_kwargs: Any
    ) -> Any:
        """Token ids for ``processor.batch_decode``; a torch tensor when ``input_ids`` is one, else numpy int64."""
        ...


class NumpyGeneration:
    """Greedy and beam search in numpy (:mod:`helpers.runtime.numpy_generation`); no torch needed."""

    name = "numpy"

    def supports(self, model: Any, generate_kwargs: dict[str, Any]) -> bool:
        return numpy_generation.supports(model.generation_config, **generate_kwargs)

    def generate(
        self, model: Any, input_ids: Any, pixel_values: Any, attention_mask: Any, **generate_kwargs: Any
    ) -> Any:
        ids = numpy_generation.generate(
            model,
            to_numpy(input_ids),
            to_numpy(pixel_values),
            to_numpy(attention_mask),
            max_positions=getattr(model.config, "max_position_embeddings", None),  # as transformers reads it
            **generate_kwargs,
        )
        return like_input(input_ids, ids)


class TransformersGeneration:
    """transformers' own ``generate`` over the OpenVINO steps (:mod:`helpers.runtime.hf_generation`; needs torch)."""

    name = "transformers"

    def supports(self, model: Any, generate_kwargs: dict[str, Any]) -> bool:
        return TORCH_AVAILABLE

    def generate(
        self, model: Any, input_ids: Any, pixel_values: Any, attention_mask: Any, **generate_kwargs: Any
    ) -> Any:
        check_torch_for_transformers()
        from helpers.runtime.hf_generation import transformers_generate  # imports torch: only when first used

        return transformers_generate(model, input_ids, pixel_values, attention_mask, **generate_kwargs)


STRATEGIES: dict[str, GenerationStrategy] = {"numpy": NumpyGeneration(), "transformers": TransformersGeneration()}


def check_generator(generation: Any) -> GeneratorName:
    """``generation`` itself when it names a strategy or ``"auto"``; a ValueError naming the choices otherwise."""
    if generation not in ("auto", *STRATEGIES):
        raise ValueError(f"generation must be 'auto', 'transformers' or 'numpy', got {generation!r}.")
    return generation


def check_torch_for_transformers() -> None:
    """Fail with the fix when the transformers strategy is asked for without torch."""
    if not TORCH_AVAILABLE:
        raise ValueError(
            "generation='transformers' needs torch, which is not installed. Install it (pip install "
            "torch==2.13.0) or use generation='numpy' (greedy and beam search)."
        )


def choose_strategy(generation: GeneratorName, model: Any, generate_kwargs: dict[str, Any]) -> GenerationStrategy:
    """The strategy that runs a request: the one named, or for ``"auto"`` numpy when it implements the request and
    transformers otherwise (numpy again without torch, so that an unsupported setting gets numpy's clear error)."""
    choice = check_generator(generation)
    if choice == "auto":
        numpy_strategy = STRATEGIES["numpy"]
        if not TORCH_AVAILABLE or numpy_strategy.supports(model, generate_kwargs):
            return numpy_strategy
        return STRATEGIES["transformers"]
    if choice == "transformers":
        check_torch_for_transformers()
    return STRATEGIES[choice]


def like_input(inputs: Any, ids: np.ndarray) -> Any:
    """``ids`` as a torch tensor when the caller passed torch tensors, so the output type follows the input type."""
    if TORCH_AVAILABLE and hasattr(inputs, "detach"):
        import torch

        return torch.from_numpy(ids)
    return ids


def to_numpy(value: Any) -> np.ndarray | None:
    """Processor outputs as numpy: torch tensors (``return_tensors="pt"``) are converted, ``None`` stays."""
    if value is None or isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # a torch tensor; torch is not imported for this
        return value.detach().cpu().float().numpy() if value.is_floating_point() else value.detach().cpu().numpy()
    return np.asarray(value)
