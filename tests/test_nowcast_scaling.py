"""Scaling methods: definitions and exact round trips."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nowcast.scaling import METHODS, scale, unscale


@st.composite
def _states(draw):
    sizes = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
    ctx = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    mag = draw(st.sampled_from([1e-4, 1.0, 1e3]))
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(sum(sizes), ctx, generator=g, dtype=torch.float64) * mag
    if draw(st.booleans()):  # a constant tensor
        states[: sizes[0]] = 0.5
    return sizes, states


@settings(max_examples=60, deadline=None)
@given(_states(), st.sampled_from(METHODS))
def test_round_trip(data, method):
    sizes, states = data
    scaled, sc = scale(states, sizes, method)
    assert scaled.shape == states.shape and torch.isfinite(scaled).all()
    back = unscale(scaled, sc)
    torch.testing.assert_close(back, states, rtol=1e-12, atol=1e-12 * states.abs().max().item() + 1e-15)
    torch.testing.assert_close(unscale(scaled[:, -1], sc), states[:, -1], rtol=1e-12,
                               atol=1e-12 * states.abs().max().item() + 1e-15)


def test_per_tensor_std_definition():
    states = torch.randn(7, 5, dtype=torch.float64)
    scaled, sc = scale(states, [3, 4], "std")
    for sl in (slice(0, 3), slice(3, 7)):
        w = states[sl]
        torch.testing.assert_close(scaled[sl], (w - w.mean()) / (w.std() + 1e-6))
    # the published unscale multiplies by the std without the epsilon
    torch.testing.assert_close(unscale(scaled, sc, exact=False)[:3],
                               scaled[:3] * states[:3].std() + states[:3].mean())


def test_per_parameter_methods():
    states = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]], dtype=torch.float64)
    s, _ = scale(states, [2], "std-param")
    torch.testing.assert_close(s[0], torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) / (1 + 1e-6))
    assert (s[1] == 0).all()
    m, _ = scale(states, [2], "minmax-param")
    torch.testing.assert_close(m[0], torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64) * 2 / (2 + 1e-6))
    n, _ = scale(states, [2], "none")
    assert torch.equal(n, states)


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown scaling"):
        scale(torch.zeros(3, 5), [3], "zscore")
    with pytest.raises(ValueError, match="add up to 4"):
        scale(torch.zeros(3, 5), [4], "std")
