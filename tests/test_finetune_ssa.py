"""Fine-tuning through self-subject-attention (the paper's Stage 2, 3.3): the loss sees Eq. 3.

A model that carries the Self-Subject-Attention patch is fine-tuned through the same reference path as
sampling: each training row attends to the reference noised to that row's own noise level. Checked here
against independent computations: omega_ref = 0 is plain training bitwise (loss and gradient); each row
of a training prediction equals the sampler's own call of the model wrapper for that row alone, at its own
sigma, and differs from the call at the other row's sigma; the softmax mass on the reference keys,
recomputed by hand from the attention's inputs, is substantial and grows with omega_ref.
"""


import pytest
import torch

from dreamtuner_devtools import tiny_models as tm
from comfyui_dreamtuner.dreamtuner_core import finetune as ft
from comfyui_dreamtuner.dreamtuner_core.errors import DreamTunerInputError
from comfyui_dreamtuner.dreamtuner_core.finetune.run_files import run_hash
from comfyui_dreamtuner.dreamtuner_core.keys import STATE_KEY
from comfyui_dreamtuner.dreamtuner_core.training.host_training import (grad_mode, inplace_block_norms, inputs_copied,
                                                                      prediction_loss)
from test_finetune import finetune_parts
from test_self_subject_attention import ssa
from tolerances import assert_rounding_close, network_shape

torch.set_num_threads(1)  # tiny models on a shared 2-core machine: no thread hand-offs
BASE = dict(class_word="dog", name="rex", steps=3, unet_lr=1e-2, token_lr=5e-3, rank=4, seed=1)
# The training latents are 4x4 (32 px images): a 4x4 reference rides in the training batch, an 8x8 one
# gets a call of its own; both are the sampling paths.
SIZES = {"rides along": 4, "own call": 8}


@pytest.fixture(scope="module")
def parts():
    return finetune_parts()


def batch(parts):
    """A training batch as a step makes it: reference and regular latents at two noise levels."""
    generator = torch.Generator().manual_seed(11)
    model = parts["model"]
    sampling = model.get_model_object("model_sampling")
    x0 = torch.cat([parts["ref"][0], parts["reg"][0][:1]])
    sigma = sampling.sigma(torch.tensor([250.0, 700.0]))
    noise = torch.randn(x0.shape, generator=generator)
    x_t = sampling.noise_scaling(sigma.view(-1, 1, 1, 1), noise, x0)
    cond = torch.randn((1, 77, 32), generator=generator).expand(2, -1, -1).contiguous()
    return x_t, sigma, cond, x0


def trained_weights(model):
    """The weights whose gradient is compared: every self-attention key/query projection of the UNet."""
    return [p for name, p in model.model.diffusion_model.named_parameters() if ".attn1.to_" in name]


def loss_and_gradient(model, parts):
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    x_t, sigma, cond, x0 = batch(parts)
    weights = trained_weights(model)
    flags = [w.requires_grad for w in weights]
    try:
        # as the trainer runs it: the host's in-place adds see copies of what autograd saved
        with grad_mode(), inputs_copied(inplace_block_norms(model.model.diffusion_model)):
            for w in weights:
                w.requires_grad_(True)
            denoised = ft.predict(model, x_t, sigma, cond)
            loss = prediction_loss(model.get_model_object("model_sampling"), denoised, x0, sigma).mean()
            grads = torch.autograd.grad(loss, weights)
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
    return loss.detach(), torch.cat([g.flatten() for g in grads]), denoised.detach()


@pytest.mark.parametrize("path", list(SIZES))
def test_omega_zero_trains_exactly_as_plain_and_omega_three_does_not(parts, path):
    model = parts["model"]
    reference = tm.latent(4, SIZES[path], SIZES[path])
    plain_loss, plain_grad, _ = loss_and_gradient(model, parts)
    off_loss, off_grad, _ = loss_and_gradient(ssa(model, reference, omega_ref=0.0), parts)
    on_loss, on_grad, _ = loss_and_gradient(ssa(model, reference, omega_ref=3.0), parts)
    assert torch.equal(off_loss, plain_loss) and torch.equal(off_grad, plain_grad)
    # The reference changes the gradient of the self-attention weights by a share of its own size, not rounding.
    assert float((on_grad - plain_grad).norm()) > 0.5 * float(plain_grad.norm())  # measured 1.15-1.36
    assert not torch.equal(on_loss, plain_loss)


@pytest.mark.parametrize("path", list(SIZES))
def test_each_training_row_reads_the_reference_at_its_own_noise_level_as_the_sampler_does(parts, path):
    """Row i of the training prediction = the host sampler's call of the model wrapper (as
    ``comfy.samplers`` makes it) for row i alone at sigma_i; at the other row's sigma it differs."""
    import comfy.model_management

    model = ssa(parts["model"], tm.latent(4, SIZES[path], SIZES[path]), omega_ref=3.0)
    x_t, sigma, cond, _ = batch(parts)
    with torch.no_grad():
        _, _, training = loss_and_gradient(model, parts)
        comfy.model_management.load_models_gpu([model])
        state = model.model_options["transformer_options"][STATE_KEY]

        def sampler_call(row, level):
            options = dict(model.model_options["transformer_options"], cond_or_uncond=[0], sigmas=level)
            c = {"c_crossattn": cond[row:row + 1], "transformer_options": options}
            out = model.model_options["model_function_wrapper"](
                model.model.apply_model, {"input": x_t[row:row + 1], "timestep": level, "c": c, "cond_or_uncond": [0]})
            state.cache.clear()
            return out

        reduction, depth = network_shape(model.model.diffusion_model)
        for row in range(2):
            expected = sampler_call(row, sigma[row:row + 1])
            assert_rounding_close(training[row:row + 1], expected, reduction, depth)
            other = sampler_call(row, sigma[1 - row:2 - row])  # x_t[row] read at the other sigma
            own_plain = ft.predict(parts["model"], x_t[row:row + 1], sigma[row:row + 1], cond[row:row + 1])
            assert float((training[row] - expected[0]).abs().max()) < 1e-3 * float((expected - own_plain).abs().max())
            assert not torch.allclose(expected, other)


def reference_mass(model, parts, monkeypatch):
    """Softmax mass on the reference keys in every Eq. 3 call of a training prediction, from the call's q,
    own keys, reference keys and log-mask bias recomputed by hand (per head)."""
    from comfyui_dreamtuner.dreamtuner_core.ssa import replace

    masses = []
    original = replace.self_subject_attention

    def spy(q, k, v, k_ref, v_ref, log_m_ref, heads, *args, **kwargs):
        b, n, inner = q.shape
        d = inner // heads
        qh = q.reshape(b, n, heads, d).transpose(1, 2)
        keys = torch.cat([k, k_ref.unsqueeze(0).expand(b, -1, -1)], dim=1)
        kh = keys.reshape(b, keys.shape[1], heads, d).transpose(1, 2)
        bias = torch.cat([log_m_ref.new_zeros(k.shape[1]), log_m_ref.to(q.dtype)])
        weights = torch.softmax(qh @ kh.transpose(-1, -2) / d ** 0.5 + bias.view(1, 1, 1, -1), dim=-1)
        masses.append(float(weights[..., k.shape[1]:].sum(-1).mean().detach()))  # keys past the row's own
        return original(q, k, v, k_ref, v_ref, log_m_ref, heads, *args, **kwargs)

    monkeypatch.setattr(replace, "self_subject_attention", spy)
    loss_and_gradient(model, parts)
    monkeypatch.undo()
    return masses


def test_the_attention_over_the_reference_keys_carries_mass(parts, monkeypatch):
    model = parts["model"]
    reference = tm.latent(4, 4, 4)
    weak = reference_mass(ssa(model, reference, omega_ref=1.0), parts, monkeypatch)
    strong = reference_mass(ssa(model, reference, omega_ref=3.0), parts, monkeypatch)
    layers = 7  # the tiny SD1.5 UNet's self-attention layers; the two rows read different features
    assert len(weak) == len(strong) == 2 * layers
    # The reference has as many keys as the row's own and the tiny UNet's logits are nearly flat, so Eq. 3
    # gives the reference about omega / (1 + omega) of the mass: 1/2 at omega 1, 3/4 at omega 3. Measured:
    # 0.45-0.54 and 0.69-0.77 (largest distance 0.055); plain attention would give 0 (no reference keys).
    for masses, omega in ((weak, 1.0), (strong, 3.0)):
        assert max(abs(m - omega / (1 + omega)) for m in masses) < 0.08, masses
    assert all(s > w for s, w in zip(strong, weak))


def test_training_with_gradient_checkpointing_reads_the_same_reference_features(parts):
    """A checkpointed layer records its reference features again in the backward pass: the losses of the
    run are the same bitwise (recorded twice, Eq. 3 would see every reference key twice)."""
    model = ssa(parts["model"], tm.latent(4, 4, 4), omega_ref=3.0)
    runs = [ft.train(model, parts["clip"], ft.FinetuneSettings(**dict(BASE, gradient_checkpointing=gc)),
                     parts["ref"], parts["reg"]).losses for gc in (False, True)]
    plain = ft.train(parts["model"], parts["clip"], ft.FinetuneSettings(**BASE), parts["ref"], parts["reg"]).losses
    assert runs[0] == runs[1]
    assert runs[0] != plain


def test_the_run_hash_names_the_reference_training_attends(parts):
    settings = ft.FinetuneSettings(**BASE)
    model, clip, image, regular = parts["model"], parts["clip"], parts["image"], tm.image(5, 32, 32, batch=2)

    def digest(m):
        return run_hash(settings, image, None, "subject is 1", regular, m, clip, parts["vae"])

    reference = tm.latent(4, 4, 4)
    assert digest(ssa(model, reference)) == digest(ssa(model, reference))
    assert len({digest(model), digest(ssa(model, reference)), digest(ssa(model, reference, omega_ref=1.5)),
                digest(ssa(model, tm.latent(5, 4, 4)))}) == 4


def test_a_wrapper_that_hides_self_subject_attention_is_refused_by_name(parts):
    model = ssa(parts["model"], tm.latent(4, 4, 4)).clone()

    def hides(apply_model, args):  # a node after Self-Subject-Attention that does not call the wrapper it found
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(hides)
    with pytest.raises(DreamTunerInputError, match=r"fine-tuning.*'.*hides'.*Put Self-Subject-Attention after"):
        ft.train(model, parts["clip"], ft.FinetuneSettings(**dict(BASE, steps=1)), parts["ref"], parts["reg"])

