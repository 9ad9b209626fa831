"""The subject encoder pretrained in the part-marked world by the pack's own pipeline (world/README.md, "Fifth part").

    python -m world.encoder data       # renders -> scripts/prepare_encoder_data.py -> a prepared folder
    python -m world.encoder pretrain   # the pack's pretraining Trainer against the world's frozen models
    python -m world.encoder pretrain --init-encoder /tmp/dreamtuner_world_encoder/run/subject_encoder.safetensors \
        --lr 1e-3 --folder run2          # its second 1000 steps (the shipped encoder: run2's)
    torchrun --nproc-per-node 2 -m world.encoder pretrain    # the same in a process group (gloo on CPUs)
    python -m world.encoder ship       # the trained encoder into world/models, listed in the manifest
    python -m world.encoder effect     # plain vs the encoder over beta, a broken variant, with SSA

What is the pack's: the data preparation is ``scripts/prepare_encoder_data.py`` run as a user runs it (the
generator's masks and layout channel given as --masks / --depth, a caption .txt beside each picture); the
training is ``dreamtuner_core.pretrain``'s Trainer (data order, the paper's augmentation and background
whitening, Eq. 1 through the host's ``apply_model``, checkpoints, the encoder file). What is the world's: the
frozen models (``world_frozen``, in place of FrozenModels' loaders, which cannot detect files this small;
world/host.py says why) and the image encoder (host.CLIP_VISION_CONFIG, ``world.build --marks --only
clip_vision``). The world has no ControlNet yet, so the pretraining runs without one (the paper's "with vs
without the ControlNet" ablation is left).
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from . import experiment, generator, host
from .base_report import RESULTS, grid_png

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORK = pathlib.Path(tempfile.gettempdir()) / "dreamtuner_world_encoder"
# The paper's CLIP layers (25, 4, 8, 12, 16 of ViT-H/14's 32) at the same relative depths of the world's
# 6-layer image encoder (a repeated index dropped).
CLIP_LAYERS = (5, 1, 2, 3)
# A broken variant (issue 19): the encoder reads each feature one layer deeper than it was trained on.
SHIFTED_LAYERS = tuple(i + 1 for i in CLIP_LAYERS)
IMAGES = 6000
STEPS = 1000
LR = 5e-4
BETAS = (0.2, 0.5, 1.0, 2.0)
# The control: each case scored against its own reference while the encoder is shown another held-out subject's.
OTHER_SUBJECT = "encoder beta=1, another subject's reference"
OTHER_OFFSET = 100  # the other subject: held-out case index + this


def world_frozen(device=torch.device("cpu")):
    """The frozen models of a pretraining run in the world: the pack's ``FrozenModels`` (its cached caption
    encoding, ``text``), holding the world's host-class models from the shipped files instead of what its
    loaders read; no ControlNet."""
    FrozenModels = host.pack_module("dreamtuner_core.pretrain.frozen_models").FrozenModels

    class WorldFrozen(FrozenModels):
        def __init__(self):  # FrozenModels.__init__ loads files the host's loaders detect; these are the world's
            self.patcher, self.vae, self.clip = host.world_models(host.MARKS_UNET_FILE)
            self.base, self.clip_vision = self.patcher.model, host.world_clip_vision()
            self.device, self.text_conditioning, self._text = device, None, collections.OrderedDict()
            for module in self.frozen_modules().values():
                module.requires_grad_(False).eval()

        def frozen_modules(self):
            return {"unet": self.base.diffusion_model, "clip_vision": self.clip_vision.model,
                    "vae": self.vae.first_stage_model, "text_encoder": self.clip.cond_stage_model}

        def control(self, *args, **kwargs):
            return None  # the world has no ControlNet yet: the UNet runs without residuals

    return WorldFrozen()


def write_renders(folder: pathlib.Path, n: int, seed: int = 5):
    """Renders of training subjects in training captions, as a user's folder: images with caption .txt files
    beside them, and the generator's masks (white = subject) and layout channel (white = near) as their own."""
    from PIL import Image

    for sub in ("images", "masks", "depth"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        subject = generator.draw_subject(rng, False)
        caption = generator.draw_caption(rng, subject.family, False)
        image, mask, layout, _ = generator.render(subject, caption, rng)
        name = f"{i:05d}"
        Image.fromarray(image).save(folder / "images" / f"{name}.png")
        (folder / "images" / f"{name}.txt").write_text(caption.text)
        Image.fromarray((mask * 255).astype(np.uint8)).save(folder / "masks" / f"{name}.png")
        Image.fromarray((layout * 255).astype(np.uint8)).save(folder / "depth" / f"{name}.png")


def prepare(work: pathlib.Path, n: int):
    """The pack's data preparation, run as its command line (one worker: the manifest lists the images in
    the order of their names, so a rebuild trains on the same data order)."""
    write_renders(work / "renders", n)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_encoder_data.py"),
                    "--images", str(work / "renders" / "images"), "--masks", str(work / "renders" / "masks"),
                    "--depth", str(work / "renders" / "depth"), "--out", str(work / "prepared"),
                    "--min-size", "32", "--max-size", "32", "--workers", "1", "--quiet"], check=True)


def train_config(work: pathlib.Path, steps: int, lr: float, resume=None, overwrite=False, init=None, run="run"):
    """The run's settings, as scripts/pretrain_subject_encoder.py would build them from its options."""
    TrainConfig = host.pack_module("dreamtuner_core.pretrain.config").TrainConfig
    return TrainConfig(
        data=str(work / "prepared"), checkpoint=str(host.MODELS / host.MARKS_UNET_FILE), controlnet="none",
        clip_vision=str(host.MODELS / host.CLIP_VISION_FILE), out=str(work / run), clip_layers=CLIP_LAYERS,
        init_encoder=None if init is None else str(init),
        size=32, global_batch=16, batch_per_device=16 // int(os.environ.get("WORLD_SIZE", "1")), lr=lr,
        warmup_steps=50, max_steps=steps, checkpoint_every=250, seed=0, beta=1.0, precision="fp32", workers=0, encoder_dtype="float32",
        resume=resume, overwrite=overwrite)


def pretrain(config):
    """The pack's pretraining with the world's frozen models, in torchrun's process group when there is one."""
    return host.pack_module("dreamtuner_core.pretrain.trainer").train(config, frozen=world_frozen)


def ship(work: pathlib.Path, seconds: dict):
    import shutil

    from . import build

    source = work / "run2" / "subject_encoder.safetensors"
    with host.core_files().replacing(host.MODELS / host.ENCODER_FILE) as partial:
        shutil.copyfile(source, partial)
    build.write_manifest(seconds, marks=True)


# ----------------------------------------------------------------------------- the effect over beta

def settings(betas=BETAS):
    """Plain; the encoder over beta; the broken variant; the encoder with self-subject-attention."""
    out = [experiment.Setting()]
    out += [experiment.Setting(beta=float(b)) for b in betas]
    out += [experiment.Setting(beta=1.0, encoder_layers=SHIFTED_LAYERS),
            experiment.Setting(3.0, "subject"), experiment.Setting(3.0, "subject", beta=1.0)]
    return out


def effect(subjects, seeds, betas, out: pathlib.Path):
    from . import effect as effect_command

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    world = experiment.World(host.MARKS_UNET_FILE)
    rows, grid = [], []
    for i in range(subjects):
        case = experiment.make_case(i)
        oracle = experiment.score(experiment.oracle_images(case, seeds), case)
        rows += effect_command.score_rows(case, "oracle (renders)", oracle, seeds)
        shown = {}
        for setting in settings(betas):
            images, scores = world.run(case, setting, seeds)
            rows += effect_command.score_rows(case, setting.name, scores, seeds)
            shown[setting.name] = images[0]
        swapped = experiment.with_reference_of(case, experiment.make_case(i + OTHER_OFFSET))
        _, scores = world.run(swapped, experiment.Setting(beta=1.0), seeds)
        rows += effect_command.score_rows(case, OTHER_SUBJECT, scores, seeds)
        if i < 8:
            grid.append([case.reference_image, shown["plain"], shown["encoder beta=1"],
                         shown["ssa w=3 mask=subject"], shown["ssa w=3 mask=subject encoder beta=1"]])
        print(f"subject {i + 1}/{subjects} ({time.time() - t0:.0f} s)", flush=True)
    table = effect_command.write_rows(rows, out / "encoder.csv", seeds)
    header = (f"The subject encoder pretrained in the part-marked world ({host.ENCODER_FILE}): {subjects} held-out "
              f"subjects x {seeds} seeds, {experiment.SAMPLER} {experiment.STEPS} steps, cfg {experiment.CFG}; "
              f"columns as in effect.md. Time: {time.time() - t0:.0f} s.")
    effect_command.write_table(table, header, out / "encoder.md")
    grid_png(grid, out / "encoder_grid.png")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["data", "pretrain", "ship", "effect"])
    parser.add_argument("--work", type=pathlib.Path, default=WORK, help="the prepared folder and the run's folder")
    parser.add_argument("--images", type=int, default=IMAGES)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--resume", default=None, help="'latest' continues the run in --work")
    parser.add_argument("--overwrite", action="store_true", help="start the run over")
    parser.add_argument("--init-encoder", type=pathlib.Path, default=None, help="continue from this encoder file")
    parser.add_argument("--folder", default="run", help="the run's folder in --work")
    parser.add_argument("--subjects", type=int, default=24)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--betas", type=float, nargs="*", default=BETAS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    host.setup(args.threads)
    host.use_marks()
    t0 = time.time()
    if args.step == "data":
        prepare(args.work, args.images)
    elif args.step == "pretrain":
        pretrain(train_config(args.work, args.steps, args.lr, args.resume, args.overwrite, args.init_encoder, args.folder))
    elif args.step == "ship":
        ship(args.work, {})
    else:
        effect(args.subjects, args.seeds, args.betas, RESULTS / "marks")
    print(f"{args.step}: {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
