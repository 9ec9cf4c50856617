"""The speech task of ``kcprnn train``: CTC phone or character recognition.

config -> corpus (TIMIT or TED-LIUM from ``data_dir``, or a synthesized stand-in) -> log-mel
features (cached) with mean/variance normalization -> a stacked bidirectional (compressed)
LSTM/GRU with a linear CTC output -> Adam on the CTC loss over length-sorted batches -> after
every epoch, decoding of the dev and test sets and their error rate: ``dev_per``/``test_per``
(phone error rate; TIMIT scored on the 39 folded phones) or ``dev_wer``/``test_wer`` (word error
rate, next to the character error rate ``dev_cer``/``test_cer``) in ``metrics.jsonl``, with the
epoch's training time. The epochs run in the shared loop of :mod:`kcprnn.experiments.loop`
(checkpoints, resuming, multi-process training).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from ..data._io import default_cache_dir
from ..data.speech import (
    FeatureSpec,
    SpeechCorpus,
    SpeechSet,
    SpeechStandInSpec,
    load_speech_set,
    load_speech_standin,
    load_tedlium,
    load_timit,
    speech_standin_dir,
    tilt_bands,
    warp_bands,
)
from .config import Config
from .ctc import Bigram, CTCModel, beam_search, char_error_rate, error_rate, greedy_decode
from .loop import Dist, fit, load_in_turn, write_json
from .train import make_optimizer, model_numbers
from .transfer import Teacher, start_from

__all__ = [
    "build_ctc_model",
    "decode_split",
    "score_splits",
    "load_speech_corpus",
    "load_speech_data",
    "train_speech",
]

log = logging.getLogger(__name__)


def feature_spec(cfg: Config) -> FeatureSpec:
    return FeatureSpec(n_mels=cfg.n_mels, energy=cfg.energy, deltas=cfg.deltas)


def load_speech_corpus(cfg: Config) -> SpeechCorpus:
    """The utterances of ``cfg.dataset`` (real corpus in ``data_dir`` or the cached stand-in)."""
    if cfg.dataset == "timit":
        return load_timit(cfg.data_dir)
    if cfg.dataset == "tedlium":
        return load_tedlium(cfg.data_dir)
    spec = SpeechStandInSpec(
        kind=cfg.dataset,
        train_speakers=cfg.train_speakers,
        utterances_per_speaker=cfg.utterances_per_speaker,
        eval_utterances_per_speaker=cfg.eval_utterances_per_speaker,
        seed=cfg.seed,
    )
    return load_speech_standin(speech_standin_dir(spec, cfg.cache_dir or None))


def load_speech_data(cfg: Config) -> SpeechSet:
    """Corpus, cached features, normalization and targets of ``cfg``."""
    corpus = load_speech_corpus(cfg)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    data = load_speech_set(corpus, feature_spec(cfg), cache, cfg.normalization, cfg.frame_stack)
    if not len(data.train):
        raise ValueError(f"dataset={cfg.dataset!r}: no training utterance could be read")
    return data


def build_ctc_model(cfg: Config, input_size: int, num_symbols: int) -> CTCModel:
    return CTCModel(
        input_size,
        cfg.hidden_size,
        num_symbols,
        cell=cfg.cell,
        num_layers=cfg.num_layers,
        bidirectional=cfg.bidirectional,
        format=cfg.format,
        format_options=dict(cfg.format_options),
        hidden_format=cfg.hidden_format,
        hidden_options=dict(cfg.hidden_options),
        hidden_modes=list(cfg.hidden_modes) or None,  # []: each format's own modes
        layer_options=list(cfg.layer_options) or None,
        dropout=cfg.dropout,
        device=cfg.device,
    )


def _batch(
    data: SpeechSet, idx: np.ndarray, device: torch.device, padded: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frames zero-padded to the longest utterance (at least ``padded`` frames) ``(b, T, D)``,
    frame counts, concatenated targets, target counts."""
    lengths = [len(data.frames[i]) for i in idx]
    x = np.zeros((len(idx), max(*lengths, padded), data.input_size), dtype=np.float32)
    for row, i in enumerate(idx):
        x[row, : lengths[row]] = data.frames[i]
    targets = np.concatenate([data.targets[i] for i in idx])
    return (
        torch.from_numpy(x).to(device),
        torch.tensor(lengths, dtype=torch.long),
        torch.from_numpy(targets),
        torch.tensor([len(data.targets[i]) for i in idx], dtype=torch.long),
    )


def _length_batches(data: SpeechSet, idx: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Batches of utterances of similar length (little padding): ``idx`` sorted by length."""
    order = idx[np.argsort([len(data.frames[i]) for i in idx], kind="stable")]
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def _hypothesis_tokens(data: SpeechSet, symbols: list[int]) -> list[str]:
    names = [data.corpus.vocabulary[s - 1] for s in symbols]
    if data.corpus.unit == "char":
        return "".join(names).split()
    return names


def _scored(data: SpeechSet, tokens: list[str] | tuple[str, ...]) -> list[str]:
    mapping = data.corpus.scoring_map
    if not mapping:
        return list(tokens)
    return [m for m in (mapping.get(t, t) for t in tokens) if m is not None]


@torch.no_grad()
def decode_split(
    model: CTCModel,
    data: SpeechSet,
    idx: np.ndarray,
    batch_size: int,
    device: torch.device,
    beam_size: int = 1,
    lm: Bigram | None = None,
) -> tuple[float, float, list[list[str]], float]:
    """Mean CTC loss per utterance, error rate (PER or WER), the decoded tokens of each of
    ``idx`` (in its order) and, for character targets, the character error rate (NaN for
    phones). ``lm``: a language model for the beam search."""
    model.eval()
    loss_sum, refs, hyps = 0.0, [], []
    decoded: dict[int, list[str]] = {}
    for b in _length_batches(data, idx, batch_size):
        x, lengths, targets, target_lengths = _batch(data, b, device)
        log_probs = model(x)  # (b, t, c)
        loss = torch.nn.functional.ctc_loss(
            log_probs.transpose(0, 1),
            targets,
            lengths,
            target_lengths,
            blank=0,
            reduction="sum",
            zero_infinity=True,
        )
        loss_sum += loss.item()
        scores = log_probs.cpu().numpy()
        for row, i in enumerate(b):
            n = int(lengths[row])
            symbols = (
                greedy_decode(scores[row], n)
                if beam_size <= 1
                else beam_search(scores[row], beam_size, n, lm)
            )
            decoded[int(i)] = _scored(data, _hypothesis_tokens(data, symbols))
            hyps.append(decoded[int(i)])
            refs.append(_scored(data, data.refs[i]))
    rate = error_rate(refs, hyps) if refs else float("nan")
    chars = float("nan")
    if refs and data.corpus.unit == "char":
        chars = char_error_rate(refs, hyps)
    return loss_sum / max(len(idx), 1), rate, [decoded[int(i)] for i in idx], chars


def score_splits(
    model: CTCModel,
    data: SpeechSet,
    batch_size: int,
    device: torch.device,
    beam_size: int = 1,
    lm: Bigram | None = None,
    per_speaker: bool = False,
) -> dict[str, Any]:
    """``model``'s scores on the dev and test utterances (splits without any are left out):
    ``{split}_loss``, ``{split}_per`` or ``{split}_wer`` (and ``{split}_cer`` for character
    targets); with ``per_speaker`` also each speaker's own rate (``{split}_per_by_speaker``)."""
    metric = data.metric
    row: dict[str, Any] = {}
    for split, idx in (("dev", data.dev), ("test", data.test)):
        if not len(idx):
            continue
        loss, rate, hyps, chars = decode_split(model, data, idx, batch_size, device, beam_size, lm)
        row[f"{split}_loss"], row[f"{split}_{metric}"] = loss, rate
        if metric == "wer":
            row[f"{split}_cer"] = chars
        if per_speaker:  # (references, hypotheses) per speaker
            pairs: dict[str, tuple[list[list[str]], list[list[str]]]] = {}
            for i, hyp in zip(idx, hyps, strict=True):
                refs, found = pairs.setdefault(data.speakers[i], ([], []))
                refs.append(_scored(data, data.refs[i]))
                found.append(hyp)
            row[f"{split}_{metric}_by_speaker"] = {s: error_rate(*pairs[s]) for s in sorted(pairs)}
    return row


@dataclass
class SpeechTask:
    """CTC loss on length-sorted batches in shuffled order; after each epoch, decoding of the dev
    and test sets (see :class:`kcprnn.experiments.loop.Task`)."""

    cfg: Config
    data: SpeechSet
    device: torch.device
    teacher: Teacher | None = None
    stat_keys: tuple[str, ...] = ("loss_sum",)

    def __post_init__(self) -> None:
        if self.teacher is not None:
            self.stat_keys = ("loss_sum", "distill_sum")
        self.batches = _length_batches(self.data, self.data.train, self.cfg.batch_size)
        self.spec = feature_spec(self.cfg)

    def epoch_batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        return [self.batches[k] for k in rng.permutation(len(self.batches))]

    def step(
        self, net: torch.nn.Module, rows: np.ndarray, batch: np.ndarray
    ) -> tuple[torch.Tensor, dict[str, float]]:
        # padded as long as the whole global batch: the backward direction reads the padding
        # first, so each process's slice must see the padding one process would
        padded = max(len(self.data.frames[i]) for i in batch)
        x, lengths, targets, target_lengths = _batch(self.data, rows, self.device, padded)
        if self.cfg.band_warp or self.cfg.spectral_tilt:
            x = self.augmented(x)
        log_probs = net(x)  # (b, t, c)
        loss = torch.nn.functional.ctc_loss(
            log_probs.transpose(0, 1),
            targets,
            lengths,
            target_lengths,
            blank=0,
            reduction="mean",
            zero_infinity=True,
        )
        sums = {"loss_sum": loss.item() * len(rows)}
        if self.teacher is not None:
            frames = torch.arange(x.shape[1])[None] < lengths[:, None]  # (b, t)
            kl = self.teacher.divergence(log_probs, x, frames.to(x.device))
            sums["distill_sum"] = kl.item() * len(rows)
            loss = loss + self.teacher.weight * kl
        return loss, sums

    def augmented(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(b, t, d)`` with each utterance's mel bands warped by a factor drawn from
        ``1 +- band_warp``, then its static bands tilted by a slope and a curvature drawn from
        ``+- spectral_tilt`` (torch's global generator, which checkpoints save and restore)."""
        b, cfg, spec = x.shape[0], self.cfg, self.spec
        if cfg.band_warp:
            factors = 1.0 + cfg.band_warp * (2.0 * torch.rand(b) - 1.0)  # (b,)
            x = warp_bands(x, spec.n_mels, spec.group, factors.to(x.device))
        if cfg.spectral_tilt:
            slopes = (2.0 * torch.rand(b) - 1.0) * cfg.spectral_tilt  # (b,)
            curvatures = (2.0 * torch.rand(b) - 1.0) * cfg.spectral_tilt  # (b,)
            orders = 3 if spec.deltas else 1
            x = tilt_bands(x, spec.n_mels, spec.group, orders, slopes, curvatures)
        return x

    def epoch_row(
        self, model: torch.nn.Module, epoch: int, sums: dict[str, float], seconds: float
    ) -> dict[str, Any]:
        cfg, data = self.cfg, self.data
        start_eval = time.perf_counter()
        row: dict[str, Any] = {"epoch": epoch, "train_loss": sums["loss_sum"] / len(data.train)}
        if "distill_sum" in sums:
            row["train_distill"] = sums["distill_sum"] / len(data.train)
        row.update(
            score_splits(cast(CTCModel, model), data, cfg.batch_size, self.device, cfg.beam_size)
        )
        row.update(
            epoch_seconds=seconds,
            eval_seconds=time.perf_counter() - start_eval,
            lr=cfg.lr,
            skipped_utterances=len(data.skipped),
        )
        return row


def train_speech(
    cfg: Config,
    run_dir: Path,
    device: torch.device,
    d: Dist | None = None,
    checkpoint: Any = None,
) -> dict[str, Any]:
    """The speech part of :func:`kcprnn.experiments.train.train` (same run folder files);
    ``checkpoint``: a :func:`~kcprnn.experiments.loop.read_checkpoint` result to resume from."""
    d = d or Dist()
    start_load = time.perf_counter()
    data = load_in_turn(d, lambda: load_speech_data(cfg))
    for path, reason in data.skipped:
        log.warning("skipped utterance %s: %s", path, reason)
    metric = data.metric
    log.info(
        "%s: %d utterances (%d train, %d dev, %d test, %d skipped), %d symbols + blank, "
        "%d values per frame, loaded in %.1f s",
        cfg.dataset,
        len(data.uids),
        len(data.train),
        len(data.dev),
        len(data.test),
        len(data.skipped),
        len(data.corpus.vocabulary),
        data.input_size,
        time.perf_counter() - start_load,
    )
    torch.manual_seed(cfg.seed)
    model = build_ctc_model(cfg, data.input_size, data.num_symbols)
    teacher = start_from(cfg, model, device, resuming=checkpoint is not None)
    numbers = model_numbers(model)  # type: ignore[arg-type]
    log.info("model: %s", model)
    optimizer = make_optimizer(cfg, model)
    task = SpeechTask(cfg, data, device, teacher)
    meta = {"input_size": data.input_size, "class_names": ["<blank>", *data.corpus.vocabulary]}
    history = fit(cfg, run_dir, model, optimizer, task, d, device, meta, checkpoint)
    key = f"test_{metric}"
    summary: dict[str, Any] = {
        "name": cfg.name or run_dir.name,
        "dataset": cfg.dataset,
        "cell": cfg.cell,
        "format": cfg.format,
        "hidden_format": cfg.hidden_format,
        "num_layers": cfg.num_layers,
        "bidirectional": cfg.bidirectional,
        **numbers,
        "seconds_per_epoch": statistics.median(r["epoch_seconds"] for r in history),
        key: history[-1].get(key),
        f"best_{key}": min(r.get(key, float("inf")) for r in history),
    }
    if len(data.dev):
        best = min(history, key=lambda r: r[f"dev_{metric}"])
        summary[f"dev_{metric}"] = history[-1][f"dev_{metric}"]
        summary[f"{key}_at_best_dev"] = best.get(key)
        summary["best_dev_epoch"] = best["epoch"]
    summary.update(
        train_loss=history[-1]["train_loss"],
        epochs=cfg.epochs,
        num_train=len(data.train),
        num_dev=len(data.dev),
        num_test=len(data.test),
        num_symbols=data.num_symbols,
        input_size=data.input_size,
        skipped_utterances=len(data.skipped),
        device=str(device),
        torch_threads=torch.get_num_threads(),
        world_size=d.world_size,
    )
    if d.is_main:
        write_json(run_dir / "summary.json", summary)
    return summary
