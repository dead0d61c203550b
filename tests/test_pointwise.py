"""models.pointwise: PointwiseConv2d computes nn.Conv2d's 1x1 convolution through oneDNN."""
import pytest
import torch
from torch import nn
from torch.profiler import profile

from models import pointwise
from models.pointwise import PointwiseConv2d


def _pair(dtype=torch.float32):
    torch.manual_seed(0)
    native, fast = nn.Conv2d(32, 48, 1), PointwiseConv2d(32, 48)
    fast.load_state_dict(native.state_dict())
    return native.to(dtype), fast.to(dtype)


def _grads(conv, x, grad):
    x = x.detach().clone().requires_grad_(True)
    out = conv(x)
    return (out, *torch.autograd.grad(out, (x, conv.weight, conv.bias), grad))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_conv2d(layout, dtype):
    native, fast = _pair(dtype)
    x = torch.randn(2, 32, 6, 7, dtype=dtype).contiguous(memory_format=layout)
    grad = torch.randn(2, 48, 6, 7, dtype=dtype)
    got, expected = _grads(fast, x, grad), _grads(native, x, grad)
    assert got[0].is_contiguous(memory_format=layout)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for name, g, e in zip(("output", "input", "weight", "bias"), got, expected):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol, msg=name)


def test_bfloat16_autocast():
    native, fast = _pair()
    x = torch.randn(2, 32, 5, 7).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = fast(x), native(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)


def test_pieces():
    assert [pointwise._pieces(8, h) for h in (56, 28, 14, 7)] == [2, 2, 2, 7]
    assert pointwise._pieces(4, 5) == 5 and pointwise._pieces(1, 12) == 12
    assert pointwise._pieces(3, 12) == 6 and pointwise._pieces(16, 7) == 1


@pytest.mark.skipif(not pointwise._ONEDNN_FASTER, reason="plain nn.Conv2d without AVX2")
@pytest.mark.parametrize("height", [5, 8])
def test_single_thread_small_batch_runs_on_onednn(height):
    """The case PyTorch would send to its slower native kernel (1 thread, batch < 16): here a
    batch of 4 x 5 one-row images or of 4 x 4 images of two rows."""
    _, fast = _pair()
    x = torch.randn(4, 32, height, 7).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with profile() as prof:
            fast(x).sum().backward()
    finally:
        torch.set_num_threads(threads)
    ops = {event.key for event in prof.key_averages()}
    assert "aten::mkldnn_convolution" in ops
    assert not any(op.startswith("aten::_slow_conv2d") for op in ops), ops
