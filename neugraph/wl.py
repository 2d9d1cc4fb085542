"""Weisfeiler-Lehman hash of a neural graph over edge types, exact edge features and node labels.

Two graphs that are isomorphic (as directed multigraphs with typed, featured edges and labelled
nodes) get the same hash; a different hash proves they are not isomorphic. Neighbour multisets are
hashed by summing 64-bit mixes, so every round is a few vectorised passes over the edges.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, elementwise on uint64."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64)
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def _row_ids(rows: np.ndarray) -> np.ndarray:
    """A uint64 content hash per float64 row (equal rows, equal ids; distinct rows differ w.h.p.)."""
    bits = np.ascontiguousarray(rows, dtype=np.float64).view(np.uint64)
    h = np.zeros(rows.shape[0], dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(bits.shape[1]):
            h = _mix(h * np.uint64(1099511628211) + _mix(bits[:, j] + np.uint64(j + 1)))
    return h


def wl_hash(edge_index: torch.Tensor, edge_type: torch.Tensor, edge_features: torch.Tensor | None,
            node_labels: torch.Tensor, iterations: int = 3) -> str:
    """Hex digest of the graph's WL colouring after ``iterations`` rounds."""
    src, dst = edge_index[0].numpy(), edge_index[1].numpy()
    V = node_labels.numel()
    et = edge_type.numpy().astype(np.uint64)
    if edge_features is not None and edge_features.numel():
        feats = edge_features.detach().cpu().numpy()
        # canonical bytes: +0.0 and -0.0 are the same value
        feats = np.where(feats == 0, 0, feats).astype(np.float64)
        fid = _row_ids(feats)
    else:
        fid = np.zeros(len(et), dtype=np.uint64)
    with np.errstate(over="ignore"):
        elab = _mix(et * np.uint64(1000003) + _mix(fid + np.uint64(7)))
        lab = _mix(node_labels.numpy().astype(np.uint64) + np.uint64(11))
        for _ in range(iterations):
            incoming = np.zeros(V, dtype=np.uint64)
            outgoing = np.zeros(V, dtype=np.uint64)
            np.add.at(incoming, dst, _mix(elab ^ _mix(lab[src] + np.uint64(3))))
            np.add.at(outgoing, src, _mix(elab ^ _mix(lab[dst] + np.uint64(5))))
            lab = _mix(lab * np.uint64(31) + _mix(incoming) * np.uint64(17) + _mix(outgoing + np.uint64(1)))
    return hashlib.blake2b(np.sort(lab).tobytes(), digest_size=16).hexdigest()


def graph_hash(graph, flat_params: torch.Tensor, iterations: int = 3) -> str:
    """WL hash of a :class:`NeuralGraph` with edge features from ``flat_params``."""
    return wl_hash(graph.edge_index, graph.edge_type, graph.edge_features(flat_params),
                   graph.node_labels, iterations)
