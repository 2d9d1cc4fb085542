"""Direct multi-step (DMS) heads: an edge state (E, D) to the scaled parameter change at horizon k.

Every head returns (E, nfeat) for one horizon ``k`` (``forward``) and (E, max_feat, K) for all
horizons (``all``, what a meta-trainer needs).

- ``MLPHead`` (published NiNo): Linear(D, D), SiLU, Linear(D, max_feat * K); output column
  ``slot * K + (k - 1)``. For one horizon only the ``nfeat`` rows of the last weight that are
  needed are used, so the last layer costs ``nfeat`` outputs per edge instead of ``max_feat * K``.
- ``RecurrentHead`` (``"gru"`` / ``"lstm"``, as in the follow-up study of recurrent decoders): a
  GRU or LSTM cell unrolled over the horizon, with the edge state as the input at every step and a
  zero initial state; the change at horizon ``j`` is ``Linear(D, max_feat)`` of the hidden state
  after step ``j``. Horizon ``k`` costs ``k`` cell steps, and one unroll of ``K`` steps gives all
  horizons. Weights are not published; these heads are for meta-training.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

HEADS = ("mlp", "gru", "lstm")


class MLPHead(nn.Module):
    def __init__(self, hidden: int, max_feat: int, horizon: int):
        super().__init__()
        self.max_feat, self.horizon = max_feat, horizon
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, max_feat * horizon))

    def forward(self, e: torch.Tensor, k: int, nfeat: int) -> torch.Tensor:
        h = self.mlp[1](self.mlp[0](e))
        rows = torch.arange(nfeat, device=e.device) * self.horizon + (k - 1)
        last = self.mlp[2]
        return F.linear(h, last.weight[rows], last.bias[rows])

    def all(self, e: torch.Tensor) -> torch.Tensor:
        return self.mlp(e).view(len(e), self.max_feat, self.horizon)


class RecurrentHead(nn.Module):
    def __init__(self, hidden: int, max_feat: int, horizon: int, cell: str = "gru"):
        super().__init__()
        if cell not in ("gru", "lstm"):
            raise ValueError(f"unknown recurrent cell {cell!r}; choose 'gru' or 'lstm'")
        self.kind, self.max_feat, self.horizon = cell, max_feat, horizon
        self.cell = nn.GRUCell(hidden, hidden) if cell == "gru" else nn.LSTMCell(hidden, hidden)
        self.readout = nn.Linear(hidden, max_feat)

    def _unroll(self, e: torch.Tensor, steps: int):
        h = e.new_zeros(e.shape)
        c = e.new_zeros(e.shape) if self.kind == "lstm" else None
        for _ in range(steps):
            if c is None:
                h = self.cell(e, h)
            else:
                h, c = self.cell(e, (h, c))
            yield h

    def forward(self, e: torch.Tensor, k: int, nfeat: int) -> torch.Tensor:
        for h in self._unroll(e, k):
            pass
        w, b = self.readout.weight[:nfeat], self.readout.bias[:nfeat]
        return F.linear(h, w, b)

    def all(self, e: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.readout(h) for h in self._unroll(e, self.horizon)], 2)


def make_head(kind: str, hidden: int, max_feat: int, horizon: int) -> nn.Module:
    if kind == "mlp":
        return MLPHead(hidden, max_feat, horizon)
    if kind in ("gru", "lstm"):
        return RecurrentHead(hidden, max_feat, horizon, kind)
    raise ValueError(f"unknown head {kind!r}; choose one of {HEADS}")
