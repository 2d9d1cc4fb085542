"""The core package imports without the optional frameworks; their modules say what to install."""
from __future__ import annotations

import subprocess
import sys
import textwrap


def run_blocked(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where transformers, accelerate and lightning cannot be imported."""
    prelude = textwrap.dedent("""
        import sys
        for name in ("transformers", "accelerate", "lightning", "pytorch_lightning"):
            sys.modules[name] = None  # makes `import name` raise ImportError
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)


def test_core_imports_without_frameworks():
    r = run_blocked("""
        import nowcast, nowcast.distributed, nowcast.integrations, nowcast.cli, neugraph
        assert nowcast.NiNo and nowcast.distributed.DistributedNiNo
        bad = [m for m in ("transformers", "accelerate", "lightning") if sys.modules.get(m) is not None]
        print("ok", bad)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok []"


def test_lightning_integration_names_the_install_command():
    r = run_blocked("import nowcast.integrations.lightning")
    assert r.returncode != 0 and "pip install -e '.[integrations]'" in r.stderr
