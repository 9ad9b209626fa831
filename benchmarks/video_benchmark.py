"""Video Sequence (paper Fig. 9): time per frame against one single-image generation, memory against the
frame count, and consecutive-frame similarity against frames sampled on their own, in one run.

The model: SD1.5 widths (model_channels 320, context 768, two levels; random weights, built through
ComfyUI's own classes) with a subject reference (Self-Subject-Attention node) and a random-weight
ControlNet file loaded by the host's loader; KSampler path, CFG, the same steps and size everywhere.

- single: one image with the subject reference and a control image (what frame 1 costs);
- sequence: F frames through the node, frame k reading frame 1 and frame k-1 (omega 3);
  its time per frame should be single x (the cost of two more reference rows).
- memory: the peak resident-memory rise (CPU; CUDA allocator peak on a GPU) of a sequence of F_small and
  of F_large frames, and the UNet batch rows of each frame's model calls; both flat in F.
- similarity: mean cosine between consecutive frames' latents, sequence (omega 3) vs omega 0 (every
  frame on its own, same noise and poses). A random-weight model has no identity to keep: this shows
  the frames reading each other, not the quality of a trained model.

Timings are the medians of interleaved repeats; on a shared CPU label them so.

    python benchmarks/video_benchmark.py [--size 128] [--steps 4] [--frames 2 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after ComfyUI's own modules
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from dreamtuner_devtools import pack  # noqa: E402

pack.cpu_unless_cuda()
pack.load()  # the pack as ComfyUI loads it
import torch  # noqa: E402

import comfy.controlnet  # noqa: E402
from dreamtuner_devtools import tiny_models as tm  # noqa: E402
from peak_memory import PeakMemory  # noqa: E402

from comfyui_dreamtuner.dreamtuner_core import host  # noqa: E402
from comfyui_dreamtuner.nodes.ssa import SelfSubjectAttentionPatch  # noqa: E402
from comfyui_dreamtuner.nodes.video import VideoSequence  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--frames", type=int, nargs=2, default=(2, 6))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    small, large = args.frames

    model = tm.build("sd15_narrow")
    with tempfile.TemporaryDirectory() as folder:
        control = comfy.controlnet.load_controlnet(str(tm.write_controlnet(pathlib.Path(folder) / "c.safetensors")))
    (subject_model,) = SelfSubjectAttentionPatch().patch(model, {"samples": tm.latent(4, args.size // 8, args.size // 8)},
                                                         3.0, 0.0, 1.0)
    pos, neg = tm.conditioning(model, 1), tm.conditioning(model, 2)
    poses = tm.image(3, args.size, args.size, batch=large)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def single():
        p, n = host.apply_controlnet(pos, neg, control, poses[:1], 1.0)
        return tm.sample(subject_model, p, n, torch.zeros((1, 4, args.size // 8, args.size // 8)), seed=5,
                         steps=args.steps)

    def sequence(frames, omega=3.0):
        latent, _ = VideoSequence().generate(subject_model, pos, neg, control, poses[:frames], 1.0, frames, args.size,
                                             args.size, 5, "independent", args.steps, 5.0, "euler", "normal", 1,
                                             omega, True)
        return latent["samples"]

    single(), sequence(small)  # warm-up
    times = {"single": [], small: [], large: []}
    peaks = {small: [], large: []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        single()
        times["single"].append(time.perf_counter() - start)
        for frames in (small, large):
            with PeakMemory(device) as memory:
                start = time.perf_counter()
                sequence(frames)
                times[frames].append((time.perf_counter() - start) / frames)
            peaks[frames].append(memory.rise)

    rows = {}
    for frames in (small, large):
        counter = tm.UNetItemCounter(model)
        try:
            sequence(frames)
        finally:
            counter.close()
        per_frame = len(counter.items) // frames
        rows[frames] = [max(counter.items[i * per_frame:(i + 1) * per_frame]) for i in range(frames)]

    def consecutive_cosine(frames):
        flat = frames.flatten(1)
        return torch.nn.functional.cosine_similarity(flat[1:], flat[:-1]).mean().item()

    linked, alone = sequence(large), sequence(large, omega=0.0)
    t_single = statistics.median(times["single"])
    print(f"device {device}, {args.size}x{args.size} px, {args.steps} steps, {args.repeats} interleaved repeats "
          f"(torch threads {torch.get_num_threads()})")
    print(f"single image: {t_single * 1000:.0f} ms")
    for frames in (small, large):
        t = statistics.median(times[frames])
        print(f"sequence of {frames}: {t * 1000:.0f} ms per frame = {t / t_single:.2f} x single")
    print(f"per-frame time, {large} vs {small} frames: "
          f"{statistics.median(times[large]) / statistics.median(times[small]):.2f}")
    mib = {f: statistics.median(peaks[f]) / 2 ** 20 for f in peaks}
    print(f"peak memory rise: {small} frames {mib[small]:.1f} MiB, {large} frames {mib[large]:.1f} MiB "
          f"(ratio {mib[large] / max(mib[small], 1e-9):.2f})")
    print(f"UNet batch rows per call, frame by frame: {small} frames {rows[small]}, {large} frames {rows[large]}")
    print(f"consecutive-frame latent cosine: sequence {consecutive_cosine(linked):.4f}, "
          f"frames on their own {consecutive_cosine(alone):.4f}")


if __name__ == "__main__":
    main()
