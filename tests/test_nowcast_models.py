"""NiNo GNN, WNN+, heads, save/load, frozen parameters and input checks, on small graphs."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import neugraph
import nowcast
from nowcast import Linefit, LinefitPlus, NiNoGNN, WNNPlus
from nowcast.heads import MLPHead, RecurrentHead


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 8), nn.LayerNorm(8),
                          nn.ReLU(), nn.Linear(8, 3))
    graph = neugraph.compile(model, torch.randn(1, 2, 6, 6), profile="nino")
    traj = torch.randn(graph.num_params, 1) + 0.01 * torch.randn(graph.num_params, 5).cumsum(1)
    return model, graph, traj


def _nowcasters():
    torch.manual_seed(1)
    return [NiNoGNN(hidden=16), NiNoGNN(hidden=16, head="gru", horizon=8), NiNoGNN(hidden=16, head="lstm", horizon=8),
            WNNPlus(hidden=16), Linefit(), LinefitPlus()]


@pytest.mark.parametrize("idx", range(6))
def test_predict_shapes_and_save_load_round_trip(small, tmp_path, idx):
    _, graph, states = small
    nc = _nowcasters()[idx].eval()
    pred = nc.predict(graph, states, 3)
    assert pred.shape == (graph.num_params,) and pred.dtype == torch.float32 and torch.isfinite(pred).all()
    target = tmp_path / ("dir" if idx % 2 else "model.safetensors")
    written = nowcast.save(nc, target)
    for where in (target, written):  # the directory, or the weights file save() returned
        back = nowcast.load(where)
        assert type(back) is type(nc) and back.config == nc.config
        assert torch.equal(back.predict(graph, states, 3), pred)


def test_heads_one_horizon_equals_all_horizons():
    torch.manual_seed(2)
    e = torch.randn(11, 16)
    for head in (MLPHead(16, 9, 8), RecurrentHead(16, 9, 8, "gru"), RecurrentHead(16, 9, 8, "lstm")):
        full = head.all(e)
        assert full.shape == (11, 9, 8)
        for k in (1, 5, 8):
            torch.testing.assert_close(head(e, k, 4), full[:, :4, k - 1], rtol=1e-5, atol=1e-6)


def test_fewer_slots_equal_zero_padding():
    """A graph with 1 feature slot gives the same prediction as the same graph padded to 9 slots."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    graph = neugraph.compile(model, torch.randn(2, 5), profile="generic")
    graph.node_features = graph.node_features[:, :8]
    assert graph.max_feat == 1
    padded = dataclasses.replace(graph, max_feat=9)
    states = torch.randn(graph.num_params, 5)
    gnn = NiNoGNN(hidden=16)
    torch.testing.assert_close(gnn.predict(graph, states, 2), gnn.predict(padded, states, 2), rtol=1e-5, atol=1e-6)


def test_frozen_parameters_stay_put():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    model[0].weight.requires_grad_(False)
    graph = neugraph.compile(model, torch.randn(2, 4), profile="nino")
    frozen = [b for b in graph.blocks if not b.trainable]
    assert [b.name for b in frozen] == ["0.weight"]
    states = torch.randn(graph.num_params, 5)
    b = frozen[0]
    states[b.offset: b.offset + b.numel] = states[b.offset: b.offset + b.numel, :1]  # frozen: constant
    for nc in _nowcasters():
        pred = nc.predict(graph, states, 5)
        assert torch.equal(pred[b.offset: b.offset + b.numel], states[b.offset: b.offset + b.numel, -1])
        assert not torch.equal(pred, states[:, -1])


def test_embed(small):
    _, graph, states = small
    assert NiNoGNN(hidden=16).embed(graph, states).shape == (16,)
    assert WNNPlus(hidden=16).embed(graph, states).shape == (16,)


def test_word_position_and_centrality_inputs(small):
    model, _, states = small
    graph = neugraph.compile(model, torch.randn(1, 2, 6, 6), profile="nino", centrality=True)
    nc = NiNoGNN(hidden=16, word_pos=True, vocab_size=10, centrality=True)
    assert torch.isfinite(nc.predict(graph, states, 1)).all()
    plain = neugraph.compile(model, torch.randn(1, 2, 6, 6), profile="nino")
    with pytest.raises(ValueError, match="centrality=True"):
        nc.predict(plain, states, 1)


def test_bad_inputs_give_clear_errors(small):
    _, graph, states = small
    gnn = NiNoGNN(hidden=16)
    with pytest.raises(ValueError, match=r"ctx=5"):
        gnn.predict(graph, states[:, :4], 1)
    with pytest.raises(ValueError, match="rows"):
        gnn.predict(graph, states[:-1], 1)
    with pytest.raises(ValueError, match=r"\(num_params, ctx=5\)"):
        gnn.predict(graph, states[:, 0], 1)
    assert torch.equal(gnn.predict(graph, states, np.int32(3)), gnn.predict(graph, states, 3))
    for k in (0, 41, 2.5, 3.0, "3", True):
        with pytest.raises(ValueError, match=r"1\.\.40"):
            gnn.predict(graph, states, k)
    with pytest.raises(ValueError, match="needs a graph"):
        gnn.predict(None, states, 1)
    with pytest.raises(ValueError, match="needs a graph"):
        WNNPlus(hidden=16).predict(None, states, 1)
    short = dataclasses.replace(graph, node_features=graph.node_features[:, :4])
    with pytest.raises(ValueError, match="lpe=8"):
        gnn.predict(short, states, 1)
    with pytest.raises(ValueError, match="feature slots"):
        NiNoGNN(hidden=16, max_feat=4).predict(graph, states, 1)
    with pytest.raises(ValueError, match="edge type 13"):
        NiNoGNN(hidden=16, edge_types=5).predict(graph, states, 1)
    with pytest.raises(ValueError, match="unknown head"):
        NiNoGNN(head="transformer")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        nowcast.load(tmp_path / "nope.pt")
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"x")
    with pytest.raises(nowcast.CheckpointError, match="unknown checkpoint format"):
        nowcast.load(odd)
    notdict = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], notdict)
    with pytest.raises(nowcast.CheckpointError, match="state_dict"):
        nowcast.load(notdict)
    wrong = tmp_path / "wrong.pt"
    torch.save({"state_dict": {"layer_embed.weight": torch.zeros(15, 8)}, "model_args": {}}, wrong)
    with pytest.raises(nowcast.CheckpointError, match="missing weight"):
        nowcast.load(wrong)
    unsupported = tmp_path / "towers.pt"
    torch.save({"state_dict": {}, "model_args": {"towers": 4}}, unsupported)
    with pytest.raises(nowcast.CheckpointError, match="towers"):
        nowcast.load(unsupported)
    saved = tmp_path / "saved"
    nowcast.save(NiNoGNN(hidden=16), saved)
    (saved / "config.json").unlink()
    with pytest.raises(nowcast.CheckpointError, match="config.json is missing"):
        nowcast.load(saved)
    nowcast.save(NiNoGNN(hidden=16), saved)
    cfg = json.loads((saved / "config.json").read_text())
    cfg["config"]["hidden"] = 32
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(nowcast.CheckpointError, match="shape mismatch"):
        nowcast.load(saved)
    cfg["format"] = "something-else"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(nowcast.CheckpointError, match="not a neural-nowcasting config"):
        nowcast.load(saved)
