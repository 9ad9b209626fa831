"""The frozen host models of a run, loaded by the host's own loaders.

Frozen: the SD1.x UNet, VAE and CLIP text encoder of the user's checkpoint
(``comfy.sd.load_checkpoint_guess_config``), a depth ControlNet
(``comfy.controlnet.load_controlnet``) fed each image's depth map, and the CLIP
vision model (``comfy.clip_vision.load``).
"""

from __future__ import annotations

import inspect
import os
from collections import OrderedDict

import torch

from ..errors import DreamTunerInputError


class FrozenModels:
    """The frozen host models of a run, loaded by the host's own loaders, all ``requires_grad=False``."""

    def __init__(self, config, device, text_conditioning=None):
        """``text_conditioning``: caption -> [1, tokens, context] in place of the checkpoint's CLIP text encoder.

        Only for hosts that cannot build that encoder: the PyPI ``comfy`` core (notcomfy)
        ships without CLIP-L's config and tokenizer files, so the CPU tests pass a fixed
        caption embedding there. Runs with ComfyUI's own ``comfy`` use the checkpoint's encoder.
        """
        import comfy.clip_vision
        import comfy.controlnet
        import comfy.sd

        for name in ("checkpoint", "controlnet", "clip_vision"):
            if not os.path.isfile(getattr(config, name)):
                raise DreamTunerInputError(f"--{name.replace('_', '-')} '{getattr(config, name)}' is not a file.")
        # fp32 weights: the frozen parts stay exact master copies; bf16 autocast casts per op.
        try:
            loaded = comfy.sd.load_checkpoint_guess_config(
                config.checkpoint, output_vae=True, output_clip=text_conditioning is None, output_clipvision=False,
                model_options={"dtype": torch.float32})
        except FileNotFoundError as error:
            raise DreamTunerInputError(
                f"this comfy package cannot build the checkpoint's CLIP text encoder ({error}); run the script with "
                "ComfyUI's own Python from the ComfyUI folder.") from None
        self.patcher, self.clip, self.vae = loaded[0], loaded[1], loaded[2]
        self.text_conditioning = text_conditioning
        if self.patcher is None or self.vae is None or (self.clip is None and text_conditioning is None):
            raise DreamTunerInputError(f"--checkpoint '{config.checkpoint}' is not a full SD checkpoint "
                                       "(UNet, CLIP text encoder and VAE in one file).")
        self.base = self.patcher.model
        self.controlnet = comfy.controlnet.load_controlnet(config.controlnet)
        if self.controlnet is None or not hasattr(self.controlnet, "control_model"):
            raise DreamTunerInputError(f"--controlnet '{config.controlnet}' is not a ControlNet the host can load.")
        self.clip_vision = load_clip_vision(config.clip_vision, config.clip_vision_config)
        self.device = device
        self.base.to(device)
        self.controlnet.control_model.to(device)
        for module in self.frozen_modules().values():
            module.requires_grad_(False).eval()
        self._text = OrderedDict()
        self._get_control_takes_options = "transformer_options" in inspect.signature(
            self.controlnet.get_control).parameters

    def frozen_modules(self):
        modules = {"unet": self.base.diffusion_model, "controlnet": self.controlnet.control_model,
                   "clip_vision": self.clip_vision.model, "vae": self.vae.first_stage_model}
        if self.clip is not None:
            modules["text_encoder"] = self.clip.cond_stage_model
        return modules

    def text(self, caption: str):
        """The caption's CLIP text conditioning [1, 77, dim] (a small LRU cache: captions repeat)."""
        if caption not in self._text:
            with torch.no_grad():
                if self.text_conditioning is not None:
                    cond = self.text_conditioning(caption)
                else:
                    cond = self.clip.encode_from_tokens(self.clip.tokenize(caption))
                self._text[caption] = cond.float().to(self.device)
            if len(self._text) > 4096:
                self._text.popitem(last=False)
        self._text.move_to_end(caption)
        return self._text[caption]

    def control(self, x_noisy, sigma, context, depth, strength, transformer_options):
        """The depth ControlNet's residuals for this batch, as the host's sampler computes them."""
        control = self.controlnet.copy().set_cond_hint(depth, strength, (0.0, 1.0))
        control.pre_run(self.base, self.base.model_sampling.percent_to_sigma)
        args = (x_noisy, sigma, {"c_crossattn": context}, 1)
        if self._get_control_takes_options:
            args += (transformer_options,)
        try:
            with torch.no_grad():
                return control.get_control(*args)
        finally:
            control.cleanup()


def load_clip_vision(path, config_path=None):
    """The host's CLIP vision model: ``comfy.clip_vision.load``, or its class from a config JSON.

    The config route exists for CLIP vision files whose shape the host's loader
    does not recognise by key names (e.g. small test models); both give the host's
    ``ClipVisionModel``, so the features are the ones ApplySubjectEncoder computes.
    """
    import comfy.clip_vision
    import comfy.utils

    if config_path:
        model = comfy.clip_vision.ClipVisionModel(config_path)
        missing, _ = model.load_sd(comfy.utils.load_torch_file(path, safe_load=True))
        if missing:
            raise DreamTunerInputError(f"--clip-vision '{path}' lacks {len(missing)} tensors of the model "
                                       f"--clip-vision-config describes (e.g. {missing[0]}).")
        return model
    try:
        model = comfy.clip_vision.load(path)
    except FileNotFoundError as error:  # the PyPI comfy core ships without the CLIP vision config files
        raise DreamTunerInputError(
            f"this comfy package cannot build the model of --clip-vision '{path}' ({error}); run the script with "
            "ComfyUI's own Python from the ComfyUI folder, or give --clip-vision-config.") from None
    if model is None:
        raise DreamTunerInputError(f"--clip-vision '{path}' is not a CLIP vision model the host recognises "
                                   "(use OpenCLIP ViT-H/14, or give --clip-vision-config).")
    return model
