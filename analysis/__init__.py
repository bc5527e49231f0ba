"""Analyses of steering-vector checkpoints: ``python -m analysis <command> --help``."""
