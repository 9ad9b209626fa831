"""Interleaved classifier-free guidance, paper 3.2, Eq. 4-6.

With ``e(x_t, c, ref@s)`` the model's prediction for text ``c`` whose
self-subject-attention reads the reference noised to timestep ``s``, and
``none`` meaning self-subject-attention off for that evaluation:

    Eq. 4  e_r = w_r * e(x_t, c, ref@t-dt) - (w_r - 1) * e(x_t, c, none)
    Eq. 5  e_c = w_c * e(x_t, c, ref@t-dt) - (w_c - 1) * e(x_t, uc, ref@t+dt')
    Eq. 6  lambda ~ U(0, 1) at each step: Eq. 4 if lambda <= p_r, else Eq. 5.

One lambda per sampler step. Heun, DPM2, the SDE and other multi-stage
samplers evaluate the model more than once per step; every evaluation of a
step uses that step's equation (:class:`~.step_clock.StepClock` says which step an
evaluation belongs to, :mod:`.step_clock`). Step ``i``'s lambda is the ``i``-th draw of a
generator seeded by the sampler seed, so a run is reproducible and its
equations do not depend on how many evaluations a step makes.

Prediction space. The host evaluates the model as denoised predictions
``D = x - sigma * eps`` (``calc_cond_batch``) and combines them in
``cfg_function``; both equations are of the form ``w * a - (w - 1) * b`` whose
weights sum to one, so for the shared ``x`` and ``sigma`` of one step
``w * D_a - (w - 1) * D_b = x - sigma * (w * eps_a - (w - 1) * eps_b)``: the
combination is the same in eps and in denoised space. Each equation is
therefore one call of the host's ``cfg_function`` with (cond, uncond, scale)
= (ref@t-dt, none, w_r) or (ref@t-dt, uc@t+dt', w_c), so ``sampler_cfg_function``
and post-CFG functions of other nodes, noise masks, denoise < 1 and every
sampler keep working.

Reference noise levels: ``t - dt`` and ``t + dt'`` are timesteps of the
model's own ``model_sampling`` (0..999 for SD), clamped to its schedule; an
offset of 0 reads the reference at the step's own sigma. Evaluations that
share a level share the reference features (:mod:`..ssa.reference_rows`).
"""

from __future__ import annotations

import math

import torch

import comfy.model_management
import comfy.samplers

from ..errors import DreamTunerInputError
from ..keys import ENCODER_OFF_KEY, PLAN_KEY, STATE_KEY
from ..ssa.cache import end_of_run
from .step_clock import StepClock, lambda_draws

EQ4, EQ5 = 4, 5
# The w_r widget value meaning "the same as cfg" (the paper's setting).
SAME_AS_CFG = -1.0


def resolve_w_r(w_r, cfg):
    """w_r as used in Eq. 4: None or -1 mean the text guidance scale ``cfg``."""
    return float(cfg) if w_r is None or w_r == SAME_AS_CFG else float(w_r)


def interleaved_cfg(lam, p_r, w_r, w_c, evaluate, combine, skip_unit_scale=True):
    """Eq. 6 chooses between Eq. 4 and Eq. 5 and combines the evaluations.

    evaluate(pairs) -> predictions, one per (text, reference) pair, text in
        {"positive", "negative"}, reference in {"t-dt", "t+dt'", None}; a pair
        that is None is not evaluated and its prediction is zeros (as the host's
        ``calc_cond_batch`` does for a missing conditioning);
    combine(a, b, w) -> ``w * a - (w - 1) * b`` (the host's CFG).
    skip_unit_scale: at w_r = 1 Eq. 4 is ``e(x_t, c, ref)`` alone, so, as the
        host does for CFG 1, the ``none`` branch is not evaluated (the result is
        then exactly the host's CFG 1 on the patched model); likewise Eq. 5 at w_c = 1.

    Two kinds of model. True CFG (SD, SD3, Flux with true CFG > 1): every step evaluates two
    conditionings plus the reference rows (Eq. 4: c with and without the reference; Eq. 5: c and uc).
    Guidance-distilled (Flux dev: the guidance scale is an input of the model, FluxGuidance, and CFG
    is 1): Eq. 5 is the positive alone (one row), and reference guidance needs its own evaluation
    without the reference, so Eq. 4 with w_r > 1 costs one more row: give w_r explicitly there (its
    default, the same as cfg, is 1 at CFG 1, which is no reference guidance).
    Returns (prediction, equation number).
    """
    if lam <= p_r:  # Eq. 4: reference guidance against the same text without self-subject-attention
        if skip_unit_scale and math.isclose(w_r, 1.0):
            e_ref, zeros = evaluate([("positive", "t-dt"), None])
            return combine(e_ref, zeros, 1.0), EQ4
        e_ref, e_none = evaluate([("positive", "t-dt"), ("positive", None)])
        return combine(e_ref, e_none, w_r), EQ4
    # Eq. 5: text guidance, the unconditional branch reading a noisier reference. At w_c = 1 (a
    # guidance-distilled model such as Flux dev, sampled at CFG 1) it is ``e(x_t, c, ref)`` alone.
    if skip_unit_scale and math.isclose(w_c, 1.0):
        e_ref, zeros = evaluate([("positive", "t-dt"), None])
        return combine(e_ref, zeros, 1.0), EQ5
    e_ref, e_uncond = evaluate([("positive", "t-dt"), ("negative", "t+dt'")])
    return combine(e_ref, e_uncond, w_c), EQ5


def offset_sigma(model_sampling, sigma: torch.Tensor, dt: float) -> torch.Tensor:
    """The sigma of timestep ``t + dt`` for the step at ``sigma``, clamped to the model's schedule."""
    if dt == 0:
        return sigma
    t = model_sampling.timestep(sigma).float() + dt
    t_min = model_sampling.timestep(torch.as_tensor(model_sampling.sigma_min)).float()
    t_max = model_sampling.timestep(torch.as_tensor(model_sampling.sigma_max)).float()
    return model_sampling.sigma(torch.clamp(t, t_min.to(t), t_max.to(t))).to(sigma)


def check_settings(model_patcher, negative, p_r, w_r, w_c, delta_t, delta_t_prime):
    state = model_patcher.model_options.get("transformer_options", {}).get(STATE_KEY)
    if state is None or not state.references:
        raise DreamTunerInputError(
            "model: interleaved guidance needs a model with self-subject-attention. Add a "
            "'Self-Subject-Attention (DreamTuner)' node between the model loader and this node."
        )
    if not 0.0 <= p_r <= 1.0:
        raise DreamTunerInputError(f"p_r is a probability and must lie in [0, 1]; got {p_r}.")
    if w_c < 0:
        raise DreamTunerInputError(f"cfg must be 0 or more; got {w_c}.")
    if w_r is not None and w_r != SAME_AS_CFG and w_r < 0:
        raise DreamTunerInputError(
            f"w_r must be -1 (the same as cfg, the paper's setting) or 0 or more; got {w_r}.")
    if not negative and p_r < 1.0:
        raise DreamTunerInputError(
            "negative is empty, but Eq. 5 (used with probability 1 - p_r) needs an unconditional branch. "
            "Connect a CLIPTextEncode with an empty or negative prompt (or ConditioningZeroOut), or set p_r to 1.")
    for name, value in (("delta_t", delta_t), ("delta_t_prime", delta_t_prime)):
        if not 0 <= value <= 999:
            raise DreamTunerInputError(
                f"{name} is an offset in timesteps of the 1000-step schedule and must lie in [0, 999]; got {value}.")


class InterleavedCFGGuider(comfy.samplers.CFGGuider):
    """A GUIDER that applies Eq. 4-6, with one lambda draw per sampler step.

    The lambda draws come from a generator seeded with the sampler's seed, so a
    run is reproducible and independent of the global RNG. After a run,
    ``choices`` lists the equation of each model evaluation and ``steps`` the
    sampler step it belonged to. w_r None (or -1) means the same as cfg.
    """

    def __init__(self, model_patcher, w_r=None, p_r=0.9, delta_t=0, delta_t_prime=0, none_disables_encoder=False):
        super().__init__(model_patcher)
        self.w_r = None if w_r is None or w_r == SAME_AS_CFG else float(w_r)
        self.p_r = float(p_r)
        self.delta_t, self.delta_t_prime = float(delta_t), float(delta_t_prime)
        self.none_disables_encoder = bool(none_disables_encoder)
        self.choices, self.steps = [], []
        self._clock, self._draws = StepClock([]), []

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
               disable_pbar=False, seed=None):
        self.choices, self.steps = [], []
        self._clock = StepClock(sigmas.flatten().tolist())
        self._clock.learn(sampler, self.model_patcher, noise, latent_image, seed)
        self._draws = lambda_draws(seed, self._clock.steps)
        try:
            return super().sample(noise, latent_image, sampler, sigmas, denoise_mask=denoise_mask,
                                  callback=callback, disable_pbar=disable_pbar, seed=seed)
        finally:  # the run is over (or failed)
            end_of_run(self.model_patcher)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        positive, negative = self.conds.get("positive"), self.conds.get("negative")
        sampling = self.inner_model.model_sampling
        sigma = timestep.max()
        levels = {"t-dt": float(offset_sigma(sampling, sigma, -self.delta_t)),
                  "t+dt'": float(offset_sigma(sampling, sigma, self.delta_t_prime)), None: None}
        texts = {"positive": positive, "negative": negative}
        last = {}

        def evaluate(pairs):
            conds = [None if pair is None else texts[pair[0]] for pair in pairs]
            options = dict(model_options)
            transformer_options = dict(options.get("transformer_options", {}))
            transformer_options[PLAN_KEY] = {i: levels[pair[1]] for i, pair in enumerate(pairs) if pair is not None}
            if self.none_disables_encoder:
                transformer_options[ENCODER_OFF_KEY] = {
                    i for i, pair in enumerate(pairs) if pair is not None and pair[1] is None}
            options["transformer_options"] = transformer_options
            out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, options)
            for fn in model_options.get("sampler_pre_cfg_function", []):
                out = fn({"conds": conds, "conds_out": out, "cond_scale": self.cfg, "timestep": timestep,
                          "input": x, "sigma": timestep, "model": self.inner_model, "model_options": options})
            last.update(conds=conds, options=options)
            return out

        def combine(a, b, w):
            return comfy.samplers.cfg_function(self.inner_model, a, b, w, x, timestep, model_options=last["options"],
                                               cond=last["conds"][0], uncond=last["conds"][1])

        step = self._clock.step_of(float(sigma))
        lam = self._draws[step] if step < len(self._draws) else lambda_draws(seed, step + 1)[step]
        w_r = self.cfg if self.w_r is None else self.w_r
        skip = not model_options.get("disable_cfg1_optimization", False)
        prediction, equation = interleaved_cfg(lam, self.p_r, w_r, self.cfg, evaluate, combine, skip_unit_scale=skip)
        self.choices.append(equation)
        self.steps.append(step)
        return prediction


def sample_interleaved(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                       denoise=1.0, w_r=None, p_r=0.9, delta_t=0, delta_t_prime=0,
                       none_disables_encoder=False, callback=None, disable_pbar=False):
    """What the core KSampler does, with the interleaved guider in place of plain CFG.

    latent: a LATENT dict (``samples``, optional ``noise_mask`` and ``batch_index``).
    w_r: the reference guidance scale; None or -1 use ``cfg`` (METHOD.md default).
    Returns (LATENT dict, the guider, whose ``choices`` and ``steps`` list the equation and the
    sampler step of each evaluation).
    """
    import comfy.sample

    check_settings(model, negative, p_r, w_r, cfg, delta_t, delta_t_prime)
    latent_image = latent["samples"]
    fix_channels = getattr(comfy.sample, "fix_empty_latent_channels", None)
    if fix_channels is not None:
        latent_image = fix_channels(model, latent_image)
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    ksampler = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                       scheduler=scheduler, denoise=denoise, model_options=model.model_options)
    guider = InterleavedCFGGuider(model, w_r=w_r, p_r=p_r, delta_t=delta_t, delta_t_prime=delta_t_prime,
                                  none_disables_encoder=none_disables_encoder)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    samples = guider.sample(noise, latent_image, comfy.samplers.sampler_object(sampler_name), ksampler.sigmas,
                            denoise_mask=latent.get("noise_mask"), callback=callback, disable_pbar=disable_pbar,
                            seed=seed)
    out = dict(latent)
    out["samples"] = samples.to(comfy.model_management.intermediate_device())
    return out, guider
