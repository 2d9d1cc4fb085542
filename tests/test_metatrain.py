"""Meta-trainer: windows and targets, the loss on the inference path, NaN safety, exact resume,
deterministic checkpoints, save/load, the command line.

The store is real: a tiny MLP trained with torch.optim.AdamW on a fixed regression problem, its
parameters saved every SAVE_EVERY steps into the collector's format (states.f16 + meta.json).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import neugraph
import nowcast
from nowcast import metatrain as mt
from nowcast.scaling import scale, unscale

SAVE_EVERY = 2
STEPS = 60  # -> 31 saves (save 0 = the initial parameters)
RUNS = 4
PERIOD = 20  # ctx 5 -> one state every 4 steps = every 2 saves
STRIDE = 2
TINY = dict(hidden=16, layers=2, horizon=8)  # K = 8


def tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def write_store(root: Path, name: str = "tiny", done_last: int = 20) -> Path:
    """Train RUNS tiny models with AdamW and write their trajectories in the store format.

    The last run is cut short (``done_last`` saves), as a run still being collected would be.
    """
    path = root / name
    path.mkdir(parents=True)
    n_saves = STEPS // SAVE_EVERY + 1
    names = [n for n, _ in tiny_model(0).named_parameters()]
    P = sum(p.numel() for p in tiny_model(0).parameters())
    mm = np.memmap(path / "states.f16", dtype=np.float16, mode="w+", shape=(RUNS, n_saves, P))
    g = torch.Generator().manual_seed(123)
    x = torch.randn(64, 4, generator=g)
    y = torch.randn(64, 3, generator=g)
    done = []
    for r in range(RUNS):
        model = tiny_model(r)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        flat = lambda: torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()  # noqa: E731
        mm[r, 0] = flat()
        n = n_saves if r < RUNS - 1 else done_last
        for step in range(1, STEPS + 1):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
            if step % SAVE_EVERY == 0 and step // SAVE_EVERY < n:
                mm[r, step // SAVE_EVERY] = flat()
        done.append(n)
    mm.flush()
    np.save(path / "losses.npy", np.full((RUNS, n_saves), np.nan, dtype=np.float32))
    meta = {"format": "nowcast-trajectories/1", "task": name, "num_params": P, "param_names": names,
            "save_every": SAVE_EVERY, "steps": STEPS, "n_saves": n_saves, "runs": RUNS, "done": done,
            "states": {"file": "states.f16", "dtype": "float16", "shape": [RUNS, n_saves, P]},
            "losses": {"file": "losses.npy"}}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny graphs: one thread is ~20x faster than two on a shared, busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def graph_ir():
    model = tiny_model(0)
    ir = neugraph.trace(model, torch.zeros(1, 4))
    return neugraph.compile(ir, profile="nino", lpe=8), ir


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("traj"))


@pytest.fixture()
def task(store, graph_ir):
    graph, ir = graph_ir
    return mt.load_task("tiny", store, graph, period=PERIOD, ctx=5, horizon=TINY["horizon"], ir=ir)


def config(**kw) -> mt.MetaTrainConfig:
    base = dict(steps=12, batch=4, per_run=2, lr=3e-3, ckpt_every=4, val_every=6, val_windows=4, model=TINY)
    base.update(kw)
    return mt.MetaTrainConfig(**base)


# ---- windows ------------------------------------------------------------------------------------
def test_store_geometry(task):
    assert task.stride == STRIDE
    assert list(task.done) == [31, 31, 31, 20]
    assert list(task.val_runs) == [3] and list(task.train_runs) == [0, 1, 2]  # last 10% of 4 runs -> 1
    assert mt.window_stride(1000, 5, 10) == 20
    with pytest.raises(mt.MetaTrainError, match="multiple of 150"):  # 200 steps is not a whole number of saves
        mt.window_stride(1000, 5, 30)
    with pytest.raises(mt.MetaTrainError, match="multiple of 20"):
        mt.window_stride(30, 5, 4)


def test_windows_targets_masks_by_hand(task):
    mm = np.memmap(Path(task.states.filename), dtype=np.float16, mode="r", shape=task.states.shape)
    # run 0 (31 saves): newest save 22 -> window saves 14,16,18,20,22; targets 24,26,28,30 valid, 32.. masked
    (win, tgt, mask), (win2, tgt2, mask2) = mt.read_windows(task, 0, [22, 24])
    assert torch.equal(win, torch.tensor(mm[0, [14, 16, 18, 20, 22]].astype(np.float32)).t())
    assert mask.tolist() == [True] * 4 + [False] * 4
    assert torch.equal(tgt[:, :4], torch.tensor(mm[0, [24, 26, 28, 30]].astype(np.float32)).t())
    assert torch.equal(tgt[:, 4:], win[:, -1:].expand(-1, 4))  # masked targets are finite placeholders
    assert torch.equal(win2, torch.tensor(mm[0, [16, 18, 20, 22, 24]].astype(np.float32)).t())
    assert mask2.tolist() == [True] * 3 + [False] * 5
    # the cut-short run 3 (20 saves, 0..19): newest 8 -> targets 10..18 valid (k=1..5), 20.. masked
    (win, tgt, mask), = mt.read_windows(task, 3, [8])
    assert torch.equal(win, torch.tensor(mm[3, [0, 2, 4, 6, 8]].astype(np.float32)).t())
    assert mask.tolist() == [True] * 5 + [False] * 3
    assert torch.equal(tgt[:, :5], torch.tensor(mm[3, [10, 12, 14, 16, 18]].astype(np.float32)).t())
    assert mt.window_saves(22, 2, 5).tolist() == [14, 16, 18, 20, 22]
    assert mt.target_saves(22, 2, 3).tolist() == [24, 26, 28]


def test_sampler_stays_inside_the_trajectories(task):
    s = mt.WindowSampler([task], torch.Generator().manual_seed(0), per_run=3, lpe=8)
    seen = set()
    for _ in range(60):
        for w in s.draw():
            assert w.run in (0, 1, 2)
            lo, hi = task.newest_range(w.run)
            assert lo <= w.newest <= hi
            assert w.mask[0] and w.mask.sum() == min(8, (task.done[w.run] - 1 - w.newest) // STRIDE)
            assert set(w.lpe_sign.tolist()) <= {-1.0, 1.0}
            seen.add(w.newest)
    assert min(seen) == 8 and max(seen) == 28  # both ends of the valid range are reached
    # same generator seed, same windows
    a = mt.WindowSampler([task], torch.Generator().manual_seed(5)).batch(6)
    b = mt.WindowSampler([task], torch.Generator().manual_seed(5)).batch(6)
    assert all(torch.equal(x.states, y.states) and x.newest == y.newest for x, y in zip(a, b))


def test_permutation_augmentation_is_a_symmetry(task, graph_ir):
    _, ir = graph_ir
    idx = mt.flat_permutation(task, torch.Generator().manual_seed(3))
    assert sorted(idx.tolist()) == list(range(task.num_params)) and not torch.equal(idx, torch.arange(len(idx)))
    model = tiny_model(0)
    flat = task.graph.flat_params(model)
    permuted = tiny_model(1)
    torch.nn.utils.vector_to_parameters(flat[idx], permuted.parameters())
    x = torch.randn(5, 4)
    torch.testing.assert_close(model(x), permuted(x))  # the permuted state is the same function
    s = mt.WindowSampler([task], torch.Generator().manual_seed(0), per_run=2, permute=True)
    group = s.draw()
    (win, tgt, _), _ = mt.read_windows(task, group[0].run, [group[0].newest, group[0].newest + STRIDE])
    assert not torch.equal(group[0].states, win)
    assert torch.equal(group[0].states.sort(0).values, win.sort(0).values)  # the same values, moved
    assert torch.equal(group[0].lpe_sign, group[1].lpe_sign)  # one flip per group


def test_store_must_match_the_graph(store):
    other = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2), nn.Linear(2, 1))
    g = neugraph.compile(other, torch.zeros(1, 4), profile="nino")
    with pytest.raises(mt.MetaTrainError, match="recollect"):
        mt.load_task("tiny", store, g, period=PERIOD, horizon=8)
    with pytest.raises(mt.MetaTrainError, match="holds task 'tiny'"):
        mt.load_task("fm16", store, g, period=PERIOD, horizon=8)
    with pytest.raises(mt.MetaTrainError, match="no trajectory store"):
        mt.load_task("tiny", store.parent / "missing", g)


# ---- the loss -----------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["mlp", "gru"])
def test_all_horizons_match_the_inference_path(task, head):
    torch.manual_seed(0)
    model = nowcast.NiNoGNN(**TINY, head=head).eval()
    (win, tgt, mask), = mt.read_windows(task, 1, [12])
    scaled, sc = scale(win, task.graph, model.scaling)
    with torch.no_grad():
        allk = mt.predict_scaled_all(model, task.graph, scaled)
    for k in range(1, 9):
        ref = model.predict(task.graph, win, k)
        torch.testing.assert_close(unscale(allk[:, k - 1], sc, exact=model.exact_unscale), ref, rtol=0, atol=1e-6)
    # the loss by hand: mean |pred - target| in scaled space over valid horizons
    w = mt.Window(0, 1, 12, win, tgt, mask)
    shift, div = sc.rows()
    want = (allk - (tgt - shift) / div).abs()[:, mask].mean()
    with torch.no_grad():
        torch.testing.assert_close(mt.window_loss(model, task, w), want)


def test_persistence_loss_is_the_no_change_prediction(task):
    """A model that predicts no change scores exactly the persistence loss (the collapse floor)."""
    model = nowcast.NiNoGNN(**TINY).eval()
    (win, tgt, mask), = mt.read_windows(task, 1, [12])
    w = mt.Window(0, 1, 12, win, tgt, mask)
    with torch.no_grad():
        base = mt.persistence_loss(model, task, w)
        assert float(base) > 0 and not torch.isclose(mt.window_loss(model, task, w), base)
        for p in model.head.parameters():
            p.zero_()
        torch.testing.assert_close(mt.window_loss(model, task, w), base)


def test_relative_loss_is_the_loss_over_the_no_change_loss(task, tmp_path):
    model = nowcast.NiNoGNN(**TINY).eval()
    (win, tgt, mask), = mt.read_windows(task, 1, [12])
    w = mt.Window(0, 1, 12, win, tgt, mask)
    rel = mt.relative_window_loss(model, task, w)
    torch.testing.assert_close(rel, mt.window_loss(model, task, w) / mt.persistence_loss(model, task, w), rtol=0, atol=0)
    rel.backward()  # the gradient flows through the model's loss only
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # a meta-training step with relative=True uses it (the logged training loss is the ratio)
    trainer = mt.MetaTrainer([task], config(relative=True), tmp_path, device="cpu", progress=False)
    trainer.model.load_state_dict(model.state_dict())
    res = trainer.train_step([w])
    assert res.ok and res.loss == pytest.approx(float(rel.detach()), rel=1e-5)
    assert trainer.cfg.training_dict()["relative"] is True


def test_log_reports_the_floor_and_each_task(graph_ir, tmp_path):
    graph, ir = graph_ir
    tasks = [mt.load_task(name, write_store(tmp_path / "traj", name=name), graph, period=PERIOD,
                          horizon=TINY["horizon"], ir=ir) for name in ("tiny", "tiny2")]
    summary = mt.MetaTrainer(tasks, config(steps=6, val_windows=8), tmp_path / "run", device="cpu",
                             progress=False).run()
    vals = [r for r in mt.read_log(tmp_path / "run" / "log.jsonl") if "val_loss" in r]
    assert [r["step"] for r in vals] == [0, 6]
    first = vals[0]
    assert set(first["persistence_by_task"]) == set(first["val_by_task"]) == {"tiny", "tiny2"}
    assert min(first["persistence_by_task"].values()) <= first["val_persistence"] <= max(
        first["persistence_by_task"].values())
    assert summary["val_persistence"] == first["val_persistence"] and set(summary["val_by_task"]) == {"tiny", "tiny2"}
    # the trained nowcaster and its last checkpoint score what the run's last validation said
    run = tmp_path / "run"
    rows = {}
    for path in (run / "nowcaster", run / "checkpoints" / "step_00000006.pt"):
        rows[path] = mt.heldout_losses(mt.load_for_evaluation(path), tasks,
                                       mt.fixed_windows(tasks, 8, seed=config().seed + 1_000_003))
        assert rows[path]["all"] == pytest.approx(vals[-1]["val_loss"], rel=1e-6)
        assert rows[path]["tiny"] == pytest.approx(vals[-1]["val_by_task"]["tiny"], rel=1e-6)


def test_cli_evaluate_trains_nothing(store, graph_ir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mt, "compile_task", lambda name, lpe=8: graph_ir)
    common = ["--data", str(store.parent), "--tasks", "tiny", "--period", str(PERIOD), "--hidden", "16",
              "--layers", "2", "--no-progress", "--val-windows", "4"]
    assert mt.main(common + ["--steps", "2", "--batch", "2", "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    out = tmp_path / "untouched"
    assert mt.main(common + ["--out", str(out), "--json", "--evaluate", str(tmp_path / "run" / "nowcaster")]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert not out.exists()
    assert rows[str(tmp_path / "run" / "nowcaster")]["all"] == pytest.approx(
        json.loads((tmp_path / "run" / "summary.json").read_text())["val_loss"], rel=1e-6)
    assert rows["no-change"]["all"] > 0
    assert mt.main(common + ["--evaluate", str(tmp_path / "run" / "nowcaster")]) == 0
    assert "no-change: tiny" in capsys.readouterr().out


def test_lpe_sign_flip_leaves_the_graph_alone(task):
    g = task.graph
    before = g.node_features.clone()
    sign = torch.tensor([-1.0, 1, -1, 1, 1, 1, 1, -1])
    flipped = mt._signed_graph(g, sign)
    assert torch.equal(g.node_features, before)
    assert torch.equal(flipped.node_features, before * sign)
    assert flipped.edge_index is g.edge_index


def test_overfit_one_window(task, tmp_path):
    trainer = mt.MetaTrainer([task], config(steps=200, lr=1e-2, min_lr=1e-2, clip=100.0), tmp_path, device="cpu",
                             progress=False)
    (win, tgt, mask), = mt.read_windows(task, 0, [16])
    w = mt.Window(0, 0, 16, win, tgt, mask)
    with torch.no_grad():
        first = float(mt.window_loss(trainer.model, task, w))
    for _ in range(200):
        res = trainer.train_step([w])
        assert res.ok
    with torch.no_grad():
        last = float(mt.window_loss(trainer.model, task, w))
    print(f"overfit: {first:.4f} -> {last:.4f}")
    assert last < 0.15 * first, (first, last)


def test_nan_window_does_not_touch_the_weights(task, tmp_path):
    trainer = mt.MetaTrainer([task], config(), tmp_path, device="cpu", progress=False)
    good = trainer.sampler.batch(3)
    trainer.train_step(good)  # the optimizer has moments now
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = {k: v.clone() for k, v in trainer.opt.state_dict()["state"][0].items()}
    bad = mt.Window(good[0].task, 0, 16, good[0].states.clone(), good[0].targets, good[0].mask)
    bad.states[5, 2] = float("nan")
    res = trainer.train_step(good[1:] + [bad])
    assert not res.ok and trainer.skipped == 1 and trainer.step == 2
    assert all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())
    assert all(torch.equal(v, moments[k]) for k, v in trainer.opt.state_dict()["state"][0].items())
    assert all(p.grad is None for p in trainer.model.parameters())
    assert trainer.train_step(good).ok  # training goes on


def test_sampler_drops_non_finite_windows(store, graph_ir, tmp_path):
    bad_root = tmp_path / "bad"
    import shutil

    shutil.copytree(store, bad_root / "tiny")
    mm = np.memmap(bad_root / "tiny" / "states.f16", dtype=np.float16, mode="r+")
    meta = json.loads((bad_root / "tiny" / "meta.json").read_text())
    mm = mm.reshape(meta["runs"], meta["n_saves"], meta["num_params"])
    mm[0, 10:, 3] = np.inf  # run 0 diverged after save 9
    mm.flush()
    graph, ir = graph_ir
    t = mt.load_task("tiny", bad_root / "tiny", graph, period=PERIOD, horizon=8)
    s = mt.WindowSampler([t], torch.Generator().manual_seed(0), per_run=2)
    for _ in range(40):
        for w in s.draw():
            assert torch.isfinite(w.states).all() and torch.isfinite(w.targets).all()
            if w.run == 0:
                assert w.newest <= 9 and not w.mask[(10 - w.newest + 1) // 2:].any()
    assert s.bad_windows > 0


# ---- the loop: checkpoints, resume, determinism, the saved nowcaster ----------------------------
def test_resume_and_determinism_give_identical_checkpoints(task, tmp_path):
    cfg = config()
    a = mt.MetaTrainer([task], cfg, tmp_path / "a", device="cpu", progress=False).run()
    assert a["step"] == 12 and a["skipped_steps"] == 0 and np.isfinite(a["val_loss"])
    mt.MetaTrainer([task], cfg, tmp_path / "b", device="cpu", progress=False).run()
    # interrupted after step 6 (checkpoint at 4), rerun in the same directory
    part = mt.MetaTrainer([task], cfg, tmp_path / "c", device="cpu", progress=False).run(until=6)
    assert part["step"] == 6 and not (tmp_path / "c" / "nowcaster").exists()
    mt.MetaTrainer([task], cfg, tmp_path / "c", device="cpu", progress=False).run()
    files = [tmp_path / d / "nowcaster" / "nowcaster.safetensors" for d in "abc"]
    assert files[0].read_bytes() == files[1].read_bytes() == files[2].read_bytes()
    # the training checkpoints hold the same values too (optimizer moments, RNG states, ...); their bytes
    # may differ only in how pickle memoises the optimizer's state keys after load_state_dict
    ckpts = [torch.load(tmp_path / d / "checkpoints" / "step_00000012.pt", weights_only=True) for d in "abc"]
    assert same_values(ckpts[0], ckpts[1]) and same_values(ckpts[0], ckpts[2])
    def loss(d):
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in mt.read_log(tmp_path / d / "log.jsonl")]

    assert loss("a") == loss("c") and [s for s, _, v in loss("a") if v is None] == list(range(1, 13))
    assert len(list((tmp_path / "a" / "checkpoints").glob("*.pt"))) == 2  # keep=2
    assert (tmp_path / "a" / "loss.png").stat().st_size > 1000
    # the same directory with other settings is refused, naming the fix
    with pytest.raises(mt.MetaTrainError, match="same arguments"):
        mt.MetaTrainer([task], config(lr=1e-3), tmp_path / "a", device="cpu", progress=False).run()


def test_checkpoints_written_before_relative_and_init_existed_still_resume(task, tmp_path):
    cfg = config()
    mt.MetaTrainer([task], cfg, tmp_path / "old", device="cpu", progress=False).run(until=8)
    for f in (tmp_path / "old" / "checkpoints").glob("*.pt"):
        state = torch.load(f, weights_only=True)
        del state["config"]["relative"], state["config"]["init"]  # what an older version wrote
        torch.save(state, f)
    assert mt.MetaTrainer([task], cfg, tmp_path / "old", device="cpu", progress=False).run()["step"] == 12
    with pytest.raises(mt.MetaTrainError, match="relative"):  # but a changed setting is still refused
        mt.MetaTrainer([task], config(relative=True), tmp_path / "old", device="cpu", progress=False).run()


def same_values(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_values(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_values(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b) and a == b


def test_saved_nowcaster_predicts_identically(task, tmp_path):
    trainer = mt.MetaTrainer([task], config(steps=4), tmp_path, device="cpu", progress=False)
    summary = trainer.run()
    loaded = nowcast.load(summary["nowcaster"])
    assert isinstance(loaded, nowcast.NiNoGNN) and loaded.config == trainer.model.config
    (win, _, _), = mt.read_windows(task, 2, [20])
    for k in (1, 3, 8):
        assert torch.equal(loaded.predict(task.graph, win, k), trainer.model.eval().predict(task.graph, win, k))
    assert (tmp_path / "nowcaster" / "nowcaster.safetensors").stat().st_size < 10 * 2**20


def test_init_starts_from_a_saved_nowcaster(task, tmp_path):
    first = mt.MetaTrainer([task], config(steps=4), tmp_path / "a", device="cpu", progress=False).run()
    src = nowcast.load(first["nowcaster"])
    warm = mt.MetaTrainer([task], config(steps=4, init=first["nowcaster"]), tmp_path / "b", device="cpu",
                          progress=False)
    assert all(torch.equal(a, b) for a, b in zip(warm.model.state_dict().values(), src.state_dict().values()))
    cold = mt.MetaTrainer([task], config(steps=4), tmp_path / "c", device="cpu", progress=False)
    assert not all(torch.equal(a, b) for a, b in zip(cold.model.state_dict().values(), src.state_dict().values()))
    assert warm.cfg.training_dict()["init"] == first["nowcaster"]
    with pytest.raises(mt.MetaTrainError, match="--hidden"):
        mt.MetaTrainer([task], config(steps=4, init=first["nowcaster"], model=dict(TINY, hidden=8)), tmp_path / "d",
                       device="cpu", progress=False)


def test_config_errors_name_the_fix():
    with pytest.raises(mt.MetaTrainError, match="val_every must be >= 1"):
        mt.MetaTrainConfig(val_every=0)
    with pytest.raises(mt.MetaTrainError, match="min_lr"):
        mt.MetaTrainConfig(lr=1e-3, min_lr=1e-2)
    s = mt.WarmupCosine(100, warmup=10, min_ratio=0.01)
    assert s(0) == pytest.approx(0.1) and s(9) == 1.0 and s(10) == 1.0
    assert s(55) == pytest.approx(0.505) and s(100) == pytest.approx(0.01)


def test_default_model_fits_the_size_limit():
    weights = sum(p.numel() for p in nowcast.NiNoGNN().parameters())
    assert 4 * weights < 10 * 2**20  # float32 safetensors of the default architecture


# ---- command line -------------------------------------------------------------------------------
def test_cli(store, graph_ir, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        mt.main(["--help"])
    assert "--resume" in capsys.readouterr().out
    monkeypatch.setattr(mt, "compile_task", lambda name, lpe=8: graph_ir)
    common = ["--data", str(store.parent), "--tasks", "tiny", "--steps", "3", "--batch", "2", "--period",
              str(PERIOD), "--hidden", "16", "--layers", "2", "--no-progress", "--val-windows", "2"]
    args = common + ["--out", str(tmp_path / "run")]
    assert mt.main(args) == 0
    out = capsys.readouterr().out
    assert "train loss" in out and "val loss" in out and "nowcaster saved to" in out
    assert nowcast.load(tmp_path / "run" / "nowcaster").config["hidden"] == 16
    with pytest.raises(mt.MetaTrainError, match="no checkpoint"):
        mt.main(common + ["--out", str(tmp_path / "other"), "--resume"])


def test_cli_reads_several_stores_of_one_task(store, graph_ir, tmp_path, monkeypatch):
    """``--data a,b``: each root's store becomes its own task with its own held-out runs."""
    second = write_store(tmp_path / "second", done_last=12)
    monkeypatch.setattr(mt, "compile_task", lambda name, lpe=8: graph_ir)
    out = tmp_path / "run"
    assert mt.main(["--data", f"{store.parent},{second.parent}", "--tasks", "tiny", "--steps", "2", "--batch", "2",
                    "--period", str(PERIOD), "--hidden", "16", "--layers", "2", "--no-progress",
                    "--val-windows", "2", "--out", str(out)]) == 0
    tasks = json.loads((out / "config.json").read_text())["tasks"]
    assert [t["store"] for t in tasks] == [str(store), str(second)]
    assert all(t["val_runs"] == 1 and t["train_runs"] >= 1 for t in tasks)
    limited = tmp_path / "limited"
    assert mt.main(["--data", f"{store.parent},{second.parent}", "--tasks", "tiny", "--steps", "1", "--batch", "2",
                    "--period", str(PERIOD), "--hidden", "16", "--layers", "2", "--no-progress",
                    "--val-windows", "2", "--max-runs", f"{RUNS},2", "--out", str(limited)]) == 0
    tasks = json.loads((limited / "config.json").read_text())["tasks"]
    assert [t["train_runs"] + t["val_runs"] for t in tasks] == [RUNS, 2]
    with pytest.raises(mt.MetaTrainError, match="2 values for 1 --data roots"):
        mt.main(["--data", str(store.parent), "--tasks", "tiny", "--steps", "1", "--period", str(PERIOD),
                 "--max-runs", "2,2", "--out", str(tmp_path / "run3")])
    with pytest.raises(mt.MetaTrainError, match="no trajectory store here"):
        mt.main(["--data", f"{store.parent},{tmp_path / 'missing'}", "--tasks", "tiny", "--steps", "1",
                 "--period", str(PERIOD), "--hidden", "16", "--layers", "2", "--no-progress",
                 "--out", str(tmp_path / "run2")])


def test_cli_takes_one_period_per_task(store, graph_ir, tmp_path, monkeypatch):
    """``--period P1,P2``: each task's windows use its own period (its stride in saves follows)."""
    write_store(store.parent, name="tiny2")
    monkeypatch.setattr(mt, "compile_task", lambda name, lpe=8: graph_ir)
    out = tmp_path / "run"
    common = ["--data", str(store.parent), "--tasks", "tiny,tiny2", "--steps", "1", "--batch", "2", "--hidden", "16",
              "--layers", "2", "--no-progress", "--val-windows", "2"]
    assert mt.main(common + ["--period", f"{PERIOD},{2 * PERIOD}", "--out", str(out)]) == 0
    tasks = json.loads((out / "config.json").read_text())["tasks"]
    stride = PERIOD // 5 // SAVE_EVERY
    assert [(t["task"], t["stride_saves"]) for t in tasks] == [("tiny", stride), ("tiny2", 2 * stride)]
    with pytest.raises(mt.MetaTrainError, match="3 values for 2 --tasks"):
        mt.main(common + ["--period", f"{PERIOD},{PERIOD},{PERIOD}", "--out", str(tmp_path / "run2")])
    with pytest.raises(SystemExit):
        mt.main(common + ["--period", "20,x", "--out", str(tmp_path / "run3")])


PUBLISHED = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "checkpoints" / "nino_no_posw.pt"


@pytest.mark.skipif(not PUBLISHED.is_file(), reason="published checkpoint not found (../shared/reference is beside "
                                                     "the repository in CI)")
def test_evaluate_reads_a_published_checkpoint(store, graph_ir):
    """A published NiNo ``.pt`` is not mistaken for a meta-training checkpoint."""
    model = mt.load_for_evaluation(PUBLISHED)
    assert isinstance(model, nowcast.NiNoGNN)
    task = mt.load_task("tiny", store, graph_ir[0], period=PERIOD, horizon=model.max_horizon)
    windows = mt.fixed_windows([task], 2, seed=1)
    assert np.isfinite(mt.heldout_losses(model, [task], windows)["all"])


# ---- vocabulary samples (language models too large to meta-train whole on a CPU) -----------------
def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_vocab_rows_are_a_fixed_sorted_sample():
    rows = mt.vocab_rows(50, 7, seed=3)
    assert len(set(rows.tolist())) == 7 and (np.diff(rows) > 0).all() and 0 <= rows.min() and rows.max() < 50
    assert (mt.vocab_rows(50, 7, seed=3) == rows).all() and not (mt.vocab_rows(50, 7, seed=4) == rows).all()
    with pytest.raises(mt.MetaTrainError, match="cannot sample 51 of 50"):
        mt.vocab_rows(50, 51, seed=0)


def test_vocab_columns_are_the_sampled_model_state():
    """A token embedding (rows), an untied output layer (rows of its weight and its bias): the full
    state at ``columns`` is the state of the model that keeps only the sampled tokens."""
    V, n, d = 11, 4, 3

    def lm(vocab: int) -> nn.Module:
        return nn.Sequential(nn.Embedding(vocab, d), nn.Linear(d, d), nn.Linear(d, vocab))

    full = lm(V)
    rows = mt.vocab_rows(V, n, seed=0)
    small = lm(n)
    with torch.no_grad():
        small[0].weight.copy_(full[0].weight[rows])
        small[1].load_state_dict(full[1].state_dict())
        small[2].weight.copy_(full[2].weight[rows])
        small[2].bias.copy_(full[2].bias[rows])
    shapes = lambda m: [tuple(p.shape) for p in m.parameters()]  # noqa: E731
    cols = mt.vocab_columns(shapes(full), shapes(small), V, rows)
    assert torch.equal(flat(full)[torch.from_numpy(cols)], flat(small))
    with pytest.raises(mt.MetaTrainError, match="only vocabulary axes"):
        mt.vocab_columns(shapes(full), shapes(lm(n + 1)), V, rows)
    with pytest.raises(mt.MetaTrainError, match="same model at two vocabulary sizes"):
        mt.vocab_columns(shapes(full), shapes(small)[:2], V, rows)


def test_windows_of_a_sampled_task_are_the_sampled_entries(store, graph_ir, task):
    """The tiny MLP's 3 outputs stand in for a vocabulary: a task on the 2-output graph reads the
    rows of outputs 0 and 2 from the full store, and nothing else."""
    small_model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    small = neugraph.compile(small_model, torch.zeros(1, 4), profile="nino", lpe=8)
    rows = np.array([0, 2])
    shapes = lambda m: [tuple(p.shape) for p in m.parameters()]  # noqa: E731
    cols = mt.vocab_columns(shapes(tiny_model(0)), shapes(small_model), 3, rows)
    sampled = mt.load_task("tiny", store, small, period=PERIOD, horizon=TINY["horizon"], columns=cols)
    assert sampled.num_params == small.num_params == len(cols) < task.num_params
    newest = [sampled.newest_range(0)[0]]
    (w, t, m), = mt.read_windows(sampled, 0, newest)
    (wf, tf, mf), = mt.read_windows(task, 0, newest)
    idx = torch.from_numpy(cols)
    assert torch.equal(w, wf[idx]) and torch.equal(t, tf[idx]) and torch.equal(m, mf)
    model = nowcast.NiNoGNN(**TINY)
    assert torch.isfinite(mt.window_loss(model, sampled, mt.Window(0, 0, newest[0], w, t, m)))
    with pytest.raises(mt.MetaTrainError, match="columns for a graph"):
        mt.load_task("tiny", store, small, period=PERIOD, horizon=TINY["horizon"], columns=cols[:-1])


def test_cli_vocab_sample_meta_trains_on_the_sampled_graph(store, graph_ir, tmp_path, monkeypatch):
    small_model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    small_ir = neugraph.trace(small_model, torch.zeros(1, 4))
    shapes = lambda m: [tuple(p.shape) for p in m.parameters()]  # noqa: E731
    calls = []

    def sampled(name, n, seed, lpe=8):
        calls.append((name, n, seed))
        rows = mt.vocab_rows(3, n, seed)
        return (neugraph.compile(small_ir, profile="nino", lpe=lpe), small_ir,
                mt.vocab_columns(shapes(tiny_model(0)), shapes(small_model), 3, rows))

    monkeypatch.setattr(mt, "compile_task", lambda name, lpe=8: pytest.fail("the sampled graph must be used"))
    monkeypatch.setattr(mt, "compile_sampled_task", sampled)
    out = tmp_path / "run"
    assert mt.main(["--data", str(store.parent), "--tasks", "tiny", "--steps", "2", "--batch", "2", "--period",
                    str(PERIOD), "--hidden", "16", "--layers", "2", "--no-progress", "--val-windows", "2",
                    "--vocab-sample", "2", "--seed", "5", "--out", str(out)]) == 0
    assert calls == [("tiny", 2, 5)]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tasks"][0]["vocab_sample"] == 2 and cfg["tasks"][0]["num_params"] == 8 * 4 + 8 + 2 * 8 + 2


def test_gpt2_bpe_task_compiles_at_a_sampled_vocabulary():
    """The real GPT-2 BPE task: its 50,257-row tied embedding becomes 64 rows; byte-level and
    vision tasks are meta-trained whole."""
    pytest.importorskip("transformers", reason="language-model tasks need transformers (dev extra)")
    from nowcast import tasks as registry

    graph, ir, cols = mt.compile_sampled_task("austen-3-24-bpe", 64, seed=0)
    full = registry.build_model("austen-3-24-bpe", seed=0)
    assert graph.num_params == len(cols) == registry.num_params(full) - (50257 - 64) * 24
    assert graph.param_names == [n for n, _ in full.named_parameters()]
    rows = mt.vocab_rows(50257, 64, seed=0)
    wte = full.transformer.wte.weight.detach()
    assert torch.equal(flat(full)[torch.from_numpy(cols[: 64 * 24])], wte[rows].reshape(-1))
    assert torch.equal(flat(full)[torch.from_numpy(cols[64 * 24:])], flat(full)[50257 * 24:])
    assert mt.compile_sampled_task("austen-3-24", 1024, seed=0) is None
    assert mt.compile_sampled_task("fm16", 64, seed=0) is None
