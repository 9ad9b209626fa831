"""Writing files so that a name only ever holds a complete file.

Every file the pack writes (encoder, LoRA, embedding, pretraining checkpoint,
loss log and plot, prepared pictures, evaluation tables) goes through
:func:`replacing`: the content is written under ``NAME.partial`` in the same
folder and renamed over ``NAME`` (atomic on one file system) only when complete.
A failure or Ctrl-C / SIGTERM while writing removes the partial file; only a
hard kill (SIGKILL, power loss) can leave one, and readers ignore that name.
"""

from __future__ import annotations

import contextlib
import json
import os

import safetensors.torch


@contextlib.contextmanager
def replacing(path):
    """Yield the temporary path to write; on success it replaces ``path``, on any exception it is removed.

    The temporary name keeps no extension of its own, so writers that guess the
    format from the name (PIL, matplotlib) must be told the format.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    partial = f"{path}.partial"
    try:
        yield partial
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def write_safetensors(tensors, metadata, path):
    """A safetensors file written atomically, its header keys in sorted order, so equal content gives equal bytes.

    safetensors keeps metadata in a hash map and writes it in an order that changes between runs; the
    header (compact JSON, space-padded to 8 bytes) is re-serialised sorted. Tensor offsets are relative to
    the data section, which is written as the library made it (a view, not a copy: checkpoints are large).
    """
    raw = safetensors.torch.save(tensors, metadata=metadata)
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with replacing(path) as partial, open(partial, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little"))
        handle.write(text)
        handle.write(memoryview(raw)[8 + length:])
