"""Pretraining throughput: samples/s at one and two processes (scaling efficiency), and on a GPU at 512 px.

    python benchmarks/pretrain_benchmark.py                 # CPU: smoke-size models, 32 px, 1 vs 2 gloo processes
                                                            # (one core each), 3 repeats, medians
    python benchmarks/pretrain_benchmark.py --gpu           # one GPU: full-size SD1.5 / ViT-H shapes, 512 px,
                                                            # global batch 16, samples/s and peak memory
    python benchmarks/pretrain_benchmark.py --full-size-on-cpu --size 64 --steps 1
                                                            # the same full-size run on the CPU, small: a check

Models are random-weight files in the real formats (scripts/make_pretrain_smoke_files.py; with --gpu the
full-size SD1.5 checkpoint, ViT-H/14 CLIP vision and SD1.5 ControlNet of dreamtuner_devtools/tier2_assets.py), loaded by
the host's loaders (run it from the ComfyUI folder with ComfyUI's Python to make the full-size files). Each measurement runs ``--steps`` optimizer steps after one warm-up step, in freshly
spawned processes (the 1-process figure too, so both start alike); the figure is samples / wall time of the
measured steps, between two barriers (so the slowest rank counts).

On the CPU each process gets ``--threads`` threads (default 1: one core per process, as one GPU per
process under torchrun), so scaling efficiency = samples/s at 2 processes / (2 x samples/s at 1 process) says
what the second process adds (gloo all-reduce, and whatever the two processes share: memory bandwidth,
caches). One process with every core is printed for comparison. The three configurations are interleaved
over ``--repeats`` rounds and reported as medians with their range. A busy machine (other work using more
than half a core in the second before the start) makes every figure meaningless: the script says so.

Where the host lacks CLIP-L's tokenizer (the PyPI comfy core) a fixed caption embedding stands in for the
text encoder (noted in the output).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import socket
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _setup_host():
    sys.path.insert(0, os.getcwd())
    if not torch.cuda.is_available():
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
    sys.path.append(str(ROOT))  # after ComfyUI's own modules
    sys.path.append(str(ROOT / "scripts"))  # make_pretrain_smoke_files
    from dreamtuner_devtools import pack

    pack.load(nodes=False)  # the core as comfyui_dreamtuner.dreamtuner_core, its one import name


def busy_cores(seconds=1.0):
    """Cores' worth of CPU time other processes used over ``seconds`` (Linux /proc/stat), or None elsewhere.

    Read now, not the load average: that one is a minute-long average and still counts
    whatever ran just before the benchmark.
    """
    def sample():
        with open("/proc/stat") as handle:
            fields = [float(v) for v in handle.readline().split()[1:]]
        return sum(fields) - fields[3] - fields[4], sum(fields)  # (busy, total) jiffies: idle and iowait excluded

    try:
        busy0, total0 = sample()
        time.sleep(seconds)
        busy1, total1 = sample()
    except OSError:
        return None
    return (busy1 - busy0) / max(total1 - total0, 1e-9) * (os.cpu_count() or 1)


def _host_has_clip_text():
    import comfy.sd1_clip

    return os.path.exists(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_clip_config.json"))


def _measure(rank, world_size, port, kwargs, steps, result, threads):
    """One rank: build the trainer, one warm-up step, then time ``steps`` steps; rank 0 writes the result."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    if threads:
        torch.set_num_threads(threads)
    _setup_host()
    import torch.distributed as dist
    from comfyui_dreamtuner.dreamtuner_core.pretrain.config import TrainConfig
    from comfyui_dreamtuner.dreamtuner_core.pretrain.trainer import Trainer
    from comfyui_dreamtuner.dreamtuner_core.pretrain.world import setup_world
    from dreamtuner_devtools.pretrain_worker import caption_conditioning

    world = setup_world()
    text = None if _host_has_clip_text() else caption_conditioning
    trainer = Trainer(TrainConfig(**kwargs), world, text)
    batches = trainer.batches()
    trainer.train_step([next(batches) for _ in range(trainer.accumulation)])
    if world.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    world.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step([next(batches) for _ in range(trainer.accumulation)])
    if world.device.type == "cuda":
        torch.cuda.synchronize()
    world.barrier()
    elapsed = time.perf_counter() - start
    if world.main:
        if world.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2 ** 30
        else:  # the process's peak resident memory (Linux: kB), models included
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        with open(result, "w") as handle:
            handle.write(f"{steps * trainer.config.global_batch / elapsed} {peak} {int(text is None)}")
    if dist.is_initialized():
        dist.destroy_process_group()


def run(world_size, kwargs, steps, threads=None):
    """samples/s, peak GiB (GPU) and whether the real text encoder ran, for ``world_size`` fresh processes."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        result = os.path.join(folder, "result")
        kwargs = dict(kwargs, out=os.path.join(folder, "run"))
        mp.spawn(_measure, args=(world_size, port, kwargs, steps, result, threads), nprocs=world_size, join=True)
        rate, peak, real_text = open(result).read().split()
    return float(rate), (None if peak == "None" else float(peak)), real_text == "1"


# The full-size files, named as the tier-2 tests cache them (tests/tier2.py), so one copy serves both.
FULL_SIZE = {"checkpoint": ("sd15-random-v2.safetensors", "sd15_checkpoint"),
             "controlnet": ("sd15-controlnet-random-v2.safetensors", "sd15_controlnet"),
             "clip_vision": ("vit-h-random-v2.safetensors", "vit_h_clip_vision")}


def full_size_files(cache, size):
    """Full-size random-weight SD1.5 checkpoint, ViT-H/14 CLIP vision and SD1.5 ControlNet (dreamtuner_devtools/tier2_assets),
    reused from the tier-2 cache when there, and 32 prepared images of ``size`` px."""
    import make_pretrain_smoke_files
    from dreamtuner_devtools import tier2_assets

    cache = pathlib.Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    files = {}
    for key, (name, maker) in FULL_SIZE.items():
        files[key] = cache / name
        if not files[key].exists():
            getattr(tier2_assets, maker)(str(files[key]))
    files["data"] = cache / f"pretrain_full_data_{size}"
    make_pretrain_smoke_files.data(files["data"], count=32, size=size)
    return {k: str(v) for k, v in files.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="measured optimizer steps (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=3, help="CPU: rounds of the three configurations")
    parser.add_argument("--threads", type=int, default=1, help="CPU: threads per process in the 1 vs 2 comparison")
    parser.add_argument("--size", type=int, default=32, help="CPU: training resolution (px)")
    parser.add_argument("--files", default=None, help="folder for the model files (default: the test cache)")
    parser.add_argument("--gpu", action="store_true", help="measure on one GPU at 512 px, global batch 16")
    parser.add_argument("--processes", type=int, default=1, help="--gpu: processes, one GPU each (2 needs two GPUs)")
    parser.add_argument("--full-size-on-cpu", action="store_true",
                        help="run the --gpu configuration's full-size models on the CPU at --size, global batch 2")
    args = parser.parse_args(argv)
    _setup_host()
    cache = pathlib.Path(args.files or pathlib.Path.home() / ".cache" / "comfyui-dreamtuner")
    base = dict(size=32, global_batch=4, batch_per_device=2, lr=1e-5, max_steps=10 ** 6, checkpoint_every=10 ** 6,
                workers=0, progress=False, encoder_dtype="float32")

    if args.gpu or args.full_size_on_cpu:
        if args.gpu and not torch.cuda.is_available():
            print("no GPU is present on this machine: the GPU figures (512 px, global batch 16) need one "
                  "(--full-size-on-cpu checks the same run on the CPU at a small size)")
            return
        size = 512 if args.gpu else args.size
        if args.gpu and args.processes > torch.cuda.device_count():
            print(f"--processes {args.processes}: this machine has {torch.cuda.device_count()} GPU(s); give at most that")
            return
        global_batch, batches = (16, (1, 2, 4)) if args.gpu else (2, (1,))
        files = full_size_files(cache, size)
        for batch in batches:
            kwargs = dict(base, **files, size=size, global_batch=global_batch, batch_per_device=batch,
                          workers=4 if args.gpu else 0)
            rate, peak, real = run(args.processes if args.gpu else 1, kwargs, args.steps)
            where = (f"GPU {torch.cuda.get_device_name()}, bf16 autocast" if args.gpu else
                     f"CPU ({os.cpu_count()} cores), fp32, a check of the full-size path, not a GPU figure")
            memory = f", peak {peak:.1f} GiB {'allocated' if args.gpu else 'resident'}" if peak is not None else ""
            print(f"{where}: full-size SD1.5 + depth ControlNet + ViT-H/14, {size} px, global batch {global_batch} "
                  f"(per-step batch {batch}, accumulation {global_batch // batch}): {rate:.3f} samples/s{memory}"
                  + ("" if real else " (fixed caption embedding)"))
            print(f"ROW | pretraining, {args.processes if args.gpu else 1} process(es), {size} px, global batch "
                  f"{global_batch}, per-step batch {batch}{'' if args.gpu else ' (CPU check)'} | {rate:.3f} samples/s |"
                  f"{memory.lstrip(', ')} | {args.steps} steps |")
        return

    import statistics

    import make_pretrain_smoke_files

    cores = os.cpu_count() or 1
    busy = busy_cores()
    files = make_pretrain_smoke_files.make_all(cache / "pretrain_smoke_v1", images=8, size=args.size)
    kwargs = dict(base, **files, size=args.size)
    configurations = {"one": (1, args.threads), "two": (2, args.threads), "all": (1, cores)}
    rates, real = {name: [] for name in configurations}, True
    for _ in range(args.repeats):  # interleaved: a slow spell of the machine touches every configuration alike
        for name, (processes, threads) in configurations.items():
            rate, _, real = run(processes, kwargs, args.steps, threads)
            rates[name].append(rate)

    def figure(name):
        values = rates[name]
        return statistics.median(values), f"{statistics.median(values):.3f} samples/s (range {min(values):.3f}-{max(values):.3f})"

    one, one_text = figure("one")
    two, two_text = figure("two")
    every, every_text = figure("all")
    print(f"CPU ({cores} cores), smoke-size models, {args.size} px, global batch 4, {args.steps} steps, "
          f"median of {args.repeats}" + ("" if real else ", fixed caption embedding (this comfy core has no CLIP-L tokenizer)"))
    print(f"  1 process,   {args.threads} thread : {one_text}")
    print(f"  2 processes, {args.threads} thread each (gloo): {two_text}: {two / one:.2f}x, "
          f"scaling efficiency {two / (2 * one):.0%}")
    print(f"  1 process,   {cores} threads: {every_text} ({every / one:.2f}x of 1 thread)")
    print(f"ROW | pretraining (CPU, smoke-size models, {args.size} px), 1 vs 2 processes | {one_text} vs {two_text} | "
          f"| scaling {two / (2 * one):.0%} |")
    if busy is not None and busy > 0.5:
        print(f"warning: other work used {busy:.1f} cores at the start: it shared these cores, the figures are not clean")
    if not torch.cuda.is_available():
        print("no GPU is present on this machine: run with --gpu on a CUDA machine for the 512 px figures")


if __name__ == "__main__":
    main()
