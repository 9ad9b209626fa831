"""Fine-tuning step time and peak memory: DreamTunerFinetune's trainer against the core TrainLoraNode (v0.15.1).

Both train a LoRA of the same rank on the same random-weight SD1.5 UNet (860 M parameters, built through
ComfyUI's own classes), at the same resolution, batch 2, AdamW, fp32 on the CPU. The pack's step also
runs the CLIP-L text encoder forward and backward for the [S*] token (the core trainer takes fixed
conditionings). Each trainer runs in its own process (a clean memory peak); the step time is the median
of the times between consecutive steps' losses (the first step, with the set-up, is not timed).

    COMFYUI_PATH=/path/to/ComfyUI /path/to/ComfyUI/venv/bin/python benchmarks/finetune_benchmark.py
    ... --size 512 --steps 20                       # GPU figures

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
    model = tm.build("sd15", unet_config=SD15_UNET) if args.model == "sd15" else tm.build("sd15_narrow")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        model.load_device = device
    return torch, tm, model, device


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
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    from comfyui_dreamtuner.dreamtuner_core import finetune as ft

    clip = comfy.sd.CLIP(target=comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer,
                                                                         comfy.sd1_clip.SD1ClipModel))
    tm.init_weights(clip.cond_stage_model, 31)
    size = args.size // 8
    ref = tm.latent(2, size, size)
    reg = tm.latent(3, size, size, batch=4)
    settings = ft.FinetuneSettings(class_word="dog", name="bench", steps=args.steps, rank=args.rank,
                                   gradient_checkpointing=args.checkpointing)
    stamps = []
    with PeakMemory(device) as memory:
        ft.train(model, clip, settings, (ref, ref.flip(-1)), (reg, reg.flip(-1)),
                 progress=lambda step, total, loss: stamps.append(time.perf_counter()))
    return {"step_s": _timed_steps(stamps), "peak": memory.peak, "rise": memory.rise}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="training resolution in pixels")
    parser.add_argument("--steps", type=int, default=4, help="steps per trainer (the first is not timed)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--model", choices=["sd15", "sd15-narrow"], default="sd15",
                        help="the full SD1.5 UNet, or a two-level one of SD1.5's widths (for small machines)")
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
    results = {}
    for which in ("core", "pack"):
        command = [sys.executable, __file__, "--child", which, "--size", str(args.size), "--steps", str(args.steps),
                   "--rank", str(args.rank), "--threads", str(args.threads), "--model", args.model] + (
                   ["--checkpointing"] if args.checkpointing else [])
        out = subprocess.run(command, capture_output=True, text=True, cwd=os.environ["COMFYUI_PATH"])
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            print(out.stdout[-2000:], out.stderr[-4000:])
            raise SystemExit(f"the {which} trainer failed")
        results[which] = json.loads(lines[-1][len("RESULT "):])
    core, pack = results["core"], results["pack"]
    mib = 2 ** 20
    print(f"{args.model} UNet, {args.size}x{args.size} px, batch 2, LoRA rank {args.rank}, {args.steps} steps"
          f"{', gradient checkpointing' if args.checkpointing else ''}")
    for name, r in (("core TrainLoraNode", core), ("DreamTunerFinetune", pack)):
        print(f"  {name:20s} step {r['step_s']:.3f} s   peak {r['peak'] / mib:.0f} MiB   rise {r['rise'] / mib:.0f} MiB")
    print(f"  ratio (pack / core): time {pack['step_s'] / core['step_s']:.2f}x   peak memory "
          f"{pack['peak'] / core['peak']:.2f}x   rise {pack['rise'] / max(core['rise'], 1):.2f}x")


if __name__ == "__main__":
    main()
