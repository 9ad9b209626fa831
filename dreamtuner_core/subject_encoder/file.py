"""The subject encoder's file: safetensors only, metadata describing every tensor's role.

Metadata: ``format`` = "dreamtuner.subject_encoder", ``format_version``, and the
:class:`~.model.EncoderConfig` (base family, context width, CLIP
vision width and layer list, ResBlock count, the S-E-A layers with their heads).
Loading checks the metadata against the tensors; a file that is not an
encoder, a truncated file or mismatched tensors get an error naming the file.
"""

from __future__ import annotations

import os

import safetensors

from ..errors import DreamTunerInputError
from ..files import write_safetensors
from .model import EncoderConfig, SubjectEncoder

FORMAT = "dreamtuner.subject_encoder"
FORMAT_VERSION = 1


def save_encoder(encoder: SubjectEncoder, path, extra_metadata=None):
    """Write an encoder atomically (a half-written file never takes the name).

    ``extra_metadata``: more string entries (e.g. how it was trained); they cannot replace the format's own.
    """
    metadata = {**(extra_metadata or {}), "format": FORMAT, "format_version": str(FORMAT_VERSION),
                **encoder.config.to_metadata()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    write_safetensors(tensors, metadata, path)


def load_encoder(path) -> SubjectEncoder:
    name = os.path.basename(str(path))
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own types for truncated or foreign files
        raise DreamTunerInputError(
            f"subject encoder file '{name}' cannot be read as safetensors ({error}). It is truncated or not "
            "a safetensors file; write it again (scripts/make_untrained_encoder.py makes a valid one)."
        ) from None
    if metadata.get("format") != FORMAT:
        raise DreamTunerInputError(
            f"'{name}' is not a DreamTuner subject encoder (its metadata has no format '{FORMAT}'). "
            "Put only subject encoder files in models/dreamtuner/."
        )
    if int(metadata.get("format_version", 0)) > FORMAT_VERSION:
        raise DreamTunerInputError(
            f"'{name}' is a subject encoder of format version {metadata['format_version']}; this pack reads "
            f"version {FORMAT_VERSION} and older. Update comfyui-dreamtuner."
        )
    try:
        config = EncoderConfig.from_metadata(metadata)
    except (KeyError, ValueError, TypeError) as error:
        raise DreamTunerInputError(f"subject encoder '{name}' has incomplete metadata ({error}).") from None
    encoder = SubjectEncoder(config)
    expected = encoder.state_dict()
    wrong = sorted(k for k in expected if k not in tensors or tensors[k].shape != expected[k].shape)
    extra = sorted(set(tensors) - set(expected))
    if wrong or extra:
        raise DreamTunerInputError(
            f"subject encoder '{name}': its tensors do not match its metadata (missing or misshaped: "
            f"{wrong[:3]}, unexpected: {extra[:3]}). The file is damaged or was written by another tool."
        )
    encoder.load_state_dict(tensors)
    encoder.source = name
    return encoder.eval().requires_grad_(False)
