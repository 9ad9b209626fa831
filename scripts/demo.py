"""The pack's main job on an embedded default, without a ComfyUI server or model downloads.

Builds a seeded SD1.5-shaped model with ComfyUI's own classes (the test
factory), an embedded reference latent with a subject mask (an ellipse), and
samples the same seed with the core KSampler path twice: plain, and through
the Self-Subject-Attention node. Prints the UNet items per step, the time of
each, and how far the patched sample moved; writes both latents to
``--out`` (safetensors).

    python scripts/demo.py [--steps 8] [--omega-ref 3.0] [--out dreamtuner_demo.safetensors]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after ComfyUI's own modules

from dreamtuner_devtools import pack  # noqa: E402

pack.cpu_unless_cuda()
pack.load()  # the pack as ComfyUI loads it
from dreamtuner_devtools import tiny_models as tm  # noqa: E402
from comfyui_dreamtuner.nodes.ssa import SelfSubjectAttentionPatch  # noqa: E402


def subject_mask(size=64):
    """An embedded subject: an ellipse in the middle of a size x size image (1 = subject)."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return ((x / 0.6) ** 2 + (y / 0.8) ** 2 <= 1.0).float()[None]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--omega-ref", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="dreamtuner_demo.safetensors")
    args = parser.parse_args()

    model = tm.build("sd15")
    pos, neg = tm.conditioning(model, 1), tm.conditioning(model, 2)
    latent, reference = tm.latent(3), tm.latent(4)
    (patched,) = SelfSubjectAttentionPatch().patch(model, {"samples": reference}, args.omega_ref, 0.0, 1.0,
                                                   reference_mask=subject_mask())
    counter = tm.UNetItemCounter(model)
    results = {}
    for name, m in (("plain", model), ("self_subject_attention", patched)):
        counter.items = []
        start = time.perf_counter()
        results[name] = tm.sample(m, pos, neg, latent, seed=args.seed, steps=args.steps)
        print(f"{name:24s} {time.perf_counter() - start:6.2f} s, UNet items per step: {counter.items[0]}")
    counter.close()
    moved = (results["self_subject_attention"] - results["plain"]).norm() / results["plain"].norm()
    print(f"the reference changed the sample by {moved:.1%} (relative L2, omega_ref={args.omega_ref})")
    import comfy.utils

    comfy.utils.save_torch_file({k: v.contiguous() for k, v in results.items()}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
