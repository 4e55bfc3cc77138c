r"""Folding BatchNorm into the preceding convolution or linear layer (pure functions).

In inference BatchNorm is an affine map per output channel ``c`` with frozen statistics, so it can
be merged into the weights of the layer before it. For a convolution (or linear layer)
``y = W * x + b`` followed by BN with running mean ``μ``, running variance ``σ²``, ``eps`` ``ε``,
weight ``γ`` and bias ``β``:

.. code-block:: text

    BN(y)_c = γ_c · (y_c − μ_c) / sqrt(σ²_c + ε) + β_c
            = γ_c · (W_c * x + b_c − μ_c) / sqrt(σ²_c + ε) + β_c
            = (W_c · s_c) * x + ((b_c − μ_c) · s_c + β_c)        with s_c = γ_c / sqrt(σ²_c + ε)

    ⇒  W_f = W · γ / sqrt(σ² + ε)          (every weight of output channel c scaled by s_c)
        b_f = (b − μ) · γ / sqrt(σ² + ε) + β

Only the running statistics can be folded: in training BN uses the statistics of the current batch,
which are not known until the layer has run (see ``minqat.nn.intrinsic.qat.conv_bn`` for how QAT
handles that). A missing conv bias counts as ``b = 0``, a missing ``γ`` as 1 and ``β`` as 0.

Bit-exactness (numerics.md §5.4, §9 item 10): these functions reproduce
``torch.nn.utils.fusion.fuse_conv_bn_weights`` / ``fuse_linear_bn_weights`` bit for bit, which is what
torch.ao's ``to_float()`` and ``convert()`` use. That requires ``r = torch.rsqrt(σ² + ε)`` (not
``1 / sqrt``: they differ on ~13 % of float32 inputs) and torch's association of the products:

.. code-block:: text

    conv:    W_f = W * (γ * r)              b_f = ((b − μ) * r) * γ + β
    linear:  s = γ * r,  W_f = W * s[:, None],  b_f = (b − μ) * s + β

The results are cast back to the dtypes of the original weight and bias and returned as new
``nn.Parameter`` objects whose ``requires_grad`` copies the weight's and the bias's (a missing bias
gives a bias Parameter with ``requires_grad=False``, as torch does).

Note that the QAT modules scale their weights by ``γ / sqrt(σ² + ε)`` (a division) during training,
which differs from the folded ``W * (γ * rsqrt(σ² + ε))`` by a few ulp on ~31 % of elements.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

__all__ = ["fuse_conv_bn_weights", "fuse_linear_bn_weights"]


def _check_tensor(value, name: str, numel: tuple[int, ...]) -> None:
    """``value`` must be a 1-D tensor with one of the element counts in ``numel``."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(value).__name__}")
    if value.dim() != 1 or value.numel() not in numel:
        want = " or ".join(str(n) for n in numel)
        raise ValueError(f"{name} must be a 1-D tensor of {want} elements, got shape {tuple(value.shape)}")


def _check_bn_args(bn_rm, bn_rv, bn_eps, bn_w, bn_b, numel: tuple[int, ...]) -> None:
    for name, value in (("bn_rm", bn_rm), ("bn_rv", bn_rv)):
        _check_tensor(value, name, numel)
    for name, value in (("bn_w", bn_w), ("bn_b", bn_b)):
        if value is not None:
            _check_tensor(value, name, numel)
    bad = isinstance(bn_eps, bool) or not isinstance(bn_eps, numbers.Real)
    if bad or not (math.isfinite(bn_eps) and bn_eps >= 0):
        raise ValueError(f"bn_eps must be a finite non-negative number, got {bn_eps!r}")


def fuse_conv_bn_weights(
    conv_w: torch.Tensor,
    conv_b: torch.Tensor | None,
    bn_rm: torch.Tensor,
    bn_rv: torch.Tensor,
    bn_eps: float,
    bn_w: torch.Tensor | None,
    bn_b: torch.Tensor | None,
    transpose: bool = False,
) -> tuple[nn.Parameter, nn.Parameter]:
    r"""Fold BN's running statistics and affine parameters into a convolution's weight and bias.

    ``W_f = W * (γ * rsqrt(σ² + ε))`` per output channel and ``b_f = ((b − μ) * rsqrt(σ² + ε)) * γ + β``
    (module docstring; numerics.md §5.4). The output channel is dim 0 of ``conv_w``, or dim 1 when
    ``transpose=True`` (``ConvTranspose`` weights are ``(in, out / groups, *kernel)``). Bit-exact
    with ``torch.nn.utils.fusion.fuse_conv_bn_weights``.

    Args:
        conv_w: conv weight ``(C_out, C_in / groups, *kernel)``.
        conv_b: conv bias ``(C_out,)`` or None (counts as zeros).
        bn_rm, bn_rv: BN running mean and running variance ``(C_out,)``.
        bn_eps: BN epsilon (added to ``bn_rv`` in the tensor's dtype).
        bn_w, bn_b: BN weight γ and bias β ``(C_out,)``, or None (γ = 1, β = 0).
        transpose: scale dim 1 instead of dim 0 (transposed convolutions).

    Returns:
        ``(weight, bias)`` as new ``nn.Parameter`` s in the dtypes of ``conv_w`` and ``conv_b``.

    >>> w = torch.ones(2, 1, 1, 1)
    >>> rm, rv = torch.tensor([1.0, -1.0]), torch.tensor([3.0, 0.0])
    >>> gamma, beta = torch.tensor([2.0, 0.5]), torch.tensor([0.0, 1.0])
    >>> wf, bf = fuse_conv_bn_weights(w, None, rm, rv, 1.0, gamma, beta)   # rsqrt(4) = 0.5, rsqrt(1) = 1
    >>> wf.detach().flatten(), bf.detach()                      # b_f = (0 − μ)·r·γ + β
    (tensor([1.0000, 0.5000]), tensor([-1.0000,  1.5000]))
    """
    if not isinstance(conv_w, torch.Tensor) or conv_w.dim() < 2:
        shape = tuple(conv_w.shape) if isinstance(conv_w, torch.Tensor) else type(conv_w).__name__
        raise ValueError(f"conv_w must be a conv weight tensor with at least 2 dims, got {shape}")
    channels = conv_w.shape[1 if transpose else 0]
    if conv_b is not None:
        _check_tensor(conv_b, "conv_b", (channels,))
    _check_bn_args(bn_rm, bn_rv, bn_eps, bn_w, bn_b, (channels,))

    conv_weight_dtype = conv_w.dtype
    conv_bias_dtype = conv_b.dtype if conv_b is not None else conv_weight_dtype
    if conv_b is None:
        conv_b = torch.zeros_like(bn_rm)
    if bn_w is None:
        bn_w = torch.ones_like(bn_rm)
    if bn_b is None:
        bn_b = torch.zeros_like(bn_rm)
    r = torch.rsqrt(bn_rv + bn_eps)  # rsqrt, not 1/sqrt: numerics §5.4

    shape = [1, -1] if transpose else [-1, 1]
    shape += [1] * (conv_w.dim() - 2)  # (C, 1, 1, 1) or (1, C, 1, 1)
    fused_w = (conv_w * (bn_w * r).reshape(shape)).to(dtype=conv_weight_dtype)
    fused_b = ((conv_b - bn_rm) * r * bn_w + bn_b).to(dtype=conv_bias_dtype)  # ((b − μ)·r)·γ + β
    return nn.Parameter(fused_w, conv_w.requires_grad), nn.Parameter(fused_b, conv_b.requires_grad)


def fuse_linear_bn_weights(
    linear_w: torch.Tensor,
    linear_b: torch.Tensor | None,
    bn_rm: torch.Tensor,
    bn_rv: torch.Tensor,
    bn_eps: float,
    bn_w: torch.Tensor,
    bn_b: torch.Tensor,
) -> tuple[nn.Parameter, nn.Parameter]:
    r"""Fold BN's running statistics and affine parameters into a linear layer's weight and bias.

    ``s = γ * rsqrt(σ² + ε)``, ``W_f = W * s[:, None]``, ``b_f = (b − μ) * s + β`` — note the
    association differs from the conv version (numerics.md §5.4). ``s`` is cast to the weight's
    dtype *before* the multiplication, as torch does. BN may have ``out_features`` or 1 features
    (broadcast), like ``torch.nn.utils.fusion.fuse_linear_bn_eval`` allows. Unlike the conv version,
    ``bn_w`` and ``bn_b`` are required. Bit-exact with ``torch.nn.utils.fusion.fuse_linear_bn_weights``.

    >>> w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    >>> b = torch.tensor([1.0, 1.0])
    >>> rm, rv = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 3.0])
    >>> wf, bf = fuse_linear_bn_weights(w, b, rm, rv, 1.0, torch.tensor([1.0, 4.0]), torch.zeros(2))
    >>> wf.detach(), bf.detach()                               # s = [1, 4 * 0.5] = [1, 2]
    (tensor([[1., 2.],
            [6., 8.]]), tensor([ 0., -4.]))
    """
    if not isinstance(linear_w, torch.Tensor) or linear_w.dim() != 2:
        shape = tuple(linear_w.shape) if isinstance(linear_w, torch.Tensor) else type(linear_w).__name__
        raise ValueError(f"linear_w must be a 2-D weight tensor (out_features, in_features), got {shape}")
    out_features = linear_w.shape[0]
    if linear_b is not None:
        _check_tensor(linear_b, "linear_b", (out_features,))
    if bn_w is None or bn_b is None:
        raise ValueError("bn_w and bn_b must be tensors (BatchNorm with affine=True), got None")
    _check_bn_args(bn_rm, bn_rv, bn_eps, bn_w, bn_b, (out_features, 1))

    linear_weight_dtype = linear_w.dtype
    linear_bias_dtype = linear_b.dtype if linear_b is not None else linear_weight_dtype
    if linear_b is None:
        linear_b = torch.zeros_like(bn_rm)
    s = bn_w * torch.rsqrt(bn_rv + bn_eps)  # rsqrt, not 1/sqrt: numerics §5.4

    fused_w = linear_w * s.unsqueeze(-1).to(dtype=linear_weight_dtype)  # (out, 1) broadcast over in
    fused_b = ((linear_b - bn_rm) * s + bn_b).to(dtype=linear_bias_dtype)
    return nn.Parameter(fused_w, linear_w.requires_grad), nn.Parameter(fused_b, linear_b.requires_grad)
