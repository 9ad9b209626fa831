"""Interleaved classifier-free guidance (Eq. 4-6) on real host models and samplers."""

import pytest
import torch

import comfy.samplers
import tiny_models as tm
from comfyui_dreamtuner.dreamtuner_core import interleaved_cfg as icfg
from comfyui_dreamtuner.dreamtuner_core import reference_pass
from comfyui_dreamtuner.dreamtuner_core.errors import DreamTunerInputError
from comfyui_dreamtuner.nodes.interleaved_cfg import InterleavedCFGGuider, InterleavedCFGSampler
from test_self_subject_attention import ssa


def host_cfg(a, b, w):
    x, sigma = torch.zeros_like(a), torch.ones(1)
    return comfy.samplers.cfg_function(None, a, b, w, x, sigma, model_options={})


@pytest.mark.parametrize("lam, equation", [(0.3, 4), (0.9, 4), (0.95, 5)])
def test_eq4_and_eq5_arithmetic_against_hand_computed_values(lam, equation):
    known = {("positive", "t-dt"): torch.tensor([1.0, 2.0, -3.0]), ("positive", None): torch.tensor([0.5, -1.0, 4.0]),
             ("negative", "t+dt'"): torch.tensor([-2.0, 0.25, 1.0])}
    asked = []

    def evaluate(pairs):
        asked.append(pairs)
        return [known[p] for p in pairs]

    out, used = icfg.interleaved_cfg(lam, 0.9, 3.0, 7.5, evaluate, host_cfg)
    assert used == equation
    if equation == 4:  # 3 * e(c, ref) - 2 * e(c, none)
        assert asked == [[("positive", "t-dt"), ("positive", None)]]
        expected = torch.tensor([3 * 1.0 - 2 * 0.5, 3 * 2.0 - 2 * -1.0, 3 * -3.0 - 2 * 4.0])
    else:  # 7.5 * e(c, ref@t-dt) - 6.5 * e(uc, ref@t+dt')
        assert asked == [[("positive", "t-dt"), ("negative", "t+dt'")]]
        expected = torch.tensor([7.5 * 1.0 - 6.5 * -2.0, 7.5 * 2.0 - 6.5 * 0.25, 7.5 * -3.0 - 6.5 * 1.0])
    torch.testing.assert_close(out, expected)


@pytest.fixture(scope="module")
def sd15():
    model = tm.build("sd15")
    return model, tm.conditioning(model, 1), tm.conditioning(model, 2), ssa(model, tm.latent(4))


def run(patched, pos, neg, latent=None, **settings):
    settings = {"seed": 5, "steps": 4, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", **settings}
    latent = {"samples": tm.latent(3)} if latent is None else latent
    out, guider = icfg.sample_interleaved(patched, positive=pos, negative=neg, latent=latent, disable_pbar=True,
                                          **settings)
    return out["samples"], guider


@pytest.mark.parametrize("p_r, expected", [(1.0, 4), (0.0, 5)])
def test_p_r_one_and_zero_use_one_equation_on_every_step(sd15, p_r, expected):
    _, pos, neg, patched = sd15
    _, guider = run(patched, pos, neg, p_r=p_r)
    assert guider.choices == [expected] * 4


def test_the_choices_follow_a_generator_seeded_by_the_sampler_seed(sd15):
    _, pos, neg, patched = sd15
    torch.manual_seed(123)
    _, first = run(patched, pos, neg, p_r=0.5, seed=42, steps=12)
    torch.manual_seed(999)  # the global RNG does not matter
    _, second = run(patched, pos, neg, p_r=0.5, seed=42, steps=12)
    generator = torch.Generator().manual_seed(42)
    expected = [4 if float(torch.rand((), generator=generator)) <= 0.5 else 5 for _ in range(12)]
    assert first.choices == second.choices == expected
    assert {4, 5} <= set(expected)


def test_p_r_zero_without_offsets_is_the_core_cfg_on_the_patched_model_exactly(sd15):
    model, pos, neg, patched = sd15
    interleaved, _ = run(patched, pos, neg, p_r=0.0)
    core = tm.sample(patched, pos, neg, tm.latent(3), seed=5, steps=4, cfg=5.0)
    assert torch.equal(interleaved, core)


def test_eq4_needs_no_negative_and_differs_from_plain_cfg(sd15):
    model, pos, neg, patched = sd15
    eq4, _ = run(patched, pos, [], p_r=1.0)
    assert torch.isfinite(eq4).all()
    assert not torch.equal(eq4, tm.sample(patched, pos, neg, tm.latent(3), seed=5, steps=4, cfg=5.0))


def spy_reference_levels(monkeypatch):
    levels = []
    original = reference_pass.reference_inputs

    def spy(base, rows, x, t):
        levels.append(sorted({round(level, 5) for level, _, _ in rows}))
        return original(base, rows, x, t)

    monkeypatch.setattr(reference_pass, "reference_inputs", spy)
    return levels


def test_reference_noise_levels_are_those_of_t_minus_dt_and_t_plus_dt_prime(sd15, monkeypatch):
    model, pos, neg, patched = sd15
    levels = spy_reference_levels(monkeypatch)
    counter = tm.UNetItemCounter(model)
    run(patched, pos, neg, p_r=0.0, delta_t=50, delta_t_prime=100, steps=3)
    counter.close()
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", 3)[:-1]
    expected = []
    for sigma in sigmas:
        t = sampling.timestep(sigma).float()
        minus = float(sampling.sigma(torch.clamp(t - 50, 0, 999)))
        plus = float(sampling.sigma(torch.clamp(t + 100, 0, 999)))
        expected.append(sorted({round(minus, 5), round(plus, 5)}))
    assert levels == expected
    assert expected[0][-1] == round(float(sigmas[0]), 5)  # t + dt' past the schedule's end is clamped to it
    assert counter.items == [4] * 3  # cond + uncond + the reference at two noise levels


def test_with_default_offsets_a_step_costs_two_conditioned_items_and_one_reference(sd15, monkeypatch):
    model, pos, neg, patched = sd15
    counter = tm.UNetItemCounter(model)
    _, guider = run(patched, pos, neg, p_r=0.5, seed=3, steps=8)
    counter.close()
    assert {4, 5} <= set(guider.choices)
    assert counter.items == [3] * 8


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde", "heun"])
def test_ancestral_sde_and_second_order_samplers(sd15, sampler):
    model, pos, neg, patched = sd15
    out, guider = run(patched, pos, neg, sampler_name=sampler, delta_t=20, delta_t_prime=20)
    assert torch.isfinite(out).all() and len(guider.choices) >= 4


def test_denoise_below_one_and_a_noise_mask(sd15):
    model, pos, neg, patched = sd15
    latent = tm.latent(3)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, :4] = 1.0
    partial, _ = run(patched, pos, neg, latent={"samples": latent}, denoise=0.6)
    masked, _ = run(patched, pos, neg, latent={"samples": latent, "noise_mask": mask})
    assert torch.isfinite(partial).all() and torch.isfinite(masked).all()
    plain = tm.sample(patched, pos, neg, latent, seed=5, steps=4, cfg=5.0, noise_mask=mask)
    keep = ~mask[0, 0].bool()
    torch.testing.assert_close(masked[..., keep], plain[..., keep], atol=1e-4, rtol=1e-4)


def test_with_a_controlnet_from_the_host_loader(tmp_path):
    import comfy.controlnet

    model = tm.build("sd15_narrow")
    pos, neg = tm.conditioning(model, 1), tm.conditioning(model, 2)
    control = comfy.controlnet.load_controlnet(str(tm.write_controlnet(tmp_path / "control.safetensors")))
    hint = torch.rand((1, 64, 64, 3), generator=torch.Generator().manual_seed(3))
    patched = ssa(model, tm.latent(4))
    controlled, _ = run(patched, tm.apply_controlnet(pos, control, hint), neg, steps=2, delta_t=10, delta_t_prime=10)
    free, _ = run(patched, pos, neg, steps=2, delta_t=10, delta_t_prime=10)
    assert torch.isfinite(controlled).all() and not torch.equal(controlled, free)


def test_the_guider_node_with_sampler_custom_advanced(sd15):
    model, pos, neg, patched = sd15
    (guider,) = InterleavedCFGGuider().get_guider(patched, pos, neg, 5.0, 5.0, 0.0, 0, 0)
    out = tm.sample_custom(guider, tm.latent(3), seed=5, steps=4)
    core = comfy.samplers.CFGGuider(patched)
    core.set_conds(pos, neg)
    core.set_cfg(5.0)
    assert torch.equal(out, tm.sample_custom(core, tm.latent(3), seed=5, steps=4))
    (guider,) = InterleavedCFGGuider().get_guider(patched, pos, neg, 5.0, 5.0, 0.9, 0, 0)
    tm.sample_custom(guider, tm.latent(3), seed=5, steps=4, sampler="dpmpp_2m", scheduler="karras")
    assert len(guider.choices) == 4


def test_the_sampler_node_returns_a_latent(sd15):
    _, pos, neg, patched = sd15
    (latent,) = InterleavedCFGSampler().sample(patched, 5, 4, 5.0, "euler", "normal", pos, neg,
                                               {"samples": tm.latent(3)}, 1.0, 5.0, 0.0, 0, 0)
    assert torch.equal(latent["samples"], tm.sample(patched, pos, neg, tm.latent(3), seed=5, steps=4, cfg=5.0))


@pytest.mark.parametrize("settings, message", [
    ({"p_r": 1.5}, r"p_r is a probability and must lie in \[0, 1\]"),
    ({"p_r": -0.1}, r"p_r is a probability"),
    ({"delta_t": 1000}, r"delta_t is an offset in timesteps .* \[0, 999\]"),
    ({"delta_t_prime": -1}, r"delta_t_prime is an offset"),
    ({"w_r": -1.0}, r"w_r and cfg must be 0 or more"),
])
def test_bad_settings(sd15, settings, message):
    _, pos, neg, patched = sd15
    with pytest.raises(DreamTunerInputError, match=message):
        run(patched, pos, neg, **settings)


def test_a_model_without_self_subject_attention_names_the_node_to_add(sd15):
    model, pos, neg, _ = sd15
    with pytest.raises(DreamTunerInputError, match=r"Self-Subject-Attention \(DreamTuner\)"):
        run(model, pos, neg)
    with pytest.raises(DreamTunerInputError, match=r"Self-Subject-Attention \(DreamTuner\)"):
        InterleavedCFGGuider().get_guider(model, pos, neg, 5.0, 5.0, 0.9, 0, 0)


def test_an_empty_negative_is_an_error_unless_p_r_is_one(sd15):
    _, pos, _, patched = sd15
    with pytest.raises(DreamTunerInputError, match=r"negative is empty.*ConditioningZeroOut"):
        run(patched, pos, [], p_r=0.9)
