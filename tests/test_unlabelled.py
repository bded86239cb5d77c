"""Unlabelled scans as first-class cases: ingested and validated (MSD imagesTs/, cohort.unlabelled_source), never
in a split, segmented by the segment stage incrementally (a scan segmented by the same model chain is not segmented
again), and measured in the volumes table (unet3d.volumes) with its QC flags."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from pipeline_helpers import cached_stages, write_config

SHAPE, SPACING = (24, 24, 12), (4.0, 4.0, 8.0)


def _cohort(root: Path, n_cases: int = 10, seed: int = 5) -> Path:
    from data_catalog.demo import generate_demo_cohort

    return generate_demo_cohort(root, n_cases=n_cases, seed=seed, shape=SHAPE, base_spacing=SPACING)


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> list[Path]:
    """Images of another phantom cohort, to be given without their labels."""
    other = _cohort(tmp_path_factory.mktemp("other") / "cohort", n_cases=5, seed=11)
    return sorted((other / "imagesTr").glob("*.nii.gz"))


def _ingest(source: Path, ws: Path, unlabelled: Path | None = None):
    from data_catalog.ingest import ingest
    from data_catalog.tables import Catalog

    result = ingest(source, "t", ws, unlabelled=unlabelled)
    catalog = Catalog(ws)
    return result, catalog.cases(cohort="t").set_index("case_id"), catalog.read("issues")


# ---------------------------------------------------------------------------------------------------------
# ingestion and splits
# ---------------------------------------------------------------------------------------------------------
def test_imagesTs_and_unlabelled_folder_are_unlabelled_cases_never_split(tmp_path, scans):
    from data_catalog.splits import update_splits
    from data_catalog.tables import Catalog

    source = _cohort(tmp_path / "cohort")
    (source / "imagesTs").mkdir()
    shutil.copy(scans[0], source / "imagesTs" / "ts_001.nii.gz")
    (source / "labelsTr" / "demo_009.nii.gz").unlink()  # an imagesTr image whose label is missing: a defect
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    shutil.copy(scans[1], folder / "night_001.nii.gz")
    shutil.copy(scans[2], folder / "night_002_seg.nii.gz")  # a mask-like name is still a scan in this folder

    result, cases, issues = _ingest(source, tmp_path / "ws", folder)
    unlabelled = set(cases.index[cases["unlabelled"].eq(True)])
    assert unlabelled == {"ts_001", "night_001", "night_002_seg"}
    assert (cases.loc[sorted(unlabelled), "status"] == "ok").all()
    assert cases.loc[sorted(unlabelled), "label_path"].isna().all()
    assert cases.loc["night_001", "source_kind"] == "folder" and cases.loc["ts_001", "source_kind"] == "msd"
    # the imagesTr image without its label stays quarantined as label_missing; no unlabelled scan is
    assert cases.loc["demo_009", "status"] == "quarantined" and not cases.loc["demo_009", "unlabelled"]
    assert set(issues.loc[issues["code"] == "label_missing", "case_id"]) == {"demo_009"}
    assert result.n_cases == 13

    split = update_splits(tmp_path / "ws", "t", (0.6, 0.2, 0.2), 0)
    assigned = set(Catalog(tmp_path / "ws").read("splits")["case_id"])
    assert sum(split.counts.values()) == 9 and not assigned & unlabelled

    # unchanged files are not read again, and the flag survives the re-ingest
    again, cases, _ = _ingest(source, tmp_path / "ws", folder)
    assert again.unchanged == 13 and set(cases.index[cases["unlabelled"].eq(True)]) == unlabelled


def test_unlabelled_scans_get_every_image_check(tmp_path, scans):
    source = _cohort(tmp_path / "cohort")
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    shutil.copy(scans[0], folder / "fine.nii.gz")
    image = sitk.ReadImage(str(scans[1]), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[0, 0, 0] = np.nan
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(image)
    sitk.WriteImage(bad, str(folder / "nan_scan.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 6, 6, 6), np.float32)), str(folder / "four_d.nii.gz"))
    (folder / "truncated.nii.gz").write_bytes(scans[2].read_bytes()[:200])
    shutil.copy(scans[3], folder / "demo_000.nii.gz")  # the case id of a labelled case

    _, cases, issues = _ingest(source, tmp_path / "ws", folder)
    codes = issues[issues["severity"] == "error"].groupby("case_id")["code"].apply(set).to_dict()
    assert codes["nan_scan"] == {"non_finite"} and codes["four_d"] == {"not_3d"}
    assert codes["truncated"] == {"unreadable"} and codes["demo_000__unlabelled"] == {"duplicate_case_id"}
    assert cases.loc["demo_000", "status"] == "ok" and not cases.loc["demo_000", "unlabelled"]
    quarantined = set(cases.index[cases["status"] == "quarantined"])
    assert quarantined == {"nan_scan", "four_d", "truncated", "demo_000__unlabelled"}
    assert cases.loc["fine", "status"] == "ok" and cases.loc["fine", "unlabelled"]


def test_unlabelled_scans_of_a_multichannel_cohort_need_every_channel(tmp_path):
    from data_catalog.demo import generate_demo_cohort

    source = generate_demo_cohort(tmp_path / "cohort", n_cases=6, seed=1, shape=SHAPE, base_spacing=SPACING, channels=2)
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for channel in (0, 1):
        shutil.copy(source / "imagesTr" / f"demo_005_000{channel}.nii.gz", folder / f"scan_a_000{channel}.nii.gz")
    shutil.copy(source / "imagesTr" / "demo_004_0000.nii.gz", folder / "scan_b_0000.nii.gz")  # channel 1 missing
    _, cases, issues = _ingest(source, tmp_path / "ws", folder)
    assert cases.loc["scan_a", "status"] == "ok" and cases.loc["scan_a", "unlabelled"]
    assert [Path(f).name for f in cases.loc["scan_a", "image_files"]] == ["scan_a_0000.nii.gz", "scan_a_0001.nii.gz"]
    assert cases.loc["scan_b", "status"] == "quarantined"
    assert set(issues.loc[issues["case_id"] == "scan_b", "code"]) == {"channel_missing"}

    # a single-channel cohort: a scan's file of channel 1 is not a channel of its case (the models take one)
    single = _cohort(tmp_path / "single", n_cases=10)
    result, cases, _ = _ingest(single, tmp_path / "ws1", folder)
    assert [Path(f).name for f in cases.loc["scan_a", "image_files"]] == ["scan_a_0000.nii.gz"]
    assert any("scan_a_0001.nii.gz" in note and "one channel" in note for note in result.notes)


def test_config_unlabelled_source_is_resolved_and_checked(tmp_path):
    from flows.preflight import check_sources
    from unet3d.config import ConfigError, load_config

    (tmp_path / "scans").mkdir()
    (tmp_path / "cohort").mkdir()
    path = tmp_path / "c.yaml"
    path.write_text("cohort: {name: t, source: cohort, unlabelled_source: scans}\nlabels: {1: organ}\n")
    cfg = load_config(path)
    assert cfg.cohort.unlabelled_source == str((tmp_path / "scans").resolve())
    check_sources(cfg)
    path.write_text("cohort: {name: t, source: cohort, unlabelled_source: missing}\nlabels: {1: organ}\n")
    with pytest.raises(ConfigError, match="cohort.unlabelled_source: .*does not exist"):
        check_sources(load_config(path))
    path.write_text("cohort: {name: t, unlabelled_source: scans}\nlabels: {1: organ}\n")
    with pytest.raises(ConfigError, match="cohort.unlabelled_source: needs cohort.source"):
        check_sources(load_config(path))


def test_unet3d_ingest_takes_an_unlabelled_folder(tmp_path, scans):
    from data_catalog.tables import Catalog

    source = _cohort(tmp_path / "cohort")
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    shutil.copy(scans[0], folder / "night_001.nii.gz")
    done = subprocess.run([sys.executable, "-m", "flows.cli", "--workspace", str(tmp_path / "ws"), "ingest", str(source),
                           "--cohort", "t", "--unlabelled", str(folder)], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, encoding="utf-8", timeout=300, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "11 cases (11 ok, 0 quarantined)" in done.stdout and "1 unlabelled scans in" in done.stdout
    cases = Catalog(tmp_path / "ws").cases(cohort="t").set_index("case_id")
    assert cases["unlabelled"].eq(True).sum() == 1 and cases.loc["night_001", "unlabelled"]


def test_refreshing_segment_or_a_stage_it_does_not_read_recomputes_it_alone():
    from flows.pipeline import expand_refresh

    assert expand_refresh(["segment"]) == ["segment"]
    assert "segment" not in expand_refresh(["infer"]) and "segment" not in expand_refresh(["report"])
    assert expand_refresh(["train"]) == ["train", "infer", "evaluate", "report", "segment"]


# ---------------------------------------------------------------------------------------------------------
# volumes and QC flags (unet3d.volumes)
# ---------------------------------------------------------------------------------------------------------
def test_volumes_components_and_qc_flags_on_crafted_label_maps():
    from unet3d.volumes import VolumeRange, reference_volumes, scan_rows, touches_border, training_ranges

    spacing = (0.5, 2.0, 1.5)  # 1.5 mm^3 per voxel
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[5:8, 5:8, 5:8] = 1  # 27 voxels
    labels[12:14, 12:14, 12:14] = 1  # 8 more, a second component
    labels[3:5, 10:12, 10:11] = 2  # 4 voxels
    ranges = {1: VolumeRange(0.01, 0.2, 5), 2: VolumeRange(0.001, 0.05, 5)}
    rows = {r["structure"]: r for r in scan_rows("c", labels, spacing, {1: "a", 2: "b", 3: "c"}, None, None, ranges)}
    assert rows["a"]["voxel_count"] == 35 and rows["a"]["n_components"] == 2
    assert rows["a"]["volume_ml"] == pytest.approx(35 * 1.5 / 1000)
    assert rows["b"]["voxel_count"] == 4 and rows["b"]["n_components"] == 1
    assert not rows["a"]["qc_empty"] and not rows["a"]["qc_volume_outlier"] and not rows["a"]["qc_roi_at_border"]
    assert rows["b"]["qc_volume_outlier"] is False  # 0.006 mL, inside [0.001, 0.05]
    # an empty structure: flagged empty, and outside the training range when it has one
    assert rows["c"]["qc_empty"] and rows["c"]["voxel_count"] == 0 and rows["c"]["n_components"] == 0
    assert rows["c"]["qc_volume_outlier"] is None  # no training reference holds class 3

    # a structure larger than every training reference
    big = scan_rows("c", labels, spacing, {1: "a"}, None, None, {1: VolumeRange(0.001, 0.01, 3)})[0]
    assert big["qc_volume_outlier"] is True
    # an empty prediction with training references: empty and outside the range
    empty = scan_rows("e", np.zeros_like(labels), spacing, {1: "a"}, None, False, ranges)[0]
    assert empty["qc_empty"] and empty["qc_volume_outlier"] and empty["roi_found"] is False
    assert not empty["qc_roi_at_border"]

    # the ROI at the border: the final foreground (single stage), or stage 1's mask (a cascade)
    at_edge = labels.copy()
    at_edge[0, 10, 10] = 1
    assert scan_rows("b", at_edge, spacing, {1: "a"}, None, None, ranges)[0]["qc_roi_at_border"]
    roi = np.zeros_like(labels, dtype=bool)
    roi[4:10, 4:19, 19] = True
    assert scan_rows("b", labels, spacing, {1: "a"}, roi, True, ranges)[0]["qc_roi_at_border"]
    roi[:, :, 19] = False
    roi[4:10, 4:10, 4:10] = True
    assert not scan_rows("b", at_edge, spacing, {1: "a"}, roi, True, ranges)[0]["qc_roi_at_border"]
    for axis in range(3):
        for end in (0, -1):
            mask = np.zeros((5, 6, 7), bool)
            index = [2, 2, 2]
            index[axis] = end
            mask[tuple(index)] = True
            assert touches_border(mask)
    assert not touches_border(np.zeros((5, 6, 7), bool))

    # training ranges: reference values merged into stage classes; an empty reference holds no volume
    reference = np.zeros((10, 10, 10), np.int64)
    reference[1:3, 1:3, 1:3] = 1
    reference[5:6, 5:6, 5:7] = 2
    merged = reference_volumes(reference, (1.0, 1.0, 1.0), {1: 1, 2: 1}, [1])
    assert merged == {1: pytest.approx(10 / 1000)}
    got = training_ranges([merged, {1: 0.002}, {1: 0.0}])
    assert got[1] == VolumeRange(0.002, 0.01, 2)


def test_volume_rows_read_from_written_predictions(tmp_path):
    from unet3d.io import Geometry, from_numpy, write_image_atomic
    from unet3d.volumes import read_scan_rows

    geometry = Geometry((10, 12, 8), (0.8, 0.9, 2.5), (1.0, -2.0, 3.0), (0, 1, 0, 1, 0, 0, 0, 0, 1))
    final = np.zeros((10, 12, 8), np.uint8)
    final[2:5, 3:6, 2:4] = 1
    stage1 = (final > 0).astype(np.uint8)
    stage1[9, 5, 5] = 1  # stage 1's mask reaches the border
    write_image_atomic(from_numpy(final, geometry), tmp_path / "final.nii.gz")
    write_image_atomic(from_numpy(stage1, geometry), tmp_path / "roi.nii.gz")
    row, = read_scan_rows("x", tmp_path / "final.nii.gz", {1: "organ"}, tmp_path / "roi.nii.gz", True, {})
    image = sitk.ReadImage(str(tmp_path / "final.nii.gz"))
    count = int((sitk.GetArrayFromImage(image) == 1).sum())
    assert row["voxel_count"] == count == 18
    assert row["volume_ml"] == pytest.approx(count * np.prod(image.GetSpacing()) / 1000)
    assert row["qc_roi_at_border"] and row["roi_found"] and row["qc_volume_outlier"] is None


# ---------------------------------------------------------------------------------------------------------
# the segment stage in the pipeline
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_segment_stage_segments_new_scans_only_and_writes_the_volumes_table(tmp_path, scans):
    from data_catalog.tables import Catalog
    from flows.pipeline import pipeline_flow

    source = _cohort(tmp_path / "cohort")
    (source / "imagesTs").mkdir()
    shutil.copy(scans[0], source / "imagesTs" / "ts_001.nii.gz")
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for i in (1, 2):
        shutil.copy(scans[i], folder / f"night_{i:03d}.nii.gz")
    ws = tmp_path / "ws"
    config = write_config(tmp_path / "c.yaml", source, cohort={"unlabelled_source": str(folder)},
                          infer={"tta": False}, evaluate={"n_boot": 0})

    first = pipeline_flow(config_path=str(config), workspace=str(ws))
    segment = first["segment"]
    assert segment["n_scans"] == 3 and segment["segmented"] == 3 and segment["already_segmented"] == 0
    assert not set(Catalog(ws).read("splits")["case_id"]) & {"ts_001", "night_001", "night_002"}
    assert not set(first["infer"]["splits"]) & {"ts_001", "night_001", "night_002"}

    cases = Catalog(ws).cases(cohort="tiny").set_index("case_id")
    volumes = pd.read_parquet(segment["volumes_path"])
    assert sorted(volumes["case_id"]) == ["night_001", "night_002", "ts_001"]  # one structure: lesion
    assert set(volumes["structure"]) == {"lesion"} and (volumes["stage"] == "lesion").all()
    for row in volumes.to_dict("records"):
        prediction = sitk.ReadImage(str(ws / row["prediction_path"]))
        source_image = sitk.ReadImage(cases.loc[row["case_id"], "image_path"])
        # in the scan's original geometry
        assert prediction.GetSize() == source_image.GetSize()
        assert np.allclose(prediction.GetSpacing(), source_image.GetSpacing())
        assert np.allclose(prediction.GetOrigin(), source_image.GetOrigin())
        assert np.allclose(prediction.GetDirection(), source_image.GetDirection())
        # the volume is an independent count of the written labels times the voxel volume
        count = int((sitk.GetArrayFromImage(prediction) == row["class_index"]).sum())
        assert row["voxel_count"] == count
        assert row["volume_ml"] == pytest.approx(count * float(np.prod(source_image.GetSpacing())) / 1000)
        organ = sitk.GetArrayFromImage(sitk.ReadImage(str(ws / row["prediction_path"]).replace("/lesion/", "/organ/")))
        record = json.loads(Path(str(ws / row["prediction_path"]).replace("/lesion/", "/").replace(".nii.gz", ".json"))
                            .read_text())
        assert row["roi_found"] == record["roi_found"]
        if not organ.any():
            assert row["roi_found"] is False and row["voxel_count"] == 0 and row["qc_empty"]
        assert row["train_min_ml"] is not None and row["qc_volume_outlier"] == (
            row["volume_ml"] < row["train_min_ml"] or row["volume_ml"] > row["train_max_ml"])
    written = {p: p.stat().st_mtime_ns for p in (ws / "segmentations").rglob("*.nii.gz")}
    assert len(written) == 6  # 3 scans x 2 stages

    # one more scan arrives: only it is segmented; training and inference come from cache
    shutil.copy(scans[3], folder / "night_003.nii.gz")
    second = pipeline_flow(config_path=str(config), workspace=str(ws))
    flags = cached_stages(second)
    assert flags["train-organ"] and flags["train-lesion"] and flags["infer"] and not flags["segment"]
    assert second["segment"]["segmented"] == 1 and second["segment"]["already_segmented"] == 3
    assert second["segment"]["chain"] == segment["chain"]
    assert all(p.stat().st_mtime_ns == t for p, t in written.items())  # the earlier scans were not rewritten
    assert len(list((ws / "segmentations").rglob("*.nii.gz"))) == 8
    volumes = pd.read_parquet(second["segment"]["volumes_path"])
    assert sorted(volumes["case_id"]) == ["night_001", "night_002", "night_003", "ts_001"]

    # a night with nothing new recomputes nothing
    third = pipeline_flow(config_path=str(config), workspace=str(ws))
    assert all(cached_stages(third).values()), cached_stages(third)
    assert third["segment"]["segmented"] == 1  # the cached result of the second run, not a new segmentation
    assert len(list((ws / "segmentations").rglob("*.nii.gz"))) == 8


def test_the_plan_comes_from_the_labelled_cases_only():
    """Unlabelled scans (to be segmented, not learnt from) joined the plan's median: five thick-sliced scans
    moved the target spacing of three labelled cases from 1 mm to 2 mm."""
    from data_catalog.plan import make_plan

    def fingerprint(spacing, labelled):
        return {"canonical_spacing": [spacing] * 3, "canonical_shape": [40, 40, 40], "labelled": labelled}

    fingerprints = [fingerprint(1.0, True)] * 3 + [fingerprint(2.0, False)] * 5
    plan = make_plan(fingerprints, "MRI", {})
    assert plan["target_spacing"] == [1.0, 1.0, 1.0] and plan["n_cases_planned"] == 3
    # a cohort of unlabelled scans only (a model brought from elsewhere) still gets a plan
    assert make_plan(fingerprints[3:], "MRI", {})["target_spacing"] == [2.0, 2.0, 2.0]


def test_header_fingerprints_know_an_unlabelled_case_read_back_from_parquet():
    """pandas reads a missing label path back from Parquet as NaN, not None: `is not None` took every
    unlabelled scan for a labelled one."""
    import pyarrow as pa

    from data_catalog.plan import header_fingerprints

    rows = pa.table({"case_id": ["a", "b"], "direction": [[1.0, 0, 0, 0, 1, 0, 0, 0, 1]] * 2,
                     "spacing_mm": [[1.0, 1.0, 1.0]] * 2, "size": [[8, 8, 8]] * 2,
                     "label_path": ["/labels/a.nii.gz", None]}).to_pandas()
    assert [f["labelled"] for f in header_fingerprints(rows)] == [True, False]


def test_the_champion_segments_new_scans_after_the_preprocessing_plan_changed(tmp_path, scans):
    """The champion was trained under the plan of its night; a later config with other `preprocess` settings
    preprocesses new scans under a new plan only, and the champion (which still serves) reported them as 'not
    preprocessed' instead of segmenting them. They are now preprocessed under the champion's plan too."""
    from flows.pipeline import pipeline_flow

    source = _cohort(tmp_path / "cohort", n_cases=8)
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    shutil.copy(scans[0], folder / "night_001.nii.gz")
    ws = tmp_path / "ws"
    settings = dict(cohort={"unlabelled_source": str(folder)}, infer={"tta": False}, evaluate={"n_boot": 0})
    first = pipeline_flow(config_path=str(write_config(tmp_path / "a.yaml", source, **settings)), workspace=str(ws))
    assert first["champion"]["decision"] == "promoted" and first["segment"]["segmented"] == 1

    shutil.copy(scans[1], folder / "night_002.nii.gz")
    other_plan = write_config(tmp_path / "b.yaml", source, preprocess={"workers": 1, "target_spacing": [5.0, 5.0, 9.0]},
                              **settings)
    second = pipeline_flow(config_path=str(other_plan), workspace=str(ws), until="segment")
    segment = second["segment"]
    assert segment["chain"] == first["segment"]["chain"]  # the champion serves
    assert segment["not_preprocessed"] == [] and segment["segmented"] == 1 and segment["already_segmented"] == 1
