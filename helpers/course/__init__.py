"""What only the lessons need: the model catalogue and cache, model kinds, samples, tiny and teaching models, the kit.

May import every layer below the user interfaces (see docs/CONTRIBUTING.md).
"""
