"""Living with other packs: which patches are this pack's, when the reference may ride along, what is refused.

Another pack's patch or wrapper may prepare its inputs for the batch it was
given, so the reference then gets a clean call of its own; modules another pack
injected between the UNet's layers (AnimateDiff-Evolved's motion modules, which
read every batch row as a video frame) are skipped in that call; an attention
replacement on a patched layer cannot be combined with Eq. 3 and is named.
"""

from __future__ import annotations

from .. import host
from ..errors import DreamTunerInputError
from ..keys import is_own_patch


def foreign_patches(options):
    """Other packs' (and other core nodes') runtime patches in a call's ``transformer_options``.

    Returns a list of (kind, patch): attention/block ``patches``, ``patches_replace`` entries and
    current ComfyUI's ``wrappers`` around the model call. LoRA and checkpoint weights are not patches
    here: they are the model's weights, which the reference pass shares.
    """
    found = []
    for kind, patches in (options.get("patches") or {}).items():
        found += [(kind, p) for p in patches if not is_own_patch(p)]
    for kind, patches in (options.get("patches_replace") or {}).items():
        found += [(kind, p) for p in patches.values() if not is_own_patch(p)]
    for kind, wrappers in (options.get("wrappers") or {}).items():
        found += [(kind, w) for by_key in wrappers.values() for w in by_key]
    return found


def rides_along_safely(c) -> bool:
    """Whether reference rows may join this call's batch (the fast path).

    Only when nothing but this pack and the host's own ControlNets (which get zero residuals for the
    reference rows) acts on the call: another pack's patch or wrapper may prepare its inputs for the
    batch it was given, run passes of its own (Advanced-ControlNet's Reference ControlNet) or give
    the reference rows its own conditioning (IP-Adapter), so the reference gets a clean call of its
    own instead (:func:`reference_pass_options`).
    """
    return not foreign_patches(c.get("transformer_options") or {})


def reference_pass_options(options, skipped=()):
    """``transformer_options`` for a reference-only call: this pack's patches, none of other packs'.

    The reference pass is the UNet with the model's weights (checkpoint, LoRA, per-conditioning
    hooks) and the reference's text: other packs' runtime patches, wrappers and ControlNets shape
    the generated image, not the reference's features (README, "Composing with other packs").
    ``skipped``: classes of layers other packs injected into the UNet's blocks
    (:func:`injected_layer_classes`); the host's ``forward_timestep_embed`` hands them to
    :func:`past_injected_layer` in this call, so the reference rows never enter them.
    """
    clean = {k: v for k, v in options.items() if k not in ("patches", "patches_replace", "wrappers")}
    clean["patches"] = {kind: [p for p in patches if is_own_patch(p)]
                        for kind, patches in (options.get("patches") or {}).items()}
    clean["patches_replace"] = {kind: {key: p for key, p in patches.items() if is_own_patch(p)}
                                for kind, patches in (options.get("patches_replace") or {}).items()}
    if skipped:
        clean["patches"]["forward_timestep_embed_patch"] = [(kind, past_injected_layer) for kind in skipped]
    clean["cond_or_uncond"] = [0]
    return clean


def past_injected_layer(layer, x, *args, **kwargs):
    """A ``forward_timestep_embed_patch`` handler of the reference pass: the injected layer is not run and
    its input goes on unchanged, as in the UNet without that pack's modules."""
    return x


def replacement_conflict(other, layer) -> str:
    return (f"Self-Subject-Attention cannot be combined with the attention replacement {host.describe(other)} on "
            f"self-attention layer {'.'.join(map(str, layer))}: both replace the same attention (Eq. 3 needs the "
            "layer's own keys and values). Exclude that block in Self-Subject-Attention's 'blocks' input (for "
            "example 'input, output' when the other patch is on the middle block), or remove the other patch.")


def observes_attention(patch) -> bool:
    """An ``attn1`` replacement that only reads the layer's attention of the generated rows and gives back
    plain attention: the core Self-Attention Guidance node's ``attn_and_record`` (``comfy_extras.nodes_sag``,
    both cores), which keeps the middle block's attention map of the uncond rows for its blur. On a layer
    with Eq. 3 the pack computes the output and lets it record from the generated rows alone
    (:class:`~.replace.SelfSubjectAttentionReplace` ``observer``)."""
    function = getattr(patch, "observer", patch)
    return (getattr(function, "__module__", "") == "comfy_extras.nodes_sag"
            and getattr(function, "__qualname__", "").endswith(".attn_and_record"))


def check_replacements(state, options):
    """A node placed after Self-Subject-Attention may have replaced its attention on some layers.

    Checked against the sampler's model options (the post-CFG hook): another node's replacement for
    one pass of its own (Perturbed-Attention Guidance) only applies to that pass and is fine, and one that
    only observes the attention (:func:`observes_attention`, SAG) runs beside Eq. 3.
    """
    replace = options.get("patches_replace") or {}
    for layer in sorted(state.layers):
        # joint-attention blocks (Flux, SD3) are the host's "dit" block keys, UNet layers its "attn1" keys
        replaced = (replace.get("dit") if layer[0] in ("double_block", "single_block") else replace.get("attn1")) or {}
        current = replaced.get(layer) or replaced.get(layer[:2])
        if not is_own_patch(current) and not observes_attention(current):
            raise DreamTunerInputError(replacement_conflict(current, layer))


def injected_layer_classes(base):
    """Classes of the layers other packs injected into the UNet's blocks, which the reference pass skips.

    AnimateDiff-Evolved puts its motion modules between the UNet's layers (a ``PatcherInjection`` with
    the motion models as ``additional_models``, both under the key "ADE") and they read every row of a
    call as one video frame: their temporal attention mixes the rows. The reference is not a frame, so
    with such layers on the model it never rides in the frames' call (that call stays the pack's batch,
    unchanged) and its own call skips them (:func:`reference_pass_options`): every frame then reads the
    features of the reference as the UNet without the motion modules sees it. An injection whose modules
    are not plain layers of the UNet's blocks cannot be skipped that way and is refused.
    """
    classes = []
    for key, layers in host.injected_block_layers(base).items():
        unreachable = [layer for layer in layers if not host.reaches_timestep_embed_patch(layer)]
        if not layers or unreachable:
            where = ("none of its modules is a layer of the UNet's blocks" if not layers else
                     f"{host.describe(unreachable[0])} is a layer the host runs itself")
            raise DreamTunerInputError(
                f"Self-Subject-Attention cannot run its reference pass through this model: another pack has "
                f"injected modules into the UNet ({key}: {where}, so the reference pass cannot leave them "
                "out, and they would read the reference as one more batch row). Put Self-Subject-Attention on "
                "a model without them, or remove that pack's node from this model.")
        classes += [type(layer) for layer in layers if type(layer) not in classes]
    return tuple(classes)
