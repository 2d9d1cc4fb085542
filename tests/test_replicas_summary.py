"""benchmarks/replicas.py's summary: per-replica finals, their mean and range, the gap to AdamW's mean."""
from __future__ import annotations

import json

import pytest

from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def rep():
    return load_benchmark("replicas.py", "replicas_bench")


def _write(rep, out, task, method, seed, replica, final, metric="perplexity", steps=None):
    (out / "runs").mkdir(parents=True, exist_ok=True)
    rec = {"task": task, "method": method, "seed": seed, "replica": replica, "metric": metric,
           "final_score": final, "steps_to_target": steps}
    rep.run_file(out, task, method, seed, replica).write_text(json.dumps(rec))


def test_replica_means_and_gaps_to_adamw(rep, tmp_path):
    for r, f in enumerate([200.0, 210.0]):
        _write(rep, tmp_path, "austen-3-24-bpe", "adamw", 0, r, f, steps=900)
    for r, f in enumerate([214.2, 205.0, 220.5]):
        _write(rep, tmp_path, "austen-3-24-bpe", "nino-ours", 0, r, f, steps=None if r == 2 else 950)
    for r, f in enumerate([88.0, 89.0]):
        _write(rep, tmp_path, "fm16", "adamw", 1, r, f, metric="accuracy")
    _write(rep, tmp_path, "fm16", "nino-ours", 1, 0, 89.25, metric="accuracy")
    rows = {(r["task"], r["method"]): r for r in rep.write_summary(tmp_path)}
    ours = rows[("austen-3-24-bpe", "nino-ours")]
    assert ours["replicas"] == [0, 1, 2] and ours["final_scores"] == [214.2, 205.0, 220.5]
    assert ours["mean_final"] == pytest.approx(213.233, abs=1e-3)
    assert (ours["min_final"], ours["max_final"]) == (205.0, 220.5)
    assert ours["replicas_vs_adamw_mean"] == [4.49, 0.0, 7.56]  # % of AdamW's mean, 205.0
    assert ours["mean_vs_adamw_mean"] == pytest.approx(4.02, abs=0.01)
    assert "mean_vs_adamw_mean" not in rows[("austen-3-24-bpe", "adamw")]
    assert rows[("fm16", "nino-ours")]["replicas_vs_adamw_mean"] == [0.75]  # accuracy points
    table = (tmp_path / "replicas.md").read_text()
    assert "| austen-3-24-bpe | 0 | nino-ours | 3 | 214.20 / 205.00 / 220.50 |" in table
    assert "950 / 950 / not" in table and "+0.75 pt" in table
