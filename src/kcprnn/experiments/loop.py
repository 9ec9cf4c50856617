"""The training loop both experiment tasks share: epochs of steps over global batches,
checkpoints a run resumes from, and multi-process training on ``torch.distributed``.

A *task* (:class:`Task`: classification in :mod:`.train`, CTC speech recognition in
:mod:`.speech`) says how an epoch's batches are drawn, what one step's loss is and how an epoch is
evaluated; :func:`fit` runs the epochs.

Multi-process training. Under ``torchrun`` (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and the
rendezvous address in the environment) :func:`init_distributed` joins the process group (gloo on
CPU, nccl on CUDA, one GPU per process: ``cuda:LOCAL_RANK``) and the model runs inside
:class:`~torch.nn.parallel.DistributedDataParallel`. ``batch_size`` stays the *global* batch:
every process draws the same batch order from the same seed and takes its slice of each batch
(:func:`shard`), and its loss is weighted so that the averaged gradient is the gradient of the
whole batch's mean loss. Evaluation, metrics, logs and checkpoints come from rank 0 only; the
other ranks wait for it at their next collective call.

Checkpoints (rank 0, in the run folder). ``checkpoint.json`` is the commit record: the config,
the position (``epoch`` completed epochs, ``step`` optimizer steps into the next epoch,
``global_step``), the metrics history, the partial sums of the epoch in progress, the
optimizer's non-tensor state, every RNG state that is not a tensor (the batch order generator,
NumPy's global generator, Python's ``random``) and the names of the two tensor files it belongs
to: ``checkpoint-<tag>.safetensors`` (the model's ``state_dict``, loadable on its own; with
``ema`` the parameters' moving averages, see :mod:`.average`) and ``trainstate-<tag>.safetensors``
(the optimizer's tensors, torch's CPU and CUDA generator states; with ``ema`` the live
parameters). A save writes the two tensor files under new names, then replaces ``checkpoint.json``
(temporary file + :func:`os.replace`), then deletes the older tensor files (the previous
checkpoint's and any an interrupted save left): a save cut short at any point leaves the previous
record and the files it names intact. Nothing is pickled.

Learning rate. ``lr_schedule = "constant"`` keeps each parameter group's rate; ``"cosine"``
sets it before every optimizer step to its first rate (kept in the group as ``initial_lr``)
times :func:`lr_factor` of the global step, a function of the position alone, so a resumed run
takes the same rates as an uninterrupted one. No scheduler object is kept (``"scheduler":
null`` in the record); the epochs given when resuming set the cosine's length.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as tdist
from torch import Tensor, nn

from .average import ParameterAverage
from .config import Config, ConfigError, config_defaults

__all__ = [
    "CHECKPOINT_VERSION",
    "RESUMABLE_KEYS",
    "Dist",
    "Task",
    "check_resumable",
    "close_distributed",
    "fit",
    "init_distributed",
    "lr_factor",
    "read_checkpoint",
    "shard",
    "write_checkpoint",
]

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
RESUMABLE_KEYS = ("epochs", "checkpoint_every", "progress", "threads", "device", "out_dir")
"""Config keys a resumed run may change: they do not alter the steps already taken
(``out_dir``: the run folder may have moved)."""


# --- distributed ---


@dataclass(frozen=True)
class Dist:
    """This process's place in the process group (``world_size == 1``: a single process)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this process created the group and destroys it at the end

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """``values`` summed over the ranks (as float64), in every rank."""
        if not self.active:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return dict(zip(keys, t.tolist(), strict=True))

    def broadcast_json(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (JSON-serializable) in every rank."""
        if not self.active:
            return obj
        data = json.dumps(obj).encode() if self.is_main else b""
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        tdist.broadcast(size, 0)
        if self.is_main:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        else:
            buf = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        tdist.broadcast(buf, 0)
        return json.loads(bytes(buf.cpu().numpy()))


def init_distributed(device: str) -> tuple[Dist, str]:
    """Join the process group ``torchrun`` describes in the environment, or stay single.

    Returns the :class:`Dist` and the device this process trains on: with CUDA and more than one
    process, ``"cuda"`` becomes ``"cuda:LOCAL_RANK"`` (an explicit ``"cuda:N"`` is kept). A group
    that is already initialized (by the caller) is used as it is and left open.
    """
    if tdist.is_available() and tdist.is_initialized():
        comm = torch.device(device) if tdist.get_backend() == "nccl" else torch.device("cpu")
        return Dist(tdist.get_rank(), tdist.get_world_size(), comm), device
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    if not tdist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if device == "cuda":
            device = f"cuda:{local_rank}"
        torch.cuda.set_device(torch.device(device))
        backend, comm = "nccl", torch.device(device)
    else:
        backend, comm = "gloo", torch.device("cpu")
    tdist.init_process_group(backend, rank=rank, world_size=world)
    return Dist(rank, world, comm, owns_group=True), device


def load_in_turn(d: Dist, load: Callable[[], Any]) -> Any:
    """``load()`` on rank 0 first (it may fill a cache), then on the other ranks."""
    if not d.is_main:
        d.barrier()
    result = load()
    if d.is_main:
        d.barrier()
    return result


def close_distributed(d: Dist, wait: bool = True) -> None:
    """Leave the group if this process created it, after every rank got there (``wait``; not
    after an error, when the others may never come)."""
    if d.owns_group:
        if wait:
            tdist.barrier()
        tdist.destroy_process_group()


def shard(rows: np.ndarray, d: Dist) -> tuple[np.ndarray, int]:
    """This rank's slice of a global batch: ``(rows to run, rows that count)``.

    The batch is split in ``world_size`` contiguous parts whose sizes differ by at most one (a
    short last batch). A rank left without a row runs the batch's first row with weight 0, so
    that every rank takes part in the gradient's all-reduce.
    """
    if not d.active:
        return rows, len(rows)
    part = np.array_split(rows, d.world_size)[d.rank]
    if not len(part):
        return rows[:1], 0
    return part, len(part)


# --- checkpoint files ---


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def _cpu(t: Tensor) -> Tensor:
    return t.detach().cpu().contiguous()


def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The optimizer's ``state_dict`` split into tensors (``optimizer/<param id>/<name>``) and
    the JSON rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    for pid, entries in sd["state"].items():
        plain = {}
        for name, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer/{pid}/{name}"] = _cpu(value)
            else:
                plain[name] = value
        state[str(pid)] = plain
    return tensors, {"state": state, "param_groups": sd["param_groups"]}


def _load_optimizer_state(
    optimizer: torch.optim.Optimizer, saved: dict[str, Any], tensors: dict[str, Tensor]
) -> None:
    state: dict[int, dict[str, Any]] = {int(pid): dict(v) for pid, v in saved["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, pid, name = key.split("/", 2)
            state.setdefault(int(pid), {})[name] = value
    template = optimizer.state_dict()["param_groups"]
    if len(template) != len(saved["param_groups"]):
        raise ValueError(
            f"the checkpoint's optimizer has {len(saved['param_groups'])} parameter groups, "
            f"this model's has {len(template)}"
        )
    groups = []
    for now, old in zip(template, saved["param_groups"], strict=True):
        # JSON turned tuples (Adam's betas) into lists
        groups.append({k: tuple(v) if isinstance(now.get(k), tuple) else v for k, v in old.items()})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """torch's generator states (tensors) and NumPy's and Python's global ones (JSON)."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    # NumPy's legacy global generator: what third-party code seeded with np.random.seed draws from
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)  # noqa: NPY002
    version, internal, gauss_next = random.getstate()
    plain = {
        "numpy_global": [kind, np.asarray(keys).tolist(), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }
    return tensors, plain


def _set_rng_state(tensors: dict[str, Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda = [
        tensors[f"rng/cuda/{i}"] for i in range(sum(k.startswith("rng/cuda/") for k in tensors))
    ]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    kind, keys, pos, has_gauss, gauss = plain["numpy_global"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))  # noqa: NPY002
    version, internal, gauss_next = plain["python"]
    random.setstate((version, tuple(internal), gauss_next))


def write_checkpoint(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    record: dict[str, Any],
    average: ParameterAverage | None = None,
) -> None:
    """Save the model, the optimizer and the RNG states with ``record`` (config, position,
    history, ...) as described in the module docstring; with an ``average`` the weights file
    holds the averaged parameters and the train state the live ones."""
    from safetensors.torch import save

    old = _tensor_files(run_dir)
    tag = f"{record['epoch']:04d}-{record['step']:06d}-{secrets.token_hex(4)}"
    weights, train_state = f"checkpoint-{tag}.safetensors", f"trainstate-{tag}.safetensors"
    opt_tensors, opt_plain = _optimizer_state(optimizer)
    rng_tensors, rng_plain = _rng_state()
    state = {k: _cpu(v) for k, v in model.state_dict().items()}
    live = average.checkpoint_tensors(state) if average is not None else {}
    write_atomic(run_dir / weights, save(state))
    write_atomic(run_dir / train_state, save({**opt_tensors, **rng_tensors, **live}))
    record = {
        "format": "kcprnn-checkpoint",
        "version": CHECKPOINT_VERSION,
        **record,
        "weights": weights,
        "train_state": train_state,
        "optimizer": opt_plain,
        "scheduler": None,
        "rng": {**record.get("rng", {}), **rng_plain},
    }
    write_json(run_dir / "checkpoint.json", record)  # the commit
    for name in old - {weights, train_state}:
        (run_dir / name).unlink(missing_ok=True)


def _tensor_files(run_dir: Path) -> set[str]:
    """The checkpoint tensor files in ``run_dir``: those the current record names and any left
    over by an interrupted save (temporary files included)."""
    return {
        p.name
        for pattern in ("checkpoint-*.safetensors*", "trainstate-*.safetensors*")
        for p in run_dir.glob(pattern)
    }


def read_checkpoint(run_dir: str | Path) -> tuple[dict[str, Any], Path, Path | None]:
    """The record of ``run_dir``'s checkpoint and the paths of its weights and train-state files
    (``None``: a checkpoint that holds weights only).

    Raises:
        FileNotFoundError: no checkpoint, or a file it names is missing.
    """
    run_dir = Path(run_dir)
    path = run_dir / "checkpoint.json"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint in {str(run_dir)!r} (missing checkpoint.json)")
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not a valid checkpoint record ({err})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{str(path)!r} is not a valid checkpoint record (not a JSON object)")
    weights = run_dir / record.get("weights", "checkpoint.safetensors")
    train_state = run_dir / record["train_state"] if "train_state" in record else None
    for p in (weights, train_state):
        if p is not None and not p.is_file():
            raise FileNotFoundError(f"{path} names {p.name!r}, which is missing")
    return record, weights, train_state


def check_resumable(saved: dict[str, Any], cfg: Config) -> None:
    """Refuse to resume a checkpoint written under another config (keys outside
    :data:`RESUMABLE_KEYS` differ) or past the requested epochs. A key the saved config lacks
    (one added to :class:`Config` after it was written) counts as its default."""
    now = cfg.to_dict()
    saved = {**config_defaults(), **saved}
    differ = sorted(
        k for k in set(saved) | set(now) if k not in RESUMABLE_KEYS and saved.get(k) != now.get(k)
    )
    if differ:
        pairs = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in differ)
        raise ConfigError(
            f"the checkpoint was written under another config ({pairs}); only "
            f"{list(RESUMABLE_KEYS)} may change when resuming"
        )


# --- the loop ---


def lr_factor(schedule: str, step: int, total: int) -> float:
    """The factor on each group's first rate at optimizer step ``step`` (counted from 0) of
    ``total``: 1 for ``"constant"``; for ``"cosine"`` half a cosine from 1 at step 0 towards 0
    at step ``total`` (``0.5 (1 + cos(pi step / total))``, 0 from ``total`` on)."""
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown lr_schedule {schedule!r}; known: constant, cosine")
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def _set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor


class Task(Protocol):
    """What differs between the experiments: data, loss and evaluation."""

    stat_keys: tuple[str, ...]
    """Names of the per-step sums :meth:`step` returns (summed over the epoch and the ranks)."""

    def epoch_batches(self, rng: np.random.Generator) -> Sequence[np.ndarray]:
        """The epoch's global batches (sample indices), drawn from ``rng``."""
        ...

    def step(
        self, net: nn.Module, rows: np.ndarray, batch: np.ndarray
    ) -> tuple[Tensor, dict[str, float]]:
        """The mean loss over ``rows``, this process's slice of the global ``batch`` (through
        ``net``, which may be the DDP wrapper), and the step's sums (``stat_keys``)."""
        ...

    def epoch_row(
        self, model: nn.Module, epoch: int, sums: dict[str, float], seconds: float
    ) -> dict[str, Any]:
        """The metrics line of a finished epoch (evaluates ``model``; rank 0 only)."""
        ...


@dataclass
class _Position:
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken in epoch + 1
    global_step: int = 0
    sums: dict[str, float] = field(default_factory=dict)  # over the steps of epoch + 1
    elapsed: float = 0.0  # training seconds spent in epoch + 1
    numpy_epoch: dict[str, Any] | None = None  # batch-order generator at the start of epoch + 1


def fit(
    cfg: Config,
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    task: Task,
    d: Dist,
    device: torch.device,
    meta: dict[str, Any],
    resume: tuple[dict[str, Any], Path, Path | None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` for the epochs of ``cfg`` (the rest of them when resuming from a
    :func:`read_checkpoint` result), write metrics lines and checkpoints (rank 0); returns the
    metrics history (every rank)."""
    from ..io import read_safetensors

    rng = np.random.default_rng(cfg.seed)
    history: list[dict[str, Any]] = []
    pos = _Position()
    state: dict[str, Tensor] = {}
    if resume is not None:
        record, weights_path, state_path = resume
        if state_path is None:
            raise ValueError(f"the checkpoint in {str(run_dir)!r} holds weights only")
        model.load_state_dict(read_safetensors(weights_path, device=device)[0])
        state = read_safetensors(state_path)[0]
        _load_optimizer_state(optimizer, record["optimizer"], state)
        _set_rng_state(state, record["rng"])
        history = list(record["history"])
        pos = _Position(
            record["epoch"],
            record["step"],
            record["global_step"],
            dict(record["sums"]) if d.is_main else {},
            record["elapsed"],
            record["rng"]["numpy_epoch"],
        )
        if pos.numpy_epoch is not None:
            rng.bit_generator.state = pos.numpy_epoch
        log.info("resumed at epoch %d, step %d", pos.epoch + 1, pos.step)
    # started from the loaded weights, which are the averages when resuming
    average = ParameterAverage(model, cfg.ema) if cfg.ema else None
    if average is not None and resume is not None:
        average.restore(state)
    net: nn.Module = model
    if d.active:  # after loading: the ranks start from the same parameters anyway
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def save(
        epoch: int, step: int, sums: dict[str, float], elapsed: float, numpy_epoch: Any
    ) -> None:
        write_checkpoint(
            run_dir,
            model,
            optimizer,
            {
                "config": cfg.to_dict(),
                **meta,
                "epoch": epoch,
                "step": step,
                "global_step": global_step,
                "world_size": d.world_size,
                "metrics": history[-1] if history else None,
                "history": history,
                "sums": sums,
                "elapsed": elapsed,
                "rng": {"numpy_epoch": numpy_epoch},
            },
            average,
        )

    show_bar = cfg.progress and d.is_main and sys.stderr.isatty()
    global_step = pos.global_step
    for epoch in range(pos.epoch + 1, cfg.epochs + 1):
        numpy_epoch = rng.bit_generator.state
        batches = task.epoch_batches(rng)
        resumed = epoch == pos.epoch + 1
        first = pos.step if resumed else 0
        sums = {k: 0.0 for k in task.stat_keys}
        if resumed:
            sums.update(pos.sums)
        elapsed = pos.elapsed if resumed else 0.0
        model.train()
        steps: Any = range(first, len(batches))
        if show_bar:
            from tqdm import tqdm

            steps = tqdm(
                steps,
                desc=f"{cfg.format} epoch {epoch}/{cfg.epochs}",
                unit="batch",
                leave=False,
                initial=first,
                total=len(batches),
            )
        start = time.perf_counter()
        for k in steps:
            rows, counted = shard(batches[k], d)
            loss, stats = task.step(net, rows, batches[k])  # mean over rows
            scale = counted * d.world_size / len(batches[k])
            optimizer.zero_grad(set_to_none=True)
            (loss if scale == 1.0 else loss * scale).backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if cfg.lr_schedule != "constant":
                total_steps = cfg.epochs * len(batches)
                _set_lr(optimizer, lr_factor(cfg.lr_schedule, global_step, total_steps))
            optimizer.step()
            global_step += 1
            if average is not None:
                average.update(global_step)
            if counted:
                for key, value in stats.items():
                    sums[key] += value
            if show_bar:
                steps.set_postfix(loss=f"{loss.item():.3f}")
            every = cfg.checkpoint_every
            if every and global_step % every == 0 and k + 1 < len(batches):
                total = d.sum(sums)
                if d.is_main:
                    spent = elapsed + time.perf_counter() - start
                    save(epoch - 1, k + 1, total, spent, numpy_epoch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = elapsed + time.perf_counter() - start
        total = d.sum(sums)
        if d.is_main:
            with average.applied() if average is not None else nullcontext():
                row = task.epoch_row(model, epoch, total, seconds)
            if cfg.lr_schedule != "constant":
                row["lr"] = optimizer.param_groups[0]["lr"]  # the epoch's last step's
            history.append(row)
            with (run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            log.info("epoch %d: %s", epoch, json.dumps(row))
            save(epoch, 0, {}, 0.0, rng.bit_generator.state)
    if average is not None:  # leave the model as the metrics and the checkpoint describe it
        average.copy_to_model()
    result: list[dict[str, Any]] = d.broadcast_json(history)
    return result
