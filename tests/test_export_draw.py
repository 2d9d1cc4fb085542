"""neugraph.export (networkx / PyG) and neugraph.draw (PNG pictures) on small compiled models."""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import neugraph
from neugraph.export import has_parallel_edges, to_networkx, to_pyg

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ScaledLinear(nn.Module):
    """A scalar parameter: its edge is a loop on its own auxiliary node, beside that node's self loop."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


class ResidualConv(nn.Module):
    """A residual conv: its weights join neurons of one space (same-column edges in the drawing)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, c, 3, padding=1)
        self.b = nn.Conv2d(c, c, 3, padding=1)
        self.head = nn.Linear(c, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a(x))
        x = x + self.b(x)
        return self.head(x.mean((2, 3)))


def _compile(module: nn.Module, x: torch.Tensor, profile: str = "nino"):
    return module, neugraph.compile(module, x, profile=profile)


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return _compile(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(2, 4))


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
    return _compile(net, torch.randn(2, 3, 8, 8), profile="generic")


@pytest.fixture(scope="module")
def scaled():
    torch.manual_seed(0)
    return _compile(ScaledLinear(), torch.randn(2, 4))


@pytest.fixture(scope="module")
def residual():
    torch.manual_seed(0)
    return _compile(ResidualConv(), torch.randn(2, 3, 6, 6))


GRAPHS = ["mlp", "cnn", "scaled", "residual"]


def _edge_triples(graph) -> list[tuple[int, int, int]]:
    src, dst = graph.edge_index.tolist()
    return sorted(zip(src, dst, graph.edge_type.tolist()))


# ---- to_networkx ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", GRAPHS)
def test_to_networkx_structure(name, request):
    pytest.importorskip("networkx", reason="to_networkx needs networkx (the draw extra)")
    _, g = request.getfixturevalue(name)
    G = to_networkx(g)
    assert G.is_directed()
    assert G.is_multigraph() == has_parallel_edges(g)
    assert G.number_of_nodes() == g.num_nodes
    assert G.number_of_edges() == g.num_edges
    assert sorted((u, v, d["type"]) for u, v, d in G.edges(data=True)) == _edge_triples(g)
    # ``index`` is the edge's column of edge_index, and no edge carries weights without states
    src, dst = g.edge_index.tolist()
    types = g.edge_type.tolist()
    seen = set()
    for u, v, d in G.edges(data=True):
        e = d["index"]
        assert (src[e], dst[e], types[e]) == (u, v, d["type"])
        assert "w" not in d
        seen.add(e)
    assert seen == set(range(g.num_edges))
    for v, d in G.nodes(data=True):
        assert d["kind"] == g.node_kind[v]
        assert d["label"] == int(g.node_labels[v])
        assert d["space"] == int(g.node_space[v])
        assert d["x"] == pytest.approx(g.node_features[v].tolist())
    assert G.graph["profile"] == g.profile


def test_simple_graphs_give_digraph_and_parallel_edges_a_multidigraph(mlp, cnn, scaled, residual):
    pytest.importorskip("networkx", reason="to_networkx needs networkx (the draw extra)")
    assert not to_networkx(mlp[1]).is_multigraph()
    assert not to_networkx(cnn[1]).is_multigraph()
    # the scalar's parameter loop and the self loop join (aux, aux) twice
    G = to_networkx(scaled[1])
    assert G.is_multigraph()
    aux = next(b.first.item() for b in scaled[1].blocks if b.name == "scale")
    assert sorted(d["type"] for _, v, d in G.edges(aux, data=True) if v == aux) == sorted(
        [neugraph.NINO_TYPES["self"], next(b.edge_type for b in scaled[1].blocks if b.name == "scale")])
    for u, v, k, d in G.edges(keys=True, data=True):  # keys are the edge positions
        assert k == d["index"]
    # a residual layer's weight from a neuron to itself parallels that neuron's self loop
    assert to_networkx(residual[1]).is_multigraph()


@pytest.mark.parametrize("name", GRAPHS)
@pytest.mark.parametrize("T", [None, 3])
def test_to_networkx_edge_weights_match_edge_features(name, T, request):
    pytest.importorskip("networkx", reason="to_networkx needs networkx (the draw extra)")
    module, g = request.getfixturevalue(name)
    flat = g.flat_params(module)
    states = flat if T is None else torch.stack([flat * (t + 1) for t in range(T)], 1)
    G = to_networkx(g, states)
    feats = g.edge_features(states)
    width = g.max_feat * (1 if T is None else T)
    assert feats.shape == (g.num_edges, width)
    rows = torch.zeros_like(feats)
    for _, _, d in G.edges(data=True):
        assert len(d["w"]) == width
        rows[d["index"]] = torch.tensor(d["w"], dtype=feats.dtype)
    torch.testing.assert_close(rows, feats)
    # the exported weights map back onto the module's parameters exactly
    back = g.to_params(rows.reshape(g.num_edges, g.max_feat, -1))
    torch.testing.assert_close(back[:, 0], flat)


def test_to_networkx_weights_of_known_edges(mlp):
    """Spot check independent of edge_features: the edge (input j -> hidden i) carries W[i, j]."""
    pytest.importorskip("networkx", reason="to_networkx needs networkx (the draw extra)")
    module, g = mlp
    G = to_networkx(g, g.flat_params(module))
    w0 = g.blocks[0]
    assert w0.name == "0.weight" and not w0.src_is_first
    W = module[0].weight.detach()
    for i, hidden in enumerate(w0.first.tolist()):
        for j, inp in enumerate(w0.second.tolist()):
            d = G.edges[inp, hidden]
            assert d["type"] == neugraph.NINO_TYPES["dense"]
            assert d["w"][0] == pytest.approx(W[i, j].item())
            assert d["w"][1:] == [0.0] * (g.max_feat - 1)  # zero-padded slots
    bias_node = g.blocks[1].first.item()
    assert G.nodes[bias_node]["kind"] == "aux"
    for i, hidden in enumerate(g.blocks[1].second.tolist()):
        assert G.edges[bias_node, hidden]["w"][0] == pytest.approx(module[0].bias[i].item())
    assert G.edges[0, 0]["type"] == neugraph.NINO_TYPES["self"] and G.edges[0, 0]["w"][0] == 2.0


def test_to_networkx_rejects_wrong_states(mlp):
    pytest.importorskip("networkx", reason="to_networkx needs networkx (the draw extra)")
    _, g = mlp
    with pytest.raises(ValueError, match="num_params"):
        to_networkx(g, torch.zeros(g.num_params + 1))


# ---- to_pyg --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_to_pyg(name, request):
    pytest.importorskip("torch_geometric", reason="to_pyg needs torch_geometric (the pyg extra)")
    module, g = request.getfixturevalue(name)
    data = to_pyg(g)
    assert data.num_nodes == g.num_nodes
    assert torch.equal(data.x, g.node_features)
    assert torch.equal(data.edge_index, g.edge_index)
    assert torch.equal(data.edge_type, g.edge_type)
    assert data.edge_attr is None
    states = torch.stack([g.flat_params(module), -g.flat_params(module)], 1)
    data = to_pyg(g, states)
    torch.testing.assert_close(data.edge_attr, g.edge_features(states))
    assert data.edge_attr.shape == (g.num_edges, 2 * g.max_feat)
    data.validate(raise_on_error=True)


# ---- missing optional dependencies ---------------------------------------------------------------
def test_missing_optional_dependencies_name_the_extra(mlp, tmp_path, monkeypatch):
    from neugraph import draw

    _, g = mlp
    for mod in ("networkx", "torch_geometric", "torch_geometric.data", "matplotlib",
                "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)  # makes ``import mod`` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "neural-nowcasting\[draw\]"'):
        to_networkx(g)
    with pytest.raises(ImportError, match=r'pip install "neural-nowcasting\[pyg\]"'):
        to_pyg(g)
    with pytest.raises(ImportError, match=r'pip install "neural-nowcasting\[draw\]"'):
        draw.draw_adjacency(g, tmp_path / "a.png")
    with pytest.raises(ImportError, match=r'pip install "neural-nowcasting\[draw\]"'):
        draw.draw_graph(g, tmp_path / "g.png")
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "g.png").exists()


# ---- drawings ------------------------------------------------------------------------------------
def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 2000


@pytest.mark.parametrize("name", GRAPHS)
def test_draw_adjacency_writes_png(name, request, tmp_path):
    pytest.importorskip("matplotlib", reason="drawing needs matplotlib (the draw extra)")
    from neugraph.draw import draw_adjacency

    _, g = request.getfixturevalue(name)
    out = tmp_path / f"{name}_adj.png"
    assert draw_adjacency(g, out) == out
    _assert_png(out)


@pytest.mark.parametrize("name", GRAPHS)
def test_draw_graph_writes_png(name, request, tmp_path):
    pytest.importorskip("matplotlib", reason="drawing needs matplotlib (the draw extra)")
    pytest.importorskip("networkx", reason="the layered layout needs networkx (the draw extra)")
    from neugraph.draw import draw_graph

    _, g = request.getfixturevalue(name)
    out = str(tmp_path / f"{name}_graph.png")  # a str path works too
    assert draw_graph(g, out) == out
    _assert_png(tmp_path / f"{name}_graph.png")


def test_drawing_does_not_touch_pyplot(mlp, tmp_path):
    pytest.importorskip("matplotlib", reason="drawing needs matplotlib (the draw extra)")
    pytest.importorskip("networkx", reason="the layered layout needs networkx (the draw extra)")
    import matplotlib

    from neugraph.draw import draw_adjacency, draw_graph

    backend = matplotlib.get_backend()
    draw_adjacency(mlp[1], tmp_path / "a.png")
    draw_graph(mlp[1], tmp_path / "g.png")
    assert matplotlib.get_backend() == backend
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


def test_draw_refuses_graphs_above_max_nodes(mlp, tmp_path):
    pytest.importorskip("matplotlib", reason="drawing needs matplotlib (the draw extra)")
    from neugraph.draw import draw_adjacency, draw_graph

    _, g = mlp
    with pytest.raises(ValueError, match=rf"{g.num_nodes} nodes.*max_nodes={g.num_nodes - 1}"):
        draw_adjacency(g, tmp_path / "a.png", max_nodes=g.num_nodes - 1)
    with pytest.raises(ValueError, match="max_nodes=5"):
        draw_graph(g, tmp_path / "g.png", max_nodes=5)
    assert not list(tmp_path.iterdir())
    _assert_png(draw_adjacency(g, tmp_path / "ok.png", max_nodes=g.num_nodes))  # the limit is inclusive


def test_node_layers(mlp, residual):
    pytest.importorskip("networkx", reason="the layered layout needs networkx (the draw extra)")
    from neugraph.draw import node_layers

    _, g = mlp
    layers = node_layers(g)
    w0, b0, w1, b1 = g.blocks
    assert set(layers[w0.second.numpy()]) == {0}  # inputs
    assert set(layers[w0.first.numpy()]) == {1}  # hidden
    assert set(layers[w1.first.numpy()]) == {2}  # outputs
    assert set(layers[[b0.first.item(), b1.first.item()]]) == {-1}  # auxiliary nodes
    # residual: the conv b weights loop inside one space, which stays one layer
    _, g = residual
    layers = node_layers(g)
    blocks = {b.name: b for b in g.blocks}
    assert set(layers[blocks["b.weight"].first.numpy()]) == {1}
    assert set(layers[blocks["head.weight"].first.numpy()]) == {2}
