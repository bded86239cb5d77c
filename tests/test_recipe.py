"""The training recipe planner (unet3d.recipe), the strided-stem network, crop-after-warp and the post-processing
chosen on validation: fast unit tests, plus one small training run that records the recipe and reuses it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from unet3d.config import ConfigError, TrainConfig, parse_config
from unet3d.models import build_network
from unet3d.postprocess import apply_postprocessing, choose_postprocessing, keep_largest_component
from unet3d.recipe import CPU_LADDER, MIN_ITERATIONS, MIN_ITERATIONS_MIRRORED, min_iterations, plan_recipe
from unet3d.sampling import center_crop

CPU = torch.device("cpu")


def fake_timer(seconds_by_base_and_stem):
    """A time_fn that returns fixed seconds per iteration per (base width, stem) and records the calls."""
    calls = []

    def time_fn(features, stem, batch, augment):
        calls.append((features[0], max(stem)))
        return seconds_by_base_and_stem[(features[0], max(stem))]
    time_fn.calls = calls
    return time_fn


def plan(cfg: TrainConfig, time_fn, device=CPU, n_val=10):
    return plan_recipe(cfg, patch=[40, 56, 40], spacing=[1.0, 1.0, 1.0], num_classes=3, in_channels=1,
                       n_val_cases=n_val, device=device, time_fn=time_fn)


CPU_TIMES = {(8, 2): 0.07, (16, 2): 0.13, (8, 1): 0.18, (16, 1): 0.4, (24, 1): 0.9, (32, 1): 1.3}


def test_planner_takes_the_most_capable_network_that_fits_the_budget():
    budget_min = 8
    recipe = plan(TrainConfig(time_limit_min=budget_min), fake_timer(CPU_TIMES))
    usable = budget_min * 60 * 0.9
    fitting = [k for k in CPU_LADDER if usable / CPU_TIMES[k] >= min_iterations("light_no_mirror")]
    base, stem = fitting[-1]
    assert (base, stem) == (8, 1)  # with these times: the full-resolution narrow network
    assert recipe.features[0] == base and max(recipe.stem_stride) == stem
    assert recipe.reasons["features"].startswith("the most capable candidate")
    # every candidate up to the first that does not fit was timed, and is recorded
    assert len(recipe.calibration) == len(fitting) + 1
    # a short run gets light augmentation without mirroring, epochs of ~1/40 of the budget, an unbounded epoch count
    assert recipe.augment == "light_no_mirror" and recipe.max_epochs >= 10_000
    assert recipe.iterations_per_epoch == round(budget_min * 60 / 40 / CPU_TIMES[(base, stem)])


def test_a_mirrored_run_needs_more_iterations_so_it_gets_a_cheaper_network():
    """Mirroring slows learning (README "Training recipe"): a candidate must fit MIN_ITERATIONS_MIRRORED iterations
    when the configured augmentation mirrors, MIN_ITERATIONS otherwise."""
    assert min_iterations("light_no_mirror") == min_iterations("none") == MIN_ITERATIONS
    assert min_iterations("light") == min_iterations("full") == MIN_ITERATIONS_MIRRORED > MIN_ITERATIONS
    usable = 8 * 60 * 0.9  # (8, 1) fits 2,400 iterations, (16, 2) 3,323, (8, 2) 6,171
    planned = plan(TrainConfig(time_limit_min=8), fake_timer(CPU_TIMES))
    mirrored = plan(TrainConfig(time_limit_min=8, augment="light"), fake_timer(CPU_TIMES))
    assert (planned.features, planned.stem_stride) == ([8, 16, 32, 64], [1, 1, 1])
    assert usable / CPU_TIMES[(8, 1)] >= MIN_ITERATIONS
    assert (mirrored.features[0], max(mirrored.stem_stride)) == (8, 2)
    assert usable / CPU_TIMES[(16, 2)] < MIN_ITERATIONS_MIRRORED <= usable / CPU_TIMES[(8, 2)]
    assert f">= {MIN_ITERATIONS_MIRRORED} iterations (light)" in mirrored.reasons["features"]


def test_a_longer_budget_buys_a_larger_network_and_full_augmentation():
    short = plan(TrainConfig(time_limit_min=2), fake_timer(CPU_TIMES))
    long = plan(TrainConfig(time_limit_min=1200), fake_timer(CPU_TIMES))
    assert sum(long.features) > sum(short.features)
    assert long.augment == "full" and short.augment == "light_no_mirror"


def test_a_tiny_budget_still_gets_the_cheapest_network():
    recipe = plan(TrainConfig(time_limit_min=0.05), fake_timer(CPU_TIMES))
    assert (recipe.features[0], max(recipe.stem_stride)) == CPU_LADDER[0]
    assert "cheapest" in recipe.reasons["features"]


def test_gpu_ladder_scales_up():
    gpu_times = {(16, 1): 0.02, (24, 1): 0.03, (32, 1): 0.05}
    recipe = plan(TrainConfig(time_limit_min=10), fake_timer(gpu_times), device=torch.device("cuda"))
    assert recipe.features[0] == 32 and recipe.stem_stride == [1, 1, 1]


def test_explicit_values_are_used_exactly():
    """Acceptance 5 of issue 9: the planner only fills gaps."""
    cfg = TrainConfig(time_limit_min=8, features=[12, 24, 48], stem_stride=[2, 2, 1], batch_size=3,
                      iterations_per_epoch=17, max_epochs=9, val_every=4, augment="full", ema_decay=0.0)
    timer = fake_timer({(12, 2): 0.5})
    recipe = plan(cfg, timer)
    assert recipe.features == [12, 24, 48] and recipe.stem_stride == [2, 2, 1] and recipe.batch_size == 3
    assert recipe.iterations_per_epoch == 17 and recipe.max_epochs == 9 and recipe.val_every == 4
    assert recipe.augment == "full" and recipe.ema_decay == 0.0
    assert all(recipe.reasons[k] == "set in the config" for k in ("features", "stem_stride", "batch_size",
                                                                 "iterations_per_epoch", "max_epochs", "val_every",
                                                                 "augment", "ema_decay"))


def test_no_weights_average_unless_the_config_sets_one():
    recipe = plan(TrainConfig(time_limit_min=8), fake_timer(CPU_TIMES))
    assert recipe.ema_decay == 0.0 and "ema_decay" not in recipe.identity()  # as recipes planned before it
    assert plan(TrainConfig(time_limit_min=8, ema_decay=0.999), fake_timer(CPU_TIMES)).ema_decay == 0.999


def test_the_weights_average_forgets_the_initial_weights_and_then_follows_slowly():
    from unet3d.train import weight_average

    assert weight_average(torch.nn.Linear(2, 2), 0.0) is None
    net = torch.nn.Linear(3, 1, bias=False)
    average = weight_average(net, 0.99)
    with torch.no_grad():
        net.weight.fill_(0.0)
    average.update_parameters(net)  # the first update copies
    assert torch.equal(average.module.weight, net.weight)
    with torch.no_grad():
        net.weight.fill_(1.0)
    for _ in range(5):  # early on the decay warms up: (1 + n) / (10 + n), well below 0.99
        average.update_parameters(net)
    early = float(average.module.weight[0, 0].detach())
    expected = 1.0
    for n in range(1, 6):
        expected *= (1 + n) / (10 + n)
    assert early == pytest.approx(1 - expected, abs=1e-6) and early > 1 - 0.99 ** 5


def test_without_a_budget_the_defaults_are_todays():
    timer = fake_timer({})
    recipe = plan(TrainConfig(), timer)
    assert timer.calls == []  # nothing to calibrate against
    assert recipe.features == [16, 32, 64, 128] and recipe.stem_stride == [1, 1, 1]
    assert recipe.max_epochs == 50 and recipe.iterations_per_epoch == 50 and recipe.val_every == 1


def test_train_config_refuses_non_finite_and_malformed_recipe_values():
    for bad in ({"lr": float("inf")}, {"lr": float("nan")}, {"time_limit_min": float("inf")},
                {"stem_stride": [2, 2]}, {"features": [8]}, {"patch_size": [0, 8, 8]}):
        with pytest.raises(ConfigError) as err:
            parse_config({"cohort": {"name": "c"}, "labels": {1: "a"}, "train": bad})
        assert f"train.{next(iter(bad))}" in str(err.value)
    assert TrainConfig(augment=True).augment == "full" and TrainConfig(augment=False).augment == "none"


@pytest.mark.parametrize("shape", [(37, 51, 35), (40, 56, 40), (9, 11, 7)])
def test_strided_stem_network_returns_full_resolution_logits(shape):
    net = build_network("unet3d", 1, 3, features=[8, 16, 32], strides=[(1, 1, 1), (2, 2, 2), (2, 2, 2)],
                        deep_supervision=True, stem_stride=2)
    x = torch.randn(2, 1, *shape)
    outs = net(x)
    assert tuple(outs[0].shape) == (2, 3, *shape)
    assert len(outs) == 2 and all(o.shape[2] < shape[0] for o in outs[1:])
    net.eval()
    assert tuple(net(x).shape) == (2, 3, *shape)
    # the stem halves the work of stage 0: fewer multiply-adds than the same widths at full resolution
    plain = build_network("unet3d", 1, 3, features=[8, 16, 32], strides=[(1, 1, 1), (2, 2, 2), (2, 2, 2)])
    assert sum(p.numel() for p in net.parameters()) < 2 * sum(p.numel() for p in plain.parameters())


def test_center_crop_takes_the_middle():
    x = torch.arange(10 * 12 * 8).reshape(1, 1, 10, 12, 8)
    c = center_crop(x, [6, 8, 4])
    assert tuple(c.shape) == (1, 1, 6, 8, 4) and c[0, 0, 0, 0, 0] == x[0, 0, 2, 2, 2]


def test_largest_component_and_the_validation_rule():
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[5:10, 5:10, 5:10] = 1
    noisy = ref.copy()
    noisy[15:17, 15:17, 15:17] = 1  # a false-positive blob
    cleaned = keep_largest_component(noisy, [1])
    assert (cleaned == ref).all()
    choice = choose_postprocessing([noisy], [ref], [1])
    assert choice["largest_component"] == [1] and choice["val_dice_after"] > choice["val_dice_before"]
    # a class whose true shape has two pieces keeps both: the step is not chosen
    two = ref.copy()
    two[14:18, 14:18, 14:18] = 1
    assert choose_postprocessing([two], [two], [1])["largest_component"] == []
    assert (apply_postprocessing(two, {"largest_component": []}) == two).all()


def test_training_records_and_reuses_its_planned_recipe(tmp_path):
    from tests.test_train import tiny_spec
    from unet3d.train import train

    spec = tiny_spec(tmp_path / "store", tmp_path / "out", features=None, augment=None, iterations_per_epoch=None,
                     max_epochs=None, time_limit_min=0.3, deterministic=False)
    train(spec, progress=False)
    meta = json.loads((tmp_path / "out" / "model.json").read_text())
    recipe = meta["recipe"]
    assert recipe["calibration"] and recipe["reasons"]["features"]
    assert meta["model"]["features"] == recipe["features"]
    assert meta["model"]["stem_stride"] == recipe["stem_stride"]
    assert "postprocess" in meta and set(meta["postprocess"]) >= {"largest_component", "val_dice_before"}
    saved = json.loads((tmp_path / "out" / "recipe.json").read_text())
    # a second run of the same spec (a longer budget) reuses the recipe instead of re-timing it
    spec.train["time_limit_min"] = 0.4
    train(spec, progress=False)
    assert json.loads((tmp_path / "out" / "recipe.json").read_text()) == saved


def test_the_time_budget_ends_a_run_inside_an_epoch(tmp_path):
    """Issue 11 item 10: `time_limit_min: 1` ran 178 s because the limit was checked only between epochs."""
    import pandas as pd

    from tests.test_train import tiny_spec
    from unet3d.train import train

    spec = tiny_spec(tmp_path / "store", tmp_path / "out", iterations_per_epoch=100_000, max_epochs=3,
                     time_limit_min=0.05)
    result = train(spec, progress=False)
    log = pd.read_parquet(result.log_path)
    assert result.stopped_by == "time_limit" and len(log) == 1
    assert 0 < int(log["iterations"].iloc[0]) < 100_000
    assert (tmp_path / "out" / "checkpoint_best.pt").exists()


def test_a_cascade_shares_its_time_between_stages():
    from unet3d.recipe import ROI_STAGE_SHARE, stage_time_budgets

    first, second = stage_time_budgets(8, [None, None])
    assert first == pytest.approx(16 * ROI_STAGE_SHARE) and second == pytest.approx(16 * (1 - ROI_STAGE_SHARE))
    assert stage_time_budgets(8, [None]) == [8]  # a single stage keeps its budget
    assert stage_time_budgets(None, [None, None]) == [None, None]  # epochs, not time, bound the run
    assert stage_time_budgets(8, [3, None]) == [3, 8]  # a stage's own budget is used as given


def test_stage_settings_give_each_cascade_stage_its_share(tmp_path):
    from flows.cache_keys import train_settings

    cfg = parse_config({"cohort": {"name": "c"}, "labels": {1: "a", 2: "b"},
                        "stages": [{"name": "roi", "classes": {1: "x"}, "merge": {1: [1, 2]}, "spacing_factor": 2},
                                   {"name": "final", "classes": {1: "a", 2: "b"}, "roi_from": "roi"}],
                        "train": {"time_limit_min": 8}})
    budgets = [train_settings(cfg, s)[1]["time_limit_min"] for s in cfg.resolved_stages()]
    assert budgets[0] < 8 < budgets[1] and sum(budgets) == pytest.approx(16)


def test_warping_a_context_padded_patch_leaves_no_zero_corners():
    """Issue 9: augmentation samples a larger region and crops after the warp (as nnU-Net does), so a rotated
    patch inside a large volume carries image in its corners, not the zeros a warp of the bare patch brings in."""
    from unet3d.augment import AugmentConfig, BatchAugmenter

    patch = [24, 32, 20]
    config = AugmentConfig(p_flip=0.0, p_rotate=1.0, max_rotation_deg=15.0, p_scale=1.0, scale_range=(0.85, 1.2),
                           p_elastic=0.0, p_noise=0.0, p_blur=0.0, p_brightness=0.0, p_contrast=0.0, p_lowres=0.0,
                           p_gamma=0.0)
    augmenter = BatchAugmenter(config)
    big = [p + 2 * c for p, c in zip(patch, augmenter.context(patch))]
    gen = torch.Generator().manual_seed(3)  # 16 samples: angles and zooms across their ranges
    bare, _ = augmenter(torch.ones(16, 1, *patch), torch.zeros(16, 1, *patch, dtype=torch.uint8), gen)
    assert (bare == 0).any()  # the warp of the bare patch brings zeros into the corners
    padded, _ = augmenter(torch.ones(16, 1, *big), torch.zeros(16, 1, *big, dtype=torch.uint8), gen)
    assert (center_crop(padded, patch) > 0.99).all()


def test_context_padding_does_not_move_the_patches(tmp_path):
    """The crop of a context-padded patch is exactly the patch drawn without context: the volume's border
    voxels stay reachable and foreground stays where oversampling put it (the padding only adds surround)."""
    from tests.test_train import make_store_case
    from unet3d.sampling import PatchSampler, load_case

    cases = [load_case(make_store_case(tmp_path, f"c{i}", shape=(30, 28, 20), seed=i), {1: 1, 2: 2}) for i in range(3)]
    plain = PatchSampler(cases, (16, 12, 8), 6, CPU, foreground_oversample=0.5)
    padded = PatchSampler(cases, (16, 12, 8), 6, CPU, foreground_oversample=0.5, context=(3, 2, 4))
    for seed in range(5):
        image, label = plain.sample(np.random.default_rng(seed))
        big_image, big_label = padded.sample(np.random.default_rng(seed))
        assert tuple(big_image.shape[2:]) == (22, 16, 16)
        assert torch.equal(center_crop(big_image, (16, 12, 8)), image)
        assert torch.equal(center_crop(big_label, (16, 12, 8)), label)


def test_a_run_the_budget_ends_between_epochs_still_validates_its_last_epoch(tmp_path):
    """The budget ran out exactly at an epoch boundary, on an epoch that `val_every` skipped: the next epoch
    stopped before training and nothing was validated, so the log had no `val_dice_mean` column at all and the
    best checkpoint carried no Dice (the GPU check's dry run failed on this in CI)."""
    import pandas as pd

    from tests.test_train import tiny_spec
    from unet3d.train import train

    # one iteration per epoch: the first epoch always runs whole, and a budget of under a second is spent by then
    spec = tiny_spec(tmp_path / "store", tmp_path / "out", iterations_per_epoch=1, max_epochs=50, val_every=10,
                     time_limit_min=0.0001)
    result = train(spec, progress=False)
    log = pd.read_parquet(result.log_path)
    assert result.stopped_by == "time_limit" and len(log) == 1
    assert "val_dice_mean" in log.columns and log["val_dice_mean"].notna().iloc[-1]
    assert result.best_val_dice is not None and result.best_epoch == 0


def test_the_kept_model_is_the_weights_average(tmp_path):
    from tests.test_train import tiny_spec
    from unet3d.train import train

    spec = tiny_spec(tmp_path / "store", tmp_path / "out", max_epochs=1, iterations_per_epoch=6, ema_decay=0.9)
    result = train(spec, progress=False)
    best = torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)["model"]
    latest = torch.load(result.latest_checkpoint, map_location="cpu", weights_only=True)
    averaged = {k[len("module."):]: v for k, v in latest["average"].items() if k.startswith("module.")}
    assert best.keys() == averaged.keys() == latest["model"].keys()
    assert all(torch.equal(best[k], averaged[k]) for k in best)  # validated and kept: the average
    assert not all(torch.equal(best[k], latest["model"][k]) for k in best)  # not the last step's weights
