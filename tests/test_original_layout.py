"""Original-layout checkpoints (microsoft/Florence-2-*, most fine-tunes) convert without running any of their code.

The original code cannot run under transformers 5, so these tests build original-layout folders the other way
round: from a native random model, by the inverse of the published mapping (transformers'
``convert_florence2_original_pytorch_to_hf.py`` and the original ``modeling_florence2.py`` /
``configuration_florence2.py``), written here independently of :data:`helpers.convert.original_layout.KEY_RULES`. Mapping
such a folder back must give the native model bit for bit; its conversion must answer like PyTorch, token for
token; the Python files in the folder (booby-trapped here) must never run.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.convert.native_processor import FLORENCE2_EXTRA_TOKENS
from helpers.course.tiny import make_tiny_florence2

#: Written into every test folder as modeling_/configuration_/processing_florence2.py: importing it leaves a mark.
TRAP = """
from pathlib import Path
Path({marker!r}).write_text("code from the model folder ran")
raise SystemExit("code from the model folder ran")
"""
REMOTE_CODE_FILES = ("modeling_florence2.py", "configuration_florence2.py", "processing_florence2.py")


# ------------------------------------------------------------------------------------------ the inverse mapping


def original_name(native: str) -> str:
    """Native tensor name → the name the original Florence-2 code gives it (published facts, inverse direction)."""
    if native.startswith("model.language_model."):
        return "language_model.model." + native.removeprefix("model.language_model.")
    if native == "lm_head.weight":
        return "language_model.lm_head.weight"
    projector = {
        "image_projection.weight": "image_projection",
        "image_proj_norm.weight": "image_proj_norm.weight",
        "image_proj_norm.bias": "image_proj_norm.bias",
        "image_position_embed.row_embeddings.weight": "image_pos_embed.row_embeddings.weight",
        "image_position_embed.column_embeddings.weight": "image_pos_embed.column_embeddings.weight",
        "visual_temporal_embed.pos_idx_to_embed": "visual_temporal_embed.pos_idx_to_embed",
    }
    if native.startswith("model.multi_modal_projector."):
        return projector[native.removeprefix("model.multi_modal_projector.")]
    parts = native.removeprefix("model.").split(".")
    assert parts[0] == "vision_tower", native
    if parts[1] == "convs":  # vision_tower.convs.{i}.(conv|norm).(weight|bias); the original calls the conv "proj"
        return ".".join(["vision_tower", "convs", parts[2], "proj" if parts[3] == "conv" else parts[3], parts[4]])
    stage, block, kind, layer, rest = parts[2], parts[3], parts[4], parts[5], parts[6:]
    attention = "window_attn" if kind == "spatial_block" else "channel_attn"
    # Original blocks wrap each layer in PreNorm(norm, fn): depth-wise convs are conv{n}.fn.dw, the attention is
    # {attention}.fn.(qkv|proj) with its norm at {attention}.norm, the MLP is ffn.fn.net.fc{n} with ffn.norm.
    original_layer = {
        "conv1": ["conv1", "fn", "dw"], "conv2": ["conv2", "fn", "dw"],
        "norm1": [attention, "norm"], "norm2": ["ffn", "norm"],
        "window_attn": ["window_attn", "fn"], "channel_attn": ["channel_attn", "fn"], "ffn": ["ffn", "fn", "net"],
    }[layer]  # fmt: skip
    return ".".join(["vision_tower", "blocks", stage, block, kind, *original_layer, *rest])


def original_config(native: dict, *, auto_map: bool) -> dict:
    """The original config.json of a native config (``dim_embed``, ``florence2_language``, ``davit`` …)."""
    vision, text = native["vision_config"], native["text_config"]
    config = {
        "architectures": ["Florence2ForConditionalGeneration"],
        "model_type": "florence2",
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "ignore_index": -100, "is_encoder_decoder": True,
        "projection_dim": vision["projection_dim"],
        "vocab_size": text["vocab_size"],
        "text_config": {
            "model_type": "florence2_language",
            **{k: text[k] for k in ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                                    "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim",
                                    "max_position_embeddings", "activation_function", "scale_embedding",
                                    "vocab_size")},
            "add_bias_logits": False, "add_final_layer_norm": False, "normalize_before": False,
            "num_beams": 3, "no_repeat_ngram_size": 3, "early_stopping": True, "max_length": 20,
            "forced_bos_token_id": 0, "forced_eos_token_id": 2, "decoder_start_token_id": 2,
        },
        "vision_config": {
            "model_type": "davit",
            "dim_embed": vision["embed_dim"], "num_heads": vision["num_heads"], "num_groups": vision["num_groups"],
            "depths": vision["depths"], "patch_size": vision["patch_size"], "patch_stride": vision["patch_stride"],
            "patch_padding": vision["patch_padding"], "patch_prenorm": vision["patch_prenorm"],
            "window_size": vision["window_size"], "projection_dim": vision["projection_dim"],
            "drop_path_rate": 0.1, "enable_checkpoint": False,
            "visual_temporal_embedding": {"type": "COSINE", "max_temporal_embeddings": vision["max_temporal_embeddings"]},
            "image_pos_embed": {"type": "learned_abs_2d", "max_pos_embeddings": vision["max_position_embeddings"]},
            "image_feature_source": ["spatial_avg_pool", "temporal_avg_pool"],
        },
    }  # fmt: skip
    if auto_map:
        config["auto_map"] = {
            "AutoConfig": "configuration_florence2.Florence2Config",
            "AutoModelForCausalLM": "modeling_florence2.Florence2ForConditionalGeneration",
        }
    return config


def original_tensors(native: dict[str, torch.Tensor], rows: int, *, tied_names: tuple[str, ...]) -> dict:
    """Native tensors → original tensors: renamed, image projection transposed ([vision dim, projection dim], used
    as ``x @ image_projection``), the embedding cut to the original vocabulary, the tied table under ``tied_names``,
    the original's all-zero ``final_logits_bias`` buffer added."""
    tensors = {}
    for name, tensor in native.items():
        if name in (
            "lm_head.weight",
            "model.language_model.encoder.embed_tokens.weight",
            "model.language_model.decoder.embed_tokens.weight",
            "model.language_model.shared.weight",
        ):
            continue  # one table, written below under the chosen names
        tensors[original_name(name)] = tensor.t().contiguous() if name.endswith("image_projection.weight") else tensor
    table = native["model.language_model.shared.weight"][:rows].clone()
    for name in tied_names:
        tensors[name] = table.clone()
    tensors["language_model.final_logits_bias"] = torch.zeros(1, rows)
    return tensors


# ------------------------------------------------------------------------------------------ building test folders


def strip_tokenizer(tokenizer_json: dict, *, florence_tokens: bool) -> dict:
    """Remove ``<image>`` (and, like microsoft/Florence-2-*'s files, the Florence tokens the original processor
    added at run time) from a tokenizer.json."""
    drop = {"<image>"} | (set() if florence_tokens else set(FLORENCE2_EXTRA_TOKENS))
    tokenizer_json["added_tokens"] = [t for t in tokenizer_json["added_tokens"] if t["content"] not in drop]
    return tokenizer_json


def make_original_checkpoint(
    native_dir: Path,
    target: Path,
    *,
    auto_map: bool = True,
    weights: str = "safetensors",
    florence_tokens_in_tokenizer: bool = False,
    tied_names: tuple[str, ...] = ("language_model.model.shared.weight",),
) -> Path:
    """An original-layout folder holding the same model as ``native_dir`` (built with ``<image>`` last)."""
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True)
    native_config = json.loads((native_dir / "config.json").read_text())
    image_token_id = native_config["image_token_id"]
    rows = image_token_id  # the original vocabulary: every token before <image>
    config = original_config(native_config, auto_map=auto_map)
    config["vocab_size"] = config["text_config"]["vocab_size"] = rows
    (target / "config.json").write_text(json.dumps(config, indent=2))
    tensors = original_tensors(load_file(native_dir / "model.safetensors"), rows, tied_names=tied_names)
    if weights == "safetensors":
        save_file(tensors, target / "model.safetensors")
    elif weights == "sharded-safetensors":
        names = sorted(tensors)
        halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for file, keys in halves.items():
            save_file({k: tensors[k] for k in keys}, target / file)
        index = {"weight_map": {k: file for file, keys in halves.items() for k in keys}}
        (target / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        torch.save(tensors, target / "pytorch_model.bin")
    tokenizer_json = json.loads((native_dir / "tokenizer.json").read_text())
    stripped = strip_tokenizer(tokenizer_json, florence_tokens=florence_tokens_in_tokenizer)
    (target / "tokenizer.json").write_text(json.dumps(stripped))
    (target / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))
    processor = json.loads((native_dir / "processor_config.json").read_text())["image_processor"]
    processor.update({"processor_class": "Florence2Processor", "image_processor_type": "CLIPImageProcessor"})
    if auto_map:
        processor["auto_map"] = {"AutoProcessor": "processing_florence2.Florence2Processor"}
    (target / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    for name in REMOTE_CODE_FILES:  # wherever a loader copies them to, importing them marks this folder
        (target / name).write_text(TRAP.format(marker=str((target / "EXECUTED").resolve())))
    return target


def assert_no_code_ran(folder: Path) -> None:
    assert not (folder / "EXECUTED").exists(), "a Python file from the model folder was executed"
    names = {name.removesuffix(".py") for name in REMOTE_CODE_FILES}
    loaded = [m for m in sys.modules if m.split(".")[-1] in names and not m.startswith("transformers.models.")]
    assert loaded == [], f"modules from the model folder were imported: {loaded}"


@pytest.fixture(scope="module")
def native_reference(tmp_path_factory) -> Path:
    """A tiny base-like native model laid out like the released native checkpoints."""
    return build_native_reference(tmp_path_factory.mktemp("native") / "tiny", seed=3)


def build_native_reference(folder: Path, **tiny_options) -> Path:
    """A tiny native model laid out like the released native checkpoints: ``<image>`` after every other token, the
    rows after it zero (what the mapping pads with). Mapping its original-layout twin back must give it bit for bit.

    (helpers.course.tiny registers ``<image>`` before the Florence tokens; here it is moved last, and the embedding rows
    with it.)"""
    from safetensors.torch import load_file, save_file

    folder = make_tiny_florence2(folder, **tiny_options)
    config = json.loads((folder / "config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    old_image = config["image_token_id"]
    last = max(t["id"] for t in tokenizer["added_tokens"])
    order = [i for i in range(config["text_config"]["vocab_size"]) if i != old_image]
    order.insert(last, old_image)  # new row i holds old row order[i]
    for token in tokenizer["added_tokens"]:
        token["id"] = last if token["id"] == old_image else token["id"] - (old_image < token["id"] <= last)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    config["image_token_id"] = last
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = load_file(folder / "model.safetensors")
    for name in ("model.language_model.shared.weight", "lm_head.weight"):
        if name in tensors:
            tensors[name] = tensors[name][order].contiguous()
            tensors[name][last:] = 0
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def native_state(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import Florence2ForConditionalGeneration

    model, info = Florence2ForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return {k: v.float() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------ the mapping itself

VARIANTS = {
    "safetensors, auto_map, tokenizer like microsoft/Florence-2-*": {},
    "no auto_map": {"auto_map": False},
    "pytorch_model.bin with every tied name": {
        "weights": "bin",
        "tied_names": ("language_model.model.shared.weight", "language_model.model.encoder.embed_tokens.weight",
                       "language_model.model.decoder.embed_tokens.weight", "language_model.lm_head.weight"),
    },
    "sharded safetensors, only lm_head stored, tokens saved by a fine-tune": {
        "weights": "sharded-safetensors", "tied_names": ("language_model.lm_head.weight",),
        "florence_tokens_in_tokenizer": True,
    },
}  # fmt: skip


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mapping_gives_back_the_native_model_bit_for_bit(variant, native_reference, tmp_path, capsys):
    from transformers import AutoProcessor

    from helpers.convert.original_layout import convert_to_native, is_original_layout

    original = make_original_checkpoint(native_reference, tmp_path / "original", **VARIANTS[variant])
    assert is_original_layout(original)
    native = convert_to_native(original, tmp_path / "native")
    assert_no_code_ran(original)
    if VARIANTS[variant].get("weights") == "bin":
        assert "torch.load(weights_only=True)" in capsys.readouterr().err

    expected, got = native_state(native_reference), native_state(native)
    assert sorted(got) == sorted(expected)
    different = [name for name in expected if not torch.equal(expected[name], got[name])]
    assert different == [], f"tensors mapped wrongly: {different[:5]}"

    reference_config = json.loads((native_reference / "config.json").read_text())
    config = json.loads((native / "config.json").read_text())
    for part in ("vision_config", "text_config"):
        for key, value in config[part].items():
            if key in reference_config[part] and key not in (
                "dtype",
                "drop_path_rate",
                "dropout",
                "attention_dropout",
                "activation_dropout",
                "transformers_version",
            ):
                assert value == reference_config[part][key], (part, key)
    assert config["image_token_id"] == reference_config["image_token_id"]

    reference_processor, processor = (
        AutoProcessor.from_pretrained(native_reference),
        AutoProcessor.from_pretrained(native),
    )
    image = Image.new("RGB", (40, 30), "teal")
    for prompt in ("<OD>", "<CAPTION_TO_PHRASE_GROUNDING>a red car", "<REGION_TO_OCR><loc_1><loc_2><loc_30><loc_40>"):
        a = reference_processor(text=prompt, images=image, return_tensors="pt")
        b = processor(text=prompt, images=image, return_tensors="pt")
        assert a["input_ids"].tolist() == b["input_ids"].tolist(), prompt
        assert torch.equal(a["pixel_values"], b["pixel_values"])
    generation = json.loads((native / "generation_config.json").read_text())
    assert {k: generation[k] for k in ("num_beams", "no_repeat_ngram_size", "forced_bos_token_id",
                                       "forced_eos_token_id", "decoder_start_token_id")} == {
        "num_beams": 3, "no_repeat_ngram_size": 3, "forced_bos_token_id": 0, "forced_eos_token_id": 2,
        "decoder_start_token_id": 2}  # fmt: skip
    assert "max_length" not in generation  # transformers' default of 20 is not carried as a setting


def test_load_torch_model_reads_an_original_folder(native_reference, tmp_path):
    from helpers.convert.conversion import load_torch_model

    original = make_original_checkpoint(native_reference, tmp_path / "original", weights="bin")
    model = load_torch_model(original)
    expected = native_state(native_reference)
    assert all(torch.equal(expected[name], tensor) for name, tensor in model.state_dict().items())
    assert_no_code_ran(original)


def test_every_original_tensor_is_used_exactly_once(native_reference):
    from safetensors.torch import load_file

    from helpers.convert.original_layout import map_weights

    config = json.loads((native_reference / "config.json").read_text())
    tied = ("language_model.model.shared.weight", "language_model.model.encoder.embed_tokens.weight",
            "language_model.model.decoder.embed_tokens.weight", "language_model.lm_head.weight")  # fmt: skip
    original = original_tensors(
        load_file(native_reference / "model.safetensors"), config["image_token_id"], tied_names=tied
    )
    mapped = map_weights(original, config["text_config"]["vocab_size"])
    used = [source for sources in mapped.sources.values() for source in sources]
    assert len(used) == len(set(used)), "an original tensor fed two native tensors"
    assert set(used) == set(original) - {"language_model.final_logits_bias"}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda t: t.update({"vision_tower.norms.weight": torch.ones(3)}), "names the original Florence-2 layout does not use"),
        (lambda t: t["language_model.final_logits_bias"].add_(1.0), "final_logits_bias is not all zeros"),
        (lambda t: t.pop("image_proj_norm.bias"), "missing"),
        (lambda t: t.update({"language_model.lm_head.weight": t["language_model.model.shared.weight"] + 1,
                             "language_model.model.decoder.embed_tokens.weight": t["language_model.model.shared.weight"] + 2}),
         "differ, but Florence-2 ties them"),
    ],
    ids=["unknown-tensor", "nonzero-logits-bias", "missing-tensor", "untieable-embeddings"],
)  # fmt: skip
def test_inconsistent_checkpoints_are_refused(damage, message, native_reference, tmp_path):
    from safetensors.torch import load_file, save_file

    from helpers.convert.original_layout import OriginalLayoutError, convert_to_native

    original = make_original_checkpoint(native_reference, tmp_path / "original")
    tensors = load_file(original / "model.safetensors")
    damage(tensors)
    save_file(tensors, original / "model.safetensors")
    with pytest.raises(OriginalLayoutError, match=message):
        convert_to_native(original, tmp_path / "native")
    assert_no_code_ran(original)


#: The published sizes of the released models (configs of microsoft/Florence-2-base and -large), in native names.
RELEASED = {
    "base": ({"embed_dim": [128, 256, 512, 1024], "num_heads": [4, 8, 16, 32], "num_groups": [4, 8, 16, 32],
              "projection_dim": 768},
             {"d_model": 768, "encoder_layers": 6, "decoder_layers": 6, "encoder_attention_heads": 12,
              "decoder_attention_heads": 12, "encoder_ffn_dim": 3072, "decoder_ffn_dim": 3072,
              "max_position_embeddings": 1024}, (2.30e8, 2.33e8)),
    "large": ({"embed_dim": [256, 512, 1024, 2048], "num_heads": [8, 16, 32, 64], "num_groups": [8, 16, 32, 64],
               "projection_dim": 1024},
              {"d_model": 1024, "encoder_layers": 12, "decoder_layers": 12, "encoder_attention_heads": 16,
               "decoder_attention_heads": 16, "encoder_ffn_dim": 4096, "decoder_ffn_dim": 4096,
               "max_position_embeddings": 4096}, (7.6e8, 7.8e8)),
}  # fmt: skip


@pytest.mark.parametrize("size", list(RELEASED))
def test_the_released_shapes_map_config_and_every_key(size):
    """The published configs on the meta device (no memory, no conversion): the mapped config builds the native
    architecture of that size, and every original tensor lands on a native one of the same shape."""
    from transformers import Florence2Config, Florence2ForConditionalGeneration

    from helpers.convert.original_layout import map_config, map_weights

    vision, text, parameters = RELEASED[size]
    common_vision = {"depths": [1, 1, 9, 1], "patch_size": [7, 3, 3, 3], "patch_stride": [4, 2, 2, 2],
                     "patch_padding": [3, 1, 1, 1], "patch_prenorm": [False, True, True, True], "window_size": 12,
                     "max_temporal_embeddings": 100, "max_position_embeddings": 50}  # fmt: skip
    common_text = {"activation_function": "gelu", "scale_embedding": False, "vocab_size": 51289}
    released = original_config(
        {"vision_config": {**common_vision, **vision}, "text_config": {**common_text, **text}}, auto_map=True
    )
    native = map_config(released, 51328, 51289)
    assert native["vision_config"]["embed_dim"] == vision["embed_dim"]
    assert native["text_config"]["d_model"] == text["d_model"] and native["text_config"]["vocab_size"] == 51328
    config = Florence2Config(**native)
    with torch.device("meta"):
        model = Florence2ForConditionalGeneration(config)
    state = model.state_dict()
    assert parameters[0] < sum(t.numel() for t in model.parameters()) < parameters[1]
    unpadded = {k: (v[:51289] if k.endswith(("shared.weight", "embed_tokens.weight", "lm_head.weight")) else v)
                for k, v in state.items()}  # fmt: skip
    original = original_tensors(unpadded, 51289, tied_names=("language_model.model.shared.weight",))
    assert original["image_projection"].shape == (vision["embed_dim"][-1], vision["projection_dim"])
    mapped = map_weights(original, 51328)
    aliases = {"lm_head.weight", "model.language_model.encoder.embed_tokens.weight",
               "model.language_model.decoder.embed_tokens.weight"}  # fmt: skip
    assert {k: tuple(v.shape) for k, v in mapped.tensors.items()} == {
        k: tuple(v.shape) for k, v in state.items() if k not in aliases
    }


def test_unsupported_original_options_are_refused():
    from helpers.convert.original_layout import OriginalLayoutError, map_config

    config = original_config(
        {"vision_config": {"embed_dim": [8, 16, 32, 64], "num_heads": [1, 2, 4, 8], "num_groups": [1, 2, 4, 8],
                           "depths": [1, 1, 1, 1], "patch_size": [7, 3, 3, 3], "patch_stride": [4, 2, 2, 2],
                           "patch_padding": [3, 1, 1, 1], "patch_prenorm": [False, True, True, True],
                           "window_size": 12, "projection_dim": 64, "max_temporal_embeddings": 100,
                           "max_position_embeddings": 50},
         "text_config": {"d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
                         "decoder_attention_heads": 4, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
                         "max_position_embeddings": 1024, "activation_function": "gelu", "scale_embedding": False,
                         "vocab_size": 2000}},
        auto_map=False,
    )  # fmt: skip
    config["vision_config"]["image_feature_source"] = ["last_frame"]
    with pytest.raises(OriginalLayoutError, match="image_feature_source is \\['last_frame'\\]"):
        map_config(config, 2048, 2000)
    config["vision_config"]["image_feature_source"] = ["spatial_avg_pool", "temporal_avg_pool"]
    config["vision_config"]["projection_dim"] = 32
    with pytest.raises(OriginalLayoutError, match="projection_dim \\(32\\) differs from text_config.d_model \\(64\\)"):
        map_config(config, 2048, 2000)


# ------------------------------------------------------------------------------------------ converting and answering

PROMPTS = (
    "<OD>", "<CAPTION>", "<OCR_WITH_REGION>", "<CAPTION_TO_PHRASE_GROUNDING>a red car next to a tree",
    "<REGION_TO_DESCRIPTION><loc_100><loc_200><loc_700><loc_900>", "<CAPTION_TO_PHRASE_GROUNDING><custom_1> by a car",
)  # fmt: skip
EXTRA_TOKENS = ("<custom_0>", "<custom_1>")


def add_fine_tune_tokens(folder: Path) -> int:
    """What a fine-tune that added tokens looks like: two more tokens after the Florence ones, two more embedding
    rows (unpadded). Returns the original vocabulary size."""
    config = json.loads((folder / "config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    rows = config["text_config"]["vocab_size"]
    for offset, token in enumerate(EXTRA_TOKENS):
        tokenizer["added_tokens"].append({"id": rows + offset, "content": token, "single_word": False, "lstrip": False,
                                          "rstrip": False, "normalized": False, "special": False})  # fmt: skip
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    config["vocab_size"] = config["text_config"]["vocab_size"] = rows + len(EXTRA_TOKENS)
    (folder / "config.json").write_text(json.dumps(config))
    tensors = torch.load(folder / "pytorch_model.bin", weights_only=True)
    table = tensors["language_model.model.shared.weight"]
    extra = torch.randn(len(EXTRA_TOKENS), table.shape[1], generator=torch.Generator().manual_seed(7)) * 0.2
    for name in ("language_model.model.shared.weight", "language_model.lm_head.weight"):  # one tied table
        tensors[name] = torch.cat([table, extra])
    tensors["language_model.final_logits_bias"] = torch.zeros(1, rows + len(EXTRA_TOKENS))
    torch.save(tensors, folder / "pytorch_model.bin")
    return rows + len(EXTRA_TOKENS)


@pytest.fixture(scope="module")
def odd_fine_tune(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(original-layout folder, models cache, its fp32 conversion): large-like (vision width 128 ≠ text width 48),
    384 px images, two added tokens, pytorch_model.bin with every tied name, converted through ensure_converted."""
    from helpers.course.checkpoints import ensure_converted

    root = tmp_path_factory.mktemp("odd")
    native = build_native_reference(root / "native", seed=5, large_style=True, image_size=384)
    tied = ("language_model.model.shared.weight", "language_model.lm_head.weight")
    original = make_original_checkpoint(
        native, root / "my-fine-tune", weights="bin", tied_names=tied, florence_tokens_in_tokenizer=True
    )  # a fine-tune's tokenizer holds the Florence tokens the original processor had added, then its own
    add_fine_tune_tokens(original)
    models = root / "models"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLORENCE2_MODELS_DIR", str(models))
        converted = ensure_converted(str(original), "fp32")
    assert_no_code_ran(original)
    return original, models, converted


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_a_converted_fine_tune_answers_like_pytorch_token_for_token(odd_fine_tune, tmp_path):
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    from helpers.ir import verify_conversion
    from helpers.convert.original_layout import convert_to_native
    from helpers.runtime.ov_model import EXACT_CONFIG, OVFlorence2Model

    original, _, converted = odd_fine_tune
    assert verify_conversion(converted)["source"] == str(original)
    native = convert_to_native(original, tmp_path / "native", verbose=False)
    config = json.loads((converted / "config.json").read_text())
    rows = json.loads((original / "config.json").read_text())["vocab_size"]
    assert config["image_token_id"] == rows  # the first free id, after the fine-tune's own tokens
    assert config["text_config"]["vocab_size"] == -(-(rows + 1) // 64) * 64
    processor = AutoProcessor.from_pretrained(converted)
    assert processor.tokenizer.convert_tokens_to_ids(list(EXTRA_TOKENS)) == [rows - 2, rows - 1]
    assert processor.image_processor.size == {"height": 384, "width": 384}

    torch_model = Florence2ForConditionalGeneration.from_pretrained(native).eval()
    ov_model = OVFlorence2Model(converted, "CPU", EXACT_CONFIG, cache_dir=None)
    answers = set()
    for seed, prompt in enumerate(PROMPTS):
        inputs = processor(text=prompt, images=noise_image(120, 90, seed), return_tensors="pt")
        for beams in (1, 3) if seed == 0 else (1,):
            with torch.no_grad():
                expected = torch_model.generate(**inputs, max_new_tokens=16, num_beams=beams)
            got = ov_model.generate(**inputs, max_new_tokens=16, num_beams=beams)
            assert expected.tolist() == got.tolist(), f"{prompt} beams={beams}"
            answers.add(tuple(expected[0].tolist()))
    assert len(answers) > 3  # a blind model would say the same whatever it is shown
    assert_no_code_ran(original)


def test_load_model_the_command_line_and_the_kit_take_the_folder(odd_fine_tune, tmp_path, monkeypatch, capsys):
    from helpers.cli.main import main
    from helpers.course.kit import build_kit
    from helpers.course.checkpoints import load_model
    from helpers.runtime.ov_model import EXACT_CONFIG

    original, models, converted = odd_fine_tune
    monkeypatch.setenv("FLORENCE2_MODELS_DIR", str(models))
    model, processor = load_model(str(original), "fp32", "CPU", EXACT_CONFIG)
    assert model.model_dir == converted  # converted once, then found again in the cache

    image = tmp_path / "noise.png"
    noise_image(64, 48, 0).save(image)
    capsys.readouterr()
    code = main([str(image), "--task", "<OD>", "--model", str(original), "--device", "CPU", "--weight-format", "fp32",
                 "--max-new-tokens", "12", "--num-beams", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and set(json.loads(out)) == {"<OD>"}

    kit = tmp_path / "kit"
    shutil.copytree(models, kit / "models")  # the kit converts into its own models/ folder; reuse the conversion
    build_kit(kit, [str(original)], ["fp32"], include_samples=False)
    entry = json.loads((kit / "kit.json").read_text())["models"][0]
    assert entry["model"] == str(original) and (kit / entry["path"] / "decoder.xml").exists()
    assert_no_code_ran(original)


def test_a_hub_id_in_the_original_layout_downloads_data_only(native_reference, tmp_path, monkeypatch):
    """microsoft/Florence-2-base-ft ships Python files and pickle weights: only JSON, text and weights are fetched
    (the hub is unreachable here, so a stand-in serves an original-layout folder by the same allow_patterns)."""
    import fnmatch

    import huggingface_hub

    from helpers.convert.conversion import resolve_source
    from helpers.convert.original_layout import convert_to_native

    served = make_original_checkpoint(native_reference, tmp_path / "hub", weights="bin")
    cache = tmp_path / "cache" / "microsoft--Florence-2-base-ft"
    requests = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        requests.append((repo_id, list(allow_patterns)))
        cache.mkdir(parents=True, exist_ok=True)
        for path in served.iterdir():
            if any(fnmatch.fnmatch(path.name, pattern) for pattern in allow_patterns):
                shutil.copy2(path, cache / path.name)
        return str(cache)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    folder = resolve_source("microsoft/Florence-2-base-ft")
    assert folder == cache and [r[0] for r in requests] == ["microsoft/Florence-2-base-ft"] * 2
    assert (folder / "pytorch_model.bin").exists() and not list(folder.glob("*.py"))
    native = convert_to_native(folder, tmp_path / "native", verbose=False)
    assert (native / "model.safetensors").exists()
    assert_no_code_ran(served)


def test_pytorch_folders_of_every_kind_get_a_clear_message_from_the_openvino_model(native_reference, tmp_path):
    from helpers.ir import IncompleteConversionError
    from helpers.runtime.ov_model import OVFlorence2Model

    for kind in ("bin", "sharded-safetensors", "safetensors"):
        original = make_original_checkpoint(native_reference, tmp_path / kind, weights=kind)
        with pytest.raises(IncompleteConversionError, match="holds a PyTorch checkpoint.*Convert it first") as caught:
            OVFlorence2Model(original, "CPU", cache_dir=None)
        assert "interrupted" not in str(caught.value) and len(str(caught.value)) < 500
    with pytest.raises(
        IncompleteConversionError, match=r"holds a PyTorch checkpoint.*weights found: model.safetensors\.\)"
    ):
        OVFlorence2Model(native_reference, "CPU", cache_dir=None)


def test_a_folder_without_auto_map_is_taken_as_original_not_refused(native_reference, tmp_path):
    """transformers itself answers such a folder with an 11,679-character 'Unrecognized model type' error."""
    from helpers.convert.conversion import check_model_folder
    from helpers.convert.original_layout import original_layout_markers

    original = make_original_checkpoint(native_reference, tmp_path / "plain", auto_map=False)
    assert "text_config.model_type 'florence2_language'" in original_layout_markers(original)
    check_model_folder(original)  # accepted: mapped as data, never loaded by transformers in this layout


def test_unknown_remote_code_is_still_refused(native_reference, tmp_path):
    from helpers.convert.conversion import check_model_folder
    from helpers.ir import ConversionError

    folder = tmp_path / "other"
    shutil.copytree(native_reference, folder)
    (folder / "modeling_custom.py").write_text(TRAP.format(marker=str(folder / "EXECUTED")))
    with pytest.raises(ConversionError, match="never runs code from a model folder"):
        check_model_folder(folder)


class PickleTrap:
    """Unpickling this creates a folder: proof that a pickle was loaded with more than weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.makedirs, (self.marker,)


def test_a_pickle_that_is_more_than_tensors_is_refused(native_reference, tmp_path):
    import pickle

    from helpers.convert.original_layout import OriginalLayoutError, convert_to_native

    original = make_original_checkpoint(native_reference, tmp_path / "original", weights="bin")
    marker = tmp_path / "pickle-ran"
    torch.save({"language_model.model.shared.weight": PickleTrap(marker)}, original / "pytorch_model.bin",
               pickle_module=pickle)  # fmt: skip
    with pytest.raises(OriginalLayoutError, match="could not be read as plain tensors.*never unpickles"):
        convert_to_native(original, tmp_path / "native", verbose=False)
    assert not marker.exists(), "the pickle ran code"
    assert_no_code_ran(original)
