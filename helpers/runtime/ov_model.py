"""Run a converted Florence-2 with OpenVINO: ``OVFlorence2Model``, with or without torch.

:class:`OVFlorence2Model` holds the compiled OpenVINO parts written by :func:`helpers.convert.conversion.convert_florence2`:
``encode`` runs image encoder → token embeddings → text encoder, ``decoder_step`` runs one decoder step whose K/V
caches live in OpenVINO state. ``generate`` drives them with one of the strategies of
:mod:`helpers.runtime.generation`:

* ``"numpy"``: :mod:`helpers.runtime.numpy_generation`, greedy and beam search with the same tokens as transformers (at
  f32 precision), with no torch in the decode loop: about 4 ms less per token on the base model, and it runs in
  deployments that install ``requirements-inference.txt`` (no torch);
* ``"transformers"``: transformers' own ``GenerationMixin.generate`` through :mod:`helpers.runtime.hf_generation`
  (imported on first use), so sampling, scores and every other logits processor or stopping criterion are
  transformers' code.

The default, ``"auto"``, takes numpy for every request it supports and transformers for the rest (when torch is
installed). Importing this module imports no torch.

Taught in ``notebooks/02_convert.ipynb`` (how it works) and ``notebooks/03_select_device.ipynb`` (devices).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from helpers.ir import IncompleteConversionError, pytorch_weight_files, reconvert_hint, verify_conversion
from helpers.runtime.devices import check_device
from helpers.runtime.generation import GeneratorName, check_generator, check_torch_for_transformers, choose_strategy

#: Settings that make OpenVINO reproduce PyTorch float32 exactly (this CPU otherwise runs bf16 and a u8 KV cache).
EXACT_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}

#: What the decoder gets unless ``ov_config``/``part_config`` say otherwise. The CPU plugin's default u8 KV cache
#: (OpenVINO 2026.4) gave non-finite logits in about one load in three once beam search reordered the cache
#: (tests/test_parity.py::test_beam_search_logits_stay_finite_at_default_precision); f16 never did, at the same speed.
DECODER_DEFAULTS = {"KV_CACHE_PRECISION": "f16"}


class ImageFeatureCache:
    """A small LRU cache of image features keyed by the pixel values' bytes: asking a second task about the same
    image skips the vision encoder (its largest cost). ``max_items=0`` turns it off."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(pixel_values: np.ndarray) -> str:
        return hashlib.blake2b(np.ascontiguousarray(pixel_values).tobytes(), digest_size=16).hexdigest()

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key: str, features: np.ndarray) -> None:
        if self.max_items <= 0:
            return
        with self._lock:
            self._items[key] = features
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


#: ``FLORENCE2_COMPILED_CACHE``: where compiled models are cached: a folder (one sub-folder per model), or ``off``.
#: Unset: ``<model folder>/compiled_cache``. The ``cache_dir`` argument of :class:`OVFlorence2Model` wins over it.
COMPILED_CACHE_ENV = "FLORENCE2_COMPILED_CACHE"
#: Compiled blobs kept per part: the current one and one other (e.g. the exact-f32 and the default settings).
KEEP_COMPILED_BLOBS = 2


def compiled_cache_dir(model_dir: str | Path, cache_dir: str | Path | None = "auto") -> Path | None:
    """Where :class:`OVFlorence2Model` caches the compiled parts of ``model_dir`` (``None``: no cache): ``cache_dir``
    if given, else ``$FLORENCE2_COMPILED_CACHE/<model>-<hash of its path>`` (``off`` disables it), else
    ``<model_dir>/compiled_cache``. Taught in ``notebooks/03_select_device.ipynb``."""
    if cache_dir != "auto":
        return None if cache_dir is None else Path(cache_dir).expanduser()
    model_dir = Path(model_dir).resolve()
    setting = os.environ.get(COMPILED_CACHE_ENV, "").strip()
    if setting.lower() in ("off", "none", "0", "false", "no"):
        return None
    if setting:
        digest = hashlib.sha256(str(model_dir).encode()).hexdigest()[:8]
        return Path(setting).expanduser() / f"{model_dir.parent.name}-{model_dir.name}-{digest}"
    return model_dir / "compiled_cache"


def _blobs(folder: Path | None) -> set[Path]:
    try:
        return set(folder.glob("*.blob")) if folder is not None else set()
    except OSError:
        return set()


def prune_compiled_cache(folder: str | Path, keep: int = KEEP_COMPILED_BLOBS) -> list[Path]:
    """Delete all but the ``keep`` newest compiled blobs in ``folder`` (one part's cache: another OpenVINO version,
    device or setting wrote the older ones); returns what was deleted. A blob another process is reading stays
    readable on POSIX until it closes it."""
    blobs = sorted(_blobs(Path(folder)), key=lambda blob: blob.stat().st_mtime_ns, reverse=True)
    removed = []
    for blob in blobs[keep:]:
        with contextlib.suppress(OSError):
            blob.unlink()
            removed.append(blob)
    return removed


class OVFlorence2Model:
    """A converted Florence-2 on an OpenVINO device, with a transformers-style ``generate``.

    >>> model = OVFlorence2Model("models/Florence-2-base-ft/fp16", device="CPU")
    >>> inputs = processor(text="<OD>", images=image, return_tensors="np")  # or "pt"
    >>> ids = model.generate(**inputs, max_new_tokens=100)

    ``ov_config`` is passed to ``compile_model`` (e.g. :data:`EXACT_CONFIG` for bit-exact parity, or
    ``{"PERFORMANCE_HINT": "LATENCY"}``). ``image_cache_size`` bounds the image-feature cache (0 disables it).
    ``cache_dir`` stores compiled models so that the next load is faster (``None`` disables it; the default
    ``"auto"`` is :func:`compiled_cache_dir`: ``FLORENCE2_COMPILED_CACHE`` or ``<model_dir>/compiled_cache``); it
    keeps :data:`KEEP_COMPILED_BLOBS` blobs per part, deleting older ones.
    ``release_vision_memory`` gives the vision encoder's working memory back after each call (≈300 MB at 768×768 for
    Florence-2-base, idle while the decoder runs): a lower peak RSS for ≈10 ms more per new image. ``False`` keeps it.
    ``part_config`` overrides ``ov_config`` for one part (``"vision_encoder"``, ``"encoder"``, ``"decoder"``,
    ``"token_embeddings"``), e.g. ``{"decoder": {"INFERENCE_PRECISION_HINT": "f32"}}`` on CPUs where one-row bf16
    matmuls are slower than f32 (measure with ``benchmarks/benchmark.py``).
    ``generation`` chooses who runs ``generate``: ``"numpy"`` (:mod:`helpers.runtime.numpy_generation`: greedy and beam
    search, faster), ``"transformers"`` (needs torch: sampling, scores, any logits processor) or ``"auto"``: numpy
    when it supports the request, else transformers. ``generate(..., generation=...)`` overrides it. Token ids come
    back as a torch tensor when you pass torch tensors (``return_tensors="pt"``), as numpy int64 otherwise.

    One instance runs one ``generate`` at a time: calls from several threads are serialised by a lock (they are
    correct, not parallel). Use one instance per thread for parallel work.

    Taught in ``notebooks/02_convert.ipynb``.
    """

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "CPU",
        ov_config: dict[str, Any] | None = None,
        *,
        image_cache_size: int = 16,
        cache_dir: str | Path | None = "auto",
        part_config: dict[str, dict[str, Any]] | None = None,
        generation: GeneratorName = "auto",
        release_vision_memory: bool = True,
    ) -> None:
        self.generation = check_generator(generation)
        self.release_vision_memory = release_vision_memory
        if self.generation == "transformers":
            check_torch_for_transformers()  # fail at load, not at the first generate
        self.model_dir = Path(model_dir)
        self._check_folder()
        from transformers import AutoConfig, GenerationConfig  # here: importing this module imports no torch

        try:
            self.config = AutoConfig.from_pretrained(self.model_dir, trust_remote_code=False)
            self.generation_config = GenerationConfig.from_pretrained(self.model_dir)
        except (OSError, ValueError) as error:  # json, unicode and "not a config" errors are ValueErrors
            raise IncompleteConversionError(
                f"{self.model_dir}: config.json or generation_config.json cannot be read ({error}). "
                f"{reconvert_hint(self.model_dir, self.manifest)}"
            ) from error
        self.device_name = device
        self.ov_config = dict(ov_config or {})
        self.part_config = {part: dict(config) for part, config in (part_config or {}).items()}
        unknown = set(self.part_config) - {"vision_encoder", "encoder", "decoder", "token_embeddings"}
        if unknown:
            raise ValueError(
                f"part_config has unknown parts {sorted(unknown)}; use vision_encoder, encoder, decoder, token_embeddings."
            )
        self.core = ov.Core()
        check_device(self.core, device)
        self._set_compile_cache(cache_dir)
        self.image_cache = ImageFeatureCache(image_cache_size)
        self._lock = threading.RLock()
        self._compile_all()

    # ---- loading ------------------------------------------------------------------------------------------------

    def _check_folder(self) -> None:
        if not self.model_dir.is_dir():
            raise FileNotFoundError(
                f"{self.model_dir} does not exist. Convert a model first: "
                "`convert_florence2('florence-community/Florence-2-base-ft', folder)`."
            )
        if not any(self.model_dir.iterdir()):
            raise IncompleteConversionError(f"{self.model_dir} is empty. Convert a model into it first.")
        try:
            model_type = json.loads((self.model_dir / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            model_type = None  # no or unreadable config: the manifest check below explains what to do
        if model_type not in (None, "florence2"):
            raise IncompleteConversionError(
                f"{self.model_dir} holds a '{model_type}' model, not a converted Florence-2. Pass a folder written "
                "by `convert_florence2('florence-community/Florence-2-base-ft', folder)`."
            )
        pytorch_weights = pytorch_weight_files(self.model_dir)
        if pytorch_weights and not (self.model_dir / "decoder.xml").exists():
            raise IncompleteConversionError(
                f"{self.model_dir} holds a PyTorch checkpoint, not an OpenVINO conversion. Convert it first: "
                f"`convert_florence2('{self.model_dir}', output_folder)`, or pass the folder to `load_model`, which "
                f"converts it once and caches the result. (PyTorch weights found: {', '.join(pytorch_weights[:3])}.)"
            )
        # Hashes are checked the first time a folder is used and again whenever one of its files changes: a flipped
        # byte in decoder.bin otherwise gives plausible wrong answers without a word.
        self.manifest = verify_conversion(self.model_dir, check_hashes="once")

    def _set_compile_cache(self, cache_dir: str | Path | None) -> None:
        self.compiled_cache = compiled_cache_dir(self.model_dir, cache_dir)
        if self.compiled_cache is None:
            return
        try:
            self.compiled_cache.mkdir(parents=True, exist_ok=True)
        except OSError:
            self.compiled_cache = None  # a read-only model folder still loads, just without the compiled-model cache
            return
        if self.compiled_cache == self.model_dir / "compiled_cache":
            prune_compiled_cache(self.compiled_cache, keep=0)  # blobs of older versions (one flat folder, unbounded)

    def _compile(self, model: ov.Model | str | Path, part: str) -> ov.CompiledModel:
        config = self.compile_config(part)
        part_cache = None
        if self.compiled_cache is not None:
            part_cache = self.compiled_cache / part
            with contextlib.suppress(OSError):
                part_cache.mkdir(exist_ok=True)
            config["CACHE_DIR"] = str(part_cache)
        before = _blobs(part_cache)
        try:
            compiled = self._compile_with_cache_fallback(model, config)
        except RuntimeError as error:
            if not isinstance(model, (str, Path)):
                raise
            # OpenVINO's message starts with source-file locations; keep the words that say why.
            reason = re.sub(r"(Exception from )?\S+\.(cpp|hpp):\d+:?\s*", "", " ".join(str(error).split()))[:300]
            raise IncompleteConversionError(
                f"OpenVINO cannot read {model} ({reason}). {reconvert_hint(self.model_dir, self.manifest)}"
            ) from error
        if part_cache is not None and _blobs(part_cache) - before:
            prune_compiled_cache(part_cache)
        return compiled

    def _compile_with_cache_fallback(self, model: ov.Model | str | Path, config: dict[str, Any]) -> ov.CompiledModel:
        """``compile_model``, and once more without ``CACHE_DIR`` if it fails with it: processes sharing a cache
        folder (Ray actors, two notebooks) can write or prune the same blob at once, and OpenVINO then fails on a
        file that vanished. The cache only saves time; a model that compiles without it must load."""
        try:
            return self.core.compile_model(model, self.device_name, config)
        except RuntimeError:
            if "CACHE_DIR" not in config:
                raise
        return self.core.compile_model(model, self.device_name, {k: v for k, v in config.items() if k != "CACHE_DIR"})

    def compile_config(self, part: str) -> dict[str, Any]:
        """The settings ``part`` is compiled with: :data:`DECODER_DEFAULTS` (decoder, not on NPU), then ``ov_config``,
        then ``part_config[part]``; later ones win."""
        defaults = DECODER_DEFAULTS if part == "decoder" and "NPU" not in self.device_name else {}
        return {**defaults, **self.ov_config, **self.part_config.get(part, {})}

    def _compile_all(self) -> None:
        # Compiling from a path lets OpenVINO use its compiled-model cache without reading the model first (the vision
        # encoder is read and reshaped, so its cache key is the reshaped graph); only compiled models stay in memory.
        self.ov_vision_encoder = self._compile(self._one_image_vision_model(), "vision_encoder")
        self.ov_text_encoder = self._compile(self.model_dir / "encoder.xml", "encoder")
        self.ov_decoder = self._compile(self.model_dir / "decoder.xml", "decoder")
        decoder_model = self.core.read_model(self.model_dir / "decoder.xml")  # compiled above: readable
        self.ov_token_embeddings = self._compile(self._token_embedding_model(decoder_model), "token_embeddings")
        del decoder_model
        self.decoder_request = self.ov_decoder.create_infer_request()

    def _one_image_vision_model(self) -> ov.Model:
        """The vision encoder with its batch fixed at one image (the IR's batch is dynamic; height and width are
        fixed already). Static shapes let the CPU plugin pick its specialised kernels: measured on the base model,
        one thread, a w8a8 vision call took 1.04 s static against 1.71 s dynamic (INT8 weights: 1.66 against 1.70 s),
        and a batch of images runs one image per call anyway (:meth:`image_features`)."""
        model = self.core.read_model(self.model_dir / "vision_encoder.xml")
        pixels = model.inputs[0]
        shape = pixels.get_partial_shape()
        model.reshape({pixels.get_any_name(): ov.PartialShape([1, *shape[1:]])})
        return model

    def _token_embedding_model(self, decoder_model: ov.Model) -> ov.Model:
        """The token-embedding table is stored once, in the decoder (tied to its output projection). Build the
        small ``input_ids -> inputs_embeds`` model from that same weight subgraph."""
        from openvino import opset13 as ops

        text = self.config.text_config
        table = None
        for op in decoder_model.get_ordered_ops():
            if op.get_type_name() != "Gather":
                continue
            shape = op.input_value(0).get_partial_shape()
            if shape.is_static and [d.get_length() for d in shape] == [text.vocab_size, text.d_model]:
                table = op.input_value(0)
                break
        if table is None:
            raise IncompleteConversionError(
                f"No token-embedding table found in {self.model_dir / 'decoder.xml'}: the folder was not written by "
                f"this collection's converter. {reconvert_hint(self.model_dir, self.manifest)}"
            )
        input_ids = ops.parameter(ov.PartialShape([-1, -1]), ov.Type.i64, name="input_ids")
        embeddings = ops.gather(table, input_ids, ops.constant(np.int64(0), name="token_embeddings/axis"),
                                name="token_embeddings/gather")  # fmt: skip
        scale = math.sqrt(text.d_model) if getattr(text, "scale_embedding", False) else 1.0
        if scale != 1.0:
            factor = ops.constant(np.float32(scale), name="token_embeddings/scale_factor")
            embeddings = ops.multiply(embeddings, factor, name="token_embeddings/scale")
        result = ops.result(embeddings, name="token_embeddings/result")
        # Every node named: OpenVINO's compiled-model cache key hashes node names, and unnamed nodes get a
        # process-wide counter ("Gather_1234"), so each load used to add a new blob to compiled_cache.
        return ov.Model([result], [input_ids], "token_embeddings")

    # ---- the parts, one call each ----------------------------------------------------------------------------

    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        """Run the vision encoder + projector on the images not in the feature cache (one call each), cache them."""
        pixel_values = np.asarray(pixel_values, dtype=np.float32)
        keys = [ImageFeatureCache.key(image) for image in pixel_values]
        rows = [self.image_cache.get(key) for key in keys]
        missing = [i for i, row in enumerate(rows) if row is None]
        if missing:
            for i in missing:  # one image per call: the compiled vision encoder has a static batch of one
                features = self.ov_vision_encoder(np.ascontiguousarray(pixel_values[i : i + 1]))[0][0]
                rows[i] = features.copy()  # the output buffer belongs to OpenVINO (and is released below)
                self.image_cache.put(keys[i], rows[i])
            self._release_vision_memory()
        return np.stack(rows)

    def _release_vision_memory(self) -> None:
        """Free the vision encoder's intermediate buffers until its next call (devices that cannot: kept)."""
        if not self.release_vision_memory:
            return
        try:
            self.ov_vision_encoder.release_memory()
        except RuntimeError:  # not implemented by this device's plugin
            self.release_vision_memory = False

    def embed_tokens(self, input_ids: np.ndarray) -> np.ndarray:
        return self.ov_token_embeddings(np.asarray(input_ids, dtype=np.int64))[0]

    def encode(
        self, input_ids: np.ndarray, pixel_values: np.ndarray | None, attention_mask: np.ndarray | None
    ) -> np.ndarray:
        """Prompt and image -> encoder hidden states (what the decoder attends to)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        embeds = self.embed_tokens(input_ids).copy()
        if pixel_values is not None:
            image_mask = input_ids == self.config.image_token_id
            features = self.image_features(pixel_values)
            if image_mask.sum() != features.shape[0] * features.shape[1]:
                raise ValueError(
                    f"The prompt has {int(image_mask.sum())} <image> tokens but the images give "
                    f"{features.shape[0] * features.shape[1]} features. Build inputs with this model's processor "
                    "(AutoProcessor.from_pretrained(model_dir))."
                )
            embeds[image_mask] = features.reshape(-1, features.shape[-1])
        if attention_mask is None:
            attention_mask = np.ones(input_ids.shape, dtype=np.int64)
        return self.ov_text_encoder([embeds, np.asarray(attention_mask, dtype=np.int64)])[0].copy()

    def decoder_step(
        self,
        decoder_input_ids: np.ndarray,
        encoder_hidden_states: np.ndarray,
        encoder_attention_mask: np.ndarray,
        beam_idx: np.ndarray,
        *,
        new_sequence: bool,
    ) -> np.ndarray:
        """One decoder step -> logits ``[rows, new tokens, vocab]``. The K/V cache stays in OpenVINO state: its rows
        are first reordered by ``beam_idx`` (beam search), and ``new_sequence`` empties it."""
        if new_sequence:
            self.decoder_request.reset_state()
        # share_inputs=False on purpose: with zero-copy inputs the CPU plugin (2026.4, default bf16) kept reading the
        # encoder states of an earlier generate() call, so identical calls gave different answers (see
        # tests/test_parity.py::test_repeated_calls_at_default_precision_give_the_same_answer). The copy is small.
        self.decoder_request.infer(
            {
                "input_ids": np.ascontiguousarray(decoder_input_ids, dtype=np.int64),
                "encoder_hidden_states": np.ascontiguousarray(encoder_hidden_states, dtype=np.float32),
                "encoder_attention_mask": np.ascontiguousarray(encoder_attention_mask, dtype=np.int64),
                "beam_idx": np.ascontiguousarray(beam_idx, dtype=np.int32),
            },
            share_inputs=False,
        )
        return self.decoder_request.get_tensor("logits").data.copy()

    # ---- generate ----------------------------------------------------------------------------------------------

    def generate(
        self,
        input_ids: Any = None,
        pixel_values: Any = None,
        attention_mask: Any = None,
        *,
        generation: GeneratorName | None = None,
        **generate_kwargs: Any,
    ) -> Any:
        """Generate answers: pass the processor's outputs (numpy or torch) and any generation arguments
        (``max_new_tokens``, ``num_beams``, ``no_repeat_ngram_size``, ``early_stopping`` …); defaults come from the
        model's saved generation config. Returns token ids for ``processor.batch_decode``: a torch tensor when
        ``input_ids`` is one, else a numpy int64 array (see the class docstring)."""
        if input_ids is None:
            raise ValueError("generate() needs input_ids: pass the processor's output, e.g. model.generate(**inputs).")
        self._check_lengths(generate_kwargs)
        strategy = choose_strategy(self.generation if generation is None else generation, self, generate_kwargs)
        with self._lock:
            return strategy.generate(self, input_ids, pixel_values, attention_mask, **generate_kwargs)

    def _check_lengths(self, generate_kwargs: dict[str, Any]) -> None:
        limit = getattr(self.config.text_config, "max_position_embeddings", None)
        for name, slack in (("max_new_tokens", 0), ("max_length", 1)):
            value = generate_kwargs.get(name)
            if isinstance(limit, int) and isinstance(value, int) and value > limit + slack:
                # PyTorch raises an IndexError there; OpenVINO's Gather would silently read zeros and go on.
                raise ValueError(
                    f"{name}={value} is more than this model's {limit} decoder positions. Use {name} <= "
                    f"{limit + slack}."
                )
