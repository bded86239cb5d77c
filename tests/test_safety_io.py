"""Atomic writes (issue 10 item 9): outputs follow the umask, a killed writer's temporary file does not stay
forever; a 4-D image is reported as 4-D."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from data_catalog.ingest import ingest
from unet3d.io import write_json_atomic as _atomic_json
from data_catalog.tables import Catalog, write_parquet_atomic
from unet3d.io import Geometry, atomic_path, from_numpy, write_image_atomic

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, expected", [(0o002, 0o664), (0o022, 0o644), (0o077, 0o600)])
def test_atomically_written_files_follow_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    table = write_parquet_atomic(pd.DataFrame({"a": [1, 2]}), tmp_path / "t.parquet")
    image = write_image_atomic(from_numpy(np.zeros((3, 4, 5), np.uint8), Geometry((3, 4, 5), (1.0,) * 3, (0.0,) * 3,
                                                                                   (1, 0, 0, 0, 1, 0, 0, 0, 1))),
                               tmp_path / "x.nii.gz")
    _atomic_json(tmp_path / "p.json", {"a": 1})
    with atomic_path(tmp_path / "c.pt") as tmp, open(tmp, "wb") as f:
        f.write(b"checkpoint")
    for path in (table, image, tmp_path / "p.json", tmp_path / "c.pt"):
        assert _mode(path) == expected, (path.name, oct(_mode(path)))


def test_the_catalog_of_a_shared_workspace_is_group_readable(tmp_path, umask):
    umask(0o002)
    image = sitk.GetImageFromArray(np.ones((4, 5, 6), np.float32))
    (tmp_path / "scans").mkdir()
    sitk.WriteImage(image, str(tmp_path / "scans" / "a.nii.gz"))
    ingest(tmp_path / "scans", "c", tmp_path / "ws")
    assert _mode(Catalog(tmp_path / "ws").cases_path) == 0o664


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "checkpoint_latest.pt"
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from unet3d.io import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            print(tmp, flush=True)
            os._exit(9)  # killed in the middle of the write
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, encoding="utf-8", timeout=60)
    leftover = Path(out.stdout.strip())
    assert out.returncode == 9 and leftover.exists() and leftover.parent == tmp_path
    other = tmp_path / ".other.pt.vm-1-abcdefgh.tmp"  # another file's temporary: not ours to remove
    other.write_bytes(b"")
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"complete")
    assert target.read_bytes() == b"complete"
    assert not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, other.name])


def test_a_4d_image_is_reported_as_4d(tmp_path):
    """Issue 10 item 9: ITK reads the 4th axis of such a file as 35 components per voxel; the message said
    "3 dimensions and 35 components"."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for name, array in (("fourd", np.random.rand(36, 50, 35, 35)), ("ok", np.random.rand(36, 50, 35))):
        sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.float32)), str(folder / f"{name}.nii.gz"))
    ws = tmp_path / "ws"
    ingest(folder, "c", ws)
    issues = Catalog(ws).read("issues")
    assert list(issues["code"]) == ["not_3d"] and list(issues["case_id"]) == ["fourd"]
    message = issues.iloc[0]["message"]
    assert "is 4-D (35x50x36x35" in message and "components" not in message and "\n" not in message


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_the_reader_named_from_the_suffix_reads_what_itks_probe_reads(tmp_path, suffix):
    """read_image names ITK's reader from the suffix instead of letting ITK probe every reader (faster); the
    voxels and geometry are those of a plain sitk.ReadImage."""
    from unet3d.io import read_header, read_image

    array = np.arange(4 * 5 * 3, dtype=np.int16).reshape(3, 5, 4)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.5, 0.7, 2.0))
    image.SetOrigin((3.0, -2.0, 1.5))
    image.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))
    path = tmp_path / f"scan{suffix}"
    sitk.WriteImage(image, str(path))
    ours, probed = read_image(path), sitk.ReadImage(str(path))
    assert np.array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(probed))
    for attribute in ("GetSpacing", "GetOrigin", "GetDirection", "GetPixelID"):
        assert getattr(ours, attribute)() == getattr(probed, attribute)(), attribute
    assert tuple(read_header(path).geometry.size) == (4, 5, 3)


def test_a_nifti_header_claiming_too_many_voxels_is_refused_before_reading(tmp_path):
    from unet3d.io import ImageTooLarge, read_image

    path = tmp_path / "big.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 5, 4), np.float32)), str(path))
    assert read_image(path, max_voxels=120).GetSize() == (4, 5, 6)
    with pytest.raises(ImageTooLarge, match="header claims 4x5x6 voxels"):
        read_image(path, max_voxels=119)
