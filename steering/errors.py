"""The project's input errors, in one place: the entry points (``python -m train``, ``python -m analysis``) print any of
them as one line and exit with code 2, and let every other exception through as a traceback (a bug stays visible).

Each class is defined by the module that raises it; this tuple only gathers them (subclasses are covered by their
base: ``CheckpointError`` and ``TokenScalingError`` by ``SteeringError``, ``VLLMError`` by ``GenerationError``). The
entry points add their own usage errors (``train.config.ConfigError``, ``analysis.cli.UsageError``).
``tests/test_exit_codes.py`` scans the source so that a new error class cannot be left out. Importing this module
imports torch (every module here does) but neither vLLM nor transformers.
"""

from __future__ import annotations

from steering.annotate import AnnotationError
from steering.diffmean import TraceError
from steering.generation import GenerationError
from steering.gguf_vectors import ControlVectorError
from steering.problems import DataError
from steering.sae import SAEError
from steering.templates import TemplateError
from steering.vectors import SteeringError

INPUT_ERRORS: tuple[type[Exception], ...] = (
    SteeringError, DataError, TemplateError, TraceError, GenerationError, AnnotationError, SAEError, ControlVectorError)
