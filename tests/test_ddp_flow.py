"""The train stage runs DDP itself (`train.devices: 2`: two gloo CPU processes launched by torch.distributed.run):
a rank killed midway fails the stage in one line, and the rerun resumes to the very weights of an uninterrupted
2-process run (deterministic CPU training, as in tests/test_train.py)."""
from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from pipeline_helpers import TINY_TRAIN, write_config

EPOCHS = 12  # epochs are short: many of them leave the kill after epoch 1 far from the run's end
DDP_TRAIN = {**TINY_TRAIN, "devices": 2, "threads": 1, "deterministic": True, "seed": 5, "max_epochs": EPOCHS,
             "iterations_per_epoch": 2}
ONE_STAGE = [{"name": "organ", "classes": {1: "organ"}, "merge": {1: [1, 2]}, "spacing_factor": 2.0}]


def _upstream(ws: Path, cfg) -> dict:
    """Ingest, preprocess and split into `ws`; the preprocess result the train stage takes."""
    import flows.cache_keys as K
    import flows.stages as S

    S.run_ingest(str(ws), cfg, K.key_ingest(str(ws), cfg))
    preprocess = S.run_preprocess(str(ws), cfg, K.key_preprocess(str(ws), cfg))
    S.run_split(str(ws), cfg, K.key_split(str(ws), cfg))
    return preprocess


def _train_stage(ws: Path, cfg, preprocess: dict) -> dict:
    import flows.cache_keys as K
    import flows.stages as S

    stage = cfg.resolved_stages()[0]
    return S.run_train(str(ws), cfg, K.key_train(str(ws), cfg, stage, preprocess), stage, preprocess, progress=False)


def _rank_process(rank: int):
    """The DDP worker of `rank` among this process's descendants (the launcher gives each worker RANK)."""
    import psutil

    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.environ().get("RANK") == str(rank) and "unet3d.train" in proc.cmdline():
                return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def _weights(path: str | Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.mark.slow
def test_ddp_train_stage_killed_rank_fails_cleanly_and_the_rerun_ends_with_the_same_weights(tiny_cohort, tmp_path):
    import flows.cache_keys as K
    import flows.stages as S
    from flows.caching import marker_valid
    from unet3d.config import load_config
    from unet3d.train import DistributedTrainingError, ModelFiles

    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_cohort, stages=ONE_STAGE, train=DDP_TRAIN))
    stage = cfg.resolved_stages()[0]

    # Uninterrupted: two processes to the end
    ws_a = tmp_path / "ws_a"
    result_a = _train_stage(ws_a, cfg, _upstream(ws_a, cfg))
    assert result_a["world_size"] == 2 and result_a["epochs"] == EPOCHS and result_a["resumed_from_epoch"] is None
    files_a = ModelFiles(result_a["model_dir"])
    assert json.loads(files_a.model_json.read_text())["world_size"] == 2
    assert pd.read_parquet(files_a.train_log)["world_size"].tolist() == [2] * EPOCHS

    # Interrupted: rank 1 is SIGKILLed once epoch 1's checkpoint exists (waited for, not timed)
    ws_b = tmp_path / "ws_b"
    preprocess_b = _upstream(ws_b, cfg)
    latest = ModelFiles(S.model_folder(str(ws_b), cfg, stage, preprocess_b)[0]).latest_checkpoint
    outcome: dict = {}

    def first_run():
        try:
            outcome["result"] = _train_stage(ws_b, cfg, preprocess_b)
        except BaseException as exc:  # the test thread reports whatever ended the stage
            outcome["error"] = exc

    runner = threading.Thread(target=first_run)
    runner.start()
    killed_after, rank1, deadline = None, None, time.monotonic() + 600
    while runner.is_alive() and time.monotonic() < deadline:
        rank1 = rank1 or _rank_process(1)
        # checkpoints are renamed into place whole: a file that exists is a complete checkpoint
        if rank1 is not None and latest.exists():
            epoch = int(torch.load(latest, map_location="cpu", weights_only=True)["epoch"])
            if epoch >= 1:
                os.kill(rank1.pid, signal.SIGKILL)
                killed_after = epoch
                break
        time.sleep(0.05)
    runner.join(timeout=600)
    assert not runner.is_alive()
    assert killed_after is not None and killed_after < EPOCHS - 1, "training ended before a rank could be killed"
    error = outcome.get("error")
    assert isinstance(error, DistributedTrainingError), outcome
    message = str(error)
    assert "\n" not in message
    assert message.startswith("stage organ: ") and "rank 1 was killed by SIGKILL" in message, message
    assert re.search(r"torch\.distributed\.run exited with code [1-9]", message), message
    assert not marker_valid(str(ws_b), f"train-{stage.name}", K.key_train(str(ws_b), cfg, stage, preprocess_b))

    # The rerun resumes after the last checkpoint and ends where the uninterrupted run did
    result_b = _train_stage(ws_b, cfg, preprocess_b)
    assert result_b["world_size"] == 2 and result_b["epochs"] == EPOCHS
    assert result_b["resumed_from_epoch"] is not None and result_b["resumed_from_epoch"] >= killed_after
    wa, wb = _weights(result_a["latest_checkpoint"]), _weights(result_b["latest_checkpoint"])
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    assert pd.read_parquet(result_b["log_path"])["epoch"].tolist() == list(range(EPOCHS))


def test_devices_is_validated_and_part_of_the_model_identity(tiny_cohort, tmp_path, monkeypatch):
    import flows.cache_keys as K
    from unet3d.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="devices"):
        load_config(write_config(tmp_path / "bad.yaml", tiny_cohort, train={"devices": 0}))
    one = load_config(write_config(tmp_path / "one.yaml", tiny_cohort, stages=ONE_STAGE))
    two = load_config(write_config(tmp_path / "two.yaml", tiny_cohort, stages=ONE_STAGE, train={"devices": 2}))
    assert one.train.devices == 1
    # no workspace here: the identities and keys differ by the config alone
    monkeypatch.setattr(K, "training_members", lambda workspace, cfg: [])
    preprocess = {"plan_ids": {"2.0": "p"}}
    stage_one, stage_two = one.resolved_stages()[0], two.resolved_stages()[0]
    assert K.model_identity("ws", one, stage_one, preprocess) != K.model_identity("ws", two, stage_two, preprocess)
    assert K.key_train("ws", one, stage_one, preprocess) != K.key_train("ws", two, stage_two, preprocess)


def test_in_process_training_refuses_a_world_size_it_was_not_launched_with(tmp_path):
    from test_train import tiny_spec
    from unet3d.train import train

    spec = tiny_spec(tmp_path / "d", tmp_path / "out", devices=2)
    with pytest.raises(ValueError, match=r"train\.devices is 2 but this run has 1 process"):
        train(spec, progress=False)


@pytest.mark.slow
def test_an_exception_in_a_rank_fails_the_launch_in_one_line_naming_it(tmp_path):
    from test_train import tiny_spec
    from unet3d.train import DistributedTrainingError, train_distributed

    spec = tiny_spec(tmp_path / "d", tmp_path / "out", max_epochs=1, devices=2)
    spec.train_cases = [*spec.train_cases, str(tmp_path / "no_such_case")]
    path = tmp_path / "spec.json"
    path.write_text(spec.to_json())
    with pytest.raises(DistributedTrainingError) as raised:
        train_distributed(path, 2, progress=False)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("stage final: ")
    assert re.search(r"rank \d failed: FileNotFoundError: .*no_such_case", message), message
    assert re.search(r"torch\.distributed\.run exited with code [1-9]", message), message
