"""One rank of the 2-process gloo pretraining test (started by torch.multiprocessing from test_pretrain.py).

Imports the pack's core as ``dreamtuner_core`` (a fresh process, as the CLI does).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def caption_conditioning(caption, dim=768):
    """A fixed CLIP-text-shaped conditioning per caption (the PyPI comfy core cannot build CLIP-L's tokenizer)."""
    seed = int.from_bytes(hashlib.sha256(caption.encode()).digest()[:4], "little")
    return torch.randn((1, 77, dim), generator=torch.Generator().manual_seed(seed))


def frozen_snapshot(trainer):
    return {f"{name}.{k}": v.detach().clone() for name, module in trainer.frozen.frozen_modules().items()
            for k, v in module.state_dict().items()}


def ddp_step(rank, world_size, port, config_kwargs, result_dir):
    """Run one optimizer step on this rank; write its averaged gradients and checks to result_dir/rank{r}."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    sys.path.insert(0, str(ROOT))
    import safetensors.torch
    import torch.distributed as dist
    from dreamtuner_core.pretrain import Trainer, TrainConfig, setup_world

    world = setup_world()
    try:
        trainer = Trainer(TrainConfig(**config_kwargs), world, caption_conditioning)
        before_frozen = frozen_snapshot(trainer)
        before = {k: v.detach().clone() for k, v in trainer.encoder.state_dict().items()}
        grads = {}
        trainer.on_gradients = lambda t: grads.update(
            {k: p.grad.detach().clone() for k, p in t.encoder.named_parameters()})
        trainer.run(max_steps=config_kwargs["max_steps"])
        after_frozen = frozen_snapshot(trainer)
        unchanged = all(torch.equal(before_frozen[k], after_frozen[k]) for k in before_frozen)
        changed = [k for k, v in trainer.encoder.state_dict().items() if not torch.equal(v, before[k])]
        out = {f"grad.{k}": v for k, v in grads.items()}
        out["frozen_unchanged"] = torch.tensor(int(unchanged))
        out["frozen_count"] = torch.tensor(len(before_frozen))
        out["changed_count"] = torch.tensor(len(changed))
        safetensors.torch.save_file(out, os.path.join(result_dir, f"rank{rank}.safetensors"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
