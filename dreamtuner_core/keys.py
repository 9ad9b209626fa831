"""Every ``transformer_options`` key and marker of the pack, in one place.

The pack's parts talk to each other through the host's ``transformer_options``
(and its patch lists); these are the names they use. A module that reads one
imports it from here.

- :data:`STATE_KEY`: the model's self-subject-attention state (references, run cache), set by
  :mod:`.ssa.install`.
- :data:`CALL_KEY`: what one model call holds (generated rows, reference rows), set by
  :mod:`.ssa.reference_rows` for the attention replacement.
- :data:`PLAN_KEY`: a guider's reference noise level per conditioning (:mod:`.guidance`).
- :data:`ENCODER_OFF_KEY`: the conditionings a guider evaluates without the subject encoder.
- :data:`ENCODER_PATCH_SLOT`: the host's patch list that holds the subject encoder's Eq. 1.
- :class:`PackPatch`: the marker of this pack's own patch objects (:func:`is_own_patch`).
- :func:`layer_key`: the self-attention layer a host call is in (the host's own ``block`` keys).
"""

from __future__ import annotations

STATE_KEY = "dreamtuner_ssa"
CALL_KEY = "dreamtuner_ssa_call"
PLAN_KEY = "dreamtuner_reference_plan"
# Conditionings whose self-subject-attention is off and whose subject encoder should be off too
# (the subject encoder patch reads this set; "none" in Eq. 4 keeps the encoder by default).
ENCODER_OFF_KEY = "dreamtuner_subject_encoder_off"
ENCODER_PATCH_SLOT = "middle_patch"
OWN_PATCH_MARKER = "dreamtuner_patch"


class PackPatch:
    """Base of this pack's patch objects (the attention replacement, the subject encoder's Eq. 1): the
    reference pass keeps them, and tells them from other packs' patches by this marker."""

    dreamtuner_patch = True


def is_own_patch(patch) -> bool:
    """Patches of this pack (the attention replacement, the subject encoder), which the reference pass keeps."""
    return getattr(patch, OWN_PATCH_MARKER, False)


def layer_key(extra_options):
    """(block kind, block number, depth index) of the host call's layer, or None outside a block."""
    block = extra_options.get("block")
    return (block[0], block[1], extra_options.get("block_index", 0)) if block is not None else None
