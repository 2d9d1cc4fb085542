"""Graph emission: turn a :class:`ModelIR` into a :class:`NeuralGraph` under a profile.

Profiles
- ``nino``: the published NiNo graph (see NINO_V1.md): neuron nodes, one auxiliary node per 1-D
  parameter, edge types by tensor rank and name, kernels in 9 zero-padded slots, a self-loop on
  every node, LPE node features.
- ``naive``: the ``nino`` layout without head nodes, with each attention's query, key and value
  projections stacked as one 3-feature edge (type ``qkv``) from the stream to the value neurons,
  which the output projection reads, as in the earlier neural-graph work (the paper's ablation).
  q, k and v neurons are thereby one set of nodes: the graph is equivariant to permutations that
  move them together, not to the independent q/k vs v/o permutations the model also has. Where q,
  k and v differ in shape (GQA, MQA) they stay separate edges typed query/key/value.
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

PROFILES = ("nino", "naive", "generic")


def _edge_type(profile: str, st: StateInfo, nnode: int) -> int:
    if nnode <= 1:
        if profile != "generic":
            return T["norm"] if st.name.endswith("weight") else T["bias"]
        return T["norm"] if st.kind == "scale" else T["bias"]
    if st.kind == "embedding":
        return T["embedding"]
    if st.kind == "positional":
        return T["positional"]
    if st.kind == "conv" or (profile != "generic" and len(st.shape) >= 3):
        return T["conv"]
    return T["dense"]


def emit(ir: ModelIR, profile: str = "nino", lpe: int = 8, centrality: bool = False) -> NeuralGraph:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {PROFILES}")
    sp = ir.spaces
    # nino, as published for transformers: one copy of the residual stream per sublayer, q/k/v typed
    flow = ir.flow if profile != "generic" and ir.flow is not None and ir.flow.attention else None
    node_start: dict[tuple[int, int], int] = {}
    kinds: list[str] = []
    labels: list[int] = []
    spaces_of: list[int] = []

    def leaf_nodes(leaf: int, ver: int) -> int:
        key = (sp.find(leaf), ver)
        if key not in node_start:
            node_start[key] = len(kinds)
            n = sp.size[key[0]]
            pinned = sp.is_pinned(key[0])
            kinds.extend(["pinned" if pinned else "neuron"] * n)
            labels.extend(range(1, n + 1) if pinned else [0] * n)
            spaces_of.extend([key[0]] * n)
        return node_start[key]

    def nodes(space: int, ver: int | None = None) -> torch.Tensor:
        v = flow.find(ver) if flow is not None and ver is not None else 0
        ids = []
        for leaf in sp.leaves(space):
            s = leaf_nodes(leaf, v)
            ids.append(torch.arange(s, s + sp.size[sp.find(leaf)]))
        return torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)

    def aux_node() -> torch.Tensor:
        kinds.append("aux")
        labels.append(0)
        spaces_of.append(-1)
        return torch.tensor([len(kinds) - 1])

    blocks: list[Block] = []
    sizes = [math.prod(ir.states[n].shape) for n in ir.param_names]
    offsets = dict(zip(ir.param_names, np.cumsum([0] + sizes).tolist()))
    stacks = _naive_stacks(ir, flow) if profile == "naive" and flow is not None else {}
    emitted: set[int] = set()

    def part_block(pname: str, lo: int, hi: int, role: str, aux=aux_node, node_fn=nodes) -> Block:
        s = ir.states[pname]
        sv, dv = flow.use.get(pname, (None, None))
        return _block(sp, s, offsets[pname], math.prod(s.shape), node_fn, aux, profile, sv, dv, (lo, hi, role))

    def no_nodes(space: int, ver: int | None = None) -> torch.Tensor:  # sizes only: creates no node
        return torch.zeros(sum(sp.size[sp.find(leaf)] for leaf in sp.leaves(space)), dtype=torch.long)

    def stacked(group: list[tuple[str, int, int]]) -> Block:
        v = part_block(*group[2], "v")
        q, k = (part_block(*m, r, aux=lambda: v.first, node_fn=no_nodes) for m, r in zip(group[:2], "qk"))
        q.first, q.second, q.src_is_first, q.stack = v.first, v.second, v.src_is_first, [k, v]
        if v.first.numel() > 1:
            q.edge_type = T["qkv"]
        return q

    for name, numel in zip(ir.param_names, sizes):
        st, offset = ir.states[name], offsets[name]
        src_ver, dst_ver = flow.use.get(name, (None, None)) if flow is not None else (None, None)
        parts = _qkv_parts(flow, st) if flow is not None else None
        if parts:
            w = ir.states.get(flow.partner.get(name, ""))
            stream = nodes(w.axes[w.src], src_ver) if w is not None and w.src is not None else None
            for lo, hi, role in parts:
                group = stacks.get((name, lo, hi))
                if group is not None:
                    if id(group) not in emitted:
                        emitted.add(id(group))
                        blocks.append(stacked(group))
                    continue
                blk = _block(sp, st, offset, numel, nodes, aux_node, profile, src_ver, dst_ver, (lo, hi, role))
                if profile == "nino" and role == "k" and stream is not None and blk.second.numel() == stream.numel():
                    blk.second = stream  # published layout: the key bias sits on the stream neurons keys point at
                blocks.append(blk)
        else:
            blocks.append(_block(sp, st, offset, numel, nodes, aux_node, profile, src_ver, dst_ver))
    extra: list[AuxEdges] = []
    if flow is not None:
        extra = _transformer_aux(sp, flow, nodes, aux_node, heads=profile == "nino")
    V = len(kinds)
    loops = torch.arange(V)
    aux = extra + [AuxEdges(loops, loops, T["self"], 2.0)]
    max_feat = max([b.width for b in blocks] + [1])
    if profile == "nino":
        max_feat = max(max_feat, 9)
    pieces = [p for b in blocks for p in b.bipartite()]
    for a in extra:  # head edges: one node to a set; residual edges: a matching (one piece per pair)
        if a.edge_type == T["head"]:
            pieces.append((a.src[:1], a.dst))
        else:
            pieces.extend((a.src[i: i + 1], a.dst[i: i + 1]) for i in range(a.src.numel()))
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
        profile=profile, num_nodes=V, num_params=sum(sizes), param_names=list(ir.param_names),
        param_shapes=[ir.states[n].shape for n in ir.param_names], blocks=blocks, aux=aux,
        node_features=torch.cat(cols, 1), node_labels=node_labels, node_kind=kinds,
        node_space=torch.tensor(spaces_of, dtype=torch.long), max_feat=max_feat, lpe=lpe,
        info={"lpe_eigenvalues": vals.tolist(), "method": ir.method}, word_pos=_token_ids(blocks, node_labels),
    )
    return graph


def _token_ids(blocks: list[Block], labels: torch.Tensor) -> torch.Tensor:
    """Per node, the token id of a token node (a row of a word embedding: its pinned position), else -1.

    This is the word-position node feature: token nodes are pinned, so each has an identity the
    nowcaster may embed (``NiNoGNN(word_pos=True)``).
    """
    out = torch.full((labels.numel(),), -1, dtype=torch.long)
    for b in blocks:
        if b.edge_type != T["embedding"] or b.first.numel() <= 1:
            continue
        tok = b.first if b.src_is_first else b.second
        out[tok] = torch.where(labels[tok] > 0, labels[tok] - 1, out[tok])
    return out


def _naive_stacks(ir: ModelIR, flow) -> dict[tuple[str, int, int], list[tuple[str, int, int]]]:
    """Query, key and value slices (weights, and biases when all three have one) that the naive
    profile stacks on one edge: {(param, lo, hi): [q slice, k slice, v slice]}."""
    out: dict = {}

    def usable(m) -> bool:
        parts = _qkv_parts(flow, ir.states[m[0]])
        return parts is not None and any(p[:2] == m[1:] for p in parts)

    for t in flow.triples:
        group = [tuple(t[r]) for r in "qkv"]
        shapes = {ir.states[p].shape for p, _, _ in group}
        if len({hi - lo for _, lo, hi in group}) != 1 or len(shapes) != 1 or not all(map(usable, group)):
            continue
        biases = {r: b for b, w in flow.partner.items() for r, m in zip("qkv", group) if w == m[0]}
        bgroup = [(biases[r], m[1], m[2]) for r, m in zip("qkv", group) if r in biases]
        for g in (group, bgroup if len(bgroup) == 3 and all(map(usable, bgroup)) else []):
            if g and not any(m in out for m in g):
                out.update((m, g) for m in g)
    return out


def _position_code(labels: torch.Tensor, dims: int = 4) -> torch.Tensor:
    """Sinusoidal code of a pinned neuron's position (zeros for free and auxiliary nodes)."""
    pos = labels.double()[:, None]
    freqs = torch.exp(-math.log(1e4) * torch.arange(dims // 2, dtype=torch.float64) / max(dims // 2, 1))
    code = torch.cat([torch.sin(pos * freqs), torch.cos(pos * freqs)], 1)
    code[labels == 0] = 0
    return code.float()


def _qkv_parts(flow, st: StateInfo) -> list[tuple[int, int, str]] | None:
    """Slices of a fused projection (or its bias) that feed queries, keys and values."""
    parts = flow.qkv.get(st.name) or flow.qkv.get(flow.partner.get(st.name, ""))
    if not parts or st.dst is None:
        return None
    parts = sorted(parts)
    if parts[0][0] != 0 or parts[-1][1] != st.shape[st.dst] or any(a[1] != b[0] for a, b in zip(parts, parts[1:])):
        return None  # the slices must tile the output axis exactly
    return parts


def _transformer_aux(sp, flow, nodes, aux_node, heads: bool = True) -> list[AuxEdges]:
    """Residual edges between versions of the same neurons, and (``heads``) one node per attention head."""
    out: list[AuxEdges] = []
    for old, new, axes in flow.residual:
        src, dst = [], []
        for a in axes:
            for leaf in sp.leaves(a):
                if sp.is_pinned(leaf) or sp.size[sp.find(leaf)] < 2:
                    continue
                src.append(nodes(leaf, old))
                dst.append(nodes(leaf, new))
        if src:
            out.append(AuxEdges(torch.cat(src), torch.cat(dst), T["residual"], 1.0))
    for att in flow.attention if heads else []:
        if sp.kind(att["q"]) != "fam" or sp.kind(att["v"]) != "fam":
            continue
        mq, mv = sp.members(att["q"]), sp.members(att["v"])
        if len(mq) != len(mv):
            continue
        for q, v in zip(mq, mv):
            h = aux_node()
            tgt = torch.cat([nodes(q, att["qver"]), nodes(v, att["vver"])])
            out.append(AuxEdges(h.expand(tgt.numel()).clone(), tgt, T["head"], 1.0))
    return out


def _block(sp, st: StateInfo, offset: int, numel: int, nodes, aux_node, profile: str,
           src_ver: int | None = None, dst_ver: int | None = None, part=None) -> Block:
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
        ver = src_ver if d == st.src else dst_ver
        space = s[1] if s is not None and s[0] == "kron" else st.axes[d]
        if part is not None and d == st.dst:  # only the leaves the slice covers get nodes
            inside, pos = [], 0
            for leaf in sp.leaves(space):
                n = sp.size[sp.find(leaf)]
                if part[0] <= pos and pos + n <= part[1]:
                    inside.append(leaf)
                pos += n
            if sum(sp.size[sp.find(x)] for x in inside) == part[1] - part[0]:
                return torch.cat([nodes(x, ver) for x in inside])
            return nodes(space, ver)[part[0]: part[1]]
        return nodes(space, ver)

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
    etype = _edge_type(profile, st, len(node_axes))
    if part is None:
        return Block(st.name, offset, numel, tuple(view_shape), order, first, second, src_is_first, feat,
                     etype, rows_per_group, st.trainable)
    lo, hi, role = part
    if len(node_axes) == 2:  # queries read the stream; keys point back at it (nino); values as usual
        etype = {"q": T["query"], "k": T["key"], "v": T["value"]}[role]
        if role == "k" and profile == "nino":
            src_is_first = not src_is_first
    vaxis = where[st.dst]
    return Block(st.name, offset, numel // shape[st.dst] * (hi - lo), tuple(view_shape), order, first, second,
                 src_is_first, feat, etype, rows_per_group, st.trainable, (vaxis, lo, hi), numel)
