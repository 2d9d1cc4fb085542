"""Under rotary embeddings a within-head q/k permutation changes a Llama model, and our graph sees it.

Run: python scripts/rotary_demo.py
A tiny Llama (from a config, no download) is compiled; the same permutation of two q/k neurons
inside head 0 (rows of q_proj and k_proj) is applied once to this Llama and once to the same model
with rotary embeddings switched off (identity cos/sin). Without rotary it is a symmetry (outputs
equal to float64 rounding); with rotary the outputs move, and our compiler pins those neurons, so
the permuted weights give a different graph (WL hash over the generic profile).
"""
from __future__ import annotations

import torch
import transformers

import neugraph
from neugraph.wl import graph_hash

transformers.logging.set_verbosity_error()


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                                   intermediate_size=24, num_hidden_layers=1, vocab_size=11,
                                   max_position_embeddings=8)
    return transformers.LlamaForCausalLM(cfg).double().eval()


def permute_qk_in_head0(state: dict) -> dict:
    out = dict(state)
    for name, n, heads in (("q_proj", 16, (0, 1)), ("k_proj", 8, (0,))):
        key = f"model.layers.0.self_attn.{name}.weight"
        idx = torch.arange(n)
        for h in heads:  # query heads 0 and 1 both read key/value head 0 (GQA): the same swap in each
            idx[4 * h], idx[4 * h + 1] = 4 * h + 1, 4 * h
        out[key] = state[key][idx]
    return out


def main() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 11, (1, 6))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    permuted = permute_qk_in_head0(state)
    other = tiny_llama()
    other.load_state_dict(permuted)
    with torch.no_grad():
        base, moved = model(ids).logits, other(ids).logits
    print(f"with rotary:    relative output change {float((moved - base).norm() / base.norm()):.3e}")

    class NoRotary(torch.nn.Module):  # identity rotation: cos = 1, sin = 0
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, position_ids):
            cos, sin = self.inner(x, position_ids)
            return torch.ones_like(cos), torch.zeros_like(sin)

    for m in (model, other):
        m.model.rotary_emb = NoRotary(m.model.rotary_emb)
    with torch.no_grad():
        base, moved = model(ids).logits, other(ids).logits
    print(f"without rotary: relative output change {float((moved - base).norm() / base.norm()):.3e}")

    rotary_model = tiny_llama()
    ir = neugraph.trace(rotary_model, (ids,))
    q_pins = [d for d in ir.diagnostics() if "head_dim" in d.reason]
    print(f"compiler: {len(q_pins)} pin(s) on head_dim axes, e.g. {q_pins[0].reason!r}")
    g = neugraph.compile(ir, profile="generic", lpe=0)
    flat = torch.cat([state[n].reshape(-1) for n in g.param_names])
    flat_p = torch.cat([permuted[n].reshape(-1) for n in g.param_names])
    same = graph_hash(g, flat) == graph_hash(g, flat_p)
    print(f"graph hash of the permuted weights: {'UNCHANGED' if same else 'changed'}")


if __name__ == "__main__":
    main()
