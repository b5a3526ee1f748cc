"""Runnable examples: ``python -m treessm.examples.<name> --help``."""
