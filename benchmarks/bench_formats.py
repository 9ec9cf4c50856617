"""Every format of ours at the UCF11 size against dense nn.Linear and the input read.

57,600 -> 1,024 (in 8x20x20x18, out 16x4x4x4), 96 rows (batch 16 x 6 frames), float32, 2 threads;
rank 4 for tt/tr/bt/ht/cp/tucker (Tucker also 2x1x1x1), KCP at ranks 1, 2 and 4 with each of its
algorithms in two layouts: interleaved [[2,4],[4,5],[4,5],[3,6]] -> [[4,4],[2,2],[2,2],[2,2]]
(rows "kcp") and whole modes per factor [[8,1],[20,1],[1,20],[1,18]] -> [[8,2],[4,1],[4,1],[4,1]]
(rows "kcp-blocked"). Prints forward and forward+backward medians,
parameters, ``layer.macs(96)``, speedups over nn.Linear and forward time over ``x.sum()``, all
from one interleaved run; then checks the run against ``benchmarks/targets.toml`` (KCP, ranks
<= 4: forward >= 15x faster than nn.Linear and within 4x / 3x of the input read; ``auto`` within
10 % of the best algorithm) with ``check_targets.py``.

    .venv/bin/python benchmarks/bench_formats.py [extra `kcprnn bench` options]

Writes benchmarks/results/formats/bench.json. The measurement is
``kcprnn bench --points ucf11 --no-peers --no-memory --out benchmarks/results/formats``; the exit
status is the bench's, or 1 when a target fails.
"""

import sys
from pathlib import Path

import check_targets

from kcprnn.bench import main

if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "results" / "formats"
    rc = main(["--points", "ucf11", "--no-peers", "--no-memory", "--out", str(out), *sys.argv[1:]])
    if rc == 0:
        print()
        rc = check_targets.main([str(out / "bench.json")])
    sys.exit(rc)
