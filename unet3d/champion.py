"""Champion and challenger: which model serves a cohort, and whether a newly trained model may replace it.

The registry (one JSON file per cohort and stage chain, its path decided by data_catalog.workspace) holds the
serving model (the champion: its run id and model folders), the models that served before it (`served`, the last
is the champion, so that a rollback returns to the one before) and every promotion and rollback (`history`).
It is written atomically (unet3d.io), so a reader never sees half of it.

The decision is a non-inferiority test over cases: both models are scored on the same frozen cases (per case, the
mean Dice over the final stage's classes); the per-case differences (challenger - champion) are resampled with
`scipy.stats.bootstrap` (percentile interval of their mean: resampling the differences is resampling the case
pairs, a paired bootstrap). The challenger is promoted when the interval's lower end is not below -margin: it is
then, with the stated confidence, not worse than the champion by more than the margin.

Pure: files and tables in, numbers out; no Prefect.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .config import PROMOTE_DEFAULTS
from .io import write_json_atomic

REGISTRY_VERSION = 1


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------------------
def read_registry(path: str | Path) -> dict | None:
    """The registry at `path`, or None when no model has been promoted yet."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        registry = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"champion registry {path} is not valid JSON ({exc}): restore it or remove it") from None
    if not isinstance(registry, dict) or not registry.get("served"):
        raise ValueError(f"champion registry {path} has no served model: restore it or remove it")
    return registry


def current_champion(registry: dict | None) -> dict | None:
    """The serving model's entry ({run_id, stages: [{name, model_dir, checkpoint_sha256}], promoted_at, how, ...})."""
    return registry["served"][-1] if registry else None


def promote(path: str | Path, cohort: str, chain: Sequence[str], entry: dict, how: str, reason: str,
            at: str | None = None) -> dict:
    """Make `entry` (run_id, stages) the champion; `how`: first | challenge | manual. Returns the registry."""
    registry = read_registry(path) or {"version": REGISTRY_VERSION, "cohort": cohort, "chain": list(chain),
                                       "served": [], "history": []}
    at = at or _now()
    previous = current_champion(registry) if registry["served"] else None
    registry["served"].append(dict(entry, promoted_at=at, how=how, reason=reason))
    registry["history"].append({"at": at, "action": "promote", "how": how, "run_id": entry["run_id"],
                                "previous_run_id": previous["run_id"] if previous else None, "reason": reason})
    write_json_atomic(Path(path), registry, indent=1)
    return registry


def rollback(path: str | Path, reason: str = "rolled back by hand", at: str | None = None) -> dict:
    """Return to the model that served before the champion; the history keeps both moves. Returns the registry."""
    registry = read_registry(path)
    if registry is None:
        raise ValueError(f"no champion to roll back: {path} does not exist (no model has been promoted)")
    if len(registry["served"]) < 2:
        raise ValueError(f"cannot roll back: run {registry['served'][-1]['run_id']} is the only model that has "
                         f"served cohort {registry['cohort']} ({' -> '.join(registry['chain'])})")
    dropped = registry["served"].pop()
    at = at or _now()
    registry["history"].append({"at": at, "action": "rollback", "how": "manual",
                                "run_id": registry["served"][-1]["run_id"], "previous_run_id": dropped["run_id"],
                                "reason": reason})
    write_json_atomic(Path(path), registry, indent=1)
    return registry


# ---------------------------------------------------------------------------------------------------------
# The decision
# ---------------------------------------------------------------------------------------------------------
def case_scores(metrics: pd.DataFrame, stage: str, cases: Sequence[str] | None = None) -> pd.Series:
    """Per case (index: case_id, sorted), the mean Dice over the stage's classes (metrics rows of unet3d.metrics)."""
    rows = metrics[metrics["stage"] == stage]
    if cases is not None:
        rows = rows[rows["case_id"].isin(list(cases))]
    return rows.groupby("case_id")["dice"].mean().sort_index().astype(float)


def mean_interval(values: np.ndarray, n_boot: int, confidence: float, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (scipy.stats.bootstrap). No spread (one value, or all equal):
    every resample gives the mean, so the interval is that value."""
    values = np.asarray(values, dtype=float)
    if values.size < 2 or np.ptp(values) == 0:
        return float(values.mean()), float(values.mean())
    from scipy import stats  # here, not at the top: scipy.stats takes a second to import, on every cached run

    result = stats.bootstrap((values,), np.mean, n_resamples=n_boot, confidence_level=confidence, vectorized=True,
                             method="percentile", rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


@dataclass
class Decision:
    promoted: bool
    reason: str
    n_cases: int
    challenger_mean: float
    champion_mean: float
    difference: float  # challenger - champion, mean over cases
    ci_low: float
    ci_high: float
    margin: float
    confidence: float
    n_boot: int

    def to_dict(self) -> dict:
        return asdict(self)


def decide(challenger: pd.Series, champion: pd.Series, margin: float = PROMOTE_DEFAULTS.margin,
           n_boot: int = PROMOTE_DEFAULTS.n_boot, confidence: float = PROMOTE_DEFAULTS.confidence,
           seed: int = 0) -> Decision:
    """Promote the challenger unless it is worse than the champion beyond `margin` (see the module's doc).
    Both series are per-case scores indexed by case id, over exactly the same cases."""
    if set(challenger.index) != set(champion.index):
        only = sorted(set(challenger.index) ^ set(champion.index))
        raise ValueError(f"challenger and champion must be scored on the same cases; differing: {only[:5]}")
    if challenger.empty:
        raise ValueError("no frozen case to compare the challenger with the champion on (the test split is empty)")
    champion = champion.loc[challenger.index]
    diff = challenger.to_numpy(float) - champion.to_numpy(float)
    low, high = mean_interval(diff, n_boot, confidence, seed)
    mean_diff = float(diff.mean())
    promoted = low >= -margin
    level = f"{confidence:.0%}"
    numbers = (f"mean Dice {challenger.mean():.4f} vs champion {champion.mean():.4f} on {len(diff)} frozen cases, "
               f"difference {mean_diff:+.4f}, {level} paired bootstrap interval [{low:+.4f}, {high:+.4f}]")
    reason = (f"not worse beyond the margin {margin}: {numbers} lies above -{margin}" if promoted else
              f"worse than the champion beyond the margin {margin}: {numbers} reaches below -{margin}")
    return Decision(promoted, reason, len(diff), float(challenger.mean()), float(champion.mean()), mean_diff,
                    low, high, margin, confidence, n_boot)


@dataclass
class Drift:
    """The champion on cases it had not seen when it was promoted, against its own interval on its first cases."""

    dropped: bool
    n_new_cases: int
    new_mean: float
    ci_low: float
    ci_high: float
    reason: str


def champion_drift(on_own_cases: pd.Series, on_new_cases: pd.Series, n_boot: int = PROMOTE_DEFAULTS.n_boot,
                   confidence: float = PROMOTE_DEFAULTS.confidence, seed: int = 0) -> Drift | None:
    """Whether the champion's mean on new cases falls below the bootstrap interval of its mean on its own test
    cases; None without new cases (or without its own cases)."""
    if on_new_cases.empty or on_own_cases.empty:
        return None
    low, high = mean_interval(on_own_cases.to_numpy(float), n_boot, confidence, seed)
    new_mean = float(on_new_cases.mean())
    dropped = new_mean < low
    reason = (f"champion's mean Dice on {len(on_new_cases)} new test cases is {new_mean:.4f}, "
              f"{'below' if dropped else 'within or above'} its own {confidence:.0%} interval "
              f"[{low:.4f}, {high:.4f}] on its {len(on_own_cases)} earlier test cases")
    return Drift(dropped, len(on_new_cases), new_mean, low, high, reason)
