"""Trajectory collector (nowcast.collect): vmap == sequential reference, store contents, resume."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nowcast import collect as C


# ---- a throwaway task: a tiny MLP classifier on fixed random data ----------------------------------------
class TinyNet(nn.Module):
    def __init__(self, hidden: int = 6):
        super().__init__()
        self.inp = nn.Linear(4, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 3)
        self.register_buffer("scale", torch.tensor(1.5))

    def forward(self, x):
        return self.out(torch.tanh(self.mid(torch.tanh(self.inp(x * self.scale)))))


class TiedNet(nn.Module):
    """Parameters used twice (an embedding tied to the output layer)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mix(self.emb(x).mean(1))))


def make_task(name="tiny", steps=12, lr=2e-2, wd=0.1, batch=8, net=TinyNet, kind="mlp"):
    task = SimpleNamespace(name=name, lr=lr, weight_decay=wd, batch_size=batch, steps=steps,
                           arch={"net": net.__name__})
    gen = torch.Generator().manual_seed(123)
    if kind == "mlp":
        data = (torch.randn(64, 4, generator=gen), torch.randint(0, 3, (64,), generator=gen))
    else:
        data = (torch.randint(0, 5, (64, 3), generator=gen), torch.randint(0, 5, (64,), generator=gen))

    def build_model(seed):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return net()

    def batches(d, seed, start):
        step = start
        while True:
            g = torch.Generator().manual_seed(seed * 100_003 + step)
            idx = torch.randint(0, len(d[0]), (batch,), generator=g)
            yield d[0][idx], d[1][idx]
            step += 1

    ops = C.TaskOps(build_model=build_model, load_data=lambda: data, batches=batches,
                    loss_fn=lambda m, x, y: F.cross_entropy(m(x), y))
    return task, ops


def reference_run(task, ops, seed, lr, steps):
    """Plain training: one module, torch.optim.AdamW; parameters (flat) after every step."""
    model = ops.build_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=task.weight_decay)
    it = ops.batches(ops.load_data(), seed, 0)
    flats, losses = [C._flat(model).clone()], []
    for _ in range(steps):
        x, y = next(it)
        opt.zero_grad()
        loss = ops.loss_fn(model, x, y)
        loss.backward()
        opt.step()
        flats.append(C._flat(model).clone())
        losses.append(float(loss.detach()))
    return torch.stack(flats), losses


def quiet(**kw):
    return dict(progress=False, **kw)


# ---- batched AdamW ------------------------------------------------------------------------------------------
def test_batched_adamw_is_torch_adamw_bitwise():
    torch.manual_seed(0)
    lrs, wd = [1e-3, 3e-2, 7e-3], 0.05
    p0 = torch.randn(3, 50)
    batched = C.BatchedAdamW(p0.clone(), lrs, wd)
    refs = [torch.nn.Parameter(p0[i].clone()) for i in range(3)]
    opts = [torch.optim.AdamW([p], lr=lr, weight_decay=wd) for p, lr in zip(refs, lrs)]
    for _ in range(25):
        g = torch.randn(3, 50) * torch.rand(3, 1) * 10
        batched.step(g)
        for i, (p, o) in enumerate(zip(refs, opts)):
            p.grad = g[i].clone()
            o.step()
    for i in range(3):
        assert torch.equal(batched.params[i], refs[i].detach())
        assert torch.equal(batched.exp_avg_sq[i], opts[i].state[refs[i]]["exp_avg_sq"])


# ---- vmap path vs sequential reference ----------------------------------------------------------------------------
@pytest.mark.parametrize("net,kind", [(TinyNet, "mlp"), (TiedNet, "tied")])
def test_vmap_matches_sequential_reference(net, kind):
    task, ops = make_task(net=net, kind=kind)
    seeds, lrs = [0, 1, 2], [1e-2, 2e-2, 5e-3]
    data = ops.load_data()
    tv = C._make_trainer("vmap", [ops.build_model(s) for s in seeds], lrs, task.weight_decay, ops.loss_fn)
    ts = C._make_trainer("sequential", [ops.build_model(s) for s in seeds], lrs, task.weight_decay, ops.loss_fn)
    assert torch.equal(tv.flat(), ts.flat())
    iv = [ops.batches(data, s, 0) for s in seeds]
    it = [ops.batches(data, s, 0) for s in seeds]
    for _ in range(20):
        xs, ys = zip(*[next(i) for i in iv])
        lv = tv.step(list(xs), list(ys))
        xs, ys = zip(*[next(i) for i in it])
        ls = ts.step(list(xs), list(ys))
        torch.testing.assert_close(lv, ls, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tv.flat(), ts.flat(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(tv.flat()[0], C._flat(ops.build_model(0)))  # it trained


def test_fm16_vmap_matches_sequential():
    from neugraph.examples import FM16

    def build(seed):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return FM16(channels=4)

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(6, 1, 28, 28, generator=g) for _ in range(3)]
    ys = [torch.randint(0, 10, (6,), generator=g) for _ in range(3)]
    loss = lambda m, x, y: F.cross_entropy(m(x), y)  # noqa: E731
    tv = C._make_trainer("vmap", [build(s) for s in range(3)], [6e-3, 1e-2, 3e-3], 0.0, loss)
    ts = C._make_trainer("sequential", [build(s) for s in range(3)], [6e-3, 1e-2, 3e-3], 0.0, loss)
    for _ in range(5):
        tv.step(xs, ys)
        ts.step(xs, ys)
    torch.testing.assert_close(tv.flat(), ts.flat(), rtol=1e-4, atol=1e-5)


# ---- the store ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["sequential", "vmap"])
def test_saved_states_are_the_parameters_at_those_steps(tmp_path, mode):
    task, ops = make_task(steps=12)
    lrs = [1e-2, 3e-2, 2e-2]
    path = C.collect(task, tmp_path, runs=3, save_every=4, lrs=lrs, group=2, mode=mode, ops=ops, **quiet())
    t = C.load_trajectories(path)
    assert t.states.shape == (3, 4, C._flat(ops.build_model(0)).numel())
    assert t.meta["save_steps"] == [0, 4, 8, 12] and t.meta["mode"] == mode
    assert t.complete_runs == [0, 1, 2] and t.done == [4, 4, 4]
    assert not list(path.glob("resume_g*.pt"))  # deleted when the group finished
    for r in range(3):
        flats, losses = reference_run(task, ops, seed=r, lr=lrs[r], steps=12)
        want = flats[[0, 4, 8, 12]].to(torch.float16).numpy()
        if mode == "sequential":  # the same arithmetic: exact after fp16 rounding
            np.testing.assert_array_equal(t.states[r], want)
        else:
            np.testing.assert_allclose(t.states[r].astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=1e-4)
        np.testing.assert_allclose(t.losses[r], [losses[0], np.mean(losses[0:4]), np.mean(losses[4:8]),
                                                 np.mean(losses[8:12])], rtol=1e-5)


def test_meta_contents(tmp_path):
    task, ops = make_task(steps=8)
    path = C.collect(task, tmp_path, runs=2, save_every=4, seeds=[5, 9], group=2, lr_jitter=0.5, ops=ops, **quiet())
    meta = json.loads((path / "meta.json").read_text())
    model = ops.build_model(5)
    assert meta["task"] == "tiny" and meta["arch"] == {"net": "TinyNet"}
    assert meta["param_names"] == [n for n, _ in model.named_parameters()]
    assert meta["param_shapes"] == [list(p.shape) for p in model.parameters()]
    assert meta["num_params"] == sum(p.numel() for p in model.parameters())
    assert meta["seeds"] == [5, 9] and meta["n_saves"] == 3 and meta["steps"] == 8
    assert all(task.lr * np.exp(-0.5) <= lr <= task.lr * np.exp(0.5) for lr in meta["lrs"])
    assert meta["lrs"][0] != meta["lrs"][1]
    assert meta["torch"] == torch.__version__ and meta["wall_s"] > 0 and "cores_available" in meta["machine"]
    # the same jitter again (deterministic in the seed)
    assert C._lrs_for(task, [5, 9], None, 0.5) == meta["lrs"]


def test_steps_rounded_down_to_a_save(tmp_path):
    task, ops = make_task()
    with pytest.warns(UserWarning, match="not a multiple"):
        path = C.collect(task, tmp_path, runs=1, steps=10, save_every=4, ops=ops, **quiet())
    assert C.load_trajectories(path).meta["save_steps"] == [0, 4, 8]


# ---- resume -------------------------------------------------------------------------------------------------
def _store_bytes(path):
    return (path / "states.f16").read_bytes(), np.load(path / "losses.npy").tobytes()


@pytest.mark.parametrize("mode", ["vmap", "sequential"])
# run-steps (group 0 has 2 runs, 24 run-steps): first step, at a save, mid-interval, in group 1
@pytest.mark.parametrize("stop", [1, 8, 13, 30])
def test_resume_after_interruption_is_bitwise(tmp_path, mode, stop):
    task, ops = make_task(steps=12)
    kw = dict(runs=3, save_every=4, group=2, mode=mode, ops=ops, lrs=[1e-2, 3e-2, 2e-2], **quiet())
    full = C.collect(task, tmp_path / "full", **kw)
    with pytest.raises(C.CollectionInterrupted):
        C.collect(task, tmp_path / "cut", stop_after=stop, **kw)
    partial = C.load_trajectories(tmp_path / "cut" / "tiny")
    assert len(partial.complete_runs) < 3
    cut = C.collect(task, tmp_path / "cut", **kw)
    assert _store_bytes(cut) == _store_bytes(full)
    assert C.load_trajectories(cut).done == [4, 4, 4]


def test_resume_after_crash_between_checkpoint_and_meta(tmp_path, monkeypatch):
    task, ops = make_task(steps=12)
    kw = dict(runs=2, save_every=4, group=2, ops=ops, **quiet())
    full = C.collect(task, tmp_path / "full", **kw)
    real = C._Store.write_meta
    calls = {"n": 0}

    def crash_on_third_save(self, meta):
        calls["n"] += 1
        if calls["n"] == 5:  # create, mode, save 0, save 1, [save 2: states + checkpoint on disk, meta not]
            raise KeyboardInterrupt
        real(self, meta)

    monkeypatch.setattr(C._Store, "write_meta", crash_on_third_save)
    with pytest.raises(KeyboardInterrupt):
        C.collect(task, tmp_path / "cut", **kw)
    monkeypatch.setattr(C._Store, "write_meta", real)
    assert C.load_trajectories(tmp_path / "cut" / "tiny").done == [2, 2]
    assert torch.load(tmp_path / "cut" / "tiny" / "resume_g0.pt", weights_only=True)["saves"] == 3
    cut = C.collect(task, tmp_path / "cut", **kw)
    assert _store_bytes(cut) == _store_bytes(full)


def test_resume_without_checkpoint_is_lossy_and_says_so(tmp_path):
    task, ops = make_task(steps=12)
    kw = dict(runs=2, save_every=4, group=2, ops=ops, **quiet())
    with pytest.raises(C.CollectionInterrupted):
        C.collect(task, tmp_path, stop_after=2 * 9, **kw)
    (tmp_path / "tiny" / "resume_g0.pt").unlink()
    with pytest.warns(UserWarning, match="fp16 store at save 2"):
        path = C.collect(task, tmp_path, **kw)
    t = C.load_trajectories(path)
    assert t.complete_runs == [0, 1] and t.meta["lossy_resumes"] == [{"group": 0, "runs": [0, 1], "save": 2}]


def test_one_collector_per_store(tmp_path):
    task, ops = make_task(steps=8)
    store = C._Store(tmp_path / "tiny")
    with store.lock():
        with pytest.raises(C.CollectError, match="another collector"):
            C.collect(task, tmp_path, runs=1, save_every=4, ops=ops, **quiet())
    assert C.load_trajectories(C.collect(task, tmp_path, runs=1, save_every=4, ops=ops, **quiet())).complete_runs == [0]


def test_mismatched_resume_is_refused(tmp_path):
    task, ops = make_task(steps=12)
    kw = dict(runs=2, save_every=4, group=2, ops=ops, mode="vmap", **quiet())
    with pytest.raises(C.CollectionInterrupted):
        C.collect(task, tmp_path, stop_after=6, **kw)
    before = _store_bytes(tmp_path / "tiny")
    for change in [dict(save_every=3), dict(steps=8), dict(lrs=[1e-3, 1e-3]), dict(seeds=[0, 2]), dict(group=1)]:
        with pytest.raises(C.CollectError, match="(?s)different settings.*--restart"):
            C.collect(task, tmp_path, **{**kw, **change})
    task2, ops2 = make_task(steps=12, wd=0.0)
    with pytest.raises(C.CollectError, match="weight_decay"):
        C.collect(task2, tmp_path, **{**kw, "ops": ops2})
    with pytest.raises(C.CollectError, match="mode='vmap'"):
        C.collect(task, tmp_path, **{**kw, "mode": "sequential"})
    assert _store_bytes(tmp_path / "tiny") == before
    # resume=False starts over
    path = C.collect(task, tmp_path, resume=False, **{**kw, "save_every": 3})
    assert C.load_trajectories(path).meta["save_every"] == 3


# ---- vmap fallback, parameter order, progress, command line -------------------------------------------------------
class ItemNet(TinyNet):
    """Data-dependent Python control flow: cannot run under vmap."""

    def forward(self, x):
        y = super().forward(x)
        return y * 2 if float(y.detach().sum()) > 1e9 else y


def test_unvmappable_model_falls_back_to_sequential(tmp_path):
    task, ops = make_task(steps=8, net=ItemNet)
    kw = dict(runs=2, save_every=4, group=2, ops=ops, mode="vmap", **quiet())
    with pytest.raises(C.CollectionInterrupted), pytest.warns(C.VmapFallbackWarning, match="sequential"):
        C.collect(task, tmp_path, stop_after=6, **kw)
    t = C.load_trajectories(tmp_path / "tiny")
    assert t.meta["mode"] == "sequential" and "vmap" in t.meta["vmap_fallback"]
    path = C.collect(task, tmp_path, **kw)  # resuming with the same command keeps the fallback
    assert C.load_trajectories(path).complete_runs == [0, 1]


def test_param_order_is_the_compiled_graphs():
    import neugraph
    from neugraph.examples import FM16

    model = FM16()
    graph = neugraph.compile(model, torch.zeros(1, 1, 28, 28), profile="nino")
    named = C._named_params(model)
    assert [n for n, _ in named] == list(graph.param_names)
    assert [list(p.shape) for _, p in named] == [list(s) for s in graph.param_shapes]
    assert torch.equal(C._flat(model), graph.flat_params(model).reshape(-1))
    tied = TiedNet()
    assert [n for n, _ in C._named_params(tied)] == ["emb.weight", "mix.weight", "mix.bias"]


def test_progress_bar(tmp_path, capsys):
    task, ops = make_task(steps=8)
    C.collect(task, tmp_path, runs=3, save_every=4, group=2, ops=ops, progress=True)
    err = capsys.readouterr().err
    assert "tiny runs 0-1" in err and "tiny runs 2-2" in err and "8/8" in err
    C.collect(task, tmp_path / "q", runs=1, save_every=4, ops=ops, progress=False)
    assert capsys.readouterr().err == ""


def test_benchmark_runs_both_paths():
    task, ops = make_task()
    res = C.benchmark(task, runs=2, steps=3, warmup=1, ops=ops)
    assert set(res) == {"vmap", "sequential"}
    assert all(r["best_run_steps_per_s"] >= r["run_steps_per_s"] > 0 for r in res.values())


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        C.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--task", "--runs", "--out", "--steps", "--save-every", "--group", "--lr-jitter", "--restart"):
        assert flag in out


def test_cli_unknown_task(capsys, tmp_path):
    assert C.main(["--task", "no-such-task", "--out", str(tmp_path)]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_cli_fm16(tmp_path, capsys):
    from nowcast.data import DataMissingError
    from nowcast import tasks as T

    try:
        T.load_task_data("fm16")
    except DataMissingError as e:
        pytest.skip(str(e))
    threads = torch.get_num_threads()
    rc = C.main(["--task", "fm16", "--runs", "2", "--steps", "4", "--save-every", "2", "--group", "2",
                 "--out", str(tmp_path), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert torch.get_num_threads() == threads  # --threads 1 applies to the command only
    t = C.load_trajectories(tmp_path / "fm16")
    assert t.states.shape == (2, 3, 14378) and t.complete_runs == [0, 1]
    model = T.build_model("fm16", 1)
    np.testing.assert_array_equal(t.states[1, 0], C._flat(model).to(torch.float16).numpy())
    assert t.meta["param_names"] == [n for n, _ in model.named_parameters()]
    assert "2/2 runs complete" in capsys.readouterr().out
