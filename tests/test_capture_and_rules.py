"""Capture paths, clear errors, and individual symmetry rules."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import neugraph
from archs import ResNet
from frontends import CaptureError, capture


def _spaces(ir, name):
    sp = ir.spaces
    return [sp.find(a) for a in ir.states[name].axes]


# ---- capture ---------------------------------------------------------------------------------------
def test_export_is_the_default_path():
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    cap = capture(m, torch.randn(2, 3))
    assert cap.method == "export"
    assert set(cap.params.values()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    ops = {n.target._opname for n in cap.graph.nodes if n.op == "call_function" and hasattr(n.target, "_opname")}
    assert "linear" in ops


@torch.library.custom_op("ngtest::cpu_only_scale", mutates_args=())
def cpu_only_scale(x: torch.Tensor) -> torch.Tensor:
    """A custom op without a fake (meta) kernel: torch.export cannot propagate shapes through it."""
    return x * 2.0


class UsesCustomOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 5)
        self.b = nn.Linear(5, 2)

    def forward(self, x):
        return self.b(cpu_only_scale(torch.tanh(self.a(x))))


def test_fallback_to_symbolic_trace_and_unknown_op_pins_soundly():
    m = UsesCustomOp()
    ir = neugraph.trace(m, torch.randn(4, 3))
    assert ir.method == "fx", "export should fail on an op without a fake kernel"
    assert any("torch.export failed" in n for n in ir.notes)
    # the unknown op pins the hidden space and says so
    assert "cpu_only_scale" in ir.unknown_ops
    diag = [d for d in ir.diagnostics() if d.op == "cpu_only_scale"]
    assert diag and all("no symmetry rule" in d.reason for d in diag)
    hidden = _spaces(ir, "a.weight")[0]
    assert ir.spaces.is_pinned(hidden)
    assert ir.group_summary()["free_spaces"] == []
    # it still compiles, and the (now trivial) group verifies
    g = neugraph.compile(ir)
    assert g.num_params == sum(p.numel() for p in m.parameters())
    assert neugraph.verify(m, torch.randn(4, 3), trials=2).ok


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(self.gate(x))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow
            return x
        return -x


class CustomOpWithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Linear(3, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(cpu_only_scale(self.a(x)))


@pytest.mark.parametrize("module", [CustomOpWithBatchNorm, lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))])
def test_tracing_never_changes_the_users_model(module):
    m = module()
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    neugraph.trace(m, torch.randn(8, 3) * 5 + 3)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert m.training


def test_untraceable_module_gets_a_clear_error():
    with pytest.raises(CaptureError) as e:
        neugraph.trace(DataDependent(), torch.randn(2, 3))
    msg = str(e.value)
    assert "torch.export" in msg and "symbolic_trace" in msg
    assert "gate (Gate)" in msg, msg
    assert "Fix:" in msg


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="nn.Module"):
        capture(lambda x: x, torch.randn(2))
    with pytest.raises(ValueError, match="example_inputs"):
        neugraph.compile(nn.Linear(2, 2))
    g = neugraph.compile(nn.Linear(2, 2), torch.randn(1, 2))
    with pytest.raises(ValueError, match="parameters"):
        g.edge_features(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="unknown profile"):
        neugraph.compile(nn.Linear(2, 2), torch.randn(1, 2), profile="nope")


# ---- rules -------------------------------------------------------------------------------------------
def test_flatten_without_pooling_pins_positions_not_channels():
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
    ir = neugraph.trace(m, torch.randn(2, 2, 5, 5))
    assert ir.group_summary()["free_spaces"] == [4]
    lin_in = ir.spaces.struct[_spaces(ir, "3.weight")[1]]
    assert lin_in[0] == "kron" and lin_in[2] == 9
    assert ir.spaces.find(lin_in[1]) == _spaces(ir, "0.weight")[0]
    g = neugraph.compile(ir, profile="generic")
    b = next(b for b in g.blocks if b.name == "3.weight")
    assert b.feat == 9 and b.num_edges == 5 * 4  # channel nodes -> outputs, 9 positions per edge
    # the edge (channel c -> output o) carries W[o, c*9:(c+1)*9]
    W = m[3].weight.detach()
    flat = g.flat_params(m)
    feats = g.block_features(b, flat[:, None])[:, :, 0]
    assert torch.equal(feats[2 * 4 + 3], W[2, 27:36])
    assert neugraph.verify(m, torch.randn(4, 2, 5, 5), trials=4).ok


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_binds_running_statistics(train):
    m = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2))
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    m.train(train)
    ir = neugraph.trace(m, torch.randn(8, 3))
    hidden = _spaces(ir, "0.weight")[0]
    for name in ("1.weight", "1.bias", "1.running_mean", "1.running_var"):
        assert _spaces(ir, name) == [hidden]
    perm = ir.sample_symmetry(torch.Generator().manual_seed(0))
    sd = perm.apply(m.state_dict())
    idx = torch.as_tensor(perm.index(hidden))
    assert torch.equal(sd["1.running_mean"], m.state_dict()["1.running_mean"][idx])
    assert neugraph.verify(m, torch.randn(8, 3), trials=4).ok


def test_group_norm_segments_and_lanes():
    m = nn.Sequential(nn.Conv2d(2, 6, 1), nn.GroupNorm(3, 6), nn.Tanh(), nn.Conv2d(6, 2, 1))
    ir = neugraph.trace(m, torch.randn(2, 2, 4, 4))
    assert ir.group_summary()["free_spaces"] == [2, 2, 2]
    assert ir.group_summary()["lane_groups"] == [3]
    assert neugraph.verify(m, torch.randn(4, 2, 4, 4), trials=6).ok


def test_manual_rms_norm_keeps_the_space_free():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.g = nn.Linear(3, 5), nn.Linear(5, 2), nn.Parameter(torch.ones(5))

        def forward(self, x):
            h = self.a(x)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.g
            return self.b(h)

    m = M()
    ir = neugraph.trace(m, torch.randn(2, 3))
    assert _spaces(ir, "g") == [_spaces(ir, "a.weight")[0]]
    assert ir.states["g"].kind == "scale"
    assert neugraph.verify(m, torch.randn(8, 3), trials=4).ok


def test_pointwise_conv_does_not_pin_and_strided_conv_does():
    ir = neugraph.trace(nn.Conv1d(3, 4, 1), torch.randn(2, 3, 7))
    assert not any("convolution mixes" in d.reason for d in ir.diagnostics())
    m = nn.Sequential(nn.Conv1d(3, 4, 3, stride=2, dilation=2), nn.Tanh(), nn.Conv1d(4, 2, 1))
    ir = neugraph.trace(m, torch.randn(2, 3, 11))
    assert ir.group_summary()["free_spaces"] == [4]
    assert neugraph.verify(m, torch.randn(4, 3, 11), trials=4).ok


def test_depthwise_convolution_lanes():
    m = nn.Sequential(nn.Conv2d(2, 4, 1), nn.Tanh(), nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.Tanh(),
                      nn.Conv2d(8, 3, 1))
    ir = neugraph.trace(m, torch.randn(2, 2, 5, 5))
    assert ir.group_summary() == {"free_spaces": [2, 2, 2, 2], "lane_groups": [4],
                                  "log_order": ir.group_summary()["log_order"]}
    assert neugraph.verify(m, torch.randn(4, 2, 5, 5), trials=8).ok


def test_tied_and_frozen_parameters():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.mid = nn.Linear(4, 6)
            self.out = nn.Linear(6, 4)
            self.mid.requires_grad_(False)

        def forward(self, t):
            return self.out(torch.tanh(self.mid(self.emb(t)))) @ self.emb.weight.t()

    m = M()
    ir = neugraph.trace(m, torch.randint(0, 7, (2, 5)))
    assert ir.param_names == [n for n, _ in m.named_parameters()]
    assert ir.spaces.is_pinned(_spaces(ir, "emb.weight")[0])  # vocabulary rows: gathered by token id
    assert ir.group_summary()["free_spaces"] == [4, 6]
    g = neugraph.compile(ir)
    mask = g.trainable_mask
    assert mask.sum() == sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert next(b for b in g.blocks if b.name == "emb.weight").edge_type == neugraph.NINO_TYPES["embedding"]
    assert neugraph.verify(m, torch.randint(0, 7, (4, 5)), trials=4).ok


def test_split_and_concat_make_segments():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 6)
            self.left, self.right = nn.Linear(2, 2), nn.Linear(4, 3)
            self.out = nn.Linear(5, 1)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            p, q = h.split([2, 4], dim=-1)
            return self.out(torch.cat([torch.tanh(self.left(p)), torch.tanh(self.right(q))], -1))

    m = M()
    ir = neugraph.trace(m, torch.randn(2, 3))
    assert ir.group_summary()["free_spaces"] == [2, 2, 3, 4]
    assert neugraph.verify(m, torch.randn(8, 3), trials=6).ok


def test_verify_never_touches_the_users_model():
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert neugraph.verify(m, torch.randn(4, 3), trials=3).ok
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert next(m.parameters()).dtype == torch.float32


def test_explicit_addmm_mm_matmul_bmm_einsum():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.b1 = nn.Parameter(torch.randn(3, 5)), nn.Parameter(torch.randn(5))
            self.w2 = nn.Parameter(torch.randn(5, 4))
            self.w3 = nn.Parameter(torch.randn(4, 6))
            self.w4 = nn.Parameter(torch.randn(6, 2))

        def forward(self, x):
            h = torch.tanh(torch.addmm(self.b1, x, self.w1))  # (B, 5)
            h = torch.tanh(torch.mm(h, self.w2))  # (B, 4)
            h = torch.tanh(torch.bmm(h[None], self.w3[None]))[0]  # (B, 6)
            h = torch.tanh(torch.einsum("bi,ij->bj", h, self.w4))
            return h @ torch.ones(2, 1, dtype=h.dtype)

    m = M()
    ir = neugraph.trace(m, torch.randn(2, 3))
    assert ir.group_summary()["free_spaces"] == [2, 4, 5, 6]
    assert ir.states["w1"].kind == "dense" and (ir.states["w1"].src, ir.states["w1"].dst) == (0, 1)
    assert neugraph.verify(m, torch.randn(8, 3), trials=4).ok


def test_functional_dropout_in_training_mode_does_not_break_verification():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(torch.nn.functional.dropout(torch.tanh(self.a(x)), 0.5, self.training))

    m = M().train()
    ir = neugraph.trace(m, torch.randn(4, 3))
    assert ir.group_summary()["free_spaces"] == [6]
    assert neugraph.verify(m, torch.randn(8, 3), trials=4).ok
    assert torch.nn.functional.dropout(torch.ones(1000), 0.5, True).eq(0).any()  # restored afterwards


def test_bad_permutations_move_every_entry_so_dead_kernel_taps_cannot_hide_them():
    """A 3x3 conv on a 1x1 map (padding 1) reads only its centre tap: a kernel-row swap (0 2)
    changes nothing there, so a violation with a fixed point could pass as a symmetry. Found by
    test_resnets on an 8x8 input with three stride-2 blocks."""
    torch.manual_seed(0)
    model = ResNet(1, 2, [(3, 2), (4, 2), (2, 2)], False, 2)
    x = torch.randn(8, 1, 8, 8)
    ir = neugraph.trace(model, (x,))
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        bad = ir.sample_violation(g)
        for p in bad.perms.values():  # a pinned space permuted: no entry may stay put
            assert (p != np.arange(len(p))).all(), bad.kind
    report = neugraph.verify(model, (x,), trials=40)
    assert report.ok, report.failures
    assert report.counts["bad"] == [40, 40]
