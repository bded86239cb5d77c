"""Shared fixtures. Prefect runs against a throwaway home (its ephemeral API), never the user's."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()

# Before anything imports prefect: an isolated Prefect home and a generous ephemeral-server start timeout.
_PREFECT_HOME = tempfile.mkdtemp(prefix="unet3d-tests-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Tests run their numerical work on few threads: CI machines have 2 cores and pytest is one process.
os.environ.setdefault("OMP_NUM_THREADS", "2")

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(autouse=True)
def _process_locale_kept():
    """A library that changes the C locale in a test (GDCM's DICOM writer sets "C") does not change how later
    tests of the same process decode text."""
    import locale

    saved = locale.setlocale(locale.LC_ALL)
    yield
    if locale.setlocale(locale.LC_ALL) != saved:
        locale.setlocale(locale.LC_ALL, saved)


def shared_data_dir(name: str = "") -> Path:
    """../shared/data (or a folder in it); skips the test with the reason when it is absent (a user's clone)."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (it exists in the project's CI and dev machines)")
    return path


@pytest.fixture(scope="session")
def hippocampus_dir() -> Path:
    return shared_data_dir("msd_hippocampus")


@pytest.fixture(scope="session")
def dicom_dir() -> Path:
    return shared_data_dir("dicom_hippocampus_crop")


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """12 small synthetic CT phantom cases (32x32x16), MSD layout."""
    from data_catalog.demo import generate_demo_cohort

    root = tmp_path_factory.mktemp("tiny_cohort")
    return generate_demo_cohort(root / "cohort", n_cases=12, seed=3, shape=(32, 32, 16), base_spacing=(3.0, 3.0, 6.0))



@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    # Exit 0 only when tests really ran: a run where everything was skipped or deselected is a failure.
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    passed = len(reporter.stats.get("passed", [])) if reporter else 0
    if exitstatus == 0 and passed == 0:
        session.exitstatus = 1
        if reporter:
            reporter.write_line("no test passed (all skipped or deselected): failing the run", red=True)
    # Prefect stops its temporary API server from an atexit hook and logs that to a console stream that pytest
    # has already closed; the message is harmless, the "--- Logging error ---" noise is not wanted.
    import logging
    logging.raiseExceptions = False
