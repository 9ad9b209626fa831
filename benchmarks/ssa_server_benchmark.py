"""Self-subject-attention as a user runs it: a real ComfyUI server, plain and patched graphs queued in turn.

Starts the ComfyUI installation at ``--comfyui`` (``--cpu``, the host's own attention selection, plus
``--attention``'s flag) with this pack in a scratch base directory, then queues, for every repeat and
in turn: plain KSampler; Self-Subject-Attention (DreamTuner) + KSampler; Self-Subject-Attention +
InterleavedCFGSampler (p_r 0.9). Each graph is CheckpointLoaderSimple -> ... -> SaveLatent (no VAE
decode, so the sampler is what is timed), with a new seed per repeat (the same for every variant) so
the sampler runs again while the loader, the text encoders and the reference encoding stay cached.
A run's time is the server's own, from ``execution_start`` to ``execution_success`` in its history.
Ratios: each variant to the plain run of the same repeat, median and spread ((max - min) / median),
in the format of ``ssa_benchmark.py`` so the two can be read side by side.

    python benchmarks/ssa_server_benchmark.py --comfyui /work/comfyui --python /work/comfyui/venv/bin/python \\
        --checkpoint ~/.cache/comfyui-dreamtuner/sd15-random-v2.safetensors --size 256 --steps 10

The checkpoint is any SD1.5 file the host loads (the tier-2 tests make a random-weight one). Set
``OMP_NUM_THREADS`` to give the server's torch its threads.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from headless import server as comfy_server  # noqa: E402

ATTENTION_FLAGS = {"default": [], "split": ["--use-split-cross-attention"], "quad": ["--use-quad-cross-attention"],
                   "pytorch": ["--use-pytorch-cross-attention"], "sage": ["--use-sage-attention"],
                   "flash": ["--use-flash-attention"]}


def make_base(base: pathlib.Path, checkpoint: pathlib.Path, size: int):
    """A ComfyUI base directory: this pack, the checkpoint (linked) and a subject image with an alpha mask."""
    from PIL import Image, ImageDraw

    for sub in ("custom_nodes", "models/checkpoints", "input", "output", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "comfyui-dreamtuner").symlink_to(ROOT, target_is_directory=True)
    (base / "models" / "checkpoints" / "sd15.safetensors").symlink_to(checkpoint.resolve())
    subject = Image.new("RGBA", (size, size), (0, 0, 0, 0))  # the subject in the middle, as ssa_benchmark's mask
    ImageDraw.Draw(subject).rectangle((size // 4, size // 8, size - size // 4 - 1, size - size // 8 - 1),
                                      fill=(200, 60, 40, 255))
    subject.save(base / "input" / "subject.png")


def graphs(size: int, steps: int, seed: int) -> dict:
    common = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a photo of a red ball"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "bench"}},
    }
    sampler = {"seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
               "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["empty", 0], "denoise": 1.0}
    ssa = {
        "subject": {"class_type": "LoadImage", "inputs": {"image": "subject.png"}},
        "encode": {"class_type": "VAEEncode", "inputs": {"pixels": ["subject", 0], "vae": ["ckpt", 2]}},
        "ssa": {"class_type": "DreamTunerSelfSubjectAttention", "inputs": {
            "model": ["ckpt", 0], "reference": ["encode", 0], "omega_ref": 3.0, "start_percent": 0.0,
            "end_percent": 1.0, "mask_mode": "background is 1 (LoadImage alpha)", "blocks": "all",
            "reference_seed": 0, "reference_mask": ["subject", 1]}},
    }
    return {
        "plain": {**common, "sample": {"class_type": "KSampler", "inputs": {"model": ["ckpt", 0], **sampler}}},
        "ssa": {**common, **ssa, "sample": {"class_type": "KSampler", "inputs": {"model": ["ssa", 0], **sampler}}},
        "ssa+icfg": {**common, **ssa, "sample": {"class_type": "DreamTunerInterleavedCFGSampler", "inputs": {
            "model": ["ssa", 0], **sampler, "w_r": 7.0, "p_r": 0.9, "delta_t": 10, "delta_t_prime": 10}}},
    }


def server_seconds(entry) -> float:
    """execution_start to execution_success, from the server's history (its own clock, in ms)."""
    stamps = {kind: data.get("timestamp") for kind, data in entry["status"].get("messages", [])}
    if entry["status"].get("status_str") != "success" or None in (stamps.get("execution_start"),
                                                                    stamps.get("execution_success")):
        raise RuntimeError(f"the run failed: {entry['status']}")
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="the ComfyUI installation")
    parser.add_argument("--python", default=os.environ.get("COMFYUI_PYTHON", sys.executable),
                        help="the Python of that installation")
    parser.add_argument("--checkpoint", type=pathlib.Path, required=True, help="an SD1.5 checkpoint file")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attention", default="default", choices=list(ATTENTION_FLAGS),
                        help="the attention flag the server is started with")
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"], help="cpu: start the server with --cpu")
    args = parser.parse_args()
    if not args.comfyui:
        raise SystemExit("--comfyui: give the ComfyUI installation (or set COMFYUI_PATH)")
    if not args.checkpoint.is_file():
        raise SystemExit(f"--checkpoint {args.checkpoint}: no such file; give an SD1.5 checkpoint")
    with tempfile.TemporaryDirectory(prefix="dreamtuner-bench-") as scratch:
        base = pathlib.Path(scratch)
        make_base(base, args.checkpoint, args.size)
        extra = [*(["--cpu"] if args.device == "cpu" else []), "--base-directory", str(base),
                 "--database-url", "sqlite:///:memory:", *ATTENTION_FLAGS[args.attention]]
        with comfy_server.started(args.comfyui, args.python, extra) as comfy:
            def run(graph):
                prompt_id = comfy.queue(graph)
                return server_seconds(comfy.follow(prompt_id, lambda kind, data: None, 3600))

            for name, graph in graphs(args.size, 2, 0).items():  # warm-up: loads and caches
                run(graph)
            times = {name: [] for name in graphs(args.size, args.steps, 0)}
            for repeat in range(args.repeats):
                for name, graph in graphs(args.size, args.steps, 1 + repeat).items():
                    times[name].append(run(graph))
            kernel = next((line.strip() for line in comfy.log_tail(400).splitlines()
                           if "attention" in line.lower() and "using" in line.lower()), "?")
    print(f"server ComfyUI at {args.comfyui} device={args.device} size={args.size}px steps={args.steps} cfg=7 "
          f"sampler=euler repeats={args.repeats} attention={args.attention} OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')} log: {kernel}")
    for name, values in times.items():
        ratios = sorted(t / plain for t, plain in zip(values, times["plain"]))
        median = ratios[len(ratios) // 2]
        print(f"{name:9s} ratio {median:.2f}x (paired, median; spread {(ratios[-1] - ratios[0]) / median:5.1%}, "
              f"{ratios[0]:.2f}-{ratios[-1]:.2f})  fastest {min(values):7.2f}s ({min(values) / min(times['plain']):.2f}x)")


if __name__ == "__main__":
    main()
