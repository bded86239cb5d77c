"""The training engine: patch sampling, exact resume after SIGKILL, DDP on CPU with gloo."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from unet3d.labels import map_labels
from unet3d.sampling import PatchSampler, load_case, plan_patch_size
from unet3d.train import TrainSpec, train

REPO = Path(__file__).resolve().parent.parent


def make_store_case(root: Path, case_id: str, shape=(20, 22, 14), seed=0, spacing=(1.0, 1.0, 1.0)) -> Path:
    """A preprocessed case folder as the store writes it: a bright blob (class 1) with a core (class 2)."""
    rng = np.random.default_rng(seed)
    d = root / f"{case_id}__0000"
    d.mkdir(parents=True)
    label = np.zeros(shape, np.uint8)
    c = [s // 2 + int(rng.integers(-2, 3)) for s in shape]
    label[c[0] - 4:c[0] + 4, c[1] - 4:c[1] + 4, c[2] - 3:c[2] + 3] = 1
    label[c[0] - 1:c[0] + 2, c[1] - 1:c[1] + 2, c[2] - 1:c[2] + 1] = 2
    image = rng.normal(0, 0.3, shape).astype(np.float32) + label.astype(np.float32)
    np.save(d / "image.npy", image[None])
    np.save(d / "label.npy", label)
    (d / "props.json").write_text(json.dumps({"case_id": case_id, "effective_spacing": list(spacing)}))
    return d


def tiny_spec(root: Path, out: Path, **train_overrides) -> TrainSpec:
    cases = [str(make_store_case(root, f"c{i}", seed=i)) for i in range(5)]
    train_cfg = {"architecture": "unet3d", "features": [4, 8, 16], "max_epochs": 4, "iterations_per_epoch": 3,
                 "batch_size": 2, "patch_size": [16, 16, 12], "device": "cpu", "threads": 1, "deterministic": True,
                 "seed": 7, "deep_supervision": True, "augment": True, "optimizer": "adamw", "lr": 3e-3}
    train_cfg.update(train_overrides)
    return TrainSpec(out_dir=str(out), train_cases=cases[:4], val_cases=cases[4:], classes={1: "outer", 2: "core"},
                     label_map={1: 1, 2: 2}, train=train_cfg)


def test_sampler_pads_small_volumes_and_oversamples_foreground(tmp_path):
    case = load_case(make_store_case(tmp_path, "a", shape=(10, 12, 8)), {1: 1, 2: 2})
    sampler = PatchSampler([case], (16, 16, 12), batch_size=8, device=torch.device("cpu"), foreground_oversample=1.0)
    image, label = sampler.sample(np.random.default_rng(0))
    assert image.shape == (8, 1, 16, 16, 12) and label.shape == (8, 1, 16, 16, 12)
    assert label.dtype == torch.uint8
    # the volume (10x12x8) sits inside every patch: all its foreground is there, the rest is padding
    assert (label == 1).flatten(1).sum(1).min() == int((case.label == 1).sum())
    assert (image == 0).flatten(1).sum(1).min() >= 16 * 16 * 12 - 10 * 12 * 8


def test_sampler_on_device_and_on_host_agree(tmp_path):
    cases = [load_case(make_store_case(tmp_path, f"c{i}", shape=(30, 28, 20), seed=i), {1: 1, 2: 2}) for i in range(3)]
    host = PatchSampler(cases, (16, 16, 12), 4, torch.device("cpu"), 0.5)
    dev = PatchSampler(cases, (16, 16, 12), 4, torch.device("cpu"), 0.5, keep_on_device=True)
    a, b = host.sample(np.random.default_rng(3)), dev.sample(np.random.default_rng(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_sampler_roi_region_zeroes_everything_outside_the_box(tmp_path):
    case = load_case(make_store_case(tmp_path, "a", shape=(30, 30, 20)), {1: 1, 2: 2},
                     roi={"label_values": [2], "margin_mm": 1.0})
    assert case.roi_box is not None
    width = [b - a for a, b in case.roi_box]
    sampler = PatchSampler([case], (16, 16, 12), 4, torch.device("cpu"), 0.0, roi_jitter_mm=0.0)
    image, label = sampler.sample(np.random.default_rng(0))
    assert int((image != 0).flatten(1).sum(1).max()) <= int(np.prod(width))
    assert int((label == 1).sum()) > 0  # part of the outer class inside the box stays


def test_map_labels_and_patch_planning():
    label = np.array([0, 1, 2, 3, 255], dtype=np.uint8)
    assert map_labels(label, {1: 1, 2: 1}).tolist() == [0, 1, 1, 0, 255]
    assert plan_patch_size([(35, 50, 36)] * 3, (1, 1, 1), 128**3) == [40, 56, 40]  # nnU-Net's hippocampus patch
    big = plan_patch_size([(512, 512, 120)], (0.7, 0.7, 2.5), 128**3)
    extent = np.asarray(big) * [0.7, 0.7, 2.5]
    assert np.prod(big) <= 128**3 and extent.max() / extent.min() < 1.5  # shrunk along the longest physical axes


def test_on_a_cpu_the_patch_fits_the_structure_not_the_whole_scan(tmp_path):
    """Foreground extents (a compute-bound device) shrink the patch to the extent 90 % of the cases' structure
    fits in, never below half the scan (context), never above the whole-scan patch."""
    scans = [(35, 50, 36)] * 10
    hippocampus = [(22, 39, 26)] * 8 + [(25, 43, 30), (27, 48, 37)]  # MSD hippocampus: median and tail
    assert plan_patch_size(scans, (1, 1, 1), 128**3, foreground_extents=hippocampus) == [32, 48, 32]
    lesion = [(4, 5, 3)] * 10  # a small structure keeps half the scan around it
    assert plan_patch_size(scans, (1, 1, 1), 128**3, foreground_extents=lesion) == [24, 32, 24]
    organ = [(35, 50, 36)] * 10  # a structure that fills the scan keeps the whole-scan patch
    assert plan_patch_size(scans, (1, 1, 1), 128**3, foreground_extents=organ) == [40, 56, 40]

    label = np.zeros((30, 28, 20), np.uint8)
    label[3:9, 10:12, 4:5] = 1
    label[5, 11, 4] = 2  # every class counts
    label[20, 2, 19] = 255  # unannotated voxels are not foreground
    empty = np.zeros_like(label)
    for name, case_label in (("c", label), ("empty", empty)):
        d = tmp_path / f"{name}__0000"
        d.mkdir()
        np.save(d / "image.npy", np.zeros((1, 30, 28, 20), np.float32))
        np.save(d / "label.npy", case_label)
        (d / "props.json").write_text(json.dumps({"case_id": name, "effective_spacing": [1.0, 1.0, 1.0]}))
    assert load_case(tmp_path / "c__0000", {1: 1, 2: 2}).foreground_extent == (6, 2, 1)
    assert load_case(tmp_path / "empty__0000", {1: 1, 2: 2}).foreground_extent is None


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


# Run in a child: training through the CLI entry point, with its checkpoint writer wrapped so that epoch 2's latest
# checkpoint is killed mid-write (its temporary file written, not yet renamed into place). The child prints the
# epoch of the last complete checkpoint and waits for the SIGKILL.
KILL_MID_CHECKPOINT = r"""
import signal
import sys

import torch

import unet3d.train as train
from unet3d.io import atomic_path

save_torch_atomic = train.save_torch_atomic


def save_or_stall(obj, path):
    if path.name == "checkpoint_latest.pt" and obj["epoch"] == 2:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
            print(obj["epoch"] - 1, flush=True)
            while True:
                signal.pause()
    save_torch_atomic(obj, path)


train.save_torch_atomic = save_or_stall
sys.exit(train.main([sys.argv[1], "--no-progress"]))
"""


def test_resume_after_sigkill_ends_with_the_same_weights(tmp_path):
    # with a moving average of the weights: it is resumed exactly too
    spec_a = tiny_spec(tmp_path / "a_data", tmp_path / "a_out", ema_decay=0.9)
    result_a = train(spec_a, progress=False)
    assert result_a.epochs == 4 and Path(result_a.log_path).exists() and Path(result_a.curve_path).exists()

    spec_b = tiny_spec(tmp_path / "b_data", tmp_path / "b_out", ema_decay=0.9)
    spec_path = tmp_path / "spec_b.json"
    spec_path.write_text(spec_b.to_json())
    # The child stops itself at the crash point and says so on stdout; it is killed only then, so the kill can
    # neither come too late (training finished) nor land at a random moment.
    proc = subprocess.Popen([sys.executable, "-c", KILL_MID_CHECKPOINT, str(spec_path)], cwd=REPO,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, encoding="utf-8")
    try:
        # select only bounds a hung child; the line itself arrives at the crash point ("" if the child ended)
        reported = proc.stdout.readline() if select.select([proc.stdout], [], [], 300)[0] else ""
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
    killed_after = int(reported) if reported.strip() else None
    assert killed_after is not None and killed_after < 3, "training finished before it could be killed"
    out_b = Path(spec_b.out_dir)
    assert list(out_b.glob(".checkpoint_latest.pt.*")), "the kill did not land mid-write of a checkpoint"

    result_b = train(spec_b, progress=False)
    assert result_b.resumed_from_epoch is not None and result_b.resumed_from_epoch >= killed_after  # <= 1 epoch lost
    assert not list(out_b.glob(".checkpoint_latest.pt.*"))  # the killed writer's temporary was removed
    for key in ("model", "average"):  # the weights, and their moving average (what is validated and kept)
        wa = torch.load(result_a.latest_checkpoint, map_location="cpu", weights_only=True)[key]
        wb = torch.load(result_b.latest_checkpoint, map_location="cpu", weights_only=True)[key]
        assert wa.keys() == wb.keys()
        for name in wa:
            assert torch.equal(wa[name], wb[name]), (key, name)
    import pandas as pd
    log = pd.read_parquet(result_b.log_path)
    assert log["epoch"].tolist() == [0, 1, 2, 3]
    assert {"loss", "lr", "val_dice_outer", "val_dice_core", "val_dice_mean", "seconds"} <= set(log.columns)


def test_checkpoint_of_another_configuration_is_not_resumed(tmp_path):
    spec = tiny_spec(tmp_path / "d", tmp_path / "out", max_epochs=1)
    train(spec, progress=False)
    other = tiny_spec(tmp_path / "d2", tmp_path / "out", max_epochs=1, features=[4, 8, 8])
    assert train(other, progress=False).resumed_from_epoch is None


@pytest.mark.slow
def test_ddp_two_processes_on_cpu_with_gloo(tmp_path):
    spec = tiny_spec(tmp_path / "d", tmp_path / "out", max_epochs=2, deterministic=False)
    path = tmp_path / "spec.json"
    path.write_text(spec.to_json())
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29500 + os.getpid() % 1000), "-m", "unet3d.train", str(path), "--no-progress"],
                          cwd=REPO, env=env, capture_output=True, encoding="utf-8", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["epochs"] == 2 and result["world_size"] == 2
    assert Path(result["best_checkpoint"]).exists()


def test_the_structure_fitted_patch_is_planned_only_against_a_time_budget(tmp_path):
    """A CPU run against a time budget plans a patch that fits the structure (more iterations in the budget); a run
    of a fixed number of iterations keeps the whole-region patch (a smaller one would only see less)."""
    patches = {}
    for budget in (None, 5.0):
        spec = tiny_spec(tmp_path / f"d{budget}", tmp_path / f"out{budget}", patch_size=None, max_epochs=1,
                         iterations_per_epoch=1, time_limit_min=budget)
        train(spec, progress=False)
        patches[budget] = json.loads((tmp_path / f"out{budget}" / "model.json").read_text())["patch_size"]
    # regions 20x22x14 with an 8x8x6 blob: half the region (10x11x7) rounded up, against the whole region
    assert patches[None] == [24, 24, 16] and patches[5.0] == [16, 16, 8]


def test_test_time_augmentation_mirrors_only_over_the_axes_training_mirrored(tmp_path):
    """A network trained without mirroring, shown mirrored scans at test time, segments them badly (hippocampus:
    validation Dice 0.888 in one pass, 0.17 averaged over the 8 mirrorings). model.json records the axes training
    mirrored over, and prediction with test-time augmentation uses those only (none: one pass)."""
    from unet3d.inference import StageModel, trained_mirror_axes

    image = np.load(make_store_case(tmp_path / "probe", "probe", seed=11) / "image.npy")
    for augment, axes in (("none", ()), ("light", (0, 1, 2))):
        out = tmp_path / augment
        train(tiny_spec(tmp_path / f"d_{augment}", out, max_epochs=1, augment=augment), progress=False)
        meta = json.loads((out / "model.json").read_text())
        assert meta["mirror_axes"] == list(axes)
        model = StageModel.load(out, device="cpu")
        assert model.mirror_axes == axes
        one_pass = model.predict(image, tta=False)
        mirrored = model.predict(image, tta=True)
        assert np.array_equal(mirrored, one_pass) == (axes == ())
    # model.json written before the axes were recorded: the recipe's preset decides
    assert trained_mirror_axes({"recipe": {"augment": "none"}}) == ()
    assert trained_mirror_axes({"recipe": {"augment": "light"}}) == (0, 1, 2)
    assert trained_mirror_axes({"recipe": {"augment": "light_no_mirror"}}) == ()
    assert trained_mirror_axes({}) == (0, 1, 2)
