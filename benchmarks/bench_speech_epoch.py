"""Training time per epoch of the speech presets, measured side by side in one process.

For each ``experiments/configs/<task>_<format>.toml`` preset: the model is built as
``kcprnn train`` builds it, and one training step (forward, CTC loss, backward, gradient
clipping, Adam) is timed on each of the ``--batches`` batches of median length; the steps of all
formats are interleaved round by round, and the per-format median over rounds, scaled to the
epoch's number of batches, is reported. Run in one process on an otherwise idle machine, the
numbers compare the formats with each other; ``epoch_seconds`` in a run's ``metrics.jsonl``
depends on whatever else the machine ran.

    python benchmarks/bench_speech_epoch.py --task timit-like --rounds 5 --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from kcprnn.experiments.config import load_config
from kcprnn.experiments.speech import SpeechTask, build_ctc_model, load_speech_data
from kcprnn.experiments.train import make_optimizer, model_numbers

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"
FORMATS = ("dense", "kcp", "tt", "tr", "bt", "ht")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="timit-like", choices=["timit-like", "tedlium-like"])
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=3, help="median-length batches per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    setups = {}
    for fmt in args.formats.split(","):
        cfg = load_config(CONFIGS / f"{args.task}_{fmt}.toml", ["--progress=false"])
        data = load_speech_data(cfg)
        torch.manual_seed(cfg.seed)
        model = build_ctc_model(cfg, data.input_size, data.num_symbols)
        task = SpeechTask(cfg, data, torch.device("cpu"))
        middle = len(task.batches) // 2
        start = max(0, middle - args.batches // 2)
        batches = task.batches[start : start + args.batches]
        setups[fmt] = (cfg, model, make_optimizer(cfg, model), task, batches)

    def step(fmt: str) -> float:
        cfg, model, optimizer, task, batches = setups[fmt]
        model.train()
        start = time.perf_counter()
        for b in batches:
            optimizer.zero_grad(set_to_none=True)
            loss, _ = task.step(model, b, b)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
        return (time.perf_counter() - start) / len(batches)

    for fmt in setups:  # warm-up: plans, kernels, allocator
        step(fmt)
    times: dict[str, list[float]] = {fmt: [] for fmt in setups}
    for r in range(args.rounds):
        order = list(setups) if r % 2 == 0 else list(reversed(setups))
        for fmt in order:
            times[fmt].append(step(fmt))

    rows = []
    for fmt, ts in times.items():
        cfg, model, _, task, batches = setups[fmt]
        per_step = statistics.median(ts)
        rows.append(
            {
                "format": fmt,
                "recurrent_params": model_numbers(model)["recurrent_params"],
                "step_seconds": per_step,
                "epoch_seconds": per_step * len(task.batches),
                "batches_per_epoch": len(task.batches),
                "frames_per_batch": int(np.mean([len(task.data.frames[i]) for i in batches[0]])),
            }
        )
        print(
            f"{args.task:13s} {fmt:6s} {rows[-1]['recurrent_params']:>10,d} params  "
            f"step {per_step * 1e3:8.1f} ms  epoch {rows[-1]['epoch_seconds']:6.1f} s"
        )
    meta = {
        "torch": torch.__version__,
        "threads": args.threads,
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
        "rounds": args.rounds,
        "batches": args.batches,
    }
    print(json.dumps(meta))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
