"""Self-subject-attention together with the host's ControlNet and LoRA and other packs' patches."""

import logging

import pytest
import torch

import comfy.controlnet
import comfy.sd
import comfy.utils
from dreamtuner_devtools import tiny_models as tm
from comfyui_dreamtuner.dreamtuner_core import host
from comfyui_dreamtuner.dreamtuner_core.errors import DreamTunerInputError
from comfyui_dreamtuner.dreamtuner_core.ssa.reference_rows import ReferenceBatchWrapper
from test_self_subject_attention import evaluation_features, ssa
from tolerances import assert_network_outputs_close


@pytest.fixture(scope="module")
def narrow():
    """SD1.5 widths so the host's ControlNet loader recognises the family."""
    model = tm.build("sd15_narrow")
    return model, tm.conditioning(model, 1), tm.conditioning(model, 2)


def test_controlnet_from_the_host_loader_drives_the_image_not_the_reference(narrow, tmp_path, caplog):
    model, pos, neg = narrow
    control = comfy.controlnet.load_controlnet(str(tm.write_controlnet(tmp_path / "control.safetensors")))
    assert control is not None
    hint = torch.rand((1, 64, 64, 3), generator=torch.Generator().manual_seed(3))
    pos_control = tm.apply_controlnet(pos, control, hint)
    latent, reference = tm.latent(3), tm.latent(4)
    patched = ssa(model, reference)

    with caplog.at_level(logging.WARNING):
        controlled = tm.sample(patched, pos_control, neg, latent, steps=2)
    assert not [r for r in caplog.records if "control could not be applied" in r.getMessage()]
    free = tm.sample(patched, pos, neg, latent, steps=2)
    assert torch.isfinite(controlled).all() and not torch.equal(controlled, free)
    assert not torch.equal(controlled, tm.sample(model, pos_control, neg, latent, steps=2))

    # The reference pass received no ControlNet residuals: same features with and without control.
    with evaluation_features() as seen:
        tm.sample(patched, pos_control, neg, latent, steps=1)
        tm.sample(patched, pos, neg, latent, steps=1)
    (with_control,), (without,) = seen[0].values(), seen[1].values()
    for layer in without.layers():
        # Same reference row, other batch companions (the controlled rows): rounding only.
        assert_network_outputs_close(with_control.get(layer)[0], without.get(layer)[0], model.model.diffusion_model)


def test_lora_from_the_host_loader_in_either_order(tmp_path):
    model = tm.build("sd15")
    pos, neg, latent, reference = tm.conditioning(model, 1), tm.conditioning(model, 2), tm.latent(3), tm.latent(4)
    lora = comfy.utils.load_torch_file(str(tm.write_lora(tmp_path / "subject.safetensors", model)), safe_load=True)
    assert lora, "the LoRA file holds tensors"
    with_lora, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    lora_then_ssa = ssa(with_lora, reference)
    ssa_then_lora, _ = comfy.sd.load_lora_for_models(ssa(model, reference), None, lora, 1.0, 0.0)
    a = tm.sample(lora_then_ssa, pos, neg, latent)
    b = tm.sample(ssa_then_lora, pos, neg, latent)
    assert torch.equal(a, b)
    assert not torch.equal(a, tm.sample(ssa(model, reference), pos, neg, latent)), "the LoRA acts"
    assert not torch.equal(a, tm.sample(with_lora, pos, neg, latent)), "the reference acts"
    assert not torch.equal(tm.sample(model, pos, neg, latent), tm.sample(with_lora, pos, neg, latent))


def scale_self_attention_input(calls):
    """Another pack's attn1_patch: scales what enters self-attention and counts its calls.

    A plain function: the late-2024 core deep-copies patch objects on every clone.
    """

    def patch(n, context_attn1, value_attn1, extra_options):
        calls.append(extra_options["block"])
        return n * 1.25, context_attn1 * 1.25, value_attn1 * 1.25

    return patch


def test_an_existing_attn1_patch_keeps_working_in_either_order():
    model = tm.build("sd15")
    pos, neg, latent, reference = tm.conditioning(model, 1), tm.conditioning(model, 2), tm.latent(3), tm.latent(4)
    calls = []
    other = scale_self_attention_input(calls)
    foreign = model.clone()
    foreign.set_model_attn1_patch(other)
    foreign_only = tm.sample(foreign, pos, neg, latent)
    assert torch.equal(tm.sample(ssa(foreign, reference, omega_ref=0.0), pos, neg, latent), foreign_only)

    calls.clear()
    both = tm.sample(ssa(foreign, reference), pos, neg, latent)
    layers = host.self_attention_layers(model)
    assert len(layers) == 7 and len(calls) == 7 * 3  # every self-attention layer at every step
    assert not torch.equal(both, foreign_only)
    assert not torch.equal(both, tm.sample(ssa(model, reference), pos, neg, latent))
    after = ssa(model, reference).clone()
    after.set_model_attn1_patch(other)
    assert torch.equal(tm.sample(after, pos, neg, latent), both)


def test_a_foreign_attn1_replacement_is_reported_by_name_and_can_be_excluded():
    model = tm.build("sd15")

    def record_attention(q, k, v, extra_options):
        return q

    other = model.clone()
    other.set_model_attn1_replace(record_attention, "middle", 0)
    with pytest.raises(DreamTunerInputError, match=r"record_attention.*middle\.0\.0|middle.*record_attention"):
        ssa(other, tm.latent(4))
    with pytest.raises(DreamTunerInputError, match="Self-Subject-Attention"):
        ssa(other, tm.latent(4))
    patched = ssa(other, tm.latent(4), blocks="input, output")
    replaced = patched.model_options["transformer_options"]["patches_replace"]["attn1"]
    assert replaced[("middle", 0)] is record_attention


def test_an_existing_model_function_wrapper_is_chained():
    model = tm.build("sd15")
    pos, neg, latent, reference = tm.conditioning(model, 1), tm.conditioning(model, 2), tm.latent(3), tm.latent(4)
    seen = []

    def other_wrapper(apply_model, args):
        seen.append(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])

    wrapped = model.clone()
    wrapped.set_model_unet_function_wrapper(other_wrapper)
    out = tm.sample(ssa(wrapped, reference), pos, neg, latent)
    wrapper = ssa(wrapped, reference).model_options["model_function_wrapper"]
    assert isinstance(wrapper, ReferenceBatchWrapper) and wrapper.previous is other_wrapper
    assert seen == [2, 2, 2]  # the other wrapper sees the host's batch; references are added inside it
    assert torch.equal(out, tm.sample(ssa(model, reference), pos, neg, latent))
