"""The rounding tolerance of tests/tolerances.py: it admits summation-order differences and rejects real errors."""

import pytest
import torch

from tolerances import assert_rounding_close, rounding_tolerance


@pytest.mark.parametrize("reduction", [16, 576, 4096])
def test_batched_against_split_and_float32_against_float64_matmuls_stay_inside_the_bound(reduction):
    g = torch.Generator().manual_seed(reduction)
    a, w = torch.randn(64, reduction, generator=g), torch.randn(reduction, 96, generator=g)
    batched = a @ w
    split = torch.cat([a[i:i + 1] @ w for i in range(a.shape[0])])
    exact = a.double() @ w.double()
    # The values grow like sqrt(K); the bound is relative to their size.
    assert_rounding_close(split, batched, reduction)
    assert_rounding_close(batched.double(), exact, reduction, dtype=torch.float32)


def test_a_real_error_of_one_part_in_ten_thousand_is_rejected():
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(8, 576, generator=g), torch.randn(576, 32, generator=g)
    good = a @ w
    bad = good.clone()
    bad[3, 7] += 1e-4 * float(good.abs().max())
    with pytest.raises(AssertionError):
        assert_rounding_close(bad, good, 576)


def test_the_bound_scales_with_the_dtype():
    assert rounding_tolerance(torch.float16, 64, 1.0) / rounding_tolerance(torch.float32, 64, 1.0) == \
        pytest.approx(torch.finfo(torch.float16).eps / torch.finfo(torch.float32).eps)
