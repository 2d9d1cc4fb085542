"""Loading and saving nowcasters.

Two formats, one :func:`load`:

- the published NiNo checkpoints (``*.pt``: a dict with ``state_dict`` and ``model_args``, read with
  ``torch.load(..., weights_only=True)``): ``{"gnn": False}`` is WNN+, anything else the NiNo GNN.
  Weight names are mapped onto our modules; nothing is copied to disk.
- our own: a directory holding ``nowcaster.safetensors`` and ``config.json`` (or a
  ``name.safetensors`` file with ``name.json`` beside it), written by :func:`save`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .base import Nowcaster
from .gnn import NiNoGNN
from .linefit import Linefit, LinefitPlus, NoChange
from .wnn import WNNPlus

FORMAT = "neural-nowcasting"
VERSION = 1
WEIGHTS, CONFIG = "nowcaster.safetensors", "config.json"
CLASSES: dict[str, type[Nowcaster]] = {c.__name__: c for c in (NiNoGNN, WNNPlus, Linefit, LinefitPlus, NoChange)}

# published NiNoModel arguments we honour, and the values we support for the others
_GNN_ARGS = {"ctx": "ctx", "hid": "hidden", "layers": "layers", "max_seq_len": "horizon",
             "max_feat_size": "max_feat", "lpe": "lpe", "edge_types": "edge_types",
             "wte_pos_enc": "word_pos", "vocab_size": "vocab_size", "final_edge_update": "final_edge_update"}
_FIXED = {"dms": True, "input_layer": "linear", "act_name": "silu", "residual": True, "improved_graph": True,
          "towers": 1}
_IGNORED = {"chunk_size", "message_passing_device", "gnn"}

_GNN_RENAMES = [
    (r"^layer_embed\.", "type_embed."),
    (r"^node_proj\.fc\.0\.", "node_in."),
    (r"^edge_proj\.fc\.0\.", "edge_in."),
    (r"^wte_pos_enc_layer\.", "word_pos."),
    (r"^edge_out\.fc\.(\d+)\.", r"head.mlp.\1."),
    (r"^gnn\.convs\.(\d+)\.edge_encoder\.", r"layers.\1.film."),
    (r"^gnn\.convs\.(\d+)\.pre_nns\.0\.0\.", r"layers.\1.msg."),
    (r"^gnn\.convs\.(\d+)\.post_nns\.0\.0\.", r"layers.\1.upd."),
    (r"^gnn\.convs\.(\d+)\.lin\.", r"layers.\1.out."),
    (r"^gnn\.edge_update\.(\d+)\.lin_e\.", r"edge_updates.\1.edge."),
    (r"^gnn\.edge_update\.(\d+)\.lin_s\.", r"edge_updates.\1.src."),
    (r"^gnn\.edge_update\.(\d+)\.lin_t\.", r"edge_updates.\1.dst."),
    (r"^gnn\.edge_update\.(\d+)\.lin1\.", r"edge_updates.\1.out."),
]
_WNN_RENAMES = [
    (r"^layer_embed\.", "type_embed."),
    (r"^edge_proj\.fc\.0\.", "inp."),
    (r"^edge_mlp\.fc\.(\d+)\.", r"mlp.\1."),
]


class CheckpointError(ValueError):
    """A file that is not a nowcaster checkpoint we can read, with the reason and the fix."""


def load(path: str | Path, map_location: str | torch.device = "cpu") -> Nowcaster:
    """Load a published NiNo checkpoint (``.pt``) or a nowcaster written by :func:`save`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no nowcaster checkpoint at {path}")
    if path.is_dir() or path.suffix == ".safetensors" or path.suffix == ".json":
        model = _load_own(path)
    elif path.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        model = _load_published(path)
    else:
        raise CheckpointError(f"{path}: unknown checkpoint format (expected a published NiNo '.pt' file, a "
                              f"directory with {CONFIG} and {WEIGHTS}, or a '.safetensors' file with its '.json')")
    return model.to(map_location).eval()


# ---- published checkpoints -----------------------------------------------------------------------
def _load_published(path: Path) -> Nowcaster:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled code, a corrupt file, not a torch file
        raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True) ({exc}); only plain "
                              "tensor checkpoints are loaded, never pickled code") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        keys = list(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a NiNo checkpoint: expected a dict with 'state_dict' and "
                              f"'model_args', found {keys}")
    sd = ckpt["state_dict"]
    args = dict(ckpt.get("model_args") or {})
    if args.get("gnn", True) in (False, None, "None", "none"):
        return _published_wnn(path, sd, args)
    return _published_gnn(path, sd, args)


def _check_args(path: Path, args: dict, known: set[str]) -> None:
    for key, want in _FIXED.items():
        if key in args and args[key] != want:
            raise CheckpointError(f"{path}: model_args {key}={args[key]!r} is not supported (only {want!r})")
    unknown = set(args) - known - set(_FIXED) - _IGNORED
    if unknown:
        raise CheckpointError(f"{path}: unsupported model_args {sorted(unknown)}; supported: "
                              f"{sorted(known | set(_FIXED) | _IGNORED)}")


def _published_gnn(path: Path, sd: dict, args: dict) -> NiNoGNN:
    _check_args(path, args, set(_GNN_ARGS))
    cfg = {ours: args[theirs] for theirs, ours in _GNN_ARGS.items() if theirs in args}
    ctx = cfg.setdefault("ctx", 5)
    try:  # sizes from the tensors themselves, so a checkpoint with other defaults still loads
        cfg["hidden"] = sd["layer_embed.weight"].shape[1]
        cfg["edge_types"] = sd["layer_embed.weight"].shape[0]
        cfg["max_feat"] = sd["edge_proj.fc.0.weight"].shape[1] // ctx
        cfg["horizon"] = sd["edge_out.fc.2.weight"].shape[0] // cfg["max_feat"]
        cfg["layers"] = len({k.split(".")[2] for k in sd if k.startswith("gnn.convs.")})
        cfg["lpe"] = sd["node_proj.fc.0.weight"].shape[1] if "node_proj.fc.0.weight" in sd else 0
    except KeyError as exc:
        raise CheckpointError(f"{path}: missing weight {exc} for a NiNo GNN checkpoint "
                              "(model_args without gnn=False)") from exc
    cfg["final_edge_update"] = len({k.split(".")[2] for k in sd if k.startswith("gnn.edge_update.")}) == cfg["layers"]
    cfg["word_pos"] = "wte_pos_enc_layer.weight" in sd
    if cfg["word_pos"]:
        cfg["vocab_size"] = sd["wte_pos_enc_layer.weight"].shape[0] - 1
    model = NiNoGNN(**cfg)
    _load_renamed(path, model, sd, _GNN_RENAMES)
    return model


def _published_wnn(path: Path, sd: dict, args: dict) -> WNNPlus:
    _check_args(path, args, {"ctx", "hid", "max_seq_len", "edge_types", "max_feat_size", "lpe",
                             "wte_pos_enc", "vocab_size", "layers"})
    try:
        hidden = sd["edge_proj.fc.0.weight"].shape[0]
        ctx = sd["edge_proj.fc.0.weight"].shape[1]
        fc = sorted(int(k.split(".")[2]) for k in sd if k.startswith("edge_mlp.fc.") and k.endswith(".weight"))
        horizon = sd[f"edge_mlp.fc.{fc[-1]}.weight"].shape[0]
        edge_types = sd["layer_embed.weight"].shape[0]
    except (KeyError, IndexError) as exc:
        raise CheckpointError(f"{path}: missing weight {exc} for a WNN+ checkpoint (model_args gnn=False)") from exc
    model = WNNPlus(ctx=ctx, hidden=hidden, horizon=horizon, edge_types=edge_types, mlp_layers=len(fc))
    _load_renamed(path, model, sd, _WNN_RENAMES)
    return model


def _load_renamed(path: Path, model: torch.nn.Module, sd: dict, renames) -> None:
    out = {}
    for key, value in sd.items():
        new = key
        for pattern, repl in renames:
            new, n = re.subn(pattern, repl, key)
            if n:
                break
        out[new] = value
    _strict_load(path, model, out)


def _strict_load(path: Path, model: torch.nn.Module, sd: dict) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or wrong:
        detail = "; ".join(s for s in (
            f"missing {missing[:6]}" if missing else "",
            f"unexpected {unexpected[:6]}" if unexpected else "",
            "shape mismatch " + ", ".join(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                                          for k in wrong[:6]) if wrong else "") if s)
        raise CheckpointError(f"{path}: weights do not fit {type(model).__name__}({model.config}): {detail}. "
                              "Check the file's config (model_args / config.json) against its weights")
    model.load_state_dict(sd, strict=True)


# ---- our format ----------------------------------------------------------------------------------
def save(nowcaster: Nowcaster, path: str | Path) -> Path:
    """Write ``nowcaster`` as safetensors + JSON config; returns the weights file.

    ``path``: a directory (created if needed; files ``nowcaster.safetensors`` and ``config.json``), or
    a file name ending in ``.safetensors`` (the config goes beside it as ``<stem>.json``).
    """
    from safetensors.torch import save_file

    name = type(nowcaster).__name__
    if name not in CLASSES:
        raise TypeError(f"cannot save a {name}; known nowcasters: {sorted(CLASSES)}")
    path = Path(path)
    if path.suffix == ".safetensors":
        weights, config = path, path.with_suffix(".json")
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        path.mkdir(parents=True, exist_ok=True)
        weights, config = path / WEIGHTS, path / CONFIG
    tensors = {k: v.detach().cpu().contiguous() for k, v in nowcaster.state_dict().items()}
    save_file(tensors, str(weights), metadata={"format": FORMAT})
    config.write_text(json.dumps({"format": FORMAT, "version": VERSION, "class": name,
                                  "config": nowcaster.config}, indent=2, sort_keys=True))
    return weights


def _load_own(path: Path) -> Nowcaster:
    from safetensors.torch import load_file

    if path.is_dir():
        weights, config = path / WEIGHTS, path / CONFIG
    else:
        weights, config = path.with_suffix(".safetensors"), path.with_suffix(".json")
        if path.name == WEIGHTS and not config.exists():  # the file ``save(nowcaster, directory)`` returned
            config = path.parent / CONFIG
    for f in (config, weights):
        if not f.exists():
            raise CheckpointError(f"{path}: {f.name} is missing; a saved nowcaster is {WEIGHTS} + {CONFIG} in a "
                                  "directory, or name.safetensors + name.json (write both with nowcast.save)")
    try:
        meta = json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{config}: not a {FORMAT} config (no \"format\": \"{FORMAT}\"); write it with "
                              "nowcast.save")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{config}: format version {meta['version']} is newer than this library's "
                              f"({VERSION}); upgrade neural-nowcasting")
    cls = CLASSES.get(meta.get("class"))
    if cls is None:
        raise CheckpointError(f"{config}: unknown nowcaster class {meta.get('class')!r}; known: {sorted(CLASSES)}")
    try:
        model = cls(**meta.get("config", {}))
    except TypeError as exc:
        raise CheckpointError(f"{config}: config does not fit {cls.__name__}: {exc}") from exc
    _strict_load(weights, model, load_file(str(weights)))
    return model
