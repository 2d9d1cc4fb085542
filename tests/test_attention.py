"""Attention models: inferred head symmetry, verified on real families built from configs.

Known groups (written down here, asserted against the inferred group):
- GPT-2 (learned positions, tied head): residual stream free; per layer the MLP hidden layer free,
  heads permutable (one lane group of n_head), and per head the q/k within-head neurons and the
  v/o within-head neurons free (two spaces of head_dim).
- Llama (rotary, GQA with n_kv key/value heads): residual stream free; per layer the MLP hidden
  layer free (gate and up share it); q/k within-head neurons pinned by rotary; per key/value head
  the v/o within-head neurons free; key/value heads permutable, each carrying its group of query
  heads (one lane group of n_kv when n_kv > 1). With a single head the rotary frequency pairs
  permute too (q/k dims i and i + d/2 together with ``inv_freq[i]``). Not inferred (a sound
  subgroup, see docs/attention.md): those frequency-pair permutations with several heads, query-head
  permutations inside one group, and for MQA (n_kv = 1) the shared v/o within-head permutation.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import neugraph
from neugraph.ir import Permutation
from neugraph.wl import graph_hash

transformers = pytest.importorskip("transformers", reason="transformers (dev extra) builds the HF families")
transformers.logging.set_verbosity_error()

SETTINGS = settings(max_examples=3, deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _ids(vocab: int, n: int = 4) -> torch.Tensor:
    """Token ids in rows of ``n`` that use every token at least once: a permutation of embedding
    rows of tokens absent from the input would be invisible (a fact about the input, not the model)."""
    rows = -(-vocab // n)
    ids = torch.cat([torch.randperm(vocab), torch.randint(0, vocab, (rows * n - vocab,))])
    return ids.view(rows, n)


def _check(model: nn.Module, x, known: dict | None = None, trials: int = 4, kwargs: dict | None = None):
    report = neugraph.verify(model.eval(), (x,), trials=trials, known_group=known, auto_rtol=False,
                             kwargs=kwargs)
    assert report.ok, str(report)
    assert report.rtol == 1e-9
    return report


@pytest.fixture(autouse=True)
def float64_rms_norm(monkeypatch):
    """Hugging Face RMSNorm computes in float32 even in a float64 model, so a reordered sum moves
    outputs by ~1e-8 and the 1e-9 check would measure float32 rounding, not the symmetry. Compute
    it in the input's dtype instead (same formula); rotary tables stay float32, which is exact
    under permutations (elementwise per frequency)."""
    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    import transformers.models.llama.modeling_llama as llama
    import transformers.models.mistral.modeling_mistral as mistral
    import transformers.models.qwen3.modeling_qwen3 as qwen3

    for cls in (llama.LlamaRMSNorm, mistral.MistralRMSNorm, qwen3.Qwen3RMSNorm):
        monkeypatch.setattr(cls, "forward", forward)


# ---- configs ---------------------------------------------------------------------------------------
@st.composite
def gpt2_cfg(draw):
    H = draw(st.integers(1, 3))
    d = draw(st.integers(2, 4))
    return dict(n_embd=H * d, n_head=H, n_layer=draw(st.integers(1, 2)), vocab_size=draw(st.integers(5, 9)),
                n_positions=6)


@st.composite
def llama_cfg(draw):
    n_kv = draw(st.integers(1, 3))
    rep = draw(st.integers(1, 3))
    d = draw(st.sampled_from([2, 4]))
    H = n_kv * rep
    return dict(hidden_size=H * d, num_attention_heads=H, num_key_value_heads=n_kv, head_dim=d,
                intermediate_size=draw(st.integers(3, 12)), num_hidden_layers=draw(st.integers(1, 2)),
                vocab_size=draw(st.integers(5, 9)), max_position_embeddings=8)


def gpt2_known(c: dict) -> dict:
    d = c["n_embd"] // c["n_head"]
    free = [c["n_embd"]] if c["n_embd"] > 1 else []
    lanes = []
    for _ in range(c["n_layer"]):
        free += [4 * c["n_embd"]] + ([d] * (2 * c["n_head"]) if d > 1 else [])
        lanes += [c["n_head"]] if c["n_head"] > 1 else []
    return {"free_spaces": free, "lane_groups": lanes}


def llama_known(c: dict) -> dict:
    d, n_kv, L = c["head_dim"], c["num_key_value_heads"], c["num_hidden_layers"]
    H = c["num_attention_heads"]
    free = [c["hidden_size"]]
    lanes = []
    for _ in range(L):
        free += [c["intermediate_size"]]
        if n_kv > 1:
            free += [d] * n_kv
            lanes += [n_kv]
        elif H == 1:
            free += [d]  # one head: v/o within-head neurons free
        else:
            lanes += [H]  # MQA: query heads (with their output columns) swap; v/o within-head pinned
    if H == 1:  # one head: rotary frequency pairs permute with the (shared) inv_freq buffer
        free += [d // 2]
    return {"free_spaces": [n for n in free if n > 1], "lane_groups": lanes}


# ---- families --------------------------------------------------------------------------------------
@SETTINGS
@given(gpt2_cfg())
def test_gpt2_family(c):
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**c))
    _check(model, _ids(c["vocab_size"]), gpt2_known(c))


GQA = dict(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=4, intermediate_size=6,
           num_hidden_layers=1, vocab_size=7, max_position_embeddings=8)
MQA = dict(GQA, num_key_value_heads=1)


@SETTINGS
@given(llama_cfg())
@example(GQA)
@example(MQA)
def test_llama_family_gqa_mqa(c):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**c))
    _check(model, _ids(c["vocab_size"]), llama_known(c))


@SETTINGS
@given(llama_cfg())
@example(GQA)
@example(MQA)
def test_mistral_family(c):
    model = transformers.MistralForCausalLM(transformers.MistralConfig(**c))
    _check(model, _ids(c["vocab_size"]), llama_known(c))


@SETTINGS
@given(llama_cfg())
@example(GQA)
@example(MQA)
def test_qwen3_family_per_head_qk_norm(c):
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**c))
    _check(model, _ids(c["vocab_size"]), llama_known(c))


@st.composite
def encoder_cfg(draw):
    H = draw(st.integers(1, 3))
    d = draw(st.integers(2, 3))
    if H * d < 3:  # layer norm over fewer than 3 features is degenerate (more symmetry than the architecture)
        d = 3
    return dict(hidden_size=H * d, num_attention_heads=H, num_hidden_layers=draw(st.integers(1, 2)),
                intermediate_size=draw(st.integers(3, 8)))


@SETTINGS
@given(encoder_cfg(), st.integers(2, 3))
def test_bert_family_token_types(c, type_vocab):
    cfg = transformers.BertConfig(vocab_size=9, max_position_embeddings=8, type_vocab_size=type_vocab, **c)
    ids = _ids(9)
    types = torch.arange(ids.numel()).remainder(type_vocab).view_as(ids)  # every token type appears
    _check(transformers.BertModel(cfg), ids, kwargs={"token_type_ids": types})


@SETTINGS
@given(encoder_cfg())
def test_vit_family_patches_and_class_token(c):
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, **c)
    _check(transformers.ViTModel(cfg), torch.randn(1, 3, 8, 8))


class Encoder(nn.Module):
    def __init__(self, d_model: int, heads: int, layers: int):
        super().__init__()
        self.inp = nn.Linear(3, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 2 * d_model, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(d_model, 2)

    def forward(self, x):
        return self.out(self.enc(self.inp(x)))


@SETTINGS
@given(st.integers(1, 3), st.integers(2, 3), st.integers(1, 2))
def test_torch_transformer_encoder(H, d, layers):
    E = H * d
    free = [E] + [2 * E] * layers + ([d] * (2 * H * layers) if d > 1 else [])
    lanes = [H] * layers if H > 1 else []
    _check(Encoder(E, H, layers), torch.randn(1, 5, 3), {"free_spaces": free, "lane_groups": lanes})


class MiniGPT(nn.Module):
    """A minimal hand-written GPT: fused qkv, optional rotary, causal softmax attention."""

    def __init__(self, vocab: int, E: int, H: int, rotary: bool, sdpa: bool):
        super().__init__()
        self.H, self.rotary, self.sdpa = H, rotary, sdpa
        self.tok = nn.Embedding(vocab, E)
        self.pos = nn.Parameter(torch.randn(8, E) * 0.1)
        self.ln = nn.LayerNorm(E)
        self.qkv = nn.Linear(E, 3 * E)
        self.proj = nn.Linear(E, E)
        self.mlp = nn.Sequential(nn.Linear(E, 2 * E), nn.GELU(), nn.Linear(2 * E, E))
        self.head = nn.Linear(E, vocab, bias=False)

    def forward(self, ids):
        B, T = ids.shape
        x = self.tok(ids) + self.pos[:T]
        E = x.shape[-1]
        d = E // self.H
        q, k, v = self.qkv(self.ln(x)).split(E, dim=-1)
        q, k, v = (t.view(B, T, self.H, d).transpose(1, 2) for t in (q, k, v))
        if self.rotary:
            ang = torch.arange(T, dtype=x.dtype)[:, None] * torch.arange(1, d // 2 + 1, dtype=x.dtype)[None]
            cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

            def rot(t):
                return torch.cat([-t[..., d // 2:], t[..., : d // 2]], -1)

            q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        if self.sdpa:
            a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            s = (q @ k.transpose(-2, -1)) / math.sqrt(d)
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            a = s.softmax(-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, E))
        return self.head(x + self.mlp(x))


@SETTINGS
@given(st.integers(1, 3), st.sampled_from([2, 4]), st.booleans(), st.booleans())
def test_minimal_gpt(H, d, rotary, sdpa):
    E = H * d
    free = [E, 2 * E] + ([] if rotary else [d] * H) + [d] * H
    free += [8 - 4]  # rows 4..7 of the position table are never read by a 4-token input: free among themselves
    known = {"free_spaces": free, "lane_groups": [H] if H > 1 else []}
    _check(MiniGPT(7, E, H, rotary, sdpa), _ids(7), known)


def test_multihead_attention_module():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 8)
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            h = self.inp(x)
            return self.out(self.att(h, h, h, need_weights=False)[0])

    r = _check(M(), torch.randn(1, 4, 3), {"free_spaces": [4, 4, 4, 4, 8, 8], "lane_groups": [2]})
    assert r.counts["bad"][0] > 0


# ---- bad permutations named in the issue --------------------------------------------------------------
def _changes(model, x, ir, graph, overrides):
    """Relative output change and whether the graph hash changes under a raw state permutation."""
    perm = Permutation(ir, {}, {}, overrides=overrides)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base = model(x).logits
    new = perm.apply(state)
    m2 = type(model)(model.config).double().eval()
    m2.load_state_dict(new)
    out = m2(x).logits
    flat = torch.cat([state[n].reshape(-1) for n in graph.param_names])
    flat2 = torch.cat([new[n].reshape(-1) for n in graph.param_names])
    change = ((out - base).norm() / base.norm()).item()
    return change, graph_hash(graph, flat) != graph_hash(graph, flat2)


def _swap(n: int, i: int, j: int) -> np.ndarray:
    idx = np.arange(n)
    idx[i], idx[j] = j, i
    return idx


def test_bad_permutations_llama_rotary_and_across_heads():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                                   intermediate_size=12, num_hidden_layers=1, vocab_size=9,
                                   max_position_embeddings=8)
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = _ids(9, 5)
    ir = neugraph.trace(model, (x,))
    graph = neugraph.compile(ir, profile="generic", lpe=0)
    a = "model.layers.0.self_attn."
    # q/k within one head under rotary: swap two q/k neurons of head 0 in q_proj and k_proj rows
    change, hashed = _changes(model, x, ir, graph, {(a + "q_proj.weight", 0): _swap(16, 0, 1),
                                                    (a + "k_proj.weight", 0): _swap(8, 0, 1)})
    assert change > 1e-6 and hashed
    # v neurons across two key/value heads, with o_proj columns following: crosses heads
    change, hashed = _changes(model, x, ir, graph, {(a + "v_proj.weight", 0): _swap(8, 0, 4),
                                                    (a + "o_proj.weight", 1): _swap(16, 0, 8)})
    assert change > 1e-6 and hashed
    # v permuted without o
    change, hashed = _changes(model, x, ir, graph, {(a + "v_proj.weight", 0): _swap(8, 0, 1)})
    assert change > 1e-6 and hashed
    # the same v swap inside one head with o following is a symmetry
    both_query_heads = np.array([1, 0, 2, 3, 5, 4, 6, 7] + list(range(8, 16)))  # group 0 reads kv head 0
    change, _ = _changes(model, x, ir, graph, {(a + "v_proj.weight", 0): _swap(8, 0, 1),
                                               (a + "o_proj.weight", 1): both_query_heads})
    assert change < 1e-5


# ---- the published GPT-2 graph -------------------------------------------------------------------------
REF = __import__("pathlib").Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "fixtures"


@pytest.mark.skipif(not (REF / "ref_gpt2_toy.pt").exists(), reason=f"fixture not found at {REF} (../shared)")
def test_gpt2_toy_nino_graph_matches_fixture():
    import networkx as nx

    fx = torch.load(REF / "ref_gpt2_toy.pt", map_location="cpu", weights_only=True)
    meta = fx["meta"]
    cfg = transformers.GPT2Config(n_embd=6, n_layer=2, n_head=2, vocab_size=5, n_positions=3)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.load_state_dict(fx["state_dict"], strict=False)
    g = neugraph.compile(model, (torch.randint(0, 5, (1, 3)),), profile="nino")
    assert g.param_names == meta["param_names"]
    assert (g.num_nodes, g.num_edges) == (meta["num_nodes"], meta["num_edges"]) == (136, 1264)
    assert g.summary()["edge_type_counts"] == meta["edge_type_counts"]
    G = nx.DiGraph()
    G.add_nodes_from(range(g.num_nodes))
    for (s, t), ty in zip(g.edge_index.T.tolist(), g.edge_type.tolist()):
        G.add_edge(s, t, type=ty)
    assert nx.weisfeiler_lehman_graph_hash(G, edge_attr="type", iterations=4) == meta["wl_hash"]
    flat = g.flat_params(model)
    assert torch.equal(g.to_params(g.edge_features(flat)[:, : g.max_feat]), flat)
