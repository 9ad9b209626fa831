"""Subject-driven fine-tuning (paper 3.3, appendix A): a LoRA (or weight differences) and an [S*] embedding.

Training pairs, one of each per step (batch 2):
  {reference with its background replaced by white, "a <class word> [S*]"}
  {a regular image (generated with the class prompt),  "a <class word>"}
each flipped horizontally with p = 0.5. Noise schedule and prediction target
come from the model's own ``model_sampling`` (eps for SD1.x/SDXL, v for SD2.x
768-v): the loss is the mean squared error of the raw model output against
its target, obtained from the host's ``calculate_denoised`` (which is linear
in the model output, ``x0 = a * x_t + b * output``), so every parametrisation
the host knows trains with its own target.

The subject's token is :mod:`.subject_token`, the UNet's and text encoder's
adapters :mod:`.adapters`, the training pairs :mod:`.data`, the files
:mod:`.run_files`; this module runs the steps. Written by hand because the
late-2024 core has no trainer (``comfy_extras/nodes_train.py`` and
``comfy/weight_adapter`` arrived later). Reused from both cores: the LoRA key
maps and loader, ``add_patches``, ``save_torch_file``-compatible safetensors,
the tokenizer and embedding loader, ``model_sampling``, ``encode_adm``, the
memory manager, the progress bar and the interrupt.

This module never imports ComfyUI's top-level modules; output folders are arguments.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from ..errors import DreamTunerInputError
from ..files import write_safetensors
from ..keys import STATE_KEY
from ..references import MASK_SUBJECT_IS_ONE
from ..ssa.reference_rows import training_call
from ..subject_encoder.file import save_encoder
from ..subject_encoder.patch import SubjectEncoderPatch, encoder_patch_of, with_encoder_patch
from ..training.host_training import (autocast, autocast_dtype, grad_mode, gradient_checkpointing,
                                      inplace_block_norms, inputs_copied, normal_tensors, prediction_loss)
from .adapters import Adapter, text_targets, unet_targets
from .data import prepare_latents
from .run_files import existing_run, from_files, run_hash, run_paths
from .settings import (FORMAT, FORMAT_VERSION, UNET_LORA, FinetuneResult, FinetuneSettings, OutputFolders, check_family,
                       check_parts, check_image, check_settings, resolve_preset, unet_learning_rate, UNET_NONE)
from .subject_token import build_prompts, encode_text


def finetune(model, clip, vae, reference, regular, settings: FinetuneSettings, folders: OutputFolders,
             mask=None, mask_mode=MASK_SUBJECT_IS_ONE, overwrite=False,
             progress: Optional[Callable[[int, int, float], None]] = None,
             interrupt: Optional[Callable[[], None]] = None) -> FinetuneResult:
    """Fine-tune on one reference and the regular images, write the files, return MODEL/CLIP as loaders give them.

    Same inputs and seed give byte-identical files; a re-queue with the same inputs finds the files by the
    hash in their metadata and loads them instead of training again.
    """
    settings = resolve_preset(settings)
    name = check_settings(settings)
    check_family(model, clip)
    check_parts(model, clip, vae)
    reference = check_image(reference, "reference")
    regular = check_image(regular, "regular_images")
    encoder_patch = encoder_patch_of(model)
    if mask is None:
        logging.warning("DreamTunerFinetune: no mask, so the reference's background is not whitened and is learnt "
                        "with the subject (the paper whitens it). Connect a mask of the subject (or a cut-out "
                        "PNG's alpha with mask_mode 'background is 1').")
    digest = run_hash(settings, reference, None if mask is None else mask.float(), mask_mode, regular, model, clip,
                      vae)
    paths = run_paths(folders, name, encoder_patch is not None)
    if existing_run(paths, digest, overwrite, folders.embeddings, name):
        return from_files(model, clip, paths, encoder_patch, reused=True)

    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):  # the VAE samples its posterior with the global generator
        torch.manual_seed(int(settings.seed))
        ref_latents, reg_latents = prepare_latents(vae, model, reference, regular, mask, mask_mode)
    state = train(model, clip, settings, ref_latents, reg_latents, encoder_patch, progress, interrupt)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "dreamtuner.finetune_hash": digest,
                "dreamtuner.settings": json.dumps(asdict(settings), sort_keys=True),
                "dreamtuner.losses": json.dumps([round(v, 6) for v in state.losses]),
                "dreamtuner.reference_losses": json.dumps([round(v, 6) for v in state.reference_losses])}
    if settings.unet_mode == UNET_LORA:
        metadata.update({"ss_network_dim": str(settings.rank), "ss_network_alpha": str(settings.rank)})
    if interrupt is not None:
        interrupt()
    write_safetensors(state.lora_state_dict(), metadata, paths["lora"])
    write_safetensors(state.embedding_state_dict(), metadata, paths["embedding"])
    if state.encoder is not None:
        save_encoder(state.encoder, paths["encoder"], extra_metadata={"dreamtuner.finetune_hash": digest})
    return from_files(model, clip, paths, encoder_patch, reused=False)


def _adm(model, pooled, height, width):
    """SDXL's ADM ("y") input for a training image of this size (None for SD1.x/SD2.x)."""
    if pooled is None or not getattr(model.model, "adm_channels", 0):
        return None
    return model.model.encode_adm(pooled_output=pooled, width=width, height=height, crop_w=0, crop_h=0,
                                  target_width=width, target_height=height)


def _memory_estimate(model, latents_shape, checkpointing):
    """Bytes to ask the memory manager for: weights plus activations of a batch-2 step (and the reference
    rows self-subject-attention adds to it: one per reference and training row)."""
    params = sum(p.numel() * p.element_size() for p in model.model.diffusion_model.parameters())
    pixels = latents_shape[-1] * latents_shape[-2]
    state = model.model_options.get("transformer_options", {}).get(STATE_KEY)
    rows = 2 * (1 + len(getattr(state, "references", ())))
    activations = pixels * rows * 1.2e5 * (0.3 if checkpointing else 1.0)
    return params + int(activations)


@dataclass
class TrainedState:
    """What training produced: adapters, [S*] vectors, the trained encoder (if any) and the losses."""

    adapters: dict
    text_adapters: dict
    slots: dict
    encoder: Optional[object]
    losses: list
    reference_losses: list
    subject_tokens: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def active(self):
        """The model/CLIP as at the end of training (hooks installed; removed on exit)."""
        hooks = list(self.adapters.values()) + list(self.text_adapters.values()) + list(self.slots.values())
        try:
            for hook in hooks:
                hook.install()
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def lora_state_dict(self):
        out = {}
        for key, adapter in sorted(list(self.adapters.items()) + list(self.text_adapters.items())):
            out.update(adapter.tensors(key))
        return out

    def embedding_state_dict(self):
        """{embedding_key: [1, width]}: what the host's load_embed reads for embedding:<name>."""
        return {slot.embedding_key: slot.vector.detach().float().cpu()[None].contiguous()
                for slot in self.slots.values()}


def _trainable_encoder(encoder_patch):
    if encoder_patch.features is None:
        raise DreamTunerInputError(
            "model carries a subject encoder applied without its CLIP features (an older ApplySubjectEncoder); "
            "apply the subject encoder again before DreamTunerFinetune.")
    encoder = copy.deepcopy(encoder_patch.encoder).float().requires_grad_(False)
    encoder.resblocks.requires_grad_(True)  # paper 3.3: the encoder's ResBlocks train; S-E-A stays as pretrained
    return encoder


def train(model, clip, settings: FinetuneSettings, reference, regular, encoder_patch=None, progress=None,
          interrupt=None) -> TrainedState:
    """The training loop on latents from :func:`prepare_latents`; the input MODEL/CLIP are left unchanged.

    Runs outside inference mode (current ComfyUI runs nodes inside it): every tensor it creates is an
    ordinary one autograd can use.
    """
    settings = resolve_preset(settings)
    with grad_mode():
        return _train(model, clip, settings, reference, regular, encoder_patch, progress, interrupt)


def _train(model, clip, settings, reference, regular, encoder_patch, progress, interrupt):
    import comfy.model_management as mm

    generator = torch.Generator().manual_seed(int(settings.seed))
    plain_tokens, subject_tokens, slots = build_prompts(clip, settings.class_word)
    work = model.clone()
    adapters = {} if settings.unet_mode == UNET_NONE else {
        key: Adapter(module, settings.unet_mode, settings.rank, generator)
        for key, (module, _) in unet_targets(work).items()}
    text_adapters = {}
    if settings.train_text_encoder:
        text_adapters = {key: Adapter(module, settings.unet_mode, settings.rank, generator)
                         for key, (module, _) in text_targets(clip).items()}
    encoder = trainable = None
    if encoder_patch is not None:  # Eq. 1 in float32 through the trainable ResBlocks
        encoder = _trainable_encoder(encoder_patch)
        trainable = SubjectEncoderPatch.trainable(encoder, encoder_patch.beta, compute_dtype=torch.float32)
        work = with_encoder_patch(work, encoder_patch, trainable)
    state = TrainedState(adapters, text_adapters, slots, encoder, [], [], subject_tokens)

    mm.load_models_gpu([work, clip.patcher], force_full_load=True,
                       memory_required=_memory_estimate(work, reference[0].shape, settings.gradient_checkpointing))
    normal_tensors(work.model, clip.cond_stage_model)
    frozen = list(work.model.parameters()) + list(clip.cond_stage_model.parameters())
    flags = [p.requires_grad for p in frozen]
    reference = tuple(t.clone() for t in reference)
    regular = tuple(t.clone() for t in regular)
    device = work.load_device
    model_sampling = work.get_model_object("model_sampling")
    try:
        for p in frozen:
            p.requires_grad_(False)
        for slot in slots.values():  # made outside the training mode: fresh tensors for autograd
            slot.vector.data = slot.vector.data.detach().clone().to(device)
        if encoder is not None:
            encoder.to(device)
            # a copy outside inference mode (the node's features may be inference tensors)
            features = encoder_patch.features.to(device=device, dtype=torch.float32).clone()
        groups = [{"params": [p for a in adapters.values() for p in a.parameters()], "lr": unet_learning_rate(settings)},
                  {"params": [s.vector for s in slots.values()], "lr": settings.token_lr}]
        if text_adapters:
            groups.append({"params": [p for a in text_adapters.values() for p in a.parameters()],
                           "lr": settings.text_encoder_lr})
        if encoder is not None:
            groups.append({"params": list(encoder.resblocks.parameters()), "lr": settings.encoder_lr})
        groups = [g for g in groups if g["params"]]  # [S*] only: no adapter group
        unet = work.model.diffusion_model
        with state.active(), inputs_copied(inplace_block_norms(unet, clip.cond_stage_model)), \
                gradient_checkpointing(unet, settings.gradient_checkpointing, every_layer=True):
            optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
            with torch.no_grad():
                plain = encode_text(clip, plain_tokens)
            for step in range(int(settings.steps)):
                if interrupt is not None:
                    interrupt()
                if trainable is not None:  # SE(r) once per step, before the UNet's forward (whose autocast it shares)
                    with autocast(device, autocast_dtype("auto", device)):
                        trainable.tokens = encoder.encode(features).mean(dim=0, keepdim=True)
                loss, reference_loss = _step(work, clip, model_sampling, reference, regular, subject_tokens,
                                             plain_tokens if text_adapters else None, plain, generator, device,
                                             interrupt)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if interrupt is not None:
                    interrupt()
                optimizer.step()
                state.losses.append(float(loss.detach()))
                state.reference_losses.append(reference_loss)
                if progress is not None:
                    progress(step + 1, int(settings.steps), state.losses[-1])
            del optimizer
    finally:
        for p, flag in zip(frozen, flags):
            p.requires_grad_(flag)
        mm.soft_empty_cache()
    for slot in slots.values():
        slot.vector.data = slot.vector.data.cpu()
    for adapter in list(adapters.values()) + list(text_adapters.values()):
        adapter.requires_grad_(False)
    if encoder is not None:
        state.encoder = encoder.cpu().eval().requires_grad_(False)
    return state


def _step(work, clip, model_sampling, reference, regular, subject_tokens, plain_tokens, plain, generator, device,
          interrupt):
    """One step, batch 2: the reference pair and one regular pair, each mirrored with p = 0.5.

    Returns (the batch's loss, the reference pair's loss as a float).
    """
    ref_plain, ref_mirror = reference
    reg_plain, reg_mirror = regular
    i = int(torch.randint(ref_plain.shape[0], (1,), generator=generator))
    j = int(torch.randint(reg_plain.shape[0], (1,), generator=generator))
    mirror = torch.rand((2,), generator=generator) < 0.5
    x0 = torch.stack([(ref_mirror if mirror[0] else ref_plain)[i], (reg_mirror if mirror[1] else reg_plain)[j]])
    noise = torch.randn(x0.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (2,), generator=generator).float()
    x0, noise = x0.to(device), noise.to(device)
    sigma = model_sampling.sigma(timesteps.to(device)).float()
    x_t = model_sampling.noise_scaling(sigma.view(-1, 1, 1, 1), noise, x0)

    subject_cond, subject_pooled = encode_text(clip, subject_tokens)
    plain_cond, plain_pooled = encode_text(clip, plain_tokens) if plain_tokens is not None else plain
    cond = torch.cat([subject_cond.to(device), plain_cond.to(device)])
    pooled = None if subject_pooled is None else torch.cat([subject_pooled.to(device), plain_pooled.to(device)])
    y = _adm(work, pooled, x0.shape[-2] * 8, x0.shape[-1] * 8)
    kwargs = {} if y is None else {"y": y.to(device)}
    with autocast(device, autocast_dtype("auto", device)):
        denoised = predict(work, x_t, sigma, cond, kwargs)
    if interrupt is not None:
        interrupt()
    per_item = prediction_loss(model_sampling, denoised, x0, sigma)
    return per_item.mean(), float(per_item[0].detach())


def predict(model, x_t, sigma, cond, extra=None):
    """The model's denoised prediction with its own transformer patches, as a sampler's evaluation runs it.

    On a model that carries Self-Subject-Attention the prediction goes through its reference path
    (:func:`~..ssa.reference_rows.training_call`): each row attends to the reference noised to that row's
    own noise level (Eq. 3 in the loss, the paper's Stage 2).
    """
    transformer_options = dict(model.model_options.get("transformer_options", {}))
    transformer_options["cond_or_uncond"] = [0]
    transformer_options["sigmas"] = sigma
    c = dict(extra or {}, c_crossattn=cond, transformer_options=transformer_options)
    if transformer_options.get(STATE_KEY) is not None:
        return training_call(model, x_t, sigma, c)
    return model.model.apply_model(x_t, sigma, **c)
