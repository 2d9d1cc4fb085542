"""Pictures of a :class:`NeuralGraph`: its adjacency matrix and a layered node-link drawing.

matplotlib (and networkx, for :func:`draw_graph`) are optional dependencies, imported only when a
drawing is made. Figures are rendered with the Agg backend on a private canvas, so drawing never
changes pyplot's global backend or figure list (safe in notebooks, threads and headless CI).
Edge colours are fixed per edge type (:data:`TYPE_COLORS`), so pictures of different graphs match.
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from .graph import NINO_TYPES, NeuralGraph

__all__ = ["draw_adjacency", "draw_graph", "node_layers", "TYPE_COLORS"]

TYPE_NAMES: dict[int, str] = {t: name for name, t in NINO_TYPES.items()}
TYPE_COLORS: dict[int, str] = {
    NINO_TYPES["padding"]: "#c7c7c7", NINO_TYPES["dense"]: "#1f77b4", NINO_TYPES["bias"]: "#ff7f0e",
    NINO_TYPES["conv"]: "#2ca02c", NINO_TYPES["norm"]: "#d62728", NINO_TYPES["embedding"]: "#9467bd",
    NINO_TYPES["positional"]: "#8c564b", NINO_TYPES["query"]: "#e377c2", NINO_TYPES["key"]: "#17becf",
    NINO_TYPES["value"]: "#bcbd22", NINO_TYPES["residual"]: "#7f7f7f", NINO_TYPES["head"]: "#393b79",
    NINO_TYPES["unused"]: "#e7cb94", NINO_TYPES["self"]: "#000000",
}
_EXTRA = ["#843c39", "#637939", "#7b4173", "#3182bd", "#e6550d", "#31a354"]  # unknown types


def _color(t: int) -> str:
    return TYPE_COLORS.get(t, _EXTRA[t % len(_EXTRA)])


def _type_name(t: int) -> str:
    return TYPE_NAMES.get(t, f"type {t}")


def _figure(**kw: Any) -> Any:
    """A matplotlib Figure on its own Agg canvas (pyplot is not involved)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError('drawing needs matplotlib, an optional dependency of neugraph: '
                          'pip install "neural-nowcasting[draw]"') from err
    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def _check_size(graph: NeuralGraph, max_nodes: int, what: str) -> None:
    if graph.num_nodes > max_nodes:
        raise ValueError(f"graph has {graph.num_nodes} nodes, more than max_nodes={max_nodes}: "
                         f"{what} would be illegible or slow to render; pass a larger max_nodes to "
                         "draw it anyway, or draw a smaller model")
    if graph.num_nodes == 0:
        raise ValueError("graph has no nodes to draw")


def _save(fig: Any, path: str | os.PathLike) -> None:
    fig.savefig(path, format="png")


def draw_adjacency(graph: NeuralGraph, path: str | os.PathLike, max_nodes: int = 4000) -> str | os.PathLike:
    """Save a PNG of the adjacency matrix of ``graph`` to ``path`` and return ``path``.

    Rows are targets and columns are sources (cell ``[dst, src]``, like a weight matrix
    ``W[out, in]``), in node id order. A cell is coloured by the type of its edge; where two
    edges share a cell, a parameter edge is shown over a ``self`` loop. Raises ``ValueError`` when
    the graph has more than ``max_nodes`` nodes.
    """
    _check_size(graph, max_nodes, "an adjacency image")
    V = graph.num_nodes
    dpi = min(600, max(120, math.ceil(V / 6.5)))  # at least one pixel per node
    fig = _figure(figsize=(9.5, 7.5), dpi=dpi, layout="constrained")
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    src, dst = graph.edge_index.cpu().numpy()
    et = graph.edge_type.cpu().numpy()
    types, counts = np.unique(et, return_counts=True)
    # palette slots 1..n in drawing priority: "self" lowest, so parameter edges win shared cells
    self_t = NINO_TYPES["self"]
    order = sorted(types.tolist(), key=lambda t: (t != self_t, t))
    slot = np.zeros(int(types.max()) + 1 if types.size else 1, dtype=np.uint8)
    for i, t in enumerate(order):
        slot[t] = i + 1
    mat = np.zeros((V, V), dtype=np.uint8)
    np.maximum.at(mat, (dst, src), slot[et])

    ax = fig.add_subplot()
    cmap = ListedColormap(["#ffffff"] + [_color(t) for t in order])
    ax.imshow(mat, cmap=cmap, vmin=-0.5, vmax=len(order) + 0.5, interpolation="nearest",
              aspect="equal", origin="upper")
    ax.set_xlabel("source node")
    ax.set_ylabel("target node")
    ax.set_title(f"{graph.profile} graph adjacency: {V} nodes, {graph.num_edges} edges\n"
                 "rows = targets, columns = sources", fontsize=10)
    n_of = dict(zip(types.tolist(), counts.tolist()))
    handles = [Patch(facecolor=_color(t), edgecolor="none", label=f"{_type_name(t)} ({n_of[t]})")
               for t in sorted(n_of)]
    ax.legend(handles=handles, title="edge type (count)", loc="upper left", bbox_to_anchor=(1.02, 1.0),
              fontsize=8, title_fontsize=9, frameon=False)
    _save(fig, path)
    return path


def node_layers(graph: NeuralGraph) -> np.ndarray:
    """(num_nodes,) int layer of every non-auxiliary node: its longest-path distance from a source.

    Self-loops and auxiliary nodes are ignored (auxiliary nodes get -1). Nodes on a cycle (a
    recurrent weight, say) share one layer: the longest path is taken over the condensation.
    """
    try:
        import networkx as nx
    except ImportError as err:
        raise ImportError('the layered layout needs networkx, an optional dependency of neugraph: '
                          'pip install "neural-nowcasting[draw]"') from err
    V = graph.num_nodes
    is_aux = np.array([k == "aux" for k in graph.node_kind], dtype=bool)
    src, dst = graph.edge_index.cpu().numpy()
    keep = (src != dst) & ~is_aux[src] & ~is_aux[dst]
    pairs = np.unique(src[keep] * V + dst[keep])
    G = nx.DiGraph()
    G.add_nodes_from(np.flatnonzero(~is_aux).tolist())
    G.add_edges_from(zip((pairs // V).tolist(), (pairs % V).tolist()))
    C = nx.condensation(G)
    layer_of: dict[int, int] = {}
    for c in nx.topological_sort(C):
        layer_of[c] = max((layer_of[p] + 1 for p in C.predecessors(c)), default=0)
    layers = np.full(V, -1, dtype=np.int64)
    for v, c in C.graph["mapping"].items():
        layers[v] = layer_of[c]
    return layers


def _layout(graph: NeuralGraph) -> tuple[np.ndarray, np.ndarray]:
    """(V, 2) positions and the layer of every node; auxiliary nodes sit just left of their targets."""
    layers = node_layers(graph)
    V = graph.num_nodes
    pos = np.zeros((V, 2))
    for L in np.unique(layers[layers >= 0]):
        members = np.flatnonzero(layers == L)
        pos[members, 0] = L
        pos[members, 1] = (len(members) - 1) / 2 - np.arange(len(members))  # top to bottom by id
    aux = np.flatnonzero(layers < 0)
    if aux.size:
        src, dst = graph.edge_index.cpu().numpy()
        is_aux = layers < 0
        links = (src != dst) & (is_aux[src] != is_aux[dst])
        a = np.where(is_aux[src[links]], src[links], dst[links])  # the auxiliary end
        n = np.where(is_aux[src[links]], dst[links], src[links])  # the neuron end
        columns: dict[float, list[tuple[float, int]]] = {}
        lone = []
        for v in aux.tolist():
            nb = n[a == v]
            if nb.size == 0:  # a scalar parameter: only its own loops
                lone.append(v)
                continue
            x = layers[nb].min() - 0.4
            columns.setdefault(x, []).append((pos[nb, 1].mean(), v))
        for x, items in columns.items():
            items.sort(key=lambda p: (-p[0], p[1]))
            want = np.array([y for y, _ in items])
            ys = want.copy()
            for i in range(1, len(ys)):  # keep at least 0.8 apart, going down
                ys[i] = min(ys[i], ys[i - 1] - 0.8)
            ys += (want - ys).mean()
            for (_, v), y in zip(items, ys):
                pos[v] = (x, y)
        for i, v in enumerate(lone):
            pos[v] = (-0.8, -0.8 * i)
    return pos, layers


def _edge_paths(pos: np.ndarray, src: np.ndarray, dst: np.ndarray) -> list[np.ndarray]:
    """A polyline per edge: straight, or an arc bulging right between two nodes of one column."""
    a, b = pos[src], pos[dst]
    paths = list(np.stack([a, b], axis=1))
    same = np.flatnonzero(np.isclose(a[:, 0], b[:, 0]))
    if same.size:
        t = np.linspace(0.0, 1.0, 9)[None, :, None]
        ctrl = (a[same] + b[same]) / 2
        ctrl[:, 0] += np.minimum(0.12 + 0.03 * np.abs(a[same, 1] - b[same, 1]), 0.6)  # peak bulge <= 0.3
        arcs = (1 - t) ** 2 * a[same, None] + 2 * (1 - t) * t * ctrl[:, None] + t ** 2 * b[same, None]
        for i, arc in zip(same.tolist(), arcs):
            paths[i] = arc
    return paths


_KIND_STYLE = {
    "neuron": dict(marker="o", facecolor="#ffffff", edgecolor="#333333", label="neuron"),
    "pinned": dict(marker="s", facecolor="#333333", edgecolor="#333333", label="pinned neuron"),
    "aux": dict(marker=">", facecolor="#999999", edgecolor="#555555", label="auxiliary node"),
}


def draw_graph(graph: NeuralGraph, path: str | os.PathLike, max_nodes: int = 600) -> str | os.PathLike:
    """Save a PNG node-link drawing of ``graph`` to ``path`` and return ``path``.

    Layered layout: a neuron's column is its longest-path distance from a source (inputs on the
    left, so edges mostly run left to right; self-loops ignored, cycles share a column), and within
    a column nodes go top to bottom by id. Auxiliary nodes (biases, norm weights) are drawn just
    left of the column of the neurons they feed, at their mean height. Edges are coloured by type;
    edges within one column (a residual layer's weights) are drawn as arcs bulging right, and
    self-loops (the ``self`` edges, and parameter edges from a node to itself) are not drawn. Raises ``ValueError`` above ``max_nodes`` nodes.
    """
    _check_size(graph, max_nodes, "a node-link drawing")
    fig = _figure()  # import check before the layout, which needs networkx
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    pos, layers = _layout(graph)
    V = graph.num_nodes
    n_layers = int(layers.max()) + 1 if (layers >= 0).any() else 1
    tallest = max(np.bincount(layers[layers >= 0]).max() if (layers >= 0).any() else 1,
                  int(np.ptp(pos[:, 1])) + 1)
    width = float(np.clip(3.5 + 1.8 * n_layers, 7, 24))
    height = float(np.clip(1.5 + 0.22 * tallest, 4.5, 24))
    fig.set_size_inches(width, height)
    fig.set_dpi(150)
    fig.set_layout_engine("constrained")
    ax = fig.add_subplot()

    src, dst = graph.edge_index.cpu().numpy()
    et = graph.edge_type.cpu().numpy()
    keep = src != dst
    src, dst, et = src[keep], dst[keep], et[keep]
    alpha = float(np.clip(1500 / max(len(src), 1), 0.03, 0.8))
    ax.add_collection(LineCollection(_edge_paths(pos, src, dst), colors=[_color(t) for t in et.tolist()],
                                     linewidths=0.7, alpha=alpha, zorder=1))

    pts_per_unit = 72 * (height - 1.5) / max(tallest, 1)
    size = float(np.clip((0.55 * pts_per_unit) ** 2, 4, 70))
    kinds = np.array(graph.node_kind)
    handles = []
    for kind, style in _KIND_STYLE.items():
        m = kinds == kind
        if m.any():
            style = dict(style)
            label = style.pop("label")
            ax.scatter(pos[m, 0], pos[m, 1], s=size, linewidths=0.6, zorder=2, **style)
            handles.append(Line2D([], [], linestyle="none", markersize=7, marker=style["marker"],
                                  markerfacecolor=style["facecolor"], markeredgecolor=style["edgecolor"],
                                  label=f"{label} ({int(m.sum())})"))
    types, counts = np.unique(et, return_counts=True)
    handles += [Line2D([], [], color=_color(t), linewidth=2, label=f"{_type_name(t)} ({n})")
                for t, n in zip(types.tolist(), counts.tolist())]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
              title="nodes / edge types (count)", title_fontsize=9)
    ax.autoscale_view()
    ax.margins(0.04)
    ax.set_axis_off()
    ax.set_title(f"{graph.profile} graph: {V} nodes, {len(src)} edges drawn "
                 f"({graph.num_edges - len(src)} self-loops omitted)", fontsize=10)
    _save(fig, path)
    return path
