"""The long docstrings of :class:`~kcprnn.LSTM`, :class:`~kcprnn.GRU` and :class:`~kcprnn.RNN`,
assembled from the parts they share."""

__all__ = ["GRU_DOC", "LSTM_DOC", "RNN_DOC"]

ARGS_DOC = r"""
    Args:
        input_size: the number of expected features in the input ``x``.
        hidden_size: the number of features in the hidden state ``h``.
        num_layers: number of stacked recurrent layers. Default: 1.
        {extra_args}bias: if ``False``, no ``b_ih`` and ``b_hh``. Default: ``True``.
        batch_first: if ``True``, input and output are ``(batch, seq, feature)`` instead of
            ``(seq, batch, feature)``; not applied to hidden states. Default: ``False``.
        dropout: if non-zero, dropout with this probability on the outputs of every layer but
            the last. Default: 0.
        bidirectional: if ``True``, a bidirectional network. Default: ``False``.
        {proj_arg}device, dtype: factory arguments, as in ``torch.nn``.
        format: format of every input-to-hidden matrix ``W_ih`` (``G*hidden_size x
            layer input``), a key of :data:`kcprnn.FORMATS`. Default: ``"kcp"``.
        hidden_format: format of every hidden-to-hidden matrix ``W_hh`` (and ``W_hr``).
            Default: ``"dense"``, as in the papers' baselines.
        hidden_modes: modes of ``hidden_size`` (flat, or nested for Kronecker-factored formats).
            The ``G`` gates are folded into the first output mode, ``J_1 <- G*J_1``
            (``[4,4,4,4] -> [16,4,4,4]`` for an LSTM; nested modes: into the first Kronecker
            factor of the first mode), to give ``out_modes`` of every ``W_ih`` unless
            ``out_modes`` is given. Flat ``hidden_modes`` also tensorize ``W_hh``
            (``in_modes=hidden_modes``, ``out_modes`` folded), except with ``proj_size``.
        hidden_options: options of ``hidden_format`` for ``W_hh`` and ``W_hr`` (``rank``,
            ``num_modes``, ...); they win over what ``hidden_modes`` derives.
        layer_options: optional list of ``num_layers`` dicts, merged over ``**options`` for
            each layer's ``W_ih`` (the last word on any per-layer choice).
        **options: options of ``format`` (``in_modes``, ``out_modes``, ``rank``, ...).

    How options apply to layers: ``**options`` go to every layer's ``W_ih``, both directions,
    except ``in_modes``, which describe ``input_size`` and so apply to layer 0 only. Layers > 0
    read ``num_directions * (proj_size or hidden_size)`` features: their ``in_modes`` are
    ``hidden_modes`` with the directions folded into the first mode (``[2*4,4,4,4]`` when
    bidirectional; not with ``proj_size``), or the format's balanced default when
    ``hidden_modes`` is not given. An explicit ``out_modes`` (the full ``G*hidden_size`` gate
    output, flat or nested) is passed through to every layer.

    Default sizes: a matrix in a compressed format whose options give no ``rank`` is sized by
    one parameter budget per cell. The cell's compressed matrices (``W_ih``, ``W_hh``, ``W_hr``;
    dense ones are outside it) together store 1/32 of their dense parameters, split evenly, none
    above 1/4 of itself, the remainder to the others: ``LSTM(13, 256, format=F,
    hidden_format=F)`` gives ``W_ih`` 1/4 of itself and ``W_hh`` the rest, 32x smaller in all.
    Each share is solved into the format's options as a float ``rank`` is
    (:mod:`kcprnn.budget`; KCP in its blocked layout). An explicit ``rank`` wins.
"""

IO_DOC = r"""
    Inputs: input, {hx_in}
        - **input**: ``(L, H_in)`` unbatched, ``(L, N, H_in)`` or, with ``batch_first=True``,
          ``(N, L, H_in)``; or a :class:`~torch.nn.utils.rnn.PackedSequence` of variable-length
          sequences.
        {hx_doc}

    Outputs: output, {hx_out}
        - **output**: ``(L, D*H_out)`` unbatched, ``(L, N, D*H_out)`` or ``(N, L, D*H_out)``:
          the last layer's ``h_t`` for every ``t``; a ``PackedSequence`` for packed input.
        {hn_doc}

    Shape:
        ``N`` batch, ``L`` sequence length, ``D`` 2 if bidirectional else 1, ``H_in``
        ``input_size``, ``H_out`` {h_out}.
"""

LSTM_DOC = (
    r"""A multi-layer LSTM with compressed weights; drop-in for ``torch.nn.LSTM``.

    Each layer computes, for every step, the gates ``(i, f, g, o)`` of :class:`LSTMCell`;
    the input-to-hidden products of all steps are done at once before the recurrence.
"""
    + ARGS_DOC.format(
        extra_args="",
        proj_arg="proj_size: if ``> 0``, an LSTM with projections of this size. Default: 0.\n"
        "        ",
    )
    + IO_DOC.format(
        hx_in="(h_0, c_0)",
        hx_doc="- **h_0**: ``(D*num_layers, H_out)`` or ``(D*num_layers, N, H_out)``; "
        "**c_0**: the same with ``hidden_size``; zeros if omitted.",
        hx_out="(h_n, c_n)",
        hn_doc="- **h_n**, **c_n**: final hidden and cell states of every layer and "
        "direction, shaped as ``h_0`` and ``c_0``.",
        h_out="``proj_size`` if ``> 0`` else ``hidden_size``",
    )
    + r"""
    Attributes:
        cells: ``num_layers * D`` :class:`LSTMCell` (``proj_size`` set), index
            ``layer * D + direction``; ``cell(layer, direction)`` returns one.

    Examples::

        >>> rnn = LSTM(10, 20, 2, format="dense")
        >>> output, (h_n, c_n) = rnn(torch.randn(5, 3, 10))
        >>> output.shape, h_n.shape
        (torch.Size([5, 3, 20]), torch.Size([2, 3, 20]))
"""
)

GRU_DOC = (
    r"""A multi-layer GRU with compressed weights; drop-in for ``torch.nn.GRU``.

    Each layer computes, for every step, the gates ``(r, z, n)`` of :class:`GRUCell`
    (``b_hn`` inside the reset gate, as in ``torch.nn``); the input-to-hidden products of all
    steps are done at once before the recurrence.
"""
    + ARGS_DOC.format(extra_args="", proj_arg="")
    + IO_DOC.format(
        hx_in="h_0",
        hx_doc="- **h_0**: ``(D*num_layers, H_out)`` or ``(D*num_layers, N, H_out)``; "
        "zeros if omitted.",
        hx_out="h_n",
        hn_doc="- **h_n**: final hidden state of every layer and direction, shaped as h_0.",
        h_out="``hidden_size``",
    )
    + r"""
    Examples::

        >>> rnn = GRU(10, 20, 2, format="dense")
        >>> output, h_n = rnn(torch.randn(5, 3, 10))
        >>> h_n.shape
        torch.Size([2, 3, 20])
"""
)

RNN_DOC = (
    r"""A multi-layer Elman RNN (``tanh`` or ``relu``) with compressed weights; drop-in for
    ``torch.nn.RNN``: ``h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``.
"""
    + ARGS_DOC.format(
        extra_args="nonlinearity: ``'tanh'`` or ``'relu'``. Default: ``'tanh'``.\n        ",
        proj_arg="",
    )
    + IO_DOC.format(
        hx_in="h_0",
        hx_doc="- **h_0**: ``(D*num_layers, H_out)`` or ``(D*num_layers, N, H_out)``; "
        "zeros if omitted.",
        hx_out="h_n",
        hn_doc="- **h_n**: final hidden state of every layer and direction, shaped as h_0.",
        h_out="``hidden_size``",
    )
    + r"""
    Examples::

        >>> rnn = RNN(10, 20, 2, nonlinearity="relu", format="dense")
        >>> output, h_n = rnn(torch.randn(5, 3, 10))
        >>> output.shape
        torch.Size([5, 3, 20])
"""
)
