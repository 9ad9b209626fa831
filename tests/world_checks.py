"""What the world's effect tests (tests/test_world_*.py) share: the files' check around a run, and the
paired gain they judge an effect by."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from world import manifest  # the repo root is on sys.path (conftest.py)


@contextlib.contextmanager
def world_run():
    """Fail (naming the rebuild) unless the world's files match their manifest; restore torch's thread
    count after the block (the world's runs set their own)."""
    try:
        manifest.verify()
    except (FileNotFoundError, ValueError) as error:
        pytest.fail(f"world files: {error}")
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def paired_gain(results, name, baseline, metric):
    """Mean and standard error over (subject, seed) of ``name``'s metric minus the baseline's, pair by pair."""
    delta = results[name][metric] - results[baseline][metric]
    return float(delta.mean()), float(delta.std(ddof=1) / np.sqrt(len(delta)))
