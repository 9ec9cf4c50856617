"""``kcprnn evaluate``: score the saved checkpoint of finished runs again, on their own data, with
another decoder if asked (CTC prefix beam search, with or without a phone or character bigram of
the training targets, for a run trained with greedy decoding).

A run's ``metrics.jsonl`` scores each epoch as the run was configured; this rebuilds the model of
each run folder from its checkpoint (the averaged weights of an ``ema`` run) and scores it on the
same data and splits: dev and test PER or WER (and CER for characters) for speech, test (and
validation) loss and accuracy for the classifiers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from ..safetensors_io import write_text_atomic
from .config import SPEECH_DATASETS, Config, ConfigError
from .train import evaluate, load_checkpoint, load_data, split_indices, valid_indices

CPU = torch.device("cpu")


def evaluate_run(
    run_dir: str | Path,
    beam_size: int | None = None,
    per_speaker: bool = False,
    lm_weight: float = 0.0,
    lm_bonus: float = 0.0,
) -> dict[str, Any]:
    """The scores of ``run_dir``'s checkpoint. ``beam_size``: the CTC decoder for speech runs
    (1 = greedy, > 1 = prefix beam search; ``None``: the run's own ``beam_size``);
    ``per_speaker``: also each dev and test speaker's own error rate; ``lm_weight``: the beam
    search's weight on a symbol bigram estimated from the run's training targets, ``lm_bonus``
    its score per symbol (speech runs)."""
    model, cfg, _ = load_checkpoint(run_dir)
    row: dict[str, Any] = {"run": str(run_dir), "dataset": cfg.dataset}
    with torch.no_grad():
        if cfg.dataset in SPEECH_DATASETS:
            beam = cfg.beam_size if beam_size is None else beam_size
            if beam < 1:
                raise ConfigError(f"beam_size must be at least 1, got beam_size={beam}")
            if (lm_weight or lm_bonus) and beam == 1:
                raise ConfigError(
                    f"lm_weight={lm_weight} and lm_bonus={lm_bonus} score a language model in "
                    "the beam search; greedy decoding (beam_size=1) has none"
                )
            return {**row, **_speech_scores(model, cfg, beam, per_speaker, lm_weight, lm_bonus)}
        if lm_weight or lm_bonus:
            raise ConfigError(
                f"lm_weight and lm_bonus decode speech runs; {cfg.dataset!r} is not one"
            )
        if per_speaker:
            raise ConfigError(f"per_speaker scores speech runs; {cfg.dataset!r} is not one")
        if beam_size is not None:
            raise ConfigError(
                f"beam_size={beam_size} decodes CTC outputs; {cfg.dataset!r} is a classification "
                "data set"
            )
        return {**row, **_classifier_scores(model, cfg)}


def _speech_scores(
    model: Any, cfg: Config, beam: int, per_speaker: bool, lm_weight: float, lm_bonus: float
) -> dict[str, Any]:
    from .ctc import Bigram
    from .speech import load_speech_data, score_splits

    data = load_speech_data(cfg)
    row: dict[str, Any] = {"beam_size": beam}
    lm = None
    if lm_weight or lm_bonus:
        targets = [data.targets[i] for i in data.train]
        lm = Bigram.estimate(targets, data.num_symbols, weight=lm_weight, bonus=lm_bonus)
        row["lm_weight"], row["lm_bonus"] = lm_weight, lm_bonus
    return {**row, **score_splits(model, data, cfg.batch_size, CPU, beam, lm, per_speaker)}


def _classifier_scores(model: Any, cfg: Config) -> dict[str, Any]:
    clips = load_data(cfg)
    _, test_idx = split_indices(cfg, clips)
    row: dict[str, Any] = {}
    for split, idx in (("test", test_idx), ("valid", valid_indices(clips))):
        if not len(idx):
            continue
        row[f"{split}_loss"], row[f"{split}_acc"] = evaluate(model, clips, idx, cfg.batch_size, CPU)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kcprnn evaluate",
        description="Score the checkpoints of finished runs again on their own data and splits, "
        "one JSON line per run; speech runs with another CTC decoder if asked.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument(
        "--beam_size",
        type=int,
        help="speech runs: 1 = greedy, > 1 = CTC prefix beam search (default: the run's own)",
    )
    parser.add_argument(
        "--per_speaker",
        action="store_true",
        help="speech runs: also each dev and test speaker's own PER or WER",
    )
    parser.add_argument(
        "--lm_weight",
        type=float,
        default=0.0,
        help="speech runs, with --beam_size > 1: the weight on a symbol bigram language model "
        "estimated from the run's training targets (default 0: none)",
    )
    parser.add_argument(
        "--lm_bonus",
        type=float,
        default=0.0,
        help="with --lm_weight: a score added per decoded symbol (default 0)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", help="also write the rows to this JSON Lines file")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(args.threads, 1))
    rows = []
    for run in args.run_dirs:
        try:
            row = evaluate_run(run, args.beam_size, args.per_speaker, args.lm_weight, args.lm_bonus)
        except (ConfigError, FileNotFoundError, ValueError) as exc:
            print(f"kcprnn evaluate: error: {run}: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        write_text_atomic(args.out, "".join(json.dumps(r) + "\n" for r in rows))
    return 0
