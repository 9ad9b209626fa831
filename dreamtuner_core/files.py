"""Writing files so that a name only ever holds a complete file.

Every file the pack writes (encoder, LoRA, embedding, pretraining checkpoint,
loss log and plot, prepared pictures, evaluation tables) goes through
:func:`replacing`: the content is written to a temporary file of its own in the
same folder (``.NAME.<random>.partial``, made by :func:`tempfile.mkstemp`, so two
writers of one name never share it), flushed to disk (``fsync``) and renamed over
``NAME`` (atomic on one file system) only when complete; the folder is then
synced so the rename itself survives a power cut. A failure or Ctrl-C / SIGTERM
while writing removes the temporary file; only a hard kill (SIGKILL, power loss)
can leave one, and readers ignore that name (it ends in ``.partial``).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

import safetensors.torch

from .errors import DreamTunerInputError


def _default_mode():
    """The mode a plain ``open(path, "w")`` would give (0o666 less the umask), read without changing it."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    return 0o644


_MODE = _default_mode()


def _fsync_folder(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; its rename is durable enough
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path):
    """Yield a unique temporary path to write; on success it is synced and replaces ``path``, on any exception it is removed.

    The temporary name keeps no extension of its own (it ends in ``.partial``), so writers that guess the
    format from the name (PIL, matplotlib) must be told the format. The file exists (empty) when yielded.
    """
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=folder)
    os.close(fd)
    try:
        yield partial
        with open(partial, "rb+") as handle:
            os.fsync(handle.fileno())
        try:
            os.chmod(partial, os.stat(path).st_mode & 0o7777 if os.path.exists(path) else _MODE)
        except OSError:
            pass
        os.replace(partial, path)
        _fsync_folder(folder)
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


def safetensors_model_folder(folder, label):
    """A local Hugging Face model folder whose weights are safetensors (``model.safetensors`` or its sharded
    index), for ``from_pretrained(..., use_safetensors=True, local_files_only=True)``; else an error naming
    the pickled file found instead (``pytorch_model.bin`` and the like are never loaded: pickle runs code)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise DreamTunerInputError(f"{label} '{folder}' is not a folder (give a local Hugging Face model folder).")
    names = set(os.listdir(folder))
    if "config.json" not in names:
        raise DreamTunerInputError(f"{label} '{folder}' must hold config.json and model.safetensors (a Hugging Face "
                                   "model folder, as save_pretrained or the Hub writes it).")
    if {"model.safetensors", "model.safetensors.index.json"} & names:
        return folder
    pickled = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt")) or n.endswith(".bin.index.json"))
    found = f"; it holds {', '.join(pickled)}, pickled weights, which are never loaded (pickle can run code)" \
        if pickled else ""
    raise DreamTunerInputError(
        f"{label} '{folder}' has no model.safetensors{found}. Download the model's safetensors files (most Hub "
        "models have them), or convert it once: from_pretrained(folder).save_pretrained(folder, "
        "safe_serialization=True) in a Python you trust.")
