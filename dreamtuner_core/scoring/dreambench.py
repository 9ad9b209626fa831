"""DreamBench, DreamBooth's evaluation protocol, and the files of an evaluation.

The protocol (DreamBooth, Ruiz et al. 2023; used by DreamTuner's Table 1):
30 subjects (21 objects, 9 live subjects: cats and dogs), each with a class
word; 25 prompts per subject, taken from the object list or the live-subject
list; 4 images per subject and prompt (3000 images); CLIP-I and DINO averaged
over all pairs of generated and real images of a subject, CLIP-T over the
generated images. The subjects and prompts ship in ``data/dreambench.json``.

This module reads and checks folders, images and prompt files, and writes
the per-image CSV and the markdown tables, each atomically (a temporary file
in the same folder, then ``os.replace``), so an interrupted or failed run
leaves no half-written result. No ComfyUI import: the command line uses it.
"""

from __future__ import annotations

import csv
import io
import json
import pathlib
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..errors import DreamTunerInputError
from ..files import replacing
from .metrics import LABELS, METRICS

DATA_FILE = pathlib.Path(__file__).resolve().parent / "data" / "dreambench.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# DreamTuner, Table 1 (single reference image): (CLIP-T, CLIP-I).
PAPER_TABLE_1 = {
    "Textual Inversion": (0.251, 0.722),
    "MasaCtrl": (0.296, 0.735),
    "ELITE": (0.271, 0.726),
    "DreamBooth": (0.267, 0.788),
    "DreamTuner": (0.281, 0.767),
}


@dataclass(frozen=True)
class Subject:
    name: str
    class_word: str
    live: bool


def load_protocol(path=DATA_FILE):
    """(subjects, object prompts, live prompts, images per prompt) of the shipped DreamBench data file."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    subjects = [Subject(s["name"], s["class"], bool(s["live"])) for s in data["subjects"]]
    return subjects, list(data["object_prompts"]), list(data["live_prompts"]), int(data["images_per_prompt"])


def subject_prompts(subject: Subject, object_prompts, live_prompts):
    """The subject's 25 prompt templates: the live-subject list for pets, else the object list."""
    return live_prompts if subject.live else object_prompts


def fill(template: str, class_word: str, token: str = "") -> str:
    """A prompt template with the identifier and class word; an empty token leaves no double space.

    CLIP-T is scored on the prompt with token "" (the class word kept): the identifier is a
    made-up word CLIP does not know.
    """
    return re.sub(r"\s+", " ", template.replace("{token}", token).replace("{class}", class_word)).strip()


# ----------------------------------------------------------------------------- images and folders

def image_files(folder, what: str, exclude=()) -> list:
    """The image files of ``folder`` (but the names in ``exclude``), sorted by name; a named error for a
    missing or empty folder."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise DreamTunerInputError(f"{what}: {folder} is not a folder.")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.name not in exclude)
    if not files:
        raise DreamTunerInputError(f"{what}: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    return files


def scored_real_images(real: Sequence, reference) -> list:
    """The real images a generated image's subject fidelity (CLIP-I, DINO) is scored against: every real
    image of the subject but the ``reference`` it was generated from, when the subject has others.

    Scored against its own reference, an image that copies the reference gets a cosine of 1 for that pair,
    so CLIP-I rewards copying rather than the subject's identity (the inflated value the paper's protocol
    avoids: its single reference is the input, the other real images of the subject are the yardstick).
    A subject with the reference as its only real image is scored against it (nothing else to compare).
    """
    real = list(real)
    others = [p for p in real if pathlib.Path(p) != pathlib.Path(reference)]
    return others or real


def read_image(path) -> torch.Tensor:
    """An image file as an IMAGE [1, H, W, 3] in [0, 1] (alpha dropped); a named error if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            rgb = picture.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise DreamTunerInputError(f"cannot read the image {path} ({error}); replace or remove it.") from None
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(rgb.height, rgb.width, 3)
    return (data.float() / 255.0)[None]


def read_images(paths) -> list:
    return [read_image(p) for p in paths]


def read_prompt_file(path, generated: Sequence[pathlib.Path]) -> list:
    """One prompt per generated image, from a prompt file:

    - ``.txt``: one prompt per line, in the order of the generated images' sorted names, or a
      single line for all of them (blank lines ignored);
    - ``.csv``: a header with the columns ``file`` and ``prompt``, one row per generated image.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise DreamTunerInputError(f"--prompts: {path} is not a file.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DreamTunerInputError(f"--prompts: cannot read {path} as UTF-8 text ({error}).") from None
    names = [p.name for p in generated]
    if path.suffix.lower() == ".txt":
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise DreamTunerInputError(f"--prompts: {path} is empty; write one prompt per line.")
        if len(lines) == 1:
            return lines * len(names)
        if len(lines) != len(names):
            raise DreamTunerInputError(
                f"--prompts: {path} has {len(lines)} prompts but there are {len(names)} generated images; give "
                "one line per image (in the order of their sorted file names) or a single line for all.")
        return lines
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        if not rows or not {"file", "prompt"} <= set(rows[0]):
            raise DreamTunerInputError(f"--prompts: {path} must be a CSV with a header row 'file,prompt' and one "
                                       "row per generated image.")
        by_name = {}
        for row in rows:
            name, prompt = (row.get("file") or "").strip(), (row.get("prompt") or "").strip()
            if not name or not prompt:
                raise DreamTunerInputError(f"--prompts: {path} has a row without a file or a prompt: {row}.")
            by_name[pathlib.Path(name).name] = prompt
        missing = [n for n in names if n not in by_name]
        if missing:
            raise DreamTunerInputError(f"--prompts: {path} gives no prompt for {len(missing)} generated images "
                                       f"(e.g. {missing[0]}); add a row for each.")
        return [by_name[n] for n in names]
    raise DreamTunerInputError(f"--prompts: {path} must be a .txt (one prompt per line) or a .csv "
                               "(columns file,prompt) file.")


# ----------------------------------------------------------------------------- results

COLUMNS = ("setting", "subject", "class", "live", "prompt_index", "prompt", "seed", "file") + METRICS


def write_atomic(path, text: str):
    """Write ``text`` to ``path`` through a temporary file in the same folder (:func:`.files.replacing`)."""
    with replacing(path) as partial, open(partial, "w", encoding="utf-8") as handle:
        handle.write(text)


def csv_text(rows: Sequence[dict]) -> str:
    """The per-image rows as CSV (scores with 6 decimals; a metric not computed is empty)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{row[k]:.6f}" if k in METRICS and row.get(k) is not None else row.get(k, ""))
                         for k in COLUMNS})
    return out.getvalue()


def _mean(rows, metric) -> Optional[float]:
    values = [r[metric] for r in rows if r.get(metric) is not None]
    return sum(values) / len(values) if values else None


def summary(rows: Sequence[dict]) -> dict:
    """{setting: {"all"/"objects"/"live"/subject: {metric: mean, "images": n}}}, settings in first-seen order.

    Every image carries its own mean over the real images, so the mean of the rows is the protocol's
    mean over all (generated, real) pairs when every subject has the same number of real images, and
    the DreamBench figure (mean of per-image means) otherwise.
    """
    out = {}
    for setting in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == setting]
        groups = {"all": mine, "objects": [r for r in mine if r.get("live") is False],
                  "live": [r for r in mine if r.get("live") is True]}
        groups.update({s: [r for r in mine if r["subject"] == s] for s in dict.fromkeys(r["subject"] for r in mine)})
        out[setting] = {name: dict({m: _mean(g, m) for m in METRICS}, images=len(g)) for name, g in groups.items() if g}
    return out


def _cell(value):
    return "–" if value is None else f"{value:.3f}"


def markdown(rows: Sequence[dict], title: str = "Subject fidelity") -> str:
    """An overall table (one row per setting, the paper's Table 1 beside it) and a per-subject table."""
    table = summary(rows)
    metrics = [m for m in METRICS if any(r.get(m) is not None for r in rows)]
    head = "| " + " | ".join(LABELS[m] for m in metrics) + " |"
    rule = "|" + "---:|" * len(metrics)
    lines = [f"# {title}", "", "## Overall", "", "| setting | images " + head, "|---|---:" + rule]
    for setting, groups in table.items():
        for group in ("all", "objects", "live"):
            if group in groups and (group == "all" or ("objects" in groups and "live" in groups)):
                label = setting if group == "all" else f"{setting} ({group})"
                lines.append(f"| {label} | {groups[group]['images']} | "
                             + " | ".join(_cell(groups[group][m]) for m in metrics) + " |")
    lines += ["", "Reported in DreamTuner's Table 1 (one reference image per subject; the paper names neither its "
              "test set nor its CLIP model):", "",
              "| method | CLIP-T | CLIP-I |", "|---|---:|---:|"]
    lines += [f"| {name} | {t:.3f} | {i:.3f} |" for name, (t, i) in PAPER_TABLE_1.items()]
    for setting, groups in table.items():
        subjects = [g for g in groups if g not in ("all", "objects", "live")]
        lines += ["", f"## Per subject: {setting}", "", "| subject | images " + head, "|---|---:" + rule]
        lines += [f"| {s} | {groups[s]['images']} | " + " | ".join(_cell(groups[s][m]) for m in metrics) + " |"
                  for s in subjects]
    return "\n".join(lines) + "\n"
