"""models.depthwise: the fast CPU backward gives nn.Conv2d's gradients, in every layout and mode."""
import pytest
import torch
from torch import nn

from models import ckernel, conv, depthwise
from models.depthwise import DepthwiseConv2d, fast_backward_available

LAYOUTS = [torch.contiguous_format, torch.channels_last]


def _pair(channels: int, kernel: int, dtype=torch.float32, stride: int = 1):
    torch.manual_seed(0)
    native = nn.Conv2d(channels, channels, kernel, stride, kernel // 2, groups=channels)
    fast = DepthwiseConv2d(channels, kernel, stride)
    fast.load_state_dict(native.state_dict())
    return native.to(dtype), fast.to(dtype)


def _grads(conv: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    out = conv(x)
    gx, gw, gb = torch.autograd.grad(out, (x, conv.weight, conv.bias), grad)
    return out, gx, gw, gb


def test_fast_path_is_taken():
    x = torch.randn(2, 32, 14, 14)
    assert fast_backward_available(x, DepthwiseConv2d(32, 7).weight, stride=1)
    assert not fast_backward_available(x, DepthwiseConv2d(32, 3).weight, stride=1)  # oneDNN's
    assert not fast_backward_available(x, DepthwiseConv2d(32, 7).weight, stride=2)
    with torch.autocast("cpu", dtype=torch.float16):  # bfloat16 only
        assert not fast_backward_available(x, DepthwiseConv2d(32, 7).weight, stride=1)


@pytest.mark.slow  # ~4600 forwards each; test_float32_matches_conv2d covers the kernel fast
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kernel", [5, 7])
def test_gradcheck_float64(layout, kernel):
    _, fast = _pair(16, kernel, torch.float64)
    x = torch.randn(2, 16, 9, 8, dtype=torch.float64).contiguous(memory_format=layout)
    assert fast_backward_available(x, fast.weight, stride=1)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(fast, (x,))


@pytest.mark.parametrize("layout", LAYOUTS)
# maps narrower than the kernel too: only some of its columns, or none of its centre's
# neighbours, fall inside them
@pytest.mark.parametrize("shape", [(3, 48, 28, 28), (2, 96, 7, 7), (1, 16, 5, 11),
                                   (2, 16, 6, 3), (2, 16, 5, 2), (1, 16, 4, 1)])
@pytest.mark.parametrize("kernel", [5, 7])
def test_float32_matches_conv2d(recording_openmp_pool, layout, shape, kernel):
    native, fast = _pair(shape[1], kernel)
    x = torch.randn(shape).contiguous(memory_format=layout)
    grad = torch.randn(shape).contiguous(memory_format=layout)
    expected, got = _grads(native, x, grad), _grads(fast, x, grad)
    assert recording_openmp_pool.launches == 1  # the C kernel computed the weight gradient
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)  # the same forward call
    for name, g, e in zip(("input", "weight", "bias"), got[1:], expected[1:]):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item(), msg=name)
    assert got[2].stride() == fast.weight.stride()


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("pool", ["openmp", "calling thread", "team of one"])
def test_weight_gradient_with_any_thread_count_on_any_pool(request, monkeypatch, threads, pool):
    """Channel blocks split unevenly over threads (48 channels: 3 or 6 blocks), on PyTorch's
    OpenMP pool (every thread asked for does work), on the calling thread alone, or on an OpenMP
    team smaller than asked for; a map narrower and shorter than the kernel."""
    record = None
    if pool == "calling thread":
        monkeypatch.setattr(ckernel, "openmp_pool", lambda: (None, None, None))
    elif pool == "team of one":
        request.getfixturevalue("one_thread_openmp_team")
    else:
        record = request.getfixturevalue("recording_openmp_pool")
    native, fast = _pair(48, 7, torch.float64)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape in ((2, 48, 9, 12), (1, 48, 3, 5)):
            x, grad = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
            for g, e in zip(_grads(fast, x, grad)[2:], _grads(native, x, grad)[2:]):
                torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    finally:
        torch.set_num_threads(previous)
    if record is not None:
        assert record.launches == 2
        assert record.thread_numbers == (set(range(threads)) if threads > 1 else set())


def test_weight_gradient_keeps_the_weight_strides():
    """A channels-last weight (as DDP buckets see it after model.to(channels_last)) gets a
    channels-last gradient."""
    _, fast = _pair(32, 7)
    fast = fast.to(memory_format=torch.channels_last)
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    fast(x).sum().backward()
    assert fast.weight.grad.stride() == fast.weight.stride()


@pytest.mark.parametrize("kernel, stride", [(3, 1), (3, 2), (7, 2)])
def test_other_shapes_are_exactly_conv2d(kernel, stride):
    native, fast = _pair(32, kernel, stride=stride)
    x = torch.randn(2, 32, 14, 14).contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(native(x))
    for g, e in zip(_grads(fast, x, grad), _grads(native, x, grad)):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_bfloat16_autocast_takes_the_kernel(recording_openmp_pool, monkeypatch):
    """Under CPU autocast to bfloat16, on a CPU with bfloat16 kernels (on others, see
    tests/test_conv.py), the convolution runs on bfloat16 copies, as nn.Conv2d's does (the same
    forward), and its weight gradient in the C kernel (bfloat16 loads, float32 sums): the
    gradients are the float32 path's within bfloat16 round-off."""
    monkeypatch.setattr(conv, "_BFLOAT16_NATIVE", True)
    native, fast = _pair(32, 7)
    x = torch.randn(2, 32, 14, 14).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 32, 14, 14, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast_backward_available(x, fast.weight, stride=1)
        expected, got = _grads(native, x, grad), _grads(fast, x, grad)
    assert recording_openmp_pool.launches == 1  # the C kernel computed the weight gradient
    assert got[0].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    assert [g.dtype for g in got[1:]] == [torch.float32] * 3  # the parameters' own dtype
    fp32 = _grads(native, x, grad.float())
    for name, g, e, n in zip(("input", "weight", "bias"), got[1:], fp32[1:], expected[1:]):
        scale = e.abs().max().item()
        torch.testing.assert_close(g, e, rtol=2e-2, atol=2e-2 * scale, msg=name)
        # no further from float32 than PyTorch's own bfloat16 backward, give or take round-off
        assert (g - e).abs().max() <= 2 * (n - e).abs().max() + 1e-2 * scale, name


@pytest.mark.parametrize("kernel", [5, 7])
def test_bfloat16_weight_gradient_matches_float32(kernel):
    """The kernel on bfloat16 maps gives the float32 kernel's sums of the same (rounded) values,
    to float32 round-off, then rounded to bfloat16."""
    torch.manual_seed(0)
    x = torch.randn(3, 48, 11, 9).to(torch.bfloat16)
    g = torch.randn(3, 48, 11, 9).to(torch.bfloat16)
    got = depthwise.depthwise_weight_grad(x, g, kernel)
    expected = depthwise.depthwise_weight_grad(x.float(), g.float(), kernel)
    for w, e in zip(got, expected):
        assert w.dtype == torch.bfloat16
        torch.testing.assert_close(w, e.to(torch.bfloat16), rtol=1e-2, atol=1e-2)


def test_without_a_c_compiler_it_is_conv2d(monkeypatch):
    monkeypatch.setattr(ckernel, "_libraries", {})
    monkeypatch.setattr(ckernel, "_build", lambda name, source, flags: None)
    native, fast = _pair(32, 7)
    x = torch.randn(2, 32, 8, 8)
    assert not fast_backward_available(x, fast.weight, stride=1)
    grad = torch.randn(2, 32, 8, 8)
    for g, e in zip(_grads(fast, x, grad), _grads(native, x, grad)):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_torch_compile_matches_eager(recording_openmp_pool):
    native, fast = _pair(32, 7)
    compiled = torch.compile(fast)
    x = torch.randn(2, 32, 14, 14).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 32, 14, 14)
    expected = _grads(native, x, grad)
    for _ in range(2):  # the first call compiles
        got = _grads(compiled, x, grad)
    assert recording_openmp_pool.launches >= 2  # the compiled graph kept the C kernel
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


def test_custom_ops_pass_opcheck():
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(depthwise.depthwise_weight_grad, (x, torch.randn(2, 16, 6, 6), 5))
    weight, bias = torch.randn(16, 1, 7, 7, requires_grad=True), torch.randn(16, requires_grad=True)
    torch.library.opcheck(depthwise.depthwise_conv2d, (x.requires_grad_(True), weight, bias))


def test_export_records_conv2d():
    """An exported program holds ATen's convolution, not the custom op, with and without grad."""
    _, fast = _pair(32, 7)
    program = torch.export.export(fast, (torch.randn(2, 32, 8, 8),))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets == ["aten.conv2d.default"]
