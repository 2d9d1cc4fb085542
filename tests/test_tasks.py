"""The task registry: contents, deterministic models and batch streams, loss and evaluation."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nowcast import tasks as T
from nowcast.tasks import TASKS, TaskData, batches, build_model, evaluate, example_inputs, get_task, loss_fn


def _real(name: str) -> TaskData:
    from nowcast.data import DataMissingError

    try:
        return T.load_task_data(name)
    except DataMissingError as e:
        pytest.skip(str(e))


# ---- registry ------------------------------------------------------------------------------------
def test_registry_has_the_paper_tasks_and_the_unseen_ones():
    for name in ("fm16", "fm32", "mnist16", "mnist32", "austen-2-32", "austen-3-24", "austen-3-64",
                 "austen-llama-3-64", "bible-3-24", "pydocs-3-24", "austen-3-24-bpe"):
        assert name in TASKS
    fm16, fm32 = TASKS["fm16"], TASKS["fm32"]
    for t in (fm16, fm32):
        assert (t.kind, t.dataset, t.lr, t.weight_decay, t.batch_size, t.steps, t.metric) == \
               ("vision", "fashion_mnist", 6e-3, 0.0, 128, 10_000, "accuracy")
        assert t.target_note == "paper"
    assert (fm16.target, fm32.target) == (89.5, 90.5) and fm16.period == fm32.period == 1000
    assert (fm16.arch["channels"], fm32.arch["channels"]) == (16, 32)
    assert TASKS["mnist16"].dataset == "mnist" and TASKS["bible-3-24"].dataset == "bible"
    assert TASKS["pydocs-3-24"].dataset == "python_docs"
    llama = TASKS["austen-llama-3-64"].arch
    assert llama["family"] == "llama" and llama["rotary"] and (llama["heads"], llama["kv_heads"]) == (4, 2)
    assert TASKS["austen-3-24-bpe"].arch["tokenizer"] == "gpt2" and TASKS["austen-3-24-bpe"].arch["vocab"] == 50257
    for t in TASKS.values():
        assert t.name and t.metric in ("accuracy", "perplexity") and t.eval_every >= 1 and t.steps >= 1000
        assert t.higher_is_better() == (t.metric == "accuracy")
        assert t.target_note.split(":")[0] in ("paper", "calibrated", "provisional"), t.name
        assert t.period % 5 == 0 and t.steps // t.period >= 5, "a run should see several nowcasts"
        if t.kind == "lm":
            assert t.weight_decay == 1e-2 and t.arch["vocab"] == (256 if t.arch["tokenizer"] == "byte" else 50257)
            if t.arch["tokenizer"] == "byte":
                assert t.arch["context"] == T.LM_CONTEXT
        hash(t)  # frozen and hashable although arch is a dict


def test_get_task_error_lists_the_names():
    assert get_task("fm16") is TASKS["fm16"] and get_task(TASKS["fm32"]) is TASKS["fm32"]
    with pytest.raises(KeyError) as e:
        get_task("fm17")
    msg = str(e.value)
    assert "fm17" in msg and "fm16" in msg and "austen-3-24" in msg and "nowcast tasks" in msg


def test_reached_respects_the_direction():
    acc, ppl = TASKS["fm16"], TASKS["austen-3-24"]
    assert acc.reached(89.5) and acc.reached(90) and not acc.reached(89.49) and not acc.reached(float("nan"))
    assert ppl.reached(ppl.target) and ppl.reached(ppl.target - 1) and not ppl.reached(ppl.target + 0.01)
    assert not ppl.reached(float("inf")) and not ppl.reached(float("nan"))


# ---- models ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fm16", "fm32", "austen-3-24", "austen-llama-3-64"])
def test_build_model_is_deterministic_in_the_seed(name):
    state = torch.random.get_rng_state()
    a, b, c = build_model(name, 3), build_model(name, 3), build_model(name, 4)
    assert torch.equal(state, torch.random.get_rng_state()), "build_model must not consume the global RNG"
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert list(pa) == list(pb)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert any(not torch.equal(pa[k], pc[k]) for k in pa)
    assert all(p.dtype == torch.float32 for p in pa.values())
    out = a(*example_inputs(name)) if TASKS[name].kind == "vision" else a(input_ids=example_inputs(name)[0]).logits
    assert torch.isfinite(out).all()


def test_architectures_match_the_registry():
    assert T.num_params(build_model("fm16", 0)) == 14_378  # the paper's FM/16 network
    gpt = build_model("austen-3-64", 0)
    cfg = gpt.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions, cfg.vocab_size) == (3, 64, 4, T.LM_CONTEXT, 256)
    assert gpt.lm_head.weight is gpt.transformer.wte.weight  # tied
    assert build_model("austen-3-24", 0).config.n_head == 3
    llama = build_model("austen-llama-3-64", 0)
    attn = llama.model.layers[0].self_attn
    assert attn.q_proj.out_features == 64 and attn.k_proj.out_features == 32  # 4 query heads, 2 kv heads of 16
    assert llama.config.tie_word_embeddings and len(llama.model.layers) == 3
    bpe = build_model("austen-3-24-bpe", 0)
    n_emb = bpe.transformer.wte.weight.numel()
    assert n_emb == 50257 * 24 and n_emb > 0.9 * T.num_params(bpe)  # the embedding dominates


# ---- batch streams (synthetic data: no files needed) -------------------------------------------------
def _vision_data(n: int = 100) -> TaskData:
    g = torch.Generator().manual_seed(0)
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 28, 28).contiguous()
    return TaskData("synthetic", x, torch.randint(0, 10, (n,), generator=g), x[:10], torch.zeros(10, dtype=torch.int64))


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_vision_batches_are_seeded_epoch_permutations_and_resumable():
    task = dataclasses.replace(TASKS["fm16"], batch_size=16)
    data = _vision_data(100)  # 6 batches per epoch, 4 examples dropped
    a = _take(batches(task, data, seed=0), 14)
    b = _take(batches(task, data, seed=0), 14)
    c = _take(batches(task, data, seed=1), 14)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, c))
    for epoch in range(2):
        ids = torch.cat([x[:, 0, 0, 0] for x, _ in a[6 * epoch: 6 * epoch + 6]]).long()
        assert len(ids) == 96 and len(set(ids.tolist())) == 96  # no repeats inside an epoch
        labels = torch.cat([y for _, y in a[6 * epoch: 6 * epoch + 6]])
        assert torch.equal(labels, data.train_y[ids])  # inputs and labels stay paired
    assert not torch.equal(a[0][0], a[6][0])  # a fresh permutation per epoch
    resumed = _take(batches(task, data, seed=0, start_step=5), 9)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a[5:], resumed))


def test_lm_batches_are_next_token_windows_and_resumable_across_chunks():
    task = dataclasses.replace(TASKS["austen-3-24"], batch_size=2,
                               arch=dict(TASKS["austen-3-24"].arch, context=8))
    ids = torch.arange(500) % 256
    data = TaskData("synthetic", ids, None, ids[:8].view(1, 8), ids[1:9].view(1, 8))
    n = T._LM_CHUNK + 3
    a = _take(batches(task, data, seed=0), n)
    b = _take(batches(task, data, seed=0, start_step=T._LM_CHUNK - 2), 5)
    for (x1, y1), (x2, y2) in zip(a[T._LM_CHUNK - 2:], b):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    for x, y in a[:50]:
        assert x.shape == y.shape == (2, 8)
        assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y, (x + 1) % 256)
    c = _take(batches(task, data, seed=1), 5)
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, c))


def test_start_step_must_be_non_negative():
    with pytest.raises(ValueError):
        next(batches("fm16", _vision_data(), 0, start_step=-1))


# ---- loss and evaluation on hand-checkable models -------------------------------------------------------
class _Lookup(nn.Module):
    """Vision: predicts class int(pixel[0, 0]) % 10."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return F.one_hot(x[:, 0, 0, 0].long() % 10, 10).float() + 0 * self.dummy


def test_evaluate_accuracy_by_hand():
    x = torch.arange(20, dtype=torch.float32).view(20, 1, 1, 1).expand(20, 1, 28, 28)
    y = torch.arange(20) % 10
    y[[2, 5, 11]] = 0  # three wrong of twenty (index 10 has label 0 = prediction, stays right)
    data = TaskData("hand", x, y, x, y)
    model = _Lookup().train()
    assert evaluate("fm16", model, data) == pytest.approx(85.0)
    assert model.training  # mode restored


class _NextTokenHalf(nn.Module):
    """LM: puts probability 1/2 on token (x + 1) % V, the rest uniform over the other V - 1 tokens."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        V = self.vocab
        p = torch.full((*ids.shape, V), 0.5 / (V - 1))
        p.scatter_(-1, ((ids + 1) % V).unsqueeze(-1), 0.5)
        return p.log() + 0 * self.dummy


def test_evaluate_perplexity_and_loss_by_hand():
    task = TASKS["austen-3-24"]
    ids = torch.arange(40).view(5, 8) % 256
    data = TaskData("hand", ids.flatten(), None, ids, (ids + 1) % 256)
    assert evaluate(task, _NextTokenHalf(256), data) == pytest.approx(2.0, rel=1e-5)

    class Uniform(_NextTokenHalf):
        def forward(self, ids):
            return torch.zeros(*ids.shape, self.vocab) + 0 * self.dummy

    assert evaluate(task, Uniform(256), data) == pytest.approx(256.0, rel=1e-5)
    loss = loss_fn(task, _NextTokenHalf(256), ids, (ids + 1) % 256)
    assert float(loss.detach()) == pytest.approx(math.log(2), rel=1e-5)


def test_lm_loss_is_next_token_cross_entropy_of_the_hf_model():
    task = TASKS["austen-2-32"]
    model = build_model(task, 0)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, 1)
    logits = model(input_ids=x).logits
    ref = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
    assert torch.allclose(loss_fn(task, model, x, y), ref)


# ---- real data ------------------------------------------------------------------------------------------
def test_vision_data_is_normalised_and_complete():
    data = _real("fm16")
    assert data.train_x.shape == (60_000, 1, 28, 28) and data.val_x.shape == (10_000, 1, 28, 28)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert abs(float(data.train_x.mean())) < 0.01 and abs(float(data.train_x.std()) - 1) < 0.01
    assert sorted(data.val_y.unique().tolist()) == list(range(10))


def test_lm_data_has_fixed_validation_windows():
    task = TASKS["austen-3-24"]
    data = _real(task.name)
    c = task.arch["context"]
    assert data.train_y is None and data.train_x.dtype == torch.int64 and data.train_x.max() < 256
    assert data.val_x.shape == (T.LM_VAL_WINDOWS, c) and torch.equal(data.val_x[:, 1:], data.val_y[:, :-1])
    again = T.load_task_data(task)
    assert torch.equal(data.val_x, again.val_x)
