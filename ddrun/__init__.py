"""ddrun: a config-driven command-line runner for dataset distillation."""

__version__ = "0.1.0"
