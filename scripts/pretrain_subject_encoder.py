"""Pretrain a DreamTuner subject encoder (paper 3.1) on a prepared data folder.

One process (CPU or one GPU):
    python scripts/pretrain_subject_encoder.py --data data/ --checkpoint v1-5.safetensors \\
        --controlnet control_v11f1p_sd15_depth.safetensors --clip-vision CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors \\
        --out runs/se1/
Several GPUs / nodes: the same arguments under torchrun (--nproc_per_node, --nnodes, --rdzv-backend c10d ...).
Resume: the same command with --resume latest (only --max-steps, the checkpoint cadence, --keep-checkpoints,
--workers, --batch-per-device, --precision, --gradient-checkpointing, --encoder-dtype and the number of
processes may change; any other setting that differs is refused, named). A fresh run refuses a non-empty
--out unless --overwrite is given (which removes the earlier run's files there first).

Run from the ComfyUI folder (or with ComfyUI's ``comfy`` package importable), with ComfyUI's Python.
Writes OUT/subject_encoder.safetensors (load it with SubjectEncoderLoader), OUT/encoders/ (one per
checkpoint), OUT/checkpoints/, OUT/loss.csv and OUT/loss.png.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def clip_layers(text):
    """--clip-layers: comma-separated whole numbers (CLIP hidden-state indices)."""
    try:
        layers = tuple(int(i) for i in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a comma-separated list of CLIP hidden-state indices; give whole numbers such as "
            "25,4,8,12,16 (the paper's)") from None
    if any(i < 0 for i in layers):
        raise argparse.ArgumentTypeError(f"'{text}' has a negative index; give indices 0 or above, such as 25,4,8,12,16")
    return layers


def positive_int(text):
    """A whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number; give 1 or more") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1; give 1 or more")
    return value


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", required=True, help="prepared folder (scripts/prepare_encoder_data.py)")
    a("--checkpoint", required=True, help="SD1.5 checkpoint file (frozen UNet, VAE and CLIP text encoder)")
    a("--controlnet", required=True, help="depth ControlNet file for that model (frozen; fed each depth map)")
    a("--clip-vision", required=True, help="CLIP vision file (OpenCLIP ViT-H/14, as the CLIPVisionLoader loads)")
    a("--clip-vision-config", default=None, help="HF-style config JSON for a CLIP vision file the host does not recognise")
    a("--out", required=True, help="run folder (checkpoints, encoders, loss log)")
    a("--init-encoder", default=None, help="start from this encoder file instead of a fresh one")
    a("--clip-layers", type=clip_layers, default=(25, 4, 8, 12, 16), help="CLIP hidden-state indices, in order (paper: 25,4,8,12,16)")
    a("--resblocks", type=int, default=4, help="ResBlocks of a fresh encoder")
    a("--size", type=positive_int, default=512, help="training resolution in px (square)")
    a("--global-batch", type=positive_int, default=16, help="samples per optimizer step = per-device batch x processes x accumulation")
    a("--batch-per-device", type=positive_int, default=1, help="samples per process per forward")
    a("--lr", type=float, default=1e-5, help="AdamW learning rate (paper: 1e-5)")
    a("--weight-decay", type=float, default=0.0)
    a("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up")
    a("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 = off)")
    a("--max-steps", type=positive_int, default=10000, help="optimizer steps in total (a resumed run continues to it)")
    a("--checkpoint-every", type=positive_int, default=500, help="steps between checkpoints (and encoder files)")
    a("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    a("--seed", type=int, default=0, help="seeds the encoder's init, data order, augmentation, noise")
    a("--beta", type=float, default=1.0, help="S-E-A scale during training (paper: 1.0)")
    a("--control-strength", type=float, default=1.0, help="depth ControlNet strength")
    a("--no-augment", action="store_true", help="no augmentation of the reference")
    a("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 autocast on GPUs that have it")
    a("--gradient-checkpointing", action="store_true", help="recompute the UNet's ResBlocks in the backward pass (less memory)")
    a("--workers", type=int, default=2, help="data loader processes per training process")
    a("--encoder-dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="storage dtype of encoder files")
    a("--resume", default=None, help="a checkpoint file, or 'latest' (the newest in OUT/checkpoints)")
    a("--overwrite", action="store_true",
      help="start over in a non-empty --out: remove its earlier run (checkpoints/, encoders/, loss log, encoder)")
    a("--no-progress", action="store_true", help="no progress bar (logs only)")
    return p


def _stop(signum, frame):
    """SIGTERM (Slurm's pre-emption, torchrun stopping its workers) ends the run as Ctrl-C does."""
    raise KeyboardInterrupt


def main(argv=None):
    args = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    sys.path.insert(0, os.getcwd())
    if not torch.cuda.is_available():
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
    sys.path.append(str(ROOT))  # after ComfyUI's own modules
    from dreamtuner_devtools import pack

    pack.load(nodes=False)  # the core as comfyui_dreamtuner.dreamtuner_core, its one import name
    from comfyui_dreamtuner.dreamtuner_core.errors import DreamTunerInputError
    from comfyui_dreamtuner.dreamtuner_core.pretrain.config import TrainConfig
    from comfyui_dreamtuner.dreamtuner_core.pretrain.trainer import train

    config = TrainConfig(
        data=args.data, checkpoint=args.checkpoint, controlnet=args.controlnet, clip_vision=args.clip_vision,
        out=args.out, clip_vision_config=args.clip_vision_config, init_encoder=args.init_encoder,
        clip_layers=args.clip_layers, resblocks=args.resblocks, size=args.size,
        global_batch=args.global_batch, batch_per_device=args.batch_per_device, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, max_grad_norm=args.max_grad_norm,
        max_steps=args.max_steps, checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
        seed=args.seed, beta=args.beta, control_strength=args.control_strength, augment=not args.no_augment,
        precision=args.precision, gradient_checkpointing=args.gradient_checkpointing, workers=args.workers,
        encoder_dtype=args.encoder_dtype, resume=args.resume, overwrite=args.overwrite,
        progress=not args.no_progress)
    try:
        trainer = train(config)
    except DreamTunerInputError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print(f"interrupted: the last complete checkpoint in {os.path.join(args.out, 'checkpoints')} is kept; "
                  "continue with the same command and --resume latest", file=sys.stderr)
        sys.exit(130)
    if trainer.world.main:
        print(f"wrote {os.path.join(args.out, 'subject_encoder.safetensors')} after {trainer.step} steps")


if __name__ == "__main__":
    main()
