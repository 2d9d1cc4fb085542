"""``SkillGate``: nowcast a run only if the nowcaster beats "no change" on the run's own trajectory.

A nowcaster meta-trained on some tasks may have no skill on another (on GPT-2 BPE the shipped
checkpoint predicts no better than the newest state, and its long jumps cost final perplexity),
and nothing says so before the run starts. The gate asks the run itself. It wraps a nowcaster
with ``ctx = c`` and takes ``2c`` states at half the usual spacing (so ``NiNo(ctx=2c)`` records a
state every ``period / 2c`` steps):

- backtest: from the first ``c`` states (the cycle's first half) it predicts the newest one,
  ``c`` half-spacings ahead, and measures the L1 error against the truth, divided by the error of
  predicting no change (the ``c``-th state). This ratio is ``skill`` (< 1: better than no change).
- open (``skill < threshold``): the nowcast is the wrapped nowcaster's prediction from every
  second state (exactly the ``c`` states, at exactly the spacing, that ``NiNo(ctx=c)`` would have
  given it), at the requested horizon ``k``. Closed: the prediction is the newest state, so the
  parameters stay where they are, as with :class:`~nowcast.NoChange` (the wrapper's step is then
  a skipped base step, which the no-change control shows to be harmless).

By default the decision is taken once, at the first nowcast, and kept for the run (``decision``):
an open run is the ungated run exactly, a closed one is the no-change control exactly.
``every_cycle=True`` backtests at every nowcast instead; measured, that is worse (README, Known
limits): late in training the half-cycle backtest of FM/16 and MNIST/16 is no better than no
change (0.93-1.12) while the nowcasts it then drops are the ones that save thousands of steps.
The first decision separates the tasks the shipped checkpoint helps from those it does not
(``benchmarks/gate_first_cycle.py``). Decisions are appended to ``log`` (``k``, ``skill``,
``open``); ``reset()`` re-arms the gate for a new run (:class:`nowcast.NiNo` calls it when it is
built, and keeps the decision in its ``state_dict``). Cost: twice the history memory, and one
more ``predict`` at the first nowcast (none after it; a closed gate predicts nothing).
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import Nowcaster, check_horizon

__all__ = ["SkillGate"]


class SkillGate(Nowcaster):
    """Wraps ``nowcaster``; see the module docstring. ``threshold`` in (0, 1]: nowcasts run when the
    backtest error relative to no change is below it (0.9: at least 10% better). ``every_cycle``:
    backtest at every nowcast instead of deciding once at the first."""

    def __init__(self, nowcaster: Nowcaster, threshold: float = 0.9, every_cycle: bool = False) -> None:
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
        self.every_cycle = bool(every_cycle)
        self.decision: Optional[bool] = None  # the first nowcast's (kept unless every_cycle)
        self.log: list[dict] = []
        self._config = {"threshold": self.threshold, "every_cycle": self.every_cycle,
                        "nowcaster": type(nowcaster).__name__}

    def reset(self) -> None:
        """Forget the decision and the log (before reusing the gate for another run)."""
        self.decision = None
        self.log = []

    def run_state(self) -> dict:
        """The run's decision and log, for :meth:`nowcast.NiNo.state_dict` (a resumed run keeps its
        first decision instead of taking a new one on a later cycle)."""
        return {"decision": self.decision, "log": [dict(e) for e in self.log]}

    def load_run_state(self, state: dict) -> None:
        decision = state.get("decision")
        if decision is not None and not isinstance(decision, bool):
            raise ValueError(f"a SkillGate run state has decision None, True or False, got {decision!r}")
        self.decision = decision
        self.log = [dict(e) for e in state.get("log", [])]

    def skill(self, graph, states: torch.Tensor) -> float:
        """Backtest error of the wrapped nowcaster over no change (``states``: (num_params, 2c))."""
        states = self.check(graph, states)
        c = self.inner.ctx
        truth, newest_then = states[:, -1], states[:, c - 1]
        with torch.no_grad():
            guess = self.inner.predict(graph, states[:, :c].contiguous(), c).to(truth.device)
        base = float((newest_then - truth).abs().sum())
        if not base > 0:  # nothing moved over half a cycle: no change is exact, nothing to nowcast
            return float("inf")
        return float((guess - truth).abs().sum()) / base

    def predict(self, graph, states: torch.Tensor, k: int) -> torch.Tensor:
        states = self.check(graph, states, k)
        k = check_horizon(k, self.max_horizon)
        if self.decision is None or self.every_cycle:
            s = self.skill(graph, states)
            self.decision = s < self.threshold
            self.log.append({"k": k, "skill": round(s, 6) if s != float("inf") else None, "open": self.decision})
        else:
            self.log.append({"k": k, "skill": None, "open": self.decision})
        if not self.decision:
            return states[:, -1].clone()
        # contiguous: the GNN's sums round differently on a strided view (about 1e-6), and an open
        # run must be the ungated run bit for bit
        return self.inner.predict(graph, states[:, 1::2].contiguous(), k)

    def embed(self, graph, states: torch.Tensor) -> torch.Tensor:
        """The wrapped nowcaster's embedding of the full-spacing states."""
        return self.inner.embed(graph, self.check(graph, states)[:, 1::2].contiguous())
