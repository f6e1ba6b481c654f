"""Florence-2's answer parsing without torch: ``processor.post_process_generation`` with numpy arithmetic.

Used by deployments without torch (``helpers.tasks.run`` calls :func:`use_numpy_post_processing` when torch is not
installed). transformers' ``Florence2PostProcessor`` parses the generated text itself, but turns location bins into
pixels with ``torch.tensor`` and ``torch.cat`` (its ``dequantize``), so without torch every task that answers with
boxes or polygons fails. This adapter keeps transformers' parser and replaces only that arithmetic:

* :class:`NumpyFlorence2PostProcessor` overrides ``quantize`` / ``dequantize`` with numpy code that rounds exactly
  like torch does there: float32 arithmetic (the bin plus 0.5, times the bin width rounded to float32), then
  truncation to int32 (``.int()``). ``tests/test_numpy_generation.py`` checks every bin at many image sizes.
* the parser's remaining torch calls are ``torch.tensor(list_of_bins)`` and ``isinstance(x, torch.Tensor)``; when
  torch is missing, :func:`use_numpy_post_processing` gives the post-processing module a two-name stand-in
  (:class:`_NumpyTensorNamespace`) for exactly those.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from transformers.models.florence2 import processing_florence2
from transformers.models.florence2.processing_florence2 import Florence2PostProcessor

from helpers.runtime.generation import TORCH_AVAILABLE

__all__ = ["NumpyFlorence2PostProcessor", "use_numpy_post_processing"]


class NumpyFlorence2PostProcessor(Florence2PostProcessor):
    """transformers' Florence-2 post-processor with numpy ``quantize`` / ``dequantize`` (same results as torch)."""

    def _bin_sizes(self, size: tuple[float, float], columns: int) -> np.ndarray:
        bins_w, bins_h = self.quantize_bins
        per_bin = np.array([size[0] / bins_w, size[1] / bins_h], dtype=np.float32)  # torch rounds the scalar too
        if columns not in (2, 4):
            raise ValueError(f"Unsupported location shape: last dim must be 2 or 4, got {columns}.")
        return np.tile(per_bin, columns // 2)

    def quantize(self, locations: Any, size: tuple[float, float]) -> np.ndarray:
        """Pixel coordinates ``[N, 4]`` boxes or ``[N, 2]`` points -> int32 bins, floor and clamp to 0..999."""
        values = np.asarray(locations, dtype=np.float32)
        bins = np.floor(values / self._bin_sizes(size, values.shape[-1]))
        upper = np.tile(np.array(self.quantize_bins, dtype=np.float32) - 1, values.shape[-1] // 2)
        return np.clip(bins, 0, upper).astype(np.int32)

    def dequantize(self, locations: Any, size: tuple[float, float]) -> np.ndarray:
        """int bins ``[N, 4]`` or ``[N, 2]`` -> int32 pixels at the bin centres (truncated like torch's ``.int()``)."""
        bins = np.asarray(locations).astype(np.float32)
        return ((bins + np.float32(0.5)) * self._bin_sizes(size, bins.shape[-1])).astype(np.int32)


class _NumpyTensorNamespace:
    """The only two names ``processing_florence2`` takes from torch, answered with numpy."""

    Tensor = np.ndarray

    @staticmethod
    def tensor(data: Any) -> np.ndarray:
        return np.asarray(data)  # lists of ints become int64, as with torch.tensor


def use_numpy_post_processing(processor: Any) -> Any:
    """Make ``processor.post_process_generation`` work without torch, with the same answers; returns ``processor``.

    Swaps in :class:`NumpyFlorence2PostProcessor` (same parsing rules and tokenizer). Only when torch is not
    installed does it also give transformers' post-processing module its numpy stand-in for ``torch``: with torch
    installed, nothing global changes. Calling it again is harmless.
    """
    if not TORCH_AVAILABLE and not hasattr(processing_florence2, "torch"):
        processing_florence2.torch = _NumpyTensorNamespace
    current = processor.post_processor
    if not isinstance(current, NumpyFlorence2PostProcessor):
        processor.post_processor = NumpyFlorence2PostProcessor(
            config=current.parse_task_config, tokenizer=current.tokenizer
        )
    return processor
