"""Plain supervised training: cross-entropy on the standard crop+flip augmentation."""

from engine.methods.base import Method


class Supervised(Method):
    """The base Method already is supervised classification; named here for the registry."""
