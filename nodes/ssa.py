"""Self-Subject-Attention (DreamTuner): node glue over dreamtuner_core.ssa (installed by ssa.install)."""

from ..dreamtuner_core.ssa.install import apply_self_subject_attention
from ..dreamtuner_core.references import MASK_MODES, MASK_SUBJECT_IS_ONE
from ..dreamtuner_core.ssa.joint import POSITIONS

CATEGORY = "DreamTuner"


class SelfSubjectAttentionPatch:
    """Lets the generated image's self-attention look at a reference image (DreamTuner Eq. 3)."""

    DESCRIPTION = (
        "DreamTuner self-subject-attention: every self-attention layer of the UNet also attends to the "
        "reference image's features (noised to the current step and passed through the same UNet), so "
        "the generated image takes on the subject's appearance. Training-free; wire it between the "
        "checkpoint loader (and LoRAs) and the sampler. Supports SD1.x, SD2.x and SDXL, and (on a current "
        "ComfyUI) Flux.1 and SD3/SD3.5, where the generated image tokens of each joint-attention block read the "
        "reference's image tokens; text tokens are unchanged."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to patch. It is cloned; the input model is not changed."}),
                "reference": ("LATENT", {"tooltip": (
                    "The subject image encoded with VAEEncode (same VAE as the model). A batch of several "
                    "latents gives several references that are attended together (e.g. first and previous "
                    "frame). Any size; it need not match the generated size.")}),
                "omega_ref": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 20.0, "step": 0.1, "tooltip": (
                    "Reference weight omega_ref: how strongly the reference's subject tokens are attended "
                    "(Eq. 3 adds log(omega_ref) to their attention scores). 0 turns the patch off. Paper: "
                    "3.0 for natural images, 2.5 for anime; too high lowers quality, too low loses identity.")}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": (
                    "Fraction of the sampling schedule at which the reference starts being attended.")}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": (
                    "Fraction of the sampling schedule after which the reference is no longer attended.")}),
            },
            "optional": {
                "reference_mask": ("MASK", {"tooltip": (
                    "Where the subject is in the reference (any size; resized to every layer). Background "
                    "tokens are never attended, so a white or busy background does not leak into the result. "
                    "One mask for all references or one per reference. Not connected: the whole reference "
                    "is attended. A mask that selects nothing is an error.")}),
                "mask_mode": (list(MASK_MODES), {"default": MASK_SUBJECT_IS_ONE, "tooltip": (
                    "What 1 means in reference_mask. LoadImage's MASK output is 1 on transparent pixels, "
                    "i.e. the background of a cut-out PNG: choose 'background is 1 (LoadImage alpha)' "
                    "for it. Masks from segmentation nodes are usually 'subject is 1'.")}),
                "reference_conditioning": ("CONDITIONING", {"tooltip": (
                    "Text for the reference pass, e.g. a caption of the reference image. Not connected: "
                    "the positive prompt being sampled is used, and cond and uncond share one reference pass.")}),
                "blocks": ("STRING", {"default": "all", "multiline": False, "tooltip": (
                    "Which UNet self-attention layers read the reference: 'all', or a comma list of "
                    "kinds (input, middle, output), blocks (output.4) or layers (output.4.1). Flux: double, "
                    "single, double.3, single.10-20; SD3: joint, joint.5-12.")}),
                "reference_seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": (
                    "Seed of the noise added to the reference; the same noise is used at every step.")}),
                # last, and optional: a workflow saved before this widget existed loads with its default
                "positions": (list(POSITIONS), {"default": POSITIONS[0], "tooltip": (
                    "Flux only: where the reference's tokens sit in the rotary positions. 'offset' (default): "
                    "on a grid beside the generated one, as the host's own reference-latent models place their "
                    "references, so the subject is not pulled to where it sits in the reference. 'shared': on "
                    "the generated image's own grid, which tends to ghost the reference's layout into the "
                    "image. SD3/SD3.5 (positions added before the first block) and UNets ignore it.")}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A clone of the model with self-subject-attention; chain more references by adding "
                       "another Self-Subject-Attention node after this one.",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY

    def patch(self, model, reference, omega_ref, start_percent, end_percent, reference_mask=None,
              mask_mode=MASK_SUBJECT_IS_ONE, reference_conditioning=None, blocks="all", reference_seed=0,
              positions=POSITIONS[0]):
        context = reference_conditioning[0][0] if reference_conditioning else None
        return (apply_self_subject_attention(
            model, reference["samples"], omega_ref=omega_ref, reference_mask=reference_mask,
            mask_mode=mask_mode, reference_context=context, start_percent=start_percent,
            end_percent=end_percent, blocks=blocks, seed=reference_seed, positions=positions),)
