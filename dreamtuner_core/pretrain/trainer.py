"""One rank's share of a pretraining run: models, encoder, optimizer, data order, steps, the loop.

Distributed: DDP over the encoder only, every rank reading its own share of the
data order of ``DistributedSampler``. Randomness (augmentation, VAE sampling,
timestep, noise) is a function of (seed, epoch, dataset index), so a sample is
the same on any rank and after a resume (:mod:`.checkpoints`).
"""

from __future__ import annotations

import contextlib
import os
import time

import torch
import torch.distributed as dist

from ..errors import DreamTunerInputError
from ..subject_encoder.clip_features import clip_layer_features, clip_vision_shape
from ..subject_encoder.file import load_encoder, save_encoder
from ..subject_encoder.model import EncoderConfig, SubjectEncoder, attention_layout, check_compatible
from ..training.host_training import autocast, autocast_dtype, enable_gradient_checkpointing
from .checkpoints import export_encoder, load_checkpoint, resolve_resume, save_checkpoint, training_metadata
from .config import TrainConfig
from .data import Augmentation, PreparedDataset, sample_seed, seeded_rng
from .frozen_models import FrozenModels
from .objective import EncoderObjective
from .run_files import RunFiles, check_run_folder
from .world import World, all_mean, setup_world

NUM_TIMESTEPS = 1000


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
        check_run_folder(c, self.world.main)
        self.world.barrier()  # every process has looked at the folder before any writes to it
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
        return autocast(self.world.device, self.autocast)

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
        return all_mean(sum(losses), self.world)

    # -- the loop --

    def run(self, max_steps=None, on_step=None):
        """Train to ``max_steps`` (default the config's), checkpointing every N steps and at the end."""
        c, world = self.config, self.world
        max_steps = c.max_steps if max_steps is None else max_steps
        out = RunFiles(c.out, world.main)
        if c.resume:
            path = resolve_resume(c.resume, c.out)
            if path is not None:
                load_checkpoint(self, path)
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
                    save_checkpoint(self, out)
        finally:
            if progress is not None:
                progress.close()
        if world.main:
            save_encoder(export_encoder(self), os.path.join(c.out, "subject_encoder.safetensors"),
                         extra_metadata=training_metadata(self))
            out.plot()
        world.barrier()
        return self




def _progress(initial, total, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="pretraining", unit="step")


def train(config: TrainConfig, on_step=None, text_conditioning=None, frozen=None):
    """Run (or resume) a pretraining as configured; in a torchrun process group when there is one.

    ``frozen``: a callable ``device -> frozen models`` in place of :class:`FrozenModels` (models the host's
    loaders cannot detect, such as the small trained world's).
    """
    world = setup_world()
    try:
        models = frozen(world.device) if frozen is not None else None
        return Trainer(config, world, text_conditioning, frozen=models).run(on_step=on_step)
    finally:
        if world.size > 1 and dist.is_initialized():
            dist.destroy_process_group()
