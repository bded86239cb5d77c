"""Image I/O through SimpleITK: files (NIfTI, NRRD, MHA, ...) and DICOM series, headers without voxels,
numpy conversion in (x, y, z) order, and atomic writes.

SimpleITK's `GetArrayFromImage` returns (z, y, x); every array leaving this module is (x, y, z) so that
array axes, `size` and `spacing` all share one order.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import SimpleITK as sitk

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

# The most voxels (times components) an image may claim in its header before any voxel is read: 2^31, an
# 8 GiB float32 volume, far above any scan (a 1024x1024x2000 CT is 2^31). A file claiming more is refused
# from its header in milliseconds instead of allocating the claimed size (a 3 KB .nii.gz can claim 2000^3).
MAX_IMAGE_VOXELS = 2**31


class ImageTooLarge(ValueError):
    """An image whose header claims more than MAX_IMAGE_VOXELS voxels; raised before voxels are read."""


@dataclass(frozen=True)
class Geometry:
    """Where an image's voxels sit in physical space (LPS, millimetres), in (x, y, z) order."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]  # row-major 3x3 (or NxN) direction cosines, as SimpleITK gives them

    @classmethod
    def of(cls, image_or_reader) -> "Geometry":
        return cls(
            size=tuple(int(s) for s in image_or_reader.GetSize()),
            spacing=tuple(float(s) for s in image_or_reader.GetSpacing()),
            origin=tuple(float(o) for o in image_or_reader.GetOrigin()),
            direction=tuple(float(d) for d in image_or_reader.GetDirection()),
        )

    @property
    def ndim(self) -> int:
        return len(self.size)

    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(self.ndim, self.ndim)

    def to_dict(self) -> dict:
        return {f.name: list(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(
            size=tuple(int(v) for v in d["size"]),
            spacing=tuple(float(v) for v in d["spacing"]),
            origin=tuple(float(v) for v in d["origin"]),
            direction=tuple(float(v) for v in d["direction"]),
        )


@dataclass(frozen=True)
class HeaderInfo:
    geometry: Geometry
    pixel_type: str  # e.g. "32-bit float"
    components: int
    tags: dict[str, str]  # DICOM tags we care about (PatientID, SeriesInstanceUID, Modality); empty for files


def is_image_file(path: str | Path) -> bool:
    name = str(path).lower()
    return name.endswith(IMAGE_SUFFIXES)


def strip_image_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_header(path: str | Path) -> HeaderInfo:
    """Header of an image file, without reading voxels."""
    reader = _file_reader(path)
    reader.ReadImageInformation()
    return HeaderInfo(
        geometry=Geometry.of(reader),
        pixel_type=sitk.GetPixelIDValueAsString(reader.GetPixelID()),
        components=int(reader.GetNumberOfComponents()),
        tags={},
    )


_DICOM_TAGS = {"0010|0020": "PatientID", "0020|000e": "SeriesInstanceUID", "0008|0060": "Modality",
               "0020|0011": "SeriesNumber", "0008|103e": "SeriesDescription"}


def dicom_series(folder: str | Path) -> list[tuple[str, list[str]]]:
    """The DICOM series directly inside `folder`: [(series_uid, sorted slice files)], slices in GDCM order."""
    reader = sitk.ImageSeriesReader()
    out = []
    for uid in reader.GetGDCMSeriesIDs(str(folder)):
        files = list(reader.GetGDCMSeriesFileNames(str(folder), uid))
        if files:
            out.append((uid, files))
    return out


def read_dicom_tags(first_file: str | Path) -> dict[str, str]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(first_file))
    reader.LoadPrivateTagsOff()
    reader.ReadImageInformation()
    tags = {}
    for key, name in _DICOM_TAGS.items():
        if reader.HasMetaDataKey(key):
            tags[name] = reader.GetMetaData(key).strip()
    return tags


def check_size(header: HeaderInfo, slices: int = 1, limit: int | None = None, name: str = "") -> None:
    """Raise ImageTooLarge when the header (times `slices` for a DICOM series) claims more than `limit` voxels."""
    limit = MAX_IMAGE_VOXELS if limit is None else limit
    size = list(header.geometry.size)
    if slices > 1:
        size = size[:2] + [slices] if len(size) >= 2 else size + [slices]
    voxels = int(np.prod([max(int(s), 1) for s in size], dtype=object)) * max(header.components, 1)
    if voxels > limit:
        shape = "x".join(str(s) for s in size)
        raise ImageTooLarge(f"{name + ': ' if name else ''}header claims {shape} voxels"
                            f"{f' x {header.components} components' if header.components > 1 else ''} "
                            f"({voxels:.3g}), more than the limit of {limit:.3g} (MAX_IMAGE_VOXELS); not read")


def detached_data_files(path: str | Path) -> list[Path]:
    """The files a NRRD (.nhdr/.nrrd "data file:") or MetaImage (.mhd/.mha "ElementDataFile =") header reads its
    voxels from, resolved against the header's folder; [] when the voxels are in the file itself. For a
    file-name pattern (slice%03d.raw) the pattern itself stands for its files (same folder)."""
    name = str(path).lower()
    nrrd = name.endswith((".nrrd", ".nhdr"))
    if not nrrd and not name.endswith((".mha", ".mhd")):
        return []
    with open(path, "rb") as f:
        head = f.read(1 << 16).decode("latin-1")
    base = Path(path).parent
    lines = head.split("\n")
    names: list[str] = []
    for i, line in enumerate(lines):
        line = line.rstrip("\r")
        if nrrd and not line.strip() and i > 0:
            break  # the end of a NRRD header
        key, sep, value = line.partition(":" if nrrd else "=")
        key = key.strip().lower()
        if not sep or key not in (("data file", "datafile") if nrrd else ("elementdatafile",)):
            continue
        tokens = value.split()
        if not tokens or (not nrrd and tokens[0].upper() == "LOCAL"):
            return []
        if tokens[0].upper() == "LIST":  # one file name per following line (to the end of the header)
            names += [ln.strip() for ln in lines[i + 1:] if ln.strip()][:100_000]
        else:
            names.append(value.strip() if len(tokens) == 1 or "%" not in tokens[0] else tokens[0])
        break
    return [Path(n) if Path(n).is_absolute() else base / n for n in names]


def dicom_slice_positions(files: Sequence[str | Path]) -> np.ndarray:
    """Each slice's position (mm) along the series' slice normal, from ImagePositionPatient (0020|0032) and
    ImageOrientationPatient (0020|0037), read from the headers only. Raises ValueError naming the slice that
    cannot be read or lacks the tags."""
    reader = sitk.ImageFileReader()
    reader.LoadPrivateTagsOff()
    positions, normal = [], None
    for f in files:
        reader.SetFileName(str(f))
        try:
            reader.ReadImageInformation()
            position = [float(v) for v in reader.GetMetaData("0020|0032").split("\\")]
            if normal is None:
                cosines = [float(v) for v in reader.GetMetaData("0020|0037").split("\\")]
                normal = np.cross(cosines[:3], cosines[3:6])
        except (RuntimeError, ValueError, IndexError) as exc:
            reason = " ".join(str(exc).split())[-200:] or type(exc).__name__
            raise ValueError(f"slice {Path(f).name} cannot be read or has no position: {reason}") from None
        positions.append(float(np.dot(position, normal)))
    return np.asarray(positions, dtype=np.float64)


def read_image(source: str | Path | Sequence[str], max_voxels: int | None = None) -> sitk.Image:
    """Read a file, or a DICOM series given as its list of slice files (or a folder holding one series).

    The header is read first: an image claiming more than `max_voxels` (default MAX_IMAGE_VOXELS) raises
    ImageTooLarge before any voxel is read or allocated."""
    if isinstance(source, (list, tuple)):
        files = [str(f) for f in source]
        if files:
            check_size(read_header(files[0]), slices=len(files), limit=max_voxels, name=str(Path(files[0]).parent))
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        return reader.Execute()
    path = Path(source)
    if path.is_dir():
        series = dicom_series(path)
        if len(series) != 1:
            raise ValueError(f"{path}: expected one DICOM series, found {len(series)}")
        return read_image(series[0][1], max_voxels)
    direct = read_nifti_direct(path, max_voxels)
    if direct is not None:
        return direct
    limit = MAX_IMAGE_VOXELS if max_voxels is None else max_voxels
    reader = _file_reader(path)
    # A NIfTI header within the limit needs no second parse by ITK (a third of a small file's read time)
    claimed = _nifti_voxel_count(path)
    if claimed is None or claimed > limit:
        reader.ReadImageInformation()
        check_size(HeaderInfo(Geometry.of(reader), "", int(reader.GetNumberOfComponents()), {}), limit=max_voxels,
                   name=str(path))
    return reader.Execute()


# ITK finds a file's reader by asking each of its ~20 readers whether it can read the file; naming the reader
# from the suffix skips that probe (about 0.8 ms per small file, as much as decompressing it). ITK's own readers
# of these formats accept only these suffixes, so the probe could not find another.
_IMAGE_IOS = {".nii.gz": "NiftiImageIO", ".nii": "NiftiImageIO", ".nrrd": "NrrdImageIO", ".nhdr": "NrrdImageIO",
              ".mha": "MetaImageIO", ".mhd": "MetaImageIO"}


def _file_reader(path: str | Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    io = next((io for suffix, io in _IMAGE_IOS.items() if str(path).lower().endswith(suffix)), None)
    if io is not None:
        reader.SetImageIO(io)
    return reader


def _nifti_voxel_count(path: str | Path) -> int | None:
    """Voxels (times components) a NIfTI file's header claims, read with Python's gzip; None when the file is not
    NIfTI, is unusual, or cannot be read (ITK's own header check then decides)."""
    import gzip
    import zlib

    name = str(path).lower()
    if not name.endswith((".nii", ".nii.gz")):
        return None
    try:
        with (gzip.open if name.endswith(".gz") else open)(path, "rb") as f:
            parsed = _nifti_layout(f.read(540))
    except (OSError, EOFError, ValueError, zlib.error):
        return None
    return parsed[0] if parsed is not None else None


def to_numpy(image: sitk.Image, dtype=None) -> np.ndarray:
    """Voxels as an (x, y, z) array: the transposed view of a copy of SimpleITK's (z, y, x) buffer.

    The result is Fortran-ordered; it is not made C-contiguous on purpose (a transposing copy of a CT volume
    costs a third of a second, and numpy handles either layout).
    """
    arr = sitk.GetArrayFromImage(image)
    arr = arr.transpose(tuple(reversed(range(arr.ndim))))
    return arr.astype(dtype, copy=False) if dtype is not None else arr


def from_numpy(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """An (x, y, z) array placed on `geometry`."""
    if tuple(array.shape) != tuple(geometry.size):
        raise ValueError(f"array shape {array.shape} does not match geometry size {geometry.size}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(tuple(reversed(range(array.ndim))))))
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


_HOST = socket.gethostname().replace(".", "_").replace("-", "_") or "host"
# A leftover temporary file of another machine (a shared workspace) is removed when it is this old.
STALE_TMP_SECONDS = 24 * 3600


def current_umask() -> int:
    """The process' umask, read without changing it (Linux: /proc/self/status; elsewhere set and restored)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` when the block succeeds, removed when
    it fails. Readers never see half a file. The name starts with "." so that dataset discovery (pyarrow,
    pandas.read_parquet on a folder) skips it while it exists.

    The file gets the mode a plain `open(path, "w")` would give (0666 less the umask), not mkstemp's 0600,
    so a team's shared workspace stays readable. Its name carries this host and process id, so temporary
    files of `path` left by a killed writer are removed by the next write (same host, process gone; another
    host's after STALE_TMP_SECONDS)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path, suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}-", suffix=suffix, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        full = disk_full(exc)
        if full is None and isinstance(exc, Exception) and no_space_left(path.parent):  # before the unlink frees it
            full = f"disk full ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        if os.path.exists(tmp):
            os.unlink(tmp)
        if full is not None:  # the user is told what happened and what was being written, in one line
            raise OSError(getattr(exc, "errno", None) or errno.ENOSPC, f"{full} while writing {path}") from exc
        raise


# Below this much free space a failed write is taken for a full disk whatever the writer said: torch's zip
# writer raises RuntimeError ("unexpected pos 832 vs 726", "basic_ios::clear: iostream error"), and ITK's
# NIfTI writer only prints "wrote only 0 of N bytes" on stderr and returns normally.
FULL_DISK_FREE_BYTES = 1 << 20


def no_space_left(folder: str | Path) -> bool:
    """Whether the file system of `folder` has (almost) no space left for this process (root may also
    write into the blocks reserved for it)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize < FULL_DISK_FREE_BYTES


def disk_full(exc: BaseException) -> str | None:
    """What a full disk looks like to a writer ("disk full (No space left on device)"), or None. numpy's
    short write ("53760 requested and 6112 written") carries no errno but means the same."""
    if not isinstance(exc, OSError):
        return None
    if exc.errno == errno.ENOSPC:
        return f"disk full ({os.strerror(errno.ENOSPC)})"
    if exc.errno == errno.EDQUOT:
        return f"disk full ({os.strerror(errno.EDQUOT)})"
    text = str(exc)
    if exc.errno is None and "requested and" in text and "written" in text:
        return f"disk full (short write: {' '.join(text.split())})"
    return None


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write bytes through atomic_path: readers see the old file or the whole new one."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write UTF-8 text through atomic_path (the encoding is fixed so the file does not depend on the locale)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def save_array(path: str | Path, array: np.ndarray) -> None:
    """np.save, with an array that is neither C- nor Fortran-contiguous (a flipped or permuted view) copied to C
    order first: numpy writes such an array one element per fwrite call (1 ms for a 60,000-voxel label against
    0.3 ms), and the file's bytes are the same either way."""
    if not (array.flags.c_contiguous or array.flags.f_contiguous):
        array = np.ascontiguousarray(array)
    np.save(path, array)


def write_json_atomic(path: str | Path, obj, **json_kwargs) -> Path:
    """`json.dumps(obj, **json_kwargs)` written through atomic_path."""
    import json

    return write_text_atomic(path, json.dumps(obj, **json_kwargs))


def save_torch_atomic(obj, path: str | Path) -> Path:
    """`torch.save(obj)` through atomic_path (torch is imported here so image I/O does not need it)."""
    import torch

    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def remove_stale_temporaries(path: str | Path, suffix: str = ".tmp") -> list[Path]:
    """Remove the temporary files of `path` that atomic_path left behind when its writer was killed."""
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:(?P<host>\w+)-(?P<pid>\d+)-)?[\w]{{8}}{re.escape(suffix)}$")
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None:
            continue
        host, pid = match.group("host"), match.group("pid")
        if host == _HOST and pid is not None:
            stale = int(pid) != os.getpid() and not process_alive(int(pid))
        else:
            try:
                stale = now - entry.stat(follow_symlinks=False).st_mtime > STALE_TMP_SECONDS
            except OSError:
                continue
        if stale:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (one we may not signal still counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def parent_death_signal():
    """A preexec_fn (Linux) that has the child sent SIGTERM when its parent dies, so that a helper process (the
    DDP launcher, Prefect's temporary server) does not outlive a killed command. libc is resolved here, in the
    parent, so that the forked child only makes the one call. None elsewhere."""
    import sys

    if sys.platform != "linux":
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    import signal

    return lambda: prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG


def write_image_atomic(image: sitk.Image, path: str | Path, compress: bool = True) -> Path:
    """Write an image through a temporary file and a rename."""
    path = Path(path)
    suffix = next((s for s in IMAGE_SUFFIXES if path.name.lower().endswith(s)), path.suffix)
    with atomic_path(path, suffix=suffix) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress)
        # ITK reports a short write on a full disk only on stderr: a file written there is read back before
        # it is published (a truncated prediction would be trusted by every later run)
        if no_space_left(tmp.parent) and not _same_voxels(image, tmp):
            raise OSError(errno.ENOSPC, "the image writer left a short file")
    return path


def _same_voxels(image: sitk.Image, path: Path) -> bool:
    """Whether `path` reads back as `image`'s voxels (ITK may even read a truncated file without an error)."""
    try:
        back = sitk.ReadImage(str(path))
    except RuntimeError:
        return False
    return back.GetSize() == image.GetSize() and np.array_equal(sitk.GetArrayViewFromImage(back),
                                                                 sitk.GetArrayViewFromImage(image))


_NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8",
                 1280: "u8"}


def nifti_nonfinite_voxels(path: str | Path) -> int | None:
    """NaN/Inf voxels of a NIfTI file, counted from its raw data; raises ValueError if the data is truncated.

    ITK's NIfTI reader turns NaN into 0 on reading and may accept a truncated .nii.gz, so neither problem is
    visible in SimpleITK's voxels. Returns None when the file is not NIfTI or its data type is unusual.
    """
    import gzip
    import zlib

    name = str(path).lower()
    if not name.endswith((".nii", ".nii.gz")):
        return None
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read(540)
            parsed = _nifti_layout(raw)
            if parsed is None:
                return None
            n, dtype, offset = parsed
            # Read only what the header says the data holds (a compressed file may expand to far more).
            need = offset + n * dtype.itemsize
            if n > MAX_IMAGE_VOXELS:
                raise ValueError(f"header claims {n:.3g} voxels, more than the limit of {MAX_IMAGE_VOXELS:.3g}")
            raw += f.read(max(need - len(raw), 0))
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ValueError(f"compressed data is truncated or corrupt ({exc})") from None
    if len(raw) - offset < n * dtype.itemsize:
        raise ValueError(f"voxel data is truncated: {len(raw) - offset} of {n * dtype.itemsize} bytes")
    if dtype.kind != "f":
        return 0
    data = np.frombuffer(raw, dtype=dtype, count=n, offset=offset)
    return int(n - np.count_nonzero(np.isfinite(data)))


def _nifti_layout(raw: bytes) -> tuple[int, np.dtype, int] | None:
    """(voxel count, dtype, data offset) from the start of a NIfTI-1/2 file; None when unusual or not NIfTI."""
    if len(raw) < 348:
        raise ValueError(f"file holds {len(raw)} bytes, less than a NIfTI header")
    for order in ("<", ">"):
        size = int(np.frombuffer(raw[:4], dtype=f"{order}i4")[0])
        if size in (348, 540):
            break
    else:
        return None
    if size == 348:  # NIfTI-1
        dims = np.frombuffer(raw[40:56], dtype=f"{order}i2")
        code = int(np.frombuffer(raw[70:72], dtype=f"{order}i2")[0])
        offset = int(np.frombuffer(raw[108:112], dtype=f"{order}f4")[0])
    else:  # NIfTI-2
        if len(raw) < 540:
            raise ValueError(f"file holds {len(raw)} bytes, less than a NIfTI-2 header")
        dims = np.frombuffer(raw[16:80], dtype=f"{order}i8")
        code = int(np.frombuffer(raw[12:14], dtype=f"{order}i2")[0])
        offset = int(np.frombuffer(raw[168:176], dtype=f"{order}i8")[0])
    if code not in _NIFTI_DTYPES or not 1 <= int(dims[0]) <= 7:
        return None
    n = int(np.prod([max(int(d), 1) for d in dims[1:1 + int(dims[0])]], dtype=object))
    return n, np.dtype(f"{order}{_NIFTI_DTYPES[code]}"), max(offset, 0)


# How far a file's sform may differ from its qform (rotation entries, and millimetres over the voxel size for the
# offset) for the two to be taken as one transform: ITK's choice between them cannot then change the geometry.
_NIFTI_FORMS_ATOL = 1e-5


def _read_nifti_voxels(path: str | Path, max_voxels: int | None = None) -> tuple[np.ndarray, Geometry] | None:
    """A plain NIfTI-1 file (.nii or .nii.gz) read with zlib and numpy: its (z, y, x) voxels (read-only, in the
    file's byte order) and geometry, the same voxels, pixel type, spacing, origin and direction as SimpleITK's
    reader gives, in a third of its time. Why: a cohort's small scans are read twice per command (validation,
    then preprocessing), and ITK's reader was most of a 220-case ingest.

    Returns None for anything it does not handle the way ITK does, by construction rather than by guess; the
    caller then reads through ITK: NIfTI-2 or a separate .hdr/.img pair, not exactly 3 dimensions, a data type
    other than the plain integers and floats, intensity scaling (scl_slope other than 0 or 1, or scl_inter), an
    axis unit other than millimetres, a zero or non-finite voxel size, a qform or an sform missing, the two
    differing (ITK's preference between them varies by version), truncated or corrupt data, a claimed size over
    `max_voxels`, and NaN/Inf voxels. ITK and nibabel write both forms, equal."""
    import zlib

    name = str(path).lower()
    if not name.endswith((".nii", ".nii.gz")):
        return None
    limit = MAX_IMAGE_VOXELS if max_voxels is None else max_voxels
    try:
        with open(path, "rb") as f:
            packed = name.endswith(".gz")
            # the header decides first: a file left to ITK costs one small read here
            stored = f.read(1 << 16) if packed else f.read(352)
            inflater = zlib.decompressobj(wbits=31) if packed else None
            header = inflater.decompress(stored, 352) if packed else stored
            geometry = _nifti1_geometry(header)
            if geometry is None:
                return None
            size, spacing, origin, direction, dtype, offset = geometry
            n = int(size[0]) * int(size[1]) * int(size[2])
            if n > limit:
                return None  # ITK's header check raises ImageTooLarge with its message
            skip = offset - len(header)  # the data's start in what follows the header's 352 bytes
            if skip < 0:
                return None
            need = skip + n * dtype.itemsize
            # never more than the header says the data holds (a small .gz may expand to far more); not joined to
            # the header, which would copy the whole volume once more
            body = inflater.decompress(inflater.unconsumed_tail + f.read(), need) if packed else f.read(need)
    except (OSError, zlib.error):
        return None
    if len(body) < need:
        return None  # truncated (or a member after the first: gzip's concatenated members are left to ITK)
    data = np.frombuffer(body, dtype=dtype, count=n, offset=skip)
    if dtype.kind == "f" and not np.isfinite(data).all():
        return None
    # The file's x runs fastest, as in SimpleITK's (z, y, x) arrays
    voxels = data.reshape(size[2], size[1], size[0])
    # + 0.0: ITK stores a -0.0 (an axis flipped from RAS to LPS) as 0.0, and so must a geometry read without it
    return voxels, Geometry(size, tuple(v + 0.0 for v in spacing), tuple(v + 0.0 for v in origin),
                            tuple(v + 0.0 for v in direction))


def read_nifti_direct(path: str | Path, max_voxels: int | None = None) -> sitk.Image | None:
    """_read_nifti_voxels as a SimpleITK image (same voxels, pixel type and geometry as SimpleITK's reader), or
    None where the file is left to ITK."""
    direct = _read_nifti_voxels(path, max_voxels)
    if direct is None:
        return None
    voxels, geometry = direct
    image = sitk.GetImageFromArray(voxels.astype(voxels.dtype.newbyteorder("="), copy=False))
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def _nifti1_geometry(header: bytes):
    """(size, spacing, origin, direction, dtype, data offset) of a NIfTI-1 header in ITK's LPS convention, or None
    when read_nifti_direct leaves the file to ITK."""
    if len(header) < 348 or header[344:348] != b"n+1\x00":
        return None
    order = "<" if int(np.frombuffer(header[:4], "<i4")[0]) == 348 else ">"
    if int(np.frombuffer(header[:4], f"{order}i4")[0]) != 348:
        return None

    def values(start: int, count: int, kind: str) -> np.ndarray:
        return np.frombuffer(header, dtype=f"{order}{kind}", count=count, offset=start)

    dims = values(40, 8, "i2")
    code = int(values(70, 1, "i2")[0])
    pixdim = values(76, 8, "f4").astype(np.float64)
    offset = int(values(108, 1, "f4")[0])
    slope, inter = (float(v) for v in values(112, 2, "f4"))
    qform_code, sform_code = (int(v) for v in values(252, 2, "i2"))
    if int(dims[0]) != 3 or (dims[1:4] < 1).any() or code not in _NIFTI_DTYPES or offset < 348:
        return None
    if slope not in (0.0, 1.0) or inter != 0.0 or header[123] & 7 not in (0, 2):  # 2: millimetres
        return None
    spacing = pixdim[1:4]
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        return None
    if qform_code <= 0 or sform_code <= 0:
        return None
    # ITK takes the rotation from the sform's columns (exactly: to 1e-12 on every file of the tests) when the
    # qform agrees with it; from the qform alone its rounding differs by 1e-8, so a file with one form is ITK's
    srows = values(280, 12, "f4").astype(np.float64).reshape(3, 4)
    rotation, offset_ras = srows[:, :3] / np.linalg.norm(srows[:, :3], axis=0), srows[:, 3]
    if not (_within(srows[:, :3] / spacing, rotation, _NIFTI_FORMS_ATOL)
            and _within(_nifti_qform_rotation(values(256, 3, "f4"), pixdim[0]), rotation, _NIFTI_FORMS_ATOL)
            and _within(values(268, 3, "f4"), offset_ras, _NIFTI_FORMS_ATOL * float(spacing.min()))):
        return None
    lps = np.array([-1.0, -1.0, 1.0])  # NIfTI's RAS+ world to ITK's LPS+
    direction = rotation * lps[:, None]
    origin = offset_ras * lps
    size = tuple(int(v) for v in dims[1:4])
    return (size, tuple(float(v) for v in spacing), tuple(float(v) for v in origin),
            tuple(float(v) for v in direction.ravel()), np.dtype(f"{order}{_NIFTI_DTYPES[code]}"), offset)


def _within(a: np.ndarray, b: np.ndarray, atol: float) -> bool:
    """Every |a - b| <= atol, False where either holds a NaN: np.allclose(a, b, rtol=0, atol=atol) without
    isclose's general machinery (three calls for every file read)."""
    return bool(np.abs(a - b).max() <= atol)


def _nifti_qform_rotation(quaternion: np.ndarray, qfac: float) -> np.ndarray:
    """The rotation of a NIfTI qform: from the quaternion's (b, c, d), the third axis flipped when qfac
    (pixdim[0]) < 0; a = 0 and (b, c, d) renormalised near a half turn, as the NIfTI reference library does."""
    b, c, d = (float(v) for v in quaternion)
    a = 1.0 - (b * b + c * c + d * d)
    if a < 1e-7:
        scale = 1.0 / np.sqrt(b * b + c * c + d * d)
        a, b, c, d = 0.0, b * scale, c * scale, d * scale
    else:
        a = np.sqrt(a)
    rotation = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                         [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                         [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]])
    if qfac < 0:
        rotation[:, 2] = -rotation[:, 2]
    return rotation


def read_label_image(path: str | Path, dtype=None) -> tuple[np.ndarray, sitk.Image]:
    """A label file's voxels as integer label values (unet3d.labels.as_label_values) and its image (geometry)."""
    from .labels import as_label_values

    image = read_image(path)
    return as_label_values(to_numpy(image), dtype), image


def read_case_image(image_files: Sequence[str | Path], dicom: bool, max_voxels: int | None = None) -> sitk.Image:
    """A case's image as the catalog lists it (`image_files`): the slice files of a DICOM series, in series
    order, read as one volume; otherwise its one image file. The one place that turns a case's file list into
    an image (ingest validation and preprocessing both read cases through it)."""
    files = [str(f) for f in image_files]
    if not files:
        raise ValueError("the case lists no image file")
    return read_image(files if dicom else files[0], max_voxels)


def read_case_voxels(image_files: Sequence[str | Path], dicom: bool,
                     max_voxels: int | None = None) -> tuple[np.ndarray, Geometry]:
    """read_case_image's voxels as an (x, y, z) array (to_numpy's layout, writable) and its geometry. A plain
    NIfTI file is read without building an ITK image that to_numpy would copy straight back out: one copy of
    the volume instead of two and an allocation (7 % of the instructions of preprocessing a hippocampus case,
    measured with callgrind). A file left to ITK is read by read_case_image."""
    files = [str(f) for f in image_files]
    if len(files) == 1 and not dicom:
        direct = _read_nifti_voxels(files[0], max_voxels)
        if direct is not None:
            voxels, geometry = direct
            return voxels.astype(voxels.dtype.newbyteorder("="), copy=True).T, geometry
    image = read_case_image(files, dicom, max_voxels)
    return to_numpy(image), Geometry.of(image)


def read_label_voxels(path: str | Path, dtype=None) -> tuple[np.ndarray, Geometry]:
    """read_label_image's label values and the file's geometry, read as read_case_voxels reads an image."""
    from .labels import as_label_values

    voxels, geometry = read_case_voxels([path], dicom=False)
    return as_label_values(voxels, dtype), geometry
