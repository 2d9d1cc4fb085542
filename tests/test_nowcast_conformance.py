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


GPT2_FIXTURE = REFERENCE / "fixtures" / "ref_gpt2_toy.pt"


@needs_ref
def test_gpt2_toy_reproduces_published_predictions():
    transformers = pytest.importorskip("transformers", reason="transformers (dev extra) builds the GPT-2 model")
    fx = load_fixture(GPT2_FIXTURE)
    cfg = transformers.GPT2Config(n_embd=6, n_layer=2, n_head=2, vocab_size=5, n_positions=3)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.load_state_dict(fx["state_dict"], strict=False)  # the tied head is not stored twice
    errors = conformance_errors(model, torch.randint(0, 5, (1, 3)), GPT2_FIXTURE)
    assert len(errors) == 6
    bad = {k: v for k, v in errors.items() if not v <= 1e-5}
    assert not bad, f"max abs error above 1e-5: {bad} (all: {errors})"
