"""Dataset loaders moved to ``eapo.core.data`` (core: the learner reads the training set too)."""

from eapo.core.data import PRESETS, Layout, load_problems

__all__ = ["PRESETS", "Layout", "load_problems"]
