"""The cost model: every machine-tuned number kcprnn's planners and GEMM routing use, in one
frozen object.

Costs are in multiply-accumulate equivalents (one MAC of a large float32 GEMM = 1). The defaults
were measured on a 2-core x86-64 CPU (AVX-512) with torch 2.13 at 2 threads; ``kcprnn calibrate``
measures the machine it runs on and prints a model to pass in (``KCPMatrix(..., cost_model=m)``,
or :func:`CostModel.load` of its JSON); with ``--save`` it keeps the model where every later
process on this machine loads it by default (:func:`machine_model_path`). How each default was
measured is recorded beside the benchmark results (``benchmarks/results/cost-model/``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "BUILTIN",
    "CostModel",
    "default_cost_model",
    "default_cost_model_source",
    "forget_machine_model",
    "machine_model_path",
]


def _mkl_generic_avx512(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has AVX-512 but is not Intel's: MKL then runs its generic kernels (AVX2
    at best), while oneDNN, which picks its kernels by the CPU's flags, runs AVX-512 ones.
    ``cpuinfo``: the text of ``/proc/cpuinfo`` (read when ``None``; ``False`` where it cannot
    be read)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                cpuinfo = f.read(1 << 16)
        except OSError:
            return False
    vendor = flags = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key == "flags" and not flags:
            flags = value
    return bool(vendor) and vendor != "GenuineIntel" and "avx512f" in flags.split()


ONEDNN_GEMM_GENERIC = 0.5
"""The built-in ``onednn_gemm`` where MKL runs its generic kernels on an AVX-512 CPU
(:func:`_mkl_generic_avx512`): oneDNN ran the large products 1.05-2.7x faster on a 2-core AMD
EPYC (Zen 4; ``benchmarks/results/recurrence/onednn-gemm/``); 1 elsewhere (MKL kept)."""

_ONEDNN_GEMM = ONEDNN_GEMM_GENERIC if _mkl_generic_avx512() else 1.0


@dataclass(frozen=True)
class CostModel:
    """Machine-tuned costs and thresholds. Frozen: derive variants with :meth:`replace`."""

    # --- whether the fast CPU paths are planned for ---
    kernels: bool = True  # plan for kcprnn's compiled float32 CPU kernels (the plan, and so the
    # MAC count, does not depend on whether a compiler exists; without one the same plan runs on
    # torch ops)
    onednn: bool = True  # plan for oneDNN's inner product on tall float32 CPU products

    # --- KCP planner (formats/kcp) ---
    io: float = 1.0  # one element read or written by a GEMM
    permute: float = 60.0  # one element moved by a strided permute copy with a contiguous run of 6;
    # (0.5 + 3 / run) times that for other runs
    gather_index: float = 120.0  # one element of a final reordering run as an index_select
    final_gather_run: int = 16  # final reorderings with shorter contiguous runs use index_select
    native_gather: float = 20.0  # one element moved by the compiled one-pass gather ...
    native_gather_run: float = 60.0  # ... plus this over its contiguous run
    swap: float = 11.0  # one element of a block transpose ...
    swap_run: float = 40.0  # ... plus this over its contiguous run
    big_elements: int = 1 << 22  # blocks this large are mapped fresh and page-faulted per call
    fault: float = 40.0  # per element of such a block
    gather_chunk: int = 1 << 21  # sequential gathers inputs larger than this in chunks of rows
    narrow_penalty: float = 24.0  # batched GEMMs of width w cost (1 + this / w) per MAC
    row: float = 150.0  # one GEMM row (small inner dimensions run far below peak)
    kernel: float = 5.0e5  # one op launch with autograd recording (Python + dispatch)
    kernel_prepared: float = 1.5e5  # one op launch under no_grad
    build: float = 30.0  # per element of the broadcast products building the small matrices
    narrow: int = 16  # parallel step 2 uses per-row GEMMs from this many suffix outputs on
    onednn_gain: float = 0.8  # a tall GEMM on oneDNN costs this times MKL's
    native_gain: float = 0.5  # a tall GEMM on the compiled kernel, up to 4 outputs ...
    native_gain_wide: float = 0.75  # ... and up to 8, relative to MKL's
    backward_parallel: float = 1.5  # backward over forward time of the parallel product
    backward_sequential: float = 0.5  # ... and of the sequential one

    # --- GEMM routing (_cpu/ops) ---
    onednn_min_out: int = 8  # tall products with at least this many outputs run on oneDNN
    onednn_min_inner: int = 32  # below tall_min_rows rows, oneDNN still runs products with this
    onednn_min_size: int = 1 << 17  # many inputs and this many input elements
    native_max_out: int = 8  # the compiled kernel runs products of at most this many outputs,
    native_long_row: int = 4096  # more than half of that only on rows of at most this length,
    native_min_size: int = 32768  # and at least this many input elements
    tall_blocks: int = 32  # blocks of rows of a tall weight gradient
    tall_min_rows: int = 64 * 32  # fewer rows: one plain GEMM
    scratch_max: int = 1 << 22  # largest reusable scratch buffer (elements) per slot and thread

    # --- other formats and the recurrence ---
    tt_chunk_entries: int = 1 << 23  # TT/TR sweep rows in chunks of at most this many entries
    tucker_chunk_elements: int = 1 << 19  # Tucker/CP multiply larger inputs in chunks of rows
    ht_move: float = 8.0  # one element copied by an HT permutation
    ht_max_search: int = 5  # HT leaf orders searched exhaustively up to this many modes
    # W_hh's gradient over more rows: one torch.mm, else oneDNN (mm was the faster from 16 to
    # 4,800 rows on the Xeon VM; `kcprnn calibrate` measures it)
    recurrent_grad_mm_rows: int = 0
    onednn_gemm: float = _ONEDNN_GEMM  # a large float32 GEMM over a sequence's rows (a fused
    # layer's input projection, its weight gradient, W_hh's gradient) on oneDNN over MKL's time:
    # below 1 each runs where it prices lower (ops.gemm_price); 1 on Intel CPUs and those
    # without AVX-512, ONEDNN_GEMM_GENERIC elsewhere; `kcprnn calibrate` measures it
    onednn_copy: float = 40.0  # one element of a transposed operand oneDNN copies before its
    # product (the gradients' n x g one) ...
    onednn_call: float = 5.0e5  # ... and one call of its product beyond MKL's (about 10 us: the
    # weight's reorder, the primitive's lookup)

    # --- recurrences (rnn) ---
    rnn_torch_step: float = 2.5e6  # one time step of one direction in torch's fused recurrent
    # kernels (torch.lstm, torch.gru, ...), beyond its GEMM
    rnn_torch_lstm_call: float = 20.0  # one weight element of a layer direction, per call of
    # torch's LSTM kernel on the CPU in float32 without gradients (oneDNN's RNN primitive
    # reorders the weights at every call: 0.2 ms at 40 -> 256, 1 ms at 40 -> 512; its GRU and
    # Elman kernels do not) ...
    rnn_torch_lstm_train: float = 100.0  # ... and per training call, forward and backward
    # (2-9 ns per element measured: 0.3 ms at 40 -> 256, 6 ms at 40 -> 512, 0.5 s for a
    # 57,600 -> 1,024 W_ih)
    rnn_torch_lstm_input: float = 1.3  # torch's LSTM kernel in training prices its input
    # products (forward and both backward) at this times a GEMM's: they run slower than
    # kcprnn's (about 2x measured from 128 to 700 inputs); fitted with the fields above on 16
    # layers (40-700 inputs, hidden 128-512), where 1.2-1.4 route every one to its fastest
    # (benchmarks/results/recurrence/small-mm/)
    rnn_torch_gru: float = 1.4  # torch's GRU recurrence (its GEMMs and steps) over the price of
    # the same work in its LSTM, forward (kcprnn's fused dense GRU loop is priced the same way)
    rnn_torch_gru_backward: float = 1.75  # ... and backward
    rnn_torch_rnn: float = 1.0  # the same for the Elman recurrences (tanh, relu), forward ...
    rnn_torch_rnn_backward: float = 1.0  # ... and backward
    rnn_torch_step_grad: float = 150.0  # per W_hh entry a step, the GRU and Elman kernels'
    # backward below rnn_min_rows rows a step: autograd takes each step's W_hh gradient as a
    # fresh product of those few rows (0.44 ns an entry on MKL at one row) and sums it
    rnn_fused_step: float = 5.5e6  # one step of kcprnn's fused LSTM/GRU/RNN loop, beyond its GEMM
    rnn_dense_forward: float = 1.15  # the compiled dense loop (each step's product on oneDNN with
    # W_hh packed, the rest in one compiled call: native_dense.py) over torch's LSTM kernel for
    # the same recurrent work, any mode, forward ...
    rnn_dense_backward: float = 0.65  # ... and backward (transposed products, one W_hh GEMM) ...
    rnn_dense_step: float = 1.5e6  # ... plus this per step each way (two calls from Python); run
    # from rnn_min_rows rows per step (below them its GEMM is a GEMV slower than torch's)
    rnn_dense_packed_call: float = 1.0e6  # ... of which this per product of a step is oneDNN's
    # packed product's call, which a small W_hh's products on torch.mm do not pay
    # (native_dense.small_product)
    rnn_dense_warm: float = 1.35  # the loop's price over that in LSTM training where torch's
    # workspace stays in glibc's heap (the rnn_dense_* prices were fitted where it does not, and
    # torch's kernel then pays fresh pages at every call): 1.15-1.37x torch's time there
    rnn_dense_lstm: float = 1.0  # the compiled dense loop's price for an LSTM layer over the
    # fields above, without gradients ...
    rnn_dense_lstm_train: float = 1.0  # ... and in training; likewise for GRU and Elman layers:
    # 1 on the machine the defaults come from; `kcprnn calibrate` sets them from this machine's
    # loop and torch's kernel timed on one layer per mode (1.2-1.4 for the LSTM loop on a 2-core
    # AMD EPYC: benchmarks/results/recurrence/calibrated-routes/)
    rnn_dense_gru: float = 1.0
    rnn_dense_gru_train: float = 1.0
    rnn_dense_rnn: float = 1.0
    rnn_dense_rnn_train: float = 1.0
    rnn_torch_workspace: float = 12.0  # floats of torch's LSTM training workspace per row and
    # hidden unit of a direction ...
    rnn_torch_mmap: int = 8_388_608  # ... reused between calls below this many (glibc's largest
    # mmap threshold, 32 MiB of float32)
    rnn_kron_op: float = 1.0e6  # one factor product or gather of a structured recurrent step
    rnn_native_step: float = 2.0e5  # one step of the compiled structured loop (native_rnn.cpp),
    # forward or backward, beyond its products and gate arithmetic
    rnn_native_gate: float = 40.0  # one gate pre-activation (row x gate unit) of a compiled step:
    # the output permutation, the activations and the cell update
    rnn_native_gemm: float = 1.8  # one multiply-add of the compiled forward step's factor
    # products, counted as the kernel runs them (plan._kernel_work: expanded products on short
    # trailing axes, scalar tails) ...
    rnn_native_backward_gemm: float = 1.35  # ... and of the backward step's transposed products
    rnn_native_product: float = 1.5e5  # one factor product (one term's mode) of a compiled step,
    # forward or backward, beyond its work: its loops' setup over the step's rows ...
    rnn_native_traffic: float = 8.0  # ... plus each element it reads or writes
    # (plan._kernel_traffic): products of 4 to 8 per mode, as in a CP W_hh of four modes at
    # rank 4, are bound by moving their intermediates, not by their MACs
    rnn_native_grads: float = 0.6  # one MAC of the structured loop's factor gradients (over all
    # rows at once, after the backward loop), relative to a large GEMM's
    rnn_step_backward: float = 2.0  # a step's backward over its forward (overheads and products)
    rnn_small_gemm: float = 4.0  # a MAC of the small factor products of a structured step
    rnn_structured_input: float = 360.0  # a MAC of a structured product over ``f`` inputs
    # costs (1 + this / f): on narrow inputs its factor GEMMs have tiny inner dimensions and run
    # far below a large GEMM's rate; on wide ones they run near it
    rnn_kcp_output: float = 60.0  # per output entry of a KCP input product over many rows,
    # beyond what the rebuilt dense product writes: its final gather into the natural order
    # (and, for a GRU, the bias pass over the whole gate tensor; fused LSTM and Elman loops add
    # the bias themselves). Measured with the bias pass (biLSTM, T=300, batch 16): about 230
    # large-GEMM MACs an entry at hidden 512, 65-90 at hidden 256; 60 sends 40-wide inputs to the
    # rebuilt W_ih (1.3-1.5x faster there) and keeps 123-wide ones structured, which is the
    # faster at hidden 256 and 8 % slower at 512 (benchmarks/results/regimes/kcp-input-output/)
    rnn_factorized_input: float = 6.0  # a MAC of a TT, TR, BT, HT, CP or Tucker product over
    # many rows (the input product of a sequence): their sweeps run narrow GEMMs between
    # permuting copies, at 5.5-10x a large GEMM's time per MAC forward and 6-13x in training
    rnn_cp_input_training: float = 3.0  # CP's input product in training over that rate: its
    # backward runs at about 7x its forward (spikes, 700 inputs: 0.6x the dense product forward,
    # 1.7x forward+backward; the suite's CP W_ih trained at 0.72-0.81x torch.nn without this)
    rnn_rebuild: float = 4.0  # one element of a weight rebuilt from its factors (to_dense) ...
    rnn_rebuild_backward: float = 30.0  # ... and of its backward (the gradient copied back to
    # the halves' layout and read by two skinny GEMMs), beyond the reconstruction's MACs
    rnn_cell_op: float = 5.0e5  # one op launch of a structured cell step
    rnn_aten_op: float = 1.0e5  # one aten operator of a format's product in a cell step
    # without gradients (plan.product_ops counts them): TT, TR, BT, HT, Tucker and CP products
    # of one row took 1.9-2.6 us per operator whatever their size
    rnn_step_ops: float = 12.0  # aten operators of a structured step's gate arithmetic
    # --- one cell step without gradients (rnn/_cell_step.py) ---
    rnn_torch_cell: float = 1.5e6  # one step of torch's fused cell on the kept dense weights,
    # beyond its products: the cell's Python, the cache check, the launches
    rnn_cell_weight: float = 4.5  # one weight element of torch's products in that step ...
    rnn_cell_row: float = 1.8  # ... plus this per row
    rnn_native_call: float = 2.0  # one call of the compiled step beyond its work, in op launches
    # of a structured cell step (rnn_cell_op): the cell's Python, the cache check, the call
    rnn_native_weight: float = 1.0  # one weight element of a dense matrix in the compiled step
    rnn_native_row: float = 2.6  # ... plus this per row (dot products: below a GEMM's rate)
    rnn_cell_gather: float = 25.0  # one input element gathered into factor-major order there
    rnn_min_rows: int = 16  # a dense product over fewer rows costs as much as over this many
    # (reading the weight dominates)

    def __hash__(self) -> int:
        # computed once: models key the planners' caches, looked up at every forward
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(dataclasses.astuple(self))
            object.__setattr__(self, "_hash", cached)
        return cached

    def backward_ratio(self, algorithm: str) -> float:
        """Backward over forward time of KCP's ``"parallel"`` or ``"sequential"`` product."""
        if algorithm == "parallel":
            return self.backward_parallel
        if algorithm == "sequential":
            return self.backward_sequential
        raise ValueError(f"algorithm must be 'parallel' or 'sequential', got {algorithm!r}")

    def replace(self, **changes: Any) -> CostModel:
        """A copy with ``changes`` applied (unknown names raise ``TypeError``)."""
        return dataclasses.replace(self, **changes)

    def for_device(self, device: torch.device | str | None, dtype: torch.dtype | None) -> CostModel:
        """This model as it applies to tensors of ``device`` and ``dtype``: the compiled kernels
        and oneDNN run float32 on the CPU only, so elsewhere their savings are not planned for."""
        if not (self.kernels or self.onednn):
            return self
        if device is None:
            kind = "cpu"
        else:
            kind = device.type if isinstance(device, torch.device) else torch.device(device).type
        if kind == "cpu" and (dtype is None or dtype == torch.float32):
            return self
        return _without_fast_paths(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CostModel:
        """A model from ``values`` (missing names keep their defaults); an unknown name or a
        value of the wrong type raises ``ValueError`` naming it."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"CostModel: unknown field(s) {unknown}; known: {sorted(fields)}")
        checked: dict[str, Any] = {}
        for name, value in values.items():
            kind = type(getattr(_DEFAULT, name))
            ok = (
                isinstance(value, bool)
                if kind is bool
                else (
                    isinstance(value, (int, float))
                    and not isinstance(value, bool)
                    and (kind is float or float(value).is_integer())
                )
            )
            if not ok:
                raise ValueError(f"CostModel: {name}={value!r} should be a {kind.__name__}")
            checked[name] = kind(value)
        return cls(**checked)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the model as JSON, atomically (a crash leaves the old file or the new one)."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CostModel:
        """Read a model written by :meth:`save` or printed by ``kcprnn calibrate``."""
        with open(path) as f:
            values = json.load(f)
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a cost model is a JSON object, got {type(values).__name__}")
        return cls.from_dict(values)


_DEFAULT = CostModel()


@functools.lru_cache(maxsize=16)
def _without_fast_paths(model: CostModel) -> CostModel:
    return model.replace(kernels=False, onednn=False)


_LOADED: dict[str, tuple[tuple[int, int], CostModel]] = {}  # path -> ((mtime, size), model)

BUILTIN = "builtin"
"""``KCPRNN_COST_MODEL=builtin`` uses the built-in defaults even where this machine has a model."""


@functools.lru_cache(maxsize=1)
def _machine_key() -> str:
    from .native import _cpu_signature, sources_digest

    text = _cpu_signature() + "\n" + torch.__version__ + "\n" + sources_digest()
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def machine_model_path() -> Path:
    """Where ``kcprnn calibrate --save`` keeps this machine's model and :func:`default_cost_model`
    looks for it: in the kernel cache folder (``$KCPRNN_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/kcprnn``, else ``~/.cache/kcprnn``), named by a hash of the CPU's model and
    flags, torch's version and the kernels' sources, so that another CPU, another torch or
    other kernels (whose speed the prices measured) sharing the folder do not read it."""
    from .native import cache_dir

    return cache_dir() / f"cost-model-{_machine_key()}.json"


# this machine's model once looked up: [model] (the defaults where it has none)
_MACHINE: list[CostModel] = []


def forget_machine_model() -> None:
    """Look for this machine's model file again at the next :func:`default_cost_model` (after
    ``kcprnn calibrate --save`` wrote it, or a test removed it)."""
    _MACHINE.clear()


def _load_machine_model(file: Path) -> CostModel:
    if not file.is_file():
        return _DEFAULT
    try:
        return CostModel.load(file)
    except (ValueError, TypeError) as error:  # json.JSONDecodeError is a ValueError
        raise ValueError(
            f"this machine's cost model {file} does not load ({error}); run `kcprnn calibrate "
            "--save` again or remove the file"
        ) from error


def default_cost_model_source() -> str:
    """Where :func:`default_cost_model` takes its model from: the file it reads, or ``builtin``."""
    path = os.environ.get("KCPRNN_COST_MODEL")
    if path:
        return path
    default_cost_model()
    return BUILTIN if _MACHINE[0] is _DEFAULT else str(machine_model_path())


def default_cost_model() -> CostModel:
    """The model used where none is passed: ``$KCPRNN_COST_MODEL`` if set (a JSON file written by
    ``kcprnn calibrate --out`` or :meth:`CostModel.save`, read again when it changes; or
    ``builtin`` for the defaults), else this machine's model (:func:`machine_model_path`, written
    by ``kcprnn calibrate --save``; looked up once per process), else the built-in defaults."""
    path = os.environ.get("KCPRNN_COST_MODEL")
    if path == BUILTIN:
        return _DEFAULT
    if not path:
        if not _MACHINE:
            _MACHINE.append(_load_machine_model(machine_model_path()))
        return _MACHINE[0]
    status = os.stat(path)
    stamp = (status.st_mtime_ns, status.st_size)
    kept = _LOADED.get(path)
    if kept is None or kept[0] != stamp:
        kept = _LOADED[path] = (stamp, CostModel.load(path))
    return kept[1]
