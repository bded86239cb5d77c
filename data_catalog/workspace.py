"""Every path of a workspace, decided in one place (the README's "Workspace" section, in code).

    WORKSPACE/
      catalog/cases.parquet, issues.parquet, splits.parquet
      preprocessed/COHORT/{plans/, fingerprints/, PLAN_ID/CASE__KEY/}
      models/COHORT/STAGE-ID/                    (the files inside: unet3d.train.ModelFiles)
      predictions/RUN_ID/STAGE/CASE_ID.nii.gz
      segmentations/COHORT/CHAIN/STAGE/CASE__KEY.nii.gz   unlabelled scans segmented by a model chain (+ CASE__KEY.json)
      cache/stage1/IDENT/CASE__KEY.npy           stage-1 probabilities of a cascade
      reports/metrics|lesions|summary/run_date=.../run_id=.../part-0.parquet
      reports/runs/RUN_ID/report.md
      reports/decisions/run_date=.../run_id=.../part-0.parquet   champion / challenger decisions
      champions/COHORT/STAGE1__STAGE2.json      the serving model of a cohort's stage chain, with its history
      champions/COHORT/models/RUN__STAGE/       a served model kept aside when its folder was retrained
      runs/RUN_ID.json
      .prefect/results/, .stages/STAGE/KEY.json  cached stage results and completion markers
      demo/                                      `unet3d demo`'s cohort and config

Every name that becomes a folder or file name (cohort, stage, run id) passes `safe_name` here, so no path
built through this module can leave the workspace. Paths stored in run records are relative to the
workspace (`relative`) and read back through `resolve`, which refuses anything outside it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unet3d.config import safe_name


@dataclass(frozen=True)
class Workspace:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    # -- catalog -------------------------------------------------------------------------------------------
    @property
    def catalog_dir(self) -> Path:
        return self.root / "catalog"

    def catalog_table(self, which: str) -> Path:
        """catalog/{cases,issues,splits}.parquet"""
        if which not in ("cases", "issues", "splits"):
            raise KeyError(f"unknown catalog table {which!r}; known: cases, issues, splits")
        return self.catalog_dir / f"{which}.parquet"

    @property
    def catalog_lock(self) -> Path:
        """The lock that serialises the catalog's writers."""
        return self.catalog_dir / ".lock"

    # -- preprocessed store --------------------------------------------------------------------------------
    def preprocessed_dir(self, cohort: str) -> Path:
        return self.root / "preprocessed" / safe_name(cohort, "cohort name")

    def plans_dir(self, cohort: str) -> Path:
        return self.preprocessed_dir(cohort) / "plans"

    def fingerprints_dir(self, cohort: str) -> Path:
        return self.preprocessed_dir(cohort) / "fingerprints"

    def plan_dir(self, cohort: str, plan_id: str) -> Path:
        return self.preprocessed_dir(cohort) / safe_name(plan_id, "plan id")

    def plan_file(self, cohort: str, plan_id: str) -> Path:
        """plans/PLAN_ID.json: a preprocessing plan."""
        return self.plans_dir(cohort) / f"{safe_name(plan_id, 'plan id')}.json"

    def pinned_plan_file(self, cohort: str, config_key: str) -> Path:
        """plans/pinned-CONFIGKEY.json: the plan in force for a preprocess config."""
        return self.plans_dir(cohort) / f"pinned-{safe_name(config_key, 'plan config key')}.json"

    def preprocessed_lock(self, cohort: str) -> Path:
        """The lock that serialises preprocessing runs of a cohort."""
        return self.preprocessed_dir(cohort) / ".lock"

    # -- models --------------------------------------------------------------------------------------------
    def model_dir(self, cohort: str, stage: str, identity: str) -> Path:
        """models/COHORT/STAGE-IDENTITY: one folder per (data, stage, model config), not per budget."""
        return self.root / "models" / safe_name(cohort, "cohort name") / f"{safe_name(stage, 'stage name')}-{identity}"

    def model_lock(self, cohort: str, stage: str, identity: str) -> Path:
        """models/COHORT/.STAGE-IDENTITY.lock: beside the model folder, so a refresh may replace the folder."""
        folder = self.model_dir(cohort, stage, identity)
        return folder.with_name(f".{folder.name}.lock")

    # -- predictions and the stage-1 cache -----------------------------------------------------------------
    def predictions_dir(self, run_id: str) -> Path:
        return self.root / "predictions" / safe_name(run_id, "run id", max_len=128)

    def prediction_path(self, run_id: str, stage: str, case_id: str) -> Path:
        return self.predictions_dir(run_id) / safe_name(stage, "stage name") / f"{case_id}.nii.gz"

    def segmentation_dir(self, cohort: str, chain: str) -> Path:
        """segmentations/COHORT/CHAIN: the segment stage's predictions of unlabelled scans by one model chain."""
        return self.root / "segmentations" / safe_name(cohort, "cohort name") / safe_name(chain, "model chain id")

    def segmentation_path(self, cohort: str, chain: str, stage: str, case_dirname: str) -> Path:
        """segmentations/COHORT/CHAIN/STAGE/CASE__KEY.nii.gz: one scan's labels (named as its preprocessed folder:
        a scan whose content changes gets a new file)."""
        return self.segmentation_dir(cohort, chain) / safe_name(stage, "stage name") / f"{case_dirname}.nii.gz"

    def segmentation_record(self, cohort: str, chain: str, case_dirname: str) -> Path:
        """segmentations/COHORT/CHAIN/CASE__KEY.json: written after the scan's labels; its presence means done."""
        return self.segmentation_dir(cohort, chain) / f"{case_dirname}.json"

    def stage1_cache_dir(self, identity: str) -> Path:
        return self.root / "cache" / "stage1" / identity

    def stage1_cache_file(self, identity: str, case_dirname: str) -> Path:
        """cache/stage1/IDENT/CASE__KEY.npy: one case's stage-1 probabilities (named as its preprocessed folder)."""
        return self.stage1_cache_dir(identity) / f"{case_dirname}.npy"

    # -- reports -------------------------------------------------------------------------------------------
    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    def report_table(self, which: str) -> Path:
        """reports/{metrics,lesions,summary,fill_in}: partitioned Parquet datasets (run_date=/run_id=)."""
        if which not in ("metrics", "lesions", "summary", "fill_in"):
            raise KeyError(f"unknown report table {which!r}; known: metrics, lesions, summary, fill_in")
        return self.reports_dir / which

    @property
    def volumes_table(self) -> Path:
        """reports/volumes: the segment stage's table (run_date=/run_id= partitions, unet3d.report_tables)."""
        return self.reports_dir / "volumes"

    def run_report_dir(self, run_id: str) -> Path:
        return self.reports_dir / "runs" / safe_name(run_id, "run id", max_len=128)

    def run_report_md(self, run_id: str) -> Path:
        return self.run_report_dir(run_id) / "report.md"

    # -- the serving model ---------------------------------------------------------------------------------
    @property
    def decisions_table(self) -> Path:
        """reports/decisions: champion / challenger decisions (run_date=/run_id= partitions, DECISIONS_SCHEMA)."""
        return self.reports_dir / "decisions"

    def champion_file(self, cohort: str, chain: list[str] | tuple[str, ...]) -> Path:
        """champions/COHORT/STAGE1__STAGE2.json: the champion registry of a cohort's stage chain (unet3d.champion)."""
        names = "__".join(safe_name(s, "stage name") for s in chain)
        return self.root / "champions" / safe_name(cohort, "cohort name") / f"{names}.json"

    def champion_model_dir(self, cohort: str, run_id: str, stage: str) -> Path:
        """champions/COHORT/models/RUN_ID__STAGE: a model that served, kept here when `--refresh train` retrains
        the folder it was trained in (flows.champion.keep_served_models)."""
        return (self.root / "champions" / safe_name(cohort, "cohort name") / "models"
                / f"{safe_name(run_id, 'run id', max_len=128)}__{safe_name(stage, 'stage name')}")

    def champion_files(self) -> list[Path]:
        """Every champion registry of the workspace."""
        root = self.root / "champions"
        return sorted(root.glob("*/*.json")) if root.exists() else []

    # -- run records ---------------------------------------------------------------------------------------
    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def run_record(self, run_id: str) -> Path:
        """runs/RUN_ID.json; a run id is a plain name (`--model ../../outside_run` is refused, never read)."""
        return self.runs_dir / f"{safe_name(run_id, 'run id', max_len=128)}.json"

    # -- stage cache ---------------------------------------------------------------------------------------
    @property
    def results_dir(self) -> Path:
        return self.root / ".prefect" / "results"

    def marker(self, stage: str, key: str) -> Path:
        return self.root / ".stages" / stage / f"{key}.json"

    # -- demo ----------------------------------------------------------------------------------------------
    @property
    def demo_dir(self) -> Path:
        return self.root / "demo"

    @property
    def demo_cohort_dir(self) -> Path:
        return self.demo_dir / "cohort"

    @property
    def demo_config(self) -> Path:
        return self.demo_dir / "demo.yaml"

    # -- paths stored in records ---------------------------------------------------------------------------
    def relative(self, path: str | Path) -> str:
        """A path inside the workspace as stored in run records: relative, so a moved or mounted-elsewhere
        workspace still predicts."""
        p, ws = Path(path).resolve(), self.root.resolve()
        return p.relative_to(ws).as_posix() if p.is_relative_to(ws) else str(path)

    def resolve(self, path: str | Path, what: str = "path") -> Path:
        """A path read from a run record, as a path inside this workspace. Relative (new records) or absolute
        (records written before paths were stored relative; an absolute path of a workspace that has moved
        is re-rooted at its `models/COHORT/STAGE-ID` tail). Anything resolving outside is refused."""
        ws = self.root.resolve()
        p = Path(path)
        if not p.is_absolute():
            p = ws / p
        elif not p.resolve().is_relative_to(ws) and len(p.parts) >= 3 and p.parts[-3] == "models":
            moved = ws.joinpath(*p.parts[-3:])  # WORKSPACE/models/COHORT/STAGE-ID
            p = moved if moved.exists() else p
        resolved = p.resolve()
        if not resolved.is_relative_to(ws):
            raise ValueError(f"{what} {str(path)!r} is outside the workspace {ws}: refused")
        return resolved
