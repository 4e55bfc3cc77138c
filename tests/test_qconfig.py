"""minqat.qconfig: the defaults carry torch 2.13's settings; QConfig behaves like torch's."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import minqat.qconfig as mq
from minqat.dtypes import plain_dtype
from minqat.fake_quantize import FakeQuantize, FusedMovingAvgObsFakeQuantize
from tests.oracle import ao, requires_ao

OBSERVER_FIELDS = ["quant_min", "quant_max", "qscheme", "reduce_range", "has_customized_qrange", "is_dynamic",
                   "averaging_constant", "ch_axis", "bins", "upsample_rate", "dst_nbins"]


def describe(module: nn.Module) -> dict:
    """The settings that define an observer or fake quant, in a form comparable across libraries."""
    info = {"class": type(module).__name__}
    if hasattr(module, "activation_post_process"):  # a fake quant
        for field in ("quant_min", "quant_max", "qscheme", "ch_axis", "is_per_channel", "is_dynamic"):
            info[field] = getattr(module, field)
        info["dtype"] = plain_dtype(module.dtype)
        info["flag dtype"] = module.fake_quant_enabled.dtype
        info["observer"] = describe(module.activation_post_process)
        return info
    for field in OBSERVER_FIELDS:
        if hasattr(module, field):
            info[field] = getattr(module, field)
    if hasattr(module, "dtype"):
        info["dtype"] = plain_dtype(module.dtype)
    if hasattr(module, "eps"):
        info["eps"] = module.eps.tolist()
    return info


def build(factory):
    return None if factory is None else factory()


# ----------------------------------------------------------------------------------------------
# equivalence with torch.ao
# ----------------------------------------------------------------------------------------------


@requires_ao
@pytest.mark.parametrize("backend", mq.BACKENDS)
@pytest.mark.parametrize("version", [0, 1])
def test_default_qat_qconfig_matches_torch(backend, version):
    ours, theirs = mq.get_default_qat_qconfig(backend, version), ao().get_default_qat_qconfig(backend, version)
    for role in ("activation", "weight"):
        assert describe(getattr(ours, role)()) == describe(getattr(theirs, role)()), role


@requires_ao
@pytest.mark.parametrize("backend", mq.BACKENDS)
def test_default_qconfig_matches_torch(backend):
    ours, theirs = mq.get_default_qconfig(backend), ao().get_default_qconfig(backend)
    for role in ("activation", "weight"):
        assert describe(getattr(ours, role)()) == describe(getattr(theirs, role)()), role


def _torch_names():
    """Every public name of minqat.qconfig that torch.ao also exposes (the qconfig module or the package)."""
    names = [n for n in mq.__all__ if n not in ("QConfig", "BACKENDS", "get_default_qconfig",
                                                  "get_default_qat_qconfig")]
    return names


@requires_ao
@pytest.mark.parametrize("name", _torch_names())
def test_named_defaults_match_torch(name):
    import torch.ao.quantization.observer as tobs

    theirs = getattr(ao(), name, None) or getattr(tobs, name)
    ours = getattr(mq, name)
    if isinstance(theirs, tuple):  # a QConfig
        assert isinstance(ours, mq.QConfig)
        for role in ("activation", "weight"):
            assert describe(build(getattr(ours, role))) == describe(build(getattr(theirs, role))), role
    else:
        assert describe(ours()) == describe(theirs())


@requires_ao
def test_the_documented_settings():
    """The table of numerics.md §4.3, checked directly."""
    act = mq.get_default_qat_qconfig("x86").activation()
    weight = mq.get_default_qat_qconfig("x86").weight()
    assert isinstance(act, FusedMovingAvgObsFakeQuantize) and (act.quant_min, act.quant_max) == (0, 127)
    assert act.activation_post_process.averaging_constant == 0.01
    assert weight.activation_post_process.averaging_constant == 0.01  # not "memoryless"
    assert weight.qscheme == torch.per_channel_symmetric and weight.ch_axis == 0
    assert weight.activation_post_process.eps.item() == 2**-23
    v0 = mq.get_default_qat_qconfig("qnnpack", 0)
    assert isinstance(v0.activation(), FakeQuantize) and not isinstance(v0.activation(), FusedMovingAvgObsFakeQuantize)
    assert v0.weight().qscheme == torch.per_tensor_symmetric
    assert mq.fused_wt_fake_quant_range_neg_127_to_127().activation_post_process.eps.item() == 2**-12


# ----------------------------------------------------------------------------------------------
# QConfig itself and bad arguments
# ----------------------------------------------------------------------------------------------


def test_qconfig_is_a_tuple_of_factories():
    qconfig = mq.QConfig(activation=mq.default_fake_quant, weight=mq.default_weight_fake_quant)
    act, weight = qconfig
    assert act is mq.default_fake_quant and weight is mq.default_weight_fake_quant
    assert qconfig._fields == ("activation", "weight")
    assert qconfig.activation() is not qconfig.activation()  # a fresh module per call
    assert mq.QConfig(activation=nn.Identity, weight=None).weight is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(activation=FakeQuantize(), weight=None), "activation must be a class or a .with_args"),
    (dict(activation=nn.Identity, weight=nn.Identity()), "weight must be a class or a .with_args"),
    (dict(activation=3, weight=None), "activation must be callable or None"),
])
def test_qconfig_rejects_instances(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mq.QConfig(**kwargs)


def test_bad_backend_and_version():
    with pytest.raises(ValueError, match="backend must be one of 'x86', 'fbgemm', 'qnnpack', 'onednn'"):
        mq.get_default_qat_qconfig("tpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        mq.get_default_qconfig("arm")
    with pytest.raises(ValueError, match="version must be 0 or 1"):
        mq.get_default_qat_qconfig("x86", 2)
    with pytest.raises(ValueError, match="version must be 0 for get_default_qconfig"):
        mq.get_default_qconfig("x86", 1)


def test_x86_and_fbgemm_agree():
    for version in (0, 1):
        a, b = mq.get_default_qat_qconfig("x86", version), mq.get_default_qat_qconfig("fbgemm", version)
        assert describe(a.activation()) == describe(b.activation())
        assert describe(a.weight()) == describe(b.weight())
