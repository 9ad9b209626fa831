"""Tolerances for comparing two floating-point computations of the same value, derived from the
dtype and the computation, never tuned to one machine.

Two computations that are mathematically equal but sum in another order (a batched matmul vs the same
rows split, another BLAS kernel or CPU, another attention chunking, a bias added in another place) differ
by rounding only. For one dot product of length ``K`` in precision ``eps`` (unit roundoff of the dtype)
the difference is bounded by about ``K * eps * sum|terms|`` in the worst case and grows like
``sqrt(K) * eps * |terms|`` for random-sign rounding errors in practice (Higham, *Accuracy and Stability
of Numerical Algorithms*, 2nd ed., 3.5 and 3.6). Through ``depth`` layers evaluated one after another
the independent per-layer errors add up like a random walk, ``sqrt(depth)``. ``SAFETY`` covers the
constants these estimates drop (several roundings per layer: products, sums, the bias, a norm); it is
the same for every test.

So the tolerance of a comparison is ``SAFETY * eps(dtype) * sqrt(K) * sqrt(depth) * magnitude`` with
``magnitude`` the size of the values compared (their largest absolute value). A real error (a feature
read from the wrong row, a wrong weight, a missing term) is of the order of the values themselves, many
orders of magnitude above this bound.
"""

from __future__ import annotations

import math

import torch

SAFETY = 8.0


def eps(dtype) -> float:
    """The dtype's machine epsilon (spacing of numbers at 1)."""
    return torch.finfo(dtype).eps


def rounding_tolerance(dtype, reduction: int, magnitude: float, depth: int = 1) -> float:
    """Absolute tolerance between two summation orders of the same computation (see the module text).

    reduction: the longest dot product (a linear layer's input width, a conv's in_channels * kh * kw,
        an attention's key count); depth: how many such layers are evaluated in sequence.
    """
    return SAFETY * eps(dtype) * math.sqrt(max(reduction, 1)) * math.sqrt(max(depth, 1)) * float(magnitude)


def assert_rounding_close(actual, expected, reduction: int, depth: int = 1, magnitude=None, dtype=None):
    """assert_close at :func:`rounding_tolerance`.

    magnitude: defaults to the expected values' largest |x|; dtype: the precision the computation ran
    in, by default the less precise of the two tensors' dtypes (pass it when a float32 result was
    upcast to compare with a float64 reference).
    """
    actual, expected = torch.as_tensor(actual).detach(), torch.as_tensor(expected).detach()
    if dtype is None:
        dtype = max((actual.dtype, expected.dtype), key=eps)
    if magnitude is None:
        magnitude = float(expected.abs().max()) if expected.numel() else 0.0
    atol = rounding_tolerance(dtype, reduction, magnitude, depth)
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=0.0)


def network_shape(module: torch.nn.Module):
    """(reduction, depth) of a network: its longest dot product and its number of weight layers.

    The reduction is the largest fan-in of a weight (a conv's in_channels * kh * kw); the depth counts
    every weight of two or more dimensions, an upper bound on the layers one value passes through.
    """
    weights = [p for p in module.parameters() if p.ndim >= 2]
    return max(p[0].numel() for p in weights), len(weights)


def assert_network_outputs_close(actual, expected, module, evaluations: int = 1, magnitude=None):
    """Outputs of a network computed in two summation orders (e.g. batched vs split), after
    ``evaluations`` evaluations in sequence (the steps of a sampler: each step feeds the next)."""
    reduction, depth = network_shape(module)
    assert_rounding_close(actual, expected, reduction, depth * evaluations, magnitude)
