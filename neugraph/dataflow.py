"""Dataflow facts the published (``nino``) graph layout needs beyond the symmetry group.

The symmetry group ties a residual stream into one space across all blocks; the published graph
instead gives every sublayer its own copy of those neurons, joined by residual edges. This pass
walks the captured graph once and assigns each activation a *version*: a contraction with a
parameter starts a new version of its output neurons; adding two versions where one was computed
from the other is a residual connection (the result keeps the newer version); adding two
independent versions (token + position embeddings) makes them one. It also records, for each
parameter, the versions its input and output neurons belong to, which slices of a fused projection
feed the queries, keys and values of an attention, and which embeddings are indexed by positions
rather than by the model's inputs. All of it is read from the computation, not from names.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from .context import Ctx, op_name, tensor_leaves

VIEWS = {"view", "reshape", "_unsafe_view", "t", "transpose", "permute", "alias", "to", "_to_copy", "expand",
         "unsqueeze", "squeeze", "contiguous", "clone", "detach", "flatten", "unflatten", "type_as",
         "_assert_tensor_metadata", "view_copy"}
CONTRACTIONS = {"linear", "addmm", "mm", "bmm", "matmul", "baddbmm", "embedding", "conv1d", "conv2d", "conv3d",
                "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "einsum"}
SEGMENT_OPS = {"split", "split_with_sizes", "chunk", "unsafe_split", "tensor_split", "slice", "narrow"}


@dataclass
class Flow:
    use: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)  # param -> (src ver, dst ver)
    residual: list[tuple[int, int, list[int]]] = field(default_factory=list)  # (older, newer, axes of the sum)
    qkv: dict[str, list[tuple[int, int, str]]] = field(default_factory=dict)  # param -> [(lo, hi, "q"|"k"|"v")]
    attention: list[dict] = field(default_factory=list)  # {"q": fam, "v": fam, "qver": v, "vver": v}
    positional: set = field(default_factory=set)  # embeddings indexed by positions
    partner: dict[str, str] = field(default_factory=dict)  # bias -> the weight of the same contraction
    triples: list[dict] = field(default_factory=list)  # per attention: {"q"|"k"|"v": (param, lo, hi)}
    parent: dict[int, int] = field(default_factory=dict)

    def find(self, v: int | None) -> int | None:
        if v is None:
            return None
        while self.parent.get(v, v) != v:
            v = self.parent[v]
        return v


def run(cap, ctx: Ctx) -> Flow:
    flow = Flow()
    ver: dict[str, int] = {}
    anc: dict[int, set] = {0: set()}
    pnode: dict[str, str] = {}  # fx node -> parameter it is a view of
    inputs = set(cap.inputs)
    from_input: set[str] = set(inputs)
    counter = [0]

    def new(parents: list[int]) -> int:
        counter[0] += 1
        v = counter[0]
        anc[v] = set()
        for p in parents:
            p = flow.find(p)
            anc[v] |= anc.get(p, set()) | {p}
        return v

    def vof(a) -> int | None:
        return flow.find(ver.get(a.name)) if isinstance(a, fx.Node) and a.name in ver else None

    for node in cap.graph.nodes:
        if node.op == "placeholder":
            if node.name in cap.params:
                pnode[node.name] = cap.params[node.name]
            else:
                ver[node.name] = 0
            continue
        if node.op != "call_function":
            continue
        name = op_name(node)
        args = tensor_leaves(list(node.args) + list(node.kwargs.values()))
        if any(a.name in from_input for a in args):
            from_input.add(node.name)
        params = [a for a in args if a.name in pnode]
        acts = [a for a in args if a.name not in pnode and a.name in ver]
        if name in VIEWS and params and not acts:
            pnode[node.name] = pnode[params[0].name]
            continue
        if name == "getitem" and isinstance(node.args[0], fx.Node) and node.args[0].name in pnode:
            pnode[node.name] = pnode[node.args[0].name]
            continue
        act_vers = [v for v in (vof(a) for a in acts) if v is not None]
        if name in CONTRACTIONS and params:
            v = new(act_vers)
            ver[node.name] = v
            src = act_vers[0] if act_vers else None
            for p in params:
                flow.use.setdefault(pnode[p.name], (src, v))
            ws = [pnode[p.name] for p in params if p.meta["val"].dim() >= 2]
            for p in params:
                if p.meta["val"].dim() == 1 and ws:
                    flow.partner.setdefault(pnode[p.name], ws[0])
            if name == "embedding" and node.args[1].name not in from_input:
                flow.positional.add(pnode[node.args[0].name])
            continue
        for p in params:  # bias, norm weight and the like: they sit on the neurons they act on
            flow.use.setdefault(pnode[p.name], (None, act_vers[0] if act_vers else None))
        if name in ("add", "sub") and len(set(act_vers)) == 2:
            va, vb = act_vers
            if va in anc[vb] or vb in anc[va]:
                old, newer = (va, vb) if va in anc[vb] else (vb, va)
                flow.residual.append((old, newer, list(ctx.axes(node) or [])))
                ver[node.name] = newer
            else:
                flow.parent[vb] = va
                anc[va] |= anc[vb]
                ver[node.name] = va
            continue
        if name == "scaled_dot_product_attention":
            q, k, v = node.args[0], node.args[1], node.args[2]
            ver[node.name] = vof(v) if vof(v) is not None else 0
            _record_attention(flow, ctx, pnode, q, k, v, vof)
            continue
        if name in ("matmul", "bmm") and len(acts) == 2:
            ver[node.name] = act_vers[-1] if act_vers else 0
            continue
        ver[node.name] = act_vers[0] if act_vers else 0
    return flow


def _record_attention(flow: Flow, ctx: Ctx, pnode, q, k, v, vof) -> None:
    sp = ctx.sp
    fq, fv = ctx.axes(q)[-1], ctx.axes(v)[-1]
    if sp.kind(fq) == "fam" and sp.kind(fv) == "fam":
        flow.attention.append({"q": fq, "v": fv, "qver": vof(q), "vver": vof(v)})
    triple = {}
    for t, role in ((q, "q"), (k, "k"), (v, "v")):
        found = _source_slice(t, pnode)
        if found is not None:
            pname, lo, hi = found
            triple[role] = found
            parts = flow.qkv.setdefault(pname, [])
            if (lo, hi, role) not in parts:
                parts.append((lo, hi, role))
    if len(triple) == 3 and triple not in flow.triples:
        flow.triples.append(triple)


def _source_slice(t: fx.Node, pnode: dict[str, str]):
    """Walk back from an attention operand to the projection that made it: (param, lo, hi) of the
    projection's output features it reads, or None."""
    lo = hi = None
    node = t
    for _ in range(64):
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return None
        name = op_name(node)
        if name in CONTRACTIONS:
            ws = [a for a in tensor_leaves(list(node.args)) if a.name in pnode and a.meta["val"].dim() >= 2]
            if not ws:
                return None
            n = node.meta["val"].shape[-1]
            return (pnode[ws[0].name], 0 if lo is None else lo, n if hi is None else hi)
        if name == "getitem" and isinstance(node.args[0], fx.Node) and op_name(node.args[0]) in SEGMENT_OPS:
            sp_node, i = node.args[0], node.args[1]
            sizes = [s.shape[-1] for s in sp_node.meta["val"]]
            dim = sp_node.args[2] if len(sp_node.args) > 2 else sp_node.kwargs.get("dim", 0)
            if dim % len(sp_node.meta["val"][0].shape) != len(sp_node.meta["val"][0].shape) - 1:
                return None
            start = sum(sizes[:i])
            lo, hi = (start, start + sizes[i]) if lo is None else (start + lo, start + hi)
            node = sp_node.args[0]
            continue
        if name in VIEWS or name in ("mul", "add", "sub", "neg", "div", "cat") or name.startswith("_to"):
            # rotary, scaling and head reshapes keep the feature identity: follow the first tensor
            nxt = next((a for a in node.args if isinstance(a, fx.Node)), None)
            if name == "cat" and node.args:
                nxt = node.args[0][0] if isinstance(node.args[0], (list, tuple)) else None
            node = nxt
            continue
        return None
    return None
