"""Interleaved CFG (DreamTuner): a KSampler drop-in and a GUIDER for SamplerCustomAdvanced; node glue over
dreamtuner_core.guidance."""

import comfy.samplers
import comfy.utils

from ..dreamtuner_core.guidance.interleaved_cfg import InterleavedCFGGuider as Guider
from ..dreamtuner_core.guidance.interleaved_cfg import check_settings, sample_interleaved

CATEGORY = "DreamTuner"

GUIDANCE_INPUTS = {
    "w_r": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 100.0, "step": 0.1, "round": 0.01, "tooltip": (
        "-1: same as cfg (the paper's setting). Otherwise the reference guidance scale w_r (Eq. 4): how "
        "strongly self-subject-attention pulls toward the subject, against the same prompt without it. "
        "1 = no extra pull; values below 1 weaken the reference, 0 removes it in Eq. 4 steps. "
        "Guidance-distilled models (Flux dev, sampled at cfg 1): -1 means 1 there, so give w_r itself "
        "(e.g. 2): each Eq. 4 step then costs one more row, the prompt without the reference.")}),
    "p_r": ("FLOAT", {"default": 0.9, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
        "Probability of using reference guidance (Eq. 4) at a step; otherwise text guidance (Eq. 5) "
        "is used, drawn once per sampler step (all model evaluations of a Heun or DPM2 step use the same "
        "equation). Paper: 0.9. 1 = always Eq. 4 (negative unused); 0 = always Eq. 5 (plain CFG with "
        "self-subject-attention on both branches).")}),
    "delta_t": ("INT", {"default": 0, "min": 0, "max": 999, "tooltip": (
        "dt: the conditional branch reads the reference noised to timestep t - dt (less noise), in steps "
        "of the model's 1000-step schedule; clamped to the schedule. 0 = the step's own noise level.")}),
    "delta_t_prime": ("INT", {"default": 0, "min": 0, "max": 999, "tooltip": (
        "dt': the unconditional branch of Eq. 5 reads the reference noised to timestep t + dt' (more "
        "noise); clamped to the schedule. 0 = the step's own noise level, shared with the conditional "
        "branch (cheapest).")}),
}
OPTIONAL_INPUTS = {
    "none_disables_subject_encoder": ("BOOLEAN", {"default": False, "tooltip": (
        "In Eq. 4 the second branch runs without self-subject-attention. On: it also runs without the "
        "subject encoder (if one is applied). Off (METHOD.md default): the subject encoder stays on.")}),
}
CFG_INPUT = ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                       "tooltip": "Text guidance scale w_c (Eq. 5), the usual CFG."})
MODEL_TOOLTIP = ("A model with Self-Subject-Attention (DreamTuner) applied; interleaved guidance switches "
                 "it on and off per evaluation.")


class InterleavedCFGSampler:
    """KSampler with DreamTuner's interleaved classifier-free guidance (Eq. 4-6)."""

    DESCRIPTION = ("A KSampler whose guidance alternates at random between reference guidance (Eq. 4, "
                   "probability p_r) and text guidance (Eq. 5), as DreamTuner samples. Needs a model with "
                   "Self-Subject-Attention (DreamTuner).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": MODEL_TOOLTIP}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Seed of the noise and of the per-step choice between Eq. 4 and Eq. 5."}),
                "steps": ("INT", {"default": 30, "min": 1, "max": 10000, "tooltip": "Number of denoising steps."}),
                "cfg": CFG_INPUT,
                "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"tooltip": "The sampling algorithm, as in KSampler."}),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"tooltip": "The noise schedule, as in KSampler."}),
                "positive": ("CONDITIONING", {"tooltip": "The prompt (text c), e.g. with the subject in a new scene."}),
                "negative": ("CONDITIONING", {"tooltip": (
                    "The negative prompt (uc) of Eq. 5. Needed unless p_r is 1; an empty prompt works.")}),
                "latent_image": ("LATENT", {"tooltip": "The latent to denoise (EmptyLatentImage, or an encoded "
                                                       "image with denoise < 1; a noise mask is honoured)."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
                    "How much of the schedule is run; below 1 keeps part of the input latent.")}),
                **GUIDANCE_INPUTS,
            },
            "optional": OPTIONAL_INPUTS,
        }

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
               denoise, w_r, p_r, delta_t, delta_t_prime, none_disables_subject_encoder=False):
        callback = _preview_callback(model, steps)
        latent, _ = sample_interleaved(
            model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=denoise,
            w_r=w_r, p_r=p_r, delta_t=delta_t, delta_t_prime=delta_t_prime,
            none_disables_encoder=none_disables_subject_encoder, callback=callback,
            disable_pbar=not getattr(comfy.utils, "PROGRESS_BAR_ENABLED", True))
        return (latent,)


class InterleavedCFGGuider:
    """DreamTuner's interleaved guidance as a GUIDER for SamplerCustomAdvanced."""

    DESCRIPTION = ("Interleaved classifier-free guidance (Eq. 4-6) as a GUIDER: use it with "
                   "SamplerCustomAdvanced and any SAMPLER, SIGMAS and NOISE. The per-step choice is "
                   "seeded by the NOISE's seed.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": MODEL_TOOLTIP}),
                "positive": ("CONDITIONING", {"tooltip": "The prompt (text c), e.g. the subject in a new scene."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt (uc) of Eq. 5; needed unless p_r is 1."}),
                "cfg": CFG_INPUT,
                **GUIDANCE_INPUTS,
            },
            "optional": OPTIONAL_INPUTS,
        }

    RETURN_TYPES = ("GUIDER",)
    OUTPUT_TOOLTIPS = ("A guider for SamplerCustomAdvanced.",)
    FUNCTION = "get_guider"
    CATEGORY = CATEGORY

    def get_guider(self, model, positive, negative, cfg, w_r, p_r, delta_t, delta_t_prime,
                   none_disables_subject_encoder=False):
        check_settings(model, negative, p_r, w_r, cfg, delta_t, delta_t_prime)
        guider = Guider(model, w_r=w_r, p_r=p_r, delta_t=delta_t, delta_t_prime=delta_t_prime,
                        none_disables_encoder=none_disables_subject_encoder)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return (guider,)


def _preview_callback(model, steps):
    """The host's latent preview and progress bar (``latent_preview`` exists only inside ComfyUI)."""
    try:
        import latent_preview
    except ImportError:
        return None
    return latent_preview.prepare_callback(model, steps)
