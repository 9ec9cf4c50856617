"""``kcprnn example``: build a KCP layer at the UCF11 size, check it, report size and speed."""

from __future__ import annotations

import argparse
import time

import torch

from .layers import FactorizedLinear


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def run(
    in_features: int = 57600, out_features: int = 1024, rows: int = 96, repeats: int = 20
) -> dict:
    """Build a KCP layer, compare it with its dense reconstruction, time both. Returns numbers."""
    torch.manual_seed(0)
    layer = FactorizedLinear(in_features, out_features, format="kcp")
    x = torch.randn(rows, in_features)
    with torch.no_grad():
        dense = layer.to_dense()  # (j, i)
        ref = x.double() @ dense.double().T + layer.bias.double()
        err = ((layer(x).double() - ref).norm() / ref.norm()).item()
        kcp_ms = _median_ms(lambda: layer(x), repeats)
        dense_ms = _median_ms(lambda: torch.nn.functional.linear(x, dense, layer.bias), repeats)
    return {
        "layer": repr(layer),
        "params": layer.num_params,
        "dense_params": in_features * out_features,
        "compression_ratio": layer.compression_ratio,
        "relative_error": err,
        "kcp_ms": kcp_ms,
        "dense_ms": dense_ms,
        "speedup": dense_ms / kcp_ms,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kcprnn example", description=__doc__)
    parser.add_argument("--in-features", type=int, default=57600)
    parser.add_argument("--out-features", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=96)
    args = parser.parse_args(argv)
    r = run(args.in_features, args.out_features, args.rows)
    print(r["layer"])
    print(
        f"parameters: {r['params']:,} (dense {r['dense_params']:,}; {r['compression_ratio']:,.0f}x)"
    )
    print(f"relative error against the dense reconstruction: {r['relative_error']:.2e}")
    print(
        f"forward on {args.rows} rows ({r['threads']} threads): KCP {r['kcp_ms']:.2f} ms, "
        f"dense {r['dense_ms']:.2f} ms ({r['speedup']:.1f}x faster)"
    )
    return 0 if r["relative_error"] < 1e-4 else 1
