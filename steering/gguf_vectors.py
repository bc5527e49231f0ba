"""llama.cpp control-vector GGUF files: the one place that writes and reads them, and maps their layer numbers.

A llama.cpp control vector is the same object as this project's steering vector: one direction per decoder layer,
added to that layer's output at every position. The file format (written by repeng's and EasySteer's
``export_gguf``, read by llama.cpp's ``--control-vector``) is a GGUF file with

- ``general.architecture = "controlvector"``,
- ``controlvector.model_hint``: the model family (repeng writes the HF ``model_type``, e.g. ``"llama"``),
- ``controlvector.layer_count``: the number of direction tensors in the file (repeng's meaning; llama.cpp ignores it),
- one 1-D F32 tensor ``direction.N`` of ``n_embd`` elements per steered layer.

**The layer numbering.** ``direction.N`` holds this project's layer ``N`` (0-based ``model.layers.N``), unchanged:

- llama.cpp (``common/common.cpp``, ``common_control_vector_load_one``) puts ``direction.N`` at offset
  ``n_embd * (N - 1)`` of its buffer ("layer 1 at [0]") and rejects a file holding ``direction.0`` outright;
  ``llama_adapter_cvec::apply`` (``src/llama-adapter.cpp``) copies offset ``n_embd * (il - 1)`` into the tensor of
  layer ``il``; every model graph then calls ``build_cvec(cur, il)`` -> ``llama_adapter_cvec::apply_to`` on the output
  of layer ``il`` (0-based, ``src/models/llama.cpp``: after the FFN residual add). So ``direction.N`` is added to the
  output of layer ``N``, and layer 0 cannot carry a vector at all.
- repeng keys its directions by the index into ``model.layers`` and adds ``direction.N`` to the output of
  ``model.layers[N]`` (``ControlModule`` wraps the block); its default layers are ``N-1 .. 1``, never 0.

So a checkpoint with a nonzero vector on layer 0 cannot be written exactly: :func:`write_control_vector` refuses it
unless told to drop that vector, and a zero (or unsteered) layer 0 is simply not written. Reading accepts
``direction.0`` (a repeng file may hold it; it is this project's layer 0).

Only public ``gguf`` APIs (``GGUFWriter``, ``GGUFReader``) are used; files are written atomically
(``steering.files``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from steering.files import write_file_atomic

ARCHITECTURE = "controlvector"
KEY_ARCHITECTURE = "general.architecture"
KEY_MODEL_HINT = f"{ARCHITECTURE}.model_hint"
KEY_LAYER_COUNT = f"{ARCHITECTURE}.layer_count"
# Ours, ignored by llama.cpp, repeng and EasySteer (EasySteer keeps extra controlvector.* keys as metadata): where the
# vectors came from and the scale already multiplied into them.
KEY_BASE_MODEL = f"{ARCHITECTURE}.base_model"
KEY_SCALE = f"{ARCHITECTURE}.scale"

_NAME_RE = re.compile(r"direction\.(\d+)")


class ControlVectorError(ValueError):
    """A control-vector file that cannot be written or read exactly: the message says why and what to do."""


def tensor_name(layer: int) -> str:
    """The GGUF tensor holding this project's layer ``layer`` (0-based): ``direction.{layer}`` (see the module doc)."""
    return f"direction.{int(layer)}"


@dataclass
class ControlVector:
    """What a control-vector file holds: ``{layer: (n_embd,) fp32}`` in this project's numbering, and its keys."""

    vectors: dict[int, torch.Tensor]
    model_hint: str | None
    layer_count: int | None
    base_model: str | None = None
    scale: float | None = None

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.vectors.values())).numel())


def exportable(vectors: Mapping[int, torch.Tensor], *, drop_layer_0: bool = False) -> dict[int, torch.Tensor]:
    """The vectors a llama.cpp file can hold: all but layer 0. A zero layer-0 vector is left out (it adds nothing); a
    nonzero one is an error unless ``drop_layer_0`` (then it is left out, and the file no longer reproduces the
    checkpoint)."""
    out = {int(k): v for k, v in vectors.items()}
    if 0 in out:
        v0 = out.pop(0)
        if bool(torch.any(v0 != 0)) and not drop_layer_0:
            raise ControlVectorError(
                f"layer 0 has a nonzero vector (norm {float(v0.float().norm()):.4g}), and llama.cpp control vectors "
                "cannot steer layer 0 (its loader rejects direction.0); drop it explicitly (--drop-layer-0) or "
                "export to another format")
    if not out:
        raise ControlVectorError("no vectors left to write: the checkpoint steers only layer 0, which llama.cpp "
                                 "control vectors cannot express")
    return out


def write_control_vector(path: str | os.PathLike, vectors: Mapping[int, torch.Tensor], *, model_hint: str,
                         scale: float = 1.0, drop_layer_0: bool = False, base_model: str | None = None) -> Path:
    """Write ``vectors`` (``{layer: (hidden,)}``, this project's numbering) times ``scale`` as a llama.cpp control
    vector file, atomically. Layer 0: see :func:`exportable`. Returns the path."""
    import gguf
    import numpy as np

    if not math.isfinite(scale):
        raise ControlVectorError(f"scale {scale} is not a finite number")
    vectors = exportable(vectors, drop_layer_0=drop_layer_0)
    arrays: dict[int, np.ndarray] = {}
    sizes = set()
    for layer, v in sorted(vectors.items()):
        # fp32 throughout: llama.cpp reads F32 only, and scale 1 must reproduce the checkpoint bit for bit.
        a = (v.detach().float().reshape(-1).cpu() * float(scale)).numpy().astype(np.float32)
        if not np.isfinite(a).all():
            raise ControlVectorError(f"the vector of layer {layer} times scale {scale} holds NaN or Inf")
        arrays[layer] = a
        sizes.add(a.size)
    if len(sizes) != 1:
        raise ControlVectorError(f"the vectors have different sizes {sorted(sizes)}; one hidden size is needed")

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), ARCHITECTURE)
        writer.add_string(KEY_MODEL_HINT, str(model_hint))
        writer.add_uint32(KEY_LAYER_COUNT, len(arrays))
        if base_model:
            writer.add_string(KEY_BASE_MODEL, str(base_model))
        writer.add_float32(KEY_SCALE, float(scale))
        for layer, a in arrays.items():
            writer.add_tensor(tensor_name(layer), a)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return write_file_atomic(path, write)


def _field_value(reader, key: str):
    """A scalar or string metadata value of a GGUF file, or None when the key is absent."""
    import gguf

    field = reader.get_field(key)
    if field is None or not len(field.data):
        return None
    part = field.parts[field.data[0]]
    if field.types and field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    return part[0].item() if len(part) else None


def read_control_vector(path: str | os.PathLike) -> ControlVector:
    """Read a control-vector GGUF file (ours, llama.cpp's, repeng's, EasySteer's) with the checks llama.cpp's loader
    makes: every tensor is ``direction.N``, 1-D, F32, all of one size; plus finite values and the architecture."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ControlVectorError(f"no control-vector file at {str(path)!r}")
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise ControlVectorError(f"{str(path)!r} is not a readable GGUF file: {e}") from None
    arch = _field_value(reader, KEY_ARCHITECTURE)
    if arch != ARCHITECTURE:
        raise ControlVectorError(f"{str(path)!r} is a GGUF file of architecture {arch!r}, not a control vector "
                                 f"({KEY_ARCHITECTURE} = {ARCHITECTURE!r})")
    vectors: dict[int, torch.Tensor] = {}
    for t in reader.tensors:
        m = _NAME_RE.fullmatch(t.name)
        if m is None:
            raise ControlVectorError(f"{str(path)!r} holds a tensor {t.name!r}; a control vector holds only "
                                     "direction.N tensors")
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise ControlVectorError(f"{t.name} in {str(path)!r} is {t.tensor_type.name}; control vectors are F32 "
                                     "(llama.cpp reads nothing else)")
        if len(t.shape) != 1:
            raise ControlVectorError(f"{t.name} in {str(path)!r} has shape {[int(s) for s in t.shape]}; a direction "
                                     "is 1-D (n_embd)")
        # Copy out of the reader's memory map, so the file can be replaced or removed afterwards.
        value = torch.from_numpy(t.data.astype("float32", copy=True)).reshape(-1)
        if not torch.isfinite(value).all():
            raise ControlVectorError(f"{t.name} in {str(path)!r} holds NaN or Inf")
        vectors[int(m.group(1))] = value
    if not vectors:
        raise ControlVectorError(f"{str(path)!r} holds no direction tensors")
    sizes = sorted({int(v.numel()) for v in vectors.values()})
    if len(sizes) != 1:
        raise ControlVectorError(f"{str(path)!r}: the direction tensors have different sizes {sizes}")
    count = _field_value(reader, KEY_LAYER_COUNT)
    scale = _field_value(reader, KEY_SCALE)
    return ControlVector(vectors=dict(sorted(vectors.items())), model_hint=_field_value(reader, KEY_MODEL_HINT),
                         layer_count=int(count) if count is not None else None,
                         base_model=_field_value(reader, KEY_BASE_MODEL),
                         scale=float(scale) if scale is not None else None)


def is_control_vector_path(path: str | os.PathLike) -> bool:
    """Whether a path names a GGUF file (by its suffix: GGUF files carry no other marker before they are opened)."""
    return Path(path).suffix.lower() == ".gguf"
