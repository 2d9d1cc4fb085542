"""Linefit and Linefit+ against closed-form least squares (numpy.linalg.lstsq)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nowcast import Linefit, LinefitPlus


def _lstsq_line(states: np.ndarray):
    """(intercept, slope) per row of states (n, ctx), time t = 0..ctx-1."""
    ctx = states.shape[1]
    A = np.stack([np.ones(ctx), np.arange(ctx)], 1)
    coef, *_ = np.linalg.lstsq(A, states.T, rcond=None)
    return coef[0], coef[1]


@pytest.mark.parametrize("ctx", [2, 5, 7])
@pytest.mark.parametrize("k", [1, 3, 40])
def test_linefit_is_least_squares_extrapolation(ctx, k):
    g = torch.Generator().manual_seed(ctx * 100 + k)
    states = torch.randn(50, ctx, generator=g, dtype=torch.float64).cumsum(1).float()
    a, b = _lstsq_line(states.double().numpy())
    want = a + b * (ctx - 1 + k)
    got = Linefit(ctx=ctx).predict(None, states, k)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 10, 40])
def test_linefit_plus_is_newest_plus_k_slopes(k):
    g = torch.Generator().manual_seed(k)
    states = torch.randn(40, 5, generator=g).cumsum(1)
    _, b = _lstsq_line(states.double().numpy())
    want = states[:, -1].double().numpy() + k * b
    got = LinefitPlus(clip=None).predict(None, states, k)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_linefit_exact_on_a_line():
    t = torch.arange(5.0)
    states = torch.stack([2.0 + 0.5 * t, -1.0 - 0.25 * t])
    for model in (Linefit(), LinefitPlus(clip=None)):
        torch.testing.assert_close(model.predict(None, states, 4), torch.tensor([2.0 + 0.5 * 8, -1.0 - 0.25 * 8]))


def test_linefit_plus_clips_in_std_units_per_tensor():
    t = torch.arange(5.0)
    steep = 10.0 * t  # tensor 1: one element moving fast, its tensor std is large anyway
    states = torch.stack([steep, torch.zeros(5) + 0.001 * t, torch.zeros(5) - 0.001 * t])
    pred = LinefitPlus(clip=1.0, sizes=[1, 2]).predict(None, states, 40)
    std1 = steep.std()
    assert pred[0] == pytest.approx(float(steep[-1] + std1 + 1e-6), rel=1e-5)  # clipped at 1 std
    std2 = states[1:].std()
    assert (pred[1:] - states[1:, -1]).abs().max() <= std2 + 1e-6 + 1e-7


def test_linefit_needs_no_graph_and_checks_inputs():
    lf = Linefit()
    assert lf.needs_graph is False
    with pytest.raises(ValueError, match="ctx=5"):
        lf.predict(None, torch.zeros(3, 4), 1)
    with pytest.raises(ValueError, match=r"1\.\.40"):
        lf.predict(None, torch.zeros(3, 5), 0)
    with pytest.raises(ValueError, match=r"1\.\.40"):
        lf.predict(None, torch.zeros(3, 5), 41)
    with pytest.raises(NotImplementedError, match="embedding"):
        lf.embed(None, torch.zeros(3, 5))


def test_no_change_returns_the_newest_state_and_round_trips(tmp_path):
    from nowcast import NoChange, load, save

    states = torch.randn(30, 5).cumsum(1)
    for k in (1, 40):
        got = NoChange().predict(None, states, k)
        assert torch.equal(got, states[:, -1]) and got.data_ptr() != states.data_ptr()
    with pytest.raises(ValueError, match="horizon"):
        NoChange().predict(None, states, 41)
    save(NoChange(ctx=5), tmp_path / "nc")
    again = load(tmp_path / "nc")
    assert type(again) is NoChange and again.config == {"ctx": 5, "horizon": 40}
