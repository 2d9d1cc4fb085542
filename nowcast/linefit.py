"""Linefit, Linefit+ and NoChange: per-parameter baselines through the past states, no learning.

Time is measured in units of the spacing between two recorded states: the ``ctx`` states sit at
t = 0, 1, ..., ctx - 1 (oldest first) and horizon ``k`` means t = ctx - 1 + k. With the optimizer's
default period 1000 and ctx 5, one unit is 200 base-optimizer steps, the same unit the learned
nowcasters' k uses.

- **Linefit**: fit ``w(t) = a + b t`` to each parameter's ``ctx`` values by least squares and return
  the line at ``t = ctx - 1 + k``. Computed as one matrix-vector product with the closed-form
  weights ``c_t = 1/n + (t - t_mean)(ctx - 1 + k - t_mean) / sum_t (t - t_mean)^2``.
- **Linefit+**: our reading of the NiNo paper's improved baseline (we could not get the appendix
  text, so this is a documented choice, not a transcription): the same least-squares slope ``b``,
  used the way NiNo predicts, as a residual on the newest state, ``w_newest + k * b``, with the change
  clipped per element to ``clip`` standard deviations of its tensor (the per-tensor ``std``
  scaling of NiNo) so that an element with a noisy trajectory cannot jump far. ``clip=None``
  disables the clip, and then Linefit+ is exactly ``w_newest + k * b``.

- **NoChange** (persistence): returns the newest state. Wrapped in :class:`nowcast.optim.NiNo` it is
  the null nowcast: the run is the base optimizer's with every nowcast step's update skipped, so it
  measures what the wrapper alone does to a run (the skipped steps, and how far a training run drifts
  after such a small perturbation), the baseline any nowcaster's effect has to exceed.

None needs a graph (``graph=None`` is accepted); with a graph, frozen parameters stay put, and
Linefit+ takes its tensor boundaries from the graph (without one, the whole vector is one tensor
unless ``sizes`` is given). ``embed`` is not defined for them (no learned representation).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .base import Nowcaster, keep_frozen
from .scaling import scale


def line_weights(ctx: int, k: float, dtype=torch.float64) -> torch.Tensor:
    """(ctx,) weights whose dot product with ``ctx`` values is the LS line at ``t = ctx - 1 + k``."""
    t = torch.arange(ctx, dtype=dtype)
    tc = t - t.mean()
    return 1.0 / ctx + tc * (ctx - 1 + k - t.mean()) / (tc * tc).sum()


def slope_weights(ctx: int, dtype=torch.float64) -> torch.Tensor:
    """(ctx,) weights whose dot product with ``ctx`` values is the LS slope per unit of t."""
    t = torch.arange(ctx, dtype=dtype)
    tc = t - t.mean()
    return tc / (tc * tc).sum()


class Linefit(Nowcaster):
    needs_graph = False

    def __init__(self, ctx: int = 5, horizon: int = 40):
        super().__init__()
        if ctx < 2:
            raise ValueError("a line needs ctx >= 2 states")
        self._config = dict(ctx=ctx, horizon=horizon)
        self.ctx, self.max_horizon = ctx, horizon

    def predict(self, graph, states: torch.Tensor, k: int) -> torch.Tensor:
        s = self.check(graph, states, k)
        pred = s @ line_weights(self.ctx, int(k)).to(s)
        return keep_frozen(graph, s, pred)

    def embed(self, graph, states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no learned representation, so no trajectory "
                                  "embedding; use NiNoGNN.embed (mean edge state) or WNNPlus.embed")


class LinefitPlus(Linefit):
    def __init__(self, ctx: int = 5, horizon: int = 40, clip: float | None = 3.0,
                 sizes: Sequence[int] | None = None):
        super().__init__(ctx, horizon)
        self._config = dict(ctx=ctx, horizon=horizon, clip=clip, sizes=list(sizes) if sizes is not None else None)
        self.clip = clip
        self.sizes = list(sizes) if sizes is not None else None

    def predict(self, graph, states: torch.Tensor, k: int) -> torch.Tensor:
        s = self.check(graph, states, k)
        delta = (s @ slope_weights(self.ctx).to(s)) * int(k)
        if self.clip is not None:
            layout = graph if graph is not None else (self.sizes or [len(s)])
            _, sc = scale(s, layout, "std")
            _, div = sc.rows()
            bound = self.clip * div[:, 0]
            delta = torch.maximum(torch.minimum(delta, bound), -bound)
        return keep_frozen(graph, s, s[:, -1] + delta)


class NoChange(Linefit):
    """The newest state at every horizon (see the module docstring)."""

    def predict(self, graph, states: torch.Tensor, k: int) -> torch.Tensor:
        return self.check(graph, states, k)[:, -1].clone()
