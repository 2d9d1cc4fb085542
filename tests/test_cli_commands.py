"""Every command line run as a user runs it (a subprocess), with its output checked.

Covered elsewhere, also as subprocesses: ``neugraph inspect|verify`` (tests/test_cli.py),
``nowcast --help``, ``nowcast tasks --json`` and ``nowcast demo --json``
(tests/test_cli_nowcast.py). Here: the help of every command, ``neugraph verify``'s progress
bar, ``nowcast train`` (JSON record and plot), ``nowcast plot``, ``nowcast tasks`` as a table,
and the trajectory pipeline ``python -m nowcast.collect`` -> ``python -m nowcast.metatrain`` ->
``nowcast train --nowcaster <the result>``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PNG = b"\x89PNG\r\n\x1a\n"


def run(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def need_fm16() -> None:
    from nowcast.data import DataMissingError, load_images

    try:
        load_images("fashion_mnist", "test")
    except DataMissingError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("module,sub,flags", [
    ("neugraph.cli", None, ["inspect", "verify"]),
    ("neugraph.cli", "inspect", ["--example", "--model", "--input-shape", "--json", "--draw", "--profile"]),
    ("neugraph.cli", "verify", ["--trials", "--json", "--no-progress"]),
    ("nowcast.cli", "train", ["--task", "--steps", "--nowcaster", "--json", "--plot", "--out"]),
    ("nowcast.cli", "plot", ["RUN.json", "--out", "--json"]),
    ("nowcast.cli", "tasks", ["--json", "--params"]),
    ("nowcast.collect", None, ["--task", "--runs", "--steps", "--save-every", "--out"]),
    ("nowcast.metatrain", None, ["--data", "--tasks", "--steps", "--out", "--resume"]),
])
def test_help(module, sub, flags):
    r = run(module, *([sub] if sub else []), "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage:")
    for flag in flags:
        assert flag in r.stdout


def test_neugraph_without_a_command_shows_usage():
    r = run("neugraph.cli")
    assert r.returncode == 2 and "usage: neugraph" in r.stderr


def test_verify_progress_bar_goes_to_stderr(capsys):
    r = run("neugraph.cli", "verify", "--example", "mlp", "--trials", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ok"] is True  # stdout stays pure JSON
    assert "verify" in r.stderr and "4/4" in r.stderr and "perm" in r.stderr
    from neugraph.cli import main

    assert main(["verify", "--example", "mlp", "--trials", "2", "--no-progress"]) == 0
    quiet = capsys.readouterr()
    assert "perm" not in quiet.err and "verify: OK" in quiet.out


def test_tasks_table():
    r = run("nowcast.cli", "tasks")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:4] == ["name", "kind", "dataset", "steps"] and set(lines[1]) <= {"-", " "}
    assert any(line.startswith("fm16 ") and "89.5" in line for line in lines)


@pytest.fixture(scope="module")
def fm16_run(tmp_path_factory):
    """``nowcast train`` on FM/16 for 20 steps with Linefit every 10 steps: record, plot."""
    need_fm16()
    d = tmp_path_factory.mktemp("train")
    r = run("nowcast.cli", "train", "--task", "fm16", "--steps", "20", "--eval-every", "20", "--period", "10",
            "--nowcaster", "linefit", "--out", str(d / "run.json"), "--plot", str(d / "run.png"), "--no-progress",
            "--threads", "1")
    return d, r


def test_train_writes_record_and_plot(fm16_run):
    d, r = fm16_run
    assert r.returncode == 0, r.stderr
    assert "fm16 seed 0 adamw+Linefit: steps to target" in r.stdout and "plot:" in r.stdout
    rec = json.loads((d / "run.json").read_text())
    assert rec["eval_steps"] == [0, 20] and rec["nowcast_steps"] == [9, 19] and rec["nowcasts"] == 2
    assert (d / "run.png").read_bytes()[:8] == PNG


def test_train_json_on_stdout(tmp_path):
    need_fm16()
    r = run("nowcast.cli", "train", "--task", "fm16", "--steps", "5", "--eval-every", "5", "--json",
            "--no-progress", "--threads", "1")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["method"] == "adamw" and rec["steps"] == 5 and len(rec["scores"]) == 2


def test_plot_runs(fm16_run, tmp_path):
    d, r = fm16_run
    assert r.returncode == 0, r.stderr
    out = tmp_path / "curves.png"
    p = run("nowcast.cli", "plot", str(d / "run.json"), "--out", str(out), "--json")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["task"] == "fm16" and s["plot"] == str(out) and [x["method"] for x in s["runs"]] == ["adamw+Linefit"]
    assert out.read_bytes()[:8] == PNG
    text = run("nowcast.cli", "plot", str(d / "run.json"), "--out", str(out))
    assert text.returncode == 0 and "adamw+Linefit seed 0: steps to target" in text.stdout


def test_plot_refuses_other_files(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"hello": 1}')
    r = run("nowcast.cli", "plot", str(bad), "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "not a run record" in r.stderr and "Traceback" not in r.stderr
    r = run("nowcast.cli", "plot", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "no such file" in r.stderr


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    need_fm16()
    d = tmp_path_factory.mktemp("traj")
    r = run("nowcast.collect", "--task", "fm16", "--runs", "3", "--steps", "12", "--save-every", "1", "--group", "3",
            "--out", str(d), "--no-progress")
    return d, r


def test_collect(collected):
    d, r = collected
    assert r.returncode == 0, r.stderr
    assert "3/3 runs complete, 13 saves of 14378 parameters" in r.stdout
    assert (d / "fm16" / "meta.json").is_file()


@pytest.fixture(scope="module")
def metatrained(collected, tmp_path_factory):
    d, r = collected
    assert r.returncode == 0, r.stderr
    out = tmp_path_factory.mktemp("meta")
    m = run("nowcast.metatrain", "--data", str(d), "--tasks", "fm16", "--steps", "2", "--batch", "2", "--period",
            "5", "--hidden", "16", "--layers", "2", "--val-windows", "2", "--no-progress", "--threads", "1",
            "--out", str(out))
    return out, m


def test_metatrain(metatrained):
    out, m = metatrained
    assert m.returncode == 0, m.stderr
    assert "step 2/2: train loss" in m.stdout and "nowcaster saved to" in m.stdout
    assert (out / "nowcaster").is_dir()


def test_train_with_the_metatrained_nowcaster(metatrained):
    out, m = metatrained
    assert m.returncode == 0, m.stderr
    t = run("nowcast.cli", "train", "--task", "fm16", "--steps", "10", "--eval-every", "10", "--period", "5",
            "--nowcaster", str(out / "nowcaster"), "--json", "--no-progress", "--threads", "1")
    assert t.returncode == 0, t.stderr
    rec = json.loads(t.stdout)
    assert rec["method"] == "adamw+NiNoGNN" and rec["nowcast_steps"] == [4, 9]
    assert rec["nowcasts"] + rec["nowcasts_rejected"] == 2


def test_collect_and_metatrain_json(collected, metatrained):
    """Rerunning a finished collection / meta-training with --json prints its summary as JSON."""
    d, _ = collected
    r = run("nowcast.collect", "--task", "fm16", "--runs", "3", "--steps", "12", "--save-every", "1", "--group", "3",
            "--out", str(d), "--no-progress", "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["complete_runs"] == [0, 1, 2] and rec["n_saves"] == 13 and rec["num_params"] == 14378
    out, _ = metatrained
    m = run("nowcast.metatrain", "--data", str(d), "--tasks", "fm16", "--steps", "2", "--batch", "2", "--period",
            "5", "--hidden", "16", "--layers", "2", "--val-windows", "2", "--no-progress", "--threads", "1",
            "--out", str(out), "--json")
    assert m.returncode == 0, m.stderr
    summary = json.loads(m.stdout)
    assert summary["step"] == summary["steps"] == 2 and "nowcaster" in summary
