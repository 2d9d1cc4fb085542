"""``nowcast.gate.SkillGate``: the backtest, the decision, and that it only ever removes nowcasts."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import nowcast
from nowcast.gate import SkillGate
from nowcast.optim import NiNo


class Overshoot(nowcast.Nowcaster):
    """Worse than no change on any moving trajectory: ten times the last step, whatever k is."""

    needs_graph = False

    def predict(self, graph, states, k):
        states = self.check(graph, states, k)
        return states[:, -1] + 10.0 * (states[:, -1] - states[:, -2])


def _line(n: int, ctx: int, slope: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    start, step = torch.randn(n, 1, generator=g), torch.randn(n, 1, generator=g) * slope
    return start + step * torch.arange(1, ctx + 1, dtype=torch.float32)


def test_construction_checks():
    with pytest.raises(ValueError, match="threshold must be a number in"):
        SkillGate(nowcast.Linefit(), threshold=0)
    with pytest.raises(ValueError, match="threshold must be a number in"):
        SkillGate(nowcast.Linefit(), threshold=1.5)
    with pytest.raises(TypeError, match="SkillGate wraps a nowcaster"):
        SkillGate(object())
    g = SkillGate(nowcast.Linefit())
    assert g.ctx == 10 and g.needs_graph is False and g.max_horizon == nowcast.Linefit().max_horizon
    assert g.every_cycle is False and g.decision is None


def test_states_must_have_twice_the_context():
    with pytest.raises(ValueError, match="takes ctx=10"):
        SkillGate(nowcast.Linefit()).predict(None, _line(4, 5), 1)


def test_linear_trajectory_opens_and_predicts_from_every_second_state():
    states = _line(50, 10)
    gate, inner = SkillGate(nowcast.Linefit(), threshold=0.9), nowcast.Linefit()
    assert gate.skill(None, states) < 1e-4  # a line fit backtests a line exactly
    for k in (1, 7, 40):
        assert torch.equal(gate.predict(None, states, k), inner.predict(None, states[:, 1::2], k))
    assert [e["open"] for e in gate.log] == [True] * 3 and gate.log[0]["k"] == 1


@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 40))
@settings(max_examples=25, deadline=None)
def test_closed_gate_is_no_change(seed, k):
    """No change has skill exactly 1 (never < threshold); an overshooting nowcaster's is above 1."""
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(30, 10, generator=g).cumsum(1)  # a random walk: nothing to extrapolate
    for inner in (nowcast.NoChange(), Overshoot()):
        gate = SkillGate(inner, threshold=1.0, every_cycle=True)
        s = gate.skill(None, states)
        assert s >= 1.0 - 1e-6
        assert torch.equal(gate.predict(None, states, k), states[:, -1])
        assert gate.log[-1]["open"] is False


def test_nothing_moved_keeps_the_gate_closed():
    states = torch.ones(8, 10)
    gate = SkillGate(nowcast.Linefit())
    assert gate.skill(None, states) == float("inf")
    assert torch.equal(gate.predict(None, states, 3), states[:, -1])
    assert gate.log == [{"k": 3, "skill": None, "open": False}]


def _train(nowcaster, ctx: int, linear: bool = False, steps: int = 60,
           period: int = 20) -> tuple[list[torch.Tensor], NiNo]:
    """SGD under NiNo on a least-squares problem (an MLP), or with ``linear`` on a linear loss
    (one layer: a constant gradient, so every trajectory is a line); returns the final parameters."""
    torch.manual_seed(0)
    model = (torch.nn.Linear(4, 3) if linear else
             torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)))
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    opt = NiNo(model, torch.optim.SGD(model.parameters(), lr=0.05), nowcaster, period=period, ctx=ctx,
               total_steps=steps)
    for _ in range(steps):
        opt.zero_grad()
        if opt.need_grads:
            out = model(x)
            (out.sum() if linear else torch.nn.functional.mse_loss(out, y)).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt


def test_the_first_decision_is_kept_unless_every_cycle():
    line, walk = _line(20, 10), torch.randn(20, 10, generator=torch.Generator().manual_seed(1)).cumsum(1)
    gate = SkillGate(nowcast.Linefit(), threshold=0.9)
    gate.predict(None, line, 5)  # opens on a line ...
    assert torch.equal(gate.predict(None, walk, 5), nowcast.Linefit().predict(None, walk[:, 1::2], 5))
    assert gate.decision is True and [e["skill"] is None for e in gate.log] == [False, True]  # ... and stays open
    every = SkillGate(nowcast.Linefit(), threshold=0.9, every_cycle=True)
    every.predict(None, line, 5)
    assert torch.equal(every.predict(None, walk, 5), walk[:, -1]) and every.decision is False
    shut = SkillGate(nowcast.Linefit(), threshold=0.9)
    shut.predict(None, walk, 5)  # closes on a random walk and stays closed, predicting nothing
    assert torch.equal(shut.predict(None, line, 5), line[:, -1]) and shut.log[-1] == {"k": 5, "skill": None,
                                                                                      "open": False}
    shut.reset()
    assert shut.decision is None and shut.log == []
    assert torch.equal(shut.predict(None, line, 5), nowcast.Linefit().predict(None, line[:, 1::2], 5))


def test_open_gate_run_is_the_ungated_run_exactly():
    """Linefit on straight trajectories: every nowcast runs, from the same 5 states."""
    gate = SkillGate(nowcast.Linefit(), threshold=0.9, every_cycle=True)
    gated, _ = _train(gate, ctx=10, linear=True)
    plain, _ = _train(nowcast.Linefit(), ctx=5, linear=True)
    assert len(gate.log) == 3 and all(e["open"] for e in gate.log)
    assert all(torch.equal(a, b) for a, b in zip(gated, plain))


def test_closed_gate_run_is_the_no_change_run_exactly():
    """Overshoot on the curved MLP trajectories: every backtest is worse than no change."""
    gate = SkillGate(Overshoot(), threshold=0.9, every_cycle=True)
    gated, opt = _train(gate, ctx=10)
    control, _ = _train(nowcast.NoChange(), ctx=5)
    assert len(gate.log) == 3 and not any(e["open"] for e in gate.log)
    assert all(e["skill"] > 1 for e in gate.log)
    assert opt.state["nowcasts"] == 3  # the wrapper wrote the (unchanged) parameters three times
    assert all(torch.equal(a, b) for a, b in zip(gated, control))
    ungated, _ = _train(Overshoot(), ctx=5)
    assert not all(torch.equal(a, b) for a, b in zip(gated, ungated))


def test_gnn_checkpoint_on_a_compiled_graph():
    """The shipped GNN behind the gate: the open prediction is the GNN's on the coarse states."""
    import neugraph
    from nowcast.cli import SHIPPED_CHECKPOINT

    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    graph = neugraph.compile(model, torch.randn(3, 6))
    inner = nowcast.load(SHIPPED_CHECKPOINT)
    states = _line(graph.num_params, 10, slope=0.01)
    gate = SkillGate(inner, threshold=1.0)
    out = gate.predict(graph, states, 4)
    assert out.shape == (graph.num_params,)
    if gate.log[-1]["open"]:
        assert torch.equal(out, inner.predict(graph, states[:, 1::2].contiguous(), 4))
    else:
        assert torch.equal(out, states[:, -1])
    assert gate.log[-1]["skill"] is not None and gate.log[-1]["skill"] > 0


def test_run_training_gate_records_each_decision():
    """``run_training(gate=)`` wraps the nowcaster, doubles the recorded states and logs the gate."""
    from nowcast.cli import SHIPPED_CHECKPOINT
    from nowcast.data import DataMissingError
    from nowcast.tasks import load_task_data
    from nowcast.train import run_training

    try:
        data = load_task_data("austen-3-24")
    except DataMissingError as e:
        pytest.skip(str(e))
    kw = dict(steps=20, eval_every=10, data=data, period=10, progress=False)
    rec = run_training("austen-3-24", 0, nowcaster=nowcast.load(SHIPPED_CHECKPOINT), gate=0.9, **kw)
    assert rec["ctx"] == 10 and rec["gate"] == 0.9 and rec["nowcast_steps"] == [9, 19]
    assert [e["k"] for e in rec["gate_log"]] == [40, 1] and rec["gate_every_cycle"] is False
    first, second = rec["gate_log"]
    assert first["skill"] > 0 and second["skill"] is None and first["open"] == second["open"]
    plain = run_training("austen-3-24", 0, nowcaster=nowcast.load(SHIPPED_CHECKPOINT), **kw)
    assert plain["gate"] is None and plain["gate_log"] is None and plain["ctx"] == 5


def test_open_gate_with_the_gnn_is_the_ungated_run_bit_for_bit():
    """The shipped GNN under NiNo: a gate held open gives exactly NiNo(ctx=5)'s parameters (the GNN
    rounds differently on a strided view of the states, so the gate must pass a contiguous one)."""
    import neugraph
    from nowcast.cli import SHIPPED_CHECKPOINT

    def run(gated: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
        inner = nowcast.load(SHIPPED_CHECKPOINT)
        nc = SkillGate(inner) if gated else inner
        opt = NiNo(model, torch.optim.AdamW(model.parameters(), lr=1e-2), nc, period=20, ctx=nc.ctx,
                   total_steps=60, graph=neugraph.compile(model, x[:2]))
        if gated:
            nc.decision = True  # held open, as a resumed run restores it (NiNo re-armed it when built)
        for _ in range(60):
            opt.zero_grad()
            if opt.need_grads:
                torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        assert opt.state["nowcasts"] == 3
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(True), run(False)))


def test_shipped_default_is_the_checkpoint_behind_the_gate():
    g = nowcast.shipped()
    assert isinstance(g, SkillGate) and g.threshold == nowcast.SHIPPED_GATE == 0.9 and g.ctx == 10
    assert isinstance(g.inner, nowcast.NiNoGNN) and g.inner.ctx == 5 and g.every_cycle is False
    bare = nowcast.shipped(gate=None)
    assert isinstance(bare, nowcast.NiNoGNN) and bare.ctx == 5
    assert nowcast.shipped(0.5).threshold == 0.5


def test_nino_takes_ctx_from_the_nowcaster_and_rearms_the_gate():
    model = torch.nn.Linear(4, 3)
    gate = SkillGate(nowcast.Linefit())
    gate.decision, gate.log = False, [{"k": 1, "skill": 2.0, "open": False}]  # left over from another run
    opt = NiNo(model, torch.optim.SGD(model.parameters(), lr=0.1), gate, period=20, total_steps=60)
    assert opt.ctx == 10 and gate.decision is None and gate.log == []
    assert NiNo(model, torch.optim.SGD(model.parameters(), lr=0.1), nowcast.Linefit(), period=20,
                total_steps=60).ctx == 5
    with pytest.raises(ValueError, match="built for ctx=10"):
        NiNo(model, torch.optim.SGD(model.parameters(), lr=0.1), gate, period=20, ctx=5, total_steps=60)


def test_resumed_run_keeps_the_first_decision():
    """A checkpoint after the first nowcast carries the decision: the resumed run does not backtest
    again, and it ends where the uninterrupted run does."""
    def build(gate):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
        return model, NiNo(model, torch.optim.SGD(model.parameters(), lr=0.05), gate, period=20,
                           total_steps=60)

    x, y = torch.randn(32, 4, generator=torch.Generator().manual_seed(3)), torch.randn(32, 1)

    def steps(model, opt, n):
        for _ in range(n):
            opt.zero_grad()
            if opt.need_grads:
                torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    full_gate = SkillGate(Overshoot(), threshold=0.9)
    full_model, full_opt = build(full_gate)
    steps(full_model, full_opt, 60)
    assert full_gate.decision is False and len(full_gate.log) == 3

    gate = SkillGate(Overshoot(), threshold=0.9)
    model, opt = build(gate)
    steps(model, opt, 25)
    saved_model, saved_opt = {k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict()
    assert saved_opt["nino"]["nowcaster_run_state"]["decision"] is False
    fresh = SkillGate(Overshoot(), threshold=0.9)
    model2, opt2 = build(fresh)
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    assert fresh.decision is False and len(fresh.log) == 1
    steps(model2, opt2, 35)
    assert [e["skill"] is None for e in fresh.log] == [False, True, True]  # no second backtest
    assert all(torch.equal(a, b) for a, b in zip(model2.parameters(), full_model.parameters()))
    plain_model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    class Newest:  # a nowcaster with no per-run state and no fixed ctx
        needs_graph = False

        def predict(self, graph, states, k):
            return states[:, -1].clone()

    plain = NiNo(plain_model, torch.optim.SGD(plain_model.parameters(), lr=0.05), Newest(), period=20, ctx=10,
                 total_steps=60)
    with pytest.raises(ValueError, match="run state"):
        plain.load_state_dict(saved_opt)
