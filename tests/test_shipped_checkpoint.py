"""The nowcaster shipped in the package: present, small, what the model card says, and usable."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

import neugraph
import nowcast
from neugraph.examples import FM16
from nowcast.cli import SHIPPED_CHECKPOINT, resolve_nowcaster

CARD = SHIPPED_CHECKPOINT.parent / "MODEL_CARD.md"


def test_shipped_files_match_the_model_card():
    weights, config = SHIPPED_CHECKPOINT, SHIPPED_CHECKPOINT.with_suffix(".json")
    assert weights.is_file() and config.is_file() and CARD.is_file()
    assert weights.stat().st_size + config.stat().st_size <= 10 * 2**20
    card = CARD.read_text()
    for f in (weights, config):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        assert re.search(rf"`{re.escape(f.name)}`.*SHA-256 `{digest}`", card), f"{f.name}: card SHA-256 differs"


def test_default_nowcaster_loads_and_predicts_on_fm16():
    nc = resolve_nowcaster("default")
    assert isinstance(nc, nowcast.NiNoGNN) and nc.ctx == 5 and nc.max_horizon == 40
    torch.manual_seed(0)
    model = FM16()
    graph = neugraph.compile(model, torch.randn(1, 1, 28, 28), profile="nino", lpe=nc.lpe)
    flat = graph.flat_params(model)
    states = torch.stack([flat + 0.01 * i * torch.randn_like(flat) for i in range(5)], 1)
    for k in (1, 40):
        pred = nc.predict(graph, states, k)
        assert pred.shape == flat.shape and torch.isfinite(pred).all()
        assert not torch.equal(pred, states[:, -1])  # it moves the parameters
    assert Path(nowcast.__file__).parent / "checkpoints" == SHIPPED_CHECKPOINT.parent
