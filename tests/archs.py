"""Random architectures for the property tests, each with the symmetry group it is known to have.

The known group is computed here from the architecture description alone (never from the
compiler): ``free_spaces`` lists the sizes (> 1) of the independently permutable neuron blocks and
``lane_groups`` the number of blocks in each set of groups that may be swapped as wholes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

# ReLU is left out of the random families: a unit that is dead on every example input makes some
# permutations outside the group invisible on those inputs (true of the function there, not a
# compiler error). ReLU networks are covered by the built-in examples (tests/test_examples.py).
ACTS = {"tanh": torch.tanh, "gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid, "relu": F.relu}
SMOOTH = ["gelu", "sigmoid", "silu", "tanh"]


@dataclass
class Case:
    family: str
    model: nn.Module
    inputs: tuple
    known: dict

    def __repr__(self) -> str:
        return f"Case({self.family}, {self.model!r})"


def _known(free: list[int], lanes: list[int] | None = None) -> dict:
    return {"free_spaces": sorted(n for n in free if n > 1), "lane_groups": sorted(lanes or [])}


# ---- MLPs ----------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, d_in, widths, d_out, act, norm, bias, frozen):
        super().__init__()
        dims = [d_in, *widths, d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(dims, dims[1:]))
        self.act, self.norm = act, norm
        self.norms = nn.ModuleList(nn.LayerNorm(w) for w in widths) if norm == "layernorm" else None
        self.scales = nn.ParameterList(nn.Parameter(torch.ones(w)) for w in widths) if norm == "rms" else None
        self.drop = nn.Dropout(0.1)
        if frozen is not None and frozen < len(self.layers):
            self.layers[frozen].requires_grad_(False)

    def forward(self, x):
        for i, layer in enumerate(self.layers[:-1]):
            x = ACTS[self.act](layer(x))
            if self.norm == "layernorm":
                x = self.norms[i](x)
            elif self.norm == "rms":
                x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scales[i]
            x = self.drop(x)
        return self.layers[-1](x)


@st.composite
def mlps(draw) -> Case:
    d_in = draw(st.integers(1, 6))
    norm = draw(st.sampled_from(["none", "layernorm", "rms"]))
    # a norm over too few features keeps almost nothing of its input (layer norm over 1 feature is
    # a constant, over 2 a sign; RMS norm over 1 is a sign): the layers before it would be nearly
    # dead, so layer-normed layers get at least 3 features and RMS-normed ones at least 2
    widths = draw(st.lists(st.integers({"none": 1, "rms": 2, "layernorm": 3}[norm], 10), min_size=1, max_size=4))
    d_out = draw(st.integers(1, 5))
    m = MLP(d_in, widths, d_out, draw(st.sampled_from(SMOOTH)), norm,
            draw(st.booleans()), draw(st.one_of(st.none(), st.integers(0, 4))))
    return Case("mlp", m, (torch.randn(16, d_in),), _known(widths))


# ---- CNNs ----------------------------------------------------------------------------------------
class CNN(nn.Module):
    def __init__(self, in_ch, convs, bn, pool, head, n_out, act, hw, bn_eval):
        super().__init__()
        self.convs = nn.ModuleList()
        self.bns = nn.ModuleList()
        c = in_ch
        for cout, k, stride, pad, dil, g in convs:
            self.convs.append(nn.Conv2d(c, cout, k, stride=stride, padding=pad, dilation=dil, groups=g))
            self.bns.append(nn.BatchNorm2d(cout) if bn else nn.Identity())
            c = cout
        self.pool, self.head_kind, self.act = pool, head, act
        x = torch.zeros(1, in_ch, hw, hw)
        with torch.no_grad():
            for conv in self.convs:
                x = conv(x)
            x = self._pool(x)
        self.flat = x[0].numel() if head == "flatten" else c
        self.head = nn.Linear(self.flat, n_out)
        if bn_eval:
            for b in self.bns:
                b.eval()
                if isinstance(b, nn.BatchNorm2d):
                    b.running_mean.uniform_(-0.5, 0.5)
                    b.running_var.uniform_(0.5, 2.0)

    def _pool(self, x):
        if self.pool == "max" and min(x.shape[-2:]) >= 2:
            return F.max_pool2d(x, 2)
        if self.pool == "avg" and min(x.shape[-2:]) >= 2:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x):
        for conv, bn in zip(self.convs, self.bns):
            x = ACTS[self.act](bn(conv(x)))
        x = self._pool(x)
        if self.head_kind == "flatten":
            return self.head(x.flatten(1))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


@st.composite
def cnns(draw) -> Case:
    in_ch = draw(st.integers(1, 3))
    hw = draw(st.integers(7, 11))
    n = draw(st.integers(1, 3))
    g = draw(st.sampled_from([1, 2, 4]))
    convs, c, size, free, lanes = [], in_ch, hw, [], []
    run_open = False  # inside a run of grouped convolutions sharing g
    spaces: list[tuple[int, int]] = []  # (channels, number of segments) per hidden space
    for i in range(n):
        grouped = i > 0 and g > 1 and draw(st.booleans()) and c % g == 0
        per = draw(st.integers(1, 3))
        cout = per * g if grouped else draw(st.integers(1, 8))
        k = draw(st.integers(1, 3))
        stride = draw(st.integers(1, 2))
        dil = draw(st.integers(1, 2)) if k > 1 else 1
        pad = draw(st.integers(0, 1))
        out = (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
        # a kernel position that only ever reads padding is a dead weight: avoid such convolutions
        dead = out >= 1 and any(not any(0 <= o * stride - pad + i * dil < size for o in range(out)) for i in range(k))
        # an output position that only reads padding is a constant: under max pooling it can hide
        # everything upstream (the function then has far more symmetry than the architecture)
        dead = dead or any(not any(0 <= o * stride - pad + i * dil < size for i in range(k)) for o in range(out))
        # and keep at least 3 output positions: on tiny maps, zero padding can make the pooled
        # function symmetric in the kernel positions (a true invariance of that function)
        if out < 3 or dead:
            k, stride, dil, pad, out = 1, 1, 1, 0, size
        if grouped:
            if not run_open:
                spaces[-1] = (spaces[-1][0], g)  # the run's input space splits into g segments
                lanes.append(g)
            spaces.append((cout, g))
        else:
            spaces.append((cout, 1))
        run_open = grouped
        convs.append((cout, k, stride, pad, dil, g if grouped else 1))
        c, size = cout, out
    for ch, segs in spaces:
        free += [ch // segs] * segs
    bn = draw(st.booleans())
    m = CNN(in_ch, convs, bn, draw(st.sampled_from(["none", "max", "avg"])), draw(st.sampled_from(["gap", "flatten"])),
            draw(st.integers(1, 4)), draw(st.sampled_from(["tanh", "gelu", "silu"])), hw, bn and draw(st.booleans()))
    return Case("cnn", m, (torch.randn(8, in_ch, hw, hw),), _known(free, lanes))


# ---- ResNets -------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, cin, cout, stride, bn):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=not bn)
        self.b1 = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=not bn)
        self.b2 = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout) if bn else nn.Identity())

    def forward(self, x):
        y = self.b2(self.c2(torch.tanh(self.b1(self.c1(x)))))
        return torch.tanh(y + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    def __init__(self, in_ch, c0, blocks, bn, n_out):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, c0, 3, padding=1)
        layers, c = [], c0
        for cout, stride in blocks:
            layers.append(Block(c, cout, stride, bn))
            c = cout
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(c, n_out)

    def forward(self, x):
        return self.head(self.blocks(torch.tanh(self.stem(x))).mean((2, 3)))


class ResMLP(nn.Module):
    """Residual MLP with pre-norm blocks: the residual stream is one tied space."""

    def __init__(self, d_in, d, hidden, n_out):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)) for h in hidden)
        self.out = nn.Linear(d, n_out)

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = x + b(x)
        return self.out(x)


@st.composite
def resnets(draw) -> Case:
    if draw(st.booleans()):
        d_in, d = draw(st.integers(1, 5)), draw(st.integers(3, 8))  # layer norm over >= 3 features
        hidden = draw(st.lists(st.integers(1, 8), min_size=1, max_size=3))
        return Case("resmlp", ResMLP(d_in, d, hidden, draw(st.integers(1, 4))), (torch.randn(16, d_in),), _known([d, *hidden]))
    in_ch, c0 = draw(st.integers(1, 3)), draw(st.integers(2, 6))
    blocks = draw(st.lists(st.tuples(st.integers(2, 8), st.integers(1, 2)), min_size=1, max_size=3))
    free, stream = [], c0
    spaces = [c0]
    for cout, stride in blocks:
        spaces.append(cout)  # the block's inner space
        if stride != 1 or stream != cout:
            spaces.append(cout)  # a new residual stream after a projection shortcut
        stream = cout
    free = spaces
    m = ResNet(in_ch, c0, blocks, draw(st.booleans()), draw(st.integers(1, 4)))
    return Case("resnet", m, (torch.randn(8, in_ch, 8, 8),), _known(free))


# ---- DenseNets, split/chunk, tied weights --------------------------------------------------------
class DenseNet(nn.Module):
    def __init__(self, in_ch, c0, growths, split, n_out):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, c0, 3, padding=1)
        self.split = split
        self.side = nn.Conv2d(c0 // 2, c0 // 2, 3, padding=1) if split else None
        self.layers = nn.ModuleList()
        c = c0
        for gr in growths:
            self.layers.append(nn.Conv2d(c, gr, 3, padding=1))
            c += gr
        self.head = nn.Linear(c, n_out)

    def forward(self, x):
        x = torch.tanh(self.stem(x))
        if self.split:
            a, b = x.chunk(2, 1)
            x = torch.cat([torch.tanh(self.side(a)), b], 1)
        feats = [x]
        for layer in self.layers:
            feats.append(torch.tanh(layer(torch.cat(feats, 1))))
        return self.head(torch.cat(feats, 1).mean((2, 3)))


class Tied(nn.Module):
    """A square layer applied twice, an embedding shared with the output head, a frozen layer."""

    def __init__(self, vocab, d, w, repeats, frozen):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.inp = nn.Linear(d, w)
        self.shared = nn.Linear(w, w)
        self.back = nn.Linear(w, d)
        self.repeats = repeats
        if frozen:
            self.inp.requires_grad_(False)

    def forward(self, t):
        h = torch.tanh(self.inp(self.emb(t)))
        for _ in range(self.repeats):
            h = torch.tanh(self.shared(h))
        x = self.back(h)
        return x @ self.emb.weight.t()


@st.composite
def densenets(draw) -> Case:
    if draw(st.booleans()):
        vocab, d, w = draw(st.integers(2, 9)), draw(st.integers(2, 6)), draw(st.integers(2, 8))
        repeats = draw(st.integers(1, 3))
        m = Tied(vocab, d, w, repeats, draw(st.booleans()))
        # applied once, the shared layer's input and output are different spaces; twice, one space
        return Case("tied", m, (torch.randint(0, vocab, (4, 5)),), _known([d, w] + ([w] if repeats == 1 else [])))
    in_ch, c0 = draw(st.integers(1, 3)), draw(st.sampled_from([2, 4, 6, 8]))
    growths = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    split = draw(st.booleans())
    # with the split, the stem's halves are two spaces and the side conv's output is a third
    free = ([c0 // 2, c0 // 2, c0 // 2] if split else [c0]) + list(growths)
    m = DenseNet(in_ch, c0, growths, split, draw(st.integers(1, 4)))
    return Case("densenet", m, (torch.randn(4, in_ch, 6, 6),), _known(free))
