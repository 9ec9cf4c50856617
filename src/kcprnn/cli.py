"""The ``kcprnn`` command. Each subcommand lives in its own module with its own ``main(argv)``."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": (
        "kcprnn.experiments.demo",
        "train every format on the UCF11-like stand-in, print the table",
    ),
    "train": ("kcprnn.experiments.train", "train one experiment from a TOML config"),
    "compress": (
        "kcprnn.experiments.compress",
        "decompose a trained LSTM/GRU into a format, fine-tune, report accuracy",
    ),
    "evaluate": (
        "kcprnn.experiments.evaluate",
        "score finished runs' checkpoints again (e.g. with CTC beam search)",
    ),
    "report": ("kcprnn.experiments.report", "rebuild the results table and plot from run folders"),
    "bench": ("kcprnn.bench", "benchmark formats and RNNs (ours, dense, peers)"),
    "example": ("kcprnn.example", "build a KCP layer, check it against its dense reconstruction"),
    "build": ("kcprnn._cpu.native", "build the compiled CPU kernels now, print where (or why not)"),
    "calibrate": ("kcprnn._cpu.calibrate", "measure this machine's costs, print a cost model"),
    "budget": ("kcprnn.budget_cli", "list each format's configurations within a parameter budget"),
    "study": ("kcprnn.experiments.study", "train a grid of formats x budgets x seeds, aggregate"),
}


def usage() -> str:
    lines = ["usage: kcprnn COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines.append("\n'kcprnn COMMAND --help' describes a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"kcprnn: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
