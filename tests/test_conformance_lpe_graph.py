"""The nino profile against the published graph, the block LPE against a dense reference, and the
graph tensors' inverse map."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import neugraph
from neugraph import examples
from neugraph.lpe import centrality_blocks, lpe_blocks, lpe_dense

REF = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "fixtures"
needs_ref = pytest.mark.skipif(not (REF / "ref_fm16_convnet.pt").exists(),
                               reason=f"reference fixtures not found at {REF} (../shared beside the project)")


@pytest.fixture(scope="module")
def fm16():
    fx = torch.load(REF / "ref_fm16_convnet.pt", map_location="cpu", weights_only=True)
    model = examples.FM16()
    model.load_state_dict(fx["state_dict"])
    return model, fx


@needs_ref
def test_fm16_matches_the_published_graph(fm16):
    model, fx = fm16
    meta = fx["meta"]
    g = neugraph.compile(model, torch.randn(2, 1, 28, 28), profile="nino")
    assert g.param_names == meta["param_names"]
    assert g.num_params == meta["num_params"]
    assert g.num_nodes == meta["num_nodes"] == 95
    assert g.num_edges == meta["num_edges"] == 2057
    assert g.summary()["edge_type_counts"] == meta["edge_type_counts"]
    assert g.edge_features(fx["states"]).shape == (2057, 9 * 5)


@needs_ref
def test_fm16_published_wl_hash(fm16):
    """The fixture's WL hash (networkx, directed, edge types as labels) equals ours: same structure."""
    nx = pytest.importorskip("networkx", reason="networkx is in the dev extra")
    model, fx = fm16
    g = neugraph.compile(model, torch.randn(2, 1, 28, 28), profile="nino")
    G = nx.DiGraph()
    G.add_nodes_from(range(g.num_nodes))
    for (s, t), ty in zip(g.edge_index.t().tolist(), g.edge_type.tolist()):
        G.add_edge(s, t, type=str(ty))
    assert nx.weisfeiler_lehman_graph_hash(G, edge_attr="type", iterations=4) == fx["meta"]["wl_hash"]


@needs_ref
def test_nino_edge_feature_layout(fm16):
    model, fx = fm16
    g = neugraph.compile(model, torch.randn(2, 1, 28, 28), profile="nino")
    states = fx["states"]
    ef = g.edge_features(states).view(g.num_edges, 9, 5)
    # first block is fc.0.weight (16, 1, 3, 3): edge o carries kernel W[o, 0] row-major in slots 0..8
    w = states[: 16 * 9].view(16, 1, 3, 3, 5)
    assert torch.equal(ef[3, :, 2], w[3, 0, :, :, 2].reshape(9))
    ei = g.edge_index
    assert ei[0, 3] == g.blocks[0].second[0] and ei[1, 3] == g.blocks[0].first[3]  # input node -> out 3
    # bias edges use slot 0 only; self-loops carry 2 in slot 0
    b = g.blocks[1]
    e0 = g.blocks[0].num_edges
    assert torch.equal(ef[e0: e0 + 16, 0], states[b.offset: b.offset + 16])
    assert (ef[e0: e0 + 16, 1:] == 0).all()
    loops = g.edge_type == neugraph.NINO_TYPES["self"]
    assert (ef[loops, 0] == 2).all() and (ef[loops, 1:] == 0).all()
    assert torch.equal(g.to_params(ef), states)


def _random_models():
    torch.manual_seed(0)
    yield nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), torch.randn(2, 5)
    for name in ("fm16", "resnet", "densenet", "mobilenet"):
        m, x, _ = examples.get(name)
        yield m, x


@pytest.mark.parametrize("case", list(range(5)))
def test_block_lpe_equals_dense_spectrum(case):
    m, x = list(_random_models())[case]
    g = neugraph.compile(m, x, profile="nino", lpe=8)
    vals = np.array(g.info["lpe_eigenvalues"])  # blocks plus auxiliary (residual) edges
    feats = g.node_features
    _, dense_vals = lpe_dense(g.edge_index, g.num_nodes, 8)
    np.testing.assert_allclose(vals, dense_vals, atol=1e-9)
    # every column is an eigenvector of the normalised Laplacian with its eigenvalue
    A = np.zeros((g.num_nodes, g.num_nodes))
    ei = g.edge_index.numpy()
    A[ei[0], ei[1]] = A[ei[1], ei[0]] = 1
    A[np.diag_indices(g.num_nodes)] = 1
    d = A.sum(1)
    L = np.eye(g.num_nodes) - A / np.sqrt(np.outer(d, d))
    F = feats.double().numpy()
    np.testing.assert_allclose(L @ F, F * vals[None, :], atol=1e-5)
    np.testing.assert_allclose(F.T @ F, np.eye(8), atol=1e-5)
    pieces = [p for b in g.blocks for p in b.bipartite()]
    if not any(a.edge_type != neugraph.NINO_TYPES["self"] for a in g.aux):  # no residual copies
        assert torch.equal(lpe_blocks(g.num_nodes, pieces, 8)[0], feats)


def test_centrality_matches_power_iteration():
    m, x, _ = examples.get("resnet")
    g = neugraph.compile(m, x, profile="nino", lpe=2, centrality=True)
    c = g.node_features[:, 2].double().numpy()
    A = np.zeros((g.num_nodes, g.num_nodes))
    ei = g.edge_index.numpy()
    A[ei[0], ei[1]] = A[ei[1], ei[0]] = 1
    A[np.diag_indices(g.num_nodes)] = 1
    v = np.ones(g.num_nodes)
    for _ in range(2000):
        v = A @ v
        v /= np.linalg.norm(v)
    np.testing.assert_allclose(c, v, atol=1e-5)
    assert torch.allclose(centrality_blocks(g.num_nodes, [p for b in g.blocks for p in b.bipartite()]).double(),
                          torch.from_numpy(v), atol=1e-5)


@pytest.mark.parametrize("profile", ["nino", "generic"])
def test_round_trip_with_time_axis_and_edge_index_per_block(profile):
    m, x, _ = examples.get("densenet")
    g = neugraph.compile(m, x, profile=profile)
    states = torch.randn(g.num_params, 5)
    ef = g.edge_features(states)
    assert ef.shape == (g.num_edges, g.max_feat * 5)
    assert torch.equal(g.to_params(ef.view(g.num_edges, g.max_feat, 5)), states)
    flat = g.flat_params(m)
    assert torch.equal(g.to_params(g.edge_features(flat)), flat)
    # edge_index is the concatenation of the blocks' (source, target) pairs, then auxiliary edges
    e = 0
    for b in g.blocks:
        f, s = b.pairs()
        src, dst = (f, s) if b.src_is_first else (s, f)
        assert torch.equal(g.edge_index[0, e: e + b.num_edges], src)
        assert torch.equal(g.edge_index[1, e: e + b.num_edges], dst)
        e += b.num_edges
    assert g.edge_index.shape == (2, g.num_edges) and g.edge_index.dtype == torch.long
    assert g.edge_type.shape == (g.num_edges,)
    with pytest.raises(ValueError, match="max_feat"):
        g.to_params(torch.zeros(g.num_edges, g.max_feat + 1))


def test_node_features_are_a_plain_attribute():
    m, x, _ = examples.get("mlp")
    g = neugraph.compile(m, x, lpe=4)
    assert g.node_features.shape == (g.num_nodes, 4)
    g.node_features = torch.zeros(g.num_nodes, 4)
    assert (g.node_features == 0).all()
    gen = neugraph.compile(m, x, profile="generic", lpe=4)
    pinned = torch.tensor([k == "pinned" for k in gen.node_kind])
    assert torch.equal(gen.node_features[:, 4].bool(), pinned)
    assert (gen.node_labels[pinned] > 0).all() and (gen.node_labels[~pinned] == 0).all()
