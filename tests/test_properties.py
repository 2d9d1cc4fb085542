"""Property tests: random architectures, random permutations, every verification check.

Five families x 44 examples = 220 architectures per run. For each: permutations from the inferred
group keep outputs within 1e-9 relative in float64; the graph compiled from the permuted model
equals the relabelled graph exactly; permutations outside the group change the outputs and the WL
hash; the round trip is exact; and the inferred group equals the group known for the family.
"""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings

import neugraph
from archs import cnns, densenets, mlps, resnets

SETTINGS = settings(max_examples=44, deadline=None, suppress_health_check=list(HealthCheck))


def check(case) -> None:
    torch.manual_seed(0)
    report = neugraph.verify(case.model, case.inputs, trials=3, known_group=case.known)
    assert report.ok, f"{case.family}: {report.failures}\n{report}"
    assert report.max_good_error <= 1e-9
    assert report.counts["good"] == [3, 3]
    assert report.counts["equivariance"] == [3, 3]
    assert report.counts["round_trip"] == [1, 1]
    if report.group["free_spaces"] or report.counts["bad"][1]:
        assert report.counts["bad"][0] == report.counts["bad"][1] > 0


@SETTINGS
@given(mlps())
def test_mlps(case):
    check(case)


@SETTINGS
@given(cnns())
def test_cnns(case):
    check(case)


@SETTINGS
@given(resnets())
def test_resnets(case):
    check(case)


@SETTINGS
@given(densenets())
def test_densenets_and_tied(case):
    check(case)


@SETTINGS
@given(mlps() | cnns() | resnets() | densenets())
def test_any_family_nino_profile_round_trip_and_equivariance(case):
    """The nino profile: exact inverse map, and equivariance of its edges under good permutations."""
    from neugraph.verification import equivariant

    model = case.model.double()
    x = tuple(t.double() if t.is_floating_point() else t for t in case.inputs)
    ir = neugraph.trace(model, x)
    graph = neugraph.compile(ir, profile="nino", lpe=2)
    flat = graph.flat_params(model)
    assert torch.equal(graph.to_params(graph.edge_features(flat)), flat)
    perm = ir.sample_symmetry(torch.Generator().manual_seed(1))
    new = perm.apply(dict(model.state_dict()))
    flat_perm = torch.cat([new[n].reshape(-1) for n in graph.param_names])
    assert equivariant(graph, graph, perm, flat, flat_perm) is None
