"""The ``nowcast`` command run as a user would run it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nowcast import cli
from nowcast.tasks import TASKS

PUBLISHED = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "checkpoints" / "nino_no_posw.pt"


def run(*args, env=None, timeout=300):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "nowcast.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def test_help_everywhere(capsys):
    r = run("--help")
    assert r.returncode == 0 and "demo" in r.stdout and "tasks" in r.stdout and "train" in r.stdout
    for sub in ("demo", "train", "tasks"):
        with pytest.raises(SystemExit) as e:
            cli.main([sub, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "usage: nowcast " + sub in text
        if sub == "demo":
            assert "--nowcaster" in text and "--period" in text and "--steps" in text


def test_tasks_json_lists_the_registry():
    r = run("tasks", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["name"] for row in rows] == list(TASKS)
    fm16 = rows[0]
    assert fm16["target"] == 89.5 and fm16["num_params"] == 14_378 and fm16["lr"] == 6e-3
    exe = shutil.which("nowcast")  # the console script, when the package is installed with it
    if exe:
        r2 = subprocess.run([exe, "tasks", "--json"], capture_output=True, text=True, timeout=300)
        assert r2.returncode == 0 and json.loads(r2.stdout) == rows


def test_unknown_task_is_a_clean_error():
    r = run("demo", "--task", "fm17", "--nowcaster", "linefit")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "unknown task 'fm17'" in r.stderr and "fm16" in r.stderr


def test_missing_data_exits_2_with_the_fetch_command(tmp_path):
    r = run("demo", "--nowcaster", "linefit", "--steps", "10", "--out", str(tmp_path / "out"),
            env={"NOWCAST_DATA": str(tmp_path / "empty")})
    assert r.returncode == 2, r.stderr
    assert "bash scripts/fetch_data.sh" in r.stderr and "Traceback" not in r.stderr


def test_resolve_nowcaster(monkeypatch, tmp_path):
    import nowcast

    assert isinstance(cli.resolve_nowcaster("linefit"), nowcast.Linefit)
    assert isinstance(cli.resolve_nowcaster("linefit+"), nowcast.LinefitPlus)
    assert isinstance(cli.resolve_nowcaster("no-change"), nowcast.NoChange)
    with pytest.raises(cli.NowcasterSpecError, match="no such file"):
        cli.resolve_nowcaster(str(tmp_path / "nothing.pt"))
    if cli.SHIPPED_CHECKPOINT.is_file():
        assert cli.resolve_nowcaster("default") is not None
    else:
        with pytest.raises(cli.NowcasterSpecError, match="no shipped checkpoint is installed"):
            cli.resolve_nowcaster("default")
    monkeypatch.setenv(cli.PUBLISHED_ENV, str(tmp_path / "missing.pt"))
    with pytest.raises(cli.NowcasterSpecError, match=cli.PUBLISHED_ENV):
        cli.resolve_nowcaster("published")
    nowcast.save(nowcast.LinefitPlus(clip=2.0), tmp_path / "lf")
    assert isinstance(cli.resolve_nowcaster(str(tmp_path / "lf")), nowcast.LinefitPlus)


def test_resolve_published_checkpoint(monkeypatch):
    if not PUBLISHED.is_file():
        pytest.skip(f"published checkpoint not available at {PUBLISHED}")
    monkeypatch.setenv(cli.PUBLISHED_ENV, str(PUBLISHED))
    model = cli.resolve_nowcaster("published")
    assert type(model).__name__ == "NiNoGNN"


def _small_val(monkeypatch):
    """Evaluate on 500 held-out images so the in-process demo takes seconds."""
    import nowcast.tasks as T
    from nowcast.data import DataMissingError

    try:
        d = T.load_task_data("fm16")
    except DataMissingError as e:
        pytest.skip(str(e))
    fm16 = T.TaskData(d.task, d.train_x, d.train_y, d.val_x[:500], d.val_y[:500])

    def small(task, root=None):
        assert T.get_task(task).name == "fm16"
        return fm16

    monkeypatch.setattr(T, "load_task_data", small)


def test_demo_table_plot_and_json(monkeypatch, tmp_path, capsys):
    _small_val(monkeypatch)
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--steps", "20", "--eval-every", "10", "--period", "10", "--nowcaster", "linefit",
                   "--out", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "fm16" in text and "steps to target" in text and "adamw+linefit" in text and "reduction" in text
    summary = json.loads((out / "fm16_seed0.json").read_text())
    base, nino = summary["runs"]
    assert base["method"] == "adamw" and nino["nowcast_steps"] == [9, 19]
    assert base["scores"][0] == nino["scores"][0] and base["eval_steps"] == nino["eval_steps"] == [0, 10, 20]
    png = (out / "fm16_seed0.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_gates_the_shipped_nowcaster_by_default(monkeypatch, tmp_path, capsys):
    _small_val(monkeypatch)
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--steps", "20", "--eval-every", "10", "--period", "10", "--out", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    nino = json.loads((out / "fm16_seed0.json").read_text())["runs"][1]
    assert nino["gate"] == 0.9 and nino["ctx"] == 10 and len(nino["gate_log"]) == 2
    assert "skill gate 0.9 (--gate none turns it off)" in text
    rc = cli.main(["demo", "--steps", "20", "--eval-every", "10", "--period", "10", "--gate", "none",
                   "--out", str(out), "--no-progress"])
    nino = json.loads((out / "fm16_seed0.json").read_text())["runs"][1]
    assert rc == 0 and nino["gate"] is None and nino["ctx"] == 5 and "skill gate" not in capsys.readouterr().out


@pytest.mark.slow
def test_demo_subprocess_json(tmp_path):
    from nowcast.data import DataMissingError, load_images

    try:
        load_images("fashion_mnist", "test")
    except DataMissingError as e:
        pytest.skip(str(e))
    r = run("demo", "--steps", "60", "--eval-every", "30", "--period", "20", "--nowcaster", "linefit+",
            "--out", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["task"] == "fm16" and [x["method"] for x in s["runs"]] == ["adamw", "adamw+linefit+"]
    assert s["runs"][1]["nowcasts"] + s["runs"][1]["nowcasts_rejected"] == 3
    assert Path(s["plot"]).is_file() and Path(s["json"]).is_file()


def test_hold_option_parses_and_refuses_unknown_parts(capsys):
    parser = cli.build_parser()
    assert parser.parse_args(["demo"]).hold is None  # the default, as in NiNo and run_training
    assert parser.parse_args(["train", "--task", "fm16", "--hold", "auto"]).hold == "auto"
    assert parser.parse_args(["train", "--task", "fm16", "--hold", "none"]).hold is None
    assert parser.parse_args(["demo", "--hold", "norms+embeddings"]).hold == "norms+embeddings"
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["demo", "--hold", "biases"])
    assert e.value.code == 2 and "norms, embeddings, vectors" in capsys.readouterr().err


def test_gate_option_parses_and_refuses_ratios_outside_0_1(capsys):
    parser = cli.build_parser()
    assert cli.gate_for(parser.parse_args(["demo"])) == cli.SHIPPED_GATE == 0.9  # the shipped default
    assert cli.gate_for(parser.parse_args(["demo", "--gate", "none"])) is None
    assert cli.gate_for(parser.parse_args(["demo", "--nowcaster", "published"])) is None  # measured ungated
    assert cli.gate_for(parser.parse_args(["demo", "--nowcaster", "published", "--gate", "0.8"])) == 0.8
    assert cli.gate_for(parser.parse_args(["train", "--task", "fm16"])) is None
    assert cli.gate_for(parser.parse_args(["train", "--task", "fm16", "--nowcaster", "default"])) == 0.9
    assert parser.parse_args(["train", "--task", "fm16", "--gate", "0.9"]).gate == 0.9
    for bad in ("0", "1.5", "high"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["demo", "--gate", bad])
        assert e.value.code == 2 and "ratio in (0, 1]" in capsys.readouterr().err
