"""The method's effect in the world: plain sampling vs self-subject-attention. ``python -m world.effect``.

For N held-out subjects x S seeds: plain sampling, and the pack's Self-Subject-Attention node over
omega_ref, with the subject mask and without it; the oracle (the generator's renders of the subject for
the prompt) bounds subject fidelity from above; then the pack's InterleavedCFGSampler node (w_r = cfg)
over p_r at omega_ref 3 with the mask. Writes world/results/effect.csv (one row per subject,
seed and setting), effect.md (the table: mean, and the spread over seeds = standard deviation of the
per-seed means over subjects), effect.png (curves over omega_ref) and effect_grid.png
(reference | plain | SSA with mask | SSA without mask, for the first subjects).
"""

from __future__ import annotations

import argparse
import csv
import time

import numpy as np

from . import experiment
from .base_report import RESULTS, grid_png

# omega_ref = 0 is plain attention bitwise (tests/test_ssa*.py): its point in the plot is plain sampling's
# row, not run again; p_r = 0 is plain CFG on the SSA model, the same samples as "ssa w=3" (METHOD.md).
OMEGAS = (1, 3, 5, 10)
NO_MASK_OMEGAS = (3, 10)
P_R = (0.5, 1.0)
METRICS = ("identity", "pattern", "scene", "time", "position")


def settings(omegas=OMEGAS, no_mask_omegas=NO_MASK_OMEGAS, broken=True, p_rs=P_R):
    """Plain; SSA with the mask over omegas; without the mask; the broken variants; interleaved guidance."""
    out = [experiment.Setting()]
    out += [experiment.Setting(float(w), "subject") for w in omegas]
    out += [experiment.Setting(float(w), "none") for w in no_mask_omegas if w]
    if broken:
        out += [experiment.Setting(3.0, "inverted"), experiment.Setting(3.0, "subject", reference_sigma=14.6),
                experiment.Setting(3.0, "subject", transposed=True),
                experiment.Setting(3.0, "subject", unconditional_reference=True)]
    out += [experiment.Setting(3.0, "subject", p_r=p) for p in p_rs]
    return out


def summarise(rows, seeds):
    """setting -> metric -> (mean, spread over seeds)."""
    out = {}
    for name in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == name]
        out[name] = {}
        for m in METRICS:
            per_seed = [np.mean([r[m] for r in mine if r["seed"] == s]) for s in range(seeds)]
            out[name][m] = (float(np.mean([r[m] for r in mine])), float(np.std(per_seed)))
    return out


def score_rows(case, setting_name, scores, seeds):
    """One row per seed of one case and setting (``scores``: :func:`experiment.score`'s arrays)."""
    return [{"subject": case.subject.name, "seed": s, "setting": setting_name,
             **{m: float(scores[m][s]) for m in METRICS}} for s in range(seeds)]


def write_table(table, header, path):
    """The markdown table of :func:`summarise`'s result under a header paragraph; printed too."""
    lines = [header, "", "| setting | identity | pattern | scene | time | position |", "|---|---|---|---|---|---|"]
    for name, metrics in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[m][0]:.3f} +- {metrics[m][1]:.3f}" for m in METRICS)
                     + " |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def write_rows(rows, path, seeds):
    """One CSV row per subject, seed and setting; returns :func:`summarise` of them."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["subject", "seed", "setting", *METRICS])
        writer.writeheader()
        writer.writerows(rows)
    return summarise(rows, seeds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=24)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=experiment.STEPS)
    parser.add_argument("--cfg", type=float, default=experiment.CFG)
    parser.add_argument("--grid-subjects", type=int, default=8)
    parser.add_argument("--omegas", type=float, nargs="*", default=OMEGAS, help="omega_ref with the mask")
    parser.add_argument("--no-mask-omegas", type=float, nargs="*", default=NO_MASK_OMEGAS,
                        help="omega_ref without the mask")
    parser.add_argument("--p-r", type=float, nargs="*", default=P_R, help="interleaved guidance's p_r (none: skip)")
    parser.add_argument("--unet", default=None,
                        help="a candidate UNet file in world/models (default: the world's shipped UNet); its "
                             "results go to world/results/candidates/<its name>/, never over the shipped ones")
    parser.add_argument("--marks", action="store_true", help=(
        "the part-marked world (its renders, VAE and UNet; world/README.md, \"Fourth part\"); results in "
        "world/results/marks/"))
    args = parser.parse_args(argv)
    out = RESULTS
    if args.marks:  # the part-marked world: its shipped UNet unless a candidate is named
        experiment.host.use_marks()
        out = RESULTS / "marks"
    if args.unet is not None:
        out = RESULTS / "candidates" / args.unet.removesuffix(".safetensors")
    elif args.marks:
        args.unet = experiment.host.MARKS_UNET_FILE
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    world = experiment.World(args.unet)
    rows, grid = [], []
    all_settings = settings(args.omegas, args.no_mask_omegas, p_rs=args.p_r)
    for i in range(args.subjects):
        case = experiment.make_case(i)
        oracle = experiment.oracle_images(case, args.seeds)
        rows += score_rows(case, "oracle (renders)", experiment.score(oracle, case), args.seeds)
        shown = {}
        for setting in all_settings:
            images, scores = world.run(case, setting, args.seeds, steps=args.steps, cfg=args.cfg)
            rows += score_rows(case, setting.name, scores, args.seeds)
            shown[setting.name] = images[0]
        if i < args.grid_subjects:
            grid.append([case.reference_image, shown["plain"], shown["ssa w=3 mask=subject"],
                         shown["ssa w=3 mask=none"], shown["ssa w=10 mask=subject"], oracle[0]])
        print(f"subject {i + 1}/{args.subjects} ({time.time() - t0:.0f} s)", flush=True)
    seconds = time.time() - t0

    table = write_rows(rows, out / "effect.csv", args.seeds)
    write_table(table, f"UNet {args.unet or 'unet.safetensors'}{' (part-marked world)' if args.marks else ''}: "
                f"{args.subjects} held-out subjects x {args.seeds} seeds, {experiment.SAMPLER} {args.steps} steps, "
                f"cfg {args.cfg}; mean +- spread over seeds (std of the per-seed means). identity: cosine of the "
                "world's identity embedder to the reference; pattern: fraction of the 9 pattern cells read right "
                "(chance 0.2); scene / time / position: fraction read as prompted. Time: "
                f"{seconds:.0f} s.", out / "effect.md")
    grid_png(grid, out / "effect_grid.png")
    plot(table, out / "effect.png")


def plot(table, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, metric, label in zip(axes, ("identity", "pattern", "scene"),
                                 ("subject fidelity (identity cosine)", "pattern cells right", "scene read as prompted")):
        for mask, style in (("subject", "-o"), ("none", "--s")):
            points = [(0, table["plain"][metric])] + [(w, table[f"ssa w={w:g} mask={mask}"][metric])
                                                       for w in OMEGAS if f"ssa w={w:g} mask={mask}" in table]
            ax.errorbar([w for w, _ in points], [m for _, (m, _) in points], yerr=[s for _, (_, s) in points],
                        fmt=style, capsize=3, label=f"SSA, mask={mask}")
        for ref, colour in (("plain", "grey"), ("oracle (renders)", "green")):
            ax.axhline(table[ref][metric][0], color=colour, lw=1, ls=":", label=ref)
        ax.set_xlabel("omega_ref")
        ax.set_title(label, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
