"""Notebook and browser interfaces: ipywidgets selectors, the interactive demo, the Gradio app (01–03, 10).

May import :mod:`helpers.course` and every layer below it; never :mod:`helpers.cli`.
"""
