"""Laplacian positional encoding and eigenvector centrality from the block structure.

A neural graph is a union of complete bipartite blocks (a dense weight connects every input
neuron to every output neuron). Group nodes into *cells* of nodes that belong to the same blocks
in the same roles; nodes of a cell then have identical neighbourhoods. The normalised adjacency
``N = D^-1/2 A D^-1/2`` (binary, undirected, with self-loops) therefore splits exactly into
- the cell-constant vectors, where it acts as a small ``cells x cells`` quotient matrix, and
- the vectors that sum to zero on one cell, where it is ``1/d`` (or 0 if the cell is fully
  connected to itself) times the identity.
So the spectrum costs one dense eigendecomposition of the quotient and nothing the size of the
model. Graphs with edges that are not blocks fall back to a sparse eigensolver.
"""
from __future__ import annotations

import numpy as np
import torch

Piece = tuple[torch.Tensor, torch.Tensor]


def _cells(num_nodes: int, pieces: list[Piece]) -> tuple[np.ndarray, int]:
    """Cell id per node: nodes with the same (piece, role) memberships share a cell."""
    g = np.random.default_rng(12345)
    h = np.zeros(num_nodes, dtype=np.uint64)
    weights = g.integers(1, 2**63 - 1, size=(len(pieces), 2), dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        for b, (s, t) in enumerate(pieces):
            s, t = s.numpy(), t.numpy()
            np.add.at(h, s, weights[b, 0])
            np.add.at(h, t, weights[b, 1])
    _, cell = np.unique(h, return_inverse=True)
    return cell.reshape(-1), int(cell.max()) + 1 if num_nodes else 0


def _quotient(num_nodes: int, pieces: list[Piece]):
    cell, C = _cells(num_nodes, pieces)
    n = np.bincount(cell, minlength=C).astype(np.float64)
    A = np.zeros((C, C), dtype=bool)
    for s, t in pieces:
        cs, ct = np.unique(cell[s.numpy()]), np.unique(cell[t.numpy()])
        A[np.ix_(cs, ct)] = True
        A[np.ix_(ct, cs)] = True
    selfblock = np.diag(A).copy()
    off = A.copy()
    np.fill_diagonal(off, False)
    deg = np.where(selfblock, n, 1.0) + off.astype(np.float64) @ n
    return cell, C, n, off, selfblock, deg


def _fix_signs(vecs: np.ndarray) -> np.ndarray:
    if vecs.size == 0:
        return vecs
    idx = np.abs(vecs).argmax(axis=0)
    signs = np.sign(vecs[idx, np.arange(vecs.shape[1])])
    signs[signs == 0] = 1
    return vecs * signs


def _top_eigs(Q: np.ndarray, k: int, dense_limit: int = 1500) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of the symmetric quotient: all of them when small, else the ``k`` largest."""
    C = Q.shape[0]
    if C <= dense_limit:
        return np.linalg.eigh(Q)
    import scipy.sparse as sps
    import scipy.sparse.linalg as spl

    mu, V = spl.eigsh(sps.csr_matrix(Q), k=min(k, C - 1), which="LA", tol=1e-10)
    order = np.argsort(mu)
    return mu[order], V[:, order]


def lpe_blocks(num_nodes: int, pieces: list[Piece], k: int = 8) -> tuple[torch.Tensor, np.ndarray]:
    """(num_nodes, k) Laplacian eigenvectors (trivial one dropped) and their eigenvalues."""
    if k <= 0 or num_nodes == 0:
        return torch.zeros(num_nodes, max(k, 0)), np.zeros(0)
    cell, C, n, off, selfblock, deg = _quotient(num_nodes, pieces)
    sq = np.sqrt(n / deg)
    Q = off * np.outer(sq, sq)
    Q[np.diag_indices(C)] = np.where(selfblock, n, 1.0) / deg
    mu, V = _top_eigs(Q, k + 1)
    cand = [(1.0 - m, 0, j) for j, m in enumerate(mu)]
    for a in range(C):
        if n[a] >= 2:
            lam = 1.0 - (0.0 if selfblock[a] else 1.0 / deg[a])
            cand.append((lam, 1, a))
    cand.sort(key=lambda c: (round(c[0], 10), c[1], c[2]))
    members = None
    out = np.zeros((num_nodes, k), dtype=np.float64)
    vals = []
    col = -1
    used_within: dict[int, int] = {}
    for lam, kind, j in cand:
        if col >= k:
            break
        repeat = 1 if kind == 0 else int(n[j]) - 1
        for _ in range(repeat):
            if col >= k:
                break
            if kind == 0:
                vec = V[:, j][cell] / np.sqrt(n[cell])
            else:
                if members is None:
                    order = np.argsort(cell, kind="stable")
                    starts = np.searchsorted(cell[order], np.arange(C))
                    members = (order, starts)
                order, starts = members
                m = order[starts[j]: starts[j] + int(n[j])]
                t = used_within.get(j, 0) + 1
                used_within[j] = t
                vec = np.zeros(num_nodes)
                vec[m[:t]] = 1.0
                vec[m[t]] = -float(t)
                vec /= np.sqrt(t * (t + 1.0))
            if col >= 0:
                out[:, col] = vec
                vals.append(lam)
            col += 1
    out = _fix_signs(out)
    return torch.from_numpy(out).float(), np.asarray(vals)


def centrality_blocks(num_nodes: int, pieces: list[Piece]) -> torch.Tensor:
    """(num_nodes,) eigenvector centrality of the binary undirected graph with self-loops."""
    if num_nodes == 0:
        return torch.zeros(0)
    cell, C, n, off, selfblock, _ = _quotient(num_nodes, pieces)
    sq = np.sqrt(n)
    P = off * np.outer(sq, sq)
    P[np.diag_indices(C)] = np.where(selfblock, n, 1.0)
    _, V = np.linalg.eigh(P)
    v = np.abs(V[:, -1])[cell] / np.sqrt(n[cell])
    v /= np.linalg.norm(v) or 1.0
    return torch.from_numpy(v).float()


def lpe_dense(edge_index: torch.Tensor, num_nodes: int, k: int = 8) -> tuple[torch.Tensor, np.ndarray]:
    """Reference: the same encoding from a dense Laplacian (small graphs, tests)."""
    A = np.zeros((num_nodes, num_nodes))
    ei = edge_index.numpy()
    A[ei[0], ei[1]] = 1.0
    A[ei[1], ei[0]] = 1.0
    A[np.diag_indices(num_nodes)] = 1.0
    d = A.sum(1)
    L = np.eye(num_nodes) - A / np.sqrt(np.outer(d, d))
    w, V = np.linalg.eigh(L)
    vecs = V[:, 1: k + 1]
    out = np.zeros((num_nodes, k))
    out[:, : vecs.shape[1]] = vecs
    return torch.from_numpy(_fix_signs(out)).float(), w[1: k + 1]


def lpe_sparse(edge_index: torch.Tensor, num_nodes: int, k: int = 8) -> tuple[torch.Tensor, np.ndarray]:
    """The same encoding for graphs that are not unions of blocks (scipy, no dense matrix)."""
    import scipy.sparse as sps
    import scipy.sparse.linalg as spl

    if num_nodes <= 2000:
        return lpe_dense(edge_index, num_nodes, k)
    ei = edge_index.numpy()
    rows = np.concatenate([ei[0], ei[1], np.arange(num_nodes)])
    cols = np.concatenate([ei[1], ei[0], np.arange(num_nodes)])
    A = sps.coo_matrix((np.ones(rows.size), (rows, cols)), shape=(num_nodes, num_nodes)).tocsr()
    A.data[:] = 1.0
    d = np.asarray(A.sum(1)).ravel()
    dinv = sps.diags(1.0 / np.sqrt(d))
    M = dinv @ A @ dinv + sps.identity(num_nodes)  # eigenvalues 2 - lambda, in [0, 2]
    mu, V = spl.eigsh(M, k=min(k + 1, num_nodes - 1), which="LA", tol=1e-8)
    order = np.argsort(-mu)
    vals, V = 2.0 - mu[order], V[:, order]
    out = np.zeros((num_nodes, k))
    out[:, : V.shape[1] - 1] = V[:, 1:]
    return torch.from_numpy(_fix_signs(out)).float(), vals[1:]
