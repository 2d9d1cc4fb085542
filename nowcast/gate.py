"""``SkillGate``: nowcast only when the nowcaster beats "no change" on the run's own recent trajectory.

A nowcaster meta-trained on some tasks may have no skill on another (on GPT-2 BPE the shipped
checkpoint predicts no better than the newest state, and its long jumps cost final perplexity),
and nothing in a single training run says so in advance. The gate asks the run itself. It wraps a
nowcaster with ``ctx = c`` and takes ``2c`` states at half the usual spacing (so ``NiNo(ctx=2c)``
records a state every ``period / 2c`` steps):

- backtest: from the first ``c`` states (the cycle's first half) it predicts the newest one,
  ``c`` half-spacings ahead, and measures the L1 error against the truth, divided by the error of
  predicting no change (the ``c``-th state). This ratio is ``skill`` (< 1: better than no change).
- if ``skill < threshold`` the nowcast is the wrapped nowcaster's prediction from every second
  state (exactly the ``c`` states, at exactly the spacing, that ``NiNo(ctx=c)`` would have given
  it), at the requested horizon ``k``; otherwise the prediction is the newest state: the parameters
  stay where they are, as with :class:`~nowcast.NoChange` (the wrapper's step is then a skipped
  base step, which the no-change control shows to be harmless).

So with the gate open the run is the ungated run exactly, and the gate can only remove nowcasts.
The decisions are kept in ``log`` (one dict per call: ``k``, ``skill``, ``open``). Cost: twice the
history memory and one more ``predict`` per nowcast. The backtest horizon is short (half a
period) and the real one long (up to ``max_k`` spacings), so the gate measures whether the
nowcaster models this run's dynamics at all, not the error of the jump it is about to make.
"""
from __future__ import annotations

import torch

from .base import Nowcaster, check_horizon

__all__ = ["SkillGate"]


class SkillGate(Nowcaster):
    """Wraps ``nowcaster``; see the module docstring. ``threshold`` in (0, 1]: the largest
    backtest error, relative to no change, at which nowcasts still run (0.9: at least 10% better)."""

    def __init__(self, nowcaster: Nowcaster, threshold: float = 0.9) -> None:
        super().__init__()
        inner_ctx = getattr(nowcaster, "ctx", None)
        if not callable(getattr(nowcaster, "predict", None)) or not isinstance(inner_ctx, int) or inner_ctx < 2:
            raise TypeError(f"SkillGate wraps a nowcaster with predict(graph, states, k) and an int ctx >= 2; "
                            f"got {type(nowcaster).__name__}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise ValueError(f"threshold must be a number in (0, 1] (the backtest error relative to no change "
                             f"below which nowcasts run; 0.9 means at least 10% better), got {threshold!r}")
        max_h = getattr(nowcaster, "max_horizon", 40)
        if inner_ctx > max_h:
            raise ValueError(f"the backtest predicts ctx={inner_ctx} half-spacings ahead, beyond the wrapped "
                             f"nowcaster's max_horizon={max_h}")
        self.inner = nowcaster
        self.threshold = float(threshold)
        self.ctx = 2 * inner_ctx
        self.needs_graph = bool(getattr(nowcaster, "needs_graph", True))
        self.max_horizon = max_h
        self.log: list[dict] = []
        self._config = {"threshold": self.threshold, "nowcaster": type(nowcaster).__name__}

    def skill(self, graph, states: torch.Tensor) -> float:
        """Backtest error of the wrapped nowcaster over no change (``states``: (num_params, 2c))."""
        states = self.check(graph, states)
        c = self.inner.ctx
        truth, newest_then = states[:, -1], states[:, c - 1]
        with torch.no_grad():
            guess = self.inner.predict(graph, states[:, :c], c).to(truth.device)
        base = float((newest_then - truth).abs().sum())
        if not base > 0:  # nothing moved over half a cycle: no change is exact, nothing to nowcast
            return float("inf")
        return float((guess - truth).abs().sum()) / base

    def predict(self, graph, states: torch.Tensor, k: int) -> torch.Tensor:
        states = self.check(graph, states, k)
        k = check_horizon(k, self.max_horizon)
        s = self.skill(graph, states)
        is_open = s < self.threshold
        self.log.append({"k": k, "skill": round(s, 6) if s != float("inf") else None, "open": is_open})
        if not is_open:
            return states[:, -1].clone()
        return self.inner.predict(graph, states[:, 1::2], k)

    def embed(self, graph, states: torch.Tensor) -> torch.Tensor:
        """The wrapped nowcaster's embedding of the full-spacing states."""
        return self.inner.embed(graph, self.check(graph, states)[:, 1::2])
