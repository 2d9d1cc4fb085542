"""The ``naive`` profile (q, k, v stacked on one edge, no head nodes) and the word-position feature.

The naive graph is the earlier neural-graph work's layout that the paper ablates: it is equivariant
to permutations that move a head's q, k and v neurons together, and *not* to the independent q/k
permutation the model also has, which the nino graph respects. Both facts are checked here.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import neugraph
from neugraph.graph import NINO_TYPES as T
from neugraph.ir import Permutation
from neugraph.wl import graph_hash

transformers = pytest.importorskip("transformers", reason="transformers (dev extra) builds GPT-2 and Llama")

E, H, L, VOCAB = 8, 2, 2, 7


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=E, n_layer=L, n_head=H, vocab_size=VOCAB, n_positions=6,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for blk in model.transformer.h:  # the key bias cannot change the function (softmax is shift-
            blk.attn.c_attn.bias[E: 2 * E] = 0  # invariant); the published layout hangs it on stream nodes
    x = torch.tensor([[0, 1, 2, 3, 4, 5]])
    ir = neugraph.trace(model, (x,))
    return model, x, ir


def _degree(g):
    return torch.bincount(g.edge_index.flatten(), minlength=g.num_nodes)


def test_naive_gpt2_layout(gpt2):
    model, x, ir = gpt2
    nino, naive = neugraph.compile(ir, profile="nino"), neugraph.compile(ir, profile="naive")
    cn, cv = nino.summary()["edge_type_counts"], naive.summary()["edge_type_counts"]
    assert T["head"] not in cv and T["query"] not in cv and T["key"] not in cv and T["value"] not in cv
    assert cv[T["qkv"]] == L * E * E  # one 3-feature edge per (stream, value neuron) pair
    assert naive.max_feat == 3
    # per layer: the q/k nodes, the head nodes and two of the three bias nodes are gone
    assert nino.num_nodes - naive.num_nodes == L * (E + H + 2)
    assert cn[T["bias"]] - cv[T["bias"]] == L * 2 * E
    assert bool((_degree(naive) > 2).all())  # every node has an edge besides its self-loop
    flat = naive.flat_params(model)
    states = torch.stack([flat, 2 * flat, flat - 1], 1)
    feats = naive.edge_features(states).view(naive.num_edges, naive.max_feat, 3)
    assert torch.equal(naive.to_params(feats), states)
    # slot order on a stacked edge is q, k, v: the first edge is (stream 0 -> value neuron 0)
    w = model.transformer.h[0].attn.c_attn.weight.detach()
    qkv = [b for b in naive.blocks if b.edge_type == T["qkv"]][0]
    e0 = sum(b.num_edges for b in naive.blocks[: naive.blocks.index(qkv)])
    assert torch.equal(feats[e0, :, 0], torch.stack([w[0, 0], w[0, E], w[0, 2 * E]]))


def _swap_within_head(idx_q, idx_v):
    """Overrides swapping neurons 0 and 1 of head 0: in the q and k segments by ``idx_q``, in the
    v segment (and the output projection's rows) by ``idx_v``."""
    perm = np.arange(3 * E)
    if idx_q:
        for seg in (0, E):
            perm[seg], perm[seg + 1] = seg + 1, seg
    rows = np.arange(E)
    if idx_v:
        perm[2 * E], perm[2 * E + 1] = 2 * E + 1, 2 * E
        rows[0], rows[1] = 1, 0
    a = "transformer.h.0.attn."
    return {(a + "c_attn.weight", 1): perm, (a + "c_attn.bias", 0): perm, (a + "c_proj.weight", 0): rows}


@pytest.mark.parametrize("move_q,move_v,naive_sees_it", [(True, True, True), (True, False, False),
                                                           (False, True, False)])
def test_naive_graph_equivariance_is_the_coupled_subgroup(gpt2, move_q, move_v, naive_sees_it):
    model, x, ir = gpt2
    perm = Permutation(ir, {}, {}, overrides=_swap_within_head(move_q, move_v))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    new = perm.apply(state)
    m2 = type(model)(model.config).double().eval()
    m2.load_state_dict(new)
    with torch.no_grad():
        assert torch.allclose(model(x).logits, m2(x).logits, rtol=0, atol=1e-12)  # a symmetry every time
    for profile, invariant in (("nino", True), ("naive", naive_sees_it)):
        g = neugraph.compile(ir, profile=profile, lpe=0)
        flat = torch.cat([state[n].reshape(-1) for n in g.param_names])
        flat2 = torch.cat([new[n].reshape(-1) for n in g.param_names])
        assert (graph_hash(g, flat) == graph_hash(g, flat2)) == invariant, profile


def test_naive_llama_gqa_keeps_typed_edges():
    cfg = transformers.LlamaConfig(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                                   intermediate_size=12, num_hidden_layers=1, vocab_size=9,
                                   max_position_embeddings=8)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ir = neugraph.trace(model, (torch.arange(5)[None],))
    g = neugraph.compile(ir, profile="naive")
    c = g.summary()["edge_type_counts"]
    assert T["head"] not in c and T["qkv"] not in c  # k/v are smaller than q: not stackable
    assert c[T["query"]] == 16 * 16 and c[T["key"]] == c[T["value"]] == 16 * 8
    cfg.num_key_value_heads = 4
    ir = neugraph.trace(transformers.LlamaForCausalLM(cfg).eval(), (torch.arange(5)[None],))
    g = neugraph.compile(ir, profile="naive")
    assert g.summary()["edge_type_counts"][T["qkv"]] == 16 * 16
    s = torch.randn(g.num_params, 2)
    assert torch.equal(g.to_params(g.edge_features(s).view(g.num_edges, g.max_feat, 2)), s)


def test_word_position_feature_marks_token_nodes(gpt2):
    model, x, ir = gpt2
    g = neugraph.compile(ir, profile="nino")
    wte = [b for b in g.blocks if b.name == "transformer.wte.weight"][0]
    tokens = wte.first if wte.src_is_first else wte.second
    assert g.word_pos[tokens].tolist() == list(range(VOCAB))
    others = torch.ones(g.num_nodes, dtype=torch.bool)
    others[tokens] = False
    assert bool((g.word_pos[others] == -1).all())  # positions, neurons, aux nodes: no token
    from neugraph.examples import FM16

    cnn = neugraph.compile(FM16(), torch.randn(1, 1, 28, 28))
    assert bool((cnn.word_pos == -1).all())


def test_gnn_reads_the_word_position_feature(gpt2):
    from nowcast.gnn import NiNoGNN

    model, x, ir = gpt2
    g = neugraph.compile(ir, profile="nino")
    torch.manual_seed(1)
    gnn = NiNoGNN(word_pos=True, vocab_size=VOCAB)
    with torch.no_grad():
        gnn.head.apply(lambda m: m.weight.normal_(0, 0.1) if isinstance(m, torch.nn.Linear) else None)
    flat = g.flat_params(model).float()
    states = torch.stack([flat + 0.01 * i * torch.randn_like(flat) for i in range(5)], 1)
    with_tokens = gnn.predict(g, states, 3)
    g.word_pos = torch.full_like(g.word_pos, -1)
    without = gnn.predict(g, states, 3)
    assert not torch.allclose(with_tokens, without)
    small = NiNoGNN(word_pos=True, vocab_size=3)  # token ids beyond its vocabulary: the "no token" row
    g.word_pos = torch.arange(g.num_nodes)
    assert torch.isfinite(small.predict(g, states, 3)).all()
