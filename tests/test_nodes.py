"""The pack as ComfyUI loads it: mappings, inputs with tooltips, and the node's call."""

import torch

import comfyui_dreamtuner
from dreamtuner_devtools import tiny_models as tm
from comfyui_dreamtuner.nodes.ssa import SelfSubjectAttentionPatch

HOST_TYPES = {"MODEL", "LATENT", "MASK", "CONDITIONING", "FLOAT", "INT", "STRING", "BOOLEAN", "IMAGE",
              "CLIP_VISION", "DREAMTUNER_SUBJECT_ENCODER", "CLIP", "VAE"}
HOST_TYPES |= {"DREAMTUNER_SCORING_MODELS"}  # the pack's own: Scoring Models Loader -> Subject Score
HOST_TYPES |= {"CONTROL_NET"}  # the core ControlNet loader -> Video Sequence


def test_the_pack_exports_its_nodes_with_display_names():
    mappings = comfyui_dreamtuner.NODE_CLASS_MAPPINGS
    names = comfyui_dreamtuner.NODE_DISPLAY_NAME_MAPPINGS
    assert mappings["DreamTunerSelfSubjectAttention"] is SelfSubjectAttentionPatch
    assert names["DreamTunerSelfSubjectAttention"] == "Self-Subject-Attention (DreamTuner)"
    assert set(names) == set(mappings)


def test_every_input_has_a_host_type_and_a_tooltip():
    for node in comfyui_dreamtuner.NODE_CLASS_MAPPINGS.values():
        inputs = node.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, spec in inputs.get(section, {}).items():
                kind, options = spec
                assert isinstance(kind, list) or kind in HOST_TYPES, (node, name)
                assert len(options.get("tooltip", "")) > 20, (node, name)
        assert getattr(node, node.FUNCTION)
        assert len(node.RETURN_TYPES) == len(node.OUTPUT_TOOLTIPS)
        assert node.CATEGORY == "DreamTuner" and node.DESCRIPTION


def test_the_widget_defaults_are_the_papers():
    required = SelfSubjectAttentionPatch.INPUT_TYPES()["required"]
    optional = SelfSubjectAttentionPatch.INPUT_TYPES()["optional"]
    assert required["omega_ref"][1]["default"] == 3.0
    assert (required["start_percent"][1]["default"], required["end_percent"][1]["default"]) == (0.0, 1.0)
    assert optional["blocks"][1]["default"] == "all"
    assert optional["mask_mode"][1]["default"] == "subject is 1"


def test_the_node_takes_the_reference_caption_from_a_conditioning():
    model = tm.build("sd15")
    caption = tm.conditioning(model, 9)
    (patched,) = SelfSubjectAttentionPatch().patch(model, {"samples": tm.latent(4)}, 3.0, 0.0, 1.0,
                                                   reference_conditioning=caption)
    (reference,) = patched.model_options["transformer_options"]["dreamtuner_ssa"].references
    assert torch.equal(reference.context, caption[0][0])
    assert reference.omega_ref == 3.0 and reference.layers is None


def test_positions_is_an_optional_choice_after_every_older_widget_defaulting_to_offset():
    """Optional and last: a workflow saved before the widget existed keeps its values in their places."""
    inputs = SelfSubjectAttentionPatch.INPUT_TYPES()
    choices, options = inputs["optional"]["positions"]
    assert choices == ["offset", "shared"] and options["default"] == "offset"
    assert list(inputs["optional"])[-1] == "positions"
    assert all(word in options["tooltip"] for word in ("offset", "shared", "ghost", "UNet"))


def test_a_unet_ignores_positions_bit_for_bit():
    """UNets have no rotary positions: 'shared' and 'offset' give the same sample, and both differ from plain."""
    model = tm.build("sd15")
    positive, negative = tm.conditioning(model, 1), tm.conditioning(model, 2)
    reference = {"samples": tm.latent(4, 6, 10)}
    samples = {}
    for positions in ("offset", "shared"):
        (patched,) = SelfSubjectAttentionPatch().patch(model, reference, 3.0, 0.0, 1.0, positions=positions)
        samples[positions] = tm.sample(patched, positive, negative, tm.latent(0))
    assert torch.equal(samples["offset"], samples["shared"])
    assert (samples["offset"] - tm.sample(model, positive, negative, tm.latent(0))).abs().max() > 1e-2
