"""Streamed NiNo forward pass: predictions without any E x D tensor (docs/streaming.md).

Every edge state of :class:`nowcast.gnn.NiNoGNN` is a function of that edge's own input features
``f`` and of node states:

    e_0 = edge_in(f) + type_embed[type]
    e_{l+1} = out_l(u_l),  u_l = SiLU(edge_l(e_l) + src_l(x_{l+1})[j] + dst_l(x_{l+1})[i])

so once the node states ``x_{l+1}`` are known, ``e_{l+1}`` of any set of edges can be recomputed from
their features. With ``L`` used message-passing layers the streamed pass makes ``L + 1`` sweeps over
the edges in tiles of at most ``chunk`` edges: sweep ``l < L`` recomputes ``e_l`` per tile and adds
layer ``l``'s messages into per-node sums; the node update then gives ``x_{l+1}``; the last sweep
recomputes ``e_L``, applies the head and writes the tile's predictions straight into the output.
What persists: a few (nodes, hidden) tensors per layer, per-tensor scaling statistics and the
(num_params,) result. Each tile holds O(chunk x hidden).

Recomputing the chain costs FLOPs; three exact rewrites more than pay for it (all are identities
of real arithmetic, so results differ from the materialised path by float rounding only):

- Linear maps that follow each other are composed once, in float64: whatever reads ``e_l`` (FiLM
  of layer ``l``, edge update ``l``'s edge map, the MLP head's first layer) is applied to the map
  that produced it (``edge_in`` plus the type embedding, or the previous update's output map). So
  ``e_l`` itself is never formed, only ``z_l`` = ``f`` (l = 0) or ``u_{l-1}``.
- The mean aggregation is linear in the FiLM output. For target ``i`` with sources ``j``:
  ``sum_j scale_ij * (P_t[i] + P_s[j]) + shift_ij
  = P_t[i] * (G_s Z_i + n_i g_s) + G_h Z_i + n_i g_h + sum_j scale_ij * P_s[j]``, with
  ``Z_i = sum_j z_ij``: only the last term needs a per-edge value (a D x D map, not 2D x D), and the
  shift is never formed per edge.
- Dense weight blocks are consumed as blocks: a tile is (target range x source range) of the weight
  and node states are broadcast from the block's node-id vectors (a slice when contiguous); there
  is no per-edge index. In layer 0 the sources of a tile are shared by all its target rows, so
  ``sum_j scale_ij * P_s[j] = sum_k G_s[:, k] * (F_k @ P_s)`` (``F_k``: the tile's k-th feature
  plane), matrix products of size (targets x sources) x (sources x D) with no per-edge D-vector.
  Only the auxiliary edges (self-loops, residual and head edges: O(nodes)) use index gathers.

Per parameter edge and hidden size D this is about ``3 D^2`` multiply-adds for the published
configuration (3 layers, 2 used, MLP head) against ``9 D^2`` for the materialised path.

``dtype=torch.bfloat16`` computes the D x D work of each tile in bfloat16 (composed weights and
node states cast per tile). The maps that read the edge features (a few multiply-adds per edge),
per-node sums, node updates and the prediction stay float32: the trajectory is in the small
differences between the ctx states, which bfloat16's 8-bit mantissa would round away.

``subgraphs`` nowcasts groups of parameter blocks one at a time on their induced subgraphs, so that
only one group's node states are held; scaling statistics stay per tensor over the whole model.
This changes the prediction (messages across groups are cut); see :func:`split_blocks`.
"""
from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .base import keep_frozen
from .heads import MLPHead
from .scaling import EPS, Scales, scale, unscale

DEFAULT_CHUNK = 1 << 13
STATS_ROWS = 1 << 16  # rows per float64 block when computing per-tensor statistics
# layers > 0: per-target (dim x D) outer-product sums when a target has at least this many sources in a tile,
# times the hidden size (the per-target work is D^2, the per-edge work it saves 2D per source)
OUTER_MIN_SOURCES = 1.0


# ---- composed weights ------------------------------------------------------------------------------
@dataclass
class Affine:
    """``z -> z @ weight.T + bias[row]``: ``bias`` (types, out) for layer 0 (row = edge type), else (1, out)."""

    weight: torch.Tensor
    bias: torch.Tensor

    def cast(self, dtype: torch.dtype) -> "Affine":
        return Affine(self.weight.to(dtype), self.bias.to(dtype))


def _compose(consumer_w: torch.Tensor, consumer_b: torch.Tensor | None, producer_w: torch.Tensor,
             producer_b: torch.Tensor) -> Affine:
    """consumer(producer(z)) as one affine map, computed in float64. producer_b is (rows, D)."""
    cw = consumer_w.double()
    w = cw @ producer_w.double()
    b = producer_b.double() @ cw.T
    if consumer_b is not None:
        b = b + consumer_b.double()
    return Affine(w.float(), b.float())


@dataclass
class Plan:
    """The composed maps of one NiNoGNN (float32; cast per dtype on use)."""

    layers: int  # L: message-passing layers whose output reaches the head
    film_scale: list[Affine]  # per layer l < L: z_l -> FiLM scale
    film_shift: list[Affine]  # per layer l < L: z_l -> FiLM shift
    edge: list[Affine]  # per update l < L: z_l -> edge_l(e_l)
    head_in: Affine | None  # MLP head: z_L -> first head layer (pre-activation); None otherwise
    e_last: Affine  # z_L -> e_L (for a non-MLP head)

    @staticmethod
    def of(model) -> "Plan":
        D = model.type_embed.embedding_dim
        L = len(model.edge_updates)
        with torch.no_grad():
            w_in = model.edge_in.weight  # (D, max_feat * ctx)
            b0 = model.edge_in.bias[None] + model.type_embed.weight  # (types, D)

            def producer(l: int) -> tuple[torch.Tensor, torch.Tensor]:
                if l == 0:
                    return w_in, b0
                o = model.edge_updates[l - 1].out
                return o.weight, o.bias[None]

            scale_, shift_, edge = [], [], []
            for l in range(L):
                pw, pb = producer(l)
                film = model.layers[l].film
                scale_.append(_compose(film.weight[:D], film.bias[:D], pw, pb))
                shift_.append(_compose(film.weight[D:], film.bias[D:], pw, pb))
                lin = model.edge_updates[l].edge
                edge.append(_compose(lin.weight, lin.bias, pw, pb))
            pw, pb = producer(L)
            eye = torch.eye(D, dtype=pw.dtype, device=pw.device)
            e_last = _compose(eye, None, pw, pb)
            head_in = None
            if isinstance(model.head, MLPHead):
                first = model.head.mlp[0]
                head_in = _compose(first.weight, first.bias, pw, pb)
        return Plan(L, scale_, shift_, edge, head_in, e_last)


# ---- tiles -----------------------------------------------------------------------------------------
@dataclass
class Source:
    """One set of edges to stream: a parameter block (dense, tiled) or an auxiliary edge list."""

    block: object | None  # neugraph Block, or None for auxiliary edges
    edge_type: int
    first: torch.Tensor | None = None  # local node ids along the block's first axis
    second: torch.Tensor | None = None
    src: torch.Tensor | None = None  # auxiliary edges: local ids
    dst: torch.Tensor | None = None
    value: float = 0.0


@dataclass
class Tile:
    """A rectangle of edges, sources along axis 0 and targets along axis 1 (source-major, so that
    sums over sources of products with source states are single matrix products).

    ``f``: (sources, targets, width * T) scaled features, slot-major, contiguous. ``tgt``: node ids
    (targets,). ``src``: node ids (sources,) shared by every target (a dense block), or (targets,)
    one source per target (auxiliary edges; ``f`` then has one row). ``t_slice`` / ``s_slice``: the
    same ids as a slice of the node range when contiguous. ``write`` maps (sources, targets, width)
    scaled predictions to the parameters (None for auxiliary edges).
    """

    f: torch.Tensor
    tgt: torch.Tensor
    src: torch.Tensor
    shared_src: bool
    edge_type: int
    width: int
    t_slice: slice | None = None
    s_slice: slice | None = None
    write: Callable[[torch.Tensor], None] | None = None


def _as_slice(ids: torch.Tensor) -> slice | None:
    """``ids`` as a slice when they are consecutive integers."""
    n = ids.numel()
    if n == 0:
        return None
    lo = int(ids[0])
    if n == 1 or torch.equal(ids, torch.arange(lo, lo + n, dtype=ids.dtype, device=ids.device)):
        return slice(lo, lo + n)
    return None


def _take(x: torch.Tensor, ids: torch.Tensor, sl: slice | None) -> torch.Tensor:
    return x[sl] if sl is not None else x.index_select(0, ids)


class _Scaler:
    """Scaling of a tile of one parameter tensor, with the whole-tensor statistics of :mod:`.scaling`.

    ``std`` / ``none``: one shift and divisor per tensor, computed in float64 over the whole
    tensor in row chunks (no copy of the states); the per-element methods work per tile.
    """

    def __init__(self, graph, states: torch.Tensor, method: str, chunk_rows: int = STATS_ROWS):
        self.method = method
        sizes = list(graph.param_sizes)
        self.starts = [0]
        for n in sizes:
            self.starts.append(self.starts[-1] + n)
        self.shift = self.div = None
        self.eps = 0.0 if method == "none" else EPS
        if method not in ("std", "none"):
            return
        shift = torch.zeros(len(sizes), dtype=torch.float64)
        div = torch.ones(len(sizes), dtype=torch.float64)
        if method == "std":
            for i, n in enumerate(sizes):
                w = states[self.starts[i]: self.starts[i + 1]]
                count = w.numel()
                total = sum(w[a: a + chunk_rows].double().sum() for a in range(0, n, chunk_rows))
                mean = total / count
                if count > 1:
                    sq = sum((w[a: a + chunk_rows].double() - mean).pow(2).sum() for a in range(0, n, chunk_rows))
                    std = math.sqrt(float(sq) / (count - 1))
                else:
                    std = 0.0
                shift[i], div[i] = float(mean), std + EPS
        self.shift = shift.float().to(states.device)
        self.div = div.float().to(states.device)

    def tensor_of(self, offset: int) -> int:
        return bisect.bisect_right(self.starts, offset) - 1

    def scale(self, x: torch.Tensor, tensor: int) -> tuple[torch.Tensor, Scales | None]:
        """Scaled ``x`` (..., T), and per-element scales for the per-element methods."""
        if self.shift is not None:
            return torch.div(x - self.shift[tensor], self.div[tensor]), None
        T = x.shape[-1]
        scaled, sc = scale(x.reshape(-1, T), [x.numel() // T], self.method)
        return scaled.view(x.shape), sc

    def unscale(self, v: torch.Tensor, tensor: int, sc: Scales | None, exact: bool) -> torch.Tensor:
        if sc is not None:
            return unscale(v.reshape(-1), sc, exact=exact).view(v.shape)
        div = self.div[tensor] if exact else self.div[tensor] - self.eps
        return v * div + self.shift[tensor]


class _BlockView:
    """A parameter block as a (rows, cols) grid of edges over its first and second node axes."""

    def __init__(self, block, states: torch.Tensor, out: torch.Tensor):
        self.block = block
        self.rows = block.first.numel()
        self.cols = block.num_edges // self.rows  # per group for grouped weights
        self.groups = self.rows // block.rows_per_group if block.rows_per_group else 1
        self.views = []
        for m in block.members():
            x = m.param_view(states).permute(*m.order, len(m.view_shape))
            o = m.param_view(out[:, None]).permute(*m.order, len(m.view_shape))
            ps = list(x.shape[:-1])
            if len(ps) >= 2 and ps[0] == self.rows and ps[1] == self.cols and math.prod(ps[2:]) == m.feat:
                nd = 2
            elif len(ps) >= 1 and self.rows == 1 and ps[0] == self.cols and math.prod(ps[1:]) == m.feat:
                nd = 1
            elif self.rows == 1 and self.cols == 1 and math.prod(ps) == m.feat:
                nd = 0
            else:
                raise ValueError(f"block {m.name}: layout {tuple(ps)} does not match {self.rows} x {self.cols} "
                                 f"edges of {m.feat} slots")
            self.views.append((m, x, o, nd))

    @staticmethod
    def _cut(x: torch.Tensor, nd: int, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        if nd == 2:
            return x[r0:r1, c0:c1]
        if nd == 1:
            return x[c0:c1][None]
        return x[None, None]

    def features(self, scaler: _Scaler, r0: int, r1: int, c0: int, c1: int):
        """Scaled (r, c, width, T) features of the tile, and what :meth:`write` needs to map back."""
        parts, scales = [], []
        for m, x, _, nd in self.views:
            t = self._cut(x, nd, r0, r1, c0, c1)
            t = t.reshape(r1 - r0, c1 - c0, m.feat, x.shape[-1])
            tensor = scaler.tensor_of(m.offset)
            s, sc = scaler.scale(t, tensor)
            parts.append(s)
            scales.append((tensor, sc))
        f = parts[0] if len(parts) == 1 else torch.cat(parts, 2)
        return f, scales

    def write(self, scaler: _Scaler, exact: bool, scales, pred: torch.Tensor, r0: int, r1: int, c0: int,
              c1: int) -> None:
        """Unscale (r, c, width) scaled predictions and write them into the output parameters."""
        slot = 0
        for (m, _, o, nd), (tensor, sc) in zip(self.views, scales):
            v = scaler.unscale(pred[:, :, slot: slot + m.feat], tensor, sc, exact)
            slot += m.feat
            dest = self._cut(o, nd, r0, r1, c0, c1)
            dest.copy_(v.reshape(dest.shape))


# ---- the streamed pass ---------------------------------------------------------------------------
class _Stream:
    def __init__(self, model, graph, states: torch.Tensor, out: torch.Tensor, blocks: Sequence, aux: Sequence,
                 nodes: torch.Tensor | None, chunk: int, dtype: torch.dtype, scaler: _Scaler):
        if chunk < 1:
            raise ValueError(f"chunk must be a positive number of edges, got {chunk}")
        self.model, self.graph, self.states, self.out = model, graph, states, out
        self.chunk, self.dtype, self.scaler = int(chunk), dtype, scaler
        dev = states.device
        V = graph.num_nodes
        if nodes is None:
            self.num_nodes, local = V, None
        else:
            self.num_nodes = nodes.numel()
            local = torch.full((V,), -1, dtype=torch.long)
            local[nodes] = torch.arange(nodes.numel())
        self.nodes = nodes

        def loc(ids: torch.Tensor) -> torch.Tensor:
            ids = ids.long()
            return (ids if local is None else local[ids]).to(dev)

        self.sources: list[tuple[Source, _BlockView | None, slice | None, slice | None]] = []
        for b in blocks:
            view = _BlockView(b, states, out)
            s = Source(b, b.edge_type, first=loc(b.first), second=loc(b.second))
            self.sources.append((s, view, _as_slice(s.first), _as_slice(s.second)))
        for a in aux:
            s = Source(None, a.edge_type, src=loc(a.src), dst=loc(a.dst), value=float(a.value))
            self.sources.append((s, None, None, None))
        self.T = states.shape[1]
        self.degree = self._degree()

    # -- structure ----------------------------------------------------------------------------------
    def _degree(self) -> torch.Tensor:
        deg = torch.zeros(self.num_nodes, dtype=torch.float64, device=self.states.device)
        for s, view, _, _ in self.sources:
            if view is None:
                deg.index_add_(0, s.dst, torch.ones(s.dst.numel(), dtype=torch.float64, device=deg.device))
                continue
            b = s.block
            for g in range(view.groups):
                rows = s.first[g * (view.rows // view.groups): (g + 1) * (view.rows // view.groups)]
                cols = s.second[g * view.cols: (g + 1) * view.cols] if b.rows_per_group else s.second
                tgt, n_src = (cols, rows.numel()) if b.src_is_first else (rows, cols.numel())
                deg.index_add_(0, tgt, torch.full((tgt.numel(),), float(n_src), dtype=torch.float64,
                                                  device=deg.device))
        return deg.clamp_(min=1).float()

    def tiles(self, with_write: bool) -> Iterator[Tile]:
        """Every edge once, in tiles of at most ``chunk`` edges (see :class:`Tile`)."""
        T, chunk = self.T, self.chunk
        for s, view, first_sl, second_sl in self.sources:
            if view is None:
                if with_write:
                    continue  # auxiliary edges have no parameters to predict
                n = s.src.numel()
                for a in range(0, n, chunk):
                    z = min(n, a + chunk)
                    f = self.states.new_zeros(1, z - a, T)
                    f.fill_(s.value)  # slot 0 holds the value for every t; other slots are 0
                    yield Tile(f, s.dst[a:z], s.src[a:z], False, s.edge_type, 1)
                continue
            b = s.block
            rpg = view.rows // view.groups
            cols = view.cols
            # many sources per target: the source axis gets up to ``chunk`` edges, targets the rest
            n_src = rpg if b.src_is_first else cols
            s_step = min(n_src, chunk)
            t_step = max(1, chunk // s_step)
            r_step, c_step = (s_step, t_step) if b.src_is_first else (t_step, s_step)
            c_step = min(c_step, cols)
            for g in range(view.groups):
                for r0 in range(g * rpg, (g + 1) * rpg, r_step):
                    r1 = min((g + 1) * rpg, r0 + r_step)
                    for c0 in range(0, cols, c_step):
                        c1 = min(cols, c0 + c_step)
                        f, scales = view.features(self.scaler, r0, r1, c0, c1)
                        width = f.shape[2]
                        off = g * cols if b.rows_per_group else 0
                        rid, cid = s.first[r0:r1], s.second[off + c0: off + c1]
                        rsl = None if first_sl is None else slice(first_sl.start + r0, first_sl.start + r1)
                        csl = None if second_sl is None else slice(second_sl.start + off + c0,
                                                                   second_sl.start + off + c1)
                        write = (partial(self._write, view, scales, (r0, r1, c0, c1), not b.src_is_first)
                                 if with_write else None)
                        f = f.reshape(r1 - r0, c1 - c0, width * T)
                        if b.src_is_first:
                            yield Tile(f.contiguous(), cid, rid, True, s.edge_type, width, csl, rsl, write)
                        else:  # sources are the second axis: put them first
                            f = f.transpose(0, 1).contiguous()
                            yield Tile(f, rid, cid, True, s.edge_type, width, rsl, csl, write)

    def _write(self, view: _BlockView, scales, box: tuple[int, int, int, int], flip: bool,
               pred: torch.Tensor) -> None:
        """(sources, targets, width) scaled predictions of a tile into the output parameters."""
        view.write(self.scaler, self.model.exact_unscale, scales, pred.transpose(0, 1) if flip else pred, *box)

    # -- per-tile arithmetic --------------------------------------------------------------------------
    def _node(self, x: torch.Tensor, tile: Tile, target: bool) -> torch.Tensor:
        """Node rows broadcastable to (sources, targets, D): targets (1, t, D), sources (s, 1, D)
        for a dense block and (1, t, D) for auxiliary edges."""
        if target:
            return _take(x, tile.tgt, tile.t_slice)[None]
        rows = _take(x, tile.src, tile.s_slice)
        return rows[:, None] if tile.shared_src else rows[None]

    @staticmethod
    def _bias(a: Affine, tile: Tile, layer: int) -> torch.Tensor:
        return a.bias[tile.edge_type] if layer == 0 else a.bias[0]

    def _affine(self, a: Affine, z: torch.Tensor, tile: Tile, layer: int, bias: bool = True) -> torch.Tensor:
        """``a`` applied to z (..., dim) as one matrix product (bias fused when ``bias``)."""
        w = a.weight if layer > 0 else a.weight[:, : z.shape[-1]]
        z2 = z.reshape(-1, z.shape[-1])
        out = torch.addmm(self._bias(a, tile, layer), z2, w.T) if bias else torch.mm(z2, w.T)
        return out.view(*z.shape[:-1], w.shape[0])

    def chain(self, tile: Tile, upto: int, w: dict) -> torch.Tensor:
        """z_upto of the tile: its features (upto 0, float32) or u_{upto-1} (compute dtype).

        Everything that reads the features stays float32 (a few multiply-adds per edge): the
        trajectory lives in the small differences between the ctx states, which bfloat16's 8-bit
        mantissa would round away.
        """
        z = tile.f
        for l in range(upto):
            h = self._affine(w["edge"][l], z, tile, l, bias=False)
            per_target = self._node(w["T"][l], tile, True).to(h.dtype) + self._bias(w["edge"][l], tile, l)
            if tile.shared_src:
                h += per_target
                h += self._node(w["S"][l], tile, False).to(h.dtype)
            else:  # one source per target: one add
                h += per_target + self._node(w["S"][l], tile, False).to(h.dtype)
            z = F.silu(h, inplace=True)
            if l == 0:
                z = z.to(self.dtype)
        return z

    def messages(self, l: int, w: dict) -> torch.Tensor:
        """Sum over incoming edges of layer l's messages, (nodes, D) float32."""
        D = self.model.type_embed.embedding_dim
        acc = torch.zeros(self.num_nodes, D, device=self.states.device)
        sc_map, sh_map = w["scale"][l], w["shift"][l]
        p_t, p_s = w["Pt"], w["Ps"]
        for tile in self.tiles(False):
            z = self.chain(tile, l, w)  # (sources, targets, dim)
            n_src, n_tgt, dim = z.shape
            zsum = z.sum(0)  # (targets, dim)
            t_rows = _take(p_t, tile.tgt, tile.t_slice).to(z.dtype)
            g_s, g_h = self._bias(sc_map, tile, l), self._bias(sh_map, tile, l)
            w_s, w_h = sc_map.weight[:, :dim], sh_map.weight[:, :dim]
            # sum_j scale_ij = G_s Z_i + n g_s; sum_j shift_ij = G_h Z_i + n g_h  (Z_i = sum_j z_ij)
            part = t_rows * torch.addmm(g_s, zsum, w_s.T, beta=n_src)
            part += torch.addmm(g_h, zsum, w_h.T, beta=n_src)
            if tile.shared_src and (l == 0 or n_src >= OUTER_MIN_SOURCES * D):
                # sum_j scale_ij * P_s[j] = sum_k G_s[:, k] * M[k] + g_s * sum_j P_s[j], per target
                # M[i] = sum_j z_ij^T P_s[j] (dim x D): one product (targets*dim x sources) @ (sources x D)
                s_rows = _take(p_s, tile.src, tile.s_slice).to(z.dtype)  # (sources, D)
                m = torch.mm(z.reshape(n_src, n_tgt * dim).T, s_rows).view(n_tgt, dim, D)
                m *= w_s.T
                part += m.sum(1)
                part += g_s * s_rows.sum(0)
            else:
                s = self._affine(sc_map, z, tile, l)  # (sources, targets, D)
                s *= self._node(p_s, tile, False).to(s.dtype)
                part += s.sum(0)
            acc.index_add_(0, tile.tgt, part.float())
        return acc

    def heads(self, k: int, w: dict) -> None:
        """Last sweep: head on every parameter edge, predictions written into ``out``."""
        model, L = self.model, w["L"]
        head = model.head
        for tile in self.tiles(True):  # parameter edges only: auxiliary edges are not mapped back
            z = self.chain(tile, L, w)
            width = tile.width
            if w["head_in"] is not None:
                h = F.silu(self._affine(w["head_in"], z, tile, L), inplace=True)
                last = head.mlp[2]
                rows = torch.arange(width, device=h.device) * head.horizon + (k - 1)
                delta = F.linear(h, last.weight[rows].to(h.dtype), last.bias[rows].to(h.dtype))
            else:
                e = self._affine(w["e_last"], z, tile, L)
                shape = e.shape
                delta = head(e.reshape(-1, shape[-1]).float(), int(k), width).view(*shape[:2], width)
            newest = tile.f.unflatten(2, (width, self.T))[..., -1]  # (sources, targets, width)
            tile.write(newest + delta.float())

    def run(self, k: int, plan: Plan) -> None:
        model = self.model
        dt = self.dtype
        L = plan.layers

        def cast(a: Affine | None, layer: int) -> Affine | None:  # maps of the features stay float32
            return None if a is None else a.cast(dt) if layer > 0 else a

        w: dict = {"L": L, "scale": [cast(a, l) for l, a in enumerate(plan.film_scale)],
                   "shift": [cast(a, l) for l, a in enumerate(plan.film_shift)],
                   "edge": [cast(a, l) for l, a in enumerate(plan.edge)], "S": [], "T": [],
                   "head_in": cast(plan.head_in, L), "e_last": cast(plan.e_last, L)}
        x = self.node_inputs()
        D = x.shape[1]
        for l in range(plan.layers):
            layer = model.layers[l]
            mw = layer.msg.weight
            w["Pt"] = F.linear(x, mw[:, :D], layer.msg.bias)  # node tensors stay float32; tiles cast
            w["Ps"] = F.linear(x, mw[:, D:])
            agg = self.messages(l, w) / self.degree[:, None]
            x = F.silu(layer.out(layer.upd(torch.cat([x, agg], 1))))
            upd = model.edge_updates[l]
            w["S"].append(upd.src(x))
            w["T"].append(upd.dst(x))
        w.pop("Pt", None), w.pop("Ps", None)
        self.heads(k, w)

    def node_inputs(self) -> torch.Tensor:
        g = self.graph
        if self.nodes is None:
            return self.model.node_inputs(g)
        nodes = self.nodes
        pos = getattr(g, "word_pos", None)
        if pos is None:
            pos = g.info.get("word_pos")
        sub = SimpleNamespace(num_nodes=nodes.numel(), node_features=g.node_features[nodes],
                              word_pos=None if pos is None else torch.as_tensor(pos)[nodes],
                              info={}, lpe=getattr(g, "lpe", self.model.lpe))
        return self.model.node_inputs(sub)


def _check(model, graph) -> None:
    if graph.max_feat > model.max_feat:
        raise ValueError(f"the graph has {graph.max_feat} feature slots per edge but this nowcaster takes at "
                         f"most {model.max_feat}; compile with profile='nino' or use a nowcaster built with a "
                         "larger max_feat")
    types = [b.edge_type for b in graph.blocks] + [a.edge_type for a in graph.aux]
    if types and max(types) >= model.type_embed.num_embeddings:
        raise ValueError(f"edge type {max(types)} is beyond the {model.type_embed.num_embeddings} types this "
                         "nowcaster knows")


def split_blocks(graph, key: Callable[[str], str] | None = None) -> list[list[int]]:
    """Group block indices by ``key(parameter name)``; default: the name up to its first numeric part
    (``transformer.h.3.attn.c_attn.weight`` -> ``transformer.h.3``), names without one together."""
    def default(name: str) -> str:
        m = re.match(r"^(.*?\.\d+)(\.|$)", name)
        return m.group(1) if m else ""

    key = key or default
    groups: dict[str, list[int]] = {}
    for i, b in enumerate(graph.blocks):
        groups.setdefault(key(b.name), []).append(i)
    return list(groups.values())


def subgraph_parts(graph, block_ids: Sequence[int]):
    """Blocks, auxiliary edges and (sorted, global) node ids of the subgraph induced by some blocks.

    Nodes: those of the blocks, plus auxiliary nodes that belong to no block (attention head nodes)
    whose edges point into them. Auxiliary edges are kept when both ends are in the node set.
    """
    from neugraph.graph import AuxEdges

    V = graph.num_nodes
    blocks = [graph.blocks[i] for i in block_ids]
    inside = torch.zeros(V, dtype=torch.bool)
    for b in blocks:
        inside[b.first.long()] = True
        inside[b.second.long()] = True
    in_any = torch.zeros(V, dtype=torch.bool)
    for b in graph.blocks:
        in_any[b.first.long()] = True
        in_any[b.second.long()] = True
    for a in graph.aux:
        pull = inside[a.dst] & ~in_any[a.src]
        inside[a.src[pull]] = True
    aux = []
    for a in graph.aux:
        keep = inside[a.src] & inside[a.dst]
        if bool(keep.any()):
            aux.append(AuxEdges(a.src[keep], a.dst[keep], a.edge_type, a.value))
    return blocks, aux, torch.nonzero(inside).flatten()


def stream_predict(model, graph, states: torch.Tensor, k: int, chunk: int = DEFAULT_CHUNK,
                   dtype: torch.dtype = torch.float32,
                   subgraphs: str | Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """``model.predict(graph, states, k)`` computed without any (edges x hidden) tensor.

    ``chunk``: edges per tile (memory per tile is a few ``chunk x hidden`` tensors). ``dtype``:
    tile compute dtype (float32 or bfloat16). ``subgraphs``: None (the whole graph: equal to the
    materialised path up to float rounding), ``"auto"`` (:func:`split_blocks`) or lists of block
    indices covering every block once; each group is nowcast on its induced subgraph.
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    s = model.check(graph, states, k)
    _check(model, graph)
    with torch.no_grad():
        plan = Plan.of(model)
        scaler = _Scaler(graph, s, model.scaling)
        out = torch.empty(graph.num_params, dtype=torch.float32, device=s.device)
        if subgraphs is None:
            _Stream(model, graph, s, out, graph.blocks, graph.aux, None, chunk, dtype, scaler).run(int(k), plan)
        else:
            groups = split_blocks(graph) if subgraphs == "auto" else [list(g) for g in subgraphs]
            seen = sorted(i for g in groups for i in g)
            if seen != list(range(len(graph.blocks))):
                raise ValueError(f"subgraphs must cover each of the {len(graph.blocks)} blocks exactly once")
            for g in groups:
                blocks, aux, nodes = subgraph_parts(graph, g)
                _Stream(model, graph, s, out, blocks, aux, nodes, chunk, dtype, scaler).run(int(k), plan)
        return keep_frozen(graph, s, out)
