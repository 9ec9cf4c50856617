"""``kcprnn compress``: decompose a trained recurrent model's weights into a format, optionally
fine-tune it, and report the accuracy before and after.

Sources:

- a run folder of ``kcprnn train`` (``checkpoint.json`` and the weights file it names); its data
  (the same cache and splits) give the test accuracy of the dense model, of the decomposed model
  and after ``--finetune-epochs`` epochs of fine-tuning on its training split;
- a file written by :func:`kcprnn.save` holding an LSTM, GRU, RNN or a model with one;
- a safetensors file of a ``torch.nn.LSTM``/``GRU``/``RNN`` ``state_dict`` (``weight_ih_l0``,
  ``weight_hh_l0``, ``bias_ih_l0``, ... and ``*_reverse``); the sizes, layers, directions, bias
  and projection are read from the tensors' names and shapes, ``--cell`` tells LSTM, GRU and
  RNN apart and is checked against them, as are ``--input-size`` and ``--hidden-size`` if given.

Every cell's input-to-hidden matrix goes through ``FORMATS[--format].from_dense`` at ``--rank``
(or the largest rank whose compression of that matrix reaches ``--compression``); the
hidden-to-hidden (and projection) matrices stay as they are unless ``--hidden-format`` is given
(then ``--hidden-rank`` or ``--hidden-compression``). Without data, the report gives each
matrix's relative reconstruction error and the relative error of the model's outputs on random
inputs. The output folder gets ``model.safetensors`` (:func:`kcprnn.load` reads it) and
``compress.json`` (the report); nothing is written anywhere else.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..formats import FORMATS, FactorizedMatrix, make_matrix
from ..io import LoadError, load, read_safetensors, save, write_text_atomic
from ..rnn import GRU, LSTM, RNN
from ..rnn._options import fold_gates, hidden_matrix_options, input_matrix_options
from ..rnn.cells import RNNCellBase
from ..rnn.kron import rebuild
from ..rnn.recurrent import RNNBase
from .config import tomllib

__all__ = ["compress_rnn", "main", "rank_for_compression", "torch_rnn_from_state_dict"]

log = logging.getLogger(__name__)

MAX_RANK = 1 << 16
"""Upper end of the search for the rank that reaches a compression target."""


# --- choosing the rank ------------------------------------------------------------------------


def rank_for_compression(
    format: str, in_features: int, out_features: int, target: float, options: dict[str, Any]
) -> int:
    """The largest int ``rank`` whose ``format`` matrix (with ``options``) has at least
    ``target`` times fewer parameters than the dense ``(out_features, in_features)`` one."""
    if not target > 0:
        raise ValueError(f"the compression target must be > 0, got {target!r}")

    def ratio(rank: int) -> float:
        m = make_matrix(format, in_features, out_features, device="meta", rank=rank, **options)
        return m.compression_ratio

    if ratio(1) < target:
        raise ValueError(
            f"format {format!r} cannot compress a {out_features} x {in_features} matrix "
            f"{target:g}x with these options: rank 1 gives {ratio(1):.1f}x"
        )
    lo, hi = 1, 2
    while hi < MAX_RANK and ratio(hi) >= target:  # the number of parameters grows with the rank
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ratio(mid) >= target else (lo, mid)
    return lo


# --- building the compressed model -----------------------------------------------------------


def _the_rnn(model: nn.Module) -> RNNBase:
    if isinstance(model, RNNBase):
        return model
    rnn = getattr(model, "rnn", None)
    if isinstance(rnn, RNNBase):
        return rnn
    raise TypeError(
        f"kcprnn compress needs a kcprnn LSTM, GRU or RNN (or a model with one as .rnn), "
        f"got {type(model).__name__}"
    )


def _spec(
    format: str,
    rank: Any,
    compression: float | None,
    options: dict[str, Any],
    w: Tensor,
) -> dict[str, Any]:
    opts = dict(options)
    if format == "dense":
        return opts
    if rank is not None:
        opts["rank"] = rank
    elif compression is not None:
        opts["rank"] = rank_for_compression(format, w.shape[1], w.shape[0], compression, opts)
    return opts


def compress_rnn(
    model: nn.Module,
    format: str,
    *,
    rank: Any = None,
    compression: float | None = None,
    options: dict[str, Any] | None = None,
    hidden_format: str | None = None,
    hidden_rank: Any = None,
    hidden_compression: float | None = None,
    hidden_options: dict[str, Any] | None = None,
    hidden_modes: Sequence[Any] | None = None,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """A copy of ``model`` (a kcprnn LSTM/GRU/RNN or a model holding one as ``.rnn``) whose
    input-to-hidden matrices are ``FORMATS[format].from_dense`` of the current ones, and whose
    hidden-to-hidden (and projection) matrices are ``FORMATS[hidden_format].from_dense`` of
    theirs when ``hidden_format`` is given (kept otherwise).

    ``rank`` (or ``compression``, a target ratio per matrix that picks the rank by
    :func:`rank_for_compression`) and ``options`` (``in_modes``, ``terms``, ...) go to every
    input-to-hidden matrix; ``hidden_modes`` tensorize the gates as in the recurrent modules
    (the gates folded into the first output mode). Returns ``(model, records)`` with one record
    per matrix: layer, direction, role, format, options, parameters, compression and the relative
    Frobenius error of the reconstruction.
    """
    for name, fmt in (("format", format), ("hidden_format", hidden_format)):
        if fmt is not None and fmt not in FORMATS:
            raise ValueError(f"unknown {name} {fmt!r}; choose one of {sorted(FORMATS)}")
    if rank is not None and compression is not None:
        raise ValueError("give rank or compression, not both")
    out = copy.deepcopy(model)
    rnn = _the_rnn(out)
    modes = list(hidden_modes) if hidden_modes is not None else None
    records = []
    for layer in range(rnn.num_layers):
        for direction in range(rnn.num_directions):
            cell: RNNCellBase = rnn.cell(layer, direction)
            g = cell.num_gates
            ih_opts = dict(options or {})
            if layer > 0:  # deeper layers read the hidden outputs of every direction
                ih_opts.pop("in_modes", None)
                if (
                    modes is not None
                    and not rnn.proj_size
                    and cell.input_size == (rnn.num_directions * rnn.hidden_size)
                ):
                    ih_opts["in_modes"] = fold_gates(modes, rnn.num_directions)
            plan: dict[str, tuple[str, Any, float | None, dict[str, Any]]] = {
                "ih": (format, rank, compression, input_matrix_options(ih_opts, g, modes))
            }
            if hidden_format is not None:
                hh = hidden_matrix_options(
                    dict(hidden_options or {}), cell.output_size, cell.hidden_size, g, modes
                )
                plan["hh"] = (hidden_format, hidden_rank, hidden_compression, hh)
                if cell.weight_hr is not None:
                    plan["hr"] = (
                        hidden_format,
                        hidden_rank,
                        hidden_compression,
                        dict(hidden_options or {}),
                    )
            for role, (fmt, r, target, opts) in plan.items():
                old: FactorizedMatrix = getattr(cell, f"weight_{role}")
                with torch.no_grad():
                    w = rebuild(old).detach()  # (g, i)
                spec = _spec(fmt, r, target, opts, w)
                new = FORMATS[fmt].from_dense(w, **spec)
                with torch.no_grad():
                    err = (new.to_dense() - w).norm() / w.norm().clamp_min(1e-30)
                setattr(cell, f"weight_{role}", new)
                cell._matrix_options[role] = (fmt, spec)
                records.append(
                    {
                        "layer": layer,
                        "direction": direction,
                        "matrix": f"W_{role}",
                        "shape": [new.out_features, new.in_features],
                        "format": fmt,
                        "options": _jsonable(spec),
                        "params": new.num_params,
                        "compression": new.compression_ratio,
                        "relative_error": float(err),
                    }
                )
    return out, records


def _matrices(rnn: RNNBase) -> list[FactorizedMatrix]:
    return [
        m
        for layer in range(rnn.num_layers)
        for direction in range(rnn.num_directions)
        for m in rnn.cell(layer, direction).matrices().values()
    ]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# --- torch.nn state_dicts -----------------------------------------------------------------------

_GATES = {"lstm": 4, "gru": 3, "rnn": 1}
_KEY = re.compile(r"(weight_ih|weight_hh|weight_hr|bias_ih|bias_hh)_l(\d+)(_reverse)?")


def torch_rnn_from_state_dict(
    tensors: dict[str, Tensor],
    cell: str,
    *,
    input_size: int | None = None,
    hidden_size: int | None = None,
    nonlinearity: str = "tanh",
    batch_first: bool = False,
) -> nn.RNNBase:
    """The ``torch.nn.LSTM``/``GRU``/``RNN`` (``cell``) whose ``state_dict`` is ``tensors``: its
    sizes, layers, directions, bias and projection read from the names and shapes, checked
    against ``input_size`` and ``hidden_size`` when given; the weights loaded strictly."""
    if cell not in _GATES:
        raise ValueError(f"cell must be one of {list(_GATES)}, got cell={cell!r}")
    bad = sorted(k for k in tensors if not _KEY.fullmatch(k))
    if bad:
        raise ValueError(
            f"not a torch.nn.LSTM/GRU/RNN state_dict: unexpected tensor names {bad[:6]} "
            "(expected weight_ih_l0, weight_hh_l0, bias_ih_l0, ...)"
        )
    if "weight_ih_l0" not in tensors or "weight_hh_l0" not in tensors:
        raise ValueError("not a torch.nn.LSTM/GRU/RNN state_dict: no weight_ih_l0/weight_hh_l0")
    w_ih, w_hh = tensors["weight_ih_l0"], tensors["weight_hh_l0"]
    if w_ih.dim() != 2 or w_hh.dim() != 2:
        raise ValueError(
            f"weight_ih_l0 and weight_hh_l0 must be 2-D, got shapes {tuple(w_ih.shape)} and "
            f"{tuple(w_hh.shape)}"
        )
    g = _GATES[cell]
    rows = w_ih.shape[0]
    if rows % g:
        raise ValueError(
            f"weight_ih_l0 has {rows} rows, not a multiple of the {g} gates of cell={cell!r}"
        )
    hidden = rows // g
    proj = "weight_hr_l0" in tensors
    proj_size = tensors["weight_hr_l0"].shape[0] if proj else 0
    if w_hh.shape != (rows, proj_size or hidden):
        raise ValueError(
            f"weight_hh_l0 has shape {tuple(w_hh.shape)}; a {cell} with {rows} gate rows "
            f"(hidden_size={hidden}) needs ({rows}, {proj_size or hidden}): is cell={cell!r} "
            "right?"
        )
    for name, given, found in (
        ("input_size", input_size, w_ih.shape[1]),
        ("hidden_size", hidden_size, hidden),
    ):
        if given is not None and given != found:
            raise ValueError(f"{name}={given} given, but the weights have {name}={found}")
    layers = 1 + max(int(m.group(2)) for k in tensors if (m := _KEY.fullmatch(k)))
    bidirectional = any(k.endswith("_reverse") for k in tensors)
    kwargs: dict[str, Any] = {
        "num_layers": layers,
        "bias": "bias_ih_l0" in tensors,
        "batch_first": batch_first,
        "bidirectional": bidirectional,
        "dtype": w_ih.dtype,
    }
    if cell == "lstm":
        module: nn.RNNBase = nn.LSTM(w_ih.shape[1], hidden, proj_size=proj_size, **kwargs)
    elif cell == "gru":
        module = nn.GRU(w_ih.shape[1], hidden, **kwargs)
    else:
        module = nn.RNN(w_ih.shape[1], hidden, nonlinearity=nonlinearity, **kwargs)
    want = module.state_dict()
    missing, unexpected = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or unexpected:
        raise ValueError(
            f"the tensors do not form a torch.nn.{type(module).__name__} state_dict: missing "
            f"{missing[:6]}, unexpected {unexpected[:6]}"
        )
    for k, t in want.items():
        if tensors[k].shape != t.shape:
            raise ValueError(
                f"tensor {k!r} has shape {tuple(tensors[k].shape)}, a torch.nn."
                f"{type(module).__name__} of these sizes needs {tuple(t.shape)}"
            )
    module.load_state_dict(tensors)
    return module


# --- data and accuracy (run folders) --------------------------------------------------------------


def _output_error(dense: nn.Module, compressed: nn.Module, seed: int = 0) -> float:
    """Relative Frobenius error of the compressed model's outputs against the dense one's on
    standard normal inputs (8 sequences of 20 steps)."""
    rnn = _the_rnn(dense)
    gen = torch.Generator().manual_seed(seed)
    p = next(dense.parameters())
    x = torch.randn(8, 20, rnn.input_size, generator=gen, dtype=p.dtype).to(p.device)
    if not rnn.batch_first and dense is rnn:
        x = x.transpose(0, 1)
    was = (dense.training, compressed.training)
    dense.eval(), compressed.eval()
    with torch.no_grad():
        a, b = dense(x), compressed(x)
    dense.train(was[0]), compressed.train(was[1])
    if isinstance(a, tuple):
        a, b = a[0], b[0]
    return float((b - a).norm() / a.norm().clamp_min(1e-30))


def _finetune_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Any,
    train_idx: np.ndarray,
    rng: np.random.Generator,
    batch_size: int,
    grad_clip: float,
    device: torch.device,
) -> float:
    """One epoch of cross-entropy training on ``train_idx`` in the training harness's batching
    (a random order, each batch's indices ascending); returns the mean loss."""
    from .train import batch_inputs

    model.train()
    order = rng.permutation(train_idx)
    loss_sum = 0.0
    for start in range(0, len(order), batch_size):
        b = np.sort(order[start : start + batch_size])
        logits = model(batch_inputs(data, b, device))  # (b, c)
        y = torch.from_numpy(data.labels[b]).to(device)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        loss_sum += loss.item() * len(b)
    return loss_sum / max(len(train_idx), 1)


# --- command line ---------------------------------------------------------------------------------


def _value(text: str) -> Any:
    """A TOML value (``4``, ``[2, 4]``, ``"x"``); a bare word is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if re.fullmatch(r"[\w.:/+-]+", text):
            return text
        raise ValueError(f"cannot parse {text!r} as a TOML value") from None


def _options(items: list[str], prefix: str) -> dict[str, Any]:
    out = {}
    for item in items:
        m = re.fullmatch(rf"--{prefix}\.(\w+)=(.*)", item, flags=re.S)
        if m:
            out[m.group(1)] = _value(m.group(2))
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kcprnn compress",
        description="Decompose a trained LSTM/GRU/RNN's weights into a format, optionally "
        "fine-tune, report accuracy (run folders) or output error. Format options: "
        "--format_options.KEY=VALUE (--hidden_options.KEY=VALUE), TOML values.",
    )
    p.add_argument(
        "source",
        help="a kcprnn train run folder, a kcprnn.save file, or a safetensors file of a "
        "torch.nn LSTM/GRU/RNN state_dict",
    )
    p.add_argument("--out", required=True, help="output folder (created; must not hold files)")
    p.add_argument("--format", required=True, help=f"format of W_ih: {sorted(FORMATS)}")
    p.add_argument("--rank", type=_value, help="rank of W_ih's format (int or TOML list)")
    p.add_argument("--compression", type=float, help="target compression of each W_ih")
    p.add_argument("--hidden-format", help="format of W_hh (and W_hr); default: kept")
    p.add_argument("--hidden-rank", type=_value, help="rank of W_hh's format")
    p.add_argument("--hidden-compression", type=float, help="target compression of each W_hh")
    p.add_argument(
        "--hidden-modes",
        type=_value,
        help="modes of hidden_size (the gates fold into the first); default: the run's",
    )
    p.add_argument("--finetune-epochs", type=int, default=0, help="epochs of fine-tuning (runs)")
    p.add_argument("--lr", type=float, help="fine-tuning learning rate (default: the run's)")
    p.add_argument("--batch-size", type=int, help="fine-tuning batch size (default: the run's)")
    p.add_argument("--grad-clip", type=float, help="gradient norm clip (default: the run's)")
    p.add_argument("--cell", choices=sorted(_GATES), help="state_dict sources: the module kind")
    p.add_argument("--input-size", type=int, help="state_dict sources: checked if given")
    p.add_argument("--hidden-size", type=int, help="state_dict sources: checked if given")
    p.add_argument("--nonlinearity", default="tanh", help="state_dict sources, RNN: tanh|relu")
    p.add_argument("--batch-first", action="store_true", help="state_dict sources: batch_first")
    p.add_argument(
        "--seed", type=int, default=0, help="seeds the decompositions' random starts (ALS)"
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p


def _load_source(args: Any) -> tuple[Any, Any, dict[str, Any], str]:
    """``(model, run config or None, checkpoint meta, kind)``."""
    src = Path(args.source)
    if src.is_dir():
        from .train import load_checkpoint

        model, cfg, meta = load_checkpoint(src, device=args.device)
        return model, cfg, meta, "run folder"
    if not src.is_file():
        raise FileNotFoundError(f"source {str(src)!r} is neither a run folder nor a file")
    tensors, meta = read_safetensors(src)
    if "kcprnn" in meta:
        return load(src, map_location=args.device), None, {}, "kcprnn.save file"
    if args.cell is None:
        raise ValueError(
            f"{str(src)!r} holds a torch.nn state_dict: give --cell lstm|gru|rnn (an LSTM's "
            "4 gates and a GRU's 3 are not told apart by the shapes alone)"
        )
    module = torch_rnn_from_state_dict(
        tensors,
        args.cell,
        input_size=args.input_size,
        hidden_size=args.hidden_size,
        nonlinearity=args.nonlinearity,
        batch_first=args.batch_first,
    )
    cls: Any = {"lstm": LSTM, "gru": GRU, "rnn": RNN}[args.cell]
    dense = cls.from_torch(module, format="dense")  # exact copy
    return dense.to(args.device), None, {}, "torch.nn state_dict"


def run(args: Any, extra: list[str], stream: Any) -> dict[str, Any]:
    """The command's work; returns the report also written to ``compress.json``."""
    out_dir = Path(args.out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"output folder {str(out_dir)!r} exists and is not empty")
    unknown = [e for e in extra if not re.fullmatch(r"--(format|hidden)_options\.\w+=.*", e)]
    if unknown:
        raise ValueError(f"unrecognized arguments: {' '.join(unknown)}")
    if args.finetune_epochs < 0:
        raise ValueError(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dense, cfg, _, kind = _load_source(args)
    classify = cfg is not None and hasattr(dense, "classifier")
    if args.finetune_epochs and not classify:
        raise ValueError(
            "--finetune-epochs needs a classification run folder of kcprnn train as the source "
            f"(its data and splits); the source is a {kind}"
        )
    modes = args.hidden_modes
    if modes is None and cfg is not None:
        modes = list(cfg.hidden_modes)
    torch.manual_seed(args.seed)  # CP-ALS (KCP, CP) starts from random factors
    compressed: Any
    compressed, records = compress_rnn(
        dense,
        args.format,
        rank=args.rank,
        compression=args.compression,
        options=_options(extra, "format_options"),
        hidden_format=args.hidden_format,
        hidden_rank=args.hidden_rank,
        hidden_compression=args.hidden_compression,
        hidden_options=_options(extra, "hidden_options"),
        hidden_modes=modes,
    )
    rnn_dense, rnn_small = _the_rnn(dense), _the_rnn(compressed)
    dense_count = sum(m.in_features * m.out_features for m in _matrices(rnn_dense))
    small_count = sum(m.num_params for m in _matrices(rnn_small))
    report: dict[str, Any] = {
        "source": str(args.source),
        "source_kind": kind,
        "seed": args.seed,
        "format": args.format,
        "hidden_format": args.hidden_format or "kept",
        "matrices": records,
        "recurrent_params_before": dense_count,
        "recurrent_params_after": small_count,
        "recurrent_compression": dense_count / small_count,
        "output_relative_error": _output_error(dense, compressed),
    }
    if classify:
        from .train import evaluate, load_data, split_indices

        data = load_data(cfg)
        train_idx, test_idx = split_indices(cfg, data)
        batch = args.batch_size or cfg.batch_size
        report["dense_test_acc"] = evaluate(dense, data, test_idx, batch, device)[1]
        report["decomposed_test_acc"] = evaluate(compressed, data, test_idx, batch, device)[1]
        print(
            f"test accuracy: dense {report['dense_test_acc']:.4f}, decomposed "
            f"{report['decomposed_test_acc']:.4f}",
            file=stream,
        )
        if args.finetune_epochs:
            clip = cfg.grad_clip if args.grad_clip is None else args.grad_clip
            lr = args.lr or cfg.lr
            optimizer = torch.optim.Adam(compressed.parameters(), lr=lr)
            rng = np.random.default_rng(cfg.seed)
            history = []
            for epoch in range(1, args.finetune_epochs + 1):
                start = time.perf_counter()
                loss = _finetune_epoch(
                    compressed, optimizer, data, train_idx, rng, batch, clip, device
                )
                acc = evaluate(compressed, data, test_idx, batch, device)[1]
                row = {
                    "epoch": epoch,
                    "train_loss": loss,
                    "test_acc": acc,
                    "seconds": time.perf_counter() - start,
                }
                history.append(row)
                print(f"fine-tune epoch {epoch}: {json.dumps(row)}", file=stream)
            report["finetune"] = history
            report["finetuned_test_acc"] = history[-1]["test_acc"]
            report["finetune_settings"] = {"lr": lr, "batch_size": batch, "grad_clip": clip}
    out_dir.mkdir(parents=True, exist_ok=True)
    save(compressed, out_dir / "model.safetensors")
    write_text_atomic(out_dir / "compress.json", json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    args, extra = _parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = run(args, extra, sys.stdout)
    except (LoadError, FileNotFoundError, FileExistsError, ValueError, TypeError) as exc:
        print(f"kcprnn compress: error: {exc}", file=sys.stderr)
        return 2
    summary = {k: v for k, v in report.items() if k not in ("matrices", "finetune")}
    print(json.dumps(summary, indent=2))
    print(f"written: {Path(args.out) / 'model.safetensors'}, {Path(args.out) / 'compress.json'}")
    return 0
