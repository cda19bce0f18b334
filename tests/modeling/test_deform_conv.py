"""Deformable convolution on torchvision (no compiled Detectron2 ops) against independent
references.

The references below use only ``F.conv2d`` and zero-padded shifts of the input, so they
check both torchvision's kernel and our offset/mask layout (per deform group, per kernel
tap t = i * k + j: channel 2t is the vertical, 2t + 1 the horizontal offset).
"""

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d
from detectron2.modeling.backbone.resnet import BottleneckBlock

from gfocalv2.modeling.backbone.resnet import DeformBottleneckBlock, DeformConv2d


def shifted_conv(x, weight, dy, dx, stride=1, padding=0, dilation=1):
    """conv2d whose every tap reads x at (its usual position + (dy, dx)), zero outside x.

    Computed as a padding-free conv on a zero-padded, shifted crop of x, so taps that fall
    into the padding of an unshifted conv still read real pixels when the shift moves them
    inside. x: (N, C, H, W), integer dy, dx; weight: (C_out, C_in, k, k).
    """
    H, W = x.shape[-2:]
    k = weight.shape[-1]
    span = (k - 1) * dilation + 1
    h_out = (H + 2 * padding - span) // stride + 1
    w_out = (W + 2 * padding - span) // stride + 1
    m = padding + max(abs(dy), abs(dx)) + span
    xp = F.pad(x, (m, m, m, m))
    r0, c0 = m - padding + dy, m - padding + dx
    crop = xp[..., r0 : r0 + (h_out - 1) * stride + span, c0 : c0 + (w_out - 1) * stride + span]
    return F.conv2d(crop, weight, stride=stride, dilation=dilation)


def tapwise_reference(x, weight, offsets, stride, padding, dilation, mask=None):
    """Deformable conv with one integer (dy, dx) per (deform group, tap), from plain convs.

    x: (N, C_in, H, W); weight: (C_out, C_in, k, k) (groups = 1);
    offsets: (G, k * k, 2) integers; mask: None or (G, k * k) scalars.
    Returns (N, C_out, H_out, W_out).
    """
    G, kk, _ = offsets.shape
    k = weight.shape[-1]
    cpg = x.shape[1] // G
    out = 0
    for g in range(G):
        xg = x[:, g * cpg : (g + 1) * cpg]
        wg = weight[:, g * cpg : (g + 1) * cpg]
        for t in range(kk):
            i, j = divmod(t, k)
            w_t = torch.zeros_like(wg)
            w_t[..., i, j] = wg[..., i, j]
            if mask is not None:
                w_t = w_t * mask[g, t]
            dy, dx = int(offsets[g, t, 0]), int(offsets[g, t, 1])
            out = out + shifted_conv(xg, w_t, dy, dx, stride, padding, dilation)
    return out


def offsets_to_map(offsets, n, h, w):
    """(G, k*k, 2) -> (n, 2 * G * k * k, h, w), the same offset at every output location."""
    return offsets.reshape(-1)[None, :, None, None].expand(n, -1, h, w).contiguous()


@pytest.mark.parametrize(
    "stride,padding,dilation,groups,dgroups", [(1, 1, 1, 1, 1), (2, 1, 1, 2, 1), (1, 2, 2, 1, 2)]
)
def test_zero_offsets_equal_plain_conv(stride, padding, dilation, groups, dgroups):
    x = torch.randn(2, 8, 11, 9)
    conv = DeformConv2d(
        8,
        6,
        3,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        deformable_groups=dgroups,
        bias=True,
    )
    torch.nn.init.normal_(conv.bias)
    ref = F.conv2d(
        x, conv.weight, conv.bias, stride=stride, padding=padding, dilation=dilation, groups=groups
    )
    off = torch.zeros(2, 2 * dgroups * 9, *ref.shape[-2:])
    torch.testing.assert_close(conv(x, off), ref, atol=1e-5, rtol=1e-5)
    # DCNv2 with a unit mask is the same convolution; a mask of 0.3 scales it (before the bias).
    ones = torch.ones(2, dgroups * 9, *ref.shape[-2:])
    torch.testing.assert_close(conv(x, off, ones), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        conv(x, off, 0.3 * ones),
        0.3 * (ref - conv.bias[:, None, None]) + conv.bias[:, None, None],
        atol=1e-5,
        rtol=1e-5,
    )


def test_uniform_integer_offset_equals_shifted_input():
    x = torch.randn(1, 4, 10, 12)
    conv = DeformConv2d(4, 5, 3, padding=1)
    dy, dx = 2, -1
    off = (
        torch.tensor([dy, dx], dtype=torch.float32)
        .repeat(9)[None, :, None, None]
        .expand(1, 18, 10, 12)
    )
    ref = shifted_conv(x, conv.weight, dy, dx, padding=1)
    torch.testing.assert_close(conv(x, off), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("modulated", [False, True])
def test_per_tap_integer_offsets_two_deform_groups(modulated):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 9, 10, generator=g)
    conv = DeformConv2d(6, 4, 3, stride=2, padding=1, deformable_groups=2)
    offsets = torch.randint(-2, 3, (2, 9, 2), generator=g).float()
    mask = torch.rand(2, 9, generator=g) if modulated else None
    ref = tapwise_reference(x, conv.weight, offsets, stride=2, padding=1, dilation=1, mask=mask)
    off = offsets_to_map(offsets, 2, *ref.shape[-2:])
    m = (
        None
        if mask is None
        else mask.reshape(-1)[None, :, None, None].expand(2, -1, *ref.shape[-2:]).contiguous()
    )
    torch.testing.assert_close(conv(x, off, m), ref, atol=1e-5, rtol=1e-5)


def test_half_pixel_offset_is_bilinear():
    x = torch.randn(1, 3, 7, 8)
    conv = DeformConv2d(3, 2, 3, padding=1)
    off = torch.tensor([0.5, 0.0]).repeat(9)[None, :, None, None].expand(1, 18, 7, 8)
    ref = 0.5 * (
        shifted_conv(x, conv.weight, 0, 0, padding=1)
        + shifted_conv(x, conv.weight, 1, 0, padding=1)
    )
    torch.testing.assert_close(conv(x, off), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("modulated", [False, True])
def test_deform_block_starts_as_bottleneck_and_offsets_get_gradients(modulated):
    kw = dict(bottleneck_channels=8, stride=2, num_groups=2, norm="BN", stride_in_1x1=False)
    block = DeformBottleneckBlock(16, 32, deform_modulated=modulated, **kw).eval()
    plain = BottleneckBlock(16, 32, **kw).eval()
    state = {k: v for k, v in block.state_dict().items() if "conv2_offset" not in k}
    if modulated:  # zero-initialized mask logits give a mask of sigmoid(0) = 0.5
        state["conv2.weight"] = state["conv2.weight"] * 0.5
    plain.load_state_dict(state)
    assert block.conv2_offset.out_channels == (27 if modulated else 18)
    assert (
        torch.count_nonzero(block.conv2_offset.weight) == 0
        and torch.count_nonzero(block.conv2_offset.bias) == 0
    )
    x = torch.randn(2, 16, 12, 12)
    out = block(x)
    torch.testing.assert_close(out, plain(x), atol=1e-5, rtol=1e-5)
    assert out.shape == (2, 32, 6, 6)

    out.square().sum().backward()
    assert block.conv2_offset.weight.grad is not None
    assert block.conv2_offset.weight.grad[:18].abs().sum() > 0  # offsets
    if modulated:
        assert block.conv2_offset.weight.grad[18:].abs().sum() > 0  # mask
    assert block.conv2.weight.grad.abs().sum() > 0


def test_offset_channel_check():
    conv = DeformConv2d(4, 4, 3, padding=1, deformable_groups=2)
    with pytest.raises(ValueError, match="offset has 18 channels"):
        conv(torch.randn(1, 4, 5, 5), torch.zeros(1, 18, 5, 5))


def test_low_precision_and_autocast():
    """bfloat16 inputs under autocast: a bfloat16 result within bfloat16's rounding of the
    float32 result on the same (rounded) inputs.

    Tolerance, per output: bfloat16 rounds to 8 significant bits (relative error <= U = 2^-8).
    Each product w * s of the sum (s: an input sampled bilinearly at the offset position) gets
    the rounding of the weight (U), that of the sample, computed in bfloat16 (its positive
    bilinear weights and partial sums: about 2 U), and the output's rounding (U): at most 4 U of
    sum |w| |s|, which is at most the deformable convolution of |x| with |w| (bilinear weights
    are positive). Measured: at most 0.54 U of it (40 seeds; torchvision's CPU kernel is the same
    with and without native bfloat16)."""
    conv = DeformConv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 6, 6).bfloat16()
    off = torch.randn(1, 18, 6, 6).bfloat16()
    ref = conv(x.float(), off.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x, off)
    assert y.dtype == torch.bfloat16
    with torch.no_grad():
        magnitude = deform_conv2d(x.float().abs(), off.float(), conv.weight.abs(), padding=1)
    error = (y.float() - ref).abs()
    bound = 4 * 2.0**-8 * magnitude
    assert (error <= bound).all(), (error - bound).max()
    assert error.max() > 0  # it did run in bfloat16
    assert conv(x[:0], off[:0]).shape == (0, 4, 6, 6)  # empty batches pass through
