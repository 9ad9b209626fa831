"""Bad input gets an error that names the input and says how to fix it."""

import pytest
import torch
import comfy.model_patcher

from dreamtuner_devtools import tiny_models as tm
from comfyui_dreamtuner.dreamtuner_core.errors import DreamTunerInputError
from test_self_subject_attention import ssa


@pytest.fixture(scope="module")
def model():
    return tm.build("sd15")


def test_a_latent_with_channels_the_model_does_not_take(model):
    with pytest.raises(DreamTunerInputError, match=r"reference has 16 latent channels.*takes 4.*VAE"):
        ssa(model, tm.latent(1, channels=16))


def test_a_latent_that_is_not_an_image_batch(model):
    with pytest.raises(DreamTunerInputError, match=r"reference must be an image LATENT"):
        ssa(model, torch.zeros(1, 4, 2, 8, 8))


def test_a_mask_batch_matching_neither_one_nor_the_references(model):
    with pytest.raises(DreamTunerInputError, match=r"reference_mask has a batch of 3 but there are 2 reference"):
        ssa(model, tm.latent(1, batch=2), reference_mask=torch.ones(3, 64, 64))


def test_a_mask_that_selects_nothing_says_how_to_fix_it(model):
    with pytest.raises(DreamTunerInputError, match=r"selects no subject.*background is 1 \(LoadImage alpha\)"):
        ssa(model, tm.latent(1), reference_mask=torch.zeros(1, 64, 64))
    # LoadImage gives an all-zero mask for an image without alpha: whole image is the subject then.
    ssa(model, tm.latent(1), reference_mask=torch.zeros(1, 64, 64), mask_mode="background is 1 (LoadImage alpha)")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_the_reference(model, bad):
    reference = tm.latent(1)
    reference[0, 1, 2, 3] = bad
    with pytest.raises(DreamTunerInputError, match=r"reference contains NaN or infinite"):
        ssa(model, reference)


def test_nan_in_the_mask(model):
    mask = torch.ones(1, 64, 64)
    mask[0, 0, 0] = float("nan")
    with pytest.raises(DreamTunerInputError, match=r"reference_mask contains NaN"):
        ssa(model, tm.latent(1), reference_mask=mask)


def test_start_after_end(model):
    with pytest.raises(DreamTunerInputError, match=r"start_percent \(0.8\) must not be greater than end_percent \(0.2\)"):
        ssa(model, tm.latent(1), start_percent=0.8, end_percent=0.2)


def test_unknown_blocks_list_the_valid_names(model):
    with pytest.raises(DreamTunerInputError, match=r"blocks: 'output.9' names no self-attention layer.*input.1"):
        ssa(model, tm.latent(1), blocks="output.9")


def test_an_unsupported_model_family_names_the_supported_ones():
    """AuraFlow, another DiT of the host's, built tiny through its real classes (on the meta device: only
    its class is read)."""
    import comfy.supported_models

    config = comfy.supported_models.AuraFlow(dict(cond_seq_dim=32, dim=32, n_layers=1, n_double_layers=1,
                                                  n_heads=2, global_conddim=32, max_seq=16))
    aura = comfy.model_patcher.ModelPatcher(config.get_model({}, device="meta"), torch.device("cpu"),
                                            torch.device("cpu"))
    with pytest.raises(DreamTunerInputError, match=r"does not support AuraFlow \(MMDiT\).*Supported: SD1.x, "
                                                   r"SD2.x and SDXL \(UNet\), and Flux.1.*SD3/SD3.5"):
        ssa(aura, tm.latent(1))


def test_the_input_model_survives_a_failed_patch(model):
    before = dict(model.model_options)
    with pytest.raises(DreamTunerInputError):
        ssa(model, tm.latent(1), reference_mask=torch.zeros(1, 64, 64))
    assert model.model_options == before


def test_reference_conditioning_of_another_family_is_named(model):
    """SD1.5 text (768 wide) on SDXL is the real case; here the tiny SD1.5's 32 vs SDXL-tiny's 48."""
    sdxl_text = torch.zeros(1, 77, 48)
    assert tm.context_dim(model) == 32
    with pytest.raises(DreamTunerInputError, match=r"reference_conditioning has width 48 but this model's "
                                                   r"cross-attention takes 32.*with this model's CLIP"):
        ssa(model, tm.latent(1), reference_conditioning=[[sdxl_text, {}]])
    ssa(model, tm.latent(1), reference_conditioning=tm.conditioning(model, 0))  # its own family's text is fine
