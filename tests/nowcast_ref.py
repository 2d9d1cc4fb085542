"""Shared helpers for the nowcaster tests: where the reference material is, and the conformance
comparison against the published implementation's predictions."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn

import neugraph
import nowcast

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
CHECKPOINTS = ("nino_no_posw", "nino_mlp")
HORIZONS = (1, 10, 40)


def fm16() -> nn.Sequential:
    """The paper's FM/16 network, built so its state-dict keys are the fixture's (fc.0 .. fc.8)."""
    return nn.Sequential(OrderedDict(fc=nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding="same"), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding="same"), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )))


def load_fixture(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def conformance_errors(model: nn.Module, example_inputs, fixture_path: Path,
                       checkpoints=CHECKPOINTS, horizons=HORIZONS) -> dict[str, float]:
    """Max abs error of our prediction against every ``fixture["preds"]`` entry, LPE set to zero.

    ``model`` must already hold ``fixture["state_dict"]``; the fixture's ``states`` are in
    ``named_parameters()`` order, which the graph's ``param_names`` must match.
    """
    fx = load_fixture(fixture_path)
    graph = neugraph.compile(model, example_inputs, profile="nino")
    assert graph.param_names == fx["meta"]["param_names"], "parameter order differs from the fixture's"
    graph.node_features = torch.zeros_like(graph.node_features)
    errors = {}
    for name in checkpoints:
        nc = nowcast.load(REFERENCE / "checkpoints" / f"{name}.pt")
        for k in horizons:
            pred = nc.predict(graph, fx["states"], k)
            errors[f"{name}_k{k}"] = (pred - fx["preds"][f"{name}_k{k}"]).abs().max().item()
    return errors
