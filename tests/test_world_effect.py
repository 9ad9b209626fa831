"""The method's EFFECT, guarded on the world's shipped trained models (world/, see world/README.md).

On a handful of held-out subjects (never seen by any trained part of the world), sampled through the
host's KSampler path (comfy.sample.sample) with the pack's Self-Subject-Attention node:
- self-subject-attention raises subject fidelity (the world's identity embedder, paired per subject
  and seed against plain sampling) by more than MARGIN, and keeps prompt fidelity (scene read as
  prompted) within SCENE_BOUND of plain sampling;
- the same check FAILS on deliberately broken uses of the method, each at a seam outside the pack:
  the mask's polarity inverted (1 - mask), and the reference noised to another level than the generated
  latent (noise of sigma_max added to the reference latent before it reaches the node). Each variant
  must lose the effect (its gain stays below MARGIN).
MARGIN and the bounds come from the full measurement (python -m world.effect, world/results/effect.md):
see the constants below.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repo root, for the world package

from world import experiment, manifest  # noqa: E402

SUBJECTS = 6
SEEDS = 2
OMEGA_REF = 3.0
# From world/results/effect.md (24 held-out subjects x 3 seeds): see world/README.md, "CI test".
MARGIN = 0.05
SCENE_BOUND = 0.25

SETTINGS = {
    "plain": experiment.Setting(),
    "ssa": experiment.Setting(OMEGA_REF, "subject"),
    "mask inverted": experiment.Setting(OMEGA_REF, "inverted"),
    "reference misnoised": experiment.Setting(OMEGA_REF, "subject", reference_sigma=14.6),
}


@pytest.fixture(scope="module")
def results():
    try:
        manifest.verify()
    except (FileNotFoundError, ValueError) as error:
        pytest.fail(f"world files: {error}")
    threads = torch.get_num_threads()
    try:
        world = experiment.World()
        out = {name: {m: [] for m in ("identity", "pattern", "scene")} for name in SETTINGS}
        for i in range(SUBJECTS):
            case = experiment.make_case(i)
            for name, setting in SETTINGS.items():
                _, scores = world.run(case, setting, SEEDS)
                for m in out[name]:
                    out[name][m].extend(scores[m])
        return {name: {m: np.array(v) for m, v in metrics.items()} for name, metrics in out.items()}
    finally:
        torch.set_num_threads(threads)


def gain(results, name, metric="identity"):
    """Paired gain over plain sampling: mean and standard error over (subject, seed)."""
    delta = results[name][metric] - results["plain"][metric]
    return float(delta.mean()), float(delta.std(ddof=1) / np.sqrt(len(delta)))


def test_self_subject_attention_raises_subject_fidelity(results):
    mean, se = gain(results, "ssa")
    assert mean > MARGIN, f"identity gain {mean:.3f} +- {se:.3f} is not above {MARGIN}"
    assert mean > 2 * se, f"identity gain {mean:.3f} is within 2 standard errors ({se:.3f}) of none"
    pattern, _ = gain(results, "ssa", "pattern")
    assert pattern > 0, f"pattern read-out gain {pattern:.3f} is not positive"


def test_self_subject_attention_keeps_prompt_fidelity(results):
    plain, ssa = results["plain"]["scene"].mean(), results["ssa"]["scene"].mean()
    assert ssa >= plain - SCENE_BOUND, f"scene read as prompted: {ssa:.2f} with SSA vs {plain:.2f} plain"


@pytest.mark.parametrize("variant", ["mask inverted", "reference misnoised"])
def test_broken_variant_loses_the_effect(results, variant):
    mean, se = gain(results, variant)
    good, _ = gain(results, "ssa")
    assert mean < MARGIN, f"{variant}: identity gain {mean:.3f} +- {se:.3f} (intact method: {good:.3f})"
