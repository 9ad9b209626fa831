"""Sampling in the world through the host's KSampler path and the pack's nodes; shared by the commands and tests.

A ``Case`` is one held-out subject: a reference render (image, mask, latent through the world's VAE,
the reference's caption) and a prompt (another held-out caption of the same class, in another scene).
``run(case, setting)`` samples the prompt for several seeds with ``comfy.sample.sample`` (what the core
KSampler node calls), after applying the pack's Self-Subject-Attention node when ``setting.omega_ref``
is set, and measures the decoded images.

A ``Setting`` can also describe a deliberately broken use of the method, at seams outside the pack:
``mask="inverted"`` passes 1 - mask (the subject's polarity reversed); ``reference_sigma`` adds noise of
that sigma (in the model's latent units) to the reference latent before it reaches the node, so the
reference the node noises to the current step is always noisier than the generated latent;
``transposed`` transposes the reference latent and its mask (the reference's token grid read the wrong
way round); ``unconditional_reference`` gives the reference pass the empty prompt instead of its caption.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch

from . import generator, host, measures

STEPS = 12
CFG = 4.0
SAMPLER = "euler"
SCHEDULER = "normal"


@dataclasses.dataclass
class Case:
    index: int
    subject: generator.Subject
    reference_caption: generator.Caption
    reference_image: torch.Tensor  # [32, 32, 3] float
    reference_mask: torch.Tensor  # [32, 32] float, 1 = subject
    prompt: generator.Caption


@dataclasses.dataclass(frozen=True)
class Setting:
    omega_ref: float | None = None  # None: plain sampling (no patch)
    mask: str = "subject"  # "subject" | "none" | "inverted"
    reference_sigma: float = 0.0
    p_r: float | None = None  # None: the KSampler path; else the pack's InterleavedCFGSampler node, w_r = cfg
    transposed: bool = False  # broken: the reference latent and mask transposed (its token grid read as W x H)
    unconditional_reference: bool = False  # the reference pass reads the empty prompt (the unconditional row)
    beta: float | None = None  # the pack's ApplySubjectEncoder node with the world's encoder at this beta
    encoder_layers: tuple | None = None  # broken: the encoder reads these CLIP layers, not its own

    @property
    def name(self) -> str:
        if self.omega_ref is None and self.beta is None:
            return "plain"
        parts = []
        if self.omega_ref is not None:
            parts.append(f"ssa w={self.omega_ref:g} mask={self.mask}")
            parts += [f"ref+sigma{self.reference_sigma:g}"] if self.reference_sigma else []
            parts += ["transposed"] if self.transposed else []
            parts += ["ref text=empty"] if self.unconditional_reference else []
        if self.beta is not None:
            parts.append(f"encoder beta={self.beta:g}")
            parts += [f"layers={','.join(map(str, self.encoder_layers))}"] if self.encoder_layers else []
        return " ".join(parts) + (f" interleaved p_r={self.p_r:g}" if self.p_r is not None else "")


def make_case(index: int, seed: int = 1234) -> Case:
    subject = generator.heldout_subjects(index + 1, seed)[index]
    rng = np.random.default_rng(seed * 1000 + index)
    reference_caption = generator.draw_caption(rng, subject.family, heldout=True)
    while True:
        prompt = generator.draw_caption(rng, subject.family, heldout=True)
        if prompt.scene != reference_caption.scene:
            break
    image, mask, _, _ = generator.render(subject, reference_caption, rng)
    return Case(index, subject, reference_caption, torch.from_numpy(image).float() / 255, torch.from_numpy(mask),
                prompt)


def with_reference_of(case: Case, other: Case) -> Case:
    """``case`` (its subject, prompt and measures) with ``other``'s reference: a control, the method shown
    another subject than the one it is scored against."""
    return dataclasses.replace(case, reference_caption=other.reference_caption, reference_image=other.reference_image,
                               reference_mask=other.reference_mask)


def oracle_images(case: Case, n: int) -> torch.Tensor:
    """The generator's own renders of the subject for the prompt (DreamBench's real images)."""
    rng = np.random.default_rng(777 + case.index)
    return torch.stack([torch.from_numpy(generator.render(case.subject, case.prompt, rng)[0]).float() / 255
                        for _ in range(n)])


class World:
    """The shipped models, the text encodings and the pack's nodes, loaded once."""

    def __init__(self, unet_file=None):
        """unet_file: another UNet file to sample with (a diagnosis of a candidate), else the shipped one."""
        host.setup()
        self.unet, self.vae, self.clip = host.world_models(str(unet_file) if unet_file else "unet.safetensors")
        self.nodes = host.nodes()
        self._text = {}

    def text(self, caption_text: str):
        if caption_text not in self._text:
            with torch.no_grad():
                self._text[caption_text] = host.encode_text(self.clip, caption_text)
        return self._text[caption_text]

    def encode(self, images):
        with torch.no_grad():
            return self.vae.encode(images)

    def decode(self, latents):
        with torch.no_grad():
            return self.vae.decode(latents).clamp(0, 1)

    def subject_encoder(self):
        """(the world's pretrained subject encoder, its CLIP_VISION), loaded once."""
        if not hasattr(self, "_encoder"):
            load_encoder = host.pack_module("dreamtuner_core.subject_encoder.file").load_encoder
            self._encoder = (load_encoder(host.MODELS / host.ENCODER_FILE), host.world_clip_vision())
        return self._encoder

    def with_encoder(self, model, case: Case, setting: Setting):
        """The pack's ApplySubjectEncoder node on ``model`` with the reference and its mask."""
        encoder, clip_vision = self.subject_encoder()
        if setting.encoder_layers is not None:  # broken: features of other CLIP layers than it was trained on
            encoder = copy.copy(encoder)
            encoder.config = dataclasses.replace(encoder.config, clip_layers=tuple(setting.encoder_layers))
        node = self.nodes["DreamTunerApplySubjectEncoder"]()
        return getattr(node, node.FUNCTION)(model=model, subject_encoder=encoder, clip_vision=clip_vision,
                                            image=case.reference_image[None], beta=float(setting.beta),
                                            start_percent=0.0, end_percent=1.0, mask=case.reference_mask[None])[0]

    def patched(self, case: Case, setting: Setting):
        """The model for a setting: the pack's ApplySubjectEncoder and SelfSubjectAttention nodes applied to the
        ModelPatcher (each on a clone), as a graph chains them."""
        model = self.unet if setting.beta is None else self.with_encoder(self.unet, case, setting)
        if setting.omega_ref is None:
            return model
        reference = self.encode(case.reference_image[None])
        if setting.reference_sigma:
            g = torch.Generator().manual_seed(99 + case.index)
            scale = self.unet.model.latent_format.scale_factor
            reference = reference + setting.reference_sigma / scale * torch.randn(reference.shape, generator=g)
        mask = case.reference_mask[None]
        if setting.transposed:
            reference, mask = reference.transpose(-1, -2).contiguous(), mask.transpose(-1, -2).contiguous()
        node = self.nodes["DreamTunerSelfSubjectAttention"]()
        text = "" if setting.unconditional_reference else case.reference_caption.text
        kwargs = dict(model=model, reference={"samples": reference}, omega_ref=float(setting.omega_ref),
                      start_percent=0.0, end_percent=1.0, reference_conditioning=self.text(text),
                      reference_seed=case.index)
        if setting.mask == "subject":
            kwargs["reference_mask"] = mask
        elif setting.mask == "inverted":
            kwargs["reference_mask"] = 1.0 - mask
        return getattr(node, node.FUNCTION)(**kwargs)[0]

    def sample(self, model, positive, batch: int, seed: int, steps: int = STEPS, cfg: float = CFG):
        import comfy.sample

        latent = torch.zeros((batch, 4, 16, 16))
        noise = comfy.sample.prepare_noise(latent, seed)
        with torch.no_grad(), host.fast_attention():
            out = comfy.sample.sample(model, noise, steps, cfg, SAMPLER, SCHEDULER, positive, self.text(""), latent,
                                      disable_pbar=True, seed=seed)
        return self.decode(out)

    def sample_interleaved(self, model, positive, batch: int, seed: int, p_r: float, steps: int = STEPS,
                           cfg: float = CFG):
        import comfy.utils

        node = self.nodes["DreamTunerInterleavedCFGSampler"]()
        latent = {"samples": torch.zeros((batch, 4, 16, 16))}
        bar = getattr(comfy.utils, "PROGRESS_BAR_ENABLED", True)
        comfy.utils.PROGRESS_BAR_ENABLED = False
        try:
            with torch.no_grad(), host.fast_attention():
                out = getattr(node, node.FUNCTION)(
                    model=model, seed=seed, steps=steps, cfg=cfg, sampler_name=SAMPLER, scheduler=SCHEDULER,
                    positive=positive, negative=self.text(""), latent_image=latent, denoise=1.0, w_r=-1.0,
                    p_r=p_r, delta_t=0, delta_t_prime=0)[0]
        finally:
            comfy.utils.PROGRESS_BAR_ENABLED = bar
        return self.decode(out["samples"])

    def run(self, case: Case, setting: Setting, seeds: int, steps: int = STEPS, cfg: float = CFG):
        """Images [seeds, 32, 32, 3] and per-seed measures for one case and setting (same noise for all settings)."""
        model, positive = self.patched(case, setting), self.text(case.prompt.text)
        if setting.p_r is None:
            images = self.sample(model, positive, seeds, seed=case.index, steps=steps, cfg=cfg)
        else:
            images = self.sample_interleaved(model, positive, seeds, case.index, setting.p_r, steps=steps, cfg=cfg)
        return images, score(images, case)


def score(images, case: Case):
    fidelity = measures.prompt_fidelity(images, case.prompt)
    return {"identity": measures.identity_similarity(images, case.reference_image),
            "pattern": measures.pattern_accuracy(images, case.subject),
            "scene": fidelity["scene"].astype(float), "time": fidelity["time"].astype(float),
            "position": fidelity["position"].astype(float)}
