"""QuantStub, DeQuantStub, QuantWrapper, FloatFunctional: torch.ao's behaviour and attributes."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from minqat.prepare import prepare
from minqat.qconfig import default_qconfig, get_default_qat_qconfig
from minqat.stubs import DeQuantStub, FloatFunctional, QuantStub, QuantWrapper

from .oracle import assert_bit_exact, requires_ao


class Count(nn.Module):
    """Stands in for an observer: counts calls and marks the tensor it saw."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * 10


def test_stubs_are_the_identity_and_take_a_qconfig_only_when_given():
    x = torch.randn(3)
    for stub_cls in (QuantStub, DeQuantStub):
        assert stub_cls()(x) is x
        assert not hasattr(stub_cls(), "qconfig")  # so propagation fills it in from the parent
        assert not hasattr(stub_cls(None), "qconfig")
        assert stub_cls(default_qconfig).qconfig is default_qconfig


def test_quant_wrapper_runs_quant_module_dequant_and_copies_qconfig_and_mode():
    order = []
    inner = nn.ReLU().eval()
    inner.qconfig = default_qconfig
    wrapper = QuantWrapper(inner)
    for name in ("quant", "module", "dequant"):
        getattr(wrapper, name).register_forward_hook(lambda m, i, o, name=name: order.append(name))
    assert torch.equal(wrapper(torch.tensor([-1.0, 2.0])), torch.tensor([0.0, 2.0]))
    assert order == ["quant", "module", "dequant"]
    assert wrapper.quant.qconfig is default_qconfig and wrapper.dequant.qconfig is default_qconfig
    assert not wrapper.training and not wrapper.quant.training
    assert [name for name, _ in wrapper.named_children()] == ["quant", "dequant", "module"]


def test_float_functional_observes_the_ops_torch_ao_observes():
    f = FloatFunctional()
    f.activation_post_process = Count()
    x, y = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 1.0]])
    observed = {
        "add": (f.add(x, y), x + y),
        "mul": (f.mul(x, y), x * y),
        "cat": (f.cat([x, y], dim=1), torch.cat([x, y], dim=1)),
        "add_relu": (f.add_relu(x, y), torch.relu(x + y)),
        "matmul": (f.matmul(x, y.T), x @ y.T),
    }
    for name, (got, plain) in observed.items():
        assert torch.equal(got, plain * 10), name  # went through activation_post_process
    assert f.activation_post_process.calls == 5
    assert torch.equal(f.add_scalar(x, 2.0), x + 2.0)  # scalar ops are not observed (torch.ao)
    assert torch.equal(f.mul_scalar(x, 2.0), x * 2.0)
    assert f.activation_post_process.calls == 5


def test_float_functional_forward_is_an_error():
    with pytest.raises(RuntimeError, match=r"FloatFunctional is not meant to be called: use one of its ops"):
        FloatFunctional()(torch.zeros(1))


@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**16))
def test_float_functional_is_bitwise_the_torch_op_before_preparation(rows, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(rows, cols, generator=gen), torch.randn(rows, cols, generator=gen)
    f = FloatFunctional()
    assert_bit_exact(f.add(x, y), torch.add(x, y), "add")
    assert_bit_exact(f.mul(x, y), torch.mul(x, y), "mul")
    assert_bit_exact(f.add_relu(x, y), torch.relu(torch.add(x, y)), "add_relu")
    assert_bit_exact(f.matmul(x, y.T), torch.matmul(x, y.T), "matmul")
    assert_bit_exact(f.cat([x, y], dim=1), torch.cat([x, y], dim=1), "cat")


@requires_ao
def test_same_attributes_and_state_dict_as_torch_ao():
    import torch.ao.nn.quantized as tnnq
    import torch.ao.quantization as tq

    pairs = [(QuantStub(), tq.QuantStub()), (DeQuantStub(), tq.DeQuantStub()),
             (QuantWrapper(nn.Linear(2, 2)), tq.QuantWrapper(nn.Linear(2, 2))), (FloatFunctional(), tnnq.FloatFunctional())]
    for ours, theirs in pairs:
        assert [(n, type(m).__name__) for n, m in ours.named_modules()] == \
               [(n, type(m).__name__) for n, m in theirs.named_modules()]
        assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours_f, theirs_f = FloatFunctional(), tnnq.FloatFunctional()
    ours_f.qconfig, theirs_f.qconfig = get_default_qat_qconfig("fbgemm"), tq.get_default_qat_qconfig("fbgemm")
    ours_p, theirs_p = prepare(nn.Sequential(ours_f)), tq.prepare(nn.Sequential(theirs_f))
    ours_state, theirs_state = ours_p.state_dict(), theirs_p.state_dict()
    assert ours_state.keys() == theirs_state.keys()
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    for op in ("add", "mul", "add_relu"):
        assert_bit_exact(getattr(ours_p[0], op)(x, y), getattr(theirs_p[0], op)(x, y), op)
    for key in ours_state:
        assert_bit_exact(ours_p.state_dict()[key], theirs_p.state_dict()[key], key)
