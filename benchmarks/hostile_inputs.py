"""The hostile-input table of issue 10 (acceptance 3): bad input files and folders, bad configs, and injected
faults, each tried through the real entry point.

Inputs and configs come from the catalogue in tests/test_hostile_inputs.py (the same list the tests assert
on): every kind is built in a temporary folder and run through `data_catalog.ingest.ingest` (inputs) or
`unet3d.config.load_config` + `flows.preflight.preflight` (configs), then classified as refused (a one-line
error or issue row naming the case or the key), silently accepted, or crash (another exception, an error
naming neither, a multi-line message, a hang).

Faults are the fault-injection tests already in tests/ (SIGKILL, full disk, dead workers, killed writers ...):
each node id in FAULT_TESTS is run with pytest; a fault counts as survived when its test passes (each test
asserts results identical to an uninterrupted run, or nothing lost or quarantined).

    python benchmarks/hostile_inputs.py              # inputs, configs and faults
    python benchmarks/hostile_inputs.py --no-faults  # inputs and configs only (about a minute)
    python benchmarks/hostile_inputs.py --include-slow  # also the fault tests marked slow (whole pipelines)

Prints the tables as Markdown, then one JSON line: {"benchmark": "hostile_inputs", "ours": kinds refused
clearly, "baseline": kinds tried, "unit", "ratio", ...}; faults are reported in the same line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

# (fault, test node id, slow): each test injects the fault and asserts the outcome is identical to an
# uninterrupted run (or that nothing is lost, quarantined or left half-written).
FAULT_TESTS = [
    ("SIGKILL during preprocessing, then rerun",
     "tests/test_preprocess.py::test_sigkill_midway_leaves_nothing_partial_and_the_rerun_completes", False),
    ("SIGKILL during training, then resume: same weights",
     "tests/test_train.py::test_resume_after_sigkill_ends_with_the_same_weights", False),
    ("failure in training, pipeline rerun resumes from the checkpoint",
     "tests/test_flows.py::test_rerun_after_a_failure_in_training_resumes_from_the_checkpoint", True),
    ("failure in evaluation, rerun recomputes only evaluation",
     "tests/test_flows.py::test_rerun_after_a_failure_in_evaluation_recomputes_only_evaluation", True),
    ("two concurrent catalog writers (processes)",
     "tests/test_ingest.py::test_concurrent_writers_do_not_lose_updates", False),
    ("full disk (ENOSPC) during preprocessing, then rerun",
     "tests/test_faults.py::test_full_disk_during_preprocessing_quarantines_nothing_and_the_rerun_is_identical[enospc]",
     False),
    ("full disk (short write, no errno) during preprocessing, then rerun",
     "tests/test_faults.py::test_full_disk_during_preprocessing_quarantines_nothing_and_the_rerun_is_identical"
     "[short_write]", False),
    ("full disk while fingerprinting",
     "tests/test_faults.py::test_full_disk_while_fingerprinting_quarantines_nothing", False),
    ("EIO / EDQUOT / out-of-memory errors told apart from bad data",
     "tests/test_faults.py::test_environment_problems_are_told_apart_from_data_problems", False),
    ("MemoryError while preprocessing a case",
     "tests/test_faults.py::test_bad_data_is_still_a_case_failure_and_memory_errors_are_not", False),
    ("dead Dask worker process during preprocessing",
     "tests/test_faults.py::test_a_dead_worker_fails_the_stage_instead_of_quarantining", False),
    ("dead ingest worker process (exit 137)",
     "tests/test_safety_ingest.py::test_a_dead_ingest_worker_is_recorded_against_its_case_and_the_rest_go_on", False),
    ("killed atomic writer leaves a temporary file",
     "tests/test_safety_io.py::test_a_killed_writers_temporary_file_is_removed_by_the_next_write", False),
    ("failed metrics partition write",
     "tests/test_report.py::test_failed_write_leaves_old_partition_intact_and_no_temp_files", False),
    ("partial files of a killed demo-cohort generator",
     "tests/test_demo_cohort.py::test_leftover_partial_files_of_a_dead_run_are_removed", False),
    ("full disk during training, then during inference: rerun identical, nothing quarantined",
     "tests/test_fault_suite.py::test_full_disk_during_training_then_inference_loses_nothing", True),
    ("full disk while caching stage-1 probabilities",
     "tests/test_fault_suite.py::test_full_disk_while_caching_stage1_probabilities_leaves_no_temporary", True),
    ("planted pickle in a cached stage result (tampered workspace)",
     "tests/test_safety_flows.py::test_planted_pickle_in_a_cached_stage_result_is_never_unpickled", True),
]


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def run_catalogue() -> tuple[list[tuple[str, str, str, str, str]], float]:
    import test_hostile_inputs as catalogue

    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        for i, kind in enumerate(catalogue.INPUT_KINDS):
            folder = Path(tmp) / f"in{i:03d}"
            folder.mkdir()
            out = catalogue.run_input_kind(kind, folder)
            rows.append(("input", kind.id, kind.what, out.outcome, out.message))
        for i, kind in enumerate(catalogue.CONFIG_KINDS):
            folder = Path(tmp) / f"cfg{i:03d}"
            folder.mkdir()
            out = catalogue.run_config_kind(kind, folder)
            rows.append(("config", kind.id, f"names `{kind.key}`", out.outcome, out.message))
    return rows, time.perf_counter() - t0


def run_faults(include_slow: bool) -> list[tuple[str, str, str]]:
    out = []
    for what, node, slow in FAULT_TESTS:
        if slow and not include_slow:
            out.append((what, node, "not run (slow; --include-slow)"))
            continue
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node], cwd=REPO,
                              capture_output=True, text=True, encoding="utf-8", errors="replace")
        last = (proc.stdout.strip().splitlines() or ["?"])[-1]
        out.append((what, node, "survived" if proc.returncode == 0 else f"FAILED ({last})"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-faults", action="store_true", help="skip the fault-injection tests")
    parser.add_argument("--include-slow", action="store_true", help="also run the slow (whole-pipeline) fault tests")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")

    rows, seconds = run_catalogue()
    print(f"## Bad inputs and configs ({len(rows)} kinds, {seconds:.0f} s)\n")
    print("| group | kind | what | outcome | message |\n|---|---|---|---|---|")
    for group, kid, what, outcome, message in rows:
        print(f"| {group} | `{kid}` | {_cell(what)} | {outcome} | {_cell(message)} |")
    tried = [r for r in rows if r[3] != "skipped"]
    counts = {}
    for group in ("input", "config"):
        mine = [r for r in tried if r[0] == group]
        counts[group] = {o: sum(r[3] == o for r in mine) for o in ("refused", "silently accepted", "crash")}
        counts[group]["tried"] = len(mine)
    skipped = [r[1] for r in rows if r[3] == "skipped"]
    print("\n| group | tried | refused clearly | silently accepted (goal 0) | crash (goal 0) |\n|---|---|---|---|---|")
    for group, c in counts.items():
        print(f"| {group} | {c['tried']} | {c['refused']} | {c['silently accepted']} | {c['crash']} |")
    if skipped:
        print(f"\nskipped here: {', '.join(skipped)}")

    faults = [] if args.no_faults else run_faults(args.include_slow)
    if faults:
        print(f"\n## Faults injected ({len(faults)})\n\n| fault | test | result |\n|---|---|---|")
        for what, node, result in faults:
            print(f"| {_cell(what)} | `{node.split('::')[1]}` | {_cell(result)} |")
    n_refused = sum(c["refused"] for c in counts.values())
    n_tried = sum(c["tried"] for c in counts.values())
    ran = [f for f in faults if not f[2].startswith("not run")]
    print(json.dumps({"benchmark": "hostile_inputs", "ours": n_refused, "baseline": n_tried,
                      "unit": "kinds refused clearly", "ratio": round(n_refused / n_tried, 3) if n_tried else None,
                      "inputs": counts["input"], "configs": counts["config"], "skipped": skipped,
                      "faults_run": len(ran), "faults_survived": sum(f[2] == "survived" for f in ran),
                      "faults_not_run": len(faults) - len(ran)}))


if __name__ == "__main__":
    main()
