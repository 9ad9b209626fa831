"""Time and peak memory of DreamTuner sampling against plain sampling, in one run.

Variants: plain CFG (core KSampler path); the subject encoder (beta 0.2)
with plain CFG; self-subject-attention (SSA) with plain CFG, its reference
riding in the step's batch (the fast path); SSA with a separate reference
pass, as it runs when another pack's patch is on the model (here an
identity ``attn1_output_patch``, standing for FreeU, IP-Adapter and the
like); SSA with interleaved CFG (Eq. 4-6, p_r 0.9, default offsets).
Times are reported as the fastest and the spread (median, slowest) of the
repeats, each variant's repeats interleaved with the others'.

A full-size SD1.5 UNet (860 M parameters, random weights, built through
ComfyUI's own classes), KSampler path (comfy.sample.sample), CFG, the same
seed, steps and size for every variant. Prints ratios against plain sampling.

    python benchmarks/ssa_benchmark.py                 # 256x256 px, 10 steps (CPU figures in README)
    python benchmarks/ssa_benchmark.py --size 512      # GPU figures
    python benchmarks/ssa_benchmark.py --attention all # the host's default and each of its attention flags

Attention: the host selects its kernel at import from its command line, as a server started with
``--use-split-cross-attention`` (and the others) does; ``--attention`` passes that flag to the host's own
selection (``all``: one process per flag this core has, in turn). Every layer, patched or not, runs
on the selected kernel. Ratios: each repeat times every variant once, in turn, and the ratio of a
variant is taken to the plain run of the same repeat; reported as their median and spread
((max - min) / median), next to the fastest times. On a shared CPU, paired ratios are what count.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the
process's resident memory, sampled every 2 ms. The figure reported is what a
variant costs in memory: its peak minus plain sampling's peak (medians of the
repeats), in MiB. A ratio of peaks would be dominated by the weights (3.4 GB of
fp32 UNet) and say nothing.

    python benchmarks/ssa_benchmark.py --smoke         # the tests' tiny UNet, 64 px, 2 steps: a check, no figure
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

# --attention value -> the host's command-line flag (comfy/cli_args.py) that selects the kernel.
ATTENTION_FLAGS = {
    "default": None,
    "split": "use_split_cross_attention",
    "quad": "use_quad_cross_attention",
    "pytorch": "use_pytorch_cross_attention",
    "sage": "use_sage_attention",
    "flash": "use_flash_attention",
}


def offered_flags():
    """The --attention values this core's command line has (late-2024 cores have no sage/flash flags)."""
    import comfy.cli_args

    return [name for name, flag in ATTENTION_FLAGS.items() if flag is None or hasattr(comfy.cli_args.args, flag)]


def select_attention(name):
    """Set the host's attention flag before its attention module is imported (as ComfyUI's argv would)."""
    import comfy.cli_args

    flag = ATTENTION_FLAGS[name]
    if flag is not None:
        if not hasattr(comfy.cli_args.args, flag):
            raise SystemExit(f"--attention {name}: this comfy core has no --{flag.replace('_', '-')} flag")
        setattr(comfy.cli_args.args, flag, True)
    pack.cpu_unless_cuda()
    pack.load()  # the pack as ComfyUI loads it
    import comfy.ldm.modules.attention as host_attention

    return host_attention.optimized_attention.__name__


def run_every_flag(argv):
    """One process per attention flag of this core, in turn; each prints its own table."""
    import subprocess

    for name in offered_flags():
        print(f"=== --attention {name}", flush=True)
        subprocess.run([sys.executable, __file__, *argv, "--attention", name], check=False)


def another_packs_patch(out, extra_options):
    """An identity patch of another pack: its presence makes self-subject-attention use a separate pass."""
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="generated and reference size in pixels")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (fastest and spread shown)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="UNet dtype (default: float16 on CUDA, float32 on CPU)")
    parser.add_argument("--attention", default="default", choices=[*ATTENTION_FLAGS, "all"],
                        help="the host's attention flag (its own selection); 'all': each flag this core has")
    parser.add_argument("--variants", default="plain,encoder,ssa,ssa-apart,ssa+icfg",
                        help="comma-separated subset of plain, encoder, ssa, ssa-apart, ssa+icfg (plain always runs)")
    parser.add_argument("--smoke", action="store_true", help="the tests' tiny UNet, a check that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.steps, args.repeats = min(args.size, 64), min(args.steps, 2), min(args.repeats, 2)
    if args.attention == "all":
        argv = [a for a in sys.argv[1:] if a != "all" and not a.startswith("--attention")]
        return run_every_flag(argv)
    kernel = select_attention(args.attention)
    from dreamtuner_devtools import tiny_models as tm
    from peak_memory import PeakMemory  # beside this script

    from comfyui_dreamtuner.dreamtuner_core.families import SD15_UNET
    from comfyui_dreamtuner.dreamtuner_core.guidance.interleaved_cfg import sample_interleaved
    from comfyui_dreamtuner.dreamtuner_core.subject_encoder.model import EncoderConfig, SubjectEncoder, attention_layout
    from comfyui_dreamtuner.dreamtuner_core.subject_encoder.patch import apply_subject_encoder
    from comfyui_dreamtuner.nodes.ssa import SelfSubjectAttentionPatch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    model = tm.build("sd15") if args.smoke else tm.build("sd15", unet_config=SD15_UNET)
    model.model.diffusion_model.to(dtype)
    model.model.manual_cast_dtype = None
    if device.type == "cuda":
        model.load_device = device
    pos, neg = tm.conditioning(model, 1), tm.conditioning(model, 2)
    latent = tm.latent(3, args.size // 8, args.size // 8)
    reference = tm.latent(4, args.size // 8, args.size // 8)
    mask = torch.zeros(1, args.size, args.size)
    mask[:, args.size // 8: -args.size // 8, args.size // 4: -args.size // 4] = 1.0
    (patched,) = SelfSubjectAttentionPatch().patch(model, {"samples": reference}, 3.0, 0.0, 1.0, reference_mask=mask)

    def interleaved(steps):
        out, _ = sample_interleaved(patched, 1, steps, 7.0, "euler", "normal", pos, neg, {"samples": latent},
                                    w_r=7.0, p_r=0.9, disable_pbar=True)
        return out["samples"]

    # A subject encoder shaped for this UNet, with random ("trained") weights; CLIP vision with ViT-H/14's
    # 257 tokens (its width does not change the per-step cost: SE(r) is encoded once per run).
    with_encoder = None
    if "encoder" in args.variants.split(","):  # built only when measured (memory)
        clip_vision = tm.clip_vision(width=64, layers=26, heads=4, image_size=224, patch_size=14)
        context_dim, attention = attention_layout(model)
        encoder = SubjectEncoder(EncoderConfig("sd15", context_dim, 64, attention=attention)).initialise_untrained(0)
        tm.init_weights(encoder, 5)
        with_encoder, _ = apply_subject_encoder(model, encoder, clip_vision, tm.image(6, 256, 256), beta=0.2)

    other_pack = patched.clone()
    other_pack.set_model_attn1_output_patch(another_packs_patch)

    variants = {
        "plain": lambda steps: tm.sample(model, pos, neg, latent, steps=steps, cfg=7.0),
        "encoder": lambda steps: tm.sample(with_encoder, pos, neg, latent, steps=steps, cfg=7.0),
        "ssa": lambda steps: tm.sample(patched, pos, neg, latent, steps=steps, cfg=7.0),
        "ssa-apart": lambda steps: tm.sample(other_pack, pos, neg, latent, steps=steps, cfg=7.0),
        "ssa+icfg": interleaved,
    }
    wanted = {"plain", *args.variants.split(",")}
    unknown = wanted - set(variants)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose among {list(variants)}")
    variants = {name: run for name, run in variants.items() if name in wanted}

    counter = tm.UNetItemCounter(model)
    results = {}
    for name, run in variants.items():  # warm-up, and UNet items per step
        counter.items = []
        run(2)
        results[name] = {"items_per_step": counter.items[0], "times": [], "peaks": [], "rises": []}
    counter.close()
    for _ in range(args.repeats):
        for name, run in variants.items():
            with PeakMemory(device) as memory:
                start = time.perf_counter()
                out = run(args.steps)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
            assert torch.isfinite(out).all()
            results[name]["times"].append(elapsed)
            results[name]["peaks"].append(memory.peak)
            results[name]["rises"].append(memory.rise)

    import statistics

    median = statistics.median
    plain_time, plain_peak = median(results["plain"]["times"]), median(results["plain"]["peaks"])
    what = (f"{'tiny (smoke)' if args.smoke else 'SD1.5'} UNet, {device.type} {str(dtype).split('.')[-1]}, "
            f"{args.size}px, {args.steps} steps, {args.repeats} interleaved repeats, attention {args.attention}")
    print(f"device={device.type} dtype={str(dtype).split('.')[-1]} size={args.size}px steps={args.steps} "
          f"cfg=7 sampler=euler repeats={args.repeats} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"attention={args.attention} kernel={kernel}")
    print(f"plain: peak {plain_peak / 2**20:.0f} MiB (weights included); each variant's memory figure is its "
          "peak minus plain's (the rise), medians of the repeats")
    for name, r in results.items():
        times = r["times"]
        ratios = [t / p for t, p in zip(times, results["plain"]["times"])]  # paired: the same round
        rise = (median(r["peaks"]) - plain_peak) / 2**20
        print(f"{name:9s} time {median(times):8.2f}s (range {min(times):.2f}-{max(times):.2f}s)  "
              f"x plain {median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f}, "
              f"spread {(max(ratios) - min(ratios)) / median(ratios):.1%})  "
              f"peak rise over plain {rise:+.0f} MiB  UNet items/step {r['items_per_step']}")
        print(f"ROW | sampling {name}, {what} | {median(ratios):.2f}x plain ({min(ratios):.2f}-{max(ratios):.2f}) | "
              f"peak rise {rise:+.0f} MiB | {median(times):.2f} s |")


if __name__ == "__main__":
    main()
