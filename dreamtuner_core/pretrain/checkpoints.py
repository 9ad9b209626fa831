"""Checkpoints of a run: safetensors with JSON in its metadata (no pickle), written to a temporary file and
renamed; the trained encoder exported beside them; every rank's RNG state; resuming."""

from __future__ import annotations

import dataclasses
import json
import os
import random

import torch
import torch.distributed as dist

from ..errors import DreamTunerInputError
from ..files import write_safetensors
from ..subject_encoder.file import save_encoder
from ..subject_encoder.model import EncoderConfig, SubjectEncoder
from .config import RESUMABLE_CHANGES, config_differences, flag_name
from .run_files import RunFiles

CHECKPOINT_FORMAT = "dreamtuner.pretrain_checkpoint"

def export_encoder(trainer):
    """A copy of the trained encoder in the file's storage dtype (the loader casts it at use)."""
    encoder = SubjectEncoder(trainer.encoder.config)
    encoder.load_state_dict({k: v.detach().cpu() for k, v in trainer.encoder.state_dict().items()})
    return encoder.to(getattr(torch, trainer.config.encoder_dtype))


def training_metadata(trainer):
    c = trainer.config
    return {"training": json.dumps({
        "step": trainer.step, "samples": trainer.step * c.global_batch, "images": len(trainer.dataset),
        "checkpoint": os.path.basename(c.checkpoint), "controlnet": os.path.basename(c.controlnet),
        "clip_vision": os.path.basename(c.clip_vision), "lr": c.lr, "global_batch": c.global_batch,
        "size": c.size, "beta": c.beta, "seed": c.seed, "paper": "DreamTuner 3.1"})}


def rng_state():
    import numpy

    state = numpy.random.get_state()
    return {"python": _jsonable(random.getstate()),
            "numpy": [state[0], state[1].tolist(), int(state[2]), int(state[3]), float(state[4])],
            "torch": torch.get_rng_state().tolist(),
            "cuda": torch.cuda.get_rng_state().tolist() if torch.cuda.is_available() else None}


def save_checkpoint(trainer, out):
    """Every rank's RNG state to rank 0, which writes checkpoint + encoder atomically; then all wait."""
    states = [None] * trainer.world.size
    if trainer.world.size > 1:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    if trainer.world.main:
        tensors = {f"encoder.{k}": v.detach().cpu().contiguous() for k, v in trainer.encoder.state_dict().items()}
        optimizer = trainer.optimizer.state_dict()
        for index, values in optimizer["state"].items():
            for name, value in values.items():
                tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).cpu().contiguous()
        state = {"step": trainer.step, "scheduler": _jsonable(trainer.scheduler.state_dict()),
                 "optimizer_param_groups": _jsonable(optimizer["param_groups"]),
                 "data_order": {"sampler": "DistributedSampler(shuffle, drop_last)", "seed": trainer.config.seed,
                                "epoch": trainer.step // trainer.steps_per_epoch,
                                "step_in_epoch": trainer.step % trainer.steps_per_epoch, "world_size": trainer.world.size,
                                "batch_per_device": trainer.config.batch_per_device,
                                "accumulation": trainer.accumulation, "global_batch": trainer.config.global_batch},
                 "rng": states, "config": _jsonable(dataclasses.asdict(trainer.config))}
        metadata = {"format": CHECKPOINT_FORMAT, "state": json.dumps(state), **trainer.encoder.config.to_metadata()}
        path = out.checkpoint_path(trainer.step)
        write_safetensors(tensors, metadata, path)
        save_encoder(export_encoder(trainer), out.encoder_path(trainer.step), extra_metadata=training_metadata(trainer))
        out.prune(trainer.config.keep_checkpoints)
        out.plot()
    trainer.world.barrier()


def load_checkpoint(trainer, path):
    import numpy
    import safetensors

    with safetensors.safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise DreamTunerInputError(f"--resume '{path}' is not a pretraining checkpoint of this pack.")
    state = json.loads(metadata["state"])
    if EncoderConfig.from_metadata(metadata) != trainer.encoder.config:
        raise DreamTunerInputError(f"--resume '{path}' holds an encoder of another shape than this run's "
                                   "(other --clip-layers, --resblocks or base model); resume with the same settings.")
    differences = config_differences(state.get("config") or {}, trainer.config)
    if differences:
        named = "; ".join(f"{flag} was {stored!r}, now {current!r}" for flag, stored, current in differences)
        may = ", ".join(sorted(flag_name(n) for n in RESUMABLE_CHANGES - {"out", "resume", "overwrite"}))
        raise DreamTunerInputError(
            f"--resume '{path}' was made with other settings: {named}. Resume with the run's settings (only "
            f"{may} may change), or start a new run in another --out (or with --overwrite, without --resume).")
    order = state["data_order"]
    if order["global_batch"] != trainer.config.global_batch or order["seed"] != trainer.config.seed:
        raise DreamTunerInputError(
            f"--resume '{path}' was made with --global-batch {order['global_batch']} and --seed {order['seed']}; "
            "resume with the same values (the data order depends on them).")
    trainer.encoder.load_state_dict({k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")})
    optimizer_state = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            optimizer_state.setdefault(int(index), {})[name] = value.to(trainer.world.device) if value.ndim else value
    trainer.optimizer.load_state_dict({"state": optimizer_state, "param_groups": state["optimizer_param_groups"]})
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.step = int(state["step"])
    mine = state["rng"][trainer.world.rank] if trainer.world.rank < len(state["rng"]) else state["rng"][0]
    random.setstate(_tuples(mine["python"]))
    numpy.random.set_state((mine["numpy"][0], numpy.array(mine["numpy"][1], dtype=numpy.uint32),
                            *mine["numpy"][2:]))
    torch.set_rng_state(torch.tensor(mine["torch"], dtype=torch.uint8))
    if mine.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(mine["cuda"], dtype=torch.uint8))
    if order["world_size"] != trainer.world.size and trainer.world.main:
        print(f"note: resuming a {order['world_size']}-process run with {trainer.world.size} processes: the same "
              "samples per epoch, shared out differently, so the run is not bit-identical to an uninterrupted one")


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
