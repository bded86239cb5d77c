"""Tests for unet3d.models: shapes on awkward sizes, anisotropic topologies, deep supervision, gradients, layouts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from torch import nn

from unet3d.models import (
    ARCHITECTURE_PARTS,
    ARCHITECTURES,
    InstanceNorm,
    build_network,
    count_parameters,
    match_size,
    plan_topology,
)

SMALL = (4, 8, 16)  # 3 stages, tiny widths: keeps every test well under a second
# Level blocks that begin with a full convolution (conv1); the inverted residual begins with a 1x1x1 expansion
# (its depthwise kernels are checked in tests/test_architectures.py).
CONV_BLOCK_ARCHITECTURES = [a for a in ARCHITECTURES if ARCHITECTURE_PARTS[a].block != "inverted_residual"]


def first_conv(net: nn.Module) -> nn.Conv3d:
    """The first convolution of the first level block."""
    return next(m for m in net.encoder[0].modules() if isinstance(m, nn.Conv3d))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_odd_input_size_gives_logits_of_input_size(architecture: str) -> None:
    net = build_network(architecture, in_channels=2, num_classes=3, features=SMALL)
    x = torch.randn(2, 2, 23, 30, 17)
    assert net(x).shape == (2, 3, 23, 30, 17)
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 3, 23, 30, 17)


@pytest.mark.parametrize("architecture", CONV_BLOCK_ARCHITECTURES)
def test_anisotropic_strides_and_kernels(architecture: str) -> None:
    strides = [(1, 1, 1), (2, 2, 1), (2, 2, 2)]
    kernels = [(3, 3, 1), (3, 3, 3), (3, 3, 3)]
    net = build_network(architecture, 1, 2, features=SMALL, strides=strides, kernel_sizes=kernels)
    first_conv = net.encoder[0].conv1[0]
    assert first_conv.kernel_size == (3, 3, 1) and first_conv.padding == (1, 1, 0)
    x = torch.randn(1, 1, 25, 22, 7)
    assert net(x).shape == (1, 2, 25, 22, 7)


def test_nnunet_patch_not_divisible_by_total_stride() -> None:
    # MONAI's UNet fails on this patch (40 / 16 is not an integer); ours must not.
    net = build_network("unet3d", 1, 2, features=(4, 8, 16, 32, 64))
    assert net(torch.randn(1, 1, 40, 56, 40)).shape == (1, 2, 40, 56, 40)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_deep_supervision_outputs_in_train_mode_only(architecture: str) -> None:
    strides = [(1, 1, 1), (2, 2, 1), (2, 2, 2)]
    net = build_network(architecture, 1, 3, features=SMALL, strides=strides, deep_supervision=True)
    x = torch.randn(2, 1, 23, 30, 17)
    outputs = net.train()(x)
    assert isinstance(outputs, list)
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 23, 30, 17), (2, 3, 12, 15, 17)]
    net.eval()
    with torch.no_grad():
        out = net(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 23, 30, 17)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_gradients_reach_first_layer(architecture: str) -> None:
    net = build_network(architecture, 1, 2, features=SMALL, deep_supervision=True)
    outputs = net(torch.randn(2, 1, 12, 14, 10))
    sum(o.square().mean() for o in outputs).backward()
    grad = first_conv(net).weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.parameters()), "some parameter is not part of the graph"


@pytest.mark.parametrize(
    ("architecture", "low", "high"),
    [
        ("unet3d", 1.2e6, 1.6e6),
        ("residual_unet3d", 1.2e6, 1.7e6),
        ("attention_unet3d", 1.2e6, 1.7e6),
        ("unet3d_plusplus", 1.3e6, 2.0e6),
    ],
)
def test_parameter_count_for_default_features(architecture: str, low: float, high: float) -> None:
    net = build_network(architecture, 1, 3)  # features (16, 32, 64, 128)
    assert low < count_parameters(net) < high


def test_count_parameters_ignores_frozen() -> None:
    net = build_network("unet3d", 1, 2, features=SMALL)
    total = count_parameters(net)
    assert total == sum(p.numel() for p in net.parameters())
    net.heads[0].weight.requires_grad_(False)
    assert count_parameters(net) == total - net.heads[0].weight.numel()


def test_architectures_differ_in_structure() -> None:
    counts = {a: count_parameters(build_network(a, 1, 2, features=SMALL)) for a in ARCHITECTURES}
    assert len(set(counts.values())) == len(ARCHITECTURES)
    plusplus = build_network("unet3d_plusplus", 1, 2, features=SMALL)
    assert sorted(plusplus.decoder.keys()) == ["0_1", "0_2", "1_1"]
    plain = build_network("unet3d", 1, 2, features=SMALL)
    assert sorted(plain.decoder.keys()) == ["0_2", "1_1"]


def test_unknown_architecture_lists_valid_names() -> None:
    with pytest.raises(ValueError) as info:
        build_network("vnet", 1, 2)
    for name in ARCHITECTURES:
        assert name in str(info.value)


@pytest.mark.parametrize("norm", ["batch", "instance", "group"])
def test_norms_and_dropout_train_vs_eval(norm: str) -> None:
    net = build_network("residual_unet3d", 1, 2, features=SMALL, norm=norm, dropout=0.5)
    x = torch.randn(2, 1, 9, 10, 11)
    net.train()
    assert not torch.equal(net(x), net(x)), "dropout should make training forwards stochastic"
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net(x))


def test_channels_last_input_matches_contiguous() -> None:
    net = build_network("attention_unet3d", 1, 2, features=SMALL).eval()
    x = torch.randn(2, 1, 15, 12, 9)
    with torch.no_grad():
        expected = net(x)
        got = net(x.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert got.is_contiguous(), "logits are returned in the default layout"
    channels_last_net = net.to(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        torch.testing.assert_close(channels_last_net(x), expected, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_forward_backward() -> None:
    net = build_network("unet3d", 1, 2, features=SMALL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(1, 1, 11, 12, 13))
    assert out.shape == (1, 2, 11, 12, 13)
    out.float().mean().backward()
    assert torch.isfinite(net.encoder[0].conv1[0].weight.grad).all()


def test_kaiming_init() -> None:
    net = build_network("unet3d", 1, 2, features=(32, 64))
    weight = net.encoder[1].conv2[0].weight  # 64 -> 64, 3x3x3
    fan_in = 64 * 27
    assert weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_in), rel=0.05)


def test_instance_norm_matches_functional_and_handles_one_voxel() -> None:
    norm = InstanceNorm(3)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(2, 3, 5, 6, 7)
    torch.testing.assert_close(norm(x), F.instance_norm(x, weight=norm.weight, bias=norm.bias), rtol=1e-4, atol=1e-5)
    single = norm(torch.randn(2, 3, 1, 1, 1))
    torch.testing.assert_close(single, norm.bias.view(1, 3, 1, 1, 1).expand(2, 3, 1, 1, 1))
    # A tiny input whose bottleneck is one voxel still runs.
    assert build_network("unet3d", 1, 2, features=SMALL)(torch.randn(1, 1, 3, 4, 2)).shape == (1, 2, 3, 4, 2)


def test_match_size_crops_and_pads_at_the_far_end() -> None:
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(1, 1, 2, 5, 3)
    y = match_size(x, (3, 4, 3))
    assert y.shape == (1, 1, 3, 4, 3)
    torch.testing.assert_close(y[:, :, :2], x[:, :, :, :4])
    assert (y[:, :, 2] == 0).all()


def test_invalid_configurations_raise() -> None:
    with pytest.raises(ValueError, match="strides"):
        build_network("unet3d", 1, 2, features=SMALL, strides=[(2, 2, 2)] * 3)
    with pytest.raises(ValueError, match="odd"):
        build_network("unet3d", 1, 2, features=SMALL, kernel_sizes=[(3, 3, 2)] * 3)
    with pytest.raises(ValueError, match="norm"):
        build_network("unet3d", 1, 2, features=SMALL, norm="layer")
    with pytest.raises(ValueError, match="one entry per stage"):
        build_network("unet3d", 1, 2, features=SMALL, strides=[(1, 1, 1), (2, 2, 2)])


def test_plan_topology_isotropic() -> None:
    strides, kernels = plan_topology((40, 56, 40), (1.0, 1.0, 1.0), 5)
    # 40 -> 20 -> 10 -> 5 (then < 8: stop); 56 -> 28 -> 14 -> 7 (stop).
    assert strides == [(1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 1, 1)]
    assert kernels == [(3, 3, 3)] * 5


def test_plan_topology_thick_slices() -> None:
    strides, kernels = plan_topology((160, 160, 32), (0.7, 0.7, 2.5), 5)
    # z is 3.6x coarser: in-plane only until the in-plane spacing (1.4) is within 2x of z (2.5).
    assert strides == [(1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert kernels[0] == (3, 3, 1)
    assert kernels[1:] == [(3, 3, 3)] * 4
    net = build_network("unet3d", 1, 2, features=(4, 8, 8, 8, 8), strides=strides, kernel_sizes=kernels)
    assert net(torch.randn(1, 1, 33, 31, 9)).shape == (1, 2, 33, 31, 9)


def test_plan_topology_stops_pooling_small_axes() -> None:
    strides, _ = plan_topology((64, 64, 12), (1.0, 1.0, 1.0), 4)
    assert strides == [(1, 1, 1), (2, 2, 2), (2, 2, 1), (2, 2, 1)]


def test_plan_topology_thick_axis_can_be_any_axis() -> None:
    strides, kernels = plan_topology((32, 128, 128), (3.0, 0.8, 0.8), 3)
    assert strides == [(1, 1, 1), (1, 2, 2), (2, 2, 2)]
    assert kernels == [(1, 3, 3), (3, 3, 3), (3, 3, 3)]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this PyTorch build has no oneDNN")
@pytest.mark.parametrize("architecture", ["unet3d", "residual_unet3d", "attention_unet3d", "mobile_unet3d"])
def test_one_sample_cpu_batch_runs_on_onednn(architecture: str) -> None:
    """PyTorch's convolution dispatch sends a float32 CPU batch of one sample with 3x3x3 kernels and small maps to its
    im2col fallback (aten::slow_conv3d), 5-10x slower per sample than oneDNN on this project's networks. One window
    without mirroring, the last partial batch of sliding windows and batch-1 training all run such batches: the
    networks' convolutions must not take that path, and must give the same logits."""
    from torch.profiler import ProfilerActivity, profile

    net = build_network(architecture, 1, 3, features=(16, 32, 64), stem_stride=2).eval()
    x = torch.randn(1, 1, 32, 48, 32)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        got = net(x)
    slow = sorted({e.key for e in prof.key_averages() if "slow_conv" in e.key and "transpose" not in e.key})
    assert not slow, f"batch-1 convolutions ran on {slow}"
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        expected = net(x)  # PyTorch's reference path
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, padding=1, bias=False), dict(kernel_size=2, stride=2),
                                    dict(kernel_size=1, bias=True), dict(kernel_size=3, padding=1, groups=4)])
def test_conv3d_one_sample_matches_pytorch_values_and_gradients(kwargs: dict) -> None:
    """The project's Conv3d (oneDNN for a one-sample CPU batch) against nn.Conv3d's own path, in float64."""
    from unet3d.models import Conv3d

    conv = Conv3d(8, 4, **kwargs)
    x = torch.randn(1, 8, 10, 12, 6, requires_grad=True)
    conv(x).square().sum().backward()
    got = [x.grad, *(p.grad for p in conv.parameters())]
    reference = nn.Conv3d(8, 4, **kwargs).double()
    reference.load_state_dict(conv.state_dict())
    x64 = x.detach().double().requires_grad_()
    reference(x64).square().sum().backward()
    for g, e in zip(got, [x64.grad, *(p.grad for p in reference.parameters())]):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-5)
