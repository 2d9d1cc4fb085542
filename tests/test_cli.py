"""The neugraph command run as a user would run it."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "neugraph.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_inspect_builtin_example_text():
    r = run("inspect", "--example", "fm16")
    assert r.returncode == 0, r.stderr
    assert "95 nodes, 2,057 edges" in r.stdout
    assert "free neuron spaces [16, 32, 32]" in r.stdout
    assert "model input" in r.stdout and "kernel position" in r.stdout


def test_inspect_json_and_drawings(tmp_path):
    r = run("inspect", "--example", "resnet", "--json", "--profile", "generic", "--draw", str(tmp_path))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["capture"] == "export"
    assert out["group"]["free_spaces"] == [8, 8, 16, 16]
    assert out["graph"]["num_params"] == sum(p["shape"] and __import__("math").prod(p["shape"]) for p in out["parameters"])
    for path in out["drawings"]:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_verify_user_model_from_file(tmp_path):
    f = tmp_path / "mynet.py"
    f.write_text(textwrap.dedent("""
        import torch.nn as nn
        def make():
            return nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 2))
    """))
    r = run("verify", "--model", f"{f}:make", "--input-shape", "8,6", "--trials", "4", "--json")
    assert r.returncode == 0, r.stderr + r.stdout
    out = json.loads(r.stdout)
    assert out["ok"] and out["counts"]["good"] == [4, 4] and out["group"]["free_spaces"] == [5]


def test_verify_text_and_bad_usage():
    r = run("verify", "--example", "mobilenet", "--trials", "3")
    assert r.returncode == 0 and "verify: OK" in r.stdout and "lane groups [8]" in r.stdout
    r = run("inspect")
    assert r.returncode != 0 and "--example" in (r.stderr + r.stdout)
    r = run("inspect", "--model", "nocolon")
    assert r.returncode != 0 and "package.module:factory" in (r.stderr + r.stdout)
