"""transformers' ``GenerationMixin`` driving :class:`helpers.runtime.ov_model.OVFlorence2Model`'s OpenVINO steps (torch).

With it, greedy search, beam search, sampling, logits processors and stopping criteria are transformers' own code,
so OpenVINO output is PyTorch's token for token (at f32 precision). Only three things are ours:

* ``_maybe_prepare_encoder_kwargs_for_generation`` runs image encoder → token embeddings → text encoder once;
* ``forward`` runs one decoder step (``OVFlorence2Model.decoder_step``), whose K/V caches live in OpenVINO state;
* :class:`OVDecoderState` is handed to transformers as "the cache"; beam search reorders it through
  ``reorder_cache(beam_idx)``, which the decoder applies inside OpenVINO on the next step.

This module imports torch; :class:`helpers.runtime.generation.TransformersGeneration` imports it when first used (the
``"transformers"`` strategy). Taught in ``notebooks/02_convert.ipynb``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import GenerationMixin
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from helpers.runtime.generation import to_numpy

if TYPE_CHECKING:
    from helpers.runtime.ov_model import OVFlorence2Model


class OVDecoderState:
    """Stands in for transformers' cache object. The real K/V tensors stay inside the OpenVINO request; this
    object only tracks the sequence length and the beam order to apply on the next decoder step."""

    def __init__(self, owner: OVGenerationAdapter, batch_size: int) -> None:
        self.owner = owner
        self.seq_length = 0
        self.beam_idx = np.arange(batch_size, dtype=np.int32)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        # Composed with any order not yet applied: the decoder gathers the state rows once, on its next step.
        self.beam_idx = self.beam_idx[beam_idx.cpu().numpy()].astype(np.int32)


def _as_tensor(value: Any) -> Any:
    """numpy arrays (``return_tensors="np"``) become tensors; tensors and ``None`` pass through."""
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


def transformers_generate(
    model: OVFlorence2Model, input_ids: Any, pixel_values: Any, attention_mask: Any, **kwargs: Any
) -> torch.Tensor:
    """transformers' own ``generate`` over ``model``'s OpenVINO steps; numpy inputs are accepted too."""
    return OVGenerationAdapter(model).generate(
        input_ids=_as_tensor(input_ids),
        pixel_values=_as_tensor(pixel_values),
        attention_mask=_as_tensor(attention_mask),
        **kwargs,
    )


class OVGenerationAdapter(GenerationMixin):
    """What transformers' ``GenerationMixin`` needs from a model (no weights here), over an ``OVFlorence2Model``:
    its ``config``, ``generation_config``, ``encode(...)`` and ``decoder_step(...)``."""

    def __init__(self, model: OVFlorence2Model) -> None:
        self.model = model
        self.config = model.config
        self.generation_config = model.generation_config

    main_input_name = "input_ids"
    base_model_prefix = "model"
    _is_stateful = True
    _supports_cache_class = False

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @classmethod
    def can_generate(cls) -> bool:
        return True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache lives in OpenVINO state; transformers must not build a torch one

    def is_remote_code(self) -> bool:
        return False

    def get_experts_implementation(self) -> None:
        return None

    def __call__(self, *args: Any, **kwargs: Any) -> Seq2SeqLMOutput:
        return self.forward(*args, **kwargs)

    def _maybe_prepare_encoder_kwargs_for_generation(
        self, inputs_tensor: torch.Tensor, model_kwargs: dict, model_input_name: str | None, generation_config
    ) -> dict:
        if model_kwargs.get("encoder_outputs") is not None:
            return model_kwargs
        pixel_values = model_kwargs.pop("pixel_values", None)
        model_kwargs["encoder_outputs"] = self._encode_tensors(
            inputs_tensor, pixel_values, model_kwargs.get("attention_mask")
        )
        return model_kwargs

    def _encode_tensors(self, input_ids: Any, pixel_values: Any, attention_mask: Any) -> BaseModelOutput:
        """``encode`` (vision → embeddings → text encoder, in OpenVINO) on torch inputs, as transformers expects it."""
        hidden = self.model.encode(to_numpy(input_ids), to_numpy(pixel_values), to_numpy(attention_mask))
        return BaseModelOutput(last_hidden_state=torch.from_numpy(hidden))

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: OVDecoderState | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        # The state already holds every earlier token: only the newest one is fed after the first step.
        decoder_input_ids = input_ids if past_key_values is None else input_ids[:, past_key_values.seq_length :]
        return {
            "decoder_input_ids": decoder_input_ids,
            "past_key_values": past_key_values,
            "attention_mask": attention_mask,
            "encoder_outputs": encoder_outputs,
        }

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        encoder_outputs: BaseModelOutput | None = None,
        past_key_values: OVDecoderState | None = None,
        **kwargs: Any,
    ) -> Seq2SeqLMOutput:
        """One decoder step. ``past_key_values=None`` starts a new sequence (resets the OpenVINO state)."""
        if encoder_outputs is None:
            if input_ids is None:
                raise ValueError("forward() needs input_ids (and pixel_values) or encoder_outputs.")
            encoder_outputs = self._encode_tensors(input_ids, pixel_values, attention_mask)
        hidden = encoder_outputs.last_hidden_state
        if decoder_input_ids is None:
            decoder_input_ids = torch.full((hidden.shape[0], 1), self.config.text_config.decoder_start_token_id)
        new_sequence = past_key_values is None
        if new_sequence:
            past_key_values = OVDecoderState(self, decoder_input_ids.shape[0])
        elif past_key_values.owner is not self:
            raise ValueError("This cache belongs to another generate() call; start a new generate() call.")
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long)
        logits = self.model.decoder_step(
            decoder_input_ids.numpy(),
            hidden.numpy(),
            attention_mask.numpy(),
            past_key_values.beam_idx,
            new_sequence=new_sequence,
        )
        past_key_values.seq_length += decoder_input_ids.shape[1]
        past_key_values.beam_idx = np.arange(decoder_input_ids.shape[0], dtype=np.int32)
        return Seq2SeqLMOutput(logits=torch.from_numpy(logits), past_key_values=past_key_values)
