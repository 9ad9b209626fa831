"""The run's files: the hash that names a run, the LoRA/embedding/encoder paths, reuse, and loading them back.

Same inputs and seed give byte-identical files; a re-queue with the same inputs
finds the files by the hash in their metadata and loads them instead of
training again. The returned MODEL/CLIP are what the core LoraLoader gives from
the written file (``comfy.sd.load_lora_for_models``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict

import safetensors
import torch

from ..errors import DreamTunerInputError
from ..keys import ENCODER_PATCH_SLOT, STATE_KEY
from ..subject_encoder.file import load_encoder
from ..subject_encoder.patch import SubjectEncoderPatch, with_encoder_patch
from .settings import FinetuneResult, OutputFolders


def _tensor_digest(h, tensor):
    t = tensor.detach().float().cpu().contiguous()
    h.update(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())


def _model_fingerprint(h, state_dict):
    """Names, shapes, dtypes and a strided sample of every tensor (hashing 2 GB each queue would be slow)."""
    for key in sorted(state_dict):
        t = state_dict[key]
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 64)
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(flat[::step][:64].float().cpu().contiguous().numpy().tobytes())


def unpatched_state_dict(patcher):
    """The UNet's weights as loaded, without the LoRA of whichever clone the host has loaded last.

    The host patches weights in place in the model that all clones of a checkpoint share and keeps the
    originals in the patchers' shared ``backup``; a later graph's LoraLoader would otherwise change the
    fingerprint of the same checkpoint.
    """
    state = patcher.model.state_dict()
    for key, saved in (getattr(patcher, "backup", None) or {}).items():
        if key in state:
            state[key] = getattr(saved, "weight", saved)  # current ComfyUI keeps (weight, inplace_update)
    return state


def _clip_fingerprint(h, clip, class_word, uses_pooled):
    """The text encoder as training sees it: its conditioning of the regular images' prompt.

    Not its weights: a checkpoint without some of them (SD1.5 files have no CLIP-L ``text_projection``)
    leaves those uninitialised at every load, so they would change the fingerprint of the same file. The
    pooled output (which reads that projection) counts only for models that use it (SDXL's ADM input).
    """
    cond, pooled = clip.encode_from_tokens(clip.tokenize(f"a {class_word}"), return_pooled=True)
    _tensor_digest(h, cond)
    if uses_pooled and pooled is not None:
        _tensor_digest(h, pooled)


def _patches_fingerprint(h, patches):
    """Keys, strengths and sampled tensors of a ModelPatcher's weight patches (a LoRA stack under the model)."""

    def walk(value):
        if isinstance(value, torch.Tensor):
            flat = value.detach().reshape(-1)
            h.update(f"{tuple(value.shape)}".encode())
            h.update(flat[::max(1, flat.numel() // 16)][:16].float().cpu().contiguous().numpy().tobytes())
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        elif hasattr(value, "weights"):  # current ComfyUI's weight adapters
            walk(value.weights)
        else:
            h.update(repr(value).encode() if isinstance(value, (int, float, str, type(None))) else
                     type(value).__name__.encode())

    for key in sorted(patches, key=str):
        h.update(str(key).encode())
        walk(patches[key])


def _options_fingerprint(h, model):
    """The kinds of model patches (e.g. a subject encoder, another pack's attention patch) on the model."""
    options = getattr(model, "model_options", {}) or {}
    patches = options.get("transformer_options", {}).get("patches", {})
    h.update(json.dumps({k: [type(p).__name__ for p in v] for k, v in sorted(patches.items())}).encode())
    for patch in patches.get(ENCODER_PATCH_SLOT, []):
        tokens = getattr(patch, "tokens", None)
        if isinstance(tokens, torch.Tensor):
            _tensor_digest(h, tokens)
            h.update(repr(getattr(patch, "beta", None)).encode())
    _ssa_fingerprint(h, options.get("transformer_options", {}).get(STATE_KEY))


def _ssa_fingerprint(h, state):
    """Self-subject-attention's references, which training attends (Eq. 3 in the loss): latent, noise, mask,
    omega_ref, active range, layers, caption."""
    for reference in getattr(state, "references", ()):
        h.update(f"ssa:{reference.omega_ref}:{reference.sigma_start}:{reference.sigma_end}:"
                 f"{sorted(reference.layers) if reference.layers is not None else None}".encode())
        for tensor in (reference.latent, reference.noise, reference.mask, reference.context):
            if tensor is not None:
                _tensor_digest(h, tensor)


def _vae_fingerprint(h, vae):
    """The VAE that makes the training latents: its weights (sampled, as the UNet's) and its latent layout."""
    module = getattr(vae, "first_stage_model", None)
    h.update(f"vae:{type(module).__name__}:{getattr(vae, 'latent_channels', None)}:"
             f"{getattr(vae, 'downscale_ratio', None)}".encode())
    if isinstance(module, torch.nn.Module):
        _model_fingerprint(h, module.state_dict())


def run_hash(settings, reference, mask, mask_mode, regular, model, clip, vae=None) -> str:
    """What names a run: settings, pictures, mask, and fingerprints of the UNet (and LoRAs and patches under it),
    the text encoder and the VAE (``None`` only where no VAE is known: then the hash says so)."""
    h = hashlib.sha256()
    h.update(json.dumps(asdict(settings), sort_keys=True).encode())
    h.update(mask_mode.encode())
    for t in (reference, regular):
        _tensor_digest(h, t)
    if mask is not None:
        _tensor_digest(h, mask)
    _model_fingerprint(h, unpatched_state_dict(model))
    _patches_fingerprint(h, getattr(model, "patches", {}))
    _options_fingerprint(h, model)
    _clip_fingerprint(h, clip, settings.class_word, uses_pooled=bool(getattr(model.model, "adm_channels", 0)))
    _patches_fingerprint(h, getattr(clip.patcher, "patches", {}))
    h.update(repr(getattr(clip, "layer_idx", None)).encode())
    if vae is not None:
        _vae_fingerprint(h, vae)
    return h.hexdigest()


def run_paths(folders: OutputFolders, name: str, with_encoder: bool):
    paths = {"lora": os.path.join(folders.loras, f"{name}.safetensors"),
             "embedding": os.path.join(folders.embeddings, f"{name}.safetensors")}
    if with_encoder:
        if not folders.encoders:
            raise DreamTunerInputError("model carries a subject encoder but no folder for encoder files was given.")
        paths["encoder"] = os.path.join(folders.encoders, f"{name}.safetensors")
    return paths


def _metadata_of(path):
    try:
        with safetensors.safe_open(path, framework="pt") as handle:
            return handle.metadata() or {}
    except Exception:
        return {}


def existing_run(paths, digest, overwrite, embeddings_folder, name):
    """True when every file exists and records this run; raises when a foreign file is in the way.

    ``overwrite`` replaces only files an earlier fine-tune wrote (their metadata holds a
    ``dreamtuner.finetune_hash``); a user's own LoRA, embedding or encoder of that name is always refused.
    """
    for ext in (".pt", ".bin"):
        other = os.path.join(embeddings_folder, name + ext)
        if os.path.exists(other):
            raise DreamTunerInputError(
                f"subject_name {name!r} collides with the existing embedding {other}; choose another subject_name "
                "(embedding:<name> would be ambiguous).")
    found = {kind: path for kind, path in paths.items() if os.path.exists(path)}
    hashes = {kind: _metadata_of(path).get("dreamtuner.finetune_hash") for kind, path in found.items()}
    ours = {kind: value == digest for kind, value in hashes.items()}
    if found and len(found) == len(paths) and all(ours.values()):
        return True
    for kind, path in found.items():  # overwrite or not: a file the fine-tune did not write is never replaced
        if hashes[kind] is None:
            what = "embedding" if kind == "embedding" else f"{kind} file"
            raise DreamTunerInputError(
                f"subject_name {name!r}: the {what} {path} exists and was not written by DreamTunerFinetune (its "
                "safetensors metadata has no dreamtuner.finetune_hash), so it is never replaced, even with "
                "overwrite on. Choose another subject_name, or move that file away if it may go.")
    if not overwrite:
        for kind, path in found.items():
            if ours[kind]:
                continue  # this run's own file (another of its files is missing): made again
            what = "embedding" if kind == "embedding" else f"{kind} file"
            raise DreamTunerInputError(
                f"subject_name {name!r}: the {what} {path} already exists and was not made by this run (other inputs "
                "or settings). Choose another subject_name, or set overwrite to true to replace it.")
    return False


def load_lora_file(path):
    import comfy.utils

    return comfy.utils.load_torch_file(path, safe_load=True)


def apply_lora(model, clip, lora_sd):
    """What the core LoraLoader node does with the file (strength 1, 1)."""
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, clip, lora_sd, 1.0, 1.0)


def from_files(model, clip, paths, encoder_patch, reused):
    """MODEL/CLIP from the written files, exactly as the core loaders give them."""
    lora_sd = load_lora_file(paths["lora"])
    out_model, out_clip = apply_lora(model, clip, lora_sd)
    metadata = _metadata_of(paths["lora"])
    if encoder_patch is not None and "encoder" in paths:
        out_model = swap_encoder(out_model, encoder_patch, load_encoder(paths["encoder"]))
    losses = json.loads(metadata.get("dreamtuner.losses", "[]"))
    ref_losses = json.loads(metadata.get("dreamtuner.reference_losses", "[]"))
    return FinetuneResult(out_model, out_clip, losses, dict(paths), reused, ref_losses)


def swap_encoder(model, old_patch, encoder):
    """A clone whose subject encoder patch uses the trained ``encoder`` (same beta and sigma range)."""
    patch = SubjectEncoderPatch.from_features(encoder, old_patch.features, old_patch.beta, old_patch.sigma_start,
                                              old_patch.sigma_end)
    return with_encoder_patch(model, old_patch, patch)
