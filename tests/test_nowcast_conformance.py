"""Published-checkpoint conformance: our graph + nowcasters reproduce the authors' predictions."""
from __future__ import annotations

import pytest
import torch

from nowcast_ref import REFERENCE, conformance_errors, fm16, load_fixture

FIXTURE = REFERENCE / "fixtures" / "ref_fm16_convnet.pt"
needs_ref = pytest.mark.skipif(not (REFERENCE / "checkpoints").is_dir() or not FIXTURE.exists(),
                               reason=f"reference checkpoints/fixtures not found under {REFERENCE} "
                                      "(../shared beside the project)")


@needs_ref
def test_fm16_reproduces_published_predictions():
    fx = load_fixture(FIXTURE)
    model = fm16()
    model.load_state_dict(fx["state_dict"])
    errors = conformance_errors(model, torch.randn(1, 1, 28, 28), FIXTURE)
    assert len(errors) == 6
    bad = {k: v for k, v in errors.items() if not v <= 1e-5}
    assert not bad, f"max abs error above 1e-5: {bad} (all: {errors})"
