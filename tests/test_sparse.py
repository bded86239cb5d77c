"""Sparse annotation (Çiçek et al.'s semi-automatic setting): a configurable ignore value honoured by ingestion, the
label mapping, the loss, patch sampling and evaluation, and the fill-in Dice on unannotated voxels against dense
references (unet3d/sparse.py, the evaluate stage's `fill_in` table and the report)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from image_files import write
from unet3d.config import ConfigError, parse_config
from unet3d.labels import IGNORE_LABEL, map_labels
from unet3d.sparse import annotated_mask, evenly_spaced_slices, fill_in_dice, sparsify

IGNORE = 100  # a non-default ignore value: everything below must work with it, not only with 255


# ---------------------------------------------------------------------------------------------------------
# the ignore value through the label mapping, the loss and the sampler
# ---------------------------------------------------------------------------------------------------------
def test_a_custom_ignore_value_becomes_the_stage_ignore_code_and_255_is_then_an_ordinary_value():
    label = np.array([0, 1, 2, IGNORE, 255], dtype=np.uint8)
    assert map_labels(label, {1: 1, 2: 1}, IGNORE).tolist() == [0, 1, 1, IGNORE_LABEL, 0]
    assert map_labels(label, {1: 1, 2: 1, 255: 2}, IGNORE).tolist() == [0, 1, 1, IGNORE_LABEL, 2]
    # the default: 255 is ignored, 100 is an unmapped value (background), exactly as before the setting existed
    assert map_labels(label, {1: 1, 2: 1}).tolist() == [0, 1, 1, 0, IGNORE_LABEL]
    # an ignore value above uint8's range in a 16-bit label
    wide = np.array([0, 1, 300], dtype=np.uint16)
    assert map_labels(wide, {1: 1}, 300).tolist() == [0, 1, IGNORE_LABEL]


def test_the_loss_with_a_custom_ignore_value_depends_only_on_labelled_voxels():
    from unet3d.losses import DiceCELoss

    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 6, 5, 4))
    target[:, :3] = 7  # a custom ignore index: half of every volume unlabelled
    loss_fn = DiceCELoss(ignore_index=7)
    logits = torch.randn(2, 3, 6, 5, 4, requires_grad=True)
    loss = loss_fn(logits, target)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.all(grad[:, :, :3] == 0)  # ignored voxels get no gradient
    assert torch.any(grad[:, :, 3:] != 0)
    # the ignored voxels' logits do not change the loss
    other = logits.detach().clone()
    other[:, :, :3] = torch.randn_like(other[:, :, :3]) * 10
    assert torch.allclose(loss_fn(other, target), loss.detach())
    # and its cross-entropy term is torch's own with that ignore_index
    ce_only = DiceCELoss(ignore_index=7, dice_weight=0.0)
    reference = torch.nn.functional.cross_entropy(logits.detach(), target, ignore_index=7)
    assert torch.allclose(ce_only(logits.detach(), target), reference)


def _case_folder(folder: Path, label: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    np.save(folder / "image.npy", np.zeros((1, *label.shape), dtype=np.float32))
    np.save(folder / "label.npy", label)
    (folder / "props.json").write_text(json.dumps({"case_id": folder.name, "effective_spacing": [1.0, 1.0, 1.0]}))
    return folder


def test_foreground_oversampling_never_centres_on_ignored_voxels(tmp_path):
    from unet3d.sampling import load_case

    label = np.zeros((8, 8, 8), dtype=np.uint8)
    label[2:4, 2:4, 2:4] = 1
    label[5:8] = IGNORE  # unannotated
    case = load_case(_case_folder(tmp_path / "c", label), {1: 1}, ignore_value=IGNORE)
    assert np.all(case.label[5:8] == IGNORE_LABEL)  # left out of the loss
    assert set(case.foreground) == {1}
    assert all(label[tuple(c)] == 1 for c in case.foreground[1])
    # without the setting, 100 would be an unmapped value: trained as background
    assert np.all(load_case(tmp_path / "c", {1: 1}).label[5:8] == 0)


# ---------------------------------------------------------------------------------------------------------
# sparse labels from annotated slices; the fill-in Dice
# ---------------------------------------------------------------------------------------------------------
def test_slices_are_spread_through_the_structure_and_everything_else_is_ignored():
    label = np.zeros((20, 10, 12), dtype=np.uint8)
    label[4:13, 2:7, 3:10] = 2  # extent: x 4-12, y 2-6, z 3-9
    slices = evenly_spaced_slices(label, 3, IGNORE)
    assert slices == {0: [6, 8, 10], 1: [3, 4, 5], 2: [4, 6, 8]}
    sparse = sparsify(label, slices, IGNORE)
    mask = annotated_mask(label.shape, slices)
    assert np.array_equal(sparse[mask], label[mask]) and np.all(sparse[~mask] == IGNORE)
    assert mask.sum() == 3 * 10 * 12 + 3 * 20 * 12 + 3 * 20 * 10 - 3 * 3 * (12 + 10 + 20) + 27
    assert evenly_spaced_slices(sparse, 3, IGNORE) == slices  # the ignored voxels are not structure
    with pytest.raises(ValueError, match="outside axis 1"):
        annotated_mask(label.shape, {1: [10]})


def test_fill_in_dice_counts_only_unannotated_voxels():
    dense = np.zeros((4, 4, 2), dtype=np.uint8)
    dense[:2, :, :] = 1  # 16 voxels of class 1
    sparse = dense.copy()
    sparse[:, :2, :] = IGNORE  # the voxels with y < 2 were not annotated: 8 of class 1 among them
    pred = np.zeros_like(dense)
    pred[:, 2:, :] = 1  # wrong everywhere on the annotated half: must not count
    pred[0, :2, :] = 1  # 4 right on the unannotated half
    pred[3, :2, :] = 1  # 4 wrong there
    scores = fill_in_dice(pred, dense, sparse, [1], IGNORE)[1]
    assert scores["n_unannotated"] == 16 and scores["ref_voxels"] == 8 and scores["pred_voxels"] == 8
    assert scores["dice"] == pytest.approx(2 * 4 / (8 + 8))
    # a fully annotated case has nothing filled in
    assert fill_in_dice(pred, dense, dense, [1], IGNORE)[1]["dice"] is None
    # a class absent from the unannotated part of both: the metrics' empty-mask rule (1.0)
    assert fill_in_dice(np.zeros_like(dense), np.zeros_like(dense), sparse, [1], IGNORE)[1]["dice"] == 1.0


def test_sparse_val_and_test_cases_are_scored_on_their_annotated_voxels_only(tmp_path):
    from unet3d.evaluation import EvaluatedCase, EvaluatedStage, evaluate_case

    reference = np.zeros((6, 6, 4), dtype=np.uint8)
    reference[1:3, 1:3, :] = 1
    reference[:, 4:, :] = IGNORE  # 48 unannotated voxels
    pred = np.zeros_like(reference)
    pred[1:3, 1:3, :] = 1
    pred[:, 4:, :] = 1  # all "wrong" if the ignored voxels counted as background
    case = EvaluatedCase("c", "val", write(tmp_path / "ref.nii.gz", reference),
                         {"s": write(tmp_path / "pred.nii.gz", pred)})
    rows, _ = evaluate_case(case, [EvaluatedStage("s", {1: "organ"}, {1: 1}, ignore_value=IGNORE)], "x", "unet3d")
    row = rows[0]
    assert (row["tp"], row["fp"], row["fn"]) == (16, 0, 0) and row["dice"] == 1.0
    assert row["tp"] + row["fp"] + row["fn"] + row["tn"] == reference.size - 48


# ---------------------------------------------------------------------------------------------------------
# config: validated, and at its default no key changes
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data, message", [
    ({"labels": {1: "a", 100: "b"}, "ignore_label": 100}, "ignore_label: 100 is also declared in labels as 'b'"),
    ({"labels": {1: "a"}, "ignore_label": 0}, "ignore_label: Input should be greater than or equal to 1"),
    ({"stages": [{"name": "s", "classes": {1: "a"}, "merge": {1: [1, 100]}}], "ignore_label": 100},
     "stages.s: label value 100 is the ignore_label"),
])
def test_a_bad_ignore_label_is_refused_naming_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"cohort": {"name": "c"}, **data})


def test_the_ignore_value_changes_only_the_keys_it_changes_and_none_at_its_default(monkeypatch):
    import flows.cache_keys as K

    monkeypatch.setattr(K, "source_fingerprint", lambda *roots: "fp")
    monkeypatch.setattr(K, "content_rows", lambda ws, cohort: [["c1", "a", "l"]])
    monkeypatch.setattr(K, "cohort_fingerprint", lambda ws, cohort: "cf")
    monkeypatch.setattr(K, "training_members", lambda ws, cfg: [["c1", "train", "a", "l"]])
    base = {"cohort": {"name": "c", "source": "/data"}, "labels": {1: "a"}}
    preprocess = {"plan_ids": {"1.0": "p"}}

    def keys(cfg):
        stage = cfg.resolved_stages()[0]
        return {"ingest": K.key_ingest("ws", cfg), "preprocess": K.key_preprocess("ws", cfg),
                "split": K.key_split("ws", cfg), "train": K.key_train("ws", cfg, stage, preprocess),
                "model": K.model_identity("ws", cfg, stage, preprocess), "evaluate": K.key_evaluate(cfg, {"key": "i"})}

    before = keys(parse_config(base))
    assert keys(parse_config({**base, "ignore_label": None})) == before
    custom = keys(parse_config({**base, "ignore_label": IGNORE}))
    # preprocess too: a CT plan's foreground intensities leave the unannotated voxels out
    assert {k for k in before if before[k] != custom[k]} == {"ingest", "preprocess", "train", "model", "evaluate"}
    dense = keys(parse_config({**base, "cohort": {**base["cohort"], "dense_labels_dir": "/dense"}}))
    assert {k for k in before if before[k] != dense[k]} == {"evaluate"}


# ---------------------------------------------------------------------------------------------------------
# end to end: a sparsely annotated cohort with a non-default ignore value
# ---------------------------------------------------------------------------------------------------------
def _sparse_cohort(dense_cohort: Path, root: Path) -> tuple[Path, Path]:
    """A copy of an MSD cohort whose labels keep 3 slices per axis (the rest IGNORE), and its dense labels apart."""
    source, dense = root / "sparse_cohort", root / "dense_labels"
    shutil.copytree(dense_cohort, source, ignore=shutil.ignore_patterns("labelsTr"))
    shutil.copytree(dense_cohort / "labelsTr", dense)
    (source / "labelsTr").mkdir()
    for path in sorted(dense.glob("*.nii.gz")):
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image)
        sparse = sitk.GetImageFromArray(sparsify(array, evenly_spaced_slices(array, 3, IGNORE), IGNORE))
        sparse.CopyInformation(image)
        sitk.WriteImage(sparse, str(source / "labelsTr" / path.name))
    return source, dense


def test_sparse_labels_are_refused_unless_the_ignore_value_is_configured(tiny_cohort, tmp_path):
    from data_catalog.ingest import ingest

    source, _dense = _sparse_cohort(tiny_cohort, tmp_path)
    refused = ingest(source, "sparse", tmp_path / "ws")
    assert refused.n_ok == 0  # dataset.json declares 0-2: the value 100 is undeclared
    # the same workspace, the ignore value now configured: the unchanged files are validated again, not reused
    accepted = ingest(source, "sparse", tmp_path / "ws", ignore_label=IGNORE)
    assert accepted.n_ok == accepted.n_cases == 12


def test_a_sparse_cohort_trains_densifies_its_training_volumes_and_reports_the_fill_in_dice(tiny_cohort, tmp_path):
    from flows.pipeline import pipeline_flow
    from pipeline_helpers import write_config

    source, dense = _sparse_cohort(tiny_cohort, tmp_path)
    config = write_config(tmp_path / "sparse.yaml", source, cohort={"dense_labels_dir": str(dense)},
                          ignore_label=IGNORE, infer={"splits": ["train", "val", "test"]},
                          stages=[{"name": "organ", "classes": {1: "organ"}, "merge": {1: [1, 2]},
                                   "spacing_factor": 2.0}])
    ws = tmp_path / "ws"
    results = pipeline_flow(config_path=str(config), workspace=str(ws))
    assert results["ingest"]["n_ok"] == 12  # not quarantined

    fill_in = pd.read_parquet(results["evaluate"]["fill_in_path"])
    splits = results["infer"]["splits"]
    assert set(fill_in["case_id"]) == set(splits)  # every predicted case has a dense reference here
    assert "train" in set(fill_in["split"])  # the training volumes themselves were densified
    run_id = results["report"]["run_id"]
    for row in fill_in.itertuples():
        sparse = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "labelsTr" / f"{row.case_id}.nii.gz")))
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(dense / f"{row.case_id}.nii.gz"))) > 0
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(ws / "predictions" / run_id / "organ" /
                                                         f"{row.case_id}.nii.gz"))) == 1
        unannotated = sparse == IGNORE
        p, r = pred & unannotated, reference & unannotated
        assert row.n_unannotated == unannotated.sum() and row.ref_voxels == r.sum() and row.pred_voxels == p.sum()
        expected = 2 * (p & r).sum() / (p.sum() + r.sum()) if p.sum() + r.sum() else 1.0
        assert row.dice == pytest.approx(expected)

    metrics = pd.read_parquet(results["evaluate"]["metrics_path"])
    for row in metrics.itertuples():  # every split is scored on the annotated voxels only
        sparse = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "labelsTr" / f"{row.case_id}.nii.gz")))
        assert row.tp + row.fp + row.fn + row.tn == (sparse != IGNORE).sum()
    report = Path(results["report"]["report_md"]).read_text()
    assert "## Filled-in voxels (sparse annotation)" in report
