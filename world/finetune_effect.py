"""Subject-driven fine-tuning's effect in the world. ``python -m world.finetune_effect``.

For N held-out subjects x S seeds: the reference render (its mask whitens the background) and R regular
images (the shipped model's own samples of the reference's caption, as the paper makes them from the
class prompt) go through the pack's fine-tune (``dreamtuner_core.finetune.finetune``, what the
DreamTunerFinetune node calls, with the class word ``case.subject.word``); the prompt is then sampled
with ``embedding:<name>`` right after the class word, encoded through the CLIP the fine-tune returns,
and scored with ``experiment.score``. Rows:

- ``plain``: the shipped model, the plain prompt;
- ``[S*] only``: unet_mode ``none: [S*] only`` (Textual Inversion-like: the UNet is not trained);
- ``LoRA + [S*]``: unet_mode ``lora`` (DreamBooth-like);
- ``LoRA, [S*] not read``: the LoRA model sampled with the plain prompt (the broken variant: [S*] trained
  but never read).

Writes world/results/finetune.csv (one row per subject, seed and row), finetune.md (mean +- spread over
seeds, as world/effect.py) and finetune_grid.png (reference | plain | [S*] only | LoRA + [S*]).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import tempfile
import time

import torch

from . import experiment, host
from .base_report import RESULTS, grid_png
from .effect import METRICS, write_rows

# Chosen from a short schedule on this CPU (world/README.md, "Fine-tuning in the world").
STEPS = 200
LORA_LR = 2e-3
TOKEN_LR = 1e-2
RANK = 4
REGULAR = 8

PLAIN, TOKEN, LORA, NOT_READ = "plain", "[S*] only", "LoRA + [S*]", "LoRA, [S*] not read"
ROWS = (PLAIN, TOKEN, LORA, NOT_READ)


@dataclasses.dataclass(frozen=True)
class Schedule:
    steps: int = STEPS
    unet_lr: float = LORA_LR
    token_lr: float = TOKEN_LR
    rank: int = RANK
    regular: int = REGULAR


def with_token(caption_text: str, word: str, name: str) -> str:
    """The caption with embedding:<name> right after the class word, where training put [S*] ('a <word> [S*]')."""
    out, n = re.subn(rf"\b{re.escape(word)}\b", f"{word} embedding:{name}", caption_text, count=1)
    if n != 1:
        raise ValueError(f"class word {word!r} not in caption {caption_text!r}")
    return out


def regular_images(world, case, n: int):
    """The shipped model's own samples of the reference's caption (the paper's regular images)."""
    return world.sample(world.unet, world.text(case.reference_caption.text), n, seed=10_000 + case.index)


def fine_tune(world, case, mode: str, schedule: Schedule, folders, regular):
    from comfyui_dreamtuner.dreamtuner_core import finetune as ft

    settings = ft.FinetuneSettings(class_word=case.subject.word, name=f"s{case.index}_{'lora' if mode == ft.UNET_LORA else 'ti'}",
                                   steps=schedule.steps, unet_lr=schedule.unet_lr, token_lr=schedule.token_lr,
                                   rank=schedule.rank, seed=case.index, unet_mode=mode)
    with host.fast_attention():  # the host's SDPA attention (same maths; its CPU default is ~10x slower here)
        result = ft.finetune(world.unet, world.clip, world.vae, case.reference_image[None], regular, settings,
                             folders, mask=case.reference_mask[None], overwrite=True)
    return result, settings.name


def run_case(world, case, seeds: int, schedule: Schedule, folders, rows=ROWS):
    """{row: (images [seeds, 32, 32, 3], scores)} for one held-out subject; the same noise for every row."""
    from comfyui_dreamtuner.dreamtuner_core import finetune as ft

    out, timing = {}, {}
    prompt = case.prompt.text
    if PLAIN in rows:
        out[PLAIN] = world.run(case, experiment.Setting(), seeds)
    t0 = time.time()
    regular = regular_images(world, case, schedule.regular)
    timing["regular"] = time.time() - t0
    for row, mode in ((TOKEN, ft.UNET_NONE), (LORA, ft.UNET_LORA)):
        if row not in rows and not (row == LORA and NOT_READ in rows):
            continue
        t0 = time.time()
        result, name = fine_tune(world, case, mode, schedule, folders, regular)
        timing[row] = time.time() - t0
        with torch.no_grad():  # as the host runs CLIPTextEncode (the old core writes its token table in place)
            positive = host.encode_text(result.clip, with_token(prompt, case.subject.word, name))
            plain_prompt = host.encode_text(result.clip, prompt)
        images = world.sample(result.model, positive, seeds, seed=case.index)
        if row in rows:
            out[row] = (images, experiment.score(images, case))
        if row == LORA and NOT_READ in rows:
            images = world.sample(result.model, plain_prompt, seeds, seed=case.index)
            out[NOT_READ] = (images, experiment.score(images, case))
    return out, timing


def make_world(embeddings_dir: str):
    """The shipped world whose CLIP tokenizer reads embedding:<name> from ``embeddings_dir``."""
    world = experiment.World()
    for tokenizer in vars(world.clip.tokenizer).values():
        if hasattr(tokenizer, "embedding_directory"):
            tokenizer.embedding_directory = embeddings_dir
    return world


def folders_in(root: str):
    host.setup()
    host.load_pack()
    from comfyui_dreamtuner.dreamtuner_core.finetune import OutputFolders

    return OutputFolders(f"{root}/loras", f"{root}/embeddings", f"{root}/dreamtuner")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--unet-lr", type=float, default=LORA_LR)
    parser.add_argument("--token-lr", type=float, default=TOKEN_LR)
    parser.add_argument("--rank", type=int, default=RANK)
    parser.add_argument("--regular", type=int, default=REGULAR)
    parser.add_argument("--grid-subjects", type=int, default=8)
    parser.add_argument("--out", default="finetune", help="file stem under world/results/")
    args = parser.parse_args(argv)
    schedule = Schedule(args.steps, args.unet_lr, args.token_lr, args.rank, args.regular)
    RESULTS.mkdir(exist_ok=True)
    t0 = time.time()
    rows, grid, timings = [], [], []
    with tempfile.TemporaryDirectory() as root:
        folders = folders_in(root)
        world = make_world(folders.embeddings)
        for i in range(args.subjects):
            case = experiment.make_case(i)
            results, timing = run_case(world, case, args.seeds, schedule, folders)
            timings.append(timing)
            for name, (_, scores) in results.items():
                rows += [{"subject": case.subject.name, "seed": s, "setting": name,
                          **{m: float(scores[m][s]) for m in METRICS}} for s in range(args.seeds)]
            if i < args.grid_subjects:
                grid.append([case.reference_image] + [results[r][0][0] for r in (PLAIN, TOKEN, LORA)])
            print(f"subject {i + 1}/{args.subjects} ({time.time() - t0:.0f} s; fine-tunes "
                  f"{timing[TOKEN]:.0f} + {timing[LORA]:.0f} s)", flush=True)
    seconds = time.time() - t0
    per = {k: sum(t[k] for t in timings) / len(timings) for k in timings[0]}

    table = write_rows(rows, RESULTS / f"{args.out}.csv", args.seeds)
    lines = [f"{args.subjects} held-out subjects x {args.seeds} seeds, {experiment.SAMPLER} {experiment.STEPS} steps, "
             f"cfg {experiment.CFG}; fine-tune {schedule.steps} steps (batch 2), LoRA rank {schedule.rank} at "
             f"{schedule.unet_lr:g}, [S*] at {schedule.token_lr:g}, {schedule.regular} regular images (the model's "
             "samples of the reference's caption). Mean +- spread over seeds (std of the per-seed means). "
             f"Time: {seconds:.0f} s (per subject: regular images {per['regular']:.1f} s, [S*]-only fine-tune "
             f"{per[TOKEN]:.1f} s, LoRA fine-tune {per[LORA]:.1f} s; 2 shared CPU cores, 1 torch thread).", "",
             "| setting | identity | pattern | scene | time | position |", "|---|---|---|---|---|---|"]
    for name, metrics in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[m][0]:.3f} +- {metrics[m][1]:.3f}" for m in METRICS)
                     + " |")
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    grid_png(grid, RESULTS / f"{args.out}_grid.png")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
