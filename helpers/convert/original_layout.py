"""Original-layout Florence-2 checkpoints (``microsoft/Florence-2-*`` and most fine-tunes) read as data, never as code.

Most Florence-2 fine-tunes are in the layout of Microsoft's first release: a ``config.json`` with an ``auto_map``, a
``modeling_florence2.py`` beside the weights, key names such as ``language_model.model.encoder…`` and
``vision_tower…``. That code no longer runs under transformers 5, and running code shipped with a model is how a
model folder takes over a machine. This module reads such a folder as files only — JSON, safetensors, and
``pytorch_model.bin`` through ``torch.load(weights_only=True)`` — and writes the same model in transformers'
native Florence-2 layout, which :func:`helpers.convert.conversion.convert_florence2` then converts as usual:

* config: ``dim_embed`` → ``embed_dim``, ``image_pos_embed.max_pos_embeddings`` → ``max_position_embeddings``,
  ``visual_temporal_embedding.max_temporal_embeddings`` → ``max_temporal_embeddings``; the ``florence2_language``
  text config becomes a ``bart`` one (missing fields take the original code's defaults, not BART's);
* weights: every tensor renamed by :data:`KEY_RULES`, the ``image_projection`` matrix transposed (the original
  multiplies ``x @ image_projection``, the native model uses a ``Linear``), the tied embedding stored once;
* tokenizer and processor: the 1,024 Florence tokens the original processor added at run time, then ``<image>``
  (id 51289 on the released models; the first free id on fine-tunes with extra tokens), the vocabulary padded with
  zero rows to a multiple of 64 like the native checkpoints, the post-processing rules the original processor had
  built in, ``image_seq_length`` from the image size;
* generation settings: those of the original ``text_config`` (the original ``generate`` ran the language model
  with them), over ``generation_config.json``.

Nothing here imports or executes a ``.py`` file from the folder. Taught in the README ("Your own fine-tuned model").
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers.ir import ConversionError

#: What the native checkpoints pad their vocabulary to (51289 tokens + ``<image>`` → 51328 rows).
VOCAB_MULTIPLE = 64

WEIGHTS_NAME = "model.safetensors"

#: ``(original name pattern, native name)`` in order; the first full match renames a tensor. From the published key
#: names of the original ``modeling_florence2.py`` and transformers' conversion script.
_BLOCK = r"vision_tower\.blocks\.(\d+)\.(\d+)\.(spatial_block|channel_block)"
KEY_RULES: tuple[tuple[str, str], ...] = (
    (r"vision_tower\.convs\.(\d+)\.proj\.(weight|bias)", r"model.vision_tower.convs.\1.conv.\2"),
    (r"vision_tower\.convs\.(\d+)\.norm\.(weight|bias)", r"model.vision_tower.convs.\1.norm.\2"),
    (_BLOCK + r"\.conv([12])\.fn\.dw\.(weight|bias)", r"model.vision_tower.blocks.\1.\2.\3.conv\4.\5"),
    (_BLOCK + r"\.(window_attn|channel_attn)\.norm\.(weight|bias)", r"model.vision_tower.blocks.\1.\2.\3.norm1.\5"),
    (_BLOCK + r"\.(window_attn|channel_attn)\.fn\.(qkv|proj)\.(weight|bias)",
     r"model.vision_tower.blocks.\1.\2.\3.\4.\5.\6"),
    (_BLOCK + r"\.ffn\.norm\.(weight|bias)", r"model.vision_tower.blocks.\1.\2.\3.norm2.\4"),
    (_BLOCK + r"\.ffn\.fn\.net\.(fc[12])\.(weight|bias)", r"model.vision_tower.blocks.\1.\2.\3.ffn.\4.\5"),
    (r"image_projection", r"model.multi_modal_projector.image_projection.weight"),
    (r"image_proj_norm\.(weight|bias)", r"model.multi_modal_projector.image_proj_norm.\1"),
    (r"image_pos_embed\.(row|column)_embeddings\.weight",
     r"model.multi_modal_projector.image_position_embed.\1_embeddings.weight"),
    (r"visual_temporal_embed\.pos_idx_to_embed", r"model.multi_modal_projector.visual_temporal_embed.pos_idx_to_embed"),
    (r"language_model\.model\.(shared|encoder|decoder)\.(.+)", r"model.language_model.\1.\2"),
    (r"language_model\.lm_head\.weight", r"lm_head.weight"),
)  # fmt: skip
_COMPILED_RULES = tuple((re.compile(pattern), native) for pattern, native in KEY_RULES)

#: The original language model adds this buffer to its logits; the native model has no such bias. It is all zeros
#: in every checkpoint written by the original code (a buffer is never trained), so it is checked, then dropped.
FINAL_LOGITS_BIAS = "language_model.final_logits_bias"
SHARED_EMBEDDING = "model.language_model.shared.weight"
#: Native names of the one tied token-embedding table (the original ties the same four names).
TIED_EMBEDDINGS = (
    SHARED_EMBEDDING,
    "model.language_model.encoder.embed_tokens.weight",
    "model.language_model.decoder.embed_tokens.weight",
)
LM_HEAD = "lm_head.weight"
TEMPORAL_EMBEDDING = "model.multi_modal_projector.visual_temporal_embed.pos_idx_to_embed"
IMAGE_PROJECTION = "model.multi_modal_projector.image_projection.weight"

#: Defaults of the original ``Florence2LanguageConfig`` (used when a field is missing; BART's differ in vocab_size).
ORIGINAL_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 51289, "max_position_embeddings": 1024, "encoder_layers": 12, "encoder_ffn_dim": 4096,
    "encoder_attention_heads": 16, "decoder_layers": 12, "decoder_ffn_dim": 4096, "decoder_attention_heads": 16,
    "activation_function": "gelu", "d_model": 1024, "dropout": 0.1, "attention_dropout": 0.0,
    "activation_dropout": 0.0, "init_std": 0.02, "scale_embedding": False, "pad_token_id": 1, "bos_token_id": 0,
    "eos_token_id": 2, "decoder_start_token_id": 2, "forced_eos_token_id": 2,
}  # fmt: skip
#: Defaults of the original ``Florence2VisionConfig`` (DaViT of Florence-2-large).
ORIGINAL_VISION_DEFAULTS: dict[str, Any] = {
    "drop_path_rate": 0.1, "patch_size": [7, 3, 3, 3], "patch_stride": [4, 2, 2, 2], "patch_padding": [3, 1, 1, 1],
    "patch_prenorm": [False, True, True, True], "dim_embed": [256, 512, 1024, 2048], "num_heads": [8, 16, 32, 64],
    "num_groups": [8, 16, 32, 64], "depths": [1, 1, 9, 1], "window_size": 12, "projection_dim": 1024,
    "image_feature_source": ["spatial_avg_pool", "temporal_avg_pool"],
}  # fmt: skip
#: What the native model implements (the original code offered these options and no others that were released).
SUPPORTED_VISION_OPTIONS = {
    "image_pos_embed.type": "learned_abs_2d",
    "visual_temporal_embedding.type": "COSINE",
    "image_feature_source": ["spatial_avg_pool", "temporal_avg_pool"],
}
#: The original processor's built-in phrase-grounding blacklist (the native processor reads it from its config).
ORIGINAL_BANNED_GROUNDING_TOKENS: tuple[str, ...] = (
    "it", "I", "me", "mine", "you", "your", "yours", "he", "him", "his", "she", "her", "hers", "they", "them",
    "their", "theirs", "one", "oneself", "we", "us", "our", "ours", "its", "myself", "yourself", "himself",
    "herself", "itself", "ourselves", "yourselves", "themselves", "this", "that", "these", "those", "who", "whom",
    "whose", "which", "what", "all", "another", "any", "anybody", "anyone", "anything", "each", "everybody",
    "everyone", "everything", "few", "many", "nobody", "none", "several", "some", "somebody", "someone",
    "something", "each other", "one another", "the image", "image", "images", "the", "a", "an", "a group",
    "other objects", "lots", "a set",
)  # fmt: skip
#: Decoding settings carried from the original ``text_config`` into the generation config.
GENERATION_KEYS = (
    "num_beams", "no_repeat_ngram_size", "early_stopping", "length_penalty", "repetition_penalty", "do_sample",
    "temperature", "top_k", "top_p", "max_length", "min_length", "num_beam_groups", "diversity_penalty",
    "encoder_no_repeat_ngram_size", "forced_bos_token_id", "forced_eos_token_id", "bos_token_id", "eos_token_id",
    "pad_token_id", "decoder_start_token_id",
)  # fmt: skip
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json",
)  # fmt: skip


class OriginalLayoutError(ConversionError):
    """An original-layout folder that cannot be mapped; the message names the problem and what to do."""


# --------------------------------------------------------------------------------------------------------------
# Detection


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise OriginalLayoutError(f"{path} is not readable JSON ({error}). Download the checkpoint again.") from error
    if not isinstance(data, dict):
        raise OriginalLayoutError(f"{path} does not hold a JSON object. Download the checkpoint again.")
    return data


def original_layout_markers(folder: str | Path) -> list[str]:
    """What marks ``folder`` as an original-layout Florence-2 (empty for a native one): text config
    ``florence2_language``, vision config ``davit`` / ``dim_embed``, original key names in the safetensors."""
    folder = Path(folder)
    config = _read_json(folder / "config.json") if (folder / "config.json").exists() else {}
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    vision = config.get("vision_config") if isinstance(config.get("vision_config"), dict) else {}
    markers = []
    if text.get("model_type") == "florence2_language":
        markers.append("text_config.model_type 'florence2_language'")
    if vision.get("model_type") == "davit":
        markers.append("vision_config.model_type 'davit'")
    if "dim_embed" in vision:
        markers.append("vision_config.dim_embed")
    keys = _safetensors_keys(folder)
    if any(key.startswith(("language_model.model.", "vision_tower.")) or key == "image_projection" for key in keys):
        markers.append("original weight names (language_model.model.*, vision_tower.*)")
    return markers


def is_original_layout(folder: str | Path) -> bool:
    """True when ``folder`` holds a Florence-2 in the original (remote-code) layout."""
    return bool(original_layout_markers(folder))


def _safetensors_keys(folder: Path) -> list[str]:
    """Tensor names from the safetensors headers (reads a few kilobytes, never the weights)."""
    from safetensors import safe_open

    keys: list[str] = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="numpy") as handle:
                keys.extend(handle.keys())
        except Exception:  # a damaged file is reported when the weights are read
            continue
    return keys


# --------------------------------------------------------------------------------------------------------------
# Weights


def weight_files(folder: Path) -> tuple[str, list[Path]]:
    """``("safetensors" | "bin", files)``: safetensors whenever present (one file or an index of shards)."""
    for kind, single, index in (
        ("safetensors", "model.safetensors", "model.safetensors.index.json"),
        ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (folder / index).exists():
            shards = sorted(set(_read_json(folder / index).get("weight_map", {}).values()))
            missing = [name for name in shards if not (folder / name).exists()]
            if missing or not shards:
                raise OriginalLayoutError(
                    f"{folder / index} lists weight files that are missing ({', '.join(missing[:3]) or 'none listed'}). "
                    "Download the checkpoint again (all shards)."
                )
            return kind, [folder / name for name in shards]
        if (folder / single).exists():
            return kind, [folder / single]
        if kind == "safetensors" and any(folder.glob("*.safetensors")):
            return kind, sorted(folder.glob("*.safetensors"))
    raise OriginalLayoutError(
        f"{folder} has no weights (model.safetensors, pytorch_model.bin or a sharded index). "
        "Download the checkpoint again, weights included."
    )


def read_weights(folder: Path, *, verbose: bool = True) -> dict[str, Any]:
    """All tensors of an original-layout folder, by original name. ``.bin`` files are read with
    ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers."""
    import torch
    from safetensors.torch import load_file

    kind, files = weight_files(folder)
    tensors: dict[str, Any] = {}
    for path in files:
        if kind == "safetensors":
            part = load_file(str(path))
        else:
            if verbose:
                print(
                    f"ℹ️  {path.name}: reading PyTorch pickle weights with torch.load(weights_only=True) — tensors "
                    "only, no code can run; they are re-saved as safetensors.",
                    file=sys.stderr,
                )
            try:
                part = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as error:  # pickle refusals, truncation and zip errors all land here
                raise OriginalLayoutError(
                    f"{path} could not be read as plain tensors ({type(error).__name__}: {_gist(error)}). It is "
                    "damaged, or "
                    "it holds more than tensors (which this collection never unpickles). Download it again, or convert "
                    "it to safetensors where you trust it."
                ) from error
            if isinstance(part, dict) and isinstance(part.get("state_dict"), dict):
                part = part["state_dict"]
        duplicated = set(part) & set(tensors)
        if duplicated:
            raise OriginalLayoutError(f"{path} repeats tensors of another shard ({sorted(duplicated)[:3]}).")
        tensors.update(part)
    return tensors


def _gist(error: Exception) -> str:
    """The informative line of torch's long unpickling error (which also suggests weights_only=False: never)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line]
    return (named or lines or [""])[0][:200]


def native_key(original: str) -> str | None:
    """The native name of one original tensor name (``None`` when no rule knows it)."""
    for pattern, native in _COMPILED_RULES:
        if pattern.fullmatch(original):
            return pattern.sub(native, original)
    return None


@dataclass
class MappedWeights:
    """Native tensors (the tied embedding once), plus which original names fed them."""

    tensors: dict[str, Any]
    sources: dict[str, list[str]]


def map_weights(original: Mapping[str, Any], vocab_rows: int) -> MappedWeights:
    """Rename every original tensor to its native name; refuse leftovers; pad the embedding to ``vocab_rows`` rows.

    The original ties ``shared``, both ``embed_tokens`` and ``lm_head`` into one table; checkpoints hold any subset
    of these names, and every copy present must be equal. The native model and this collection's converter store
    that table once."""
    import torch

    renamed: dict[str, Any] = {}
    sources: dict[str, list[str]] = {}
    unknown = []
    for name, tensor in original.items():
        if name == FINAL_LOGITS_BIAS:
            if not tensor.is_meta and bool(torch.count_nonzero(tensor)):
                raise OriginalLayoutError(
                    f"{FINAL_LOGITS_BIAS} is not all zeros, and the native Florence-2 has no output bias. This "
                    "checkpoint was changed outside the original training code; it cannot be converted exactly."
                )
            continue
        target = native_key(name)
        if target is None:
            unknown.append(name)
            continue
        renamed[target] = tensor
        sources[target] = [name]
    if unknown:
        raise OriginalLayoutError(
            f"{len(unknown)} tensors have names the original Florence-2 layout does not use "
            f"({', '.join(sorted(unknown)[:5])}). This is not a checkpoint of the original Florence-2 code; "
            "nothing was converted."
        )
    if IMAGE_PROJECTION in renamed:
        renamed[IMAGE_PROJECTION] = renamed[IMAGE_PROJECTION].t().contiguous()
    embedding, embedding_sources = _one_table(renamed, sources, [*TIED_EMBEDDINGS, LM_HEAD])
    if embedding is None:
        raise OriginalLayoutError("The checkpoint has no token-embedding table (language_model.model.shared.weight).")
    renamed[SHARED_EMBEDDING] = _pad_rows(embedding, vocab_rows)
    sources[SHARED_EMBEDDING] = embedding_sources
    return MappedWeights(renamed, sources)


def _one_table(renamed: dict, sources: dict, names: list[str]) -> tuple[Any, list[str]]:
    present = [name for name in names if name in renamed]
    tables = [renamed.pop(name) for name in present]
    origin = [source for name in present for source in sources.pop(name)]
    for other, name in zip(tables[1:], origin[1:]):
        if not _same(tables[0], other):
            raise OriginalLayoutError(
                f"{origin[0]} and {name} differ, but Florence-2 ties them to one table (the original code always "
                "does). The checkpoint was changed outside that code and cannot be converted exactly."
            )
    return (tables[0] if tables else None), origin


def _same(a: Any, b: Any) -> bool:
    import torch

    if a.shape != b.shape:
        return False
    return a.is_meta or b.is_meta or bool(torch.equal(a, b))


def _pad_rows(table: Any, rows: int) -> Any:
    """Zero rows up to ``rows``: their logits are exactly 0 (the released native checkpoints use other values)."""
    import torch

    if table.shape[0] > rows:
        raise OriginalLayoutError(f"The embedding has {table.shape[0]} rows, more than the {rows} expected.")
    padding = torch.zeros(rows - table.shape[0], table.shape[1], dtype=table.dtype, device=table.device)
    return torch.cat([table, padding]).contiguous()


# --------------------------------------------------------------------------------------------------------------
# Config


def _nested(config: dict, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def map_config(original: dict, vocab_rows: int, image_token_id: int) -> dict:
    """The native ``Florence2Config`` (as a dict) of an original ``config.json``."""
    text = {**ORIGINAL_TEXT_DEFAULTS, **(original.get("text_config") or {})}
    vision = {**ORIGINAL_VISION_DEFAULTS, **(original.get("vision_config") or {})}
    for option, supported in SUPPORTED_VISION_OPTIONS.items():
        value = _nested(vision, option)
        if value is None and option != "image_feature_source":
            raise OriginalLayoutError(f"config.json has no vision_config.{option}; the original code requires it.")
        if value != supported:
            raise OriginalLayoutError(
                f"vision_config.{option} is {value!r}; the native Florence-2 implements only {supported!r}, the "
                "setting of every released checkpoint. This model cannot be converted."
            )
    stages = {key: len(vision[key]) for key in ("dim_embed", "num_heads", "num_groups", "depths", "patch_size",
                                                  "patch_stride", "patch_padding", "patch_prenorm")}  # fmt: skip
    if len(set(stages.values())) != 1:
        raise OriginalLayoutError(f"vision_config lists have different numbers of stages: {stages}.")
    if vision["projection_dim"] != text["d_model"]:
        raise OriginalLayoutError(
            f"vision_config.projection_dim ({vision['projection_dim']}) differs from text_config.d_model "
            f"({text['d_model']}): image features could not enter the text encoder. config.json is inconsistent."
        )
    native_vision = {
        "embed_dim": list(vision["dim_embed"]),
        "num_heads": list(vision["num_heads"]),
        "num_groups": list(vision["num_groups"]),
        "depths": list(vision["depths"]),
        "patch_size": list(vision["patch_size"]),
        "patch_stride": list(vision["patch_stride"]),
        "patch_padding": list(vision["patch_padding"]),
        "patch_prenorm": list(vision["patch_prenorm"]),
        "window_size": vision["window_size"],
        "projection_dim": vision["projection_dim"],
        "drop_path_rate": vision["drop_path_rate"],
        "max_position_embeddings": vision["image_pos_embed"]["max_pos_embeddings"],
        "max_temporal_embeddings": vision["visual_temporal_embedding"]["max_temporal_embeddings"],
        "mlp_ratio": 4.0,  # the original DaViT is always built with these two (from_config does not pass them)
        "qkv_bias": True,
    }
    native_text = {
        "model_type": "bart",
        "vocab_size": vocab_rows,
        **{key: text[key] for key in ORIGINAL_TEXT_DEFAULTS if key != "vocab_size"},
        "tie_word_embeddings": True,
    }
    return {
        "model_type": "florence2",
        "architectures": ["Florence2ForConditionalGeneration"],
        "vision_config": native_vision,
        "text_config": native_text,
        "image_token_id": image_token_id,
        "tie_word_embeddings": True,
        "is_encoder_decoder": True,
    }


def generation_settings(original: dict, folder: Path) -> dict[str, Any]:
    """Decoding settings: ``generation_config.json`` (if any), then the original ``text_config``'s (the original
    ``generate`` handed the work to its language model, whose settings came from ``text_config``)."""
    text = original.get("text_config") or {}
    settings: dict[str, Any] = {key: ORIGINAL_TEXT_DEFAULTS[key] for key in
                                ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
                                 "forced_eos_token_id")}  # fmt: skip
    if (folder / "generation_config.json").exists():
        stored = _read_json(folder / "generation_config.json")
        settings.update({key: value for key, value in stored.items() if key in GENERATION_KEYS})
    settings.update({key: text[key] for key in GENERATION_KEYS if key in text and text[key] is not None})
    if settings.get("max_length") == 20:  # transformers' default, not a choice; the native checkpoints set none
        del settings["max_length"]
    if settings.get("num_beams", 1) == 1:  # beam-only settings with greedy decoding are rejected on save
        settings.pop("early_stopping", None)
        settings.pop("length_penalty", None)
    if not settings.get("do_sample"):
        for key in ("temperature", "top_k", "top_p"):
            settings.pop(key, None)
    return settings


# --------------------------------------------------------------------------------------------------------------
# Tokenizer and processor


def build_processor(folder: Path, scratch: Path):
    """The native ``Florence2Processor`` of an original folder, built from its tokenizer and image-processor files."""
    from transformers import BartTokenizer, CLIPImageProcessorPil, Florence2Processor

    from helpers.convert.native_processor import FLORENCE2_EXTRA_TOKENS, IMAGE_TOKEN, POST_PROCESSOR_CONFIG

    tokenizer_dir = scratch / "tokenizer"
    tokenizer_dir.mkdir(parents=True)
    copied = [name for name in TOKENIZER_FILES if (folder / name).exists()]
    if not ({"tokenizer.json"} & set(copied) or {"vocab.json", "merges.txt"} <= set(copied)):
        raise OriginalLayoutError(
            f"{folder} has no tokenizer (tokenizer.json, or vocab.json and merges.txt). Download the checkpoint "
            "again with its tokenizer files, or copy them from microsoft/Florence-2-base."
        )
    for name in copied:  # a folder of its own: no config.json or auto_map for the tokenizer loader to follow
        data = (folder / name).read_bytes()
        if name == "tokenizer_config.json":
            settings = json.loads(data)
            for key in ("auto_map", "processor_class", "tokenizer_class"):
                settings.pop(key, None)
            data = json.dumps(settings).encode()
        (tokenizer_dir / name).write_bytes(data)
    tokenizer = BartTokenizer.from_pretrained(tokenizer_dir)
    # What the original processor's constructor did at every load: add the task, location and polygon tokens.
    missing = [token for token in FLORENCE2_EXTRA_TOKENS if token not in tokenizer.get_vocab()]
    if missing:
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.save_pretrained(tokenizer_dir)  # reloading below appends <image> after every existing token
    tokenizer = BartTokenizer.from_pretrained(tokenizer_dir, model_specific_special_tokens={"image_token": IMAGE_TOKEN})

    image_processor = CLIPImageProcessorPil(**_image_processor_settings(folder))
    height, width = int(image_processor.size["height"]), int(image_processor.size["width"])
    image_processor.image_seq_length = _image_seq_length(height, width)
    post_processor_config = {
        **POST_PROCESSOR_CONFIG,
        "phrase_grounding": {"banned_grounding_tokens": list(ORIGINAL_BANNED_GROUNDING_TOKENS)},
    }
    return Florence2Processor(
        image_processor=image_processor, tokenizer=tokenizer, post_processor_config=post_processor_config
    )


_IMAGE_PROCESSOR_FIELDS = (
    "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor", "do_normalize",
    "image_mean", "image_std", "do_convert_rgb",
)  # fmt: skip


def _image_processor_settings(folder: Path) -> dict[str, Any]:
    """The CLIP image-processor settings of ``preprocessor_config.json`` (the released models' when absent)."""
    stored = _read_json(folder / "preprocessor_config.json") if (folder / "preprocessor_config.json").exists() else {}
    kind = stored.get("image_processor_type", "CLIPImageProcessor")
    if not str(kind).startswith("CLIPImageProcessor"):
        raise OriginalLayoutError(
            f"preprocessor_config.json names image processor {kind!r}; Florence-2 uses CLIPImageProcessor."
        )
    settings = {
        "do_resize": True, "size": {"height": 768, "width": 768}, "resample": 3, "do_center_crop": False,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    }  # fmt: skip
    settings.update({key: stored[key] for key in _IMAGE_PROCESSOR_FIELDS if stored.get(key) is not None})
    size = settings["size"]
    if "height" not in size or "width" not in size:
        edge = int(size.get("shortest_edge", 768))
        settings["size"] = {"height": edge, "width": edge}
    settings.setdefault("crop_size", dict(settings["size"]))
    return settings


def _image_seq_length(height: int, width: int) -> int:
    """One ``<image>`` token per final DaViT patch (stride 32) plus the pooled one: what the model emits."""
    if height % 32 or width % 32:
        raise OriginalLayoutError(
            f"The image size {width}×{height} is not a multiple of 32; Florence-2's vision encoder needs one. "
            "Fix size in preprocessor_config.json."
        )
    return (height // 32) * (width // 32) + 1


# --------------------------------------------------------------------------------------------------------------
# The whole folder


def _check_against_native(config_dict: dict, weights: MappedWeights) -> Any:
    """Build the native model on the meta device (no memory) and compare names and shapes with the mapped weights."""
    import torch
    from transformers import Florence2Config, Florence2ForConditionalGeneration

    config = Florence2Config(**config_dict)
    with torch.device("meta"):
        model = Florence2ForConditionalGeneration(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    aliases = {*TIED_EMBEDDINGS[1:], LM_HEAD}
    expected = {name: shape for name, shape in expected.items() if name not in aliases}
    if TEMPORAL_EMBEDDING not in weights.tensors and TEMPORAL_EMBEDDING in expected:
        # A fixed sinusoid table (a buffer); checkpoints without it get the one transformers computes, as the
        # original code computed the same table at load.
        table = model.model.multi_modal_projector.visual_temporal_embed
        weights.tensors[TEMPORAL_EMBEDDING] = type(table)(config).pos_idx_to_embed.to("cpu")
        weights.sources[TEMPORAL_EMBEDDING] = []
    got = {name: tuple(t.shape) for name, t in weights.tensors.items()}
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = sorted(name for name in set(expected) & set(got) if expected[name] != got[name])
    if missing or extra or wrong:
        details = [f"missing {missing[:4]}" if missing else "", f"unexpected {extra[:4]}" if extra else "",
                   "shape differs for " + ", ".join(f"{n} (config {expected[n]}, weights {got[n]})" for n in wrong[:3])
                   if wrong else ""]  # fmt: skip
        raise OriginalLayoutError(
            "The weights do not match config.json: " + "; ".join(d for d in details if d) + ". The folder mixes "
            "files of different models; download the checkpoint again."
        )
    return config


def convert_to_native(folder: str | Path, output_dir: str | Path, *, verbose: bool = True) -> Path:
    """Write the native-layout transformers checkpoint of an original-layout ``folder`` into ``output_dir``.

    ``output_dir`` then loads with ``Florence2ForConditionalGeneration.from_pretrained`` and ``AutoProcessor``, and
    converts with :func:`helpers.convert.conversion.convert_florence2` (which calls this for you). No code from ``folder``
    is imported or run. Taught in the README ("Your own fine-tuned model").
    """
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    folder, output_dir = Path(folder), Path(output_dir)
    original = _read_json(folder / "config.json")
    if original.get("model_type") != "florence2" or not is_original_layout(folder):
        raise OriginalLayoutError(f"{folder} is not an original-layout Florence-2 checkpoint.")
    output_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".original-layout-", dir=output_dir))
    try:
        processor = build_processor(folder, scratch)
        image_token_id = processor.tokenizer.image_token_id
        tensors = read_weights(folder, verbose=verbose)
        rows_in_file = _embedding_rows(tensors)
        if len(processor.tokenizer) - 1 > rows_in_file:
            raise OriginalLayoutError(
                f"The tokenizer has {len(processor.tokenizer) - 1} tokens but the embedding only {rows_in_file} rows: "
                "the tokenizer files belong to another model. Use the tokenizer saved with these weights."
            )
        vocab_rows = -(-max(rows_in_file, image_token_id + 1) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        weights = map_weights(tensors, vocab_rows)
        del tensors
        config_dict = map_config(original, vocab_rows, image_token_id)
        config = _check_against_native(config_dict, weights)
        save_file({k: v.contiguous() for k, v in weights.tensors.items()}, str(output_dir / WEIGHTS_NAME),
                  metadata={"format": "pt"})  # fmt: skip
        config.save_pretrained(output_dir)
        GenerationConfig(**generation_settings(original, folder)).save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if verbose:
        print(
            f"✅ {folder.name}: original layout mapped to transformers' native Florence-2 ({len(weights.tensors)} "
            f"tensors, vocabulary {rows_in_file} → {vocab_rows} rows, <image> = {image_token_id}); no code from the "
            "folder was run.",
            flush=True,
        )
    return output_dir


def _embedding_rows(tensors: Mapping[str, Any]) -> int:
    for name in ("language_model.model.shared.weight", "language_model.model.encoder.embed_tokens.weight",
                 "language_model.model.decoder.embed_tokens.weight", "language_model.lm_head.weight"):  # fmt: skip
        if name in tensors:
            return int(tensors[name].shape[0])
    raise OriginalLayoutError("The checkpoint has no token-embedding table (language_model.model.shared.weight).")


__all__ = [
    "KEY_RULES",
    "OriginalLayoutError",
    "convert_to_native",
    "is_original_layout",
    "map_config",
    "map_weights",
    "native_key",
    "original_layout_markers",
]
