"""Saving and loading models safely: :func:`save` and :func:`load`.

A saved model is ONE file in the safetensors format: an 8-byte little-endian header length, a
JSON header that lists every tensor (dtype, shape, byte range) and carries string metadata, then
the raw little-endian tensor bytes. The metadata key ``"kcprnn"`` holds the model's configuration
as JSON: the class name, the sizes and settings of every module, the format and options of every
weight matrix (modes, ranks, algorithm, dtype), plus ``kcprnn_version`` and ``format_version``.
One file rather than a ``.safetensors`` + ``.json`` pair, so that a model cannot be separated
from its configuration and one atomic rename publishes both.

Loading runs no code from the file: the class name is looked up in a fixed allow-list of kcprnn
classes (:data:`LOADABLE`), the module is rebuilt from the configuration's plain JSON values
through the classes' own constructors (which validate them), and the tensors are then checked
against it (missing and unexpected names, shapes, dtypes) before they are copied in. Pickle files
(``torch.save``'s format), truncated files and headers whose sizes disagree with the file are
refused with an error that says what is wrong. A machine-specific ``cost_model`` set on a matrix
is not saved; the loaded model plans with the default one.

The safetensors format itself is read and written by :mod:`kcprnn.safetensors_io` (re-exported
here: :func:`read_safetensors`, :func:`write_safetensors`, :class:`LoadError`).
"""

from __future__ import annotations

import importlib
import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .formats import FORMATS, FactorizedMatrix, make_matrix
from .formats._ring import RingMatrix
from .safetensors_io import LoadError, read_safetensors, write_safetensors, write_text_atomic

__all__ = [
    "FORMAT_VERSION",
    "LOADABLE",
    "LoadError",
    "build_module",
    "load",
    "module_config",
    "read_safetensors",
    "save",
    "write_safetensors",
    "write_text_atomic",
]

FORMAT_VERSION = 1
"""Version of the configuration layout :func:`save` writes; :func:`load` reads this and older."""

LOADABLE: dict[str, str] = {
    "FactorizedLinear": "kcprnn.layers.linear",
    "DenseLinear": "kcprnn.layers.linear",
    "KCPLinear": "kcprnn.layers.linear",
    "CPLinear": "kcprnn.layers.linear",
    "TuckerLinear": "kcprnn.layers.linear",
    "TTLinear": "kcprnn.layers.linear",
    "TRLinear": "kcprnn.layers.linear",
    "BTLinear": "kcprnn.layers.linear",
    "HTLinear": "kcprnn.layers.linear",
    "LSTM": "kcprnn.rnn.recurrent",
    "GRU": "kcprnn.rnn.recurrent",
    "RNN": "kcprnn.rnn.recurrent",
    "LSTMCell": "kcprnn.rnn.cells",
    "GRUCell": "kcprnn.rnn.cells",
    "RNNCell": "kcprnn.rnn.cells",
    "SequenceClassifier": "kcprnn.experiments.model",
    "CTCModel": "kcprnn.experiments.ctc",
}
"""The classes :func:`save` writes and :func:`load` rebuilds: class name -> its module. Nothing
else is ever instantiated from a file."""

# the parameter dtypes a configuration may name
_FLOAT_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}


# --- configurations ---------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(value: object) -> torch.dtype:
    if not isinstance(value, str) or value not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_FLOAT_DTYPES)}, got dtype={value!r}")
    return _FLOAT_DTYPES[value]


def _matrix_options(matrix: FactorizedMatrix) -> dict[str, Any]:
    """The constructor options that rebuild ``matrix``'s parameters with the same shapes."""
    m: Any = matrix  # the format's own attributes
    name = m.format_name
    opts: dict[str, Any] = {"in_modes": list(m.in_modes), "out_modes": list(m.out_modes)}
    if name == "kcp":
        opts["in_modes"] = [list(s) for s in m.in_splits]
        opts["out_modes"] = [list(s) for s in m.out_splits]
        opts["terms"] = m.terms
        opts["rank"] = list(m.ranks)
    elif name == "cp":
        opts["rank"] = m.rank
    elif isinstance(m, RingMatrix):
        opts["rank"] = list(type(m).ranks_of_cores(list(m.cores)))
    elif name in ("tucker", "ht"):
        opts["rank"] = list(m.ranks)
    elif name == "bt":
        opts["rank"] = list(m.ranks)
        opts["blocks"] = m.blocks
    elif name != "dense":
        raise TypeError(
            f"cannot save a {type(m).__name__} (format {name!r}): kcprnn.save knows the formats "
            f"{sorted(_SAVED_FORMATS)}"
        )
    if m.algorithm != m.default_algorithm:
        opts["algorithm"] = m.algorithm
    return opts


_SAVED_FORMATS = ("bt", "cp", "dense", "ht", "kcp", "tr", "tt", "tucker")


def _matrix_config(m: FactorizedMatrix) -> dict[str, Any]:
    p = next(m.parameters(), None)
    dtype = m.factory_kwargs["dtype"] if p is None else p.dtype
    return {
        "format": m.format_name,
        "in_features": m.in_features,
        "out_features": m.out_features,
        "dtype": _dtype_name(dtype),
        "options": _matrix_options(m),
    }


def _build_matrix(cfg: Any, device: torch.device) -> FactorizedMatrix:
    cfg = _fields(cfg, "matrix", ("format", "in_features", "out_features", "dtype", "options"))
    if cfg["format"] not in _SAVED_FORMATS or cfg["format"] not in FORMATS:
        raise ValueError(f"unknown format {cfg['format']!r}; choose one of {list(_SAVED_FORMATS)}")
    if not isinstance(cfg["options"], dict):
        raise ValueError(f"matrix options must be a JSON object, got {cfg['options']!r}")
    return make_matrix(
        cfg["format"],
        cfg["in_features"],
        cfg["out_features"],
        device=device,
        dtype=_parse_dtype(cfg["dtype"]),
        **cfg["options"],
    )


def _fields(cfg: Any, what: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(cfg, dict):
        raise ValueError(f"the {what} configuration must be a JSON object, got {cfg!r}")
    missing = [k for k in keys if k not in cfg]
    extra = [k for k in cfg if k not in keys and k != "class"]
    if missing or extra:
        raise ValueError(
            f"the {what} configuration has missing keys {missing} / unexpected keys {extra}"
        )
    return cfg


def _linear_config(m: Any) -> dict[str, Any]:
    from .layers.linear import FactorizedLinear

    assert isinstance(m, FactorizedLinear)
    return {"weight": _matrix_config(m.weight), "bias": m.bias is not None}


def _build_linear(cls: Any, cfg: dict[str, Any], device: torch.device) -> nn.Module:
    cfg = _fields(cfg, cls.__name__, ("weight", "bias"))
    weight = _build_matrix(cfg["weight"], device)
    if cls.__name__ != "FactorizedLinear" and weight.format_name != cls.__name__[:-6].lower():
        raise ValueError(f"{cls.__name__} cannot hold a {weight.format_name!r} weight")
    layer: nn.Module = cls.from_matrix(weight, bias=_bool(cfg["bias"], "bias"))
    return layer


def _bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {name}={value!r}")
    return value


_CELL_KEYS = ("input_size", "hidden_size", "bias", "proj_size", "nonlinearity", "matrices")


def _cell_config(m: Any) -> dict[str, Any]:
    from .rnn.cells import RNNCellBase

    assert isinstance(m, RNNCellBase)
    return {
        "input_size": m.input_size,
        "hidden_size": m.hidden_size,
        "bias": m.bias,
        "proj_size": m.proj_size,
        "nonlinearity": getattr(m, "nonlinearity", "tanh"),
        "matrices": {role: _matrix_config(w) for role, w in m.matrices().items()},
    }


def _shell_kwargs(cls: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"format": "dense", "hidden_format": "dense", "device": "meta"}
    if cfg["proj_size"]:
        kwargs["proj_size"] = cfg["proj_size"]
    if cls.__name__ in ("RNN", "RNNCell"):
        kwargs["nonlinearity"] = cfg["nonlinearity"]
    elif cfg["nonlinearity"] != "tanh":
        raise ValueError(f"{cls.__name__} has no nonlinearity {cfg['nonlinearity']!r}")
    return kwargs


def _build_cell(cls: Any, cfg: Any, device: torch.device) -> nn.Module:
    cfg = _fields(cfg, cls.__name__, _CELL_KEYS)
    # the cell's shell on the meta device (no memory, no random numbers drawn), then every
    # matrix and bias is put in, built from the configuration on ``device``
    cell = cls(
        input_size=cfg["input_size"],
        hidden_size=cfg["hidden_size"],
        bias=cfg["bias"],
        **_shell_kwargs(cls, cfg),
    )
    mats = cfg["matrices"]
    roles = set(cell.matrices())
    if not isinstance(mats, dict) or set(mats) != roles:
        got = sorted(mats) if isinstance(mats, dict) else mats
        raise ValueError(f"{cls.__name__} needs the matrices {sorted(roles)}, got {got}")
    options = {}
    for role in sorted(roles):
        old = getattr(cell, f"weight_{role}")
        new = _build_matrix(mats[role], device)
        if (new.in_features, new.out_features) != (old.in_features, old.out_features):
            raise ValueError(
                f"{cls.__name__}: weight_{role} must be {old.out_features} x {old.in_features}, "
                f"the configuration gives {new.out_features} x {new.in_features}"
            )
        setattr(cell, f"weight_{role}", new)
        options[role] = (new.format_name, dict(mats[role]["options"]))
    cell._matrix_options = options  # what load_dense_weights decomposes with
    if cell.bias:
        dtype = cell.weight_ih.factory_kwargs["dtype"]
        for key in ("bias_ih", "bias_hh"):
            size = getattr(cell, key).shape
            setattr(cell, key, nn.Parameter(torch.zeros(size, device=device, dtype=dtype)))
    return cell


_RNN_KEYS = (
    "input_size",
    "hidden_size",
    "num_layers",
    "bias",
    "batch_first",
    "dropout",
    "bidirectional",
    "proj_size",
    "nonlinearity",
    "recurrence",
    "cells",
)


def _rnn_config(m: Any) -> dict[str, Any]:
    from .rnn.recurrent import RNNBase

    assert isinstance(m, RNNBase)
    cell_class = type(m).cell_class
    return {
        "input_size": m.input_size,
        "hidden_size": m.hidden_size,
        "num_layers": m.num_layers,
        "bias": m.bias,
        "batch_first": m.batch_first,
        "dropout": m.dropout,
        "bidirectional": m.bidirectional,
        "proj_size": m.proj_size,
        "nonlinearity": getattr(m, "nonlinearity", "tanh"),
        "recurrence": m.recurrence,
        "cells": [{"class": cell_class.__name__, **_cell_config(c)} for c in m.cells],
    }


def _build_rnn(cls: Any, cfg: Any, device: torch.device) -> nn.Module:
    cfg = _fields(cfg, cls.__name__, _RNN_KEYS)
    with warnings.catch_warnings():  # dropout with one layer warned when the model was made
        warnings.simplefilter("ignore")
        rnn = cls(
            input_size=cfg["input_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_layers"],
            bias=cfg["bias"],
            batch_first=cfg["batch_first"],
            dropout=cfg["dropout"],
            bidirectional=cfg["bidirectional"],
            **_shell_kwargs(cls, cfg),
        )
    cells = cfg["cells"]
    if not isinstance(cells, list) or len(cells) != len(rnn.cells):
        n = len(cells) if isinstance(cells, list) else cells
        raise ValueError(
            f"{cls.__name__} with num_layers={rnn.num_layers} and bidirectional="
            f"{rnn.bidirectional} has {len(rnn.cells)} cells, the configuration gives {n}"
        )
    for k, cell_cfg in enumerate(cells):
        shell = rnn.cells[k]
        if not isinstance(cell_cfg, dict) or cell_cfg.get("class") != type(shell).__name__:
            got = cell_cfg.get("class") if isinstance(cell_cfg, dict) else cell_cfg
            raise ValueError(
                f"cell {k} of a {cls.__name__} must be a {type(shell).__name__}, got {got!r}"
            )
        cell = _build_cell(type(shell), cell_cfg, device)
        for key in ("input_size", "hidden_size", "bias", "proj_size"):
            if getattr(cell, key) != getattr(shell, key):
                raise ValueError(
                    f"cell {k} of the {cls.__name__}: {key}={getattr(cell, key)!r}, the module "
                    f"needs {getattr(shell, key)!r}"
                )
        rnn.cells[k] = cell
    rnn.recurrence = cfg["recurrence"]
    return rnn


def _torch_linear_config(m: nn.Linear) -> dict[str, Any]:
    return {
        "in_features": m.in_features,
        "out_features": m.out_features,
        "bias": m.bias is not None,
        "dtype": _dtype_name(m.weight.dtype),
    }


def _build_torch_linear(cfg: Any, device: torch.device) -> nn.Linear:
    cfg = _fields(cfg, "Linear", ("in_features", "out_features", "bias", "dtype"))
    return nn.Linear(
        cfg["in_features"],
        cfg["out_features"],
        bias=_bool(cfg["bias"], "bias"),
        device=device,
        dtype=_parse_dtype(cfg["dtype"]),
    )


def _head_config(m: Any) -> dict[str, Any]:
    """SequenceClassifier and CTCModel: an ``rnn`` and a linear layer on its outputs."""
    rnn = m.rnn
    head = m.classifier if hasattr(m, "classifier") else m.output
    out: dict[str, Any] = {
        "rnn": {"class": type(rnn).__name__, **_rnn_config(rnn)},
        "head": _torch_linear_config(head),
    }
    if hasattr(m, "readout"):
        out["readout"] = m.readout
    return out


def _build_head(cls: Any, cfg: Any, device: torch.device) -> nn.Module:
    classifier = cls.__name__ == "SequenceClassifier"
    cfg = _fields(cfg, cls.__name__, ("rnn", "head", "readout") if classifier else ("rnn", "head"))
    rnn_cfg = cfg["rnn"]
    rnn_class = rnn_cfg.get("class") if isinstance(rnn_cfg, dict) else None
    if rnn_class not in ("LSTM", "GRU"):
        raise ValueError(f"the rnn of a {cls.__name__} must be an LSTM or a GRU, got {rnn_class!r}")
    rnn: Any = _build_rnn(_resolve(rnn_class), rnn_cfg, device)
    head = _build_torch_linear(cfg["head"], device)
    size, directions = rnn.hidden_size, rnn.num_directions
    if head.in_features != directions * size:
        raise ValueError(
            f"the {cls.__name__}'s linear layer reads {head.in_features} features, the rnn "
            f"gives {directions * size}"
        )
    kwargs: dict[str, Any] = {
        "cell": rnn_class.lower(),
        "format": "dense",
        "bidirectional": rnn.bidirectional,
        "device": "meta",
    }
    if classifier:
        kwargs["readout"] = cfg["readout"]
    else:
        kwargs["num_layers"] = rnn.num_layers
    model = cls(rnn.input_size, size, head.out_features, **kwargs)
    if not rnn.batch_first:
        raise ValueError(f"the rnn of a {cls.__name__} must be batch_first")
    model.rnn = rnn
    if classifier:
        model.classifier = head
    else:
        model.output = head
    return model


def _kind(name: str) -> str:
    if name.endswith("Linear"):
        return "linear"
    if name.endswith("Cell"):
        return "cell"
    if name in ("LSTM", "GRU", "RNN"):
        return "rnn"
    return "head"


_CONFIGS: dict[str, Callable[[nn.Module], dict[str, Any]]] = {
    "linear": _linear_config,
    "cell": _cell_config,
    "rnn": _rnn_config,
    "head": _head_config,
}
_BUILDERS: dict[str, Callable[[type, Any, torch.device], nn.Module]] = {
    "linear": _build_linear,
    "cell": _build_cell,
    "rnn": _build_rnn,
    "head": _build_head,
}


def _resolve(name: object) -> type:
    """The allow-listed class called ``name``; anything else is refused."""
    if not isinstance(name, str) or name not in LOADABLE:
        raise LoadError(
            f"class {name!r} is not one kcprnn loads; loadable classes: {sorted(LOADABLE)}"
        )
    cls = getattr(importlib.import_module(LOADABLE[name]), name)
    assert isinstance(cls, type)
    return cls


def module_config(module: nn.Module) -> dict[str, Any]:
    """The JSON configuration :func:`build_module` rebuilds ``module`` from (same parameter names
    and shapes): ``{"class": name, ...}``. Raises ``TypeError`` for a class outside
    :data:`LOADABLE` (a subclass of one included: its own code could not be rebuilt)."""
    name = type(module).__name__
    if name not in LOADABLE or _resolve(name) is not type(module):
        raise TypeError(
            f"kcprnn.save cannot save a {type(module).__module__}.{type(module).__qualname__}: "
            f"it saves the kcprnn classes {sorted(LOADABLE)}"
        )
    return {"class": name, **_CONFIGS[_kind(name)](module), "training": module.training}


def build_module(config: Any, device: torch.device | str = "cpu") -> nn.Module:
    """A module of the allow-listed class ``config["class"]`` built from ``config`` (as
    :func:`module_config` gives it) on ``device``, its parameters freshly initialized."""
    if not isinstance(config, dict):
        raise LoadError(f"a module configuration must be a JSON object, got {config!r}")
    cls = _resolve(config.get("class"))
    body = {k: v for k, v in config.items() if k != "training"}
    module = _BUILDERS[_kind(cls.__name__)](cls, body, torch.device(device))
    module.train(_bool(config.get("training", True), "training"))
    return module


# --- save and load ----------------------------------------------------------------------------


def save(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write ``model`` (a kcprnn class of :data:`LOADABLE`) to ``path``: one safetensors file with
    its configuration in the metadata, written atomically. Tensors are stored as they are (dtype
    kept), on the CPU.

    Example:
        >>> import kcprnn, tempfile, os
        >>> lstm = kcprnn.LSTM(12, 8, format="tt", rank=2)
        >>> path = os.path.join(tempfile.mkdtemp(), "lstm.safetensors")
        >>> kcprnn.save(lstm, path)
        >>> kcprnn.load(path).cell(0).weight_ih.ranks == lstm.cell(0).weight_ih.ranks
        True
    """
    from . import __version__

    config = module_config(model)
    # the file must load: rebuild the configuration (on the meta device) and compare
    shell = build_module(config, "meta")
    want = {k: (tuple(v.shape), v.dtype) for k, v in shell.state_dict().items()}
    state = model.state_dict()
    have = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))
        raise RuntimeError(
            f"kcprnn.save: the configuration of this {type(model).__name__} does not rebuild its "
            f"parameters ({diff[:4]}); please report this as a bug"
        )
    meta = {
        "kcprnn": json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "kcprnn_version": __version__,
                "module": config,
            }
        )
    }
    write_safetensors(path, state, meta)


def load(path: str | os.PathLike[str], map_location: torch.device | str | None = None) -> nn.Module:
    """Rebuild a model written by :func:`save`, on ``map_location`` (default: CPU).

    Nothing in the file is executed: the class comes from the allow-list :data:`LOADABLE`, the
    configuration is plain JSON, and the tensors must match the rebuilt model exactly.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        LoadError: a pickle file, a truncated or malformed file, a file without a kcprnn
            configuration or of a newer format version, a class that is not loadable, an invalid
            configuration, or tensors whose names, shapes or dtypes do not match it (each named).
    """
    device = torch.device("cpu" if map_location is None else map_location)
    path = Path(path)
    tensors, meta = read_safetensors(path)
    if "kcprnn" not in meta:
        raise LoadError(
            f"{str(path)!r} is a safetensors file without a kcprnn configuration (it was not "
            "written by kcprnn.save); read its tensors with kcprnn.io.read_safetensors"
        )
    try:
        doc = json.loads(meta["kcprnn"])
    except json.JSONDecodeError as err:
        raise LoadError(
            f"{str(path)!r}: the kcprnn configuration is not valid JSON ({err})"
        ) from None
    if not isinstance(doc, dict) or "module" not in doc:
        raise LoadError(f"{str(path)!r}: the kcprnn configuration has no 'module' entry")
    version = doc.get("format_version")
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise LoadError(
            f"{str(path)!r} has format_version={version!r} (kcprnn "
            f"{doc.get('kcprnn_version')!r}); this kcprnn reads versions 1 to {FORMAT_VERSION}"
        )
    try:
        model = build_module(doc["module"], device)
    except LoadError:
        raise
    except (ValueError, TypeError) as err:
        raise LoadError(f"{str(path)!r}: invalid model configuration: {err}") from None
    _check_state(path, model.state_dict(), tensors)
    model.load_state_dict({k: t.to(device) for k, t in tensors.items()}, strict=True)
    return model


def _check_state(path: Path, want: Mapping[str, Tensor], got: Mapping[str, Tensor]) -> None:
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    if missing or unexpected:
        raise LoadError(
            f"{str(path)!r}: the tensors do not match the configuration: missing "
            f"{missing[:8]}, unexpected {unexpected[:8]}"
        )
    for name, t in want.items():
        g = got[name]
        if tuple(g.shape) != tuple(t.shape):
            raise LoadError(
                f"{str(path)!r}: tensor {name!r} has shape {tuple(g.shape)} in the file, the "
                f"configuration needs {tuple(t.shape)}"
            )
        if g.dtype != t.dtype:
            raise LoadError(
                f"{str(path)!r}: tensor {name!r} has dtype {g.dtype} in the file, the "
                f"configuration needs {t.dtype}"
            )
