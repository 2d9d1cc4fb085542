"""``neugraph`` command line: inspect and verify a module's neural graph.

    neugraph inspect --example fm16
    neugraph inspect --model mypkg.models:make_net --input-shape 2,3,32,32 --json
    neugraph verify --example resnet --trials 16
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from . import compile as compile_graph
from . import trace, verify
from . import examples


def _load_model(args) -> tuple[torch.nn.Module, tuple, dict | None, str]:
    if args.example:
        m, x, known = examples.get(args.example)
        return m, x, known, f"example {args.example}"
    if not args.model:
        raise SystemExit("neugraph: give --example NAME or --model MODULE:FACTORY (see --help)")
    if ":" not in args.model:
        raise SystemExit(f"neugraph: --model {args.model!r} must look like 'package.module:factory' or 'file.py:factory'")
    where, factory = args.model.rsplit(":", 1)
    if where.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(where).stem, where)
        if spec is None or spec.loader is None:
            raise SystemExit(f"neugraph: cannot load {where}")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        mod = importlib.import_module(where)
    if not hasattr(mod, factory):
        raise SystemExit(f"neugraph: {where} has no attribute {factory!r}")
    model = getattr(mod, factory)()
    if not isinstance(model, torch.nn.Module):
        raise SystemExit(f"neugraph: {args.model} returned {type(model).__name__}, not a torch.nn.Module")
    if not args.input_shape:
        raise SystemExit("neugraph: --model needs at least one --input-shape, e.g. --input-shape 2,3,32,32")
    inputs = []
    for spec_ in args.input_shape:
        shape, _, high = spec_.partition(":")
        dims = tuple(int(d) for d in shape.split(","))
        inputs.append(torch.randint(0, int(high), dims) if high else torch.randn(dims))
    return model, tuple(inputs), None, args.model


def _inspect(args) -> int:
    model, x, _, label = _load_model(args)
    t0 = time.perf_counter()
    ir = trace(model, x)
    t1 = time.perf_counter()
    graph = compile_graph(ir, profile=args.profile, lpe=args.lpe)
    t2 = time.perf_counter()
    group = ir.group_summary()
    sp = ir.spaces
    params = []
    for name in ir.param_names:
        st = ir.states[name]
        params.append({
            "name": name, "shape": list(st.shape), "kind": st.kind, "trainable": st.trainable,
            "axes": [("grouped" if st.grouped and d == st.grouped[0] else
                      f"s{sp.find(a)}{'*' if sp.is_pinned(a) else ''}") for d, a in enumerate(st.axes)],
            "src_axis": st.src, "dst_axis": st.dst, "feature_axes": st.features,
        })
    diags = ir.diagnostics()
    out = {
        "model": label, "capture": ir.method, "notes": ir.notes, "profile": args.profile,
        "graph": graph.summary(), "group": group, "parameters": params,
        "pins": [d.__dict__ for d in diags], "unknown_ops": ir.unknown_ops,
        "lpe_eigenvalues": graph.info["lpe_eigenvalues"],
        "seconds": {"trace": round(t1 - t0, 4), "emit": round(t2 - t1, 4)},
    }
    if args.draw:
        from .draw import draw_adjacency, draw_graph

        d = Path(args.draw)
        d.mkdir(parents=True, exist_ok=True)
        out["drawings"] = [str(draw_adjacency(graph, d / "adjacency.png")), str(draw_graph(graph, d / "graph.png"))]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    s = out["graph"]
    print(f"{label}: captured with {ir.method}; {s['num_params']:,} parameters")
    for note in ir.notes:
        print(f"  note: {note}")
    print(f"graph ({args.profile} profile): {s['num_nodes']:,} nodes, {s['num_edges']:,} edges, "
          f"edge types {s['edge_type_counts']}, {s['max_feat']} feature slots per state")
    print(f"symmetry group: free neuron spaces {group['free_spaces']}, lane groups {group['lane_groups']}, "
          f"log|G| = {group['log_order']:.1f}")
    print("parameters (axes: space ids, * = pinned):")
    for p in params:
        print(f"  {p['name']:<32} {str(tuple(p['shape'])):<18} {p['kind']:<10} axes {p['axes']}"
              f"{'' if p['trainable'] else '  (frozen)'}")
    print("pins (op: reason x count):")
    for (op, reason), n in Counter((d["op"], d["reason"]) for d in out["pins"]).most_common():
        print(f"  {op}: {reason} x{n}")
    if ir.unknown_ops:
        print(f"ops without a rule (their axes were pinned): {ir.unknown_ops}")
    print(f"time: trace {out['seconds']['trace']} s, emit {out['seconds']['emit']} s")
    for p in out.get("drawings", []):
        print(f"wrote {p}")
    return 0


def _verify(args) -> int:
    model, x, known, label = _load_model(args)
    report = verify(model, x, trials=args.trials, profile=args.profile, known_group=known, seed=args.seed,
                    progress=not args.no_progress)
    if args.json:
        print(json.dumps({"model": label, **report.as_dict()}, indent=2))
    else:
        print(f"{label}")
        print(report)
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neugraph", description="Compile and verify neural graphs of PyTorch modules.")
    sub = parser.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("--example", choices=sorted(examples.EXAMPLES), help="a built-in model")
        p.add_argument("--model", help="MODULE:FACTORY or FILE.py:FACTORY returning an nn.Module")
        p.add_argument("--input-shape", action="append", default=[],
                       help="shape of one forward() argument, e.g. 2,3,32,32 (float) or 2,16:50257 (token ids < 50257); repeat per argument")
        p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = sub.add_parser("inspect", help="trace a module, print its symmetry, pins and graph")
    common(p)
    p.add_argument("--profile", default="nino", choices=["nino", "naive", "generic"])
    p.add_argument("--lpe", type=int, default=8)
    p.add_argument("--draw", metavar="DIR", help="also write adjacency and graph drawings (PNG) to DIR")
    p.set_defaults(fn=_inspect)
    p = sub.add_parser("verify", help="check the inferred symmetry and the compiled graph against the module")
    common(p)
    p.add_argument("--profile", default="generic", choices=["nino", "generic"])
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it goes to stderr)")
    p.set_defaults(fn=_verify)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
