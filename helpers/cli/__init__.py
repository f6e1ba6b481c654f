"""The command line: ``python -m helpers IMAGE`` (:mod:`helpers.cli.main`), folders (:mod:`helpers.cli.batch`, Ray).

May import :mod:`helpers.course` and every layer below it; never :mod:`helpers.ui`.
"""
