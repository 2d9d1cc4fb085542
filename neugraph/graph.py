"""The emitted neural graph: blocks of edges kept as blocks, indices materialised on request.

Every parameter becomes one :class:`Block`. A block's edges are enumerated in the parameter's own
memory order over its two node axes, and its remaining axes are the edge's feature slots, so
``edge_features`` is a reshape of the flat state vector and ``to_params`` is its exact inverse; no
index tensor the size of the model is ever needed for either. A block may carry further blocks of
the same edge layout in ``stack`` (the ``naive`` profile's q, k, v as one 3-feature edge): their
features follow its own, slot by slot.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

NINO_TYPES = {
    "padding": 0, "dense": 1, "bias": 2, "conv": 3, "norm": 4, "embedding": 5, "positional": 6,
    "query": 7, "key": 8, "value": 9, "residual": 10, "head": 11, "unused": 12, "self": 13,
    "qkv": 14,  # naive profile only: query, key and value stacked on one edge
}


@dataclass
class Block:
    """Edges of one parameter."""

    name: str
    offset: int  # start of the parameter in the flat parameter vector
    numel: int
    view_shape: tuple[int, ...]  # the parameter reshaped so flattened axes are split out
    order: list[int]  # view axes, node axes first then feature axes
    first: torch.Tensor  # node ids along the first node axis (an auxiliary node for vectors)
    second: torch.Tensor  # node ids along the second node axis
    src_is_first: bool
    feat: int  # feature slots used per edge
    edge_type: int
    rows_per_group: int = 0  # grouped weights: rows per group; ``second`` then holds all groups' columns
    trainable: bool = True
    part: tuple[int, int, int] | None = None  # (view axis, lo, hi): the block covers this slice only
    param_numel: int = 0  # the whole parameter's numel when ``part`` is set (``numel`` is the slice's)
    stack: list["Block"] = field(default_factory=list)  # same edges, features appended after this block's

    @property
    def width(self) -> int:
        """Feature slots per edge, stacked blocks included."""
        return self.feat + sum(m.feat for m in self.stack)

    def members(self) -> list["Block"]:
        """This block and the blocks stacked on it: every parameter region its edges carry."""
        return [self, *self.stack]

    def param_view(self, flat: torch.Tensor) -> torch.Tensor:
        """This block's elements of a (num_params, T) tensor, as ``view_shape + (T,)`` (a view)."""
        n = self.param_numel or self.numel
        x = flat[self.offset: self.offset + n].view(*self.view_shape, flat.shape[1])
        if self.part is not None:
            a, lo, hi = self.part
            x = x.narrow(a, lo, hi - lo)
        return x

    @property
    def num_edges(self) -> int:
        return self.numel // self.feat

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(first, second) node id of every edge of the block, in edge order."""
        first, second = torch.empty(self.num_edges, dtype=torch.long), torch.empty(self.num_edges, dtype=torch.long)
        self.fill_pairs(first, second)
        return first, second

    def fill_pairs(self, first: torch.Tensor, second: torch.Tensor) -> None:
        """Write :meth:`pairs` into two preallocated (num_edges,) slices without temporaries."""
        n1 = self.first.numel()
        first.view(n1, -1).copy_(self.first[:, None].expand(n1, first.numel() // n1))
        if self.rows_per_group:
            groups = n1 // self.rows_per_group
            cols = self.second.view(groups, 1, -1)
            second.view(groups, self.rows_per_group, -1).copy_(cols.expand(groups, self.rows_per_group, cols.shape[-1]))
        else:
            second.view(n1, -1).copy_(self.second[None, :].expand(n1, self.second.numel()))

    def bipartite(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The block as complete bipartite pieces (node sets), for structure-aware algorithms."""
        if self.rows_per_group:
            groups = self.first.numel() // self.rows_per_group
            cols = self.second.view(groups, -1)
            rows = self.first.view(groups, -1)
            return [(rows[g], cols[g]) for g in range(groups)]
        return [(self.first, self.second)]

    def is_identity_layout(self) -> bool:
        return self.order == sorted(self.order)


@dataclass
class AuxEdges:
    """Edges that carry a fixed value instead of a parameter (self-loops, residual, head edges)."""

    src: torch.Tensor
    dst: torch.Tensor
    edge_type: int
    value: float


@dataclass
class NeuralGraph:
    """A compiled neural graph.

    ``node_features`` is a plain attribute a caller may overwrite (for example with zeros).
    ``node_labels`` gives every pinned neuron its position within its space (1-based; 0 for free
    neurons and auxiliary nodes): pinned neurons have an identity, free ones do not.
    """

    profile: str
    num_nodes: int
    num_params: int
    param_names: list[str]
    param_shapes: list[tuple[int, ...]]
    blocks: list[Block]
    aux: list[AuxEdges]
    node_features: torch.Tensor
    node_labels: torch.Tensor
    node_kind: list[str]  # per node: "neuron", "pinned", "aux"
    node_space: torch.Tensor  # per node: the plain space id it belongs to (-1 for auxiliary nodes)
    max_feat: int
    lpe: int = 8
    info: dict = field(default_factory=dict)
    word_pos: torch.Tensor | None = None  # (V,) long: token id of a token node (embedding row), -1 elsewhere
    _edge_index: torch.Tensor | None = field(default=None, repr=False)
    _edge_type: torch.Tensor | None = field(default=None, repr=False)

    # ---- sizes ---------------------------------------------------------------------------------
    @property
    def num_edges(self) -> int:
        return sum(b.num_edges for b in self.blocks) + sum(a.src.numel() for a in self.aux)

    @property
    def num_param_edges(self) -> int:
        return sum(b.num_edges for b in self.blocks)

    # ---- structure -----------------------------------------------------------------------------
    @property
    def edge_index(self) -> torch.Tensor:
        """(2, E) long: sources in row 0, targets in row 1 (materialised once, on first use)."""
        if self._edge_index is None:
            out = torch.empty(2, self.num_edges, dtype=torch.long)  # filled block by block: one copy only
            e = 0
            for b in self.blocks:
                a, c = out[0, e: e + b.num_edges], out[1, e: e + b.num_edges]
                b.fill_pairs(a, c) if b.src_is_first else b.fill_pairs(c, a)
                e += b.num_edges
            for a in self.aux:
                n = a.src.numel()
                out[0, e: e + n] = a.src
                out[1, e: e + n] = a.dst
                e += n
            self._edge_index = out
        return self._edge_index

    @property
    def edge_type(self) -> torch.Tensor:
        """(E,) long edge type ids (see ``NINO_TYPES``), in ``edge_index`` order."""
        if self._edge_type is None:
            self._edge_type = self._types()
        return self._edge_type

    def _types(self) -> torch.Tensor:
        parts = [torch.full((b.num_edges,), b.edge_type, dtype=torch.long) for b in self.blocks]
        parts += [torch.full((a.src.numel(),), a.edge_type, dtype=torch.long) for a in self.aux]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    @property
    def param_sizes(self) -> list[int]:
        """numel of every parameter tensor, in flat order."""
        return [math.prod(s) for s in self.param_shapes]

    @property
    def trainable_mask(self) -> torch.Tensor:
        """(num_params,) bool: False for frozen parameters."""
        flag = {m.name: m.trainable for b in self.blocks for m in b.members()}
        parts = [torch.full((n,), flag.get(name, True), dtype=torch.bool)
                 for name, n in zip(self.param_names, self.param_sizes)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)

    def element_types(self) -> torch.Tensor:
        """(num_params,) long: the edge type each parameter element is carried by."""
        out = torch.zeros(self.num_params, 1, dtype=torch.long)
        for b in self.blocks:
            for m in b.members():
                m.param_view(out).fill_(b.edge_type)
        return out[:, 0]

    # ---- features and the inverse map ----------------------------------------------------------
    def block_features(self, b: Block, states: torch.Tensor) -> torch.Tensor:
        """(edges, width, T) features of one block (a view unless blocks are stacked on it)."""
        T = states.shape[1]
        states = states.contiguous()
        parts = []
        for m in b.members():
            x = m.param_view(states)
            if not m.is_identity_layout():
                x = x.permute(*m.order, len(m.view_shape))
            parts.append(x.reshape(b.num_edges, m.feat, T))
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def edge_features(self, states: torch.Tensor) -> torch.Tensor:
        """(E, max_feat * T) edge features, slot-major (index ``slot * T + t``), zero-padded.

        ``states`` is (num_params, T) or (num_params,). Auxiliary edges carry their fixed value in
        slot 0 for every t.
        """
        if states.dim() == 1:
            states = states[:, None]
        if states.shape[0] != self.num_params:
            raise ValueError(f"states has {states.shape[0]} rows but the graph has {self.num_params} "
                             "parameters; pass a (num_params, T) tensor in named_parameters() order")
        T = states.shape[1]
        out = states.new_zeros(self.num_edges, self.max_feat, T)
        e = 0
        for b in self.blocks:
            out[e: e + b.num_edges, : b.width] = self.block_features(b, states)
            e += b.num_edges
        for a in self.aux:
            n = a.src.numel()
            out[e: e + n, 0] = a.value
            e += n
        return out.reshape(self.num_edges, self.max_feat * T)

    def to_params(self, edge_values: torch.Tensor) -> torch.Tensor:
        """Exact inverse of :meth:`edge_features` on the parameter edges.

        ``edge_values`` is (E, max_feat), (E, max_feat, T) or (E,) when ``max_feat == 1``; rows of
        auxiliary edges are ignored. Returns (num_params,) or (num_params, T).
        """
        v = edge_values
        squeeze = False
        if v.dim() == 1:
            v = v[:, None]
        if v.dim() == 2:
            if v.shape[1] != self.max_feat:
                raise ValueError(f"edge_values has {v.shape[1]} columns, expected max_feat={self.max_feat}")
            v, squeeze = v[:, :, None], True
        if v.shape[1] != self.max_feat:
            raise ValueError(f"edge_values has {v.shape[1]} feature slots, expected max_feat={self.max_feat}")
        if v.shape[0] not in (self.num_edges, self.num_param_edges):
            raise ValueError(f"edge_values has {v.shape[0]} rows, expected {self.num_edges} edges")
        T = v.shape[2]
        out = v.new_empty(self.num_params, T)
        e = 0
        for b in self.blocks:
            slot = 0
            for m in b.members():
                x = v[e: e + b.num_edges, slot: slot + m.feat]
                slot += m.feat
                if m.is_identity_layout() and m.part is None:
                    out[m.offset: m.offset + m.numel] = x.reshape(m.numel, T)
                else:
                    dest = m.param_view(out)
                    permuted = [dest.shape[i] for i in m.order]
                    inv = [m.order.index(i) for i in range(len(m.order))]
                    dest.copy_(x.reshape(*permuted, T).permute(*inv, len(inv)))
            e += b.num_edges
        return out[:, 0] if squeeze else out

    def flat_params(self, module: torch.nn.Module) -> torch.Tensor:
        """The module's parameters as one flat vector in ``param_names`` order."""
        params = dict(module.named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for n in self.param_names])

    def summary(self) -> dict:
        counts: dict[int, int] = {}
        for t, n in zip(*torch.unique(self.edge_type, return_counts=True)):
            counts[int(t)] = int(n)
        return {"profile": self.profile, "num_nodes": self.num_nodes, "num_edges": self.num_edges,
                "num_params": self.num_params, "edge_type_counts": counts, "max_feat": self.max_feat}
