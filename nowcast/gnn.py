"""The NiNo graph neural network (``../shared/docs/NINO_V1.md``), inference side.

For a graph with E edges, V nodes, hidden size D:

- edges: ``e0 = type_embed[edge_type] + edge_in(features)``, features (E, max_feat * ctx) slot-major
  from ``graph.edge_features`` of the scaled states. A graph with fewer feature slots than the
  model (a plain MLP has 1) uses the first ``slots * ctx`` input columns of ``edge_in``, which is
  exactly the same as zero-padding the features to ``max_feat`` slots;
- nodes: ``x0 = node_in(LPE)`` (+ ``word_pos[position]`` + ``centrality_in(centrality)`` when
  enabled; both are off in the published checkpoints);
- message-passing layer l, edge j -> i: ``scale, shift = film(e)``,
  ``m_ij = scale * msg([x_i, x_j]) + shift``, ``a_i = mean_j m_ij``, ``x_i' = out(upd([x_i, a_i]))``,
  SiLU after every layer whose output is used;
- edge update after layers 0 .. L-2 (and after L-1 with ``final_edge_update``):
  ``e' = out(SiLU(edge(e) + src(x'[j]) + dst(x'[i])))``;
- head: the scaled parameter change at horizon k per edge slot (see :mod:`nowcast.heads`);
  prediction = newest scaled state + change, unscaled, mapped back by ``graph.to_params``.

The last message-passing layer is skipped: without a final edge update its node states feed
nothing (the published checkpoints keep its weights at their initial values), so the prediction
is the same with or without it. Its weights are still held so the published files load.
``msg([x_i, x_j])`` is computed as ``P_t[i] + P_s[j]`` with per-node projections ``P_t, P_s``, the
same linear map evaluated V times instead of E times.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Nowcaster, keep_frozen
from .heads import HEADS, make_head
from .scaling import METHODS, scale, unscale
from .scatter import in_degree, scatter_mean


class MessageLayer(nn.Module):
    """Message passing with FiLM-modulated messages and mean aggregation at the target."""

    def __init__(self, hidden: int):
        super().__init__()
        self.film = nn.Linear(hidden, 2 * hidden)
        self.msg = nn.Linear(2 * hidden, hidden)
        self.upd = nn.Linear(2 * hidden, hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, e: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                degree: torch.Tensor) -> torch.Tensor:
        D = x.shape[1]
        w = self.msg.weight
        p_t = F.linear(x, w[:, :D], self.msg.bias)  # the target's half ([x_i, x_j]: target first)
        p_s = F.linear(x, w[:, D:])
        scale_, shift = self.film(e).chunk(2, dim=-1)
        m = scale_ * (p_t[dst] + p_s[src]) + shift
        agg = scatter_mean(m, dst, x.shape[0], degree=degree)
        return self.out(self.upd(torch.cat([x, agg], 1)))


class EdgeUpdate(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.edge = nn.Linear(hidden, hidden)
        self.src = nn.Linear(hidden, hidden)
        self.dst = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, e: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        h = self.edge(e) + self.src(x)[src] + self.dst(x)[dst]
        return self.out(F.silu(h))


class NiNoGNN(Nowcaster):
    """The NiNo nowcaster: a GNN over the neural graph, a DMS head per edge.

    ``exact_unscale`` False (default) maps predictions back as the published implementation does
    (see :func:`nowcast.scaling.unscale`).

    ``embed(graph, states)`` is the mean over all edges of the edge state after the last used
    layer (the input of the head), a (hidden,) vector.

    ``stream`` True (or a dict of :func:`nowcast.stream.stream_predict` options such as ``chunk``,
    ``dtype``, ``subgraphs``) makes ``predict`` use the streamed pass, which never holds an
    (edges x hidden) tensor (docs/streaming.md); the attribute may be set after loading. It is not
    part of ``config``.
    """

    needs_graph = True

    def __init__(self, ctx: int = 5, hidden: int = 128, layers: int = 3, horizon: int = 40, max_feat: int = 9,
                 lpe: int = 8, edge_types: int = 15, head: str = "mlp", word_pos: bool = False,
                 vocab_size: int = 50257, centrality: bool = False, final_edge_update: bool = False,
                 scaling: str = "std", exact_unscale: bool = False, stream: bool | dict = False):
        super().__init__()
        self.stream: dict | None = ({} if stream is True else dict(stream)) if stream else None
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; choose one of {HEADS}")
        if scaling not in METHODS:
            raise ValueError(f"unknown scaling {scaling!r}; choose one of {METHODS}")
        if layers < 1:
            raise ValueError("layers must be >= 1")
        self._config = dict(ctx=ctx, hidden=hidden, layers=layers, horizon=horizon, max_feat=max_feat, lpe=lpe,
                            edge_types=edge_types, head=head, word_pos=word_pos, vocab_size=vocab_size,
                            centrality=centrality, final_edge_update=final_edge_update, scaling=scaling,
                            exact_unscale=exact_unscale)
        self.ctx, self.max_horizon, self.max_feat, self.lpe = ctx, horizon, max_feat, lpe
        self.scaling, self.final_edge_update = scaling, final_edge_update
        self.vocab_size, self.exact_unscale = vocab_size, exact_unscale
        self.type_embed = nn.Embedding(edge_types, hidden)
        self.edge_in = nn.Linear(max_feat * ctx, hidden)
        self.node_in = nn.Linear(lpe, hidden) if lpe else None
        self.word_pos = nn.Embedding(vocab_size + 1, hidden) if word_pos else None  # +1: "no token"
        self.centrality_in = nn.Linear(1, hidden) if centrality else None
        self.layers = nn.ModuleList(MessageLayer(hidden) for _ in range(layers))
        n_upd = layers if final_edge_update else layers - 1
        self.edge_updates = nn.ModuleList(EdgeUpdate(hidden) for _ in range(n_upd))
        self.head = make_head(head, hidden, max_feat, horizon)

    # ---- inputs --------------------------------------------------------------------------------
    def node_inputs(self, graph) -> torch.Tensor:
        dev = self._device()
        V = graph.num_nodes
        nf = graph.node_features
        x = torch.zeros(V, self.type_embed.embedding_dim, device=dev)
        if self.node_in is not None:
            if nf.dim() != 2 or nf.shape[0] != V or nf.shape[1] < self.lpe:
                raise ValueError(f"graph.node_features is {tuple(nf.shape)}, but this model needs "
                                 f"(num_nodes={V}, >= {self.lpe}) LPE columns: compile with lpe={self.lpe}")
            x = x + self.node_in(nf[:, : self.lpe].to(dev, torch.float32))
        if self.word_pos is not None:
            pos = getattr(graph, "word_pos", None)
            if pos is None:
                pos = graph.info.get("word_pos")
            if pos is None:  # no token nodes: every node gets the "no token" row
                pos = torch.full((V,), -1, dtype=torch.long)
            pos = torch.as_tensor(pos, dtype=torch.long, device=dev)
            # -1 (not a token node) and ids beyond this nowcaster's vocabulary share the "no token" row
            pos = torch.where((pos < 0) | (pos >= self.vocab_size), self.vocab_size, pos)
            x = x + self.word_pos(pos)
        if self.centrality_in is not None:
            col = getattr(graph, "lpe", self.lpe)
            if nf.shape[1] <= col:
                raise ValueError("this model uses eigenvector centrality: compile the graph with "
                                 "neugraph.compile(..., centrality=True)")
            x = x + self.centrality_in(nf[:, col: col + 1].to(dev, torch.float32))
        return x

    def edge_inputs(self, graph, scaled: torch.Tensor) -> torch.Tensor:
        slots = graph.max_feat
        if slots > self.max_feat:
            raise ValueError(f"the graph has {slots} feature slots per edge but this nowcaster takes at most "
                             f"{self.max_feat} (kernels up to 3x3 for the published models); compile with "
                             "profile='nino' or use a nowcaster built with a larger max_feat")
        types = graph.edge_type.to(scaled.device)
        if len(types) and int(types.max()) >= self.type_embed.num_embeddings:
            raise ValueError(f"edge type {int(types.max())} is beyond the {self.type_embed.num_embeddings} "
                             "types this nowcaster knows")
        feats = graph.edge_features(scaled)  # (E, slots * ctx), slot-major
        w = self.edge_in.weight[:, : slots * self.ctx]  # == zero-padding the missing slots
        return F.linear(feats, w, self.edge_in.bias) + self.type_embed(types)

    # ---- the network ---------------------------------------------------------------------------
    def edge_states(self, graph, scaled: torch.Tensor) -> torch.Tensor:
        """(E, hidden) edge states after the last used layer, for scaled states (num_params, ctx)."""
        e = self.edge_inputs(graph, scaled)
        x = self.node_inputs(graph)
        src, dst = graph.edge_index.to(e.device)
        degree = in_degree(dst, graph.num_nodes)
        for i in range(len(self.edge_updates)):  # the layers whose output reaches the head
            x = F.silu(self.layers[i](x, e, src, dst, degree))
            e = self.edge_updates[i](x, e, src, dst)
        return e

    def predict(self, graph, states: torch.Tensor, k: int) -> torch.Tensor:
        if self.stream is not None:
            from .stream import stream_predict

            return stream_predict(self, graph, states, k, **self.stream)
        s = self.check(graph, states, k)
        with torch.no_grad():
            scaled, sc = scale(s, graph, self.scaling)
            e = self.edge_states(graph, scaled)[: graph.num_param_edges]
            delta = graph.to_params(self.head(e, int(k), graph.max_feat))
            pred = unscale(scaled[:, -1] + delta, sc, exact=self.exact_unscale)
        return keep_frozen(graph, s, pred)

    def embed(self, graph, states: torch.Tensor) -> torch.Tensor:
        s = self.check(graph, states)
        with torch.no_grad():
            scaled, _ = scale(s, graph, self.scaling)
            return self.edge_states(graph, scaled).mean(0)
