"""Convert a Florence-2 checkpoint (transformers' native layout, or the original one via
:mod:`helpers.convert.original_layout`) to OpenVINO IR.

Florence-2 is an encoder-decoder model. Running it means: encode the image once, encode the prompt once, then call
the decoder once per generated token. So the conversion writes one IR per part, each called at its own rhythm:

==================  =========================================  ===========================================
part (file)          inputs -> outputs                          called
==================  =========================================  ===========================================
vision_encoder       pixel_values -> image_features             once per image
encoder              inputs_embeds, attention_mask -> hidden    once per prompt
decoder (stateful)   input_ids, encoder_hidden_states,          once per token; self-attention K/V and the
                     encoder_attention_mask, beam_idx -> logits  cross-attention K/V live in model state
==================  =========================================  ===========================================

The token-embedding table is tied to the decoder's output projection, so it is stored once, inside
``decoder.bin``; :class:`helpers.runtime.ov_model.OVFlorence2Model` builds the small "token embeddings" model from that
same weight when it loads.

The conversion is atomic: everything is written to a temporary folder beside ``output_dir`` and renamed at the end,
with a ``manifest.json`` (source, weight format, versions, file sizes and hashes). A folder without a matching,
intact manifest is never taken as converted.

Taught in ``notebooks/02_convert.ipynb``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from helpers.folders import remove_stale_staging, staged_folder
from helpers.ir import (
    CROSS_STATE_PREFIX,
    MANIFEST_NAME,
    SELF_STATE_PREFIX,
    WEIGHT_FORMATS,
    ConversionError,
    IncompleteConversionError,
    is_converted,
    write_manifest,
)


# --------------------------------------------------------------------------------------------------------------
# Progress


@contextlib.contextmanager
def _step(description: str, verbose: bool) -> Iterator[None]:
    """Print which part is being worked on and how long it took."""
    start = time.perf_counter()
    if verbose:
        print(f"⌛ {description} …", flush=True)
    yield
    if verbose:
        print(f"✅ {description} done in {time.perf_counter() - start:.1f} s", flush=True)


# --------------------------------------------------------------------------------------------------------------
# Loading the PyTorch model


def _is_local(model_id_or_path: str | Path) -> bool:
    return Path(model_id_or_path).expanduser().exists()


def check_model_folder(folder: Path) -> None:
    """Refuse folders that are not a Florence-2 this collection can read, before any long work starts.

    Two layouts are read: transformers' native one (``florence-community/Florence-2-*``) and the original one
    (``microsoft/Florence-2-*`` and most fine-tunes, mapped as data by :mod:`helpers.convert.original_layout`)."""
    if not folder.is_dir():
        raise ConversionError(f"{folder} is not a folder. Pass a Florence-2 folder or a hub id.")
    config_file = folder / "config.json"
    if not config_file.exists():
        raise ConversionError(
            f"{folder} has no config.json, so it is not a transformers model folder. "
            "Pass a folder written by `save_pretrained`, or a hub id such as florence-community/Florence-2-base-ft."
        )
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(
            f"{config_file} is not valid JSON ({error}). Download the checkpoint again (`hf download <hub id> "
            "--local-dir <folder>`)."
        ) from error
    if not isinstance(config, dict) or config.get("model_type") != "florence2":
        config = config if isinstance(config, dict) else {}
        raise ConversionError(
            f"{folder} holds a '{config.get('model_type')}' model, not Florence-2 (model_type 'florence2'). "
            "Use a florence-community/Florence-2-* checkpoint."
        )
    from helpers.convert.original_layout import is_original_layout, weight_files

    if is_original_layout(folder):
        weight_files(folder)  # its Python files are never imported; only the weights must be there
        return
    if _has_auto_map(folder) or any(folder.glob("*.py")):
        # Remote code that is not the original Florence-2 layout: we never execute code shipped with a model.
        raise ConversionError(
            f"{folder} is a remote-code Florence-2 (it ships Python code / an auto_map) in neither transformers' "
            "native layout nor the original microsoft/Florence-2-* one, so only its own code could load it. This "
            "collection never runs "
            "code from a model folder. Use a native florence-community/Florence-2-* checkpoint or an original-layout "
            "fine-tune."
        )
    if not any(folder.glob("*.safetensors")):
        raise ConversionError(
            f"{folder} has no .safetensors weights. Only safetensors are loaded from native-layout folders: pickle "
            "files (pytorch_model.bin) can run code when loaded. Use a florence-community/Florence-2-* checkpoint "
            "(they ship model.safetensors), or convert trusted .bin weights yourself with the safetensors library."
        )


def _has_auto_map(folder: Path) -> bool:
    """An ``auto_map`` in any of the folder's JSON configs points transformers at code shipped with the model."""
    for path in folder.glob("*.json"):
        if path.name == "tokenizer.json":  # the vocabulary (megabytes), never a place for auto_map
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # unreadable or not JSON: transformers could not read an auto_map from it either
        if isinstance(data, dict) and "auto_map" in data:
            return True
    return False


def _hub_error(model_id: str, error: Exception) -> ConversionError:
    return ConversionError(
        f"Could not download '{model_id}' from the Hugging Face hub ({type(error).__name__}: {error}). "
        "If this machine is offline, download the checkpoint elsewhere (`hf download "
        f"{model_id} --local-dir Florence-2`), copy the folder here and pass its path instead of the hub id; "
        "or use `helpers.make_tiny_florence2(folder)` for an offline test model. "
        f"(If '{model_id}' was meant as a local folder: there is no such folder in {Path.cwd()}.)"
    )


def resolve_source(model_id_or_path: str | Path) -> Path:
    """Return a local folder for a hub id (downloading it with a progress bar) or a local path."""
    if _is_local(model_id_or_path):
        folder = Path(model_id_or_path).expanduser().resolve()
        check_model_folder(folder)
        return folder
    model_id = str(model_id_or_path)
    if model_id.count("/") != 1 or model_id.startswith(("/", ".", "~")) or "\\" in model_id:
        # "models/florence2" that does not exist is a mistyped path far more often than a hub id.
        raise ConversionError(
            f"'{model_id}' is neither an existing folder nor a hub id of the form owner/name "
            "(e.g. florence-community/Florence-2-base-ft). Check the path, or pass a hub id."
        )
    folder = _download(model_id, ["*.json", "*.safetensors", "*.txt", "*.model"])
    from helpers.convert.original_layout import is_original_layout

    if is_original_layout(folder) and not any(folder.glob("*.safetensors")):
        # Original-layout repositories (microsoft/Florence-2-*) may ship only pickle weights; they are read with
        # torch.load(weights_only=True). Python files are never downloaded.
        folder = _download(model_id, ["pytorch_model*.bin", "pytorch_model.bin.index.json"])
    check_model_folder(folder)
    return folder


def _download(model_id: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, allow_patterns=patterns))
    except Exception as error:  # offline, unknown repo, network: all answered the same way
        raise _hub_error(model_id, error) from error


def load_torch_model(folder: Path):
    """Load the PyTorch model in float32, eager mode, never executing remote code. An original-layout folder is
    mapped to the native layout first (:mod:`helpers.convert.original_layout`, in a temporary folder)."""
    from transformers import AutoModelForImageTextToText

    from helpers.convert.original_layout import convert_to_native, is_original_layout

    if is_original_layout(folder):
        with tempfile.TemporaryDirectory(prefix="florence2-native-") as native:
            return load_torch_model(convert_to_native(folder, Path(native), verbose=False))
    model = AutoModelForImageTextToText.from_pretrained(
        folder, dtype="float32", use_safetensors=True, trust_remote_code=False
    )
    return model.eval()


def image_size_of(processor) -> tuple[int, int]:
    """The (height, width) the processor resizes to: the only reliable source of the model's image size."""
    size = processor.image_processor.size
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    edge = int(size.get("shortest_edge", 768))
    return edge, edge


# --------------------------------------------------------------------------------------------------------------
# The three parts as traceable PyTorch modules


def _torch_wrappers():
    """Build the wrapper classes lazily so importing this module does not import torch."""
    import torch
    from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache

    class TraceableLayer(DynamicLayer):
        """A cache layer that starts from the first tensor it receives instead of concatenating it to an empty 1-D
        tensor (which OpenVINO's converter cannot do)."""

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.dtype, self.device = key_states.dtype, key_states.device
                self.keys, self.values, self.is_initialized = key_states, value_states, True
                return self.keys, self.values
            return super().update(key_states, value_states, *args, **kwargs)

    def traceable_cache(num_layers: int) -> DynamicCache:
        cache = DynamicCache()
        cache.layers = [TraceableLayer() for _ in range(num_layers)]
        return cache

    class VisionEncoder(torch.nn.Module):
        """pixel_values -> image features projected to the text width (DaViT + projector)."""

        def __init__(self, model) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.model.get_image_features(pixel_values).pooler_output

    class TextEncoder(torch.nn.Module):
        """Prompt embeddings (image features already scattered in) -> encoder hidden states."""

        def __init__(self, model) -> None:
            super().__init__()
            self.encoder = model.model.language_model.encoder

        def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state

    class DecoderStep(torch.nn.Module):
        """One decoder step with an explicit cache: past self-attention K/V in, logits + present K/V out.

        Cross-attention K/V are returned as outputs too; the OpenVINO graph surgery below turns them into state
        computed once per request."""

        def __init__(self, model) -> None:
            super().__init__()
            self.decoder = model.model.language_model.decoder
            self.lm_head = model.lm_head
            self.num_layers = len(self.decoder.layers)

        def forward(self, input_ids, encoder_hidden_states, encoder_attention_mask, *past_self):
            self_cache = traceable_cache(self.num_layers)
            for layer in range(self.num_layers):
                self_cache.update(past_self[2 * layer], past_self[2 * layer + 1], layer)
            cache = EncoderDecoderCache(self_cache, traceable_cache(self.num_layers))
            hidden = self.decoder(
                input_ids=input_ids,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state
            outputs = [self.lm_head(hidden)]
            for layer in range(self.num_layers):
                outputs += [
                    cache.self_attention_cache.layers[layer].keys,
                    cache.self_attention_cache.layers[layer].values,
                ]
            for layer in range(self.num_layers):
                outputs += [
                    cache.cross_attention_cache.layers[layer].keys,
                    cache.cross_attention_cache.layers[layer].values,
                ]
            return tuple(outputs)

    return VisionEncoder, TextEncoder, DecoderStep


# --------------------------------------------------------------------------------------------------------------
# Conversion of each part


def _convert(module, example_input: dict[str, Any], input_shapes: list) -> Any:
    import openvino as ov
    import torch

    with torch.no_grad(), _quiet_tracer():
        return ov.convert_model(module, example_input=example_input, input=input_shapes)


@contextlib.contextmanager
def _quiet_tracer() -> Iterator[None]:
    """Tracer warnings come from Python-side shape checks that the traced graph does not need."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _to_tokens(feature_map):
    """[batch, channels, height, width] -> [batch, height·width, channels]."""
    batch, channels, height, width = feature_map.shape
    return feature_map.permute(0, 2, 3, 1).reshape(batch, height * width, channels)


def _to_feature_map(tokens, shape):
    """[batch, height·width, channels] -> [batch, channels, height, width] (``shape``)."""
    batch, channels, height, width = shape
    return tokens.reshape(batch, height, width, channels).permute(0, 3, 1, 2)


def _davit_block_forward(self, hidden_states):
    """DaViT's spatial and channel blocks as transformers computes them, with the layout switches written as one
    4-D permute each instead of ``flatten(2).transpose(1, 2)`` / ``transpose(1, 2).view(...)``: the same
    computation (a data movement written differently), but OpenVINO's CPU plugin runs half of these switches with
    a fast kernel this way."""
    shape = batch, channels, height, width = hidden_states.shape
    hidden_states = _to_tokens(self.conv1(hidden_states) + hidden_states)
    normed = self.norm1(hidden_states)
    if hasattr(self, "window_attn"):  # spatial block: attention within windows of [batch, height, width, channels]
        mixed = self.window_attn(normed.view(batch, height, width, channels))
    else:  # channel block: attention between the channels of each group
        mixed = self.channel_attn(normed)
    hidden_states = hidden_states + self.drop_path1(mixed)
    hidden_states = _to_feature_map(hidden_states, shape)
    hidden_states = _to_tokens(self.conv2(hidden_states) + hidden_states)
    hidden_states = hidden_states + self.drop_path2(self.ffn(self.norm2(hidden_states)))
    return _to_feature_map(hidden_states, shape)


def _channel_attention_forward(self, hidden_states):
    """DaViT's channel attention (softmax over channel-by-channel scores within each group, scaled by
    tokens**-0.5) with queries, keys and values kept as [batch, groups, tokens, channels]: transformers transposes
    them to [batch, groups, channels, tokens] for its attention function, the most expensive transposes of the
    whole vision encoder in OpenVINO. The same math, as two matmuls."""
    import torch

    batch, tokens, width = hidden_states.shape
    qkv = self.qkv(hidden_states).reshape(batch, tokens, 3, self.groups, width // self.groups)
    query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [batch, groups, tokens, channels]
    scores = torch.matmul(query.transpose(-1, -2) * tokens**-0.5, key)  # [batch, groups, channels, channels]
    attended = torch.matmul(value, scores.softmax(dim=-1).transpose(-1, -2))  # [batch, groups, tokens, channels]
    return self.proj(attended.permute(0, 2, 1, 3).reshape(batch, tokens, width))


@contextlib.contextmanager
def _fast_davit_layout() -> Iterator[None]:
    """Trace DaViT with :func:`_davit_block_forward` and :func:`_channel_attention_forward` in place of
    transformers' code; transformers' classes are restored afterwards. Measured on the base architecture, INT8
    weights: vision encoder 0.67 → 0.63 s per image, its Transpose time 172 → 95 ms (``PERF_COUNT``)."""
    from transformers.models.florence2 import modeling_florence2 as florence2

    replacements = {
        florence2.Florence2VisionSpatialBlock: _davit_block_forward,
        florence2.Florence2VisionChannelBlock: _davit_block_forward,
        florence2.Florence2VisionChannelAttention: _channel_attention_forward,
    }
    originals = {cls: cls.forward for cls in replacements}
    try:
        for cls, forward in replacements.items():
            cls.forward = forward
        yield
    finally:
        for cls, forward in originals.items():
            cls.forward = forward


def convert_vision_encoder(model, image_size: tuple[int, int]):
    import openvino as ov
    import torch

    VisionEncoder, _, _ = _torch_wrappers()
    height, width = image_size
    example = {"pixel_values": torch.randn(1, 3, height, width)}
    with _fast_davit_layout():
        ov_model = _convert(VisionEncoder(model), example, [ov.PartialShape([-1, 3, height, width])])
    _name_io(ov_model, ["pixel_values"], ["image_features"])
    return ov_model


def convert_text_encoder(model):
    import openvino as ov
    import torch

    _, TextEncoder, _ = _torch_wrappers()
    width = model.config.text_config.d_model
    example = {"inputs_embeds": torch.randn(2, 9, width), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    ov_model = _convert(TextEncoder(model), example, [ov.PartialShape([-1, -1, width]), ov.PartialShape([-1, -1])])
    _name_io(ov_model, ["inputs_embeds", "attention_mask"], ["last_hidden_state"])
    return ov_model


def convert_decoder(model):
    """Trace one decoder step, then make its caches OpenVINO state (see :func:`make_decoder_stateful`)."""
    import openvino as ov
    import torch

    _, _, DecoderStep = _torch_wrappers()
    text = model.config.text_config
    layers, heads = text.decoder_layers, text.decoder_attention_heads
    head_dim = text.d_model // heads
    batch, past, source = 2, 3, 7
    past_self = [torch.randn(batch, heads, past, head_dim) for _ in range(2 * layers)]
    example = (
        torch.randint(4, 100, (batch, 1)),
        torch.randn(batch, source, text.d_model),
        torch.ones(batch, source, dtype=torch.long),
        *past_self,
    )
    shapes = [
        ov.PartialShape([-1, -1]),
        ov.PartialShape([-1, -1, text.d_model]),
        ov.PartialShape([-1, -1]),
        # Fixing heads and head_dim here keeps the state's initial shape [batch, heads, 0, head_dim] well defined.
        *[ov.PartialShape([-1, heads, -1, head_dim])] * (2 * layers),
    ]
    import openvino as ov  # local import keeps module import light

    with torch.no_grad(), _quiet_tracer():
        ov_model = ov.convert_model(DecoderStep(model), example_input=example, input=shapes)
    past_names = [f"{SELF_STATE_PREFIX}.{layer}.{kind}" for layer in range(layers) for kind in ("key", "value")]
    present_names = [name.replace(SELF_STATE_PREFIX, "present_self") for name in past_names]
    cross_names = [f"{CROSS_STATE_PREFIX}.{layer}.{kind}" for layer in range(layers) for kind in ("key", "value")]
    _name_io(
        ov_model,
        ["input_ids", "encoder_hidden_states", "encoder_attention_mask", *past_names],
        ["logits", *present_names, *cross_names],
    )
    make_decoder_stateful(ov_model, past_names, present_names, cross_names)
    return ov_model


def _name_io(ov_model, input_names: list[str], output_names: list[str]) -> None:
    for port, name in zip(ov_model.inputs, input_names, strict=True):
        port.get_tensor().set_names({name})
    for port, name in zip(ov_model.outputs, output_names, strict=True):
        port.get_tensor().set_names({name})


def make_decoder_stateful(ov_model, past_names: list[str], present_names: list[str], cross_names: list[str]) -> None:
    """Move the decoder's caches into OpenVINO state, so no K/V tensor crosses into Python during generation.

    * Self-attention: each ``past`` input becomes a ``ReadValue`` whose initial value is an empty
      ``[batch, heads, 0, head_dim]`` tensor (batch taken from ``input_ids``), followed by a ``Gather`` on a new
      ``beam_idx`` input, so beam search reorders the cache inside OpenVINO; each ``present`` output becomes an
      ``Assign``.
    * Cross-attention: K/V depend only on the encoder output. Each becomes a ``ReadValue`` initialised from the
      projection of ``encoder_hidden_states``; the CPU plugin evaluates that initialiser only when the state is
      reset (first step of a request), later steps read the stored value. Keys are stored transposed, as the
      attention's matrix product reads them (:func:`_attend_with_transposed_keys`).
    """
    import openvino as ov
    from openvino import opset13 as ops
    from openvino.op.util import Variable, VariableInfo

    inputs = {name: port for port in ov_model.inputs for name in port.get_names()}
    outputs = {name: port for port in ov_model.outputs for name in port.get_names()}
    input_ids = inputs["input_ids"]
    beam_idx = ops.parameter(ov.PartialShape([-1]), ov.Type.i32, name="beam_idx")
    beam_idx.output(0).get_tensor().set_names({"beam_idx"})
    batch = ops.gather(ops.shape_of(input_ids, output_type="i64"), ops.constant([0], ov.Type.i64), ops.constant(0))

    sinks = []
    results_to_remove = []
    params_to_remove = []

    def variable(name: str, port) -> Variable:
        info = VariableInfo()
        info.data_shape = ov.PartialShape.dynamic(port.get_partial_shape().rank)
        info.data_type = port.get_element_type()
        info.variable_id = name
        return Variable(info)

    for past_name, present_name in zip(past_names, present_names, strict=True):
        parameter = inputs[past_name].get_node()
        shape = parameter.get_output_partial_shape(0)
        heads, head_dim = shape[1].get_length(), shape[3].get_length()
        empty = ops.broadcast(
            ops.constant(0.0, parameter.get_element_type()),
            ops.concat([batch, ops.constant([heads, 0, head_dim], ov.Type.i64)], axis=0),
        )
        var = variable(past_name, parameter.output(0))
        read = ops.read_value(empty, var)
        reordered = ops.gather(read, beam_idx, ops.constant(0))
        for consumer in list(parameter.output(0).get_target_inputs()):
            consumer.replace_source_output(reordered.output(0))
        params_to_remove.append(parameter)
        present = outputs[present_name]
        assign = ops.assign(read, var)  # argument replaced just below: assign() rejects an Output built elsewhere
        assign.set_argument(0, present.get_node().input_value(0))
        sinks.append(assign)
        results_to_remove.append(present.get_node())

    for cross_name in cross_names:
        result = outputs[cross_name].get_node()
        producer = result.input_value(0)
        consumers = [c for c in producer.get_target_inputs() if c.get_node() is not result]
        attention = [c.get_node() for c in consumers if c.get_node().get_type_name() == "ScaledDotProductAttention"]
        keys_transposed = cross_name.endswith(".key") and len(attention) == len(consumers) > 0
        # Keys are stored as [batch, heads, head_dim, source] when only attention reads them: the CPU plugin
        # would otherwise scale and transpose every layer's keys again at every step (27 % of a decoder step).
        initial = producer
        if keys_transposed:
            initial = ops.transpose(producer, ops.constant([0, 1, 3, 2], ov.Type.i64)).output(0)
        var = variable(cross_name, initial)
        read = ops.read_value(initial, var)
        if keys_transposed:
            for node in attention:
                _attend_with_transposed_keys(node, read.output(0))
        else:
            for consumer in consumers:
                consumer.replace_source_output(read.output(0))
        sinks.append(ops.assign(read, var))
        results_to_remove.append(result)

    for result in results_to_remove:
        ov_model.remove_result(result)
    for parameter in params_to_remove:
        ov_model.remove_parameter(parameter)
    ov_model.add_parameters([beam_idx])
    ov_model.add_sinks(sinks)
    ov_model.validate_nodes_and_infer_types()


def _attend_with_transposed_keys(attention, keys_transposed) -> None:
    """Replace one ``ScaledDotProductAttention`` node (query, key, value[, mask[, scale]]) by the same computation
    on keys already stored as [batch, heads, head_dim, source]: ``softmax(query @ keys_t * scale + mask) @ value``,
    with a boolean mask meaning "attend" where true (OpenVINO's and PyTorch's convention)."""
    from openvino import opset13 as ops

    if attention.get_attributes().get("causal"):
        raise ConversionError("Cross-attention is never causal; this decoder is not a Florence-2 decoder.")
    query, value = attention.input_value(0), attention.input_value(2)
    scores = ops.matmul(query, keys_transposed, False, False)
    if attention.get_input_size() > 4:
        scale = attention.input_value(4)
    else:  # the default scale: 1 / sqrt(head_dim)
        scale = ops.constant(np.float32(1.0 / np.sqrt(query.get_partial_shape()[-1].get_length())))
    scores = ops.multiply(scores, ops.convert_like(scale, scores))
    if attention.get_input_size() > 3:
        mask = attention.input_value(3)
        if mask.get_element_type().is_real():
            scores = ops.add(scores, ops.convert_like(mask, scores))
        else:
            minus_inf = ops.convert_like(ops.constant(np.float32(-np.inf)), scores)
            zero = ops.convert_like(ops.constant(np.float32(0.0)), scores)
            scores = ops.add(scores, ops.select(mask, zero, minus_inf))
    output = ops.matmul(ops.softmax(scores, -1), value, False, False)
    attention.output(0).replace(output.output(0))


# --------------------------------------------------------------------------------------------------------------
# Weight compression


def compress(ov_model, part: str, weight_format: str, verbose: bool, processor=None):
    """Apply ``weight_format`` to one part. fp32/fp16 are handled when saving; int8/int4 use NNCF; w8a8 calibrates
    the vision encoder's activations on images preprocessed by ``processor``."""
    if weight_format in ("fp32", "fp16"):
        return ov_model
    if weight_format == "w8a8":
        from helpers.convert.activation_quantization import compress_w8a8

        return compress_w8a8(ov_model, part, processor, verbose)
    import nncf

    if weight_format == "int8" or part == "vision_encoder":
        # The vision encoder is convolution-heavy and small; INT4 there costs accuracy for little size.
        return nncf.compress_weights(ov_model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    group_size = _int4_group_size(ov_model)
    return nncf.compress_weights(ov_model, mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=group_size, ratio=1.0)


def _int4_group_size(ov_model, preferred: int = 128) -> int:
    """The largest group size (up to ``preferred``) that divides every weight matrix's reduction width.

    INT4 groups run along the input (reduction) axis of a MatMul's weight, so only that width counts. The output
    width does not: counting it let a vocabulary of 51,290 (the tied output projection of an unpadded or extended
    vocabulary) collapse the whole decoder to group size 8. Tiny models have narrow layers, hence the search."""
    widths = [width for width in (_reduction_width(op) for op in ov_model.get_ordered_ops()) if width is not None]
    group = preferred
    while group > 8 and any(w % group for w in widths):
        group //= 2
    return group


def _reduction_width(op) -> int | None:
    """Input width of a MatMul with a static 2-D weight (second input), ``None`` for other operations."""
    if op.get_type_name() != "MatMul":
        return None
    shape = op.input_value(1).get_partial_shape()
    if not shape.is_static or len(shape) != 2:
        return None
    rows, columns = (int(d.get_length()) for d in shape)
    return columns if op.get_attributes().get("transpose_b") else rows


# --------------------------------------------------------------------------------------------------------------
# Manifest: what was built, and proof that it is intact


def _versions() -> dict[str, str]:
    import openvino
    import torch
    import transformers

    versions = {
        "openvino": openvino.get_version(),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    with contextlib.suppress(ImportError):
        import nncf

        versions["nncf"] = nncf.__version__
    return versions


# --------------------------------------------------------------------------------------------------------------
# Public entry point


def _check_writable(output_dir: Path, need_bytes: int) -> None:
    """Fail before the long work where the outcome is already known: read-only or full disk."""
    parent = output_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConversionError(f"Cannot create {parent} ({error}). Choose an output folder you can write to.") from error
    if not os.access(parent, os.W_OK):
        raise ConversionError(f"{parent} is not writable. Choose an output folder you can write to.")
    free = shutil.disk_usage(parent).free
    if free < need_bytes:
        raise ConversionError(
            f"Only {free / 1e9:.2f} GB free at {parent}, the conversion needs about {need_bytes / 1e9:.2f} GB. "
            "Free some space or choose another output folder."
        )


def _estimate_bytes(folder: Path, weight_format: str) -> int:
    from helpers.convert.original_layout import is_original_layout

    weights = sum(p.stat().st_size for p in (*folder.glob("*.safetensors"), *folder.glob("pytorch_model*.bin")))
    factor = {"fp32": 1.0, "fp16": 0.5, "int8": 0.3, "int4": 0.2, "w8a8": 0.3}[weight_format]
    # An original-layout folder is first rewritten in the native layout (float32 at most twice its size on disk).
    native_copy = 2 * weights if is_original_layout(folder) else 0
    # the IR is written to a temporary folder first; a margin covers the processor files and NNCF's scratch.
    return int(weights * factor * 1.2) + native_copy + 10_000_000


def convert_florence2(
    model_id_or_path: str | Path,
    output_dir: str | Path,
    weight_format: str = "fp16",
    *,
    overwrite: bool = False,
    verbose: bool = True,
) -> Path:
    """Convert a Florence-2 checkpoint to OpenVINO IR in ``output_dir`` and return that folder.

    ``model_id_or_path`` is a hub id (``florence-community/Florence-2-base-ft``, …) or a local folder, in
    transformers' native layout or the original one (``microsoft/Florence-2-*`` and most fine-tunes, mapped as data
    by :mod:`helpers.convert.original_layout`; no code from it runs). ``weight_format`` is one of ``fp32``, ``fp16``,
    ``int8``, ``int4``, ``w8a8`` (INT8 weights and vision activations, :mod:`helpers.convert.activation_quantization`).
    A complete conversion of the same source and format is reused unless ``overwrite``; a folder that holds
    something else is never silently replaced or used, and ``overwrite=True`` replaces only an earlier conversion,
    never the source checkpoint or a folder of other files. A full or read-only output location is refused before
    the model is loaded; folders left by killed conversions are deleted by the next one.

    Read the source with ``??convert_florence2`` in a notebook; taught in ``notebooks/02_convert.ipynb``.
    """
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {', '.join(WEIGHT_FORMATS)}; got {weight_format!r}.")
    output_dir = Path(output_dir).expanduser().resolve()
    source = str(model_id_or_path)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"{output_dir} is a file, not a folder. Choose a folder path for the converted model.")
    if _is_local(model_id_or_path):
        _check_not_source(output_dir, Path(model_id_or_path).expanduser().resolve())
    if output_dir.parent.is_dir():
        remove_stale_staging(output_dir)  # also when the output is already complete: killed reruns leave them too
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        if is_converted(output_dir, source, weight_format):
            if verbose:
                print(f"✅ {output_dir} already holds {source} as {weight_format}; reusing it.")
            return output_dir
        raise IncompleteConversionError(
            f"{output_dir} is not empty and does not hold a complete {weight_format} conversion of {source}. "
            "Pass overwrite=True to replace it, or choose another folder."
        )

    folder = resolve_source(model_id_or_path)
    _check_not_source(output_dir, folder)
    if output_dir.exists():
        _check_replaceable(output_dir)
    _check_writable(output_dir, _estimate_bytes(folder, weight_format))
    with staged_folder(output_dir) as staging:  # renamed into place only when everything below succeeded
        with _native_layout(folder, staging, verbose) as native_folder:
            _convert_into(native_folder, staging, weight_format, verbose)
        write_manifest(staging, source, weight_format, _versions())
    if verbose:
        print(f"✅ {source} converted to {output_dir} ({weight_format})")
    return output_dir


@contextlib.contextmanager
def _native_layout(folder: Path, staging: Path, verbose: bool) -> Iterator[Path]:
    """``folder`` itself when it is native; else its native rewrite (:mod:`helpers.convert.original_layout`), in a folder
    inside ``staging`` that is deleted afterwards (a killed run's staging is cleaned up by the next one)."""
    from helpers.convert.original_layout import convert_to_native, is_original_layout

    if not is_original_layout(folder):
        yield folder
        return
    native = staging / ".native-layout"
    try:
        with _step(f"Mapping {folder.name} from the original Florence-2 layout (as data, no code run)", verbose):
            convert_to_native(folder, native, verbose=verbose)
        yield native
    finally:
        shutil.rmtree(native, ignore_errors=True)


def _check_not_source(output_dir: Path, source_folder: Path) -> None:
    """Replacing ``output_dir`` must never delete the checkpoint being converted."""
    if output_dir == source_folder or output_dir in source_folder.parents:
        raise ConversionError(
            f"The output folder {output_dir} holds the checkpoint being converted ({source_folder}); converting into "
            "it would delete the checkpoint. Choose another output folder, e.g. a sibling folder."
        )


#: What a conversion folder may hold; ``overwrite=True`` refuses to delete a folder holding anything else.
_CONVERSION_SUFFIXES = (".xml", ".bin", ".json", ".txt")


def _check_replaceable(output_dir: Path) -> None:
    """``overwrite=True`` replaces an earlier conversion, never a folder of unrelated files (``"."``, ``"~"``)."""
    if (output_dir / MANIFEST_NAME).exists():
        return
    foreign = [
        entry.name
        for entry in output_dir.iterdir()
        if not entry.name.startswith(".")
        and not (entry.is_file() and entry.suffix in _CONVERSION_SUFFIXES)
        and entry.name != "compiled_cache"
    ]
    if foreign:
        raise ConversionError(
            f"{output_dir} holds files that are not from a conversion ({', '.join(sorted(foreign)[:5])}); "
            "overwrite=True would delete them. Choose a new or empty output folder."
        )


def _convert_into(folder: Path, staging: Path, weight_format: str, verbose: bool) -> None:
    import openvino as ov
    from transformers import AutoProcessor, GenerationConfig

    with _step(f"Loading {folder.name} (PyTorch)", verbose):
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=False)
        model = load_torch_model(folder)
    image_size = image_size_of(processor)
    builders = {
        "vision_encoder": lambda: convert_vision_encoder(model, image_size),
        "encoder": lambda: convert_text_encoder(model),
        "decoder": lambda: convert_decoder(model),
    }
    for part, build in builders.items():
        with _step(f"Converting {part}", verbose):
            ov_model = compress(build(), part, weight_format, verbose, processor)
            ov.save_model(ov_model, staging / f"{part}.xml", compress_to_fp16=weight_format != "fp32")
            del ov_model
            gc.collect()
    with _step("Saving processor, config and generation config", verbose):
        processor.save_pretrained(staging)
        model.config.save_pretrained(staging)
        try:
            generation_config = GenerationConfig.from_pretrained(folder)
        except OSError:
            generation_config = model.generation_config
        generation_config.save_pretrained(staging)


__all__ = [
    "ConversionError",
    "convert_florence2",
    "check_model_folder",
    "resolve_source",
    "load_torch_model",
    "image_size_of",
]
