"""The real cohorts of ../shared/data: ingestion survives their known defects (see its README)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from data_catalog.ingest import ingest
from data_catalog.tables import Catalog

pytestmark = pytest.mark.realdata


def test_hippocampus_ingests_with_exactly_its_known_defects(hippocampus_dir, tmp_path):
    result = ingest(hippocampus_dir, "hippocampus", tmp_path)
    catalog = Catalog(tmp_path)
    cases = catalog.cases(cohort="hippocampus").set_index("case_id")
    issues = catalog.read("issues")
    assert result.n_ok == 220
    assert set(cases.index[cases["status"] == "quarantined"]) == {"hippocampus_118", "hippocampus_010", "hippocampus_281"}
    codes = issues.groupby("case_id")["code"].apply(set).to_dict()
    assert codes["hippocampus_118"] == {"label_missing"}  # image without label (dataset.json lists one)
    assert codes["hippocampus_010"] == {"image_missing"}  # label without image
    assert codes["hippocampus_281"] == {"image_missing", "geometry_outlier"}  # a mask of another dataset
    # the two float32 labels are integer-valued: a warning, the cases stay ok
    assert codes["hippocampus_003"] == {"label_float_dtype"} and codes["hippocampus_243"] == {"label_float_dtype"}
    assert set(codes) == {"hippocampus_118", "hippocampus_010", "hippocampus_281", "hippocampus_003", "hippocampus_243"}
    assert list(cases.loc["hippocampus_281", "size"]) == [512, 512, 94]
    assert (cases.loc[cases["status"] == "ok", "modality"] == "MRI").all()
    assert cases.loc[cases["status"] == "ok", "image_sha256"].str.len().eq(64).all()


def test_dicom_series_ingests_as_one_case_with_simpleitk_geometry(dicom_dir, tmp_path):
    result = ingest(dicom_dir, "dicom", tmp_path)
    assert result.n_cases == 1 and result.n_ok == 1
    case = Catalog(tmp_path).cases(cohort="dicom").iloc[0]
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(dicom_dir))
    reader.SetFileNames(files)
    image = reader.Execute()
    assert list(case["size"]) == list(image.GetSize())
    assert np.allclose(list(case["spacing_mm"]), image.GetSpacing())
    assert len(case["image_files"]) == len(files) == 32
