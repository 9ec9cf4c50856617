"""``kcprnn train``: train one video, spike or speech experiment, readable top to bottom.

config -> data (real clips or a stand-in, split by the dataset's protocol; or spike files in
SHD's layout, binned into frames batch by batch, with their released train/test split and a
validation split) -> model (a compressed LSTM/GRU over the frames, last or mean hidden state ->
linear) -> Adam -> epochs of training and evaluation -> a run folder with ``config.json``,
``metrics.jsonl`` (one JSON line per epoch), a checkpoint (``checkpoint.json`` and the two
safetensors files it names; saved after every epoch and every ``checkpoint_every`` steps, see
:mod:`kcprnn.experiments.loop`), ``summary.json`` and ``run.log``. The speech data sets (CTC phone
and character recognition) run the task of :mod:`kcprnn.experiments.speech` through the same loop
and write the same files. Under ``torchrun`` the processes train one model together
(DistributedDataParallel); ``--resume RUN_DIR`` continues a run from its last checkpoint.

Python API: ``train(load_config("experiments/configs/ucf11_kcp.toml"))`` returns the summary;
``train(resume_config("runs/ucf11_kcp"), resume=True)`` resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F

from .. import summary as model_summary
from ..data import (
    ClipSet,
    SpikeSet,
    SpikeStandInSpec,
    StandInSpec,
    group_split,
    leave_one_group_out,
    load_spike_dataset,
    load_standin,
    load_video_dataset,
    shd_like_dir,
    stratified_split,
)
from ..data.fsdd import FSDDSplits, load_fsdd
from ..optim import param_groups
from .config import (
    FSDD_DATASETS,
    SPEECH_DATASETS,
    SPIKE_DATASETS,
    STANDIN_DATASETS,
    Config,
    ConfigError,
    apply_overrides,
    load_config,
)
from .loop import (
    RESUMABLE_KEYS,
    Dist,
    check_resumable,
    close_distributed,
    fit,
    init_distributed,
    load_in_turn,
    read_checkpoint,
    write_json,
)
from .model import SequenceClassifier
from .transfer import Teacher, start_from

if TYPE_CHECKING:
    from .ctc import CTCModel

__all__ = [
    "SpikeData",
    "evaluate",
    "load_checkpoint",
    "load_data",
    "main",
    "make_optimizer",
    "resume_config",
    "split_indices",
    "train",
]

log = logging.getLogger(__name__)

PROTOCOL_SPLITS = {
    "ucf11": "group",
    "ucf50": "logo",
    "youtube": "stratified",
    "ucf11-like": "stratified",
    "youtube-like": "stratified",
    "shd": "released",
    "ssc": "released",
    "shd-like": "released",
    "fsdd": "fixed",
}
"""The split ``split="auto"`` picks: UCF11 group-wise, UCF50 leave-one-group-out, the spike
files' released train/test split, FSDD's fixed stratified split (the same in every run, see
:func:`~kcprnn.data.fsdd.fsdd_split`), else stratified."""


# --- data ---


@dataclass(frozen=True)
class SpikeData:
    """Spike samples (all files) with the index of each split, binned into frames on demand."""

    spikes: SpikeSet
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    bin_width: float
    max_time: float

    @property
    def labels(self) -> np.ndarray:
        return self.spikes.labels

    @property
    def num_classes(self) -> int:
        return self.spikes.num_classes

    @property
    def input_size(self) -> int:
        return self.spikes.num_units

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.spikes.class_names

    @property
    def skipped(self) -> tuple[tuple[str, str], ...]:
        return ()

    def inputs(self, idx: np.ndarray, device: torch.device) -> torch.Tensor:
        """Spike counts of samples ``idx``: float ``(b, T, 700)`` on ``device``."""
        frames = self.spikes.frames(idx, self.bin_width, self.max_time)  # (b, t, u)
        return torch.from_numpy(frames).to(device)


Data = ClipSet | SpikeData | FSDDSplits


def load_data(cfg: Config) -> Data:
    """The samples of ``cfg.dataset``: decoded (cached) real clips or a (cached) stand-in; for
    spike data sets the files in ``data_dir`` (or the cached SHD-like stand-in) with their
    splits; for FSDD its recordings with the fixed split, normalized by ``cfg.normalization``."""
    if cfg.dataset in FSDD_DATASETS:
        return load_fsdd(
            cfg.data_dir or None,
            test_fraction=cfg.test_fraction,
            valid_fraction=cfg.valid_fraction,
            normalize=cfg.normalization == "global",
        )
    if cfg.dataset in SPIKE_DATASETS:
        if cfg.dataset == "shd-like":
            spike_spec = SpikeStandInSpec(
                repeats=cfg.repeats,
                classes=cfg.classes,
                speakers=cfg.speakers,
                test_speakers=min(2, cfg.speakers - 1),
            )
            folder = shd_like_dir(spike_spec, cfg.cache_dir or None)
            name = "shd"
        else:
            folder, name = Path(cfg.data_dir), cfg.dataset
        splits = load_spike_dataset(
            folder,
            name,
            valid_fraction=cfg.valid_fraction,
            valid_by_speaker=cfg.valid_by_speaker,
            seed=cfg.seed,
        )
        return SpikeData(
            splits.data, splits.train, splits.valid, splits.test, cfg.bin_width, cfg.max_time
        )
    if cfg.dataset in STANDIN_DATASETS:
        spec = StandInSpec(
            kind=cfg.dataset,
            clips_per_class=cfg.clips_per_class,
            num_frames=cfg.num_frames,
            height=cfg.frame_height,
            width=cfg.frame_width,
            seed=cfg.seed,
        )
        return load_standin(spec, cfg.cache_dir or None)
    return load_video_dataset(
        cfg.dataset,
        cfg.data_dir,
        cfg.num_frames,
        (cfg.frame_width, cfg.frame_height),
        cfg.cache_dir or None,
        progress=cfg.progress and sys.stderr.isatty(),
    )


def split_indices(cfg: Config, clips: Data) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, test_idx)`` by ``cfg.split`` (``"auto"``: the dataset's protocol)."""
    if isinstance(clips, (SpikeData, FSDDSplits)):
        return clips.train, clips.test
    split = PROTOCOL_SPLITS[cfg.dataset] if cfg.split == "auto" else cfg.split
    if split == "group":
        return group_split(clips.groups, cfg.test_fraction, cfg.seed)
    if split == "logo":
        return leave_one_group_out(clips.groups, cfg.fold)
    return stratified_split(clips.labels, cfg.test_fraction, cfg.seed)


def valid_indices(clips: Data) -> np.ndarray:
    """The validation samples: the spike and FSDD data sets' own split, none for the video."""
    if isinstance(clips, (SpikeData, FSDDSplits)):
        return np.asarray(clips.valid)
    return np.zeros(0, dtype=np.int64)


def to_input(frames: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 ``(b, t, h, w, 3)`` -> float ``(b, t, h*w*3)`` in [-1, 1] on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device)  # (b, t, h, w, 3) uint8
    return x.flatten(2).float().mul_(2.0 / 255.0).sub_(1.0)  # (b, t, i)


def batch_inputs(data: Data, idx: np.ndarray, device: torch.device) -> torch.Tensor:
    """The model input of samples ``idx``: ``(b, t, i)`` float on ``device``."""
    if isinstance(data, SpikeData):
        return data.inputs(idx, device)
    if isinstance(data, FSDDSplits):
        return torch.from_numpy(data.frames(idx)).to(device)  # (b, t, i)
    return to_input(data.frames[idx], device)


# --- model ---


def build_model(cfg: Config, input_size: int, num_classes: int) -> SequenceClassifier:
    return SequenceClassifier(
        input_size,
        cfg.hidden_size,
        num_classes,
        cell=cfg.cell,
        format=cfg.format,
        hidden_modes=list(cfg.hidden_modes) or None,
        format_options=dict(cfg.format_options),
        hidden_format=cfg.hidden_format,
        hidden_options=dict(cfg.hidden_options),
        bidirectional=cfg.bidirectional,
        readout=cfg.readout,
        dropout=cfg.dropout,
        device=cfg.device,
    )


def model_numbers(model: SequenceClassifier) -> dict[str, Any]:
    """Input-to-hidden parameters, compression ratio and MACs per frame; the recurrent
    parameters of every layer and direction (``W_ih`` and ``W_hh`` together, no biases), their
    dense count and compression; total parameters."""
    w = model.weight_ih
    layers = model_summary(model).layers
    recurrent = sum(s.input_params + s.hidden_params for s in layers)
    recurrent_dense = sum(s.input_dense_params + s.hidden_dense_params for s in layers)
    return {
        "ih_params": w.num_params,
        "compression": w.compression_ratio,
        "ih_macs_per_frame": w.flops(1),
        "hh_params": sum(s.hidden_params for s in layers),
        "recurrent_params": recurrent,
        "recurrent_dense_params": recurrent_dense,
        "recurrent_compression": recurrent_dense / recurrent,
        "total_params": sum(p.numel() for p in model.parameters()),
    }


# --- evaluation ---


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, clips: Data, idx: np.ndarray, batch_size: int, device: torch.device
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on the samples ``idx``."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(idx), batch_size):
        b = idx[start : start + batch_size]
        logits = model(batch_inputs(clips, b, device))  # (b, c)
        y = torch.from_numpy(clips.labels[b]).to(device)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    return loss_sum / max(len(idx), 1), correct / max(len(idx), 1)


# --- files ---


def load_checkpoint(run_dir: str | Path, device: str = "cpu") -> tuple[Any, Config, dict]:
    """Rebuild the model of a run folder from its checkpoint (a :class:`SequenceClassifier`, or a
    :class:`~kcprnn.experiments.ctc.CTCModel` for speech). Returns ``(model, config, meta)``."""
    from ..io import read_safetensors

    meta, weights, _ = read_checkpoint(run_dir)
    tensors = read_safetensors(weights, device=device)[0]  # a bad file: a LoadError naming it
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"the checkpoint record of {str(run_dir)!r} holds no config")
    cfg = Config(**{**meta["config"], "device": device})
    model: Any
    if cfg.dataset in SPEECH_DATASETS:  # a CTC model; class_names: the blank and the symbols
        from .speech import build_ctc_model

        model = build_ctc_model(cfg, meta["input_size"], len(meta["class_names"]))
    else:
        model = build_model(cfg, meta["input_size"], len(meta["class_names"]))
    model.load_state_dict(tensors)
    return model, cfg, meta


def resume_config(run_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """The config of the run in ``run_dir`` (its ``config.json``), for :func:`train` with
    ``resume=True``. ``overrides`` may change only the keys that leave the steps already taken
    alone: ``epochs`` (to extend the run), ``checkpoint_every``, ``device``, ``threads``,
    ``progress``.

    Raises:
        FileNotFoundError: ``run_dir`` has no ``config.json``.
        ConfigError: an override of another key.
    """
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no run to resume in {str(run_dir)!r} (missing config.json)")
    allowed = [k for k in RESUMABLE_KEYS if k != "out_dir"]
    for item in overrides or []:
        key = item[2:].partition("=")[0] if item.startswith("--") else item
        if key not in allowed:
            raise ConfigError(
                f"--resume continues the run's own config; only {allowed} may change, got {item!r}"
            )
    values = apply_overrides(json.loads(path.read_text()), overrides or [])
    return Config(**{**values, "out_dir": str(run_dir)})


# --- training ---


def make_optimizer(cfg: Config, model: SequenceClassifier | CTCModel) -> torch.optim.Optimizer:
    """Adam over every parameter of ``model`` at ``cfg.lr``; the factors of each format in
    ``cfg.format_lr`` in a group of its own at ``cfg.lr`` times its factor
    (:func:`kcprnn.param_groups`); with ``cfg.ih_lr > 0`` the first layer's input-to-hidden
    matrices (every direction; the matrices that read the frames) in a group at ``cfg.ih_lr``;
    with ``cfg.weight_decay > 0`` AdamW, whose every parameter (weights, factor cores, biases)
    also shrinks by ``lr * weight_decay`` of itself at each step."""
    ih: list[torch.nn.Parameter] = []
    if cfg.ih_lr:
        rnn = model.rnn
        ih = [p for d in range(rnn.num_directions) for p in rnn.cell(0, d).weight_ih.parameters()]
    groups = param_groups(model, cfg.lr, format_lr=cfg.format_lr, exclude=ih)
    if ih:
        groups.append({"params": ih, "lr": cfg.ih_lr})
    if cfg.weight_decay:
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(groups, lr=cfg.lr)


@dataclass
class ClassificationTask:
    """Cross-entropy on shuffled batches; after each epoch, test (and validation) loss and
    accuracy (see :class:`kcprnn.experiments.loop.Task`)."""

    cfg: Config
    data: Data
    train_idx: np.ndarray
    test_idx: np.ndarray
    valid_idx: np.ndarray
    device: torch.device
    teacher: Teacher | None = None
    stat_keys: tuple[str, ...] = ("loss_sum", "correct")

    def epoch_batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        order = rng.permutation(self.train_idx)
        size = self.cfg.batch_size
        # sorted rows: ascending reads from the frame array
        return [np.sort(order[s : s + size]) for s in range(0, len(order), size)]

    def step(
        self, net: torch.nn.Module, rows: np.ndarray, batch: np.ndarray
    ) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch_inputs(self.data, rows, self.device)  # (b, t, i)
        y = torch.from_numpy(self.data.labels[rows]).to(self.device)
        logits = net(x)  # (b, c)
        loss = F.cross_entropy(logits, y)
        correct = (logits.argmax(1) == y).sum().item()
        sums = {"loss_sum": loss.item() * len(rows), "correct": correct}
        if self.teacher is not None:
            kl = self.teacher.divergence(logits.log_softmax(-1), x)
            loss = loss + self.teacher.weight * kl
        return loss, sums

    def epoch_row(
        self, model: torch.nn.Module, epoch: int, sums: dict[str, float], seconds: float
    ) -> dict[str, Any]:
        cfg, n = self.cfg, len(self.train_idx)
        test_loss, test_acc = evaluate(model, self.data, self.test_idx, cfg.batch_size, self.device)
        row = {
            "epoch": epoch,
            "train_loss": sums["loss_sum"] / n,
            "train_acc": sums["correct"] / n,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "epoch_seconds": seconds,
            "lr": cfg.lr,
            "skipped_clips": len(self.data.skipped),
        }
        if len(self.valid_idx):
            row["valid_loss"], row["valid_acc"] = evaluate(
                model, self.data, self.valid_idx, cfg.batch_size, self.device
            )
        return row


def train(cfg: Config, *, resume: bool = False) -> dict[str, Any]:
    """Run one experiment; returns the summary also written to ``summary.json``.

    With ``resume=True`` the run continues from the checkpoint in ``cfg.run_dir`` (see
    :func:`resume_config`). Under ``torchrun`` every process calls this; each returns the summary
    and only rank 0 writes files.
    """
    d, device_name = init_distributed(cfg.device)
    run_dir = cfg.run_dir
    handler = None
    pkg_logger = logging.getLogger("kcprnn")
    ok = False
    try:
        if d.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(run_dir / "run.log", mode="a" if resume else "w")
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
            )
            pkg_logger.addHandler(handler)
            if pkg_logger.level == logging.NOTSET or pkg_logger.level > logging.INFO:
                pkg_logger.setLevel(logging.INFO)
        summary = _train(cfg, run_dir, d, device_name, resume)
        ok = True
        return summary
    finally:
        if handler is not None:
            pkg_logger.removeHandler(handler)
            handler.close()
        close_distributed(d, wait=ok)


def _train(cfg: Config, run_dir: Path, d: Dist, device_name: str, resume: bool) -> dict[str, Any]:
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device!r} but CUDA is not available")
    if cfg.batch_size % d.world_size:
        raise ConfigError(
            f"batch_size={cfg.batch_size} is the global batch and must split evenly over the "
            f"{d.world_size} processes (WORLD_SIZE={d.world_size})"
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(device_name)
    if d.active:
        log.info(
            "%d processes (%s), global batch %d: about %d rows per process",
            d.world_size,
            tdist.get_backend(),
            cfg.batch_size,
            cfg.batch_size // d.world_size,
        )
    checkpoint = None
    if resume:
        checkpoint = read_checkpoint(run_dir)
        record = checkpoint[0]
        if "train_state" not in record:
            raise ValueError(f"the checkpoint in {str(run_dir)!r} holds weights only")
        check_resumable(record["config"], cfg)
        started = record["epoch"] + (1 if record["step"] else 0)
        if started > cfg.epochs:
            raise ConfigError(
                f"epochs={cfg.epochs} but the run in {str(run_dir)!r} has already completed "
                f"{record['epoch']} epochs" + (" and started the next" if record["step"] else "")
            )
    metrics_path = run_dir / "metrics.jsonl"
    if d.is_main:
        write_json(run_dir / "config.json", cfg.to_dict())
        history = checkpoint[0]["history"] if checkpoint else []
        metrics_path.write_text("".join(json.dumps(row) + "\n" for row in history))
    if cfg.dataset in SPEECH_DATASETS:
        from .speech import train_speech

        return train_speech(cfg, run_dir, device, d, checkpoint)

    clips = load_in_turn(d, lambda: load_data(cfg))
    for path, reason in clips.skipped:
        log.warning("skipped clip %s: %s", path, reason)
    train_idx, test_idx = split_indices(cfg, clips)
    valid_idx = valid_indices(clips)
    log.info(
        "%s: %d samples (%d train, %d validation, %d test, %d skipped), %d classes",
        cfg.dataset,
        len(clips.labels),
        len(train_idx),
        len(valid_idx),
        len(test_idx),
        len(clips.skipped),
        clips.num_classes,
    )

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, clips.input_size, clips.num_classes)
    teacher = start_from(cfg, model, device, resuming=checkpoint is not None)
    numbers = model_numbers(model)
    log.info("model: %s", model)
    optimizer = make_optimizer(cfg, model)
    task = ClassificationTask(cfg, clips, train_idx, test_idx, valid_idx, device, teacher)
    meta = {"input_size": clips.input_size, "class_names": list(clips.class_names)}
    history = fit(cfg, run_dir, model, optimizer, task, d, device, meta, checkpoint)

    summary = {
        "name": cfg.name or run_dir.name,
        "dataset": cfg.dataset,
        "cell": cfg.cell,
        "format": cfg.format,
        "hidden_format": cfg.hidden_format,
        **numbers,
        "seconds_per_epoch": statistics.median(r["epoch_seconds"] for r in history),
        "test_acc": history[-1]["test_acc"],
        "best_test_acc": max(r["test_acc"] for r in history),
        **({"valid_acc": history[-1]["valid_acc"]} if len(valid_idx) else {}),
        "train_acc": history[-1]["train_acc"],
        "epochs": cfg.epochs,
        "num_train": len(train_idx),
        "num_test": len(test_idx),
        "num_valid": len(valid_idx),
        "num_classes": clips.num_classes,
        "skipped_clips": len(clips.skipped),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "world_size": d.world_size,
    }
    if d.is_main:
        write_json(run_dir / "summary.json", summary)
    return summary


# --- command line ---


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kcprnn train",
        description="Train one video, spike or speech experiment. Overrides: --KEY=VALUE for any "
        "config key "
        "(TOML values), --format_options.KEY=VALUE (--hidden_options.KEY=VALUE) for an option of "
        "the input-to-hidden (hidden-to-hidden) format.",
    )
    parser.add_argument("--config", help="a TOML preset, e.g. experiments/configs/ucf11_kcp.toml")
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint (overrides: only "
        "--epochs, --checkpoint_every, --device, --threads, --progress)",
    )
    parser.add_argument("--device", help="cpu | cuda | cuda:N (same as --device=...)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args, overrides = parser.parse_known_args(argv)
    if args.device:
        overrides.append(f"--device={args.device}")
    if args.no_progress:
        overrides.append("--progress=false")
    rank = int(os.environ.get("RANK", "0"))  # under torchrun: only rank 0 reports
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.resume:
            if args.config:
                raise ConfigError("--resume takes the run's own config: drop --config")
            cfg = resume_config(args.resume, overrides)
        else:
            cfg = load_config(args.config, overrides)
        summary = train(cfg, resume=bool(args.resume))
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"kcprnn train: error: {exc}", file=sys.stderr)
        return 2
    if rank == 0:
        print(json.dumps(summary, indent=2))
        print(f"run folder: {cfg.run_dir}")
    return 0
