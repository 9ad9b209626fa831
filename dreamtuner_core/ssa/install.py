"""Install self-subject-attention on a clone of a ComfyUI ModelPatcher.

The input model is never changed. On the clone:
- ``transformer_options[STATE_KEY]`` holds the references; a second node adds
  its references to those already there;
- each selected self-attention layer gets the ``attn1`` replacement (an
  ``attn1_patch`` of another pack keeps running before it, on the host's own
  hook list); a foreign ``attn1`` replacement on the same layer cannot be
  combined with Eq. 3 and is reported by name;
- the ``model_function_wrapper`` that adds reference rows wraps any wrapper
  already there.
"""

from __future__ import annotations

import torch

from .. import host
from ..errors import DreamTunerInputError
from ..keys import STATE_KEY
from ..references import (MASK_SUBJECT_IS_ONE, Reference, check_reference_latent, prepare_masks, reference_noise,
                          sigma_range)
from . import joint
from .cache import SelfSubjectAttentionState, end_of_run
from .coexistence import check_replacements, observes_attention, replacement_conflict
from .reference_rows import ReferenceBatchWrapper
from .replace import SelfSubjectAttentionReplace


def parse_blocks(spec: str, available):
    """Select self-attention layers by a comma list of names.

    ``all`` (or empty), a block kind (``input``, ``middle``, ``output``), a block
    (``output.4``) or one layer of a deep block (``output.4.1``).
    Returns a frozenset of layer keys, or None for all layers.
    """
    spec = (spec or "").strip().lower()
    if spec in ("", "all"):
        return None
    chosen = set()
    for raw in spec.replace(";", ",").split(","):
        name = raw.strip()
        if not name:
            continue
        parts = name.split(".")
        matched = {key for key in available if _matches(parts, key)}
        if not matched:
            kinds = sorted({key[0] for key in available})
            blocks = sorted({f"{key[0]}.{key[1]}" for key in available}, key=_block_order)
            raise DreamTunerInputError(
                f"blocks: {name!r} names no self-attention layer of this model. Use 'all', a kind "
                f"({', '.join(kinds)}), or blocks such as {', '.join(blocks)} (add .N for one layer "
                "of a deep block), separated by commas."
            )
        chosen |= matched
    return frozenset(chosen)


def _matches(parts, key):
    if parts[0] != key[0]:
        return False
    try:
        numbers = [int(p) for p in parts[1:]]
    except ValueError:
        return False
    return list(key[1:1 + len(numbers)]) == numbers


def _block_order(name):
    kind, number = name.split(".")
    return ({"input": 0, "middle": 1, "output": 2}.get(kind, 3), int(number))


def add_self_subject_attention(model, references, layers, positions="offset"):
    """A clone of ``model`` whose selected self-attention layers also read ``references``.

    layers: frozenset of layer keys, or None for every self-attention layer (for Flux and SD3: the
    host's dit block keys, :mod:`.joint`). positions: the joint-attention models' reference positions.
    """
    family = joint.family(model)
    available = joint.joint_layers(model) if family else host.self_attention_layers(model)
    targets = sorted(available if layers is None else layers)
    clone = model.clone()
    options = clone.model_options.setdefault("transformer_options", {})
    previous = options.get(STATE_KEY)
    state = previous.with_references(references, targets) if previous is not None \
        else SelfSubjectAttentionState(references, targets)
    options[STATE_KEY] = state

    if family:
        joint.install(clone, state, targets, positions, joint.rope_of(model))
        return _finish(clone, state)
    replace = SelfSubjectAttentionReplace()
    existing = options.get("patches_replace", {}).get("attn1", {})
    for key in targets:
        current = existing.get(key) or existing.get(key[:2])
        if isinstance(current, SelfSubjectAttentionReplace):
            continue
        if current is not None and not observes_attention(current):
            raise DreamTunerInputError(replacement_conflict(current, key))
        # a replacement that only observes (SAG) keeps recording, from the generated rows
        clone.set_model_attn1_replace(replace if current is None else SelfSubjectAttentionReplace(observer=current),
                                      key[0], key[1], key[2])

    wrapper = clone.model_options.get("model_function_wrapper")
    if not isinstance(wrapper, ReferenceBatchWrapper):
        clone.set_model_unet_function_wrapper(ReferenceBatchWrapper(previous=wrapper))
    return _finish(clone, state)


def _finish(clone, state):
    """The post-CFG hook, the end-of-run callback and the memory estimate, for every family."""
    if end_of_evaluation not in clone.model_options.get("sampler_post_cfg_function", []):
        clone.set_model_sampler_post_cfg_function(end_of_evaluation)
    host.on_cleanup(clone, STATE_KEY, end_of_run)
    memory = clone.get_model_object("memory_required")
    clone.add_object_patch("memory_required", ReferenceRowsMemory(memory, len(state.references)))
    return clone


def end_of_evaluation(args):
    """Post-CFG hook: the evaluation is complete, its reference features are no longer needed.

    A node placed after Self-Subject-Attention that replaced its attention on some layers, or its
    model wrapper without chaining it, would switch self-subject-attention off silently: it is
    named here, after the first evaluation.
    """
    options = (args.get("model_options") or {}).get("transformer_options", {})
    state = options.get(STATE_KEY)
    if state is not None:
        state.cache.end_evaluation()
        check_replacements(state, options)
        if state.cache.bypassed:
            state.cache.bypassed = False
            wrapper = args["model_options"].get("model_function_wrapper")
            raise DreamTunerInputError(
                f"Self-Subject-Attention did not run: the model wrapper {host.describe(wrapper)}, set by a node "
                "after Self-Subject-Attention, replaced the pack's wrapper without calling it. Put "
                "Self-Subject-Attention after that node (it chains the wrapper it finds), or remove that node.")
    return args["denoised"]


class ReferenceRowsMemory:
    """The model's ``memory_required`` counting the reference rows a call may carry, so the host's
    batching (and ``--lowvram``) plans for them; installed as an object patch on the clone."""

    def __init__(self, previous, rows):
        while isinstance(previous, ReferenceRowsMemory):
            previous = previous.previous
        self.previous, self.rows = previous, rows

    def __call__(self, input_shape, *args, **kwargs):
        shape = [int(input_shape[0]) + self.rows] + list(input_shape[1:])
        return self.previous(shape, *args, **kwargs)


def check_reference_context(context, width):
    """reference_conditioning must be text of the model's family: [batch, tokens, the UNet's context width]."""
    if not isinstance(context, torch.Tensor) or context.ndim != 3:
        shape = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
        raise DreamTunerInputError(
            f"reference_conditioning must be a text CONDITIONING [batch, tokens, width]; got {shape}. "
            "Connect a CLIP Text Encode of this model's CLIP.")
    if width is not None and context.shape[-1] != width:
        raise DreamTunerInputError(
            f"reference_conditioning has width {context.shape[-1]} but this model's cross-attention takes "
            f"{width}: it was encoded by the CLIP of another model family (e.g. SD1.5's 768 on SDXL's 2048). "
            "Encode the reference caption with this model's CLIP (the CLIP output of the same checkpoint loader).")


def apply_self_subject_attention(model, reference_latent, omega_ref=3.0, reference_mask=None,
                                 mask_mode=MASK_SUBJECT_IS_ONE, reference_context=None,
                                 start_percent=0.0, end_percent=1.0, blocks="all", seed=0, positions="offset"):
    """Everything the SelfSubjectAttentionPatch node does: validate, build references, patch a clone.

    reference_latent: [R, C, H, W] raw VAE latents (``LATENT["samples"]``), R references.
    reference_context: [1, L, D] text conditioning for the reference pass, or None.
    positions: where a joint-attention model (Flux) places the reference's rotary positions,
        ``offset`` or ``shared`` (:mod:`.joint`); UNets have no positions and ignore it.
    """
    joint.check_family(model)
    family = joint.family(model)
    if family:
        joint.check_host(model)
        if positions not in joint.POSITIONS:
            raise DreamTunerInputError(f"positions must be one of {joint.POSITIONS}, got {positions!r}.")
    available = joint.joint_layers(model) if family else host.self_attention_layers(model)
    samples = check_reference_latent(reference_latent, host.latent_channels(model))
    sigma_start, sigma_end = sigma_range(host.model_sampling(model), start_percent, end_percent)
    if not (omega_ref >= 0.0 and omega_ref == omega_ref):
        raise DreamTunerInputError(f"omega_ref must be 0 or more, got {omega_ref}.")
    layers = joint.parse_joint_blocks(blocks, available, model) if family else parse_blocks(blocks, available)
    masks = prepare_masks(reference_mask, samples.shape[0], mask_mode)
    if reference_context is not None:
        check_reference_context(reference_context,
                                joint.context_width(model) if family else host.context_width(model))
        reference_context = reference_context[:1].detach().float().cpu()
    references = [
        Reference(latent=samples[i].cpu(), noise=reference_noise(samples.shape[1:], seed + i), mask=masks[i],
                  omega_ref=float(omega_ref), sigma_start=sigma_start, sigma_end=sigma_end,
                  layers=layers, context=reference_context)
        for i in range(samples.shape[0])
    ]
    return add_self_subject_attention(model, references, layers, positions)
