#!/usr/bin/env bash
# The TIMIT-like headline of docs/speech.md ("The headline protocol"): per seed, the dense model
# with and without weight averaging, then KCP (105x fewer recurrent parameters) started from the
# dense run without averaging; finally every run scored with greedy decoding and with CTC beam
# search, without and with a phone bigram language model. About 9 minutes a seed on one core.
#
#   bash experiments/timit_like_headline.sh [OUT_DIR] [SEED ...]
#
# Defaults: runs/timit-like-headline, seeds 0 1 2 3 4. EPOCHS=N shortens every run (a smoke test).
set -euo pipefail
out=${1:-runs/timit-like-headline}
shift || true
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(0 1 2 3 4)
configs=$(dirname "$0")/configs
common=(--normalization=speaker --band_warp=0.1 --dropout=0.5 --epochs=${EPOCHS:-40} --threads=1)
runs=()
for s in "${seeds[@]}"; do
    # the dense model that KCP starts from (its last weights), and the reference (averaged)
    kcprnn train --config "$configs/timit-like_dense.toml" --seed="$s" "${common[@]}" \
        --out_dir="$out/dense-s$s"
    kcprnn train --config "$configs/timit-like_dense.toml" --seed="$s" "${common[@]}" \
        --ema=0.995 --out_dir="$out/dense-ema-s$s"
    # W_ih: 3 Kronecker terms of 32 x 9 (frames x orders) and 32 x 41 (bands); W_hh at 0.5 %
    kcprnn train --config "$configs/timit-like_kcp.toml" --seed="$s" "${common[@]}" \
        --ema=0.995 --spectral_tilt=1.0 --init_from="$out/dense-s$s" \
        --format_options.out_modes='[[32,1],[1,32]]' --hidden_options.rank=0.005 \
        --out_dir="$out/kcp-s$s"
    runs+=("$out/dense-ema-s$s" "$out/kcp-s$s")
done
kcprnn evaluate "${runs[@]}" --beam_size=1 --out "$out/greedy.jsonl" > /dev/null
kcprnn evaluate "${runs[@]}" --beam_size=8 --out "$out/beam8.jsonl" > /dev/null
# with the phone bigram of the training targets (weights chosen on the dev set of seeds 0-4)
kcprnn evaluate "${runs[@]}" --beam_size=8 --lm_weight=0.15 --lm_bonus=1.0 \
    --out "$out/beam8-lm.jsonl" > /dev/null
# mean and standard deviation over the seeds, and KCP minus dense paired by seed
python - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])
for decoder in ("greedy", "beam8", "beam8-lm"):
    rows = [json.loads(line) for line in (out / f"{decoder}.jsonl").read_text().splitlines()]
    per = {(Path(r["run"]).name.rsplit("-s", 1)[0], Path(r["run"]).name.rsplit("-s", 1)[1]): r for r in rows}
    seeds = sorted({s for _, s in per})
    for split in ("dev", "test"):
        dense = [100 * per["dense-ema", s][f"{split}_per"] for s in seeds]
        kcp = [100 * per["kcp", s][f"{split}_per"] for s in seeds]
        gap = [k - d for k, d in zip(kcp, dense)]
        sd = statistics.stdev if len(seeds) > 1 else (lambda v: 0.0)
        print(f"{decoder:8s} {split:4s} PER %: dense {statistics.mean(dense):.2f} +- {sd(dense):.2f}, "
              f"KCP {statistics.mean(kcp):.2f} +- {sd(kcp):.2f}, gap {statistics.mean(gap):.2f} +- {sd(gap):.2f} "
              f"({len(seeds)} seeds)")
PY
