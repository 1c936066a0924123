"""cascade-runner: the application around `cascade_core` (recipes, data, training, export, CLI)."""

__version__ = "0.1.0"
