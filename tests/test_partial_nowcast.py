"""benchmarks/partial_nowcast.py: the held parts partition the parameters and keep their newest state."""
from __future__ import annotations

import pytest
import torch

from benchmark_scripts import load_benchmark
from nowcast.tasks import build_model


@pytest.fixture(scope="module")
def pn():
    return load_benchmark("partial_nowcast.py", "partial_nowcast")


def test_parts_partition_a_tied_gpt2(pn):
    model = build_model("austen-3-24", 0)
    n = sum(p.numel() for p in model.parameters())
    emb, body = pn.held_mask(model, "token-embedding"), pn.held_mask(model, "body")
    vec, mat = pn.held_mask(model, "vectors"), pn.held_mask(model, "matrices")
    assert emb.numel() == body.numel() == vec.numel() == mat.numel() == n
    assert int(emb.sum()) == model.transformer.wte.weight.numel() == 256 * 24
    assert torch.equal(emb, ~body) and torch.equal(vec, ~mat)
    assert int(vec.sum()) == sum(p.numel() for p in model.parameters() if p.dim() == 1)
    # the tied output head is the token embedding, counted once
    assert model.lm_head.weight is model.transformer.wte.weight


class Shift:  # predicts newest + 1 everywhere
    needs_graph, ctx, max_horizon = False, 3, 40

    def predict(self, graph, states, k):
        return states[:, -1] + 1.0

    def parameters(self):
        return iter(())


def test_held_entries_keep_the_newest_state(pn):
    mask = torch.tensor([True, False, True, False])
    states = torch.arange(12, dtype=torch.float32).view(4, 3)
    pred = pn.HeldNowcaster(Shift(), mask).predict(None, states, 5)
    assert pred.tolist() == [2.0, 6.0, 8.0, 12.0]


def test_final_nowcast_holds_everything_at_one_call_only(pn):
    model = build_model("fm16", 0)
    mask = pn.held_mask(model, "final-nowcast")
    assert bool(mask.all()) and mask.numel() == sum(p.numel() for p in model.parameters())
    held = pn.HeldNowcaster(Shift(), torch.ones(4, dtype=torch.bool), only_call=3)
    states = torch.arange(12, dtype=torch.float32).view(4, 3)
    preds = [held.predict(None, states, k).tolist() for k in (5, 3, 1)]
    assert preds[0] == preds[1] == [3.0, 6.0, 9.0, 12.0]
    assert preds[2] == [2.0, 5.0, 8.0, 11.0] and held.calls == 3


def test_match_holds_the_parameters_a_regex_names(pn):
    model = build_model("austen-3-24", 0)
    mask = pn.held_mask(model, "match:ln_f")
    assert int(mask.sum()) == 2 * 24  # the final LayerNorm's gain and shift
    names = [n for n, p in model.named_parameters() for _ in range(p.numel())]
    assert {names[i] for i in mask.nonzero().flatten().tolist()} == {"transformer.ln_f.weight", "transformer.ln_f.bias"}
    with pytest.raises(ValueError, match="no parameter name matches"):
        pn.held_mask(model, "match:no_such_layer")


def test_embedding_parts_need_a_language_model(pn):
    with pytest.raises(ValueError, match="get_input_embeddings"):
        pn.held_mask(build_model("fm16", 0), "body")
    with pytest.raises(ValueError, match="unknown part"):
        pn.held_mask(build_model("fm16", 0), "heads")


def test_unused_tokens_runs_the_nowcaster_on_the_used_vocabulary(pn):
    from nowcast.data import DataMissingError
    from nowcast.tasks import load_task_data

    try:
        used = torch.unique(load_task_data("austen-3-24").train_x)
    except DataMissingError as e:
        pytest.skip(str(e))
    seen = []

    class Record(Shift):
        def predict(self, graph, states, k):
            seen.append((graph, states.clone()))
            return super().predict(graph, states, k)

    nc, mask = pn.used_vocab_nowcaster("austen-3-24", Record())
    model = build_model("austen-3-24", 0)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    states = torch.stack([flat, flat + 0.5, flat + 1.0], 1)
    pred = nc.predict(None, states, 2)
    # held: exactly the token rows the train split never uses (the tied head is the same tensor)
    wte = model.transformer.wte.weight
    assert int(mask.sum()) == (256 - len(used)) * wte.shape[1] and len(used) < 256
    off = 0
    for p in model.parameters():  # wte comes first in the flat order
        if p is wte:
            break
        off += p.numel()
    rows_mask = mask[off: off + wte.numel()].view(wte.shape)
    unused = torch.ones(256, dtype=torch.bool)
    unused[used] = False
    assert torch.equal(rows_mask, unused[:, None].expand_as(rows_mask))
    assert torch.equal(pred[mask], states[mask, -1]) and torch.equal(pred[~mask], states[~mask, -1] + 1.0)
    # the nowcaster saw the model at the used vocabulary: its graph and the picked states agree
    graph, sub = seen[0]
    assert graph.num_params == sub.shape[0] == int((~mask).sum())
    with pytest.raises(ValueError, match="no vocabulary"):
        pn.used_vocab_nowcaster("fm16", Shift())


def test_holding_norm_names_is_the_wrappers_hold_norms(pn):
    """partial_nowcast's ``match:ln_`` runs and ``run_training(hold="norms")`` are the same computation."""
    import nowcast
    from nowcast.cli import SHIPPED_CHECKPOINT
    from nowcast.data import DataMissingError
    from nowcast.tasks import load_task_data
    from nowcast.train import run_training

    try:
        data = load_task_data("austen-3-24")
    except DataMissingError as e:
        pytest.skip(str(e))
    mask = pn.held_mask(build_model("austen-3-24", 0), "match:ln_")
    kw = dict(steps=10, eval_every=10, data=data, period=5, progress=False)
    held = pn.HeldNowcaster(nowcast.load(SHIPPED_CHECKPOINT), mask)
    a = run_training("austen-3-24", 0, nowcaster=held, **kw)
    b = run_training("austen-3-24", 0, nowcaster=nowcast.load(SHIPPED_CHECKPOINT), hold="norms", **kw)
    c = run_training("austen-3-24", 0, nowcaster=nowcast.load(SHIPPED_CHECKPOINT), **kw)
    assert a["nowcasts"] == b["nowcasts"] == 2 and b["held_values"] == int(mask.sum()) == (3 * 4 + 2) * 24
    assert a["scores"] == b["scores"] and a["train_loss"] == b["train_loss"]
    assert c["scores"][-1] != b["scores"][-1]  # holding them changes the run


def test_from_nowcast_holds_everything_from_that_call_on(pn):
    mask = pn.held_mask(build_model("fm16", 0), "from-nowcast:2")
    assert bool(mask.all())
    held = pn.HeldNowcaster(Shift(), torch.ones(4, dtype=torch.bool), from_call=2)
    states = torch.arange(12, dtype=torch.float32).view(4, 3)
    preds = [held.predict(None, states, k).tolist() for k in (5, 3, 1)]
    assert preds[0] == [3.0, 6.0, 9.0, 12.0] and preds[1] == preds[2] == [2.0, 5.0, 8.0, 11.0]
    with pytest.raises(ValueError, match="nowcast number"):
        pn.held_mask(build_model("fm16", 0), "from-nowcast:x")
