"""Measure subject fidelity (CLIP-I, DINO) and prompt fidelity (CLIP-T) on DreamBench or on any folders.

    python scripts/evaluate.py --dreambench DATASET --generated OUT --clip ViT-B-32.safetensors --dino dino-vits16/
    python scripts/evaluate.py --dreambench DATASET --generated OUT --clip ... \\
        --workflow example_workflows/dreamtuner_3_sdxl_training_free.json --comfyui /path/to/ComfyUI \\
        --sweep omega_ref=0,1.5,3,4.5 beta=0,0.2,0.5
    python scripts/evaluate.py --generated MY_IMAGES --real MY_SUBJECT --prompts prompts.txt --clip ...

DreamBench mode reads the dataset of DreamBooth (a folder per subject with its
real images) and the protocol's subjects, classes and 25 prompts per subject
(object or live-subject list), shipped in dreamtuner_core/scoring/data/dreambench.json.
Generated images live in OUT/SETTING/SUBJECT/PP_SEED.png (PP the prompt's
index); with --workflow the missing ones are generated first through the
pack's headless runner (resumable: images already there are kept when the
PP_SEED.json beside each says they were made the same way, else the run stops
naming what differs), for every setting of --sweep (the product of the
values), subject, prompt and seed.
The subject's first real image (sorted by name) is the single reference; CLIP-I and DINO
score each image against the subject's OTHER real images (against the reference only when it
is the subject's one image), so a copy of the reference is not rewarded with a cosine of 1.
In folder mode (--real) every real image is scored against (the reference is not known).

Writes into --output (default OUT): fidelity.csv (one row per image),
fidelity.md (per setting overall, objects and live, and per subject, beside
DreamTuner's Table 1) and fidelity_plot.png (CLIP-I and DINO against CLIP-T,
one point per setting, with the paper's points; needs matplotlib).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import itertools
import json
import os
import pathlib
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..dreamtuner_core import files, scoring
from ..dreamtuner_core.errors import DreamTunerInputError
from ..dreamtuner_core.scoring import dreambench

from . import run as runner
from . import workflow as wf
from .server import ServerError

DEFAULT_SETTING = "default"
CSV_NAME, TABLE_NAME, PLOT_NAME = "fidelity.csv", "fidelity.md", "fidelity_plot.png"


@dataclass(frozen=True)
class Setting:
    """One point of the sweep: widget values set on every node that has the widget (or on NODE_ID.NAME)."""

    values: tuple = ()

    @property
    def label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.values) or DEFAULT_SETTING

    @property
    def folder(self) -> str:
        text = "_".join(f"{k}={v}" for k, v in self.values) or DEFAULT_SETTING
        return "".join(c if c.isalnum() or c in "._=-" else "-" for c in text)


@dataclass
class Job:
    """One image to have: what to generate, where it goes, and what scores it."""

    setting: Setting
    subject: str
    class_word: str
    live: Optional[bool]
    prompt_index: int
    prompt: str  # the generation prompt (with the identifier)
    score_prompt: str  # the prompt CLIP-T reads (identifier removed)
    seed: Optional[int]
    reference: pathlib.Path
    target: pathlib.Path
    real: list = field(default_factory=list)


# ----------------------------------------------------------------------------- arguments

def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split(
                                         "\n\n", 2)[2])
    data = parser.add_argument_group("images")
    data.add_argument("--dreambench", type=pathlib.Path, metavar="DATASET",
                      help="DreamBooth's dataset folder (a folder of real images per subject)")
    data.add_argument("--generated", type=pathlib.Path, required=True,
                      help="the generated images (DreamBench: OUT/SETTING/SUBJECT/PP_SEED.png; else any folder)")
    data.add_argument("--real", type=pathlib.Path, help="folder mode: the real images of the subject")
    data.add_argument("--prompts", type=pathlib.Path,
                      help="folder mode: .txt (one prompt per generated image, or one for all) or .csv (file,prompt)")
    data.add_argument("--subjects", help="DreamBench: a comma list of subjects (default: all 30)")
    data.add_argument("--prompts-per-subject", type=int, default=None,
                      help="DreamBench: only the first N prompts of each subject (default: all 25)")
    data.add_argument("--images-per-prompt", type=int, default=None, help="seeds per prompt (default: 4)")
    data.add_argument("--seed", type=int, default=0, help="first seed; image k of a prompt uses seed + k")
    data.add_argument("--token", default="", help="the subject identifier put before the class word in the "
                      "generation prompt (e.g. an embedding of a fine-tuned [S*]); CLIP-T reads the prompt without it")
    gen = parser.add_argument_group("generation (optional): a workflow run through the headless runner")
    gen.add_argument("--workflow", type=pathlib.Path, help="a workflow file saved by the web UI; generates the "
                     "missing images (its subject LoadImage gets the reference, its positive prompt the prompt)")
    runner.add_connection_arguments(gen)
    gen.add_argument("--sweep", nargs="+", default=[], metavar="NAME=V1,V2",
                     help="widget values to sweep, e.g. omega_ref=0,1.5,3 beta=0,0.2 (every node with the widget; "
                     "NODE_ID.NAME for one node); one setting per combination")
    gen.add_argument("--set", action="append", default=[], metavar="NODE_ID.INPUT=VALUE",
                     help="a fixed widget value for every run (repeatable)")
    gen.add_argument("--negative", help="the negative prompt")
    gen.add_argument("--steps", type=int, help="sampling steps")
    gen.add_argument("--size", help="WIDTHxHEIGHT of the generated images")
    gen.add_argument("--timeout", type=float, default=3600, help="seconds to wait for one image")
    score = parser.add_argument_group("scoring models (local files; nothing is downloaded)")
    score.add_argument("--clip", type=pathlib.Path, help="open_clip weights (.safetensors) for CLIP-I and CLIP-T")
    score.add_argument("--clip-arch", default="ViT-B-32", help="open_clip architecture of --clip (protocol: ViT-B-32)")
    score.add_argument("--dino", type=pathlib.Path, help="folder with config.json + model.safetensors of DINO ViT-S/16")
    score.add_argument("--device", default="cpu", help="torch device for scoring (cpu, cuda)")
    parser.add_argument("--output", type=pathlib.Path, help="folder for the CSV, table and plot (default: --generated)")
    args = parser.parse_args(argv)
    if args.dreambench is None and (args.real is None or args.prompts is None):
        parser.error("give --dreambench DATASET, or --real FOLDER and --prompts FILE for a pair of folders")
    if args.dreambench is not None and (args.real is not None or args.prompts is not None):
        parser.error("--real/--prompts are for a pair of folders; DreamBench mode reads the protocol's prompts")
    if args.clip is None and args.dino is None:
        parser.error("give --clip (CLIP-I, CLIP-T) and/or --dino (DINO): no metric to compute otherwise")
    if args.workflow is not None:
        runner.check_connection_arguments(parser, args, needed_for="--workflow")
    if args.dreambench is None and (args.workflow or args.sweep):
        parser.error("--workflow/--sweep generate DreamBench images: give --dreambench DATASET")
    for name in ("prompts_per_subject", "images_per_prompt"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    args.output = args.output or args.generated
    return args


def parse_sweep(items) -> list:
    """``["omega_ref=0,1.5", "beta=0,0.2"]`` -> one Setting per combination, in sweep order."""
    axes = []
    for item in items:
        name, equals, values = item.partition("=")
        name = name.strip()
        parts = [v.strip() for v in values.split(",") if v.strip()]
        if not equals or not name or not parts:
            raise DreamTunerInputError(f"--sweep {item}: write NAME=V1,V2,... (e.g. omega_ref=0,1.5,3).")
        if any(n == name for n, _ in axes):
            raise DreamTunerInputError(f"--sweep: {name} is given twice; list all its values in one NAME=V1,V2.")
        axes.append((name, [runner.parse_value(v) for v in parts]))
    if not axes:
        return [Setting()]
    return [Setting(tuple(zip([n for n, _ in axes], combo))) for combo in itertools.product(*[v for _, v in axes])]


# ----------------------------------------------------------------------------- the plan

def dreambench_jobs(args, settings) -> list:
    """Every (setting, subject, prompt, seed) image of the protocol, with the real images it is scored against."""
    subjects, object_prompts, live_prompts, per_prompt = dreambench.load_protocol()
    per_prompt = args.images_per_prompt or per_prompt
    known = {s.name: s for s in subjects}
    if args.subjects:
        names = [n.strip() for n in args.subjects.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise DreamTunerInputError(f"--subjects: {', '.join(unknown) or '(none)'} not DreamBench subjects; "
                                       f"choose among {', '.join(known)}.")
        subjects = [known[n] for n in names]
    if not args.dreambench.is_dir():
        raise DreamTunerInputError(f"--dreambench: {args.dreambench} is not a folder (DreamBooth's dataset/).")
    jobs = []
    for subject in subjects:
        real = dreambench.image_files(args.dreambench / subject.name, f"--dreambench subject {subject.name}")
        templates = dreambench.subject_prompts(subject, object_prompts, live_prompts)[:args.prompts_per_subject]
        scored = dreambench.scored_real_images(real, real[0])  # CLIP-I/DINO not against the reference itself
        for setting in settings:
            for index, template in enumerate(templates):
                for k in range(per_prompt):
                    seed = args.seed + k
                    jobs.append(Job(setting, subject.name, subject.class_word, subject.live, index,
                                    dreambench.fill(template, subject.class_word, args.token),
                                    dreambench.fill(template, subject.class_word), seed, real[0],
                                    args.generated / setting.folder / subject.name / f"{index:02d}_{seed}.png",
                                    scored))
    return jobs


def folder_jobs(args) -> list:
    """Folder mode: every generated image, scored against every real image, with its prompt."""
    generated = dreambench.image_files(args.generated, "--generated", exclude=(PLOT_NAME,))  # a previous run's plot
    real = dreambench.image_files(args.real, "--real")
    prompts = dreambench.read_prompt_file(args.prompts, generated)
    return [Job(Setting(), args.real.name, "", None, i, p, p, None, real[0], g, real)
            for i, (g, p) in enumerate(zip(generated, prompts))]


# ----------------------------------------------------------------------------- generation

class RunnerGenerator:
    """Makes one image per call with the pack's headless runner on a ComfyUI server."""

    def __init__(self, server, workflow, args, settings=()):
        self.server, self.workflow, self.args = server, workflow, args
        self.object_info = server.object_info()
        problems = wf.check(workflow, self.object_info, check_values=False)
        if problems:
            raise wf.WorkflowError(problems)
        # every swept name names a widget, found once, before the first image is made
        self.sweep_targets = {name: self.targets(name) for setting in settings for name, _ in setting.values}

    def targets(self, name):
        """``NODE_ID.NAME`` entries of every active node with widget ``name`` (or the one named)."""
        node_id, dot, widget = name.partition(".")
        if dot and node_id.isdigit():
            return [name]
        found = [f"{node['id']}.{widget_name}" for node, widget_name in
                 runner._with_widget(self.workflow, self.object_info, [name])]
        if not found:
            raise DreamTunerInputError(f"--sweep {name}: no node of the workflow has a '{name}' widget.")
        return found

    def __call__(self, job: Job):
        server = self.server
        workflow, object_info = copy.deepcopy(self.workflow), self.object_info
        overrides = [f"{t}={json.dumps(v)}" for name, v in job.setting.values
                     for t in self.sweep_targets.get(name) or self.targets(name)]
        with tempfile.TemporaryDirectory(prefix="dreamtuner-inputs-") as scratch:
            # Uploaded under a name of its own: DreamBench names every subject's images 00.jpg, 01.jpg, ...
            reference = pathlib.Path(scratch) / f"dreambench-{job.subject}-{job.reference.name}"
            shutil.copyfile(job.reference, reference)
            options = argparse.Namespace(image=reference, mask=None, prompt=job.prompt, negative=self.args.negative,
                                         seed=job.seed, steps=self.args.steps, size=self.args.size,
                                         set=list(self.args.set) + overrides)
            named = runner.apply_overrides(workflow, object_info, options, scratch)
            runner.upload_images(workflow, object_info, server, named)
        images = runner.submit(server, runner.api_prompt(workflow, object_info), workflow, lambda kind, data: None,
                               self.args.timeout)
        if len(images) != 1:
            raise ServerError(f"the workflow saved {len(images)} images in one run; the evaluation needs exactly "
                              "one per run (one SaveImage, batch size 1)")
        job.target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=job.target.parent, prefix=".download-") as scratch:
            os.replace(server.download(images[0], scratch), job.target)


@contextlib.contextmanager
def runner_generator(args, settings=()):
    workflow = wf.load(args.workflow)
    with runner._connect(args) as server:
        yield RunnerGenerator(server, workflow, args, settings)


def _progress(total, description):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=description, unit="image", file=sys.stderr)


RECIPE_FIELDS = ("workflow", "set", "setting", "steps", "size", "negative", "prompt", "seed", "reference")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def workflow_digest(path) -> Optional[str]:
    """A hash of the workflow's content (its JSON, whatever the spacing), or None without a workflow."""
    if path is None:
        return None
    return _digest(json.dumps(wf.load(path), sort_keys=True).encode())


def recipe(job: Job, args, workflow=None) -> dict:
    """What makes a job's image, as kept next to it (``PP_SEED.json``): the workflow's content, every value the
    evaluation sets in it, and the reference image's content."""
    return {"workflow": workflow, "workflow_file": str(args.workflow) if args.workflow else None,
            "set": list(args.set), "setting": {k: v for k, v in job.setting.values}, "steps": args.steps,
            "size": args.size, "negative": args.negative, "prompt": job.prompt, "seed": job.seed,
            "reference": _digest(job.reference.read_bytes()), "reference_file": str(job.reference)}


def recipe_path(job: Job) -> pathlib.Path:
    return job.target.with_suffix(".json")  # PP_SEED.json beside PP_SEED.png


def check_reused(jobs, recipes, folder):
    """Refuse images already there that another recipe made (or that have no record of what made them)."""
    differing, unknown = {}, []
    for job in jobs:
        if not job.target.is_file():
            continue
        try:
            kept = json.loads(recipe_path(job).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            unknown.append(job.target)
            continue
        for name in RECIPE_FIELDS:
            if kept.get(name) != recipes[id(job)][name]:
                differing.setdefault(name, []).append(job.target)
    there = sum(job.target.is_file() for job in jobs)
    if unknown:
        raise DreamTunerInputError(
            f"{len(unknown)} of the {there} images in {folder} have no record of what made it (e.g. {unknown[0]}, "
            f"no {unknown[0].with_suffix('.json').name} beside it): they may come from another "
            "workflow or settings. Generate into another --generated folder, or delete them to make them again "
            "(or score them as they are, without --workflow).")
    if differing:
        lines = [f"{len(paths)} of the {there} images in {folder} were made with another {name} (e.g. {paths[0]})"
                 for name, paths in differing.items()]
        raise DreamTunerInputError(
            "; ".join(lines) + ". Keep those images apart: give another --generated folder for this run, or run "
            "the command that made them; delete them to make them again with this one.")


def generate_missing(jobs, generate: Callable[[Job], None], recipes=None) -> int:
    """Generate every job whose image is not there yet (resumable); returns how many were made.

    With ``recipes`` ({id(job): recipe}; ``check_reused`` has compared those of the images already there), each
    new image gets its recipe beside it, written before it.
    """
    todo = [job for job in jobs if not job.target.is_file()]
    if not todo:
        return 0
    bar = _progress(len(jobs), "generating")
    if bar is not None:
        bar.update(len(jobs) - len(todo))
    for job in todo:
        job.target.parent.mkdir(parents=True, exist_ok=True)
        if recipes is not None:  # first: an image is never there without the record of what made it
            dreambench.write_atomic(recipe_path(job), json.dumps(recipes[id(job)], indent=1) + "\n")
        generate(job)
        if not job.target.is_file():
            raise DreamTunerInputError(f"the generator wrote no image at {job.target}.")
        if bar is not None:
            bar.set_postfix_str(f"{job.setting.label} {job.subject} #{job.prompt_index} seed {job.seed}")
            bar.update(1)
    if bar is not None:
        bar.close()
    return len(todo)


# ----------------------------------------------------------------------------- scoring

def check_device(name):
    """The torch device ``--device`` names, or a DreamTunerInputError naming it and the fix."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DreamTunerInputError(f"--device {name}: not a PyTorch device name; use cpu, cuda, cuda:N or mps.") \
            from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DreamTunerInputError(
                f"--device {name}: this PyTorch sees no CUDA GPU (torch.cuda.is_available() is False: no NVIDIA "
                "GPU or driver, or a CPU-only PyTorch build); use --device cpu, or install a CUDA build of PyTorch.")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DreamTunerInputError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to "
                                       f"cuda:{count - 1}; choose one of them.")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DreamTunerInputError(f"--device {name}: this PyTorch has no Apple MPS device; use --device cpu.")
    elif device.type not in ("cpu",):
        raise DreamTunerInputError(f"--device {name}: the scoring runs on cpu, cuda, cuda:N or mps.")
    return device


def load_models(args) -> scoring.ScoringModels:
    clip = scoring.load_open_clip(str(args.clip), args.clip_arch, args.device) if args.clip else None
    dino = scoring.load_dino(str(args.dino), args.device) if args.dino else None
    return scoring.ScoringModels(clip_i=clip, clip_t=clip, dino=dino)


def check_complete(jobs):
    missing = [job.target for job in jobs if not job.target.is_file()]
    if missing:
        raise DreamTunerInputError(
            f"{len(missing)} of the {len(jobs)} expected generated images are missing (e.g. {missing[0]}); the "
            "DreamBench layout is GENERATED/SETTING/SUBJECT/PP_SEED.png. Generate them with --workflow, or limit "
            "the evaluation with --subjects, --prompts-per-subject and --images-per-prompt.")


def score_jobs(jobs, models: scoring.ScoringModels) -> list:
    """One row per job: its CLIP-I/DINO against its subject's real images and CLIP-T with its prompt.

    Each subject's real images are read and embedded once for all settings of a sweep.
    """
    real_cache, reference_embeddings, rows = {}, {}, []
    groups = {}
    for job in jobs:
        groups.setdefault((job.setting, job.subject), []).append(job)
    bar = _progress(len(jobs), "scoring")
    for (setting, subject), group in groups.items():
        real_key = tuple(group[0].real)
        if real_key not in real_cache:
            real_cache[real_key] = dreambench.read_images(group[0].real)
        generated = dreambench.read_images([job.target for job in group])
        scores = scoring.score_images(generated, real_cache[real_key], [job.score_prompt for job in group], models,
                                       reference_cache=reference_embeddings)
        for i, job in enumerate(group):
            rows.append(dict(setting=setting.label, subject=job.subject, **{"class": job.class_word},
                             live=job.live, prompt_index=job.prompt_index, prompt=job.score_prompt, seed=job.seed,
                             file=str(job.target), **{m: (float(v[i]) if (v := scores.per_image.get(m)) is not None
                                                         else None) for m in scoring.METRICS}))
        if bar is not None:
            bar.update(len(group))
    if bar is not None:
        bar.close()
    return rows


# ----------------------------------------------------------------------------- plot

def plot(rows, path, settings=(Setting(),)) -> Optional[pathlib.Path]:
    """CLIP-I (and DINO) against CLIP-T, one point per setting, beside DreamTuner's Table 1.

    One curve per combination of the other swept values, along the first swept name.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, no plot (pip install matplotlib)", file=sys.stderr)
        return None
    table = dreambench.summary(rows)
    points = {s: table[s.label]["all"] for s in settings
              if s.label in table and table[s.label]["all"][scoring.CLIP_T] is not None}
    panels = [m for m in (scoring.CLIP_I, scoring.DINO) if any(p[m] is not None for p in points.values())]
    if not points or not panels:
        print("note: no plot: it needs CLIP-T and CLIP-I or DINO", file=sys.stderr)
        return None
    curves = {}
    for setting in points:
        curves.setdefault(setting.values[1:], []).append(setting)
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), squeeze=False)
    for ax, metric in zip(axes[0], panels):
        for rest, members in curves.items():
            xs = [points[s][scoring.CLIP_T] for s in members]
            ys = [points[s][metric] for s in members]
            name = ",".join(f"{k}={v}" for k, v in rest) or "this run"
            ax.plot(xs, ys, "o-", label=name)
            for s, x, y in zip(members, xs, ys):
                text = f"{s.values[0][0]}={s.values[0][1]}" if s.values else s.label
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if metric == scoring.CLIP_I:
            for name, (t, i) in dreambench.PAPER_TABLE_1.items():
                mine = name == "DreamTuner"
                ax.plot([t], [i], "*" if mine else "s", color="tab:red" if mine else "0.6", markersize=12 if mine else 6)
                ax.annotate(f"{name} (paper)", (t, i), textcoords="offset points", xytext=(4, -10), fontsize=7,
                            color="tab:red" if mine else "0.4")
        ax.set_xlabel("CLIP-T (prompt fidelity)")
        ax.set_ylabel(f"{scoring.LABELS[metric]} (subject fidelity)")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower left", fontsize=7)
    figure.tight_layout()
    try:
        with files.replacing(path) as partial:
            figure.savefig(partial, format="png", dpi=120)
    finally:
        plt.close(figure)
    return path


# ----------------------------------------------------------------------------- main

def evaluate(args, generate: Optional[Callable[[Job], None]] = None) -> list:
    """Plan, check the inputs, generate what is missing, score, then write the CSV, table and plot."""
    check_device(args.device)
    settings = parse_sweep(args.sweep)
    jobs = dreambench_jobs(args, settings) if args.dreambench is not None else folder_jobs(args)
    for reals in {tuple(job.real) + (job.reference,) for job in jobs}:  # the reference is not always scored
        # Unreadable real images stop the run before anything is made. Decoded again for scoring: keeping
        # every subject's decoded pictures through a long generation would hold about a GB for nothing.
        dreambench.read_images(reals)
    models = load_models(args)
    if generate is not None or args.workflow is not None:
        digest = workflow_digest(args.workflow)
        recipes = {id(job): recipe(job, args, digest) for job in jobs}
        check_reused(jobs, recipes, args.generated)  # before anything is made (or a ComfyUI started)
    if generate is not None:
        made = generate_missing(jobs, generate, recipes)
        print(f"generated {made} images, {len(jobs) - made} were already there", file=sys.stderr)
    elif args.workflow is not None:
        with runner_generator(args, settings) as runner:
            made = generate_missing(jobs, runner, recipes)
        print(f"generated {made} images, {len(jobs) - made} were already there", file=sys.stderr)
    check_complete(jobs)
    rows = score_jobs(jobs, models)
    dreambench.write_atomic(args.output / CSV_NAME, dreambench.csv_text(rows))
    dreambench.write_atomic(args.output / TABLE_NAME, dreambench.markdown(rows))
    plot(rows, args.output / PLOT_NAME, settings)
    return rows


def main(argv=None, generate: Optional[Callable[[Job], None]] = None) -> int:
    args = parse_args(argv)
    try:
        evaluate(args, generate)
    except DreamTunerInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (wf.WorkflowError, ServerError) as error:
        for line in error.problems:
            print(f"error: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue", file=sys.stderr)
        return 130
    except OSError as error:  # the server went away, a disk is full: no traceback, the same resumable state
        print(f"error: {error}; run the same command again to continue", file=sys.stderr)
        return 1
    print(f"wrote {args.output / CSV_NAME}, {args.output / TABLE_NAME}", file=sys.stderr)
    print(pathlib.Path(args.output / TABLE_NAME).read_text(encoding="utf-8").split("\n## Per subject")[0])
    return 0
