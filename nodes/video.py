"""DreamTuner Video Sequence: node glue over dreamtuner_core.video (paper Fig. 9)."""

from ..dreamtuner_core.host import execution_blocker
from ..dreamtuner_core.video import NOISE_INDEPENDENT, NOISE_MODES, SequenceSettings, generate_sequence

CATEGORY = "DreamTuner"


def _samplers():
    import comfy.samplers

    return list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)


class VideoSequence:
    """Generates a pose sequence frame by frame, each frame reading the first and previous frames (DreamTuner Fig. 9)."""

    DESCRIPTION = (
        "DreamTuner subject-driven video (paper Fig. 9): samples one frame per control image (e.g. a pose "
        "sequence) with the model as wired (its Self-Subject-Attention, subject encoder, LoRAs), then adds the "
        "first frame and the previous frame(s) as references of self-subject-attention to every next frame, "
        "so the frames keep the subject and each other. The loop a graph cannot express, in one node.")

    @classmethod
    def INPUT_TYPES(cls):
        samplers, schedulers = _samplers()
        return {
            "required": {
                "model": ("MODEL", {"tooltip": (
                    "The model carrying the subject: Self-Subject-Attention on the subject image, optionally "
                    "ApplySubjectEncoder and LoRAs. Not changed; each frame gets a clone with its frame references.")}),
                "positive": ("CONDITIONING", {"tooltip": "The prompt of every frame (without ControlNet: the "
                                                         "node applies the control images frame by frame)."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt of every frame."}),
                "control_net": ("CONTROL_NET", {"tooltip": (
                    "The ControlNet the control images drive (e.g. an OpenPose ControlNet for a pose sequence), "
                    "from the core ControlNet loader.")}),
                "control_images": ("IMAGE", {"tooltip": (
                    "One control image per frame, in order (a batch: a folder of poses, or a video's frames "
                    "from GetVideoComponents). Count must equal frames. Same size as the frames, or the same "
                    "aspect ratio (scaled by the ControlNet as Apply ControlNet does); another shape is an error.")}),
                "control_strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip": (
                    "ControlNet strength for every frame, as in Apply ControlNet. 0 switches the control off.")}),
                "frames": ("INT", {"default": 8, "min": 1, "max": 4096, "tooltip": (
                    "How many frames to generate: one per control image.")}),
                "width": ("INT", {"default": 512, "min": 8, "max": 8192, "step": 8, "tooltip": (
                    "Frame width in pixels (a multiple of 8). Not used when a latent is connected.")}),
                "height": ("INT", {"default": 512, "min": 8, "max": 8192, "step": 8, "tooltip": (
                    "Frame height in pixels (a multiple of 8). Not used when a latent is connected.")}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "The noise seed (frame i uses seed + i when noise is 'independent')."}),
                "noise": (list(NOISE_MODES), {"default": NOISE_INDEPENDENT, "tooltip": (
                    "How the frames' starting noise relates: 'independent' gives frame i the noise of seed + i; "
                    "'shared' gives every frame the noise of seed (steadier backgrounds, poses still move).")}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "Sampling steps per frame."}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale, as in KSampler."}),
                "sampler_name": (samplers, {"tooltip": "The host's sampler, as in KSampler."}),
                "scheduler": (schedulers, {"tooltip": "The host's scheduler, as in KSampler."}),
                "previous_frames": ("INT", {"default": 1, "min": 0, "max": 16, "tooltip": (
                    "How many frames before each frame it reads as references (the paper: 1). Each adds one "
                    "reference row to every model call; 0 reads only the first frame.")}),
                "frame_omega_ref": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 20.0, "step": 0.1, "tooltip": (
                    "omega_ref (Eq. 3) of the first and previous frames as references: how strongly they are "
                    "attended. 0 samples every frame on its own (the subject references on the model still act).")}),
                "first_frame_reference": ("BOOLEAN", {"default": True, "tooltip": (
                    "Every frame also reads frame 1 (the paper), which holds the subject steady over long "
                    "sequences. Off: only the previous frame(s).")}),
            },
            "optional": {
                "latent": ("LATENT", {"tooltip": (
                    "Gives the frames' size (and with denoise < 1, their start): one latent for all frames or one "
                    "per frame. Not connected: zeros of width x height.")}),
                "vae": ("VAE", {"tooltip": "Connect to get the IMAGE output (the frames decoded one by one)."}),
                "first_frame": ("LATENT", {"tooltip": (
                    "A keyframe latent (VAEEncode of this model's VAE) read by every frame in place of generated "
                    "frame 1, when first_frame_reference is on.")}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": (
                    "As in KSampler: below 1 keeps part of the connected latent (e.g. a video's frames).")}),
                "control_start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                                    "tooltip": "When the ControlNet starts acting, as in Apply ControlNet."}),
                "control_end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                                  "tooltip": "When the ControlNet stops acting, as in Apply ControlNet."}),
                "reference_seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": (
                    "Seed of the noise the frame references are noised with (fixed for a frame's steps).")}),
            },
        }

    RETURN_TYPES = ("LATENT", "IMAGE")
    RETURN_NAMES = ("latent", "images")
    OUTPUT_TOOLTIPS = ("The frames as one LATENT batch, in order.",
                       "The frames decoded with the VAE (only when a VAE is connected).")
    FUNCTION = "generate"
    CATEGORY = CATEGORY

    def generate(self, model, positive, negative, control_net, control_images, control_strength, frames, width,
                 height, seed, noise, steps, cfg, sampler_name, scheduler, previous_frames, frame_omega_ref,
                 first_frame_reference, latent=None, vae=None, first_frame=None, denoise=1.0,
                 control_start_percent=0.0, control_end_percent=1.0, reference_seed=0):
        settings = SequenceSettings(
            frames=frames, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler, seed=seed,
            noise_mode=noise, denoise=denoise, previous_frames=previous_frames, frame_omega_ref=frame_omega_ref,
            first_frame_reference=first_frame_reference, reference_seed=reference_seed,
            control_strength=control_strength, control_start=control_start_percent, control_end=control_end_percent)
        result = generate_sequence(model, positive, negative, control_net, control_images, settings, width=width,
                                   height=height, latent=latent,
                                   anchor=None if first_frame is None else first_frame["samples"], vae=vae)
        images = result.images
        if images is None:
            images = execution_blocker("DreamTuner Video Sequence: connect a VAE to its vae input to get images "
                                      "(or decode its latent output with VAEDecode).")
        return ({"samples": result.latents}, images)
