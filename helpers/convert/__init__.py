"""Build time (needs torch): a transformers Florence-2 checkpoint → OpenVINO IR in the layout of :mod:`helpers.ir`.

* :mod:`helpers.convert.conversion` — ``convert_florence2``: source checks, tracing, stateful decoder, compression (02_convert)
* :mod:`helpers.convert.original_layout` — original-layout fine-tunes (``microsoft/Florence-2-*``) read as data (README)

May import :mod:`helpers.ir` only (see docs/CONTRIBUTING.md).
"""
