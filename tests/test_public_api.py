import kcprnn


def test_public_names_import():
    for name in kcprnn.__all__:
        assert hasattr(kcprnn, name), name


def test_fixed_format_linear_classes():
    layer = kcprnn.DenseLinear(6, 4, bias=False)
    assert layer.format == "dense" and layer.bias is None
