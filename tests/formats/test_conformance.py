"""One suite for every registered format: each is checked against its own dense reconstruction
and against independent references (autograd, parameter counts, torch's state_dict)."""

import math

import pytest
import torch
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from kcprnn import FORMATS, FactorizedLinear
from kcprnn._cpu import CostModel, native
from kcprnn.formats._base import CHAIN_ROWS
from kcprnn.formats._chain import chain_macs

# Small, general shapes: three modes of unequal sizes, one mode of size 1.
IN_MODES, OUT_MODES = (3, 4, 2), (2, 1, 5)
# Options that exercise each format beyond its simplest case (ranks > 1, extra terms / blocks).
OPTIONS = {
    "dense": {},
    "kcp": {"rank": [2, 3], "terms": 2, "num_factors": 2},
    "cp": {"rank": 3},
    "tucker": {"rank": 2},
    "tt": {"rank": 3},
    "tr": {"rank": 2},
    "bt": {"rank": 2, "blocks": 2},
    "ht": {"rank": 2},
}
NAMES = sorted(FORMATS)


def make(name, in_modes=IN_MODES, out_modes=OUT_MODES, **kw):
    opts = {"in_modes": in_modes, "out_modes": out_modes, **OPTIONS[name], **kw}
    return FORMATS[name](math.prod(in_modes), math.prod(out_modes), **opts)


def test_every_format_is_registered():
    assert set(OPTIONS) == set(FORMATS)


@pytest.mark.parametrize("name", NAMES)
class TestConformance:
    def test_forward_matches_dense_reconstruction(self, name):
        w = make(name, dtype=torch.float64)
        x = torch.randn(7, w.in_features, dtype=torch.float64)
        torch.testing.assert_close(w(x), x @ w.to_dense().T, rtol=1e-10, atol=1e-12)

    def test_leading_batch_dims(self, name):
        w = make(name)
        x = torch.randn(2, 3, 4, w.in_features)
        y = w(x)
        assert y.shape == (2, 3, 4, w.out_features)
        torch.testing.assert_close(y, w(x.reshape(-1, w.in_features)).reshape(y.shape))

    def test_single_vector(self, name):
        w = make(name, dtype=torch.float64)
        x = torch.randn(w.in_features, dtype=torch.float64)
        torch.testing.assert_close(w(x), w.to_dense() @ x)

    def test_gradcheck_float64(self, name):
        w = make(name, dtype=torch.float64)
        params = {k: p.detach().clone().requires_grad_(True) for k, p in w.named_parameters()}
        x = torch.randn(3, w.in_features, dtype=torch.float64, requires_grad=True)
        keys = list(params)

        def fn(x, *values):
            return functional_call(w, dict(zip(keys, values, strict=True)), (x,))

        assert torch.autograd.gradcheck(fn, (x, *params.values()))

    def test_dense_algorithm_equals_factorized(self, name):
        w = make(name, dtype=torch.float64)
        x = torch.randn(5, w.in_features, dtype=torch.float64)
        y = w(x)
        w.algorithm = "dense"
        torch.testing.assert_close(w(x), y)

    def test_cost_model_argument(self, name):
        # small chunks and no HT search: the products take their other paths, same results
        model = CostModel().replace(tt_chunk_entries=64, tucker_chunk_elements=64, ht_max_search=1)
        try:
            w = make(name, dtype=torch.float64, cost_model=model)
        except TypeError as error:  # a format whose constructor does not take it yet
            if "unexpected keyword argument 'cost_model'" not in str(error):
                raise
            pytest.skip(f"{FORMATS[name].__name__} does not take cost_model= yet")
        assert w.cost_model is model
        x = torch.randn(9, w.in_features, dtype=torch.float64)
        torch.testing.assert_close(w(x), x @ w.to_dense().T, rtol=1e-10, atol=1e-12)
        w.cost_model = None
        assert w.cost_model == CostModel()
        torch.testing.assert_close(w(x), x @ w.to_dense().T, rtol=1e-10, atol=1e-12)
        with pytest.raises(TypeError, match="cost_model must be a CostModel"):
            w.cost_model = {"tt_chunk_entries": 64}

    def test_num_params_counts_parameters(self, name):
        w = make(name)
        assert w.num_params == sum(p.numel() for p in w.parameters())
        assert w.compression_ratio == pytest.approx(w.in_features * w.out_features / w.num_params)

    def test_flops_positive_and_linear_in_rows(self, name):
        w = make(name)
        f1, f2 = w.flops(1), w.flops(2)
        assert f1 > 0
        # every contraction touches each row: cost is affine in rows, never less than the output
        assert w.flops(10) - w.flops(9) == f2 - f1 >= w.out_features

    @pytest.mark.parametrize("training", [False, True])
    def test_macs_of_each_algorithm_and_their_aliases(self, name, training):
        w = make(name)
        layer = FactorizedLinear.from_matrix(w)
        for rows in (1, 7):
            planned = w.matmul_macs(rows, training=training)
            assert w.macs(rows, training=training) == planned > 0
            assert w.flops(rows, training=training) == planned
            assert layer.macs(rows, training=training) == layer.flops(rows, training=training)
            assert layer.macs(rows, training=training) == planned
            assert w.matmul_flops(rows) == w.matmul_macs(rows, training=False)
        assert w.reconstruction_flops() == w.reconstruction_macs() >= 0
        w.algorithm = "dense"
        for rows in (1, 7):
            dense = w.reconstruction_macs() + rows * w.in_features * w.out_features
            assert w.macs(rows, training=training) == dense
            assert w.flops(rows, training=training) == dense
            assert layer.macs(rows, training=training) == dense

    def test_init_std_of_reconstruction(self, name):
        # Average the second moment over several draws: products of factors are heavy-tailed.
        w = make(name, in_modes=(4, 6, 5), out_modes=(4, 3, 4), dtype=torch.float64)
        for std in (0.05, w.default_std()):
            second = []
            for seed in range(20):
                torch.manual_seed(seed)
                w.reset_parameters(std)
                second.append(w.to_dense().pow(2).mean())
            assert torch.stack(second).mean().sqrt().item() == pytest.approx(std, rel=0.2)

    def test_state_dict_round_trip(self, name):
        w = make(name)
        v = make(name)
        v.load_state_dict(w.state_dict())
        x = torch.randn(4, w.in_features)
        torch.testing.assert_close(v(x), w(x))

    def test_dtype_and_device(self, name):
        w = make(name, dtype=torch.float64, device="cpu")
        assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in w.parameters())
        assert w.to_dense().dtype == torch.float64
        w = w.to(torch.float32)
        assert w(torch.randn(2, w.in_features)).dtype == torch.float32

    def test_wrong_input_size(self, name):
        w = make(name)
        with pytest.raises(ValueError, match=r"in_features=24.*\(2, 25\)"):
            w(torch.randn(2, 25))

    def test_non_floating_dtype(self, name):
        with pytest.raises(TypeError, match="torch.int64"):
            make(name, dtype=torch.int64)

    def test_modes_must_multiply_to_features(self, name):
        with pytest.raises(ValueError, match=r"in_modes=\[3, 4, 3\] multiply to 36"):
            FORMATS[name](24, 10, in_modes=(3, 4, 3), out_modes=(2, 1, 5), **OPTIONS[name])

    def test_mode_lists_of_different_lengths(self, name):
        with pytest.raises(ValueError, match="same length"):
            FORMATS[name](24, 10, in_modes=(6, 4), out_modes=(2, 1, 5), **OPTIONS[name])

    def test_derived_modes(self, name):
        opts = {k: v for k, v in OPTIONS[name].items() if k != "rank"}
        w = FORMATS[name](256, 64, **opts)
        assert math.prod(w.in_modes) == 256 and math.prod(w.out_modes) == 64
        assert len(w.in_modes) == len(w.out_modes)
        x = torch.randn(3, 256, dtype=w.to_dense().dtype)
        torch.testing.assert_close(w(x), x @ w.to_dense().T, rtol=1e-4, atol=1e-5)

    def test_repr_names_shape_and_size(self, name):
        r = repr(make(name))
        assert "in_features=24" in r and "out_features=10" in r and "params=" in r

    def test_factorized_linear_wraps_format(self, name):
        layer = FactorizedLinear(
            24, 10, format=name, in_modes=IN_MODES, out_modes=OUT_MODES, **OPTIONS[name]
        )
        x = torch.randn(3, 24)
        torch.testing.assert_close(layer(x), x @ layer.to_dense().T + layer.bias)
        assert layer.num_params == layer.weight.num_params


@pytest.mark.parametrize("name", [n for n in NAMES if n != "dense"])
def test_non_positive_rank(name):
    with pytest.raises(ValueError, match="rank"):
        make(name, rank=0)


def _addmm_inplace_flops(self_shape, a_shape, b_shape, out_shape=None, **kwargs):
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


# KCP runs parts of its product in compiled kernels that torch's counter does not see; its
# counts are checked against its plans in test_kcp.py. The other formats' one-row chains
# (``kcprnn.formats._chain``) run in a kernel too, which counts its own: ``macs`` is the
# format's own product, the one the planners price.
@pytest.mark.parametrize("name", [n for n in NAMES if n != "kcp"])
@pytest.mark.parametrize("training", [False, True])
def test_macs_count_the_executed_products(name, training):
    # torch's own count of the forward's matrix products; the plan of these formats does not
    # depend on autograd, and training mode must count what it runs all the same
    w = make(name)
    mapping = {torch.ops.aten.addmm_: _addmm_inplace_flops}
    for rows in (1, 7, 300):
        chained = rows <= CHAIN_ROWS and native.available() and w.chain_spec() is not None
        expected = chain_macs(w._chain_plan(), rows) if chained else w.macs(rows, training=training)
        x = torch.randn(rows, w.in_features)
        with (
            torch.set_grad_enabled(training),
            FlopCounterMode(display=False, custom_mapping=mapping) as counter,
            native.counting_macs() as kernels,
        ):
            w(x)
        assert counter.get_total_flops() + 2 * kernels[0] == 2 * expected
