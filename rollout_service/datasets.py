"""Dataset loaders moved to ``eapo.data`` (core: the learner reads the training set too)."""

from eapo.data import PRESETS, Layout, load_problems

__all__ = ["PRESETS", "Layout", "load_problems"]
