"""How good the world's base model and measures are: ``python -m world.base_report``.

- the measures on the generator's own renders of held-out subjects (scene classifier accuracy; identity
  embedder: similarity of two renders of one subject vs of two subjects; pattern read-out);
- the base model (plain sampling, no reference) on every held-out caption x 2 seeds: how often the
  scene classifier reads the prompted scene, time and position, how often a subject is seen at all;
- a picture grid of samples (world/results/base_grid.png).
Writes world/results/base.md and prints it.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import numpy as np
import torch

from . import experiment, generator, measures

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def grid_png(rows, path, scale=3):
    """rows: list of lists of [32,32,3] float images -> one PNG."""
    from PIL import Image

    width = max(len(r) for r in rows)
    canvas = np.ones((len(rows) * 34, width * 34, 3), np.float32)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            canvas[i * 34 + 1:i * 34 + 33, j * 34 + 1:j * 34 + 33] = np.asarray(im)
    im = Image.fromarray((canvas * 255).round().astype(np.uint8))
    im.resize((im.width * scale, im.height * scale), Image.NEAREST).save(path)


def measures_on_renders(n=300):
    rng = np.random.default_rng(5)
    subjects = [generator.draw_subject(rng, True) for _ in range(n)]
    a, b, caps = [], [], []
    for s in subjects:
        c1 = generator.draw_caption(rng, s.family, True)
        c2 = generator.draw_caption(rng, s.family, True)
        a.append(generator.render(s, c1, rng)[0])
        b.append(generator.render(s, c2, rng)[0])
        caps.append(c1)
    a, b = torch.from_numpy(np.stack(a)).float() / 255, torch.from_numpy(np.stack(b)).float() / 255
    read = measures.read_caption(a)
    ea, eb = measures.embed(a), measures.embed(b)
    sims = (ea @ eb.T).numpy()
    same, other = np.diag(sims), sims[~np.eye(n, dtype=bool)]
    top1 = float((sims.argmax(1) == np.arange(n)).mean())
    return {
        "scene accuracy on renders": float(np.mean(read["scene"] == [c.scene for c in caps])),
        "time accuracy on renders": float(np.mean(read["time"] == [c.time for c in caps])),
        "position accuracy on renders": float(np.mean(read["position"] == [c.position for c in caps])),
        "identity sim, same subject other caption": f"{same.mean():.3f} +- {same.std():.3f}",
        "identity sim, different subjects": f"{other.mean():.3f} +- {other.std():.3f}",
        f"identity top-1 retrieval among {n}": top1,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=experiment.STEPS)
    parser.add_argument("--cfg", type=float, default=experiment.CFG)
    parser.add_argument("--limit", type=int, default=0, help="only the first N held-out captions")
    args = parser.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    t0 = time.time()
    world = experiment.World()
    lines = ["# Base model and measures of the world", ""]
    lines += [f"- {k}: {v}" for k, v in measures_on_renders().items()]
    captions = list(generator.HELDOUT_CAPTIONS)[:args.limit or None]
    hits = {"scene": [], "time": [], "position": [], "subject seen": []}
    grid = []
    for i, caption in enumerate(captions):
        images = world.sample(world.unet, world.text(caption.text), args.seeds, seed=i, steps=args.steps,
                              cfg=args.cfg)
        fid = measures.prompt_fidelity(images, caption)
        for k in ("scene", "time", "position"):
            hits[k] += list(fid[k])
        hits["subject seen"] += [generator.read_pattern(np.asarray(im)) is not None for im in images]
        if i % 8 == 0 and len(grid) < 12:
            rng = np.random.default_rng(i)
            render = generator.render(generator.draw_subject(rng, True, caption.family), caption, rng)[0]
            grid.append([torch.from_numpy(render).float() / 255] + list(images))
    seconds = time.time() - t0
    lines += ["", f"Plain sampling ({experiment.SAMPLER}, {args.steps} steps, cfg {args.cfg}) of "
              f"{len(captions)} held-out captions x {args.seeds} seeds ({len(captions) * args.seeds} images):", ""]
    lines += [f"- {k} read as prompted: {np.mean(v):.3f}" for k, v in hits.items() if k != "subject seen"]
    lines += [f"- a subject (saturated pattern) found in the image: {np.mean(hits['subject seen']):.3f}"]
    lines += ["", f"Grid: world/results/base_grid.png (each row: a render of a held-out subject for the caption, "
              f"then {args.seeds} samples). Time: {seconds:.0f} s.", ""]
    grid_png(grid, RESULTS / "base_grid.png")
    (RESULTS / "base.md").write_text("\n".join(lines))
    print("\n".join(lines))
    for row, caption in zip(range(len(grid)), captions[::8]):
        print(row, caption.text)


if __name__ == "__main__":
    main()
