"""Coverage on the built-in examples: the inferred group equals the group known for each network
(every hidden neuron space free, residual streams tied, inputs and outputs pinned)."""
from __future__ import annotations

import pytest

import neugraph
from neugraph import examples


@pytest.mark.parametrize("name", sorted(examples.EXAMPLES))
def test_example_group_is_the_known_group(name):
    model, x, known = examples.get(name)
    report = neugraph.verify(model, x, trials=6, known_group=known)
    assert report.ok, str(report)
    assert report.group["free_spaces"] == known["free_spaces"]
    assert report.group["lane_groups"] == known["lane_groups"]
    assert report.counts["bad"][0] == report.counts["bad"][1] == 6
