"""WNN+ (the ``nino_mlp.pt`` checkpoint): one MLP per parameter element, no message passing.

Per element: ``h = inp(its ctx scaled values) + type_embed[type of its tensor]``, then 4 Linear
layers (D, D, D, K) with SiLU between; the change at horizon k is output ``k - 1``; prediction =
newest scaled value + change, unscaled. A conv kernel is treated element by element (type 3).
``exact_unscale`` as in :class:`nowcast.NiNoGNN`. It needs a graph only for the tensor boundaries (scaling) and the edge types of the tensors.

``embed(graph, states)`` is the mean over all elements of the hidden state that enters the last
layer (the analogue of the GNN's mean edge state), a (hidden,) vector.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Nowcaster, keep_frozen, param_types
from .scaling import METHODS, scale, unscale


class WNNPlus(Nowcaster):
    needs_graph = True

    def __init__(self, ctx: int = 5, hidden: int = 128, horizon: int = 40, edge_types: int = 15,
                 mlp_layers: int = 4, scaling: str = "std", chunk_size: int = 1 << 20,
                 exact_unscale: bool = False):
        super().__init__()
        if scaling not in METHODS:
            raise ValueError(f"unknown scaling {scaling!r}; choose one of {METHODS}")
        self._config = dict(ctx=ctx, hidden=hidden, horizon=horizon, edge_types=edge_types,
                            mlp_layers=mlp_layers, scaling=scaling, chunk_size=chunk_size,
                            exact_unscale=exact_unscale)
        self.ctx, self.max_horizon, self.scaling, self.chunk_size = ctx, horizon, scaling, chunk_size
        self.exact_unscale = exact_unscale
        self.type_embed = nn.Embedding(edge_types, hidden)
        self.inp = nn.Linear(ctx, hidden)
        layers: list[nn.Module] = []
        for i in range(mlp_layers):
            layers.append(nn.Linear(hidden, horizon if i == mlp_layers - 1 else hidden))
            if i < mlp_layers - 1:
                layers.append(nn.SiLU())
        self.mlp = nn.Sequential(*layers)

    def _hidden(self, scaled: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        h = self.inp(scaled) + self.type_embed(types)
        return self.mlp[:-1](h)

    def _types(self, graph, device) -> torch.Tensor:
        types = param_types(graph, device)
        if len(types) and int(types.max()) >= self.type_embed.num_embeddings:
            raise ValueError(f"edge type {int(types.max())} is beyond the {self.type_embed.num_embeddings} "
                             "types this nowcaster knows")
        return types

    def predict(self, graph, states: torch.Tensor, k: int) -> torch.Tensor:
        s = self.check(graph, states, k)
        k = int(k)
        last = self.mlp[-1]
        w, b = last.weight[k - 1: k], last.bias[k - 1: k]
        with torch.no_grad():
            scaled, sc = scale(s, graph, self.scaling)
            types = self._types(graph, s.device)
            delta = torch.empty(len(s), device=s.device)
            for i in range(0, len(s), self.chunk_size):  # chunks bound the (n, hidden) temporaries
                j = slice(i, i + self.chunk_size)
                delta[j] = F.linear(self._hidden(scaled[j], types[j]), w, b)[:, 0]
            pred = unscale(scaled[:, -1] + delta, sc, exact=self.exact_unscale)
        return keep_frozen(graph, s, pred)

    def embed(self, graph, states: torch.Tensor) -> torch.Tensor:
        s = self.check(graph, states)
        with torch.no_grad():
            scaled, _ = scale(s, graph, self.scaling)
            types = self._types(graph, s.device)
            total = torch.zeros(self.inp.out_features, device=s.device)
            for i in range(0, len(s), self.chunk_size):
                j = slice(i, i + self.chunk_size)
                total += self._hidden(scaled[j], types[j]).sum(0)
            return total / max(len(s), 1)
