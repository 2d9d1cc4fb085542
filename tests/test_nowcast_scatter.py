"""Mean aggregation: native torch against a dense reference and against torch_scatter."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import neugraph
from nowcast import NiNoGNN, scatter
from nowcast.scatter import has_torch_scatter, scatter_mean

no_torch_scatter = pytest.mark.skipif(
    not has_torch_scatter(),
    reason="torch_scatter is not installed (the optional 'scatter' extra); the native backend is checked "
           "against a dense reference instead")


def _case(seed=0, E=300, V=40, D=16):
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, V - 3, (E,), generator=g)  # the last 3 nodes get no messages
    return torch.randn(E, D, generator=g), index, V


def test_native_is_the_mean():
    src, index, V = _case()
    out = scatter_mean(src, index, V, backend="native")
    for v in range(V):
        rows = src[index == v]
        want = rows.mean(0) if len(rows) else torch.zeros(src.shape[1])
        torch.testing.assert_close(out[v], want)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown scatter backend"):
        scatter.set_backend("cuda-magic")


@no_torch_scatter
def test_backends_agree():
    src, index, V = _case(1)
    torch.testing.assert_close(scatter_mean(src, index, V, backend="native"),
                               scatter_mean(src, index, V, backend="torch_scatter"), rtol=1e-6, atol=1e-6)


@no_torch_scatter
def test_gnn_predictions_agree_across_backends():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4))
    graph = neugraph.compile(model, torch.randn(2, 6), profile="nino")
    states = torch.randn(graph.num_params, 5)
    gnn = NiNoGNN(hidden=32).eval()
    before = scatter.get_backend()
    try:
        scatter.set_backend("native")
        a = gnn.predict(graph, states, 7)
        scatter.set_backend("torch_scatter")
        b = gnn.predict(graph, states, 7)
    finally:
        scatter.set_backend(before)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
