"""Multi-channel cases: several co-registered images of one case (multi-sequence MRI, CT + PET), one file per
channel named as nnU-Net names them: CASE_0000.nii.gz, CASE_0001.nii.gz, ...

Discovery first finds cases as if every cohort had one channel (CASE_0000 -> case CASE); this module then
groups a case's channel files. A cohort is multi-channel when some case has a file of channel 1 or higher (or
dataset.json declares several channels and such files exist); otherwise nothing here changes a case, so a
single-channel cohort keeps its catalog rows and hashes. A multi-channel case lists its channel files, in
channel order, as `image_files` (its `image_path` is channel 0); a case lacking a channel gets a
`channel_missing` issue naming the case and the channel.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from unet3d.io import strip_image_suffix

from .hashing import sha256_file


def split_channel(name: str) -> tuple[str, int | None]:
    """(case id, channel index) of an image file name: CASE_0001.nii.gz -> (CASE, 1); CASE.nii.gz -> (CASE, None)."""
    stem = strip_image_suffix(name)
    if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
        return stem[:-5], int(stem[-4:])
    return stem, None


def channel_groups(paths: Iterable[Path]) -> dict[str, dict[int, Path]]:
    """case id -> channel index -> file, for the files named CASE_NNNN."""
    groups: dict[str, dict[int, Path]] = {}
    for path in paths:
        cid, channel = split_channel(Path(path).name)
        if channel is not None:
            groups.setdefault(cid, {}).setdefault(channel, Path(path))
    return groups


def cohort_channel_count(groups: dict[str, dict[int, Path]], declared: int | None = None) -> int:
    """How many channels the cohort's cases have: the declared count (dataset.json) or the highest channel found
    + 1, when files of two cases or more are channel 1 or higher (or of one case, with several channels declared).
    Otherwise 1: a declared count without such files (MSD's 4-D images) stays 1, such a file is reported not_3d as
    before; and one series of numbered files (scan_0000, scan_0001, ... of a single-channel folder) is not taken
    for the channels of one case."""
    with_channels = [g for g in groups.values() if max(g) >= 1]
    if not with_channels or (len(with_channels) == 1 and (declared or 1) <= 1):
        return 1
    return max(max(max(g) + 1 for g in with_channels), declared or 0)


def channel_file_name(case_id: str, channel: int, ending: str = ".nii.gz") -> str:
    return f"{case_id}_{channel:04d}{ending}"


def first_file_per_case(images: list[tuple], groups: dict[str, dict[int, Path]]) -> list[tuple]:
    """(link, target, case id) entries of a folder with one entry per multi-channel case (its first channel
    file; the others are attached by attach_channels), so that a case's channels are not taken for duplicates."""
    out, seen = [], set()
    for entry in images:
        cid = entry[2]
        if cid in groups:
            if cid in seen:
                continue
            seen.add(cid)
        out.append(entry)
    return out


def sha256_channels(paths: Iterable[str | Path]) -> str:
    """A multi-channel case's image hash: sha256 over its files' hashes in channel order (swapping two channels
    changes it; a DICOM series' sha256_files sorts them instead)."""
    digests = [sha256_file(p) for p in paths]
    return hashlib.sha256(("channels\n" + "\n".join(digests)).encode()).hexdigest()


def attach_channels(cases, groups: dict[str, dict[int, Path]], n_channels: int, resolve, outside_issue) -> list[str]:
    """Give each case of a multi-channel cohort its channel files (in channel order) and a `channel_missing`
    issue per missing channel. `resolve(path)` gives a file's target or None when it lies outside the cohort,
    `outside_issue(path)` the issue for such a file. Returns notes for the user (channels beyond the cohort's)."""
    if n_channels <= 1:
        return []
    notes = [f"{n_channels} channels per case (files CASE_0000 ... CASE_{n_channels - 1:04d})"]
    for case in cases:
        if case.source_kind == "dicom" or not case.image_files:
            continue
        group = groups.get(case.case_id, {})
        first = Path(case.image_files[0])
        ending = first.name[len(strip_image_suffix(first.name)):]
        files: list[str] = []
        for channel in range(n_channels):
            link = group.get(channel)
            if link is None:
                missing = first.parent / channel_file_name(case.case_id, channel, ending)
                case.issues.append(("channel_missing", str(missing),
                                    f"case {case.case_id}: channel {channel} "
                                    f"({channel_file_name(case.case_id, channel, ending)}) is missing; the cohort's "
                                    f"cases have {n_channels} channels (_0000 ... _{n_channels - 1:04d})"))
                continue
            target = resolve(link)
            if target is None:
                case.issues.append(outside_issue(link))
                continue
            files.append(str(target))
        extra = sorted(c for c in group if c >= n_channels)
        if extra:
            notes.append(f"{case.case_id}: channel file(s) {', '.join(group[c].name for c in extra)} ignored: the "
                         f"cohort declares {n_channels} channels")
        if files:
            case.image_files = files
    return notes


def record_channels(case: dict) -> int:
    """Channels of a catalog case record (data_catalog.case_worker.case_records): its image files, unless they are
    one DICOM series."""
    files = case.get("image_files")
    return 1 if case.get("source_kind") == "dicom" or files is None or not len(files) else len(files)


def cohort_channels(cases: list[dict]) -> tuple[int, list[dict]]:
    """(the channel count of most cases, a preprocessing failure for each case with another count): cases are
    preprocessed together with one plan, so a case whose channels differ (an unlabelled scan with a channel file
    more or less than the cohort's) is quarantined naming its count, and the others go on."""
    counts: dict[int, int] = {}
    for case in cases:
        n = record_channels(case)
        counts[n] = counts.get(n, 0) + 1
    if not counts:
        return 1, []
    channels = max(sorted(counts), key=lambda n: counts[n])
    odd = [{"case_id": c["case_id"], "step": "channels",
            "error": f"case {c['case_id']} has {record_channels(c)} channel(s) (image files), the cohort's cases have "
                     f"{channels}: every case needs the same channels (files CASE_0000, CASE_0001, ...)"}
           for c in cases if record_channels(c) != channels]
    return channels, odd


def group_channel_inputs(paths: list[Path], n_channels: int) -> list[tuple[Path, list[str] | None]]:
    """`unet3d predict`'s inputs as cases: (first file, the case's channel files in order, or None for one channel).

    For a model of `n_channels` > 1, files named CASE_0000 ... of one folder are one case; files without such a
    suffix are taken in the order given, `n_channels` at a time (`-i t1.nii.gz -i t2.nii.gz`). A case lacking a
    channel, or files that do not make whole cases, are refused naming them. One channel: every input is a case."""
    if n_channels <= 1:
        return [(p, None) for p in paths]
    expected = f"the model takes {n_channels} channels per case (files CASE_0000 ... CASE_{n_channels - 1:04d})"
    named: dict[tuple[Path, str], dict[int, Path]] = {}
    plain: list[Path] = []
    order: list[tuple] = []
    for path in paths:
        cid, channel = split_channel(path.name) if path.is_file() else (path.name, None)
        if channel is None:
            if len(plain) % n_channels == 0:
                order.append(("plain", len(plain)))
            plain.append(path)
            continue
        key = (path.parent, cid)
        if key not in named:
            named[key] = {}
            order.append(("named", key))
        if channel in named[key]:
            raise ValueError(f"{cid}: channel {channel} given twice ({named[key][channel]} and {path})")
        named[key][channel] = path
    if len(plain) % n_channels:
        raise ValueError(f"{expected}: the {len(plain)} input(s) without a _NNNN channel suffix "
                         f"({', '.join(p.name for p in plain[:6])}) do not make whole cases: give each case's "
                         f"{n_channels} files in channel order (-i t1.nii.gz -i t2.nii.gz) or name them CASE_0000 ...")
    cases = []
    for kind, key in order:
        if kind == "plain":
            files = plain[key:key + n_channels]
            cases.append((files[0], [str(p) for p in files]))
            continue
        group = named[key]
        first = next(iter(group.values()))
        ending = first.name[len(strip_image_suffix(first.name)):]
        missing = [c for c in range(n_channels) if c not in group]
        extra = sorted(c for c in group if c >= n_channels)
        if missing:
            raise ValueError(f"{key[1]}: channel {missing[0]} ({channel_file_name(key[1], missing[0], ending)}) is "
                             f"missing in {key[0]}: {expected}")
        if extra:
            raise ValueError(f"{key[1]}: {group[extra[0]].name} is channel {extra[0]}, but {expected}")
        cases.append((group[0], [str(group[c]) for c in range(n_channels)]))
    return cases
