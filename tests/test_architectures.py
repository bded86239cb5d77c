"""Architectures as combinations of parts (block, skip, gate, slice-wise), the slice-wise 2D U-Net through the
training engine and inference, and the light (inverted-residual) backbone."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from unet3d.config import TrainConfig
from unet3d.models import (ARCHITECTURE_PARTS, ARCHITECTURES, BLOCKS, GATES, SKIPS, InvertedResidual,
                           architecture_parts, build_network, count_parameters, slice_axis_for)
from unet3d.recipe import plan_slice_patch_size

SMALL = (4, 8, 16)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_config_lists_every_architecture_and_part() -> None:
    # the config's Literals and the models' tables name the same things: a name accepted by one is built by the other
    assert set(TrainConfig.model_fields["architecture"].annotation.__args__) == set(ARCHITECTURES)
    for key, valid in (("block", BLOCKS), ("skip", SKIPS), ("gate", GATES)):
        literal = TrainConfig.model_fields[key].annotation.__args__[0]
        assert set(literal.__args__) == set(valid)
    with pytest.raises(ValueError, match="block"):
        TrainConfig(block="dense")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("deep_supervision", [False, True])
def test_every_architecture_builds_and_keeps_odd_sizes(architecture: str, deep_supervision: bool) -> None:
    net = build_network(architecture, in_channels=2, num_classes=3, features=SMALL, deep_supervision=deep_supervision)
    x = torch.randn(2, 2, 13, 18, 11)
    out = net(x)
    first = out[0] if deep_supervision else out
    assert first.shape == (2, 3, 13, 18, 11)
    (sum(o.square().mean() for o in out) if deep_supervision else out.square().mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 3, 13, 18, 11)


def test_parts_combine_into_the_named_variants_and_beyond() -> None:
    # the named attention U-Net with nested skips is the attention UNet++ of the brain-tumour work
    combined = build_network("attention_unet3d", 1, 2, features=SMALL, skip="nested")
    assert sorted(combined.decoder.keys()) == ["0_1", "0_2", "1_1"]
    assert all(node.gate is not None for node in combined.decoder.values())
    # replacing a part of one name gives exactly the network of another
    as_named = build_network("residual_unet3d", 1, 2, features=SMALL)
    as_parts = build_network("unet3d", 1, 2, features=SMALL, block="residual")
    assert [tuple(p.shape) for p in as_named.parameters()] == [tuple(p.shape) for p in as_parts.parameters()]
    mobile_2d = build_network("unet2d", 1, 2, features=SMALL, block="inverted_residual")
    assert mobile_2d.parts.slice_wise and mobile_2d.parts.block == "inverted_residual"
    assert architecture_parts("unet3d_plusplus", gate="attention") == architecture_parts("attention_unet3d",
                                                                                         skip="nested")
    with pytest.raises(ValueError, match="unknown skip 'full'; valid: plain, nested"):
        build_network("unet3d", 1, 2, features=SMALL, skip="full")
    with pytest.raises(ValueError, match="slice_axis is for a slice-wise"):
        build_network("unet3d", 1, 2, features=SMALL, slice_axis=2)


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_unet2d_is_slice_independent(slice_axis: int) -> None:
    net = build_network("unet2d", 1, 3, features=SMALL, slice_axis=slice_axis).eval()
    x = torch.randn(2, 1, 9, 12, 10)
    with torch.no_grad():
        volume = net(x)
        # on a volume it equals the network applied to each slice on its own (a depth-1 input)
        for index in range(x.shape[2 + slice_axis]):
            one = x.narrow(2 + slice_axis, index, 1)
            torch.testing.assert_close(net(one), volume.narrow(2 + slice_axis, index, 1), rtol=1e-4, atol=1e-5)
        # changing one slice changes that slice's logits only
        changed = x.clone()
        changed.narrow(2 + slice_axis, 4, 1).add_(torch.randn_like(changed.narrow(2 + slice_axis, 4, 1)))
        diff = (net(changed) - volume).abs().movedim(2 + slice_axis, 0).flatten(1).amax(1)
    assert diff[4] > 1e-3
    assert torch.all(torch.cat([diff[:4], diff[5:]]) == 0)


def test_unet2d_never_convolves_or_pools_across_slices() -> None:
    # a 3D topology (strides and kernels on z) given to unet2d builds its 2D counterpart
    net = build_network("unet2d", 1, 2, features=SMALL, strides=[(1, 1, 1), (2, 2, 2), (2, 2, 2)],
                        kernel_sizes=[(3, 3, 3)] * 3, stem_stride=(2, 2, 2), slice_axis=1)
    assert all(s[1] == 1 for s in net.strides) and all(k[1] == 1 for k in net.kernel_sizes)
    assert net.stem_stride[1] == 1
    for module in net.modules():
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d, nn.MaxPool3d)):
            kernel = module.kernel_size if isinstance(module.kernel_size, tuple) else (module.kernel_size,) * 3
            assert kernel[1] == 1, module
    params2d = count_parameters(net)
    assert params2d < count_parameters(build_network("unet3d", 1, 2, features=SMALL, stem_stride=(2, 2, 2)))
    assert net(torch.randn(1, 1, 15, 7, 13)).shape == (1, 2, 15, 7, 13)


def test_slice_axis_is_the_coarsest_and_z_on_a_tie() -> None:
    assert slice_axis_for((0.7, 0.7, 5.0)) == 2
    assert slice_axis_for((3.0, 0.8, 0.8)) == 0
    assert slice_axis_for((1.0, 1.0, 1.0)) == 2
    assert slice_axis_for(None) == 2


def test_slice_patch_is_whole_slices_stacked_to_the_cap() -> None:
    shapes = [(35, 51, 35), (37, 50, 36), (36, 52, 33)]
    # in-plane: the median rounded up to 8; depth: the median depth (within the cap), no rounding
    assert plan_slice_patch_size(shapes, 2, 128**3) == [40, 56, 35]
    assert plan_slice_patch_size(shapes, 0, 128**3) == [36, 56, 40]
    # a CT: whole 512 x 512 slices, as many as the cap holds
    ct = [(512, 512, 120)] * 3
    assert plan_slice_patch_size(ct, 2, 128**3) == [512, 512, 8]
    # one slice over the cap: the larger side shrinks, the depth is one slice
    assert plan_slice_patch_size(ct, 2, 100_000) == [312, 320, 1]


def test_light_backbone_has_fewer_parameters_at_equal_widths() -> None:
    for features in (SMALL, (16, 32, 64, 128), (32, 64, 128, 256, 320)):
        plain = count_parameters(build_network("unet3d", 1, 3, features=features))
        light = count_parameters(build_network("mobile_unet3d", 1, 3, features=features))
        assert light < 0.5 * plain, (features, light, plain)
    block = build_network("mobile_unet3d", 1, 3, features=SMALL).encoder[1]
    depthwise = [m for m in block.modules() if isinstance(m, nn.Conv3d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)


def test_light_backbone_takes_anisotropic_kernels_on_its_depthwise_convolutions() -> None:
    strides = [(1, 1, 1), (2, 2, 1), (2, 2, 2)]
    kernels = [(3, 3, 1), (3, 3, 3), (3, 3, 3)]
    net = build_network("mobile_unet3d", 1, 2, features=SMALL, strides=strides, kernel_sizes=kernels)
    depthwise = [m for m in net.encoder[0].modules() if isinstance(m, nn.Conv3d) and m.groups > 1]
    assert [m.kernel_size for m in depthwise] == [(3, 3, 1)] * 2 and depthwise[0].padding == (1, 1, 0)
    assert net(torch.randn(1, 1, 25, 22, 7)).shape == (1, 2, 25, 22, 7)


def test_inverted_residual_recomputes_the_same_gradients() -> None:
    unit = InvertedResidual(6, 6, (3, 3, 1), "instance")
    x = torch.randn(2, 6, 7, 8, 5, requires_grad=True)
    unit(x).square().sum().backward()
    recomputed = [p.grad.clone() for p in unit.parameters()] + [x.grad.clone()]
    unit.zero_grad()
    x.grad = None
    unit.recompute = False
    unit(x).square().sum().backward()
    for a, b in zip(recomputed, [p.grad for p in unit.parameters()] + [x.grad]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_unet2d_trains_and_infers_through_the_engine(tmp_path) -> None:
    from tests.test_train import tiny_spec
    from unet3d.inference import StageModel
    from unet3d.sampling import load_case
    from unet3d.train import train

    # patch_size left to the planner: the slice-wise plan (whole slices stacked along z, spacing isotropic)
    spec = tiny_spec(tmp_path / "store", tmp_path / "model", architecture="unet2d", patch_size=None, max_epochs=2,
                     iterations_per_epoch=2, augment="none", deterministic=False)
    result = train(spec, progress=False)
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    assert meta["model"]["architecture"] == "unet2d" and meta["model"]["slice_axis"] == 2
    assert all(s[2] == 1 for s in meta["model"]["strides"]) and all(k[2] == 1 for k in meta["model"]["kernel_sizes"])
    assert meta["patch_size"] == [24, 24, 14]  # cases are 20 x 22 x 14: whole slices, every slice of the case
    assert result.best_val_dice is not None
    model = StageModel.load(tmp_path / "model", device="cpu")
    assert model.network.slice_axis == 2
    case = load_case(spec.val_cases[0], spec.label_map)
    probs = model.predict(case.image, tta=False)
    assert probs.shape == (3, 20, 22, 14)
    np.testing.assert_allclose(probs.sum(0), 1.0, rtol=1e-4)


def test_named_architectures_are_part_combinations() -> None:
    assert set(ARCHITECTURE_PARTS) == set(ARCHITECTURES)
    combos = {(p.block, p.skip, p.gate, p.slice_wise) for p in ARCHITECTURE_PARTS.values()}
    assert len(combos) == len(ARCHITECTURES)


def test_recipe_plans_a_slice_wise_network_as_deep_as_its_slices_allow() -> None:
    from unet3d.recipe import plan_recipe

    # whole 512 x 512 CT slices, 8 of them: the depth comes from the slices' sides, not from the 8-slice stack
    def time_fn(features, stem, batch, augment):
        return 0.1

    planned = {}
    for architecture in ("unet2d", "unet3d"):
        cfg = TrainConfig(architecture=architecture, features=None, time_limit_min=None)
        planned[architecture] = plan_recipe(cfg, patch=[512, 512, 8], spacing=[0.8, 0.8, 5.0], num_classes=2,
                                            in_channels=1, n_val_cases=0, device=torch.device("cpu"),
                                            time_fn=time_fn).features
    assert len(planned["unet2d"]) == 6
    assert len(planned["unet3d"]) == 2
