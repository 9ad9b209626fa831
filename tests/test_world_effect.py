"""The method's EFFECT, guarded on the world's shipped trained models (world/, see world/README.md).

On a handful of held-out subjects (never seen by any trained part of the world), sampled through the
host's KSampler path (comfy.sample.sample) with the pack's Self-Subject-Attention node:
- self-subject-attention raises subject fidelity (the world's identity embedder, paired per subject
  and seed against plain sampling) by more than MARGIN, and keeps prompt fidelity (scene read as
  prompted) within SCENE_BOUND of plain sampling;
- the same check FAILS on deliberately broken uses of the method, each at a seam outside the pack:
  the mask's polarity inverted (1 - mask), and the reference noised to another level than the generated
  latent (noise of sigma_max added to the reference latent before it reaches the node), and the
  reference's token grid transposed (its latent and mask transposed before the node). Each variant
  must lose the effect (its gain stays below MARGIN).
MARGIN and the bounds come from the full measurement (python -m world.effect, world/results/effect.md):
see the constants below.

MEASURED (world/README.md): in the shipped world self-subject-attention has NO measurable effect on
subject fidelity (its gain over plain sampling is within the seed spread, slightly negative), so the
effect test is a strict xfail: it records the finding, and the day the world (a longer-trained UNet)
shows the effect it XPASSes, which fails the run, so that the xfail is removed and the test becomes the
guard. The broken-variant tests skip, with that reason, while there is no intact effect to lose.
The world's own parts (files, measures, base model drawing subjects) are checked for real.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from world import experiment, generator, manifest  # the repo root is on sys.path (conftest.py)
from world_checks import paired_gain, world_run

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
    "reference grid transposed": experiment.Setting(OMEGA_REF, "subject", transposed=True),
}


@pytest.fixture(scope="module")
def results():
    with world_run():
        world = experiment.World()
        out = {name: {m: [] for m in ("identity", "pattern", "scene", "seen")} for name in SETTINGS}
        for i in range(SUBJECTS):
            case = experiment.make_case(i)
            for name, setting in SETTINGS.items():
                images, scores = world.run(case, setting, SEEDS)
                scores["seen"] = [generator.read_pattern(np.asarray(im)) is not None for im in images]
                for m in out[name]:
                    out[name][m].extend(scores[m])
        return {name: {m: np.array(v) for m, v in metrics.items()} for name, metrics in out.items()}


def test_world_files_match_their_manifest():
    manifest.verify()


def test_measures_read_the_generator():
    """On renders of held-out subjects: exact pattern read-out, scene classifier, identity embedder."""
    from world import generator, measures

    rng = np.random.default_rng(3)
    subjects = generator.heldout_subjects(40, seed=99)
    first, second, captions = [], [], []
    for s in subjects:
        c1, c2 = (generator.draw_caption(rng, s.family, True) for _ in range(2))
        first.append(generator.render(s, c1, rng)[0])
        second.append(generator.render(s, c2, rng)[0])
        captions.append(c1)
    first = torch.from_numpy(np.stack(first)).float() / 255
    second = torch.from_numpy(np.stack(second)).float() / 255
    assert all(generator.pattern_accuracy(np.asarray(im), s) == 1.0 for im, s in zip(first, subjects))
    read = measures.read_caption(first)
    assert np.mean(read["scene"] == [c.scene for c in captions]) >= 0.95
    sims = (measures.embed(first) @ measures.embed(second).T).numpy()
    assert np.mean(sims.argmax(1) == np.arange(len(subjects))) >= 0.9  # measured 0.96 among 300


def test_base_model_draws_a_subject(results):
    seen = results["plain"]["pattern"]
    assert np.isfinite(seen).all()
    assert np.mean(results["plain"]["seen"]) >= 0.9  # measured 0.99 over 418 samples


def gain(results, name, metric="identity"):
    """Paired gain over plain sampling: mean and standard error over (subject, seed)."""
    return paired_gain(results, name, "plain", metric)


@pytest.mark.xfail(strict=True, reason=(
    "measured: in the shipped world self-subject-attention does not raise subject fidelity "
    "(world/README.md); XPASS means the world now shows the effect: remove this mark"))
def test_self_subject_attention_raises_subject_fidelity(results):
    mean, se = gain(results, "ssa")
    assert mean > MARGIN, f"identity gain {mean:.3f} +- {se:.3f} is not above {MARGIN}"
    assert mean > 2 * se, f"identity gain {mean:.3f} is within 2 standard errors ({se:.3f}) of none"
    pattern, _ = gain(results, "ssa", "pattern")
    assert pattern > 0, f"pattern read-out gain {pattern:.3f} is not positive"


def test_self_subject_attention_keeps_prompt_fidelity(results):
    plain, ssa = results["plain"]["scene"].mean(), results["ssa"]["scene"].mean()
    assert ssa >= plain - SCENE_BOUND, f"scene read as prompted: {ssa:.2f} with SSA vs {plain:.2f} plain"


@pytest.mark.parametrize("variant", ["mask inverted", "reference misnoised", "reference grid transposed"])
def test_broken_variant_loses_the_effect(results, variant):
    mean, se = gain(results, variant)
    good, _ = gain(results, "ssa")
    if good <= MARGIN:
        pytest.skip(f"the intact method has no effect to lose in this world (gain {good:.3f} <= {MARGIN}); "
                    f"{variant}: gain {mean:.3f} +- {se:.3f}")
    assert mean < MARGIN, f"{variant}: identity gain {mean:.3f} +- {se:.3f} (intact method: {good:.3f})"


@pytest.mark.xfail(strict=True, reason=(
    "measured (world/README.md, third part): in the shipped UNet the reference raises the denoising error "
    "(-4 % at omega_ref 3, -2 % when the reference is the image itself); XPASS means a UNet whose "
    "self-attention finds corresponding tokens: remove this mark and the one above"))
def test_the_reference_lowers_the_denoising_error():
    """The most direct check of the effect: eps-MSE with the reference (the very image, independently
    noised) below the plain prediction's, by more than 2 standard errors over held-out subjects."""
    from world import diagnose

    world = experiment.World()
    gain = diagnose.denoising_gain(world, "same", n=12, omegas=(3.0,))[3.0, "image"].mean(1)
    se = gain.std(ddof=1) / np.sqrt(len(gain))
    assert gain.mean() > 2 * se, f"error drop {gain.mean():+.3f} +- {se:.3f} (se, {len(gain)} subjects)"
