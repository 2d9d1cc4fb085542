"""The streamed NiNo pass (nowcast.stream) against the materialised one (NiNoGNN.predict).

- the published checkpoint on the conformance fixtures: streamed == materialised == the authors'
  predictions, within 1e-5;
- hypothesis-generated architectures (MLPs, CNNs with grouped convolutions, ResNets, DenseNets,
  tied layers), all three graph profiles and random nowcaster configurations (heads, layers,
  final edge update, scaling methods, word positions, centrality), tiles down to one edge;
- transformers (GPT-2 with its fused q/k/v, the naive profile's stacked q/k/v, Llama with GQA);
- per-block subgraph mode against the materialised path on each induced subgraph;
- memory: in a fresh process, the peak resident memory added by a streamed nowcast stays far
  below one (edges x hidden) float32 tensor, while the materialised path's exceeds it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import neugraph
import nowcast
from archs import cnns, densenets, mlps, resnets
from nowcast import NiNoGNN
from nowcast.stream import STATS_ROWS, split_blocks, stream_predict, subgraph_parts
from nowcast_ref import REFERENCE, fm16, load_fixture

ATOL = 1e-5
FIXTURES = {"fm16": REFERENCE / "fixtures" / "ref_fm16_convnet.pt", "gpt2": REFERENCE / "fixtures" / "ref_gpt2_toy.pt"}
CKPT = REFERENCE / "checkpoints" / "nino_no_posw.pt"
needs_ref = pytest.mark.skipif(not CKPT.exists() or not all(p.exists() for p in FIXTURES.values()),
                               reason=f"reference checkpoints/fixtures not found under {REFERENCE} "
                                      "(../shared beside the project)")


def _gpt2_toy():
    transformers = pytest.importorskip("transformers", reason="transformers (dev extra) builds the GPT-2 model")
    cfg = transformers.GPT2Config(n_embd=6, n_layer=2, n_head=2, vocab_size=5, n_positions=3,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval(), torch.randint(0, 5, (1, 3))


def _fixture_graph(name: str):
    fx = load_fixture(FIXTURES[name])
    if name == "fm16":
        model, x = fm16(), torch.randn(1, 1, 28, 28)
        model.load_state_dict(fx["state_dict"])
    else:
        model, x = _gpt2_toy()
        model.load_state_dict(fx["state_dict"], strict=False)
    return fx, neugraph.compile(model, x, profile="nino")


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@needs_ref
@pytest.mark.parametrize("name", ["fm16", "gpt2"])
def test_fixtures_streamed_equals_materialised_and_published(name):
    torch.set_num_threads(1)
    fx, graph = _fixture_graph(name)
    nc = nowcast.load(CKPT)
    graph.node_features = torch.zeros_like(graph.node_features)  # as the fixtures were made
    for k in (1, 10, 40):
        ref = fx["preds"][f"nino_no_posw_k{k}"]
        mat = nc.predict(graph, fx["states"], k)
        for chunk in (7, 1 << 13):
            streamed = stream_predict(nc, graph, fx["states"], k, chunk=chunk)
            assert _max_err(streamed, mat) <= ATOL, (k, chunk)
            assert _max_err(streamed, ref) <= ATOL, (k, chunk)
    torch.manual_seed(0)
    graph.node_features = torch.randn_like(graph.node_features)  # LPE in use
    assert _max_err(stream_predict(nc, graph, fx["states"], 5, chunk=64), nc.predict(graph, fx["states"], 5)) <= ATOL


@needs_ref
def test_stream_option_on_the_model_and_bf16_error():
    """``NiNoGNN(stream=...)`` / ``.stream = {...}`` route predict through the streamed pass; bf16 tiles
    stay close to float32 (the figures are in benchmarks/results/nowcast_cost.json)."""
    torch.set_num_threads(1)
    fx, graph = _fixture_graph("fm16")
    nc = nowcast.load(CKPT)
    mat = nc.predict(graph, fx["states"], 10)
    nc.stream = {"chunk": 300}
    streamed = nc.predict(graph, fx["states"], 10)
    assert _max_err(streamed, mat) <= ATOL
    nc.stream = {"chunk": 300, "dtype": torch.bfloat16}
    bf16 = nc.predict(graph, fx["states"], 10)
    spread = (fx["states"][:, -1] - fx["states"][:, 0]).abs().max().item()
    assert 0 < _max_err(bf16, mat) <= 0.05 * spread  # bf16 has 8 mantissa bits: not equal, but close
    nc.stream = None
    assert torch.equal(nc.predict(graph, fx["states"], 10), mat)
    assert NiNoGNN(hidden=8, stream=True).stream == {} and "stream" not in NiNoGNN(stream=True).config


# ---- hypothesis: random architectures, profiles and nowcaster configurations --------------------
@st.composite
def nowcasters(draw):
    head = draw(st.sampled_from(["mlp", "mlp", "gru", "lstm"]))
    return dict(hidden=draw(st.sampled_from([4, 8, 16])), layers=draw(st.integers(1, 3)), head=head,
                horizon=draw(st.integers(1, 6)), final_edge_update=draw(st.booleans()),
                scaling=draw(st.sampled_from(["std", "std", "std-param", "minmax-param", "none"])),
                exact_unscale=draw(st.booleans()), word_pos=draw(st.booleans()), vocab_size=11,
                centrality=draw(st.booleans()), ctx=draw(st.integers(1, 5)))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=mlps() | cnns() | resnets() | densenets(), profile=st.sampled_from(["nino", "generic"]),
       cfg=nowcasters(), chunk=st.integers(1, 40), seed=st.integers(0, 2 ** 16), data=st.data())
def test_random_graphs_streamed_equals_materialised(case, profile, cfg, chunk, seed, data):
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    graph = neugraph.compile(case.model, case.inputs, profile=profile, centrality=cfg["centrality"])
    gnn = NiNoGNN(max_feat=max(9, graph.max_feat), **cfg).eval()
    states = torch.randn(graph.num_params, 1) + 0.05 * torch.randn(graph.num_params, cfg["ctx"]).cumsum(1)
    k = data.draw(st.integers(1, cfg["horizon"]))
    mat = gnn.predict(graph, states, k)
    streamed = stream_predict(gnn, graph, states, k, chunk=chunk)
    assert _max_err(streamed, mat) <= ATOL * max(1.0, mat.abs().max().item())


# ---- transformers ---------------------------------------------------------------------------------
def _transformers():
    return pytest.importorskip("transformers", reason="transformers (dev extra) builds the models")


@pytest.mark.parametrize("family,profile", [("gpt2", "nino"), ("gpt2", "naive"), ("gpt2", "generic"),
                                            ("llama", "nino"), ("llama", "naive")])
def test_transformers_streamed_equals_materialised(family, profile):
    tf = _transformers()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if family == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=8, n_layer=2, n_head=2, vocab_size=9, n_positions=6,
                                                 bos_token_id=0, eos_token_id=0))
    else:  # GQA keeps typed q/k/v edges in every profile; with as many k/v heads as queries, naive stacks them
        model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=16, num_attention_heads=4,
                                                   num_key_value_heads=4 if profile == "naive" else 2,
                                                   head_dim=4, intermediate_size=12, num_hidden_layers=2,
                                                   vocab_size=9, max_position_embeddings=8))
    graph = neugraph.compile(model.eval(), torch.randint(0, 9, (1, 5)), profile=profile)
    if profile == "naive":
        assert any(b.stack for b in graph.blocks)  # stacked q/k/v members are streamed too
    gnn = NiNoGNN(hidden=16, word_pos=True, vocab_size=9).eval()
    states = torch.randn(graph.num_params, 1) + 0.05 * torch.randn(graph.num_params, 5).cumsum(1)
    mat = gnn.predict(graph, states, 3)
    for chunk in (5, 1 << 13):
        assert _max_err(stream_predict(gnn, graph, states, 3, chunk=chunk), mat) <= ATOL


# ---- subgraph mode --------------------------------------------------------------------------------
def _induced(graph, block_ids):
    """The materialised reference for one group: a NeuralGraph holding only the group's blocks and
    auxiliary edges, nodes renumbered, the full parameter vector (so scaling stays per tensor)."""
    blocks, aux, nodes = subgraph_parts(graph, block_ids)
    local = torch.full((graph.num_nodes,), -1, dtype=torch.long)
    local[nodes] = torch.arange(nodes.numel())
    blocks = [dataclasses.replace(b, first=local[b.first], second=local[b.second],
                                  stack=[dataclasses.replace(m, first=local[m.first], second=local[m.second])
                                         for m in b.stack]) for b in blocks]
    aux = [dataclasses.replace(a, src=local[a.src], dst=local[a.dst]) for a in aux]
    sub = dataclasses.replace(graph, num_nodes=nodes.numel(), blocks=blocks, aux=aux,
                              node_features=graph.node_features[nodes], node_labels=graph.node_labels[nodes],
                              node_kind=[graph.node_kind[i] for i in nodes.tolist()],
                              node_space=graph.node_space[nodes],
                              word_pos=None if graph.word_pos is None else graph.word_pos[nodes],
                              _edge_index=None, _edge_type=None)
    covered = torch.zeros(graph.num_params, dtype=torch.bool)
    for b in blocks:
        for m in b.members():
            m.param_view(covered[:, None]).fill_(True)
    return sub, covered


@pytest.mark.parametrize("family", ["fm16", "gpt2"])
def test_subgraph_mode_equals_materialised_per_subgraph(family):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if family == "fm16":
        model, x = fm16(), torch.randn(1, 1, 28, 28)
    else:
        model, x = _gpt2_toy()
    graph = neugraph.compile(model, x, profile="nino")
    groups = split_blocks(graph)
    assert len(groups) > 2 and sorted(i for g in groups for i in g) == list(range(len(graph.blocks)))
    gnn = NiNoGNN(hidden=16, word_pos=family == "gpt2", vocab_size=5).eval()
    states = torch.randn(graph.num_params, 1) + 0.05 * torch.randn(graph.num_params, 5).cumsum(1)
    streamed = stream_predict(gnn, graph, states, 4, chunk=16, subgraphs="auto")
    seen = torch.zeros(graph.num_params, dtype=torch.bool)
    for g in groups:
        sub, covered = _induced(graph, g)
        assert sub.num_nodes < graph.num_nodes
        mat = gnn.predict(sub, states, 4)
        assert _max_err(streamed[covered], mat[covered]) <= ATOL
        seen |= covered
    assert seen.all()
    whole = stream_predict(gnn, graph, states, 4, chunk=16, subgraphs=[list(range(len(graph.blocks)))])
    assert _max_err(whole, gnn.predict(graph, states, 4)) <= ATOL  # one group is the whole graph
    assert _max_err(whole, streamed) > ATOL  # cutting the graph changes the prediction


def test_bad_arguments_are_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    graph = neugraph.compile(model, torch.randn(2, 3), profile="nino")
    gnn = NiNoGNN(hidden=8)
    states = torch.randn(graph.num_params, 5)
    with pytest.raises(ValueError, match="chunk"):
        stream_predict(gnn, graph, states, 1, chunk=0)
    with pytest.raises(ValueError, match="dtype"):
        stream_predict(gnn, graph, states, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="cover"):
        stream_predict(gnn, graph, states, 1, subgraphs=[[0]])
    with pytest.raises(ValueError, match="horizon"):
        stream_predict(gnn, graph, states, 41)
    with pytest.raises(ValueError, match="feature slots"):
        stream_predict(NiNoGNN(hidden=8, max_feat=1), neugraph.compile(
            nn.Sequential(nn.Conv2d(1, 2, 3)), torch.randn(1, 1, 5, 5), profile="nino"), torch.randn(20, 5), 1)


# ---- memory: no edges x hidden tensor ------------------------------------------------------------
PROBE = textwrap.dedent("""
    import json, re, sys, torch, torch.nn as nn
    torch.set_num_threads(1)
    import neugraph
    from nowcast import NiNoGNN
    from nowcast.stream import stream_predict

    def kib(field):
        return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    def peak_added(fn):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the resident high-water mark
        base = kib("VmRSS")
        fn()
        return (kib("VmHWM") - base) * 1024

    def mlp(w):
        return nn.Sequential(nn.Linear(w, w), nn.Tanh(), nn.Linear(w, w))

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        print(json.dumps({"skip": f"cannot reset the peak-RSS counter: {e}"}))
        sys.exit(0)
    torch.manual_seed(0)
    w, hidden, chunk = 384, 64, 512
    gnn = NiNoGNN(hidden=hidden).eval()
    tiny = neugraph.compile(mlp(8), torch.randn(2, 8), profile="nino")
    for path in (gnn.predict, lambda *a: stream_predict(gnn, *a, chunk=chunk)):  # one-time allocations
        path(tiny, torch.randn(tiny.num_params, 5), 3)  # (thread pools, BLAS buffers) are not the pass's
    graph = neugraph.compile(mlp(w), torch.randn(2, w), profile="nino")
    _ = graph.edge_index  # the materialised path's indices are cached: not counted against it
    states = torch.randn(graph.num_params, 5)
    out = dict(edges=graph.num_edges, nodes=graph.num_nodes, params=graph.num_params, hidden=hidden,
               chunk=chunk)
    out["stream"] = peak_added(lambda: stream_predict(gnn, graph, states, 3, chunk=chunk))
    if sys.argv[1] == "both":
        out["materialised"] = peak_added(lambda: gnn.predict(graph, states, 3))
    print(json.dumps(out))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (peak RSS reset)")
def test_streamed_pass_never_holds_an_edges_by_hidden_tensor(tmp_path):
    """Peak resident memory added by one nowcast, measured in a fresh process (VmHWM after resetting
    it). The bound for the streamed pass is what it holds by construction: the (num_params,) result,
    a few (nodes, hidden) node tensors per layer, a few (chunk, hidden) tile tensors and one
    float64 row block of the scaling statistics, plus 8 MiB of allocator slack. One (edges, hidden)
    float32 tensor is several times larger than that bound, and the materialised path exceeds it."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, str(script), "both"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    r = json.loads(run.stdout.strip().splitlines()[-1])
    if "skip" in r:
        pytest.skip(r["skip"])
    e_by_d = r["edges"] * r["hidden"] * 4
    stats = 2 * STATS_ROWS * 5 * 8  # one float64 row block of the scaling statistics and its deviations
    bound = (4 * r["params"] + 16 * r["nodes"] * r["hidden"] * 4 + 16 * r["chunk"] * r["hidden"] * 4
             + stats + (8 << 20))
    assert e_by_d > 3 * bound  # the test can tell the two apart
    assert r["stream"] <= bound, (r, bound)
    assert r["materialised"] >= e_by_d, r
