"""run_training: determinism, the JSON record, nowcasts at the scheduled steps, batches aligned by step."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import nowcast.train as train_mod
from nowcast import Linefit
from nowcast.tasks import TASKS, TaskData, load_task_data
from nowcast.train import run_training, steps_to_target

# A tiny vision task on synthetic images: the real loop, model family and optimizer, in a second.
TINY = dataclasses.replace(TASKS["fm16"], name="tiny", batch_size=8, steps=30, eval_every=10,
                           arch=dict(TASKS["fm16"].arch, channels=2), target=101.0, target_note="test")


def _tiny_data(n: int = 96) -> TaskData:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randn(n, 1, 28, 28, generator=g) + y.view(n, 1, 1, 1).float() * 0.3
    return TaskData("tiny", x[:64], y[:64], x[64:], y[64:])


def test_run_training_is_deterministic_and_json_serialisable():
    data = _tiny_data()
    seen = []
    a = run_training(TINY, 0, data=data, progress=False, log=seen.append)
    b = run_training(TINY, 0, data=data, progress=False)
    c = run_training(TINY, 1, data=data, progress=False)
    assert a["scores"] == b["scores"] and a["train_loss"] == b["train_loss"]
    assert a["train_loss"] != c["train_loss"]
    assert a["eval_steps"] == [0, 10, 20, 30] and a["steps"] == 30 and a["method"] == "adamw"
    assert a["final_score"] == a["scores"][-1] and a["steps_to_target"] is None and a["nowcasts"] == 0
    assert a["train_loss"][0] is None and all(v > 0 for v in a["train_loss"][1:])
    assert [r["step"] for r in seen] == a["eval_steps"]
    json.loads(json.dumps(a))
    for key in ("task", "seed", "method", "steps", "eval_steps", "scores", "steps_to_target", "final_score",
                "wall_time_s", "nowcasts", "nowcasts_rejected"):
        assert key in a


def test_final_eval_when_steps_are_not_a_multiple_of_eval_every(tmp_path):
    log = tmp_path / "log.jsonl"
    r = run_training(TINY, 0, steps=25, eval_every=10, data=_tiny_data(), progress=False, log=log)
    assert r["eval_steps"] == [0, 10, 20, 25]
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [0, 10, 20, 25]


def test_steps_to_target_is_the_first_evaluated_step_that_reaches_it():
    t = dataclasses.replace(TINY, target=50.0)
    assert steps_to_target(t, [0, 10, 20, 30], [10.0, 49.9, 50.0, 80.0]) == 20
    assert steps_to_target(t, [0, 10], [10.0, 20.0]) is None
    lm = dataclasses.replace(TASKS["austen-3-24"], target=5.0)
    assert steps_to_target(lm, [0, 100, 200], [256.0, 5.0, 4.0]) == 100


def _spy_batches(monkeypatch):
    """Record the targets of every loss_fn call made by run_training."""
    calls = []
    real = train_mod.loss_fn

    def spy(task, model, inputs, targets):
        calls.append(targets.clone())
        return real(task, model, inputs, targets)

    monkeypatch.setattr(train_mod, "loss_fn", spy)
    return calls


def test_linefit_nowcasts_on_schedule_and_batches_stay_aligned_by_step(monkeypatch):
    data = _tiny_data()
    calls = _spy_batches(monkeypatch)
    base = run_training(TINY, 0, data=data, progress=False)
    base_calls = list(calls)
    calls.clear()
    nino = run_training(TINY, 0, nowcaster=Linefit(), period=10, ctx=5, data=data, progress=False)
    # period 10, ctx 5: states before calls 1, 3, 5, 7; calls 9, 19, 29 are nowcasts (no forward/backward)
    assert nino["nowcast_steps"] == [9, 19, 29] and nino["nowcasts"] == 3 and nino["nowcasts_rejected"] == 0
    assert nino["method"] == "adamw+Linefit" and nino["period"] == 10
    assert len(base_calls) == 30 and len(calls) == 27
    expected = [t for s, t in enumerate(base_calls) if s not in (9, 19, 29)]
    assert all(torch.equal(a, b) for a, b in zip(expected, calls)), "batch s must be used at step s by every method"
    assert nino["scores"][0] == base["scores"][0]  # the same initial model


def test_min_k_2_drops_only_the_last_k1_nowcast_and_the_run_is_identical_before_it():
    data = _tiny_data()
    every = run_training(TINY, 0, nowcaster=Linefit(), period=10, ctx=5, data=data, progress=False)
    skip = run_training(TINY, 0, nowcaster=Linefit(), period=10, ctx=5, data=data, progress=False, min_k=2)
    assert [e["k"] for e in every["nowcast_log"]] == [40, 13, 1]  # the k-decay over 3 cycles
    assert skip["nowcast_steps"] == [9, 19] and skip["nowcasts"] == 2 and skip["nowcasts_skipped"] == 1
    assert skip["min_k"] == 2 and every["min_k"] == 1 and every["nowcasts_skipped"] == 0
    assert skip["scores"][:-1] == every["scores"][:-1], "only the last step differs"
    json.dumps(skip)


def test_run_training_accepts_a_dynamic_period():
    from nowcast.schedule import DynamicPeriod

    r = run_training(TINY, 0, nowcaster=Linefit(), period=DynamicPeriod(min_period=10, max_period=20),
                     data=_tiny_data(), progress=False)
    assert r["nowcasts"] >= 1 and r["period"]["type"] == "DynamicPeriod"
    json.dumps(r)


def test_real_fm16_short_run_is_deterministic():
    from nowcast.data import DataMissingError

    try:
        data = load_task_data("fm16")
    except DataMissingError as e:
        pytest.skip(str(e))
    small = TaskData(data.task, data.train_x, data.train_y, data.val_x[:500], data.val_y[:500])
    a = run_training("fm16", 0, steps=10, eval_every=10, data=small, progress=False)
    b = run_training("fm16", 0, steps=10, eval_every=10, data=small, progress=False)
    assert a["scores"] == b["scores"] and a["train_loss"] == b["train_loss"]
    assert a["scores"][-1] > a["scores"][0]  # 10 AdamW steps at lr 6e-3 learn something


def test_target_check_returns_the_exact_score_only_when_the_target_is_reached():
    from nowcast.tasks import build_model, evaluate, target_check

    data = _tiny_data()
    model = build_model(TINY, 0)
    score = evaluate(TINY, model, data)
    assert target_check(dataclasses.replace(TINY, target=score), model, data) == score
    assert target_check(dataclasses.replace(TINY, target=score + 1e-6), model, data) is None
    from nowcast.tasks import accuracy, misclassified

    wrong = misclassified(TINY, model, data)
    assert accuracy(wrong) == score and wrong.dtype == torch.bool and len(wrong) == len(data.val_y)
    for hard in (wrong, ~wrong):  # any order of the images gives the same decision and score
        assert target_check(dataclasses.replace(TINY, target=score), model, data, hard_first=hard) == score
        assert target_check(dataclasses.replace(TINY, target=score + 1e-6), model, data, hard_first=hard) is None
    assert model.training  # the train/eval mode is restored


def test_fine_target_checks_give_the_step_full_evaluations_would():
    """Checks every 2 steps until reached, then the 10-step grid; the same crossing as evaluating every 2."""
    data = _tiny_data()
    probe = run_training(dataclasses.replace(TINY, target_every=0), 0, eval_every=2, data=data, progress=False)
    target = sorted(probe["scores"])[len(probe["scores"]) // 2]  # reached somewhere in the run
    fine = dataclasses.replace(TINY, target=target, target_every=2)
    every2 = run_training(dataclasses.replace(fine, target_every=0), 0, eval_every=2, data=data, progress=False)
    r = run_training(fine, 0, data=data, progress=False)
    hit = every2["steps_to_target"]
    assert hit is not None and r["steps_to_target"] == hit and r["target_every"] == 2
    expected = sorted(set(range(0, 31, 10)) | {hit})
    assert r["eval_steps"] == expected
    full = dict(zip(every2["eval_steps"], every2["scores"]))
    assert all(full[s] == v for s, v in zip(r["eval_steps"], r["scores"]))


class _Fixed:
    """A nowcaster that predicts ``scale`` times the current parameters (1.0: no change)."""

    needs_graph = False

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def predict(self, graph, states, k):
        return states[:, -1] * self.scale


def test_guard_undoes_nowcasts_that_raise_the_step_loss_and_adamw_takes_the_step(monkeypatch):
    data = _tiny_data()
    kw = dict(period=10, ctx=5, data=data, progress=False)
    adamw = run_training(TINY, 0, data=data, progress=False)
    wild = run_training(TINY, 0, nowcaster=_Fixed(-3.0), **kw)
    calls = _spy_batches(monkeypatch)
    guarded = run_training(TINY, 0, nowcaster=_Fixed(-3.0), guard=1.0, **kw)
    assert wild["scores"] != adamw["scores"], "the wild prediction must matter for the test to mean anything"
    assert guarded["nowcasts"] == 0 and guarded["nowcasts_rejected"] == 3 and guarded["guard"] == 1.0
    # every nowcast undone exactly and replaced by AdamW's step on the same batch: AdamW's run, bit for bit
    assert guarded["scores"] == adamw["scores"] and guarded["train_loss"] == adamw["train_loss"]
    log = guarded["nowcast_log"]
    assert [e["step"] for e in log] == [9, 19, 29] and not any(e["accepted"] for e in log)
    assert all(e["base_step"] for e in log) and all(e["loss_after"] > e["loss_before"] for e in log)
    # that step's batch: before, after, then once more for AdamW's gradients; 27 ordinary steps
    assert len(calls) == 27 + 3 * 3
    json.dumps(guarded)


def test_guard_keeps_nowcasts_that_do_not_raise_the_step_loss():
    data = _tiny_data()
    r = run_training(TINY, 0, nowcaster=_Fixed(1.0), guard=1.0, period=10, ctx=5, data=data, progress=False)
    assert r["nowcasts"] == 3 and r["nowcasts_rejected"] == 0
    assert all(e["accepted"] and not e["base_step"] and e["loss_after"] == e["loss_before"]
               for e in r["nowcast_log"])
    # an accepted nowcast is the step: the same parameters as the unguarded run
    plain = run_training(TINY, 0, nowcaster=_Fixed(1.0), period=10, ctx=5, data=data, progress=False)
    assert r["scores"] == plain["scores"]


def test_guard_below_one_is_refused():
    with pytest.raises(ValueError, match="guard must be"):
        run_training(TINY, 0, nowcaster=_Fixed(1.0), guard=0.9, data=_tiny_data(), progress=False)


def test_no_change_nowcaster_is_adamw_with_the_nowcast_steps_skipped():
    """The benchmark's control: NoChange in the wrapper only drops the base update on nowcast steps."""
    from nowcast import NoChange
    from nowcast.tasks import batches, build_model, evaluate, loss_fn

    data = _tiny_data()
    r = run_training(TINY, 0, nowcaster=NoChange(), period=10, ctx=5, data=data, progress=False)
    assert r["nowcast_steps"] == [9, 19, 29] and r["nowcasts_rejected"] == 0
    model = build_model(TINY, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=TINY.lr, weight_decay=TINY.weight_decay)
    stream = batches(TINY, data, 0)
    for step in range(TINY.steps):
        x, y = next(stream)
        if step in (9, 19, 29):
            continue
        opt.zero_grad()
        loss_fn(TINY, model, x, y).backward()
        opt.step()
    assert evaluate(TINY, model, data) == r["final_score"]


def test_a_permuted_replica_computes_the_same_function_from_other_weights():
    from nowcast.tasks import build_model
    from nowcast.train import permute_model

    x = _tiny_data().val_x[:8]
    a, b, c = build_model(TINY, 0), build_model(TINY, 0), build_model(TINY, 0)
    permute_model(b, TINY, 1)
    permute_model(c, TINY, 2)
    moved = [n for (n, p), q in zip(a.named_parameters(), b.parameters()) if not torch.equal(p, q)]
    assert moved, "a group element drawn at random should move the hidden channels"
    assert any(not torch.equal(p, q) for p, q in zip(b.parameters(), c.parameters()))
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)
        # a multiset of values per tensor is kept: only positions move
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p.flatten().sort().values, q.flatten().sort().values, rtol=0, atol=0)


def test_a_replica_run_follows_the_original_run_up_to_rounding():
    data = _tiny_data()
    for nowcaster in (None, Linefit()):
        kw = dict(data=data, progress=False, nowcaster=nowcaster, period=10, ctx=5)
        base = run_training(TINY, 0, **kw)
        rep = run_training(TINY, 0, permute=1, **kw)
        assert rep["permute"] == 1 and base["permute"] is None
        assert rep["nowcast_steps"] == base["nowcast_steps"]
        for u, v in zip(base["train_loss"][1:], rep["train_loss"][1:]):
            assert abs(u - v) <= 1e-3 * abs(u)
