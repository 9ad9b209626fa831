"""Subject-encoder pretraining (paper 3.1), one process on a CPU up to many nodes under torchrun.

Frozen: the SD1.x UNet, VAE and CLIP text encoder of the user's checkpoint
(loaded by the host's ``comfy.sd.load_checkpoint_guess_config``), a depth
ControlNet (``comfy.controlnet.load_controlnet``) fed each image's depth map,
and the CLIP vision model (``comfy.clip_vision.load``). Trainable: the
:class:`~.subject_encoder.SubjectEncoder` (projection, ResBlocks, S-E-A layers)
at beta = 1.0.

One training sample: the reference (augmented, background whitened) goes
through CLIP vision exactly as ApplySubjectEncoder does (same
``white_background`` and ``clip_layer_features``), then the encoder; the target
picture is VAE-encoded and noised at a uniformly drawn timestep; the UNet runs
through the host's ``BaseModel.apply_model`` with the ControlNet's residuals
(computed by the host's ``ControlNet.get_control``) and the S-E-A layers
inserted as the same ``middle_patch`` the inference patch uses
(:class:`TrainingPatch` only replaces the cached, gradient-free keys/values by
ones computed with gradients). The loss is the MSE between the model's raw
output and its own prediction target (eps or v, whichever the model's
``model_sampling`` parameterises), obtained from ``calculate_denoised``.

Distributed: ``torch.distributed`` (NCCL on GPUs, gloo on CPUs), DDP over the
encoder only, every rank reading its own share of the data order of
``DistributedSampler``. Randomness (augmentation, VAE sampling, timestep,
noise) is a function of (seed, epoch, dataset index), so a sample is the same
on any rank and after a resume. Checkpoints (safetensors, JSON in its
metadata, no pickle) are written to a temporary file and renamed.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob
import inspect
import json
import os
import random
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from types import SimpleNamespace

import torch
import torch.distributed as dist

from .encoder_file import load_encoder, save_encoder
from .errors import DreamTunerInputError
from .files import replacing, write_safetensors
from .host import prediction_error
from .pretrain_data import Augmentation, PreparedDataset, sample_seed, seeded_rng
from .subject_encoder import (PAPER_CLIP_LAYERS, EncoderConfig, SubjectEncoder, attention_layout,
                              check_compatible)
from .subject_encoder_patch import SubjectEncoderPatch

CHECKPOINT_FORMAT = "dreamtuner.pretrain_checkpoint"
NUM_TIMESTEPS = 1000


@dataclass
class TrainConfig:
    """Every setting of a run (the CLI's options); stored in each checkpoint."""

    data: str
    checkpoint: str
    controlnet: str
    clip_vision: str
    out: str
    clip_vision_config: str | None = None  # a CLIP vision file of another shape: its HF-style config JSON
    init_encoder: str | None = None
    clip_layers: tuple = PAPER_CLIP_LAYERS
    resblocks: int = 4
    size: int = 512
    global_batch: int = 16
    batch_per_device: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    max_steps: int = 10000
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    beta: float = 1.0
    control_strength: float = 1.0
    augment: bool = True
    precision: str = "auto"  # auto | fp32 | bf16
    gradient_checkpointing: bool = False
    workers: int = 2
    encoder_dtype: str = "float16"
    resume: str | None = None  # a checkpoint file, or "latest" (the newest in OUT/checkpoints)
    progress: bool = True

    def __post_init__(self):
        self.clip_layers = tuple(int(i) for i in self.clip_layers)


# --- distributed ---------------------------------------------------------------------------------------------


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.size > 1:
            dist.barrier()


def setup_world() -> World:
    """Join the process group torchrun describes in the environment (or run alone without one)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return World(rank, size, local_rank, device)


def _all_mean(value: float, world: World) -> float:
    if world.size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=world.device if world.device.type == "cuda" else "cpu")
    dist.all_reduce(tensor)
    return float(tensor) / world.size


# --- frozen models -------------------------------------------------------------------------------------------


class FrozenModels:
    """The frozen host models of a run, loaded by the host's own loaders, all ``requires_grad=False``."""

    def __init__(self, config: TrainConfig, device, text_conditioning=None):
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


# --- the training computation --------------------------------------------------------------------------------


class TrainingPatch(SubjectEncoderPatch):
    """The inference ``middle_patch`` with gradients: keys/values of SE(r) computed in the graph, per sample.

    ``__call__`` (layer lookup, Eq. 1 via ``subject_encoder_attention`` with the
    host's attention function) is the inference patch's own; only the cache of
    detached, cast copies is replaced.
    """

    def __init__(self, encoder, tokens, beta):
        # Not the inference set-up, which applies the key/value projections once, detached: here they are
        # applied in the graph at every call, so the S-E-A layers are the encoder's own trainable modules.
        self.encoder, self.tokens, self.beta = encoder, tokens, float(beta)
        self.sigma_start, self.sigma_end = float("inf"), 0.0
        self.layers = encoder.attention

    def layer(self, name, like):
        attention = self.encoder.attention[name]
        tokens = self.tokens if self.tokens.dtype == like.dtype or torch.is_autocast_enabled() else \
            self.tokens.to(like.dtype)
        return SimpleNamespace(heads=attention.heads, norm=attention.norm, to_q=attention.to_q,
                               to_out=attention.to_out, k=attention.to_k(tokens), v=attention.to_v(tokens))


class EncoderObjective(torch.nn.Module):
    """The trainable encoder and the loss of one micro-batch (the module DDP wraps)."""

    def __init__(self, encoder: SubjectEncoder, beta: float):
        super().__init__()
        self.encoder, self.beta = encoder, float(beta)

    def forward(self, features, x_noisy, sigma, x0, context, control, base):
        tokens = self.encoder.encode(features)
        options = {"patches": {"middle_patch": [TrainingPatch(self.encoder, tokens, self.beta)]}}
        with torch.autograd.graph.saved_tensors_hooks(_copy_if_trainable, _same):
            denoised = base.apply_model(x_noisy, sigma, c_crossattn=context, control=control,
                                        transformer_options=options).float()
        return prediction_error(base.model_sampling, sigma, denoised, x0).pow(2).mean()


def _copy_if_trainable(tensor):
    """Autograd keeps a copy of each saved activation that carries gradient.

    The host's UNet is written for inference: its transformer blocks add residuals
    in place (``x += n``) after a norm has saved ``x``. Once the S-E-A layers make
    ``x`` carry gradient, autograd would refuse that (or, worse, see the wrong
    values); saving a copy keeps the host's code unchanged. Frozen activations
    (no gradient) and parameters are saved as usual.
    """
    if tensor.requires_grad and not isinstance(tensor, torch.nn.Parameter):
        return tensor.clone()
    return tensor


def _same(tensor):
    return tensor


def enable_gradient_checkpointing(unet):
    """Recompute each UNet ResBlock in the backward pass instead of keeping its activations.

    The host's UNet has no checkpointing of its own that works in both cores, so
    each ResBlock's ``forward`` is wrapped with ``torch.utils.checkpoint``
    (non-reentrant). Only ResBlocks (most of the convolution activations): the
    transformer blocks add residuals in place after a norm saved its input
    (see :func:`_copy_if_trainable`), which a recomputation cannot protect.
    """
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
    from torch.utils.checkpoint import checkpoint

    def wrap(original):
        def forward(*args, **kwargs):
            return checkpoint(original, *args, use_reentrant=False, **kwargs)
        return forward

    for module in unet.modules():
        if isinstance(module, ResBlock) and "forward" not in module.__dict__:
            module.forward = wrap(module.forward)


def disable_gradient_checkpointing(unet):
    for module in unet.modules():
        module.__dict__.pop("forward", None)


def autocast_dtype(precision: str, device):
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


class Trainer:
    """One rank's share of a run: models, encoder, optimizer, data order, checkpoints."""

    def __init__(self, config: TrainConfig, world: World | None = None, text_conditioning=None, frozen=None):
        """``frozen``: already loaded :class:`FrozenModels` of the same files (they never change), else loaded here."""
        self.config, self.world = config, world or World()
        c = config
        if c.global_batch % (c.batch_per_device * self.world.size):
            raise DreamTunerInputError(
                f"--global-batch {c.global_batch} is not a multiple of --batch-per-device {c.batch_per_device} x "
                f"{self.world.size} processes; choose sizes whose product divides it.")
        self.accumulation = c.global_batch // (c.batch_per_device * self.world.size)
        self.frozen = frozen or FrozenModels(c, self.world.device, text_conditioning)
        if c.gradient_checkpointing:
            enable_gradient_checkpointing(self.frozen.base.diffusion_model)
        self.encoder = self._encoder().to(self.world.device, torch.float32).requires_grad_(True).train()
        self.objective = EncoderObjective(self.encoder, c.beta)
        self.model = self.objective
        if self.world.size > 1:
            device_ids = [self.world.local_rank] if self.world.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.objective, device_ids=device_ids)
        self.optimizer = torch.optim.AdamW(self.encoder.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        warmup = max(1, c.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LinearLR(self.optimizer, start_factor=1.0 / warmup,
                                                           total_iters=warmup - 1 if warmup > 1 else 0)
        self.dataset = PreparedDataset(c.data, c.size, c.seed, Augmentation(enabled=c.augment))
        per_step = c.batch_per_device * self.accumulation
        self.rank_samples = len(self.dataset) // self.world.size  # DistributedSampler(drop_last=True)
        self.steps_per_epoch = self.rank_samples // per_step
        if self.steps_per_epoch == 0:
            raise DreamTunerInputError(
                f"--data has {len(self.dataset)} prepared images, fewer than one global batch of "
                f"{c.global_batch}; prepare more images or lower --global-batch.")
        self.step = 0
        self.on_gradients = None
        self.autocast = autocast_dtype(c.precision, self.world.device)

    def _encoder(self):
        c = self.config
        from .clip_features import clip_vision_shape

        layers, width = clip_vision_shape(self.frozen.clip_vision)
        if max(c.clip_layers) > layers:
            raise DreamTunerInputError(f"--clip-layers {list(c.clip_layers)} needs a CLIP vision model with at least "
                                       f"{max(c.clip_layers)} layers; --clip-vision has {layers}.")
        if c.init_encoder:
            encoder = load_encoder(c.init_encoder)
            check_compatible(encoder.config, self.frozen.patcher, source=f"--init-encoder '{c.init_encoder}'")
            return encoder.float()
        context_dim, attention = attention_layout(self.frozen.patcher)
        family = type(self.frozen.patcher.model.model_config).__name__.lower()
        config = EncoderConfig(base_family={"sd15": "sd15", "sdxl": "sdxl"}.get(family, family), context_dim=context_dim,
                               clip_width=width, clip_layers=c.clip_layers, resblocks=c.resblocks, attention=attention)
        with seeded_rng(sample_seed(c.seed, -1)):
            return SubjectEncoder(config).initialise_untrained(c.seed)

    # -- data order --

    def epoch_indices(self, epoch):
        """This rank's dataset indices for ``epoch``, in DistributedSampler's order (shuffled by seed + epoch)."""
        sampler = torch.utils.data.DistributedSampler(self.dataset, num_replicas=self.world.size, rank=self.world.rank,
                                                      shuffle=True, seed=self.config.seed, drop_last=True)
        sampler.set_epoch(epoch)
        return list(sampler)

    def batches(self):
        """Micro-batches from the current step on, forever; each optimizer step takes ``accumulation`` of them."""
        c = self.config
        per_step = c.batch_per_device * self.accumulation
        step = self.step
        while True:
            epoch, position = divmod(step, self.steps_per_epoch)
            indices = self.epoch_indices(epoch)[position * per_step:self.steps_per_epoch * per_step]
            self.dataset.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(self.dataset, batch_size=c.batch_per_device, sampler=indices,
                                                 num_workers=c.workers, persistent_workers=False)
            for batch in loader:
                yield epoch, batch
            step = (epoch + 1) * self.steps_per_epoch

    # -- one step --

    def prepare(self, epoch, batch):
        """Frozen computations of a micro-batch (no gradients): features, noised latents, text, control."""
        from .clip_features import clip_layer_features

        f, c, device = self.frozen, self.config, self.world.device
        reference = batch["reference"].movedim(1, -1)
        with torch.no_grad(), self._autocast():
            features = clip_layer_features(f.clip_vision, reference, self.encoder.config.clip_layers).to(device)
            latents, noises, timesteps = [], [], []
            for i, index in enumerate(batch["index"].tolist()):
                with seeded_rng(sample_seed(c.seed, epoch, index, 1)):  # the VAE samples its posterior
                    latents.append(f.vae.encode(batch["target"][i:i + 1].movedim(1, -1)).float())
                generator = torch.Generator().manual_seed(sample_seed(c.seed, epoch, index, 2))
                timesteps.append(torch.randint(0, NUM_TIMESTEPS, (1,), generator=generator))
                noises.append(torch.randn(latents[-1].shape, generator=generator))
            x0 = f.base.process_latent_in(torch.cat(latents).to(device))
            sigma = f.base.model_sampling.sigma(torch.cat(timesteps).float().to(device))
            x_noisy = f.base.model_sampling.noise_scaling(sigma.view(-1, 1, 1, 1), torch.cat(noises).to(device), x0)
            context = torch.cat([f.text(caption) for caption in batch["caption"]])
            control = f.control(x_noisy, sigma, context, batch["depth"].to(device), c.control_strength, {})
        return features, x_noisy, sigma, x0, context, control

    def _autocast(self):
        return torch.autocast(self.world.device.type, dtype=self.autocast, enabled=self.autocast is not None)

    def micro_loss(self, epoch, batch, model=None):
        features, x_noisy, sigma, x0, context, control = self.prepare(epoch, batch)
        with self._autocast():
            return (model or self.model)(features, x_noisy, sigma, x0, context, control, self.frozen.base)

    def train_step(self, micro_batches):
        """Gradients of one global batch (accumulated, averaged over ranks by DDP), clipping, one optimizer step."""
        losses = []
        for i, (epoch, batch) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = getattr(self.model, "no_sync", None)
            context = sync() if (sync and not last) else contextlib.nullcontext()
            with context:
                loss = self.micro_loss(epoch, batch) / len(micro_batches)
                loss.backward()
            losses.append(float(loss.detach()))
        if self.on_gradients is not None:  # inspection (tests): the averaged global-batch gradients
            self.on_gradients(self)
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.encoder.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return _all_mean(sum(losses), self.world)

    # -- the loop --

    def run(self, max_steps=None, on_step=None):
        """Train to ``max_steps`` (default the config's), checkpointing every N steps and at the end."""
        c, world = self.config, self.world
        max_steps = c.max_steps if max_steps is None else max_steps
        out = RunFiles(c.out, world.main)
        if c.resume:
            path = resolve_resume(c.resume, c.out)
            if path is not None:
                self.load_checkpoint(path)
            elif world.main:
                print(f"--resume latest: no checkpoint in '{c.out}/checkpoints' yet, starting at step 0")
            out.truncate_log(self.step)
        progress = _progress(self.step, max_steps, world.main and c.progress)
        batches = self.batches()
        start = time.perf_counter()
        samples = 0
        try:
            while self.step < max_steps:
                micro = [next(batches) for _ in range(self.accumulation)]
                loss = self.train_step(micro)
                samples += c.global_batch
                rate = samples / (time.perf_counter() - start)
                out.log(self.step, loss, self.scheduler.get_last_lr()[0], rate)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:.2f}")
                if on_step is not None:
                    on_step(self, loss)
                if self.step % c.checkpoint_every == 0 or self.step == max_steps:
                    self.save_checkpoint(out)
        finally:
            if progress is not None:
                progress.close()
        if world.main:
            save_encoder(self.export_encoder(), os.path.join(c.out, "subject_encoder.safetensors"),
                         extra_metadata=self.training_metadata())
            out.plot()
        world.barrier()
        return self

    # -- checkpoints --

    def export_encoder(self):
        """A copy of the trained encoder in the file's storage dtype (the loader casts it at use)."""
        encoder = SubjectEncoder(self.encoder.config)
        encoder.load_state_dict({k: v.detach().cpu() for k, v in self.encoder.state_dict().items()})
        return encoder.to(getattr(torch, self.config.encoder_dtype))

    def training_metadata(self):
        c = self.config
        return {"training": json.dumps({
            "step": self.step, "samples": self.step * c.global_batch, "images": len(self.dataset),
            "checkpoint": os.path.basename(c.checkpoint), "controlnet": os.path.basename(c.controlnet),
            "clip_vision": os.path.basename(c.clip_vision), "lr": c.lr, "global_batch": c.global_batch,
            "size": c.size, "beta": c.beta, "seed": c.seed, "paper": "DreamTuner 3.1"})}

    def rng_state(self):
        import numpy

        state = numpy.random.get_state()
        return {"python": _jsonable(random.getstate()),
                "numpy": [state[0], state[1].tolist(), int(state[2]), int(state[3]), float(state[4])],
                "torch": torch.get_rng_state().tolist(),
                "cuda": torch.cuda.get_rng_state().tolist() if torch.cuda.is_available() else None}

    def save_checkpoint(self, out):
        """Every rank's RNG state to rank 0, which writes checkpoint + encoder atomically; then all wait."""
        states = [None] * self.world.size
        if self.world.size > 1:
            dist.all_gather_object(states, self.rng_state())
        else:
            states = [self.rng_state()]
        if self.world.main:
            tensors = {f"encoder.{k}": v.detach().cpu().contiguous() for k, v in self.encoder.state_dict().items()}
            optimizer = self.optimizer.state_dict()
            for index, values in optimizer["state"].items():
                for name, value in values.items():
                    tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).cpu().contiguous()
            state = {"step": self.step, "scheduler": _jsonable(self.scheduler.state_dict()),
                     "optimizer_param_groups": _jsonable(optimizer["param_groups"]),
                     "data_order": {"sampler": "DistributedSampler(shuffle, drop_last)", "seed": self.config.seed,
                                    "epoch": self.step // self.steps_per_epoch,
                                    "step_in_epoch": self.step % self.steps_per_epoch, "world_size": self.world.size,
                                    "batch_per_device": self.config.batch_per_device,
                                    "accumulation": self.accumulation, "global_batch": self.config.global_batch},
                     "rng": states, "config": _jsonable(dataclasses.asdict(self.config))}
            metadata = {"format": CHECKPOINT_FORMAT, "state": json.dumps(state), **self.encoder.config.to_metadata()}
            path = out.checkpoint_path(self.step)
            write_safetensors(tensors, metadata, path)
            save_encoder(self.export_encoder(), out.encoder_path(self.step), extra_metadata=self.training_metadata())
            out.prune(self.config.keep_checkpoints)
            out.plot()
        self.world.barrier()

    def load_checkpoint(self, path):
        import numpy
        import safetensors

        with safetensors.safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise DreamTunerInputError(f"--resume '{path}' is not a pretraining checkpoint of this pack.")
        state = json.loads(metadata["state"])
        if EncoderConfig.from_metadata(metadata) != self.encoder.config:
            raise DreamTunerInputError(f"--resume '{path}' holds an encoder of another shape than this run's "
                                       "(other --clip-layers, --resblocks or base model); resume with the same settings.")
        order = state["data_order"]
        if order["global_batch"] != self.config.global_batch or order["seed"] != self.config.seed:
            raise DreamTunerInputError(
                f"--resume '{path}' was made with --global-batch {order['global_batch']} and --seed {order['seed']}; "
                "resume with the same values (the data order depends on them).")
        self.encoder.load_state_dict({k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")})
        optimizer_state = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                optimizer_state.setdefault(int(index), {})[name] = value.to(self.world.device) if value.ndim else value
        self.optimizer.load_state_dict({"state": optimizer_state, "param_groups": state["optimizer_param_groups"]})
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        mine = state["rng"][self.world.rank] if self.world.rank < len(state["rng"]) else state["rng"][0]
        random.setstate(_tuples(mine["python"]))
        numpy.random.set_state((mine["numpy"][0], numpy.array(mine["numpy"][1], dtype=numpy.uint32),
                                *mine["numpy"][2:]))
        torch.set_rng_state(torch.tensor(mine["torch"], dtype=torch.uint8))
        if mine.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(torch.tensor(mine["cuda"], dtype=torch.uint8))
        if order["world_size"] != self.world.size and self.world.main:
            print(f"note: resuming a {order['world_size']}-process run with {self.world.size} processes: the same "
                  "samples per epoch, shared out differently, so the run is not bit-identical to an uninterrupted one")


def _progress(initial, total, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="pretraining", unit="step")


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def resolve_resume(resume, out):
    if resume != "latest":
        if not os.path.isfile(resume):
            raise DreamTunerInputError(f"--resume '{resume}' is not a file (give a checkpoint or 'latest').")
        return resume
    found = RunFiles.checkpoints(out)
    return found[-1] if found else None  # none yet: start fresh (one job script for the first run and requeues)


class RunFiles:
    """The run folder: checkpoints/, encoders/, loss.csv, loss.png (written by rank 0 only)."""

    def __init__(self, out, main):
        self.out, self.main = out, main
        if main:
            os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
            os.makedirs(os.path.join(out, "encoders"), exist_ok=True)
        self.csv = os.path.join(out, "loss.csv")

    def checkpoint_path(self, step):
        return os.path.join(self.out, "checkpoints", f"checkpoint_{step:08d}.safetensors")

    def encoder_path(self, step):
        return os.path.join(self.out, "encoders", f"subject_encoder_step_{step:08d}.safetensors")

    @staticmethod
    def checkpoints(out):
        paths = glob.glob(os.path.join(out, "checkpoints", "checkpoint_*.safetensors"))
        return sorted(p for p in paths if re.fullmatch(r"checkpoint_\d{8}\.safetensors", os.path.basename(p)))

    def prune(self, keep):
        for path in self.checkpoints(self.out)[:-keep] if keep > 0 else []:
            os.remove(path)

    def log(self, step, loss, lr, rate):
        if not self.main:
            return
        new = not os.path.exists(self.csv)
        with open(self.csv, "a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["step", "loss", "lr", "samples_per_s"])
            writer.writerow([step, f"{loss:.6g}", f"{lr:.6g}", f"{rate:.4g}"])

    def rows(self):
        if not os.path.exists(self.csv):
            return []
        with open(self.csv, newline="") as handle:
            return list(csv.DictReader(handle))

    def truncate_log(self, step):
        """After a resume, drop the rows of steps the resumed run will repeat."""
        if not self.main or not os.path.exists(self.csv):
            return
        rows = [r for r in self.rows() if int(r["step"]) <= step]
        with replacing(self.csv) as partial, open(partial, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["step", "loss", "lr", "samples_per_s"])
            writer.writerows([[r["step"], r["loss"], r["lr"], r["samples_per_s"]] for r in rows])

    def plot(self):
        """loss.png from loss.csv (matplotlib is optional: the [train] extra; without it no plot)."""
        if not self.main:
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        rows = self.rows()
        if not rows:
            return
        steps, losses = [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]
        figure, axis = plt.subplots(figsize=(7, 4))
        axis.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
        window = max(1, len(losses) // 20)
        if window > 1:
            smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                      for i in range(len(losses))]
            axis.plot(steps, smooth, lw=1.5, label=f"mean of {window}")
        axis.set_xlabel("step")
        axis.set_ylabel("loss (MSE to the model's target)")
        axis.set_title("subject-encoder pretraining")
        axis.legend()
        figure.tight_layout()
        try:
            with replacing(os.path.join(self.out, "loss.png")) as partial:
                figure.savefig(partial, format="png", dpi=100)
        finally:
            plt.close(figure)


def train(config: TrainConfig, on_step=None, text_conditioning=None):
    """Run (or resume) a pretraining as configured; in a torchrun process group when there is one."""
    world = setup_world()
    try:
        return Trainer(config, world, text_conditioning).run(on_step=on_step)
    finally:
        if world.size > 1 and dist.is_initialized():
            dist.destroy_process_group()
