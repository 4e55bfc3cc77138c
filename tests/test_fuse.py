"""fuse_modules / fuse_modules_qat: structure and folded weights equal torch.ao's; names and errors."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import minqat.nn.intrinsic as mni
from minqat.fuse import FUSION_PATTERNS, fuse_known_modules, fuse_modules, fuse_modules_qat

from .oracle import ao, assert_bit_exact, requires_ao

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def _randomize_bn(bn: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial running statistics and affine parameters (incl. a zero γ and a tiny variance)."""
    c = bn.num_features
    bn.running_mean.copy_(torch.randn(c, generator=gen))
    bn.running_var.copy_(torch.rand(c, generator=gen) * 3 + torch.tensor([1e-7] + [0.0] * (c - 1)))
    if bn.affine:
        with torch.no_grad():
            bn.weight.copy_(torch.randn(c, generator=gen))
            bn.weight[-1] = 0.0
            bn.bias.copy_(torch.randn(c, generator=gen))


class Chain(nn.Module):
    """``a -> b (-> c)`` as named attributes, the shape every fusion test uses."""

    def __init__(self, *mods: nn.Module):
        super().__init__()
        for name, mod in zip("abc", mods):
            self.add_module(name, mod)

    def forward(self, x):
        for mod in self.children():
            x = mod(x)
        return x


def _names(mods) -> list[str]:
    return [type(m).__name__ for m in mods]


# --- the pattern table ---------------------------------------------------------------------------


def _example(types: tuple[type, ...]) -> list[nn.Module]:
    """One small module per type, with matching channel counts."""
    mods = []
    for t in types:
        if t in (nn.Linear,):
            mods.append(t(3, 4))
        elif t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            mods.append(t(4))
        elif t is nn.ReLU:
            mods.append(t())
        else:  # conv or transposed conv
            mods.append(t(2, 4, 1))
    return mods


@requires_ao
@pytest.mark.parametrize("types", list(FUSION_PATTERNS), ids=lambda ts: "-".join(t.__name__ for t in ts))
def test_every_pattern_fuses_like_torch_ao(types):
    tq = ao()
    is_transpose = types[0] in CONV_T.values()
    for is_qat in (False, True):
        if is_qat and is_transpose:
            continue
        mods = _example(types)
        model = Chain(*mods).train(is_qat)
        names = list("abc"[: len(types)])
        ours = (fuse_modules_qat if is_qat else fuse_modules)(model, names)
        theirs = (tq.fuse_modules_qat if is_qat else tq.fuse_modules)(model, names)
        assert _names(ours.children()) == _names(theirs.children())
        assert _names(ours.a.children()) == _names(theirs.a.children())
        assert type(ours.a).__module__.startswith(("minqat", "torch.nn"))
        ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
        assert ours_state.keys() == theirs_state.keys()
        for key in ours_state:
            assert_bit_exact(ours_state[key], theirs_state[key], key)


def test_qat_fusion_keeps_the_very_same_modules():
    conv, bn, relu = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()
    model = fuse_modules_qat(Chain(conv, bn, relu).train(), ["a", "b", "c"], inplace=True)
    assert type(model.a) is mni.ConvBnReLU2d
    assert model.a[0] is conv and model.a[1] is bn and model.a[2] is relu
    assert _names([model.b, model.c]) == ["Identity", "Identity"]
    x = torch.randn(2, 1, 5, 5)
    assert torch.equal(model(x), relu(bn(conv(x))))  # same computation, only grouped


# --- eval folding: bit-exact with torch.ao, close to the unfused chain --------------------------


@st.composite
def conv_bn_cases(draw):
    dim = draw(st.sampled_from([1, 2, 3]))
    transpose = draw(st.booleans())
    groups = 1 if transpose else draw(st.sampled_from([1, 2]))  # grouped transposed: error test below
    in_ch, out_ch = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    relu = not transpose and draw(st.booleans())
    return (dim, in_ch, out_ch, draw(st.integers(1, 3)), groups, draw(st.booleans()), draw(st.booleans()),
            draw(st.sampled_from([1e-5, 1e-3, 0.0, 0.1])), transpose, relu, draw(st.integers(0, 2**16)))


def _conv_bn_model(case):
    dim, in_ch, out_ch, kernel, groups, bias, affine, eps, transpose, relu, seed = case
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    conv = (CONV_T if transpose else CONV)[dim](in_ch, out_ch, kernel, groups=groups, bias=bias)
    bn = BN[dim](out_ch, eps=eps, affine=affine)
    _randomize_bn(bn, gen)
    mods = [conv, bn, nn.ReLU()] if relu else [conv, bn]
    return Chain(*mods).eval(), list("abc"[: len(mods)]), (2, in_ch) + (4,) * dim


@requires_ao
@given(conv_bn_cases())
def test_eval_conv_bn_folding_is_bit_exact_with_torch_ao(case):
    model, names, shape = _conv_bn_model(case)
    ours, theirs = fuse_modules(model, names), ao().fuse_modules(model, names)
    conv_ours = ours.a[0] if len(names) == 3 else ours.a
    conv_theirs = theirs.a[0] if len(names) == 3 else theirs.a
    assert type(conv_ours) is type(conv_theirs)
    assert_bit_exact(conv_ours.weight, conv_theirs.weight, "folded weight")
    assert_bit_exact(conv_ours.bias, conv_theirs.bias, "folded bias")
    x = torch.randn(shape)
    assert_bit_exact(ours(x), theirs(x), "fused output")


@requires_ao
@given(st.integers(1, 4), st.integers(1, 4), st.booleans(), st.booleans(), st.integers(0, 2**16))
def test_eval_linear_bn_folding_is_bit_exact_with_torch_ao(in_f, out_f, bias, one_feature, seed):
    torch.manual_seed(seed)
    bn = nn.BatchNorm1d(1 if one_feature else out_f)
    _randomize_bn(bn, torch.Generator().manual_seed(seed))
    model = Chain(nn.Linear(in_f, out_f, bias=bias), bn).eval()
    ours, theirs = fuse_modules(model, ["a", "b"]), ao().fuse_modules(model, ["a", "b"])
    assert_bit_exact(ours.a.weight, theirs.a.weight, "folded weight")
    assert_bit_exact(ours.a.bias, theirs.a.bias, "folded bias")


@given(conv_bn_cases())
def test_eval_folding_computes_the_unfused_chain(case):
    """Oracle-free: in float64 the folded conv equals conv -> bn (-> relu) up to rounding."""
    model, names, shape = _conv_bn_model(case)
    model = model.double()
    x = torch.randn(shape, dtype=torch.float64)
    fused = fuse_modules(model, names)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-9, atol=1e-9)
    conv = fused.a[0] if len(names) == 3 else fused.a
    assert conv.weight.dtype == torch.float64 and conv.bias.dtype == torch.float64


def test_eval_folding_by_hand():
    """W_f = W·γ/sqrt(σ²+ε), b_f = (b − μ)·γ/sqrt(σ²+ε) + β with exactly representable numbers."""
    conv = nn.Conv1d(1, 2, 1)
    bn = nn.BatchNorm1d(2, eps=0.0)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[3.0]], [[-2.0]]]))
        conv.bias.copy_(torch.tensor([1.0, 5.0]))
        bn.running_mean.copy_(torch.tensor([3.0, 1.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25]))  # rsqrt: 0.5, 2
        bn.weight.copy_(torch.tensor([2.0, -1.0]))
        bn.bias.copy_(torch.tensor([0.5, 0.0]))
    folded = fuse_modules(Chain(conv, bn).eval(), ["a", "b"]).a
    assert torch.equal(folded.weight.detach().flatten(), torch.tensor([3.0, 4.0]))  # 3·2·0.5, −2·(−1)·2
    assert torch.equal(folded.bias.detach(), torch.tensor([-1.5, -8.0]))  # (1−3)·0.5·2+0.5, (5−1)·2·(−1)


# --- names, lists, inplace, hooks -----------------------------------------------------------------


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer1 = nn.Sequential(Block(), Block())
        self.fc, self.relu = nn.Linear(2, 3), nn.ReLU()

    def forward(self, x):
        return self.relu(self.fc(self.layer1(x).mean((2, 3))))


GROUPS = [["layer1.0.conv1", "layer1.0.bn1", "layer1.0.relu1"], ["layer1.0.conv2", "layer1.0.bn2"],
          ["layer1.1.conv1", "layer1.1.bn1", "layer1.1.relu1"], ["layer1.1.conv2", "layer1.1.bn2"], ["fc", "relu"]]


def _tree(model):
    return [(name, type(m).__name__) for name, m in model.named_modules()]


@requires_ao
@pytest.mark.parametrize("is_qat", [False, True])
def test_nested_names_and_lists_of_lists_match_torch_ao(is_qat):
    torch.manual_seed(0)
    model = Net().train(is_qat)
    for block in model.layer1:
        _randomize_bn(block.bn1, torch.Generator().manual_seed(1))
    ours = (fuse_modules_qat if is_qat else fuse_modules)(model, GROUPS)
    theirs = (ao().fuse_modules_qat if is_qat else ao().fuse_modules)(model, GROUPS)
    assert _tree(ours) == _tree(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(2, 2, 5, 5)
    assert_bit_exact(ours.eval()(x), theirs.eval()(x), "fused model output")


def test_single_list_equals_list_of_one_list_and_inplace_semantics():
    model = Net().eval()
    a = fuse_modules(model, GROUPS[0])
    b = fuse_modules(model, [GROUPS[0]])
    assert _tree(a) == _tree(b)
    assert type(model.layer1[0].bn1) is nn.BatchNorm2d  # not inplace: the model is untouched
    out = fuse_modules(model, GROUPS, inplace=True)
    assert out is model and type(model.layer1[0].bn1) is nn.Identity
    assert model.layer1[0].bn1.training is False  # each Identity takes the first module's mode


def test_hooks_move_to_the_fused_module_and_run_once():
    calls = []
    conv, bn, relu = nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.ReLU()
    conv.register_forward_pre_hook(lambda m, inp: calls.append("pre"))
    relu.register_forward_hook(lambda m, inp, out: calls.append("post"))
    for fuse, mode in ((fuse_modules_qat, True), (fuse_modules, False)):
        calls.clear()
        model = fuse(Chain(conv, bn, relu).train(mode), ["a", "b", "c"])
        assert len(model.a._forward_pre_hooks) == 1 and len(model.a._forward_hooks) == 1
        model(torch.randn(2, 1, 3, 3))
        # torch.ao's eval fusion runs the pre-hook twice (its deep copy of the conv keeps it too)
        assert calls == ["pre", "post"]


def test_hooks_with_kwargs_keep_their_flavour():
    seen = []
    conv = nn.Conv2d(1, 1, 1)
    conv.register_forward_pre_hook(lambda m, args, kwargs: seen.append(sorted(kwargs)), with_kwargs=True)
    model = fuse_modules_qat(Chain(conv, nn.ReLU()).train(), ["a", "b"])
    model.a(torch.randn(1, 1, 2, 2))
    assert seen == [[]]


def test_custom_fuser_mapping_and_fuser_func():
    def fuse_conv_relu6(is_qat, conv, relu6):
        return nn.Sequential(conv, relu6)

    custom = {"additional_fuser_method_mapping": {(nn.Conv2d, nn.ReLU6): fuse_conv_relu6}}
    model = fuse_modules_qat(Chain(nn.Conv2d(1, 1, 1), nn.ReLU6()), ["a", "b"], fuse_custom_config_dict=custom)
    assert _names(model.children()) == ["Sequential", "Identity"]
    model = fuse_modules(Chain(nn.Conv2d(1, 1, 1), nn.ReLU()).eval(), ["a", "b"], fuser_func=fuse_known_modules)
    assert type(model.a) is mni.ConvReLU2d and model.a.training is False
    conv = nn.Conv2d(1, 1, 1)
    conv.register_forward_pre_hook(lambda m, i: None)
    model = fuse_modules(Chain(conv, nn.ReLU()), ["a", "b"], fuser_func=lambda mods, is_qat, extra: [mods[0], nn.Identity()])
    assert model.a._forward_pre_hooks and type(model.b) is nn.Identity  # a fuser may return its input


def test_fuse_modules_qat_accepts_an_eval_model_like_torch_ao():
    model = fuse_modules_qat(Chain(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)).eval(), ["a", "b"])
    assert type(model.a) is mni.ConvBn2d and not model.a.training and not model.a[1].training


# --- errors -----------------------------------------------------------------------------------------


def test_missing_name_names_the_path_and_lists_the_children():
    with pytest.raises(ValueError, match=r"names 'layer1.0.conv9', but 'layer1.0' \(Block\) has no submodule "
                                         r"'conv9'; its children are: 'conv1', 'bn1', 'relu1', 'conv2', 'bn2'"):
        fuse_modules_qat(Net().train(), [["layer1.0.conv9", "layer1.0.bn1"]])
    with pytest.raises(ValueError, match=r"but the model \(Net\) has no submodule 'layer2'; its children are: "
                                         r"'layer1', 'fc', 'relu'"):
        fuse_modules(Net().eval(), ["layer2.0.conv1", "layer2.0.bn1"])


def test_unsupported_sequence_names_paths_types_and_patterns():
    with pytest.raises(ValueError, match=r"cannot fuse 'layer1.0.bn1' \(BatchNorm2d\), 'layer1.0.conv1' \(Conv2d\): "
                                         r"no fusion pattern for \(BatchNorm2d, Conv2d\); supported patterns: "
                                         r"\(Conv1d, BatchNorm1d\); .*\(Linear, ReLU\)"):
        fuse_modules_qat(Net().train(), ["layer1.0.bn1", "layer1.0.conv1"])


def test_fuse_modules_needs_eval_mode_for_batchnorm():
    with pytest.raises(ValueError, match=r"cannot fuse 'a' \(Conv2d\), 'b' \(BatchNorm2d\): fuse_modules folds "
                                         r"BatchNorm .* needs a model in eval mode .*or use fuse_modules_qat"):
        fuse_modules(Chain(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)).train(), ["a", "b"])
    with pytest.raises(ValueError, match=r"'a' \(Linear\), 'b' \(BatchNorm1d\): fuse_modules folds BatchNorm"):
        fuse_modules(Chain(nn.Linear(1, 2), nn.BatchNorm1d(2)).train(), ["a", "b"])


def test_mixed_modes_are_an_error():
    model = Chain(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.ReLU()).train()
    model.b.eval()
    with pytest.raises(ValueError, match=r"must all be in train mode or all in eval mode, got Conv2d train, "
                                         r"BatchNorm2d eval, ReLU train"):
        fuse_modules_qat(model, ["a", "b", "c"])


def test_bn_without_running_stats_names_the_module_path():
    model = Net().train()
    model.layer1[1].bn1 = nn.BatchNorm2d(2, track_running_stats=False)
    with pytest.raises(ValueError, match=r"cannot fuse 'layer1.1.conv1' \(Conv2d\), 'layer1.1.bn1' \(BatchNorm2d\), "
                                         r"'layer1.1.relu1' \(ReLU\): BatchNorm2d must have track_running_stats=True"):
        fuse_modules_qat(model, GROUPS)
    with pytest.raises(ValueError, match=r"'layer1.1.bn1' \(BatchNorm2d\).*track_running_stats=True"):
        fuse_modules(model.eval(), GROUPS)


def test_bn_shape_and_affine_errors():
    with pytest.raises(ValueError, match=r"BatchNorm2d.num_features must equal the layer's 2 output channels, got 3"):
        fuse_modules_qat(Chain(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(3)), ["a", "b"])
    with pytest.raises(ValueError, match=r"BatchNorm2d must have affine=True .*got affine=False"):
        fuse_modules_qat(Chain(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, affine=False)), ["a", "b"])
    with pytest.raises(ValueError, match=r"BatchNorm1d must have affine=True"):
        fuse_modules(Chain(nn.Linear(1, 2), nn.BatchNorm1d(2, affine=False)).eval(), ["a", "b"])
    with pytest.raises(ValueError, match=r"ConvTranspose \+ BatchNorm cannot be fused for QAT"):
        fuse_modules_qat(Chain(nn.ConvTranspose2d(1, 2, 1), nn.BatchNorm2d(2)), ["a", "b"])
    with pytest.raises(ValueError, match=r"folding BatchNorm into a grouped ConvTranspose2d is not supported, got groups=2"):
        fuse_modules(Chain(nn.ConvTranspose2d(2, 2, 1, groups=2), nn.BatchNorm2d(2)).eval(), ["a", "b"])


def test_bad_modules_to_fuse_arguments():
    model = Chain(nn.Linear(1, 1), nn.ReLU())
    for bad in ("a", [], None):
        with pytest.raises(ValueError, match="modules_to_fuse must be a non-empty list of names"):
            fuse_modules_qat(model, bad)
    with pytest.raises(ValueError, match="modules_to_fuse must not contain an empty group"):
        fuse_modules_qat(model, [["a", "b"], []])
    with pytest.raises(ValueError, match="every group must be a list of names, got 3"):
        fuse_modules_qat(model, [["a", "b"], 3])
    with pytest.raises(ValueError, match=r"dotted submodule names such as 'layer1.0.conv1', got 3"):
        fuse_modules_qat(model, [["a", 3]])
    with pytest.raises(ValueError, match=r"fuser_func must return one module per input module \(2\), got 1"):
        fuse_modules_qat(model, ["a", "b"], fuser_func=lambda mods, is_qat, extra: [mods[0]])


def test_fused_model_deepcopies():
    model = fuse_modules_qat(Net().train(), GROUPS)
    clone = copy.deepcopy(model)
    assert _tree(clone) == _tree(model)
