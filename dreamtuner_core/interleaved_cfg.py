"""Interleaved classifier-free guidance, paper 3.2, Eq. 4-6.

With ``e(x_t, c, ref@s)`` the model's prediction for text ``c`` whose
self-subject-attention reads the reference noised to timestep ``s``, and
``none`` meaning self-subject-attention off for that evaluation:

    Eq. 4  e_r = w_r * e(x_t, c, ref@t-dt) - (w_r - 1) * e(x_t, c, none)
    Eq. 5  e_c = w_c * e(x_t, c, ref@t-dt) - (w_c - 1) * e(x_t, uc, ref@t+dt')
    Eq. 6  lambda ~ U(0, 1) at each step: Eq. 4 if lambda <= p_r, else Eq. 5.

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
share a level share the reference features (:mod:`.reference_pass`).
"""

from __future__ import annotations

import torch

import comfy.model_management
import comfy.samplers

from .errors import DreamTunerInputError
from .reference_pass import PLAN_KEY, STATE_KEY

EQ4, EQ5 = 4, 5
# Conditionings whose self-subject-attention is off but whose subject encoder should be off too
# (the subject encoder patch reads this set; "none" in Eq. 4 keeps the encoder by default).
ENCODER_OFF_KEY = "dreamtuner_subject_encoder_off"


def interleaved_cfg(lam, p_r, w_r, w_c, evaluate, combine):
    """Eq. 6 chooses between Eq. 4 and Eq. 5 and combines the evaluations.

    evaluate(pairs) -> predictions, one per (text, reference) pair, text in
        {"positive", "negative"}, reference in {"t-dt", "t+dt'", None};
    combine(a, b, w) -> ``w * a - (w - 1) * b`` (the host's CFG).
    Returns (prediction, equation number).
    """
    if lam <= p_r:  # Eq. 4: reference guidance against the same text without self-subject-attention
        e_ref, e_none = evaluate([("positive", "t-dt"), ("positive", None)])
        return combine(e_ref, e_none, w_r), EQ4
    # Eq. 5: text guidance, the unconditional branch reading a noisier reference
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
    if w_r < 0 or w_c < 0:
        raise DreamTunerInputError(f"w_r and cfg must be 0 or more; got w_r={w_r}, cfg={w_c}.")
    if not negative and p_r < 1.0:
        raise DreamTunerInputError(
            "negative is empty, but Eq. 5 (used with probability 1 - p_r) needs an unconditional branch. "
            "Connect a CLIPTextEncode with an empty or negative prompt (or ConditioningZeroOut), or set p_r to 1.")
    for name, value in (("delta_t", delta_t), ("delta_t_prime", delta_t_prime)):
        if not 0 <= value <= 999:
            raise DreamTunerInputError(
                f"{name} is an offset in timesteps of the 1000-step schedule and must lie in [0, 999]; got {value}.")


class InterleavedCFGGuider(comfy.samplers.CFGGuider):
    """A GUIDER that applies Eq. 4-6 at every model evaluation (one lambda draw per evaluation).

    The lambda draws come from a generator seeded with the sampler's seed, so a
    run is reproducible and independent of the global RNG. ``choices`` lists
    the equation used at each evaluation of the last run.
    """

    def __init__(self, model_patcher, w_r=7.0, p_r=0.9, delta_t=0, delta_t_prime=0, none_disables_encoder=False):
        super().__init__(model_patcher)
        self.w_r, self.p_r = float(w_r), float(p_r)
        self.delta_t, self.delta_t_prime = float(delta_t), float(delta_t_prime)
        self.none_disables_encoder = bool(none_disables_encoder)
        self.choices = []
        self._generator = torch.Generator().manual_seed(0)

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
               disable_pbar=False, seed=None):
        self._generator = torch.Generator().manual_seed(int(seed or 0))
        self.choices = []
        try:
            return super().sample(noise, latent_image, sampler, sigmas, denoise_mask=denoise_mask,
                                  callback=callback, disable_pbar=disable_pbar, seed=seed)
        finally:  # the run is over (or failed): free what self-subject-attention kept for it
            state = self.model_patcher.model_options.get("transformer_options", {}).get(STATE_KEY)
            if state is not None:
                state.cache.clear()

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        positive, negative = self.conds.get("positive"), self.conds.get("negative")
        sampling = self.inner_model.model_sampling
        sigma = timestep.max()
        levels = {"t-dt": float(offset_sigma(sampling, sigma, -self.delta_t)),
                  "t+dt'": float(offset_sigma(sampling, sigma, self.delta_t_prime)), None: None}
        texts = {"positive": positive, "negative": negative}
        last = {}

        def evaluate(pairs):
            conds = [texts[text] for text, _ in pairs]
            options = dict(model_options)
            transformer_options = dict(options.get("transformer_options", {}))
            transformer_options[PLAN_KEY] = {i: levels[ref] for i, (_, ref) in enumerate(pairs)}
            if self.none_disables_encoder:
                transformer_options[ENCODER_OFF_KEY] = {i for i, (_, ref) in enumerate(pairs) if ref is None}
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

        lam = float(torch.rand((), generator=self._generator))
        prediction, equation = interleaved_cfg(lam, self.p_r, self.w_r, self.cfg, evaluate, combine)
        self.choices.append(equation)
        return prediction


def sample_interleaved(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                       denoise=1.0, w_r=None, p_r=0.9, delta_t=0, delta_t_prime=0,
                       none_disables_encoder=False, callback=None, disable_pbar=False):
    """What the core KSampler does, with the interleaved guider in place of plain CFG.

    latent: a LATENT dict (``samples``, optional ``noise_mask`` and ``batch_index``).
    w_r: the reference guidance scale; None uses ``cfg`` (METHOD.md default).
    Returns (LATENT dict, the guider, whose ``choices`` list the equation of each evaluation).
    """
    import comfy.sample

    w_r = cfg if w_r is None else w_r
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
