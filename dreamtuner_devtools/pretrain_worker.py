"""One rank of the 2-process gloo pretraining test (started by torch.multiprocessing from tests/test_pretrain.py).

A fresh process, as the command line is: it loads the pack itself (:mod:`.pack`, without the nodes).
"""

from __future__ import annotations

import hashlib
import os

import torch


def caption_conditioning(caption, dim=768):
    """A fixed CLIP-text-shaped conditioning per caption (the PyPI comfy core cannot build CLIP-L's tokenizer)."""
    seed = int.from_bytes(hashlib.sha256(caption.encode()).digest()[:4], "little")
    return torch.randn((1, 77, dim), generator=torch.Generator().manual_seed(seed))


def frozen_snapshot(trainer):
    return {f"{name}.{k}": v.detach().clone() for name, module in trainer.frozen.frozen_modules().items()
            for k, v in module.state_dict().items()}


def evaluation_loss(trainer):
    """The loss of every training image, unaugmented, at fixed noise and timesteps (the data seed's epoch 0).

    A fixed yardstick for "the loss falls": the logged training loss changes its
    batch, augmentation, noise and timesteps every step.
    """
    dataset = type(trainer.dataset)(trainer.config.data, trainer.config.size, trainer.config.seed,
                                    type(trainer.dataset.augmentation)(enabled=False))
    batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        return float(trainer.micro_loss(0, batch, model=trainer.objective))


def ddp_train(rank, world_size, port, config_kwargs, result_dir, evaluate_every=0):
    """Train ``max_steps`` steps on this rank; write the first step's averaged gradients and checks to result_dir/rank{r}.

    Also written: the evaluation loss before training, every ``evaluate_every`` steps
    and at the end (every rank computes it on the whole set, so the ranks' values
    must agree) and the logged loss of each step.
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import safetensors.torch
    import torch.distributed as dist

    from . import pack

    pack.load(nodes=False)
    from comfyui_dreamtuner.dreamtuner_core.pretrain.config import TrainConfig
    from comfyui_dreamtuner.dreamtuner_core.pretrain.trainer import Trainer
    from comfyui_dreamtuner.dreamtuner_core.pretrain.world import setup_world

    world = setup_world()
    try:
        trainer = Trainer(TrainConfig(**config_kwargs), world, caption_conditioning)
        before_frozen = frozen_snapshot(trainer)
        before = {k: v.detach().clone() for k, v in trainer.encoder.state_dict().items()}
        grads, losses = {}, []
        trainer.on_gradients = lambda t: grads or grads.update(  # the first step's
            {k: p.grad.detach().clone() for k, p in t.encoder.named_parameters() if p.grad is not None})
        evaluations = [evaluation_loss(trainer)]

        def on_step(t, loss):
            losses.append(loss)
            if evaluate_every and t.step % evaluate_every == 0 and t.step < config_kwargs["max_steps"]:
                evaluations.append(evaluation_loss(t))

        trainer.run(max_steps=config_kwargs["max_steps"], on_step=on_step)
        evaluations.append(evaluation_loss(trainer))
        after_frozen = frozen_snapshot(trainer)
        unchanged = all(torch.equal(before_frozen[k], after_frozen[k]) for k in before_frozen)
        changed = [k for k, v in trainer.encoder.state_dict().items() if not torch.equal(v, before[k])]
        out = {f"grad.{k}": v for k, v in grads.items()}
        out["frozen_unchanged"] = torch.tensor(int(unchanged))
        out["frozen_count"] = torch.tensor(len(before_frozen))
        out["changed_count"] = torch.tensor(len(changed))
        out["evaluation"] = torch.tensor(evaluations, dtype=torch.float64)
        out["logged_loss"] = torch.tensor(losses, dtype=torch.float64)
        safetensors.torch.save_file(out, os.path.join(result_dir, f"rank{rank}.safetensors"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
