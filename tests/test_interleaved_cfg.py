"""Interleaved classifier-free guidance (Eq. 4-6) on real host models and samplers."""

import pytest
import torch

import comfy.sample
import comfy.samplers
from dreamtuner_devtools import tiny_models as tm
from comfyui_dreamtuner.dreamtuner_core.guidance import interleaved_cfg as icfg
from comfyui_dreamtuner.dreamtuner_core.guidance import step_clock
from comfyui_dreamtuner.dreamtuner_core.ssa import reference_rows
from comfyui_dreamtuner.dreamtuner_core.errors import DreamTunerInputError
from comfyui_dreamtuner.nodes.guidance import InterleavedCFGGuider, InterleavedCFGSampler
from test_self_subject_attention import sampling_magnitude, ssa
from tolerances import assert_network_outputs_close, assert_rounding_close


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
    original = reference_rows.reference_inputs

    def spy(base, rows, x, t):
        levels.append(sorted({round(level, 5) for level, _, _ in rows}))
        return original(base, rows, x, t)

    monkeypatch.setattr(reference_rows, "reference_inputs", spy)
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
    # Outside the mask both runs keep the input latent; the last step's arithmetic on the noised latent rounds.
    assert_rounding_close(masked[..., keep], plain[..., keep], reduction=1, depth=4,
                          magnitude=sampling_magnitude(model, latent, steps=4, seed=5))


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
    ({"w_r": -0.5}, r"w_r must be -1 \(the same as cfg, the paper's setting\) or 0 or more; got -0.5"),
    ({"cfg": -1.0}, r"cfg must be 0 or more"),
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


# One lambda per sampler step (Eq. 6 "at each step"), also for samplers with several evaluations per step.

def expected_draws(seed, steps):
    """The seeded sequence, computed here independently: one scalar U(0, 1) draw per step."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand((), generator=generator).item() for _ in range(steps)]


def two_evaluation_steps(steps):
    """Heun, DPM2 and DPM++ SDE evaluate twice per step, once on the last step (to sigma 0)."""
    return [i for i in range(steps) for _ in range(2 if i < steps - 1 else 1)]


@pytest.mark.parametrize("sampler", ["heun", "dpm_2", "dpmpp_sde"])
def test_every_evaluation_of_a_step_uses_the_equation_of_that_steps_draw(sd15, sampler):
    _, pos, neg, patched = sd15
    steps, seed, p_r = 5, 2, 0.5  # seed 2 alternates: 5, 4, 5, 4, 5
    draws = expected_draws(seed, steps)
    per_step = [4 if lam <= p_r else 5 for lam in draws]
    assert {4, 5} <= set(per_step), "the seed must give both equations for this test to check anything"
    owner = two_evaluation_steps(steps)
    _, guider = run(patched, pos, neg, sampler_name=sampler, steps=steps, seed=seed, p_r=p_r)
    assert guider.choices == [per_step[i] for i in owner]
    assert guider.steps == owner


def test_the_per_step_draws_do_not_depend_on_the_number_of_evaluations_per_step(sd15):
    _, pos, neg, patched = sd15
    _, euler = run(patched, pos, neg, sampler_name="euler", steps=5, seed=2, p_r=0.5)
    _, heun = run(patched, pos, neg, sampler_name="heun", steps=5, seed=2, p_r=0.5)
    first_of_each_step = [heun.choices[heun.steps.index(i)] for i in range(5)]
    assert euler.steps == list(range(5)) and euler.choices == first_of_each_step


def test_a_caller_callback_still_sees_every_step(sd15):
    _, pos, neg, patched = sd15
    seen = []
    out, guider = run(patched, pos, neg, sampler_name="heun", steps=5, seed=11, p_r=0.5,
                      callback=lambda i, denoised, x, total: seen.append((i, total)))
    assert seen == [(i, 5) for i in range(5)]
    assert guider.steps == two_evaluation_steps(5)


def test_a_split_schedule_as_ksampler_advanced_and_split_sigmas_run_it(sd15):
    """The second half of a schedule (SplitSigmas, or KSamplerAdvanced's start_step) is a run of its own:
    its steps count from 0 and each is one equation."""
    model, pos, neg, patched = sd15
    (guider,) = InterleavedCFGGuider().get_guider(patched, pos, neg, 5.0, -1.0, 0.5, 0, 0)
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", 8).cpu()[3:]
    latent = tm.latent(3)
    noise = torch.zeros_like(latent)  # the second half continues from a partly denoised latent
    out = guider.sample(noise, latent, comfy.samplers.sampler_object("heun"), sigmas, disable_pbar=True, seed=11)
    assert torch.isfinite(out).all()
    draws = expected_draws(11, 5)
    assert guider.steps == two_evaluation_steps(5)
    assert guider.choices == [4 if draws[i] <= 0.5 else 5 for i in guider.steps]


def test_the_step_of_each_evaluation_from_the_order_of_evaluations_and_callbacks():
    def events(pattern):
        return [("eval", 1.0) if e == "e" else ("step", int(e)) for e in pattern]

    assert step_clock.steps_from_events(events("e0e1e2"), 3) == [0, 1, 2]  # euler
    assert step_clock.steps_from_events(events("e0ee1ee2e"), 3) == [0, 0, 1, 1, 2, 2]  # heun, dpm_2: corrector after
    assert step_clock.steps_from_events(events("e0eee1"), 2) == [0, 0, 0, 1]  # heunpp2: two correctors
    assert step_clock.steps_from_events(events("eee0eee1"), 3) is None  # fewer callbacks than steps (dpm_fast)
    assert step_clock.steps_from_events(events("e1e0"), 2) is None  # callbacks out of order
    assert step_clock.steps_from_events(events("0e"), 1) is None  # a callback before any evaluation


def test_an_adaptive_sampler_falls_back_to_the_schedule_interval_of_each_evaluation(sd15):
    _, pos, neg, patched = sd15
    _, guider = run(patched, pos, neg, sampler_name="dpm_fast", steps=6, seed=11, p_r=0.5)
    assert guider._clock.recorded is None and guider.choices
    draws = expected_draws(11, 6)
    assert guider.choices == [4 if draws[i] <= 0.5 else 5 for i in guider.steps]
    assert guider.steps == sorted(guider.steps) and set(guider.steps) <= set(range(6))


def test_interval_step_of_a_sigma():
    sigmas = [10.0, 5.0, 2.0, 0.0]
    assert [step_clock.interval_step(sigmas, s) for s in (12.0, 10.0, 7.0, 5.0, 3.0, 2.0, 1.0, 0.0)] == \
        [0, 0, 0, 1, 1, 2, 2, 2]


# w_r "same as cfg" (the paper) is the default.

@pytest.mark.parametrize("node", [InterleavedCFGSampler, InterleavedCFGGuider])
def test_w_r_defaults_to_minus_one_meaning_the_same_as_cfg(node):
    spec = node.INPUT_TYPES()["required"]["w_r"][1]
    assert spec["default"] == -1.0 and spec["min"] == -1.0 and spec["tooltip"].startswith("-1: same as cfg")


def test_w_r_minus_one_equals_w_r_set_to_cfg(sd15):
    _, pos, neg, patched = sd15
    same, _ = run(patched, pos, neg, cfg=6.0, w_r=-1.0, p_r=0.9, seed=3)
    explicit, _ = run(patched, pos, neg, cfg=6.0, w_r=6.0, p_r=0.9, seed=3)
    other, _ = run(patched, pos, neg, cfg=6.0, w_r=2.0, p_r=0.9, seed=3)
    assert torch.equal(same, explicit) and not torch.equal(same, other)
    (latent,) = InterleavedCFGSampler().sample(patched, 3, 4, 6.0, "euler", "normal", pos, neg,
                                               {"samples": tm.latent(3)}, 1.0, -1.0, 0.9, 0, 0)
    assert torch.equal(latent["samples"], same)


# Eq. 4's "none" branch pinned at model level (p_r = 1: Eq. 4 at every step).

def predictions_of(guider, latent, steps=3, seed=5, sampler="euler"):
    """Each step's prediction (the sampler callback's ``denoised``) and the guider's output samples."""
    seen = []
    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"),
                                             "normal", steps).cpu()
    noise = comfy.sample.prepare_noise(latent, seed)
    out = guider.sample(noise, latent, comfy.samplers.sampler_object(sampler), sigmas, disable_pbar=True, seed=seed,
                        callback=lambda i, denoised, x, total: seen.append(denoised.clone()))
    return seen, out


def test_w_r_one_is_the_core_cfg_one_on_the_patched_model_exactly(sd15):
    model, pos, neg, patched = sd15
    interleaved = icfg.InterleavedCFGGuider(patched, w_r=1.0, p_r=1.0)
    interleaved.set_conds(pos, neg)
    interleaved.set_cfg(5.0)  # w_c does not enter Eq. 4
    core = comfy.samplers.CFGGuider(patched)
    core.set_conds(pos, neg)
    core.set_cfg(1.0)
    counter = tm.UNetItemCounter(model)
    ours, ours_out = predictions_of(interleaved, tm.latent(3))
    counter.close()
    theirs, theirs_out = predictions_of(core, tm.latent(3))
    assert interleaved.choices == [4] * 3
    assert counter.items == [2] * 3  # the conditional item and the reference: no "none" branch at w_r = 1
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs)) and torch.equal(ours_out, theirs_out)


def test_w_r_zero_is_the_unpatched_models_conditional_prediction(sd15, monkeypatch):
    model, pos, neg, patched = sd15
    guider = icfg.InterleavedCFGGuider(patched, w_r=0.0, p_r=1.0)
    guider.set_conds(pos, neg)
    guider.set_cfg(5.0)
    calls = []
    original = guider.predict_noise

    def spy(x, timestep, model_options={}, seed=None):
        out = original(x, timestep, model_options=model_options, seed=seed)
        calls.append((x.clone(), timestep.clone(), out.clone()))
        return out

    monkeypatch.setattr(guider, "predict_noise", spy)
    predictions_of(guider, tm.latent(3))
    assert guider.choices == [4] * 3 and len(calls) == 3
    for x, sigma, prediction in calls:
        # Direct call of the unpatched model: its conditional denoised prediction at the same input.
        with torch.no_grad():
            direct = model.model.apply_model(x, sigma, c_crossattn=pos[0][0])
        # In the guider's call the "none" row shares a batch with the reference rows (another matmul shape).
        assert_network_outputs_close(prediction, direct, model.model.diffusion_model)
