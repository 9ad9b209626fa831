"""The run folder: checkpoints/, encoders/, loss.csv, loss.png (written by rank 0 only)."""

from __future__ import annotations

import csv
import glob
import os
import re
import shutil

from ..charts import loss_plot_png
from ..errors import DreamTunerInputError
from ..files import replacing

# What a run writes into its folder (``--overwrite`` removes these, and only these).
RUN_ENTRIES = ("checkpoints", "encoders", "loss.csv", "loss.png", "subject_encoder.safetensors")


def check_run_folder(config, main):
    """A fresh run (no ``--resume``) starts only in an empty or new folder, or with ``--overwrite``.

    Into a folder holding an earlier run, the new run would append to its loss log, overwrite its encoder,
    and its checkpoint pruning (by name) would delete the new run's checkpoints, while ``--resume latest``
    later continued the old run. With ``overwrite`` the earlier run's files (:data:`RUN_ENTRIES`) are removed
    first (by the main process; the caller waits for it); other files in the folder are left alone.
    """
    out = config.out
    if config.resume or not os.path.isdir(out) or not os.listdir(out):
        return
    if not config.overwrite:
        raise DreamTunerInputError(
            f"--out '{out}' is not empty (it holds an earlier run or other files): the new run would mix with it. "
            "Continue that run with --resume latest (the same settings), or start over with --overwrite "
            "(removes its checkpoints/, encoders/, loss.csv, loss.png and subject_encoder.safetensors), "
            "or give another --out.")
    if main:
        for name in RUN_ENTRIES:
            path = os.path.join(out, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)


class RunFiles:
    """The run folder: checkpoints/, encoders/, loss.csv, loss.png (written by rank 0 only)."""

    def __init__(self, out, main):
        self.out, self.main = out, main
        if main:
            os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
            os.makedirs(os.path.join(out, "encoders"), exist_ok=True)
        self.csv = os.path.join(out, "loss.csv")

    def checkpoint_path(self, step):
        return os.path.join(self.out, "checkpoints", f"checkpoint_{step:08d}.safetensors")

    def encoder_path(self, step):
        return os.path.join(self.out, "encoders", f"subject_encoder_step_{step:08d}.safetensors")

    @staticmethod
    def checkpoints(out):
        paths = glob.glob(os.path.join(out, "checkpoints", "checkpoint_*.safetensors"))
        return sorted(p for p in paths if re.fullmatch(r"checkpoint_\d{8}\.safetensors", os.path.basename(p)))

    def prune(self, keep):
        for path in self.checkpoints(self.out)[:-keep] if keep > 0 else []:
            os.remove(path)

    def log(self, step, loss, lr, rate):
        if not self.main:
            return
        new = not os.path.exists(self.csv)
        with open(self.csv, "a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["step", "loss", "lr", "samples_per_s"])
            writer.writerow([step, f"{loss:.6g}", f"{lr:.6g}", f"{rate:.4g}"])

    def rows(self):
        if not os.path.exists(self.csv):
            return []
        with open(self.csv, newline="") as handle:
            return list(csv.DictReader(handle))

    def truncate_log(self, step):
        """After a resume, drop the rows of steps the resumed run will repeat."""
        if not self.main or not os.path.exists(self.csv):
            return
        rows = [r for r in self.rows() if int(r["step"]) <= step]
        with replacing(self.csv) as partial, open(partial, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["step", "loss", "lr", "samples_per_s"])
            writer.writerows([[r["step"], r["loss"], r["lr"], r["samples_per_s"]] for r in rows])

    def plot(self):
        """loss.png from loss.csv (matplotlib is optional: the [train] extra; without it no plot)."""
        if not self.main:
            return
        rows = self.rows()
        if not rows:
            return
        loss_plot_png([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows],
                      os.path.join(self.out, "loss.png"), title="subject-encoder pretraining")
