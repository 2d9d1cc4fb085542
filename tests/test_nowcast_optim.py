"""The NiNo optimizer wrapper: schedule, param groups, frozen/tied parameters, safety, resume."""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings, strategies as st

from nowcast.optim import NiNo, NowcastError, NowcastRejectedWarning
from nowcast.schedule import DynamicPeriod, NowcastSchedule, k_decay


# ---- small nowcasters ------------------------------------------------------------------------
class LineNowcaster:
    """Deterministic: newest state plus k/10 of the mean step over the context."""

    needs_graph = False

    def __init__(self) -> None:
        self.calls: list[tuple[object, torch.Tensor, int]] = []

    def predict(self, graph, states, k):
        self.calls.append((graph, states.clone(), k))
        step = (states[:, -1] - states[:, 0]) / (states.shape[1] - 1)
        return states[:, -1] + 0.1 * k * step


class GraphNowcaster(LineNowcaster):
    needs_graph = True

    def predict(self, graph, states, k):
        assert graph is not None and states.shape[0] == graph.num_params
        return super().predict(graph, states, k)


class Faulty(LineNowcaster):
    """Broken on its first call (``mode``), a line fit afterwards."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def predict(self, graph, states, k):
        good = super().predict(graph, states, k)
        if len(self.calls) > 1:
            return good
        if self.mode == "nan":
            good[3] = float("nan")
            return good
        if self.mode == "inf":
            good[-1] = float("-inf")
            return good
        if self.mode == "huge":  # finite in float64, inf once cast to the float32 parameters
            return good.double() * 1e300
        if self.mode == "spike":
            return good * 1e3
        if self.mode == "raise":
            raise RuntimeError("boom")
        if self.mode == "shape":
            return good[:-1]
        raise AssertionError(self.mode)


# ---- helpers ---------------------------------------------------------------------------------
def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 4, generator=g)
    return x, torch.sin(x[:, :3]) + 0.1 * torch.randn(16, 3, generator=g)


def loss_at(model, step):
    x, y = batch(step)
    return F.mse_loss(model(x), y)


def train(model, opt, start: int, stop: int, sched=None, skip_backward: bool = True) -> None:
    for s in range(start, stop):
        if not skip_backward or opt.need_grads:
            opt.zero_grad()
            loss_at(model, s).backward()
        else:
            opt.zero_grad()  # grads None on the nowcast step: step() must not need them
        opt.step()
        if sched is not None:
            sched.step()


def closure_for(opt, model, step: int):
    """The standard closure for batch ``step``: zero the gradients, forward, backward, return the loss."""
    def closure():
        opt.zero_grad()
        loss = loss_at(model, step)
        loss.backward()
        return loss
    return closure


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def make(model, nowcaster, **kw):
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    kw.setdefault("period", 20)
    kw.setdefault("total_steps", 100)
    return NiNo(model, base, nowcaster, **kw)


# ---- schedule --------------------------------------------------------------------------------
def test_k_decay_matches_published_schedule():
    assert k_decay(10000, 1000) == [40, 33, 26, 21, 16, 11, 8, 5, 3, 1]
    sched = NowcastSchedule(1000, 5, 10000)
    ks = k_decay(10000, 1000)
    for cycle in range(12):  # beyond total_steps the last horizon stays
        step = cycle * 1000 + 999
        assert sched.k(cycle, step) == ks[min(step // 1000, len(ks) - 1)]
    assert k_decay(500, 1000) == [40]
    assert NowcastSchedule(1000, 5, 10000, k_power=1.0).k(0, 999) == 40


def test_records_and_nowcasts_on_the_documented_steps():
    model = mlp()
    nc = LineNowcaster()
    opt = make(model, nc, period=20, ctx=5, total_steps=60)
    snapshots, nowcast_steps = [], []
    for s in range(60):
        snapshots.append(flat(model).clone())
        if not opt.need_grads:
            nowcast_steps.append(s)
        train(model, opt, s, s + 1)
        if s in (19, 39, 59):
            graph, states, k = nc.calls[-1]
            assert graph is None
            expect = torch.stack([snapshots[i] for i in (s - 16, s - 12, s - 8, s - 4, s)], 1)
            assert torch.equal(states, expect)
            assert torch.equal(flat(model), LineNowcaster().predict(None, expect, k))  # parameters = prediction
    assert nowcast_steps == [19, 39, 59]
    assert [c[2] for c in nc.calls] == k_decay(60, 20)
    assert opt.state["nowcasts"] == 3 and opt.state["nowcasts_rejected"] == 0
    assert opt.state["history"] == [] and opt.state["step"] == 60


def test_dynamic_period_nowcasts_often_early_rarely_late():
    sched = NowcastSchedule(DynamicPeriod(min_period=10, max_period=40), 5, 200)
    plan = sched.planned()
    lengths = [n for _, n in plan]
    assert lengths[0] == 10 and lengths == sorted(lengths) and lengths[-1] > 2 * lengths[0]
    assert all(n % 5 == 0 for n in lengths)
    ks = [sched.k(j, 0) for j in range(len(plan))]
    assert ks[0] == 40 and ks[-1] == 1 and ks == sorted(ks, reverse=True)

    model = mlp()
    opt = make(model, LineNowcaster(), period=DynamicPeriod(min_period=10, max_period=40), total_steps=200)
    seen = []
    for s in range(200):
        if not opt.need_grads:
            seen.append(s)
        train(model, opt, s, s + 1)
    assert seen == [start + n - 1 for start, n in plan]


def test_param_groups_are_the_base_optimizers_and_schedulers_work():
    model = mlp()
    base = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 1e-2},
                              {"params": model[2].parameters(), "lr": 1e-3}])
    opt = NiNo(model, base, LineNowcaster(), period=10, total_steps=40)
    assert opt.param_groups is base.param_groups and isinstance(opt, torch.optim.Optimizer)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 ** e)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler.step() before optimizer.step()" warning
        train(model, opt, 0, 3, sched)
    assert base.param_groups[0]["lr"] == pytest.approx(1e-2 / 8)
    assert base.param_groups[1]["lr"] == pytest.approx(1e-3 / 8)
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is base.param_groups


def test_nowcaster_none_is_the_base_optimizer():
    a, b = mlp(), mlp()
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2)
    opt_b = NiNo(b, torch.optim.AdamW(b.parameters(), lr=1e-2), None)
    train(a, opt_a, 0, 30, skip_backward=False)
    train(b, opt_b, 0, 30)
    assert torch.equal(flat(a), flat(b)) and opt_b.need_grads


class TiedFrozen(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)
        self.b.weight = self.a.weight  # tied
        self.head = torch.nn.Linear(4, 3)
        self.head.bias.requires_grad_(False)  # frozen

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


def test_frozen_and_tied_parameters():
    model = TiedFrozen()
    nc = LineNowcaster()
    base = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt = NiNo(model, base, nc, period=10, total_steps=30)
    assert opt.num_params == sum(p.numel() for p in model.parameters()) == 16 + 4 + 4 + 12 + 3
    assert opt.num_tracked == opt.num_params - 3
    with torch.no_grad():
        model.head.bias.add_(1.0)  # a frozen parameter with a distinctive value
    frozen = model.head.bias.detach().clone()
    train(model, opt, 0, 30)
    assert opt.state["nowcasts"] == 3
    assert torch.equal(model.head.bias, frozen)
    assert model.a.weight is model.b.weight
    states = nc.calls[-1][1]
    assert torch.equal(states[-3:], frozen.unsqueeze(1).expand(3, 5))  # frozen rows: constant
    assert all(h.numel() == opt.num_tracked for h in opt.state["history"])


def test_history_in_bfloat16_on_the_parameter_device():
    model = mlp()
    opt = make(model, LineNowcaster(), history_device="param", history_dtype=torch.bfloat16)
    train(model, opt, 0, 9)
    assert len(opt.state["history"]) == 2
    assert all(h.dtype == torch.bfloat16 and h.device == next(model.parameters()).device
               for h in opt.state["history"])
    train(model, opt, 9, 40)
    assert opt.state["nowcasts"] == 2 and torch.isfinite(flat(model)).all()


def test_graph_nowcaster_compiles_the_model():
    model = mlp()
    x = torch.randn(2, 4)
    opt = make(model, GraphNowcaster(), example_inputs=x)
    assert opt.graph is not None and opt.graph.num_params == opt.num_params
    train(model, opt, 0, 20)
    assert opt.state["nowcasts"] == 1
    other = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    import neugraph

    wrong = neugraph.compile(other, x, profile="nino")
    with pytest.raises(ValueError, match="graph has .* parameters but the model has"):
        make(mlp(), GraphNowcaster(), graph=wrong)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("history", [dict(), dict(history_device="param", history_dtype=torch.bfloat16)])
def test_parameters_on_cuda(history):
    model = mlp().cuda()
    opt = make(model, Faulty("nan"), **history)
    train(model, opt, 0, 19)
    assert all(h.device.type == ("cpu" if not history else "cuda") for h in opt.state["history"])
    before = flat(model).clone()
    with pytest.warns(NowcastRejectedWarning):
        opt.step()
    assert torch.equal(flat(model), before)
    train(model, opt, 20, 40)
    assert opt.state["nowcasts"] == 1 and torch.isfinite(flat(model)).all() and flat(model).is_cuda

# ---- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(ctx=1), "ctx must be an int >= 2"),
    (dict(period=21), "not divisible by ctx"),
    (dict(total_steps=None), "k_schedule='decay' needs total_steps"),
    (dict(period=DynamicPeriod(), total_steps=None), "DynamicPeriod needs total_steps"),
    (dict(k_schedule=0), "fixed horizon must be >= 1"),
    (dict(spike_factor=0.5), "spike_factor"),
])
def test_bad_arguments_say_what_to_do(kw, match):
    with pytest.raises(ValueError, match=match):
        make(mlp(), LineNowcaster(), **kw)


def test_bad_setups_say_what_to_do():
    model = mlp()
    with pytest.raises(ValueError, match="needs a neural graph: pass example_inputs"):
        make(model, GraphNowcaster())
    with pytest.raises(ValueError, match="needs a neural graph: pass graph="):
        NiNo(list(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1), GraphNowcaster(),
             total_steps=100, period=20)
    stranger = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="not parameters of the model"):
        NiNo(model, torch.optim.SGD([*model.parameters(), stranger], lr=0.1), LineNowcaster(), total_steps=100)
    nc = LineNowcaster()
    nc.ctx = 5
    with pytest.raises(ValueError, match="built for ctx=5"):
        make(model, nc, ctx=4)
    with pytest.raises(TypeError, match="base_optimizer"):
        NiNo(model, "adam", LineNowcaster(), total_steps=100)
    with pytest.raises(TypeError, match="predict"):
        make(model, object())


# ---- safety ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["nan", "inf", "huge", "spike"])
def test_faulty_nowcast_is_rolled_back_exactly_and_training_continues(mode):
    model = mlp()
    opt = make(model, Faulty(mode), period=20, spike_factor=2.0)

    for s in range(19):
        opt.step(closure_for(opt, model, s))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(NowcastRejectedWarning, match="rejected"):
        loss = opt.step(closure_for(opt, model, 19) if mode == "spike" else None)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt.state["nowcasts_rejected"] == 1 and opt.state["nowcasts"] == 0
    assert opt.state["last_nowcast"]["accepted"] is False and opt.state["history"] == []
    if mode == "spike":
        assert "spike" in opt.state["last_nowcast"]["reason"] and torch.isfinite(loss)
    opt.step(closure_for(opt, model, 20))  # a base step happens
    assert not torch.equal(flat(model), torch.cat([b.reshape(-1) for b in before]))
    for s in range(21, 40):
        opt.step(closure_for(opt, model, s))
    assert opt.state["nowcasts"] == 1 and opt.state["last_nowcast"]["accepted"]  # the next nowcast ran
    assert torch.isfinite(flat(model)).all()


class AlwaysWorse(LineNowcaster):
    """Every prediction moves the parameters far away: a loss check rejects each one."""

    def predict(self, graph, states, k):
        return super().predict(graph, states, k) + 5.0


@pytest.mark.parametrize("with_closure", [True, False])
def test_on_reject_base_takes_the_base_step_so_an_all_rejected_run_is_the_base_run(with_closure):
    steps = 60 if with_closure else 20  # Faulty predicts NaN at step 19 only, then line fits that are kept
    ref = mlp()
    base_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for s in range(steps):
        base_opt.zero_grad()
        loss_at(ref, s).backward()
        base_opt.step()
    model = mlp()
    opt = make(model, AlwaysWorse() if with_closure else Faulty("nan"), spike_factor=1.0, on_reject="base")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s in range(steps):
            if with_closure:
                opt.step(closure_for(opt, model, s))
            else:  # gradients computed on every step, the nowcast's included
                opt.zero_grad()
                loss_at(model, s).backward()
                opt.step()
    assert opt.state["nowcasts_rejected"] == steps // 20 and opt.state["nowcasts"] == 0
    assert opt.state["last_nowcast"]["base_step"]
    assert any("takes this step instead" in str(w.message) for w in caught)
    assert torch.equal(flat(model), flat(ref)), "each rejected nowcast replaced by AdamW's step, bit for bit"


def test_on_reject_skip_leaves_the_step_out_and_bad_values_are_refused():
    model = mlp()
    opt = make(model, AlwaysWorse(), spike_factor=1.0)
    assert opt.on_reject == "skip"
    for s in range(19):
        opt.step(lambda s=s: loss_at(model, s))
    before = flat(model).clone()
    with pytest.warns(NowcastRejectedWarning, match="this step was skipped"):
        opt.step(lambda: loss_at(model, 19))
    assert torch.equal(flat(model), before) and not opt.state["last_nowcast"]["base_step"]
    with pytest.raises(ValueError, match="on_reject must be 'skip'"):
        make(mlp(), AlwaysWorse(), on_reject="adam")


@pytest.mark.parametrize("mode, match", [("raise", "predict failed at step 19 .*boom"),
                                         ("shape", r"expected a tensor of shape \(67,\)")])
def test_failing_predict_leaves_model_and_state_untouched(mode, match):
    model = mlp()
    opt = make(model, Faulty(mode))
    train(model, opt, 0, 19)
    before = flat(model).clone()
    state = {k: v for k, v in opt.state.items() if k != "history"}
    with pytest.raises(NowcastError, match=match):
        opt.step()
    assert torch.equal(flat(model), before)
    assert {k: v for k, v in opt.state.items() if k != "history"} == state
    assert len(opt.state["history"]) == 4
    opt.step()  # retried: the nowcaster works now
    assert opt.state["nowcasts"] == 1 and not torch.equal(flat(model), before)


def test_closure_loss_is_returned_and_nan_loss_is_rejected():
    model = mlp()

    class NaNLoss(LineNowcaster):
        def predict(self, graph, states, k):
            out = super().predict(graph, states, k)
            return out if len(self.calls) > 1 else out * 1e30  # finite parameters, non-finite loss

    opt = make(model, NaNLoss())
    closure = lambda: loss_at(model, 0)  # noqa: E731 - loss only, gradients not needed here
    train(model, opt, 0, 19)
    before = flat(model).clone()
    with pytest.warns(NowcastRejectedWarning, match="loss after the nowcast is"):
        opt.step(closure)
    assert torch.equal(flat(model), before)


# ---- resume ----------------------------------------------------------------------------------
def run(stop: int | None, total: int, seed: int, history_dtype=None, history_device="cpu"):
    """Train ``total`` steps; if ``stop``, checkpoint there and finish in fresh objects."""
    def build(init_seed):
        model = mlp(init_seed)
        base = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
        opt = NiNo(model, base, LineNowcaster(), period=20, ctx=5, total_steps=total,
                   history_dtype=history_dtype, history_device=history_device)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        return model, opt, sched

    model, opt, sched = build(seed)
    if stop is None:
        train(model, opt, 0, total, sched)
        return flat(model), opt
    train(model, opt, 0, stop, sched)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    del model, opt, sched
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model, opt, sched = build(seed + 1)  # a different init: everything must come from the checkpoint
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    train(model, opt, stop, total, sched)
    return flat(model), opt


@settings(max_examples=12, deadline=None)
@given(stop=st.integers(1, 79), seed=st.integers(0, 3))
@example(stop=19, seed=0)  # just before a nowcast: need_grads is False on the first resumed step
@example(stop=20, seed=0)  # just after one
@example(stop=3, seed=1)   # just before the first recorded state
def test_resume_is_bitwise_exact(stop, seed):
    ref, ref_opt = run(None, 80, seed)
    got, opt = run(stop, 80, seed)
    assert torch.equal(ref, got)
    assert opt.state["nowcasts"] == ref_opt.state["nowcasts"] == 4
    assert opt.state["step"] == 80


@pytest.mark.parametrize("stop", [9, 13, 20, 47])
def test_resume_is_bitwise_exact_with_bf16_history(stop):
    ref, _ = run(None, 60, 0, history_dtype=torch.bfloat16, history_device="param")
    got, _ = run(stop, 60, 0, history_dtype=torch.bfloat16, history_device="param")
    assert torch.equal(ref, got)


def test_load_state_dict_checks_what_it_loads():
    model = mlp()
    opt = make(model, LineNowcaster())
    with pytest.raises(ValueError, match="not a NiNo state dict"):
        opt.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())
    other = make(TiedFrozen(), LineNowcaster())
    with pytest.raises(ValueError, match="num_params"):
        opt.load_state_dict(other.state_dict())


# ---- with the project's nowcasters -----------------------------------------------------------
def test_with_linefit_and_the_published_checkpoints():
    from pathlib import Path

    import nowcast

    torch.manual_seed(0)
    convnet = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=2), torch.nn.ReLU(),
                                  torch.nn.Conv2d(4, 8, 3, padding="same"), torch.nn.ReLU(),
                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
    x, y = torch.randn(32, 1, 12, 12), torch.randint(0, 10, (32,))
    with pytest.raises(ValueError, match="predicts at most 10 states ahead"):
        NiNo(convnet, torch.optim.AdamW(convnet.parameters()), nowcast.Linefit(horizon=10), total_steps=100)
    ckpts = Path(__file__).resolve().parents[2] / "shared" / "reference" / "checkpoints"
    nowcasters = [nowcast.Linefit()]
    if ckpts.is_dir():  # the published weights live beside the project, never in it
        nowcasters += [nowcast.load(ckpts / "nino_no_posw.pt"), nowcast.load(ckpts / "nino_mlp.pt")]
    for nc in nowcasters:
        model = copy.deepcopy(convnet)
        opt = NiNo(model, torch.optim.AdamW(model.parameters(), lr=6e-3), nc, period=25, total_steps=50,
                   example_inputs=x[:2])
        for _ in range(50):
            jump = not opt.need_grads
            before = flat(model).clone()
            if not jump:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
            opt.step()
            if jump:  # the nowcast wrote finite, new parameters
                assert torch.isfinite(flat(model)).all() and not torch.equal(flat(model), before)
        assert opt.state["nowcasts"] == 2, type(nc).__name__
        assert torch.isfinite(F.cross_entropy(model(x), y))


# ---- hold: parameters a nowcast leaves where they are ------------------------------------------
class Normed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.ln, self.fc2 = torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3)
        self.rms = type("MyRMSNorm", (torch.nn.Module,), {})()  # a norm known only by its class name
        self.rms.weight = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.fc2(self.ln(self.fc1(x))) * self.rms.weight


@pytest.mark.parametrize("hold", ["norms", lambda name, p: name.startswith(("ln.", "rms."))])
def test_hold_leaves_the_held_parameters_at_their_value_before_the_nowcast(hold):
    model = Normed()
    opt = make(model, LineNowcaster(), period=10, hold=hold)
    assert opt.held_names == ["ln.weight", "ln.bias", "rms.weight"] and opt.num_held == 8 + 8 + 3
    train(model, opt, 0, 9)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, opt, 9, 10)  # the nowcast
    assert opt.state["nowcasts"] == 1
    graph_, states, k = opt.nowcaster.calls[-1]
    pred = states[:, -1] + 0.1 * k * (states[:, -1] - states[:, 0]) / (states.shape[1] - 1)
    off = 0
    for n, p in model.named_parameters():
        want = before[n] if n in opt.held_names else pred[off: off + p.numel()].view(p.shape)
        assert torch.equal(p.detach(), want), n
        assert n in opt.held_names or not torch.equal(p.detach(), before[n]), n
        off += p.numel()


def test_hold_norms_finds_the_norm_layers_of_real_models():
    from nowcast.tasks import build_model

    model = build_model("austen-3-24", 0)
    plain = NiNo(model, torch.optim.AdamW(model.parameters()), LineNowcaster(), total_steps=100, hold=None)
    assert plain.num_held == 0 and plain.held_names == [] and plain.hold is None
    opt = NiNo(model, torch.optim.AdamW(model.parameters()), LineNowcaster(), total_steps=100, hold="norms")
    assert {n.split(".")[-2] for n in opt.held_names} == {"ln_1", "ln_2", "ln_f"}
    assert opt.num_held == (3 * 2 * 2 + 2) * 24
    llama = build_model("austen-llama-3-64", 0)
    opt = NiNo(llama, torch.optim.AdamW(llama.parameters()), LineNowcaster(), total_steps=100, hold="norms")
    assert len(opt.held_names) == 3 * 2 + 1 and all("norm" in n for n in opt.held_names)
    cnn = build_model("fm16", 0)  # the vision nets have no normalisation layer: hold="norms" is a no-op
    assert NiNo(cnn, torch.optim.AdamW(cnn.parameters()), LineNowcaster(), total_steps=100, hold="norms").num_held == 0


def test_hold_embeddings_finds_the_embedding_tables_and_the_tied_head():
    from nowcast.tasks import build_model

    bpe = build_model("austen-3-24-bpe", 0)  # GPT-2 BPE, lm_head tied to wte: one tensor, held once
    opt = NiNo(bpe, torch.optim.AdamW(bpe.parameters()), LineNowcaster(), total_steps=100, hold="embeddings")
    assert opt.held_names == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert opt.num_held == 50257 * 24 + 64 * 24
    both = NiNo(bpe, torch.optim.AdamW(bpe.parameters()), LineNowcaster(), total_steps=100,
                hold="norms+embeddings")
    assert set(both.held_names) == set(opt.held_names) | {n for n, _ in bpe.named_parameters() if ".ln_" in n}
    llama = build_model("austen-llama-3-64", 0)
    opt = NiNo(llama, torch.optim.AdamW(llama.parameters()), LineNowcaster(), total_steps=100, hold="embeddings")
    assert opt.held_names == [n for n, _ in llama.named_parameters() if "embed_tokens" in n]
    cnn = build_model("fm16", 0)
    assert NiNo(cnn, torch.optim.AdamW(cnn.parameters()), LineNowcaster(), total_steps=100,
                hold="embeddings").num_held == 0


def test_hold_auto_holds_the_vectors_of_normalised_models_only():
    """``hold="auto"``: biases and norm gains/shifts of a model with normalisation layers (the
    language models) stay with the base optimizer; a model without any (the vision nets) is nowcast
    whole. The default stays None: everything nowcast."""
    from nowcast.tasks import build_model

    for name in ("austen-3-24", "austen-llama-3-64", "austen-3-24-bpe"):
        model = build_model(name, 0)
        assert NiNo(model, torch.optim.AdamW(model.parameters()), LineNowcaster(), total_steps=100).num_held == 0
        opt = NiNo(model, torch.optim.AdamW(model.parameters()), LineNowcaster(), total_steps=100, hold="auto")
        vectors = [n for n, p in model.named_parameters() if p.dim() == 1]
        assert opt.hold == "vectors" and opt.held_names == vectors and len(vectors) > 0, name
        assert opt.num_held == sum(p.numel() for p in model.parameters() if p.dim() == 1)
        assert any(n.endswith("bias") for n in vectors) == (name != "austen-llama-3-64")  # Llama: no biases
    cnn = build_model("fm16", 0)  # biases, but no normalisation layer
    opt = NiNo(cnn, torch.optim.AdamW(cnn.parameters()), LineNowcaster(), total_steps=100, hold="auto")
    assert opt.hold is None and opt.num_held == 0
    model = Normed()  # given only the parameters, "auto" cannot see the layers: nothing is held
    opt = NiNo(list(model.parameters()), torch.optim.AdamW(model.parameters()), LineNowcaster(), total_steps=100,
               hold="auto")
    assert opt.hold is None and opt.num_held == 0
    opt = make(Normed(), LineNowcaster(), hold="vectors")
    assert opt.held_names == ["fc1.bias", "ln.weight", "ln.bias", "fc2.bias", "rms.weight"]


def test_hold_bad_arguments_say_what_to_do():
    model = Normed()
    with pytest.raises(ValueError, match="'auto', None, 'norms', 'embeddings', 'vectors'"):
        make(model, LineNowcaster(), hold="biases")
    with pytest.raises(ValueError, match="needs the model"):
        NiNo(list(model.parameters()), torch.optim.AdamW(model.parameters()), LineNowcaster(), total_steps=100,
             hold="norms")
    with pytest.raises(TypeError, match="callable"):
        make(model, LineNowcaster(), hold=3)


# ---- min_k: nowcasts too short to save a step are skipped ----------------------------------------
def test_min_k_skips_the_final_k1_nowcast_and_takes_the_base_step_there():
    assert k_decay(100, 20)[-1] == 1
    skipping, ref = mlp(), mlp()
    nc = LineNowcaster()
    opt = make(skipping, nc, min_k=2)
    need = []
    for s in range(100):
        need.append(opt.need_grads)
        train(skipping, opt, s, s + 1)
    assert [s for s, n in enumerate(need) if not n] == [19, 39, 59, 79], "no nowcast (no grads skipped) at 99"
    assert [c[2] for c in nc.calls] == k_decay(100, 20)[:-1]
    assert (opt.state["nowcasts"], opt.state["nowcasts_skipped"], opt.state["nowcasts_rejected"]) == (4, 1, 0)
    last = opt.state["last_nowcast"]
    assert last["step"] == 99 and last["k"] == 1 and last["skipped"] and last["base_step"]
    assert opt.state["history"] == [] and opt.state["cycle"] == 5

    every = make(ref, LineNowcaster())  # min_k=1: the published schedule, k=1 at step 99
    train(ref, every, 0, 99)
    every.base_optimizer.zero_grad()
    loss_at(ref, 99).backward()
    every.base_optimizer.step()  # what min_k=2 does at step 99
    assert torch.equal(flat(skipping), flat(ref))

    restored = make(mlp(), LineNowcaster(), min_k=2)
    restored.load_state_dict(opt.state_dict())
    assert restored.state["nowcasts_skipped"] == 1


@pytest.mark.parametrize("min_k", [0, 1.5, True])
def test_min_k_must_be_a_positive_int(min_k):
    with pytest.raises(ValueError, match="min_k must be an int >= 1"):
        make(mlp(), LineNowcaster(), min_k=min_k)
