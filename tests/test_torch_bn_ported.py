"""PyTorch's own BatchNorm tests from ``test/test_nn.py``, ported to run on torch.nn and bnlab.nn.

Source: pytorch/pytorch ``test/test_nn.py`` (classes ``TestNN`` and ``TestNNDeviceType``, the
tests whose name contains "batchnorm"/"BatchNorm", plus the tests of any class that build a
BatchNorm module whatever their name, listed below). Source version: the 640,159-character file
at commit 74f2fa66. A first pass read the character ranges 0-16k, 160k-176k, 208k-256k,
336k-464k, 480k-560k and 576k-592k; a second pass read the rest (16k-160k, 176k-208k, 256k-336k,
464k-480k, 560k-576k and 592k-640,159) and also took tests of any class there that build a
BatchNorm module whatever their name: ``TestNN.test_state_dict``,
``TestFusionUtils.test_fuse_conv_bn_requires_grad``,
``TestFusionUtils.test_fuse_linear_bn_requires_grad`` and
``TestUtils.test_consume_prefix_in_state_dict_if_present``; no test in the second-pass ranges has
"batchnorm" in its name, and the other tests there build no BatchNorm. A third pass re-read the
first-pass ranges for tests that build or use a BatchNorm module whatever their name and found one
more, ``TestFusionEval.test_fuse_module_eval_numerics`` (ported below); the others there that
touch BatchNorm are the ``module_tests``/``get_new_module_tests`` loop (see "Skipped") and the
InstanceNorm tests (InstanceNorm is not a BatchNorm). With the second pass, the whole file
has now been read for both criteria.

Each port copies the source test's inputs, shapes and tolerances (not its code) and names the
source test in a comment above it. Every test runs on both implementations through
``IMPLS[lib]``: on bnlab as one item per parameter set, and on torch (which proves the port) all
at once in ``test_port_on_torch``, marked ``port``. Where bnlab differs on purpose (documented in
the README), the bnlab branch asserts bnlab's behaviour with a "deliberate difference" comment.

CUDA-only tests are ported as CPU variants where their logic does not depend on the device:
``test_batchnorm_cudnn_half`` (its non-cuDNN half part),
``test_batchnorm_nonaffine_cuda_half_input``,
``test_batchnorm_nhwc_cuda``, ``test_batchnorm_cudnn_nhwc`` (channels_last vs contiguous),
``test_batchnorm_large_batch``, ``test_batchnorm_eval_mixed``, ``test_batchnorm_affine_mixed``,
``test_batchnorm_simple_average_mixed`` and ``test_convert_sync_batchnorm``.

Module ports of tests that call ``F.batch_norm`` directly: the four
``test_batchnorm_raises_error_if_*_is_not_same_size_as_input`` tests put the wrong-sized tensor into
the module's buffer/parameter; ``test_batchnorm_grad`` gradchecks the module through
``torch.func.functional_call`` with the same inputs;
``test_batchnorm_raises_error_if_running_var_or_running_mean_have_forward_grad`` (of
``TestNNDeviceType``) makes the eval-mode layer's buffers the dual tensors.

Partial ports: ``test_state_dict`` keeps the network part (the one holding a BatchNorm2d) and
drops the Linear-only tail; ``test_consume_prefix_in_state_dict_if_present`` drops its "empty
module" case (no BatchNorm) and puts the BatchNorm on ``self`` (the source writes ``net.bn = ...``
inside ``Net.__init__``, which attaches it to the previously built module, so in the source it
never reaches the tested state_dict).

``test_fuse_module_eval_numerics`` replaces its hypothesis draws with five seeded draws from the
same element range (hypothesis is not a dependency here).

Shrunk for speed (< 20 s for the file): ``test_batchnorm_half_overflow`` uses its channel counts
and formats with smaller spatial sizes (the source's 4x80x500x500 half tensors take tens of
seconds on CPU); the overflow it guards against (float16 sums) appears at these sizes too.

Skipped, with reasons:

- ``test_batchnorm`` (the parametrized ``test_batchnorm_{2D,3D}_{train,inference}_NCHW_vs_*``):
  compares the CUDA/cuDNN/MIOpen backends with the CPU or native CUDA backend; CUDA-specific.
- ``test_batch_norm_update_stats``: calls the internal op ``torch.batch_norm_update_stats``.
- ``test_sync_batchnorm_backward_elemt``, ``test_sync_batchnorm_accuracy_cuda``: test the internal
  ops ``torch.batch_norm_backward_elemt`` / ``torch.batch_norm_stats`` of SyncBatchNorm on CUDA.
- ``TestNN`` tests generated from ``common_nn.module_tests`` / ``get_new_module_tests`` (named
  ``test_BatchNorm1d_*`` etc.) live in ``torch/testing/_internal/common_nn.py``, not in
  ``test_nn.py``, and are not ported here.
"""

from collections import OrderedDict
from copy import deepcopy
from itertools import product

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.autograd import gradcheck, gradgradcheck
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights, fuse_linear_bn_weights

import bnlab.nn

from conftest import ported_tests, run_ported_on_torch

IMPLS = {"torch": torch.nn, "bnlab": bnlab.nn}


def eq(actual, expected, atol=None, rtol=None, exact_dtype=True):
    """torch's TestCase.assertEqual for tensors (default tolerances per dtype)."""
    if not exact_dtype:
        expected = expected.to(actual.dtype)
    if atol is None and rtol is None:
        torch.testing.assert_close(actual, expected, equal_nan=True)
    else:
        torch.testing.assert_close(actual, expected, atol=atol or 0, rtol=rtol or 0,
                                   equal_nan=True)


def neq(a, b):
    """torch's TestCase.assertNotEqual for tensors."""
    assert not torch.allclose(a.to(b.dtype), b, equal_nan=True), f"{a} == {b}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _module_empty_input(mod, inp, check_size=True):
    # torch.testing._internal.common_nn._test_module_empty_input, restated.
    inp.requires_grad_(True)
    out = mod(inp)
    gO = torch.rand_like(out)
    out.backward(gO)
    if check_size:
        assert out.size() == inp.size()
    for p in mod.parameters():
        if p.requires_grad:
            eq(p.grad, torch.zeros_like(p.grad))
    eq(inp.grad, torch.zeros_like(inp))


# ---------------------------------------------------------------------------------------------
# TestNN
# ---------------------------------------------------------------------------------------------

# TestNN.test_batchnorm_nhwc_cpu
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("dtype,mixed_dtype", [
    (torch.float, False), (torch.bfloat16, False), (torch.bfloat16, True),
    (torch.float16, False), (torch.float16, True)])  # the source skips mixed for float
def test_batchnorm_nhwc_cpu(lib, dim, dtype, mixed_dtype):
    nn = IMPLS[lib]
    if dim == 2:
        mod, fmt, shapes, precision = (nn.BatchNorm2d, torch.channels_last,
                                       [(4, 8, 10, 10), (4, 1, 9, 9), (4, 9, 1, 1)], None)
    else:
        precision = {torch.float: 1e-4, torch.bfloat16: 1e-4, torch.float16: None}[dtype]
        mod, fmt, shapes = (nn.BatchNorm3d, torch.channels_last_3d,
                            [(4, 8, 2, 10, 10), (4, 1, 2, 9, 9), (4, 9, 1, 1, 1)])
    for size in shapes:
        channels = size[1]
        input = torch.randn(size, dtype=dtype, requires_grad=True)
        input = input.contiguous(memory_format=fmt).to(dtype)
        input.retain_grad()
        grad = torch.randn(size, dtype=dtype).contiguous(memory_format=fmt)
        bn = mod(channels).cpu().to(dtype)
        bn.weight.data.uniform_()
        bn.bias.data.uniform_()
        ref_input = input.detach().clone().contiguous().requires_grad_(True)
        ref_grad = grad.detach().clone().contiguous()
        ref_bn = mod(channels).cpu().to(dtype)
        ref_bn.load_state_dict(bn.state_dict())
        if mixed_dtype:
            bn.float()
            ref_bn.float()
        out = bn(input)
        out.backward(grad)
        ref_out = ref_bn(ref_input)
        ref_out.backward(ref_grad)
        assert out.is_contiguous(memory_format=fmt)
        assert ref_out.is_contiguous()
        eq(out, ref_out)
        eq(bn.weight.grad, ref_bn.weight.grad, atol=precision, rtol=precision)
        eq(bn.bias.grad, ref_bn.bias.grad)
        eq(input.grad, ref_input.grad)


# TestNN.test_batchnorm_half_overflow (spatial sizes shrunk, see module docstring)
def test_batchnorm_half_overflow(lib):
    nn = IMPLS[lib]

    def helper(mod, size, param_dtype, fwd_format, bwd_format):
        channels = size[1]
        input = torch.randn(size, dtype=torch.half)
        input = input.contiguous(memory_format=fwd_format).requires_grad_(True)
        bn = mod(channels).cpu().to(param_dtype)
        out = bn(input)
        ref_input = input.detach().clone().requires_grad_(True)
        ref_bn = mod(channels).cpu().to(torch.float)
        ref_bn.load_state_dict(bn.to(torch.float).state_dict())
        ref_out = ref_bn(ref_input)
        assert not out.isinf().any()
        assert not out.isnan().any()
        eq(out, ref_out)
        if param_dtype != torch.half:
            grad_input = torch.empty(size=ref_out.shape).uniform_(0, 1).to(dtype=torch.half)
            grad_input = grad_input.contiguous(memory_format=bwd_format)
            ref_grad_input = grad_input.clone()
            out.backward(grad_input)
            ref_out.backward(ref_grad_input)
            assert not input.grad.isinf().any()
            assert not input.grad.isnan().any()
            eq(input.grad, ref_input.grad)

    for fmt in [torch.contiguous_format, torch.channels_last]:
        helper(nn.BatchNorm2d, (4, 80, 50, 50), torch.half, fmt, fmt)
    for fmt in [torch.contiguous_format, torch.channels_last_3d]:
        helper(nn.BatchNorm3d, (4, 80, 10, 25, 25), torch.half, fmt, fmt)
    formats2 = [torch.contiguous_format, torch.channels_last]
    formats3 = [torch.contiguous_format, torch.channels_last_3d]
    for f1 in formats2:
        for f2 in formats2:
            helper(nn.BatchNorm2d, (16, 3, 32, 32), torch.float, f1, f2)
    for f1 in formats3:
        for f2 in formats3:
            helper(nn.BatchNorm3d, (16, 20, 8, 8, 8), torch.float, f1, f2)


# TestNN.test_batchnorm_non_contig_cpu (BatchNorm2d subtest; SyncBatchNorm is not a bnlab class)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_batchnorm_non_contig_cpu(lib, dtype):
    nn = IMPLS[lib]
    input = torch.arange(6, dtype=torch.float).reshape(1, 3, 2, 1).cpu()
    input = input.permute(0, 2, 1, 3)
    bn = nn.BatchNorm2d(2).cpu().float().eval()
    bn.weight.data.uniform_()
    bn.bias.data.uniform_()
    ref_input = input.detach().clone().contiguous()
    ref_bn = torch.nn.BatchNorm2d(2).cpu().float().eval()
    ref_bn.load_state_dict(bn.state_dict())
    out = bn(input)
    ref_out = ref_bn(ref_input)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert ref_out.is_contiguous()
    eq(out, ref_out)

    input_bf = torch.arange(24, dtype=dtype).reshape(1, 3, 2, 4)
    input_bf = input_bf.permute(0, 2, 1, 3)
    input_f = input_bf.float()
    bn_mix = nn.BatchNorm2d(2).float().eval()
    ref_bn_f = deepcopy(bn_mix)
    out_bf = bn_mix(input_bf)
    ref_out_bf = ref_bn_f(input_f)
    eq(ref_out_bf, out_bf.float(), atol=0.05, rtol=0.05)


# TestNN.test_batchnorm_cudnn_half (CPU variant of its non-cuDNN half part)
def test_batchnorm_cudnn_half_cpu(lib):
    nn = IMPLS[lib]
    input = torch.randint(1, 10, (2, 3, 2, 2), dtype=torch.half, requires_grad=True)
    m = nn.BatchNorm2d(3).half()
    out = m(input)
    out.sum().backward()
    assert out.dtype == input.dtype and out.type() == input.type()
    assert input.grad is not None and input.grad.dtype == torch.half
    # the cuDNN half of the source compares a float module on the same input
    grad_half = input.grad.clone()
    input.grad = None
    m = m.float()
    out_f = m(input)
    out_f.sum().backward()
    assert out_f.dtype == input.dtype
    eq(out_f, out)
    eq(input.grad, grad_half, atol=1e-3, rtol=0)


# TestNN.test_batchnorm_nonaffine_cuda_half_input (CPU variant)
def test_batchnorm_nonaffine_half_input(lib):
    nn = IMPLS[lib]
    input = torch.randn(16, 3, 24, 24, dtype=torch.half)
    m = nn.BatchNorm2d(3, affine=False).float()  # keep running stats in FP32
    output = m(input)
    assert output.type() == input.type()
    m.eval()
    output = m(input)
    assert output.type() == input.type()


# TestNN.test_batchnorm_raises_error_if_less_than_one_value_per_channel
def test_batchnorm_raises_error_if_less_than_one_value_per_channel(lib):
    nn = IMPLS[lib]
    x = torch.rand(10)[None, :, None]
    with pytest.raises(ValueError):
        nn.BatchNorm1d(10)(x)


# TestNN.test_batchnorm_raises_error_if_{running_mean,running_var,weight,bias}_is_not_same_size_as_input
# (module ports of four tests: the named tensor of the layer gets a wrong size)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
def test_batchnorm_raises_error_if_tensor_is_not_same_size_as_input(lib, training, name):
    nn = IMPLS[lib]
    input = torch.rand(2, 10)
    for size in [9, 11]:
        m = nn.BatchNorm1d(10).train(training)
        m.running_mean, m.running_var = torch.rand(10), torch.rand(10)
        wrong = torch.rand(size)
        setattr(m, name, torch.nn.Parameter(wrong) if name in ("weight", "bias") else wrong)
        with pytest.raises(RuntimeError, match=f"{name} should contain 10 elements not {size}"):
            m(input)
        if lib == "bnlab":  # bnlab's ShapeError is a ValueError too
            with pytest.raises(ValueError, match=f"{name} should contain 10 elements not {size}"):
                m(input)


# TestNNDeviceType.test_batchnorm_raises_error_if_running_var_or_running_mean_have_forward_grad
# (module port: the dual tensors become the input and the eval-mode layer's buffers; the
# source's momentum=-1.2 plays no part in eval and is left out)
# torch's forward AD loads decompositions through torch.jit.script, deprecated in torch 2.13
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_batchnorm_raises_error_if_running_var_or_running_mean_have_forward_grad(lib):
    nn = IMPLS[lib]
    args = (
        torch.randn(3, 2, 5),  # input
        torch.randn(2),  # running_mean
        torch.randn(2),  # running_var
    )
    for dual_indices in ((0,), (1,), (1, 2), (0, 1), (0, 1, 2),):
        tangents = tuple(torch.rand_like(x) for x in args)

        with fwAD.dual_level():
            duals = [fwAD.make_dual(primal, tangent) if i in dual_indices else primal
                     for i, (primal, tangent) in enumerate(zip(args, tangents))]
            m = nn.BatchNorm1d(2).eval()
            m.running_mean, m.running_var = duals[1], duals[2]
            msg = "batch_norm is not differentiable wrt running_mean and running_var"
            # 0 needs to have forward grad because otherwise we won't even run batch_norm_jvp
            if (1 in dual_indices or 2 in dual_indices) and 0 in dual_indices:
                with pytest.raises(RuntimeError, match=msg):
                    m(duals[0])
            else:
                m(duals[0])


# TestNN.test_batchnorm_buffer_update_when_stats_are_not_tracked
def test_batchnorm_buffer_update_when_stats_are_not_tracked(lib):
    nn = IMPLS[lib]
    input_size = (32, 4)
    bn = nn.BatchNorm1d(input_size[1], track_running_stats=True)
    bn.track_running_stats = False
    num_batches = bn.num_batches_tracked.clone()
    running_mean = bn.running_mean.clone()
    running_var = bn.running_var.clone()
    _ = bn(torch.rand(input_size))
    assert torch.equal(num_batches, bn.num_batches_tracked)
    assert torch.equal(running_mean, bn.running_mean)
    assert torch.equal(running_var, bn.running_var)


# TestNN.test_batchnorm_nhwc_cuda (CPU variant)
@pytest.mark.parametrize("dtype", [torch.half, torch.float])
def test_batchnorm_nhwc_eval_cpu(lib, dtype):
    nn = IMPLS[lib]
    N, C, H, W = 2, 64, 50, 50
    model = nn.BatchNorm2d(C, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
    model = model.eval().to(dtype)
    inp1 = torch.randn(N, C, H, W, dtype=dtype)
    inp2 = inp1.contiguous(memory_format=torch.channels_last)
    out1 = model(inp1)
    out2 = model(inp2)
    assert torch.equal(out1, out2)


# TestNN.test_batchnorm_cudnn_nhwc (CPU variant: channels_last vs contiguous reference)
def test_batchnorm_nhwc_train_cpu(lib):
    nn = IMPLS[lib]

    def run_test(input, grad_output):
        c = input.size(1)
        mod = nn.BatchNorm2d(c).float()
        mod.weight.data.uniform_()
        mod.bias.data.uniform_()
        ref_input = input.detach().clone().contiguous().requires_grad_(True)
        ref_grad = grad_output.detach().clone().contiguous()
        ref_mod = nn.BatchNorm2d(c).float()
        ref_mod.load_state_dict(mod.state_dict())
        out = mod(input)
        out.backward(grad_output)
        ref_out = ref_mod(ref_input)
        ref_out.backward(ref_grad)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert ref_out.is_contiguous()
        eq(out, ref_out)
        eq(mod.weight.grad, ref_mod.weight.grad)
        eq(mod.bias.grad, ref_mod.bias.grad)
        eq(input.grad, ref_input.grad)

    input = torch.randint(1, 10, (4, 8, 2, 2), dtype=torch.float32)
    input = input.contiguous(memory_format=torch.channels_last).detach().requires_grad_()
    grad = torch.randint(1, 10, (4, 8, 2, 2), dtype=torch.float32)
    grad = grad.contiguous(memory_format=torch.channels_last)
    run_test(input, grad)
    # see pytorch#42588: grad is channels_last-contiguous but suggests contiguous format
    input = torch.randint(1, 10, (2, 8, 8, 1), dtype=torch.float32)
    input = input.contiguous(memory_format=torch.channels_last).detach().requires_grad_()
    grad = torch.randint(1, 10, (2, 8, 8, 1), dtype=torch.float32)
    grad = grad.permute(0, 2, 1, 3)
    run_test(input, grad)


# TestNN.test_batchnorm_load_state_dict
def test_batchnorm_load_state_dict(lib):
    nn = IMPLS[lib]
    bn = nn.BatchNorm2d(3)
    eq(bn.state_dict()["num_batches_tracked"], torch.tensor(0))
    bn.num_batches_tracked = torch.tensor(10)
    eq(bn.state_dict()["num_batches_tracked"], torch.tensor(10))
    empty_dict = OrderedDict()
    bn.load_state_dict(empty_dict, strict=False)
    eq(bn.state_dict()["num_batches_tracked"], torch.tensor(10))
    # when num_batches_tracked is missing from the loaded state_dict, a meta
    # num_batches_tracked is still replaced with a singleton 0 tensor
    with torch.device("meta"):
        meta_bn = nn.BatchNorm2d(3)
    assert meta_bn.num_batches_tracked.device == torch.device("meta")
    meta_bn.load_state_dict(empty_dict, assign=True, strict=False)
    eq(meta_bn.state_dict()["num_batches_tracked"], torch.tensor(0))


# TestNN.test_convert_sync_batchnorm (CPU variant; the conversion itself is device-free)
def test_convert_sync_batchnorm(lib):
    nn = IMPLS[lib]
    module = torch.nn.Sequential(nn.BatchNorm1d(100), torch.nn.InstanceNorm1d(100))
    comp_module = torch.nn.Sequential(nn.BatchNorm1d(100), torch.nn.InstanceNorm1d(100))
    comp_module.load_state_dict(module.state_dict())
    sync_bn_module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    children = list(sync_bn_module.children())
    assert children[0].__class__ == torch.nn.SyncBatchNorm
    assert children[1].__class__ == torch.nn.InstanceNorm1d
    for layer, converted_layer in zip(comp_module.children(), sync_bn_module.children()):
        for key in layer.state_dict().keys():
            assert layer.state_dict()[key].device == converted_layer.state_dict()[key].device
            eq(layer.state_dict()[key], converted_layer.state_dict()[key])


# TestNN.test_state_dict (its network part, which holds a BatchNorm2d; the Linear-only tail of
# the source test does not involve BatchNorm)
def test_state_dict(lib):
    nn = IMPLS[lib]
    l = torch.nn.Linear(5, 5)
    block = torch.nn.Module()
    block.conv = torch.nn.Conv2d(3, 3, 3, bias=False)
    net = torch.nn.Module()
    net.linear1 = l
    net.linear2 = l
    net.bn = nn.BatchNorm2d(2)
    net.block = block
    net.add_module("empty", None)

    state_dict = net.state_dict()
    assert len(state_dict) == 10
    assert len(state_dict._metadata) == 6
    assert "" in state_dict._metadata
    for key in ["linear1", "linear2", "block", "block.conv", "bn"]:
        assert key in state_dict._metadata
    for key in ["linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias",
                "block.conv.weight"]:
        assert key in state_dict
    assert "block.conv.bias" not in state_dict
    for key in ["bn.weight", "bn.bias", "bn.running_var", "bn.running_mean",
                "bn.num_batches_tracked"]:
        assert key in state_dict
    assert not any(k.startswith("empty") for k in state_dict.keys())
    for k, v in state_dict.items():
        param = net
        for component in k.split("."):
            param = getattr(param, component)
            if isinstance(param, torch.nn.Parameter):
                param = param.data
        assert v.data_ptr() == param.data_ptr()


# ---------------------------------------------------------------------------------------------
# TestNNDeviceType (CPU)
# ---------------------------------------------------------------------------------------------

# TestNNDeviceType.test_batchnorm_large_batch (onlyCUDA in the source; CPU variant)
@pytest.mark.parametrize("dtype", [torch.float, torch.half])
def test_batchnorm_large_batch(lib, dtype):
    nn = IMPLS[lib]
    bn = nn.BatchNorm2d(1).to(dtype=dtype)
    data = torch.rand(880801, 1, 1, 1, dtype=dtype)
    bn(data).sum().backward()


# TestNNDeviceType.test_BatchNorm_empty
def test_BatchNorm_empty(lib):
    nn = IMPLS[lib]
    mod = nn.BatchNorm2d(3)
    inp = torch.randn(0, 3, 2, 2, dtype=torch.double)
    _module_empty_input(mod, inp)
    eq(mod.running_mean, torch.tensor([0.0, 0, 0]))
    eq(mod.running_var, torch.tensor([1.0, 1, 1]))
    eq(mod.weight.grad, torch.tensor([0.0, 0, 0]))
    eq(mod.bias.grad, torch.tensor([0.0, 0, 0]))
    # not asserted by the source: torch counts the empty batch
    if lib == "torch":
        eq(mod.num_batches_tracked, torch.tensor(1))
    else:
        # deliberate difference: an empty batch (N=0) is not counted in num_batches_tracked
        eq(mod.num_batches_tracked, torch.tensor(0))


# TestNNDeviceType.test_batchnorm_grad (module port of the F.batch_norm gradcheck)
@pytest.mark.parametrize("training", [False, True])
def test_batchnorm_grad(lib, training):
    nn = IMPLS[lib]
    dtype = torch.double
    bs, n_feat, size_feat = 4, 5, 6
    input = torch.arange(bs * n_feat * size_feat, requires_grad=True,
                         dtype=dtype).view(bs, n_feat, size_feat)
    weight = torch.arange(1, n_feat + 1, requires_grad=True, dtype=dtype)
    bias = torch.arange(n_feat, requires_grad=True, dtype=dtype)
    m = nn.BatchNorm1d(n_feat, eps=0.0001, momentum=0.1, dtype=dtype).train(training)
    with torch.no_grad():
        m.running_mean.copy_(1 - torch.arange(n_feat, dtype=dtype))
        m.running_var.copy_(2 * torch.arange(n_feat, dtype=dtype))

    def fn(x, w, b):
        return torch.func.functional_call(m, {"weight": w, "bias": b}, (x,))

    assert gradcheck(fn, (input, weight, bias))
    assert gradgradcheck(fn, (input, weight, bias))


# float, and the half types in a float module (the source's *_mixed variants, onlyCUDA there)
HALF_IN_FLOAT = pytest.mark.parametrize(
    "dtype,module_dtype", [(torch.float, None), (torch.bfloat16, torch.float), (torch.half, torch.float)])


def _output_and_input_grad(module, data, grad):
    """Zero ``data.grad`` if it exists, run ``module(data).backward(grad)``, and return the output
    and a copy of the input gradient."""
    if data.grad is not None:
        data.grad.data.zero_()
    out = module(data)
    out.backward(grad)
    return out, data.grad.clone()


def _eq_runs(first, second):
    """Two (output, input gradient) pairs are equal."""
    eq(first[0], second[0])
    eq(first[1], second[1])


def _batchnorm_eval(nn, ndim, dtype, module_dtype=None):
    module_dtype = module_dtype or dtype
    module = nn.BatchNorm1d(3).to(dtype=module_dtype)
    module.eval()
    data = torch.rand([3] * ndim, dtype=dtype, requires_grad=True)
    grad = torch.rand([3] * ndim, dtype=dtype)
    first = _output_and_input_grad(module, data, grad)
    _eq_runs(first, _output_and_input_grad(module, data, grad))

    # track_running_stats=False
    module = nn.BatchNorm1d(3, track_running_stats=False).to(dtype=module_dtype)
    data = torch.rand(4, 3, dtype=dtype, requires_grad=True)
    grad = torch.rand(4, 3, dtype=dtype)
    first = _output_and_input_grad(module, data, grad)
    module.eval()
    _eq_runs(first, _output_and_input_grad(module, data, grad))


# TestNNDeviceType.test_batchnorm_eval and test_batchnorm_eval_mixed (onlyCUDA in the
# source; CPU variant): float, and half types in a float module
@HALF_IN_FLOAT
def test_batchnorm_eval(lib, dtype, module_dtype):
    for ndim in (2, 3):
        _batchnorm_eval(IMPLS[lib], ndim, dtype, module_dtype)


def _batchnorm_affine(nn, ndim, dtype, module_dtype=None):
    module_dtype = module_dtype or dtype
    module = nn.BatchNorm1d(3, affine=False).to(dtype=module_dtype)
    module_affine = nn.BatchNorm1d(3, affine=True).to(dtype=module_dtype)
    with torch.no_grad():
        module_affine.weight.fill_(1.0)
        module_affine.bias.zero_()
    data = torch.rand([3] * ndim, dtype=dtype, requires_grad=True)
    grad = torch.ones_like(data, requires_grad=False)
    first = _output_and_input_grad(module_affine, data, grad)
    _eq_runs(first, _output_and_input_grad(module, data, grad))


# TestNNDeviceType.test_batchnorm_affine and test_batchnorm_affine_mixed (onlyCUDA in the
# source; CPU variant): float, and half types in a float module
@HALF_IN_FLOAT
def test_batchnorm_affine(lib, dtype, module_dtype):
    for ndim in (2, 3):
        _batchnorm_affine(IMPLS[lib], ndim, dtype, module_dtype)


def _batchnorm_simple_average(nn, dtype, module_dtype=None):
    module_dtype = module_dtype or dtype
    module = nn.BatchNorm1d(3, momentum=None).to(dtype=module_dtype)
    zeros = torch.zeros(3, dtype=module_dtype)
    ones = torch.ones(3, dtype=module_dtype)
    eq(module.running_mean, zeros)
    eq(module.running_var, ones)
    data1 = torch.rand(4, 3, dtype=dtype)
    data2 = torch.rand(4, 3, dtype=dtype)
    # 1st pass
    res1 = module(data1)
    running_mean1 = module.running_mean.clone()
    running_var1 = module.running_var.clone()
    neq(running_mean1, zeros)
    neq(running_var1, ones)
    module.reset_running_stats()
    eq(module.running_mean, zeros)
    eq(module.running_var, ones)
    # 2nd pass
    res2 = module(data2)
    running_mean2 = module.running_mean.clone()
    running_var2 = module.running_var.clone()
    neq(running_mean2, zeros)
    neq(running_var2, ones)
    module.reset_running_stats()
    eq(module.running_mean, zeros)
    eq(module.running_var, ones)
    # 3rd (combined) pass
    res3 = module(data1)
    res4 = module(data2)
    eq(res3, res1)
    eq(res4, res2)
    eq(module.running_mean, (running_mean1 + running_mean2) / 2)
    eq(module.running_var, (running_var1 + running_var2) / 2)


# TestNNDeviceType.test_batchnorm_simple_average and test_batchnorm_simple_average_mixed (onlyCUDA in the
# source; CPU variant): float, and half types in a float module
@HALF_IN_FLOAT
def test_batchnorm_simple_average(lib, dtype, module_dtype):
    _batchnorm_simple_average(IMPLS[lib], dtype, module_dtype)


# TestNNDeviceType.test_batchnorm_update_stats
def test_batchnorm_update_stats(lib):
    nn = IMPLS[lib]
    module = nn.BatchNorm1d(3)
    data = torch.rand(4, 3)
    # training pass
    old_running_mean = module.running_mean.clone()
    old_running_var = module.running_var.clone()
    old_num_batches_tracked = module.num_batches_tracked.clone()
    module(data)
    neq(old_running_mean, module.running_mean)
    neq(old_running_var, module.running_var)
    eq(old_num_batches_tracked + 1, module.num_batches_tracked)
    # eval pass
    module.eval()
    old_running_mean = module.running_mean.clone()
    old_running_var = module.running_var.clone()
    old_num_batches_tracked = module.num_batches_tracked.clone()
    module(data)
    eq(old_running_mean, module.running_mean)
    eq(old_running_var, module.running_var)
    eq(old_num_batches_tracked, module.num_batches_tracked)


# ---------------------------------------------------------------------------------------------
# TestFusionEval
# ---------------------------------------------------------------------------------------------

# TestFusionEval.test_fuse_module_eval_numerics (the source draws X (5, 3, 5, 5), running_mean (6,)
# and running_var (6,) with hypothesis, float32-representable doubles in [-1e6, 1e6]; the port
# takes five seeded draws from that range, two of them with a non-negative running_var so that
# those compare no NaN at all (a negative variance gives NaN channels in both paths), and runs
# under the source's default dtype double)
@pytest.mark.parametrize("draw", range(5))
def test_fuse_module_eval_numerics(lib, draw):
    nn = IMPLS[lib]
    gen = torch.Generator().manual_seed(draw)

    def tensor(*shape):
        return torch.empty(shape, dtype=torch.double).uniform_(-1e6, 1e6, generator=gen) \
            .float().double()

    inputs, running_mean, running_var = tensor(5, 3, 5, 5), tensor(6), tensor(6)
    if draw % 2:
        running_var = running_var.abs()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.double)
    try:
        iC, oC = inputs.shape[1], len(running_mean)
        conv_ref = torch.nn.Conv2d(iC, oC, bias=True, kernel_size=(3, 3))
        bn_ref = nn.BatchNorm2d(oC)
        bn_ref.running_mean = running_mean.clone()
        bn_ref.running_var = running_var.clone()
        conv_ref.eval()
        bn_ref.eval()
        Y_ref = bn_ref(conv_ref(inputs))
        Y_hat = fuse_conv_bn_eval(conv_ref, bn_ref)(inputs)
        eq(Y_ref, Y_hat)  # "Conv+BN fusion results are off"

        na_bn_ref = nn.BatchNorm2d(oC, affine=False)
        na_bn_ref.running_mean = running_mean.clone()
        na_bn_ref.running_var = running_var.clone()
        na_bn_ref.eval()
        Y_ref = na_bn_ref(conv_ref(inputs))
        Y_hat = fuse_conv_bn_eval(conv_ref, na_bn_ref)(inputs)
        eq(Y_ref, Y_hat)  # "Conv+BN(non-affine) fusion results are off"
    finally:
        torch.set_default_dtype(previous)


# ---------------------------------------------------------------------------------------------
# TestFusionUtils
# ---------------------------------------------------------------------------------------------

# TestFusionUtils.test_fuse_conv_bn_requires_grad and test_fuse_linear_bn_requires_grad
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_fuse_bn_requires_grad(lib, kind):
    nn = IMPLS[lib]
    layer, bn, fuse = ((torch.nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3), fuse_conv_bn_weights)
                       if kind == "conv" else
                       (torch.nn.Linear(3, 3), nn.BatchNorm1d(3), fuse_linear_bn_weights))
    for w_rg, b_rg in product([True, False], [True, False]):
        layer.weight.requires_grad = w_rg
        layer.bias.requires_grad = b_rg
        weight, bias = fuse(layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps,
                            bn.weight, bn.bias)
        assert weight.requires_grad == w_rg
        assert bias.requires_grad == b_rg


# ---------------------------------------------------------------------------------------------
# TestUtils
# ---------------------------------------------------------------------------------------------

# TestUtils.test_consume_prefix_in_state_dict_if_present (the source's ``Net.__init__`` writes
# ``net.bn = nn.BatchNorm2d(2)``, which attaches the BatchNorm to the previously built module
# rather than to ``self``; the port puts it on ``self`` so that it is in the tested state_dict)
def test_consume_prefix_in_state_dict_if_present(lib):
    nn = IMPLS[lib]

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 3, 3, bias=True)
            self.conv2 = torch.nn.Conv2d(3, 3, 3, bias=False)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear1 = torch.nn.Linear(5, 5)
            self.linear2 = torch.nn.Linear(5, 5)
            self.bn = nn.BatchNorm2d(2)
            self.block = Block()

    consume = torch.nn.modules.utils.consume_prefix_in_state_dict_if_present
    # 1. non-DDP model: nothing to strip, order preserved
    net = Net()
    state_dict = net.state_dict()
    assert "bn.num_batches_tracked" in state_dict and "bn" in state_dict._metadata
    consume(state_dict, "module.")
    assert list(state_dict.keys()) == list(net.state_dict().keys())
    assert list(state_dict._metadata.keys()) == list(net.state_dict()._metadata.keys())

    # 2. DDP-style ``module.`` prefix is stripped from keys and metadata, order preserved
    state_dict = net.state_dict()
    metadata = state_dict._metadata
    ddp_state_dict = OrderedDict((f"module.{k}", v) for k, v in state_dict.items())
    ddp_state_dict._metadata = OrderedDict({"": metadata[""]})
    ddp_state_dict._metadata.update(("module" if k == "" else f"module.{k}", v)
                                    for k, v in metadata.items())
    consume(ddp_state_dict, "module.")
    assert list(state_dict.keys()) == list(ddp_state_dict.keys())
    assert list(state_dict._metadata.keys()) == list(ddp_state_dict._metadata.keys())
    # not asserted by the source: the stripped state_dict loads back into a fresh model
    fresh = Net()
    fresh.load_state_dict(ddp_state_dict)
    for k, v in fresh.state_dict().items():
        eq(v, state_dict[k])


# ---------------------------------------------------------------------------------------------
# The port itself: every test above on torch.nn, one item each
# ---------------------------------------------------------------------------------------------
@pytest.mark.port
@pytest.mark.parametrize("test", ported_tests(dict(globals())), ids=lambda t: t.__name__)
def test_port_on_torch(test):
    run_ported_on_torch(test)
