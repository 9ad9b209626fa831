"""Fine-tuning step time and peak memory: DreamTunerFinetune's trainer against the core TrainLoraNode (v0.15.1).

Both train a LoRA of the same rank on the same random-weight SD1.5 UNet (860 M parameters, built through
ComfyUI's own classes), at the same resolution, batch 2, AdamW, fp32 on the CPU. The pack's step also
runs the CLIP-L text encoder forward and backward for the [S*] token (the core trainer takes fixed
conditionings). Each trainer runs in its own process (a clean memory peak); a run's step time is the
median of the times between consecutive steps' losses (the first step, with the set-up, is not timed).
The trainers' runs are interleaved over ``--repeats`` rounds (core, pack, then pack, core, ...), so a slow
spell of a shared machine touches both alike; each figure is the median over the rounds with its range
(min-max). A ratio whose ranges overlap 1.0 is not a measured difference.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/ComfyUI/venv/bin/python benchmarks/finetune_benchmark.py
    ... --size 512 --steps 20                       # GPU figures
    ... --size 512 --steps 800 --repeats 1 --trainers pack   # the paper-sized run: 800 steps at 512 px

Without COMFYUI_PATH it says so and exits (the core trainer exists only in current ComfyUI).
Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the process's resident memory,
sampled every 2 ms, as the rise during training above the level after the models were built.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from peak_memory import PeakMemory  # noqa: E402  (beside this script)


def _setup(args):
    """The host's comfy on the path (ComfyUI's own folder first), the pack loaded as ComfyUI loads it."""
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    sys.path.append(str(ROOT))  # after ComfyUI's own modules
    import torch

    from dreamtuner_devtools import pack

    pack.cpu_unless_cuda()
    pack.load()  # the pack as package comfyui_dreamtuner, as ComfyUI loads it
    from dreamtuner_devtools import tiny_models as tm

    from comfyui_dreamtuner.dreamtuner_core.families import SD15_UNET

    torch.set_num_threads(args.threads or torch.get_num_threads())
    model = {"sd15": lambda: tm.build("sd15", unet_config=SD15_UNET), "sd15-narrow": lambda: tm.build("sd15_narrow"),
             "tiny": lambda: tm.build("sd15")}[args.model]()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        model.load_device = device
    return torch, tm, model, device


def _clip(tm, model_name):
    """CLIP-L through the host's classes (random weights); the tiny host CLIP for ``--model tiny``."""
    if model_name == "tiny":
        return tm.clip_text()
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    clip = comfy.sd.CLIP(target=comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer,
                                                                         comfy.sd1_clip.SD1ClipModel))
    tm.init_weights(clip.cond_stage_model, 31)
    return clip


def _timed_steps(stamps):
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return statistics.median(gaps) if gaps else float("nan")


def child_core(args):
    torch, tm, model, device = _setup(args)
    import comfy_extras.nodes_train as nodes_train

    stamps = []
    original = nodes_train.TrainSampler.fwd_bwd

    def fwd_bwd(self, *a, **k):
        loss = original(self, *a, **k)
        stamps.append(time.perf_counter())
        return loss

    nodes_train.TrainSampler.fwd_bwd = fwd_bwd
    size = args.size // 8
    latents = {"samples": tm.latent(1, size, size, batch=2)}
    positive = [tm.conditioning(model, 1)]
    dtype = "bf16" if device.type == "cuda" else "fp32"
    with PeakMemory(device) as memory:
        nodes_train.TrainLoraNode.execute(
            [model], [latents], positive, [2], [args.steps], [1], [1e-4], [args.rank], ["AdamW"], ["MSE"], [0],
            [dtype], ["fp32"], ["LoRA"], [args.checkpointing], [1], [False], ["[None]"], [False], [False])
    return {"step_s": _timed_steps(stamps), "peak": memory.peak, "rise": memory.rise}


def child_pack(args):
    torch, tm, model, device = _setup(args)
    from comfyui_dreamtuner.dreamtuner_core import finetune as ft

    clip = _clip(tm, args.model)
    size = args.size // 8
    ref = tm.latent(2, size, size)
    reg = tm.latent(3, size, size, batch=4)
    settings = ft.FinetuneSettings(class_word="dog", name="bench", steps=args.steps, rank=args.rank,
                                   gradient_checkpointing=args.checkpointing)
    stamps = []
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        ft.train(model, clip, settings, (ref, ref.flip(-1)), (reg, reg.flip(-1)),
                 progress=lambda step, total, loss: stamps.append(time.perf_counter()))
        total = time.perf_counter() - start
    return {"step_s": _timed_steps(stamps), "peak": memory.peak, "rise": memory.rise, "total_s": total}


def _figure(values, scale=1.0, digits=3):
    """median (min-max) of a list of figures."""
    values = [v / scale for v in values]
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="training resolution in pixels")
    parser.add_argument("--steps", type=int, default=4, help="steps per trainer run (the first is not timed)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the trainers")
    parser.add_argument("--trainers", default="core,pack", help="which trainers: core, pack or both")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--model", choices=["sd15", "sd15-narrow", "tiny"], default="sd15",
                        help="the full SD1.5 UNet, a two-level one of SD1.5's widths (for small machines), or the "
                             "tests' tiny one (--model tiny: a check that the script runs, no figure)")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in both")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--child", choices=["core", "pack"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not os.environ.get("COMFYUI_PATH"):
        print("COMFYUI_PATH is not set: the core TrainLoraNode exists only in current ComfyUI (v0.15.1); "
              "run with COMFYUI_PATH=/path/to/ComfyUI and that installation's Python.")
        return
    if args.child:
        result = child_core(args) if args.child == "core" else child_pack(args)
        print("RESULT " + json.dumps(result))
        return
    trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    if not trainers or any(t not in ("core", "pack") for t in trainers):
        parser.error(f"--trainers {args.trainers!r}: give core, pack or core,pack")
    results = {which: [] for which in trainers}
    for round_ in range(args.repeats):
        order = trainers if round_ % 2 == 0 else trainers[::-1]  # interleaved, the order alternating
        for which in order:
            command = [sys.executable, __file__, "--child", which, "--size", str(args.size), "--steps",
                       str(args.steps), "--rank", str(args.rank), "--threads", str(args.threads),
                       "--model", args.model] + (["--checkpointing"] if args.checkpointing else [])
            out = subprocess.run(command, capture_output=True, text=True, cwd=os.environ["COMFYUI_PATH"])
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                print(out.stdout[-2000:], out.stderr[-4000:])
                raise SystemExit(f"the {which} trainer failed")
            results[which].append(json.loads(lines[-1][len("RESULT "):]))
    mib = 2 ** 20
    what = (f"{args.model} UNet, {args.size}x{args.size} px, batch 2, LoRA rank {args.rank}, {args.steps} steps"
            f"{', gradient checkpointing' if args.checkpointing else ''}, {args.repeats} interleaved rounds")
    print(what + "; median (min-max) over the rounds")
    names = {"core": "core TrainLoraNode", "pack": "DreamTunerFinetune"}
    for which, runs in results.items():
        step, peak, rise = ([r[k] for r in runs] for k in ("step_s", "peak", "rise"))
        total = [r["total_s"] for r in runs if "total_s" in r]
        print(f"  {names[which]:20s} step {_figure(step)} s   peak {_figure(peak, mib, 0)} MiB   "
              f"rise {_figure(rise, mib, 0)} MiB" + (f"   {args.steps} steps {_figure(total, 1, 1)} s" if total else ""))
        print(f"ROW | fine-tune {names[which]}, {what} | step {_figure(step)} s | peak {_figure(peak, mib, 0)} MiB |"
              + (f" {args.steps} steps: {_figure(total, 1, 1)} s |" if total else " |"))
    if len(results) == 2:
        ratios = [p["step_s"] / c["step_s"] for c, p in zip(results["core"], results["pack"])]  # paired by round
        rises = [p["rise"] / max(c["rise"], 1) for c, p in zip(results["core"], results["pack"])]
        print(f"  ratio pack / core, paired by round: time {_figure(ratios, 1, 2)}x   rise {_figure(rises, 1, 2)}x")
        print(f"ROW | fine-tune pack / core, {what} | time {_figure(ratios, 1, 2)}x | rise {_figure(rises, 1, 2)}x | |")


if __name__ == "__main__":
    main()
