"""Export a :class:`NeuralGraph` to other graph libraries.

Both exporters keep the graph's edge order: edge ``e`` of the export is column ``e`` of
``graph.edge_index``, so values computed on one side map back to the other by position.
Their libraries are optional dependencies, imported only when an exporter is called.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .graph import NeuralGraph

if TYPE_CHECKING:  # pragma: no cover
    import networkx

__all__ = ["to_networkx", "to_pyg", "has_parallel_edges"]


def _needs(module: str, extra: str) -> ImportError:
    return ImportError(f"{module} is not installed; it is an optional dependency of neugraph: "
                       f'pip install "neural-nowcasting[{extra}]"')


def has_parallel_edges(graph: NeuralGraph) -> bool:
    """True when two edges of ``graph`` join the same ordered (source, target) pair."""
    ei = graph.edge_index
    if ei.shape[1] < 2:
        return False
    codes = ei[0] * max(graph.num_nodes, 1) + ei[1]
    return torch.unique(codes).numel() < codes.numel()


def to_networkx(graph: NeuralGraph, states: torch.Tensor | None = None) -> "networkx.DiGraph":
    """``graph`` as a networkx ``DiGraph``, or a ``MultiDiGraph`` when it has parallel edges.

    A ``DiGraph`` is returned when every ordered (source, target) pair carries one edge, as in
    most graphs; a ``MultiDiGraph`` (edge keys = edge positions) when some pair carries more than
    one, for example the parameter self-loop of a scalar parameter beside the ``self`` loop of its
    auxiliary node, so that no edge is ever silently merged. Check with ``G.is_multigraph()``.

    Nodes are ``0 .. num_nodes-1`` with attributes ``kind`` ("neuron", "pinned" or "aux"),
    ``label`` (int, from ``node_labels``), ``space`` (int, from ``node_space``) and ``x`` (the
    node feature row as a list). Edges have ``type`` (int edge type, see ``NINO_TYPES``),
    ``index`` (the edge's column in ``graph.edge_index``) and, when ``states`` is given (a
    ``(num_params,)`` or ``(num_params, T)`` tensor in ``param_names`` order), ``w``: the edge's
    row of ``graph.edge_features(states)`` as a list of ``max_feat * T`` floats.
    """
    try:
        import networkx as nx
    except ImportError as err:
        raise _needs("networkx", "draw") from err

    multi = has_parallel_edges(graph)
    G = nx.MultiDiGraph() if multi else nx.DiGraph()
    G.graph.update(profile=graph.profile, max_feat=graph.max_feat)

    x = graph.node_features.detach().cpu().tolist()
    labels = graph.node_labels.tolist()
    spaces = graph.node_space.tolist()
    G.add_nodes_from((v, {"kind": graph.node_kind[v], "label": labels[v], "space": spaces[v], "x": x[v]})
                     for v in range(graph.num_nodes))

    src, dst = graph.edge_index.tolist()
    types = graph.edge_type.tolist()
    if states is not None:
        w = graph.edge_features(states.detach()).cpu().tolist()
        G.graph["T"] = 1 if states.dim() == 1 else int(states.shape[1])
        attrs = ({"type": t, "index": e, "w": w[e]} for e, t in enumerate(types))
    else:
        attrs = ({"type": t, "index": e} for e, t in enumerate(types))
    if multi:
        G.add_edges_from((s, d, e, a) for e, (s, d, a) in enumerate(zip(src, dst, attrs)))
    else:
        G.add_edges_from((s, d, a) for s, d, a in zip(src, dst, attrs))
    return G


def to_pyg(graph: NeuralGraph, states: torch.Tensor | None = None) -> Any:
    """``graph`` as a ``torch_geometric.data.Data``.

    Fields: ``x`` (node features), ``edge_index`` (2, E), ``edge_type`` (E,), ``num_nodes`` and,
    when ``states`` ((num_params,) or (num_params, T)) is given, ``edge_attr`` =
    ``graph.edge_features(states)`` (E, max_feat * T). Tensors are shared with ``graph``, not
    copied: clone before modifying them in place.
    """
    try:
        from torch_geometric.data import Data
    except ImportError as err:
        raise _needs("torch_geometric", "pyg") from err

    fields: dict[str, Any] = {"x": graph.node_features, "edge_index": graph.edge_index,
                              "edge_type": graph.edge_type, "num_nodes": graph.num_nodes}
    if states is not None:
        fields["edge_attr"] = graph.edge_features(states)
    return Data(**fields)
