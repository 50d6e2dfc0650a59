"""Rotations for incoherence processing, against scipy's Hadamard matrices and explicit products."""

import math

import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.algorithms.hadamard import Rotation, fwht


@settings(max_examples=20, deadline=None)
@given(log_n=st.integers(0, 9), rows=st.integers(1, 5), seed=st.integers(0, 1000))
def test_fwht_is_the_normalised_sylvester_hadamard(log_n, rows, seed):
    n = 2**log_n
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    h = torch.tensor(scipy.linalg.hadamard(n), dtype=torch.float64) / math.sqrt(n)
    torch.testing.assert_close(fwht(x), x @ h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fwht(fwht(x)), x, rtol=1e-12, atol=1e-12)  # its own inverse


def test_fwht_refuses_other_widths():
    with pytest.raises(ValueError, match="power-of-two width, got 12"):
        fwht(torch.ones(2, 12))


@pytest.mark.parametrize(("n", "kind"), [(64, "hadamard"), (96, "hadamard"), (768, "hadamard"), (11, "hadamard"),
                                         (48, "orthogonal")])  # fmt: skip
def test_rotations_are_orthogonal_and_apply_their_matrix(n, kind):
    rotation = Rotation(n, kind, seed=3)
    r = rotation.matrix()
    torch.testing.assert_close(r @ r.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-10)
    x = torch.randn(4, 7, n, dtype=torch.float64)
    torch.testing.assert_close(rotation.apply(x), x @ r, rtol=1e-10, atol=1e-10)


def test_a_non_power_of_two_width_is_a_hadamard_kron_a_small_orthogonal_factor():
    rotation = Rotation(96, seed=1)  # 32 x 3
    signs = torch.diag(rotation.signs)
    h = torch.tensor(scipy.linalg.hadamard(32), dtype=torch.float64) / math.sqrt(32)
    expected = torch.kron(signs @ h, rotation.factor)
    torch.testing.assert_close(rotation.matrix(), expected, rtol=1e-12, atol=1e-12)


def test_rotating_both_sides_of_a_linear_keeps_its_function():
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(32, 384, generator=gen), torch.randn(10, 384, generator=gen)
    x[:, 5] *= 50  # an outlier channel, as in LLM activations
    rotation = Rotation(384, seed=0)
    xr, wr = rotation.apply(x), rotation.apply(w)
    torch.testing.assert_close(xr @ wr.T, x @ w.T, rtol=1e-4, atol=1e-3)
    assert xr.abs().max() < 0.5 * x.abs().max()  # the outlier is spread out


def test_same_seed_same_rotation_and_clear_errors():
    assert torch.equal(Rotation(40, seed=5).matrix(), Rotation(40, seed=5).matrix())
    assert not torch.equal(Rotation(40, seed=5).matrix(), Rotation(40, seed=6).matrix())
    with pytest.raises(ValueError, match="kind must be"):
        Rotation(8, "givens")
    with pytest.raises(ValueError, match="width 8 applied to a last dimension of 9"):
        Rotation(8).apply(torch.ones(9))
