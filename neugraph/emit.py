"""Graph emission: turn a :class:`ModelIR` into a :class:`NeuralGraph` under a profile.

Profiles
- ``nino``: the published NiNo graph (see NINO_V1.md): neuron nodes, one auxiliary node per 1-D
  parameter, edge types by tensor rank and name, kernels in 9 zero-padded slots, a self-loop on
  every node, LPE node features.
- ``generic``: the same neurons and blocks, with edge types from the ops that use each parameter
  (a 1-D parameter that scales is a norm weight whatever its name), feature slots as wide as the
  widest parameter needs, and node features ``[LPE | pinned | auxiliary | position code]`` so that
  pinned neurons (inputs, outputs, positions) carry an identity and free neurons do not.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .graph import NINO_TYPES as T
from .graph import AuxEdges, Block, NeuralGraph
from .ir import ModelIR, StateInfo
from .lpe import centrality_blocks, lpe_blocks

PROFILES = ("nino", "generic")


def _edge_type(profile: str, st: StateInfo, nnode: int) -> int:
    if nnode <= 1:
        if profile == "nino":
            return T["norm"] if st.name.endswith("weight") else T["bias"]
        return T["norm"] if st.kind == "scale" else T["bias"]
    if st.kind == "embedding":
        return T["embedding"]
    if st.kind == "positional":
        return T["positional"]
    if st.kind == "conv" or (profile == "nino" and len(st.shape) >= 3):
        return T["conv"]
    return T["dense"]


def emit(ir: ModelIR, profile: str = "nino", lpe: int = 8, centrality: bool = False) -> NeuralGraph:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {PROFILES}")
    sp = ir.spaces
    node_start: dict[int, int] = {}
    kinds: list[str] = []
    labels: list[int] = []
    spaces_of: list[int] = []

    def leaf_nodes(leaf: int) -> None:
        leaf = sp.find(leaf)
        if leaf in node_start:
            return
        node_start[leaf] = len(kinds)
        n = sp.size[leaf]
        pinned = sp.is_pinned(leaf)
        kinds.extend(["pinned" if pinned else "neuron"] * n)
        labels.extend(range(1, n + 1) if pinned else [0] * n)
        spaces_of.extend([leaf] * n)

    def nodes(space: int) -> torch.Tensor:
        ids = []
        for leaf in sp.leaves(space):
            leaf_nodes(leaf)
            s = node_start[sp.find(leaf)]
            ids.append(torch.arange(s, s + sp.size[sp.find(leaf)]))
        return torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)

    def aux_node() -> torch.Tensor:
        kinds.append("aux")
        labels.append(0)
        spaces_of.append(-1)
        return torch.tensor([len(kinds) - 1])

    blocks: list[Block] = []
    offset = 0
    for name in ir.param_names:
        st = ir.states[name]
        numel = math.prod(st.shape)
        blocks.append(_block(sp, st, offset, numel, nodes, aux_node, profile))
        offset += numel
    V = len(kinds)
    loops = torch.arange(V)
    aux = [AuxEdges(loops, loops, T["self"], 2.0)]
    max_feat = max([b.feat for b in blocks] + [1])
    if profile == "nino":
        max_feat = max(max_feat, 9)
    pieces = [p for b in blocks for p in b.bipartite()]
    feats, vals = lpe_blocks(V, pieces, lpe)
    node_labels = torch.tensor(labels, dtype=torch.long)
    cols = [feats]
    if centrality:
        cols.append(centrality_blocks(V, pieces)[:, None])
    if profile == "generic":
        pinned = torch.tensor([k == "pinned" for k in kinds], dtype=torch.float32)[:, None]
        is_aux = torch.tensor([k == "aux" for k in kinds], dtype=torch.float32)[:, None]
        cols += [pinned, is_aux, _position_code(node_labels)]
    graph = NeuralGraph(
        profile=profile, num_nodes=V, num_params=offset, param_names=list(ir.param_names),
        param_shapes=[ir.states[n].shape for n in ir.param_names], blocks=blocks, aux=aux,
        node_features=torch.cat(cols, 1), node_labels=node_labels, node_kind=kinds,
        node_space=torch.tensor(spaces_of, dtype=torch.long), max_feat=max_feat, lpe=lpe,
        info={"lpe_eigenvalues": vals.tolist(), "method": ir.method},
    )
    return graph


def _position_code(labels: torch.Tensor, dims: int = 4) -> torch.Tensor:
    """Sinusoidal code of a pinned neuron's position (zeros for free and auxiliary nodes)."""
    pos = labels.double()[:, None]
    freqs = torch.exp(-math.log(1e4) * torch.arange(dims // 2, dtype=torch.float64) / max(dims // 2, 1))
    code = torch.cat([torch.sin(pos * freqs), torch.cos(pos * freqs)], 1)
    code[labels == 0] = 0
    return code.float()


def _block(sp, st: StateInfo, offset: int, numel: int, nodes, aux_node, profile: str) -> Block:
    shape = st.shape
    node_axes = [d for d in (st.src, st.dst) if d is not None]
    # split flattened (kron) node axes into (outer, positions); positions join the features
    view_shape: list[int] = []
    where: dict[int, int] = {}
    extra_feats: list[int] = []
    for d, n in enumerate(shape):
        where[d] = len(view_shape)
        s = sp.struct.get(sp.find(st.axes[d])) if d in node_axes else None
        if s is not None and s[0] == "kron":
            view_shape += [n // s[2], s[2]]
            extra_feats.append(len(view_shape) - 1)
        else:
            view_shape.append(n)
    feat_axes = [where[d] for d in st.features] + extra_feats
    ordered_nodes = sorted(node_axes)
    order = [where[d] for d in ordered_nodes] + sorted(feat_axes)
    feat = int(np.prod([view_shape[i] for i in feat_axes])) if feat_axes else 1

    def space_nodes(d: int) -> torch.Tensor:
        s = sp.struct.get(sp.find(st.axes[d]))
        return nodes(s[1] if s is not None and s[0] == "kron" else st.axes[d])

    rows_per_group = 0
    if len(node_axes) == 2:
        a, b = ordered_nodes
        first = space_nodes(a)
        if st.grouped is not None and st.grouped[0] == b:
            second = torch.cat([nodes(c) for c in st.grouped[1]])
            rows_per_group = st.grouped[2]
        else:
            second = space_nodes(b)
        src_is_first = st.src == a
    elif len(node_axes) == 1:
        first, second, src_is_first = aux_node(), space_nodes(node_axes[0]), True
    else:
        first = aux_node()
        second, src_is_first = first, True
    return Block(st.name, offset, numel, tuple(view_shape), order, first, second, src_is_first, feat,
                 _edge_type(profile, st, len(node_axes)), rows_per_group, st.trainable)
