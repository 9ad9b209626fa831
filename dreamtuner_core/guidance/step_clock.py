"""Which sampler step each model evaluation belongs to (Eq. 6 draws one lambda per step, not per evaluation).

Heun, DPM2, the SDE and other multi-stage samplers evaluate the model more than
once per step; :class:`StepClock` says which step an evaluation belongs to, from
a dry run of the sampler on a stand-in model (:class:`_Probe`).
"""

from __future__ import annotations

import logging
import math

import torch


def lambda_draws(seed, steps):
    """Eq. 6's lambda of each step: draw ``i`` of a CPU generator seeded by the sampler seed."""
    generator = torch.Generator().manual_seed(int(seed or 0))
    return [float(torch.rand((), generator=generator)) for _ in range(steps)]


def interval_step(sigmas, sigma):
    """The step whose interval ``(sigmas[i + 1], sigmas[i]]`` holds ``sigma`` (0 above the first)."""
    steps = len(sigmas) - 1
    return min(sum(1 for s in sigmas[1:steps] if s >= sigma), max(steps - 1, 0))


class _Probe:
    """Stands in for the guider in a dry run of the sampler: records evaluations and step callbacks.

    It has what samplers read from the model they are given (``inner_model``,
    ``model_patcher``) and predicts zeros.
    """

    def __init__(self, model_patcher):
        self.model_patcher = model_patcher
        self.inner_model = model_patcher.model
        self.events = []

    def __call__(self, x, sigma, model_options=None, seed=None, **kwargs):
        self.events.append(("eval", float(torch.as_tensor(sigma).max())))
        return torch.zeros_like(x)

    def callback(self, step, *args):
        self.events.append(("step", int(step)))


def steps_from_events(events, steps):
    """The step of each evaluation from a run's evaluations and step callbacks, or None.

    Every sampler of the host calls back once per step, right after the step's
    first evaluation (it reports that evaluation's prediction); the step's other
    evaluations (Heun's corrector, DPM2's midpoint, an SDE stage) follow the
    callback. So the evaluation just before callback ``i`` opens step ``i`` and
    every evaluation up to the next opening belongs to it. Returns None when the
    callbacks are not exactly 0, 1, ..., steps - 1 (adaptive samplers such as
    dpm_adaptive and dpm_fast have steps of their own).
    """
    owners, current, opened = [], 0, 0
    for kind, value in events:
        if kind == "eval":
            owners.append(current)
        else:
            if value != opened or not owners:
                return None
            owners[-1] = current = value
            opened += 1
    return owners if opened == steps else None


class StepClock:
    """Which sampler step each model evaluation belongs to.

    A sampler step cannot be told from one evaluation: Heun's corrector runs at
    the next step's sigma, before that step begins. The clock therefore runs the
    sampler once beforehand on a one-pixel latent with a stand-in model that
    predicts zeros (no UNet work; the global RNG is restored) and records where
    its step callbacks fall among the evaluations (:func:`steps_from_events`).
    During sampling, evaluation ``k`` belongs to the step recorded for it as
    long as its sigma is the recorded one. Where the sampler cannot be dry-run,
    its steps are adaptive, or an evaluation leaves the recorded path, the
    evaluation's step is the schedule interval that holds its sigma
    (:func:`interval_step`): right for single-evaluation and midpoint samplers,
    while Heun's corrector would then take the next step's lambda.
    """

    def __init__(self, sigmas):
        self.sigmas = [float(s) for s in sigmas]
        self.recorded = None  # [(sigma, step)] of the dry run
        self.count = 0
        self.fallback = False

    @property
    def steps(self):
        return max(len(self.sigmas) - 1, 0)

    def learn(self, sampler, model_patcher, noise, latent_image, seed):
        if self.steps == 0:
            return
        probe = _Probe(model_patcher)
        try:
            buffers = list(model_patcher.get_model_object("model_sampling").buffers())
            device = buffers[0].device if buffers else torch.device("cpu")
            corner = (slice(0, 1), slice(None)) + tuple(slice(0, 1) for _ in noise.shape[2:])
            tiny_noise = noise[corner].to(device)
            tiny_latent = latent_image[corner].to(device=device, dtype=tiny_noise.dtype)
            sigmas = torch.tensor(self.sigmas, dtype=torch.float32, device=device)
            cuda = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda), torch.no_grad():
                sampler.sample(probe, sigmas, {"model_options": {}, "seed": seed}, probe.callback, tiny_noise,
                               tiny_latent, None, True)
        except Exception as error:  # a sampler that cannot run on the stand-in: per-interval steps
            logging.info("interleaved guidance: the sampler could not be dry-run (%s); lambda is drawn per "
                         "schedule interval", error)
            return
        owners = steps_from_events(probe.events, self.steps)
        if owners is not None:
            self.recorded = [(sigma, step) for (_, sigma), step in
                             zip([e for e in probe.events if e[0] == "eval"], owners)]

    def step_of(self, sigma):
        """The step of the next evaluation, at ``sigma``."""
        k, self.count = self.count, self.count + 1
        if not self.fallback and self.recorded is not None and k < len(self.recorded):
            recorded_sigma, step = self.recorded[k]
            if math.isclose(recorded_sigma, sigma, rel_tol=1e-3, abs_tol=1e-6):
                return step
        self.fallback = True
        return interval_step(self.sigmas, sigma)
