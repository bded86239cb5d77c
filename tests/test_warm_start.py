"""Warm start (train.init_from): the network begins from the source's weights, a mismatch is refused by name."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import unet3d.train as train_module
from test_train import make_store_case
from unet3d.train import ModelFiles, TrainSpec, build_model_from_config, train


def _spec(root: Path, out: Path, classes=None, init_from=None, **train_overrides) -> TrainSpec:
    cases = sorted(str(p) for p in root.glob("c*__0000")) or [str(make_store_case(root, f"c{i}", seed=i))
                                                              for i in range(4)]
    train_cfg = {"architecture": "unet3d", "features": None, "max_epochs": 1, "iterations_per_epoch": 2,
                 "batch_size": 2, "patch_size": None, "device": "cpu", "threads": 1, "deterministic": True,
                 "seed": 7, "deep_supervision": True, "augment": "none", "postprocess": "none"}
    train_cfg.update(train_overrides)
    classes = classes or {1: "outer", 2: "core"}
    return TrainSpec(out_dir=str(out), train_cases=cases[:3], val_cases=cases[3:], classes=classes,
                     label_map={k: k for k in classes}, train=train_cfg, init_from=init_from)


def _source(folder: Path, given: str | None = None) -> dict:
    import hashlib
    checkpoint = ModelFiles(folder).best_checkpoint
    return {"init_from": given or str(folder), "checkpoint": str(checkpoint),
            "sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest(), "run_id": None}


def _record_first_forward(monkeypatch) -> dict:
    """The trainer's network's first forward pass (its input and outputs), recorded as it happens."""
    seen: dict = {}
    real_build = train_module.build_model_from_config

    def build(model_config):
        network = real_build(model_config)

        def hook(module, inputs, output):
            if "input" not in seen:
                outputs = output if isinstance(output, (list, tuple)) else [output]
                seen["input"], seen["outputs"] = inputs[0].detach().clone(), [o.detach().clone() for o in outputs]
        network.register_forward_hook(hook)
        return network

    monkeypatch.setattr(train_module, "build_model_from_config", build)
    return seen


def _source_forward(folder: Path, image: torch.Tensor) -> list[torch.Tensor]:
    meta = json.loads(ModelFiles(folder).model_json.read_text())
    network = build_model_from_config(meta["model"])
    network.load_state_dict(torch.load(ModelFiles(folder).best_checkpoint, weights_only=True)["model"])
    network.train()  # as in the trainer's first step (instance norm and no dropout: the same function either way)
    with torch.no_grad():
        out = network(image)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def test_warm_start_begins_from_the_source_weights(tmp_path, monkeypatch):
    data = tmp_path / "data"
    source = tmp_path / "source"
    train(_spec(data, source, features=[4, 8, 16], patch_size=[16, 16, 12], max_epochs=2), progress=False)

    seen = _record_first_forward(monkeypatch)
    warm_dir = tmp_path / "warm"
    # no features or patch in the config: the source's network and patch are taken, not planned again
    result = train(_spec(data, warm_dir, init_from=_source(source)), progress=False)
    expected = _source_forward(source, seen["input"])
    assert len(expected) == len(seen["outputs"])
    for got, want in zip(seen["outputs"], expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    meta = json.loads(Path(result.model_json).read_text())
    source_meta = json.loads(ModelFiles(source).model_json.read_text())
    assert meta["model"] == source_meta["model"] and meta["patch_size"] == source_meta["patch_size"]
    assert meta["init_from"]["sha256"] == _source(source)["sha256"]
    assert "warm-start source" in meta["recipe"]["reasons"]["features"]

    # the same check fails for a network that starts from random weights (it is a real check)
    monkeypatch.undo()
    seen_cold = _record_first_forward(monkeypatch)
    train(_spec(data, tmp_path / "cold", features=[4, 8, 16], patch_size=[16, 16, 12], seed=99), progress=False)
    cold_expected = _source_forward(source, seen_cold["input"])
    assert not torch.allclose(seen_cold["outputs"][0], cold_expected[0], atol=1e-3)


def test_warm_start_identity_differs_from_a_cold_start_and_by_source(tmp_path):
    data = tmp_path / "data"
    cold = _spec(data, tmp_path / "m")
    warm = _spec(data, tmp_path / "m", init_from={"init_from": "champion", "checkpoint": "x", "sha256": "a" * 64})
    other = _spec(data, tmp_path / "m", init_from={"init_from": "champion", "checkpoint": "x", "sha256": "b" * 64})
    assert "init_sha256" not in cold.identity()  # models trained before warm starts keep their identity
    assert len({cold.recipe_identity(), warm.recipe_identity(), other.recipe_identity()}) == 3


@pytest.mark.parametrize("change, key", [(dict(classes={1: "outer"}), "classes"),
                                         (dict(architecture="residual_unet3d"), "architecture"),
                                         (dict(features=[8, 16, 32]), "features"),
                                         (dict(block="residual"), "block")])
def test_warm_start_from_another_model_is_refused_by_name(tmp_path, change, key):
    data = tmp_path / "data"
    source = tmp_path / "source"
    train(_spec(data, source, features=[4, 8, 16], patch_size=[16, 16, 12]), progress=False)
    classes = change.pop("classes", None)
    spec = _spec(data, tmp_path / "warm", classes=classes, init_from=_source(source, "champion"), **change)
    with pytest.raises(ValueError) as err:
        train(spec, progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("stage final: train.init_from 'champion': the source's " + key), message
    assert not ModelFiles(tmp_path / "warm").best_checkpoint.exists()  # refused before any training


def test_warm_start_from_a_missing_source_is_refused(tmp_path):
    data = tmp_path / "data"
    spec = _spec(data, tmp_path / "warm", init_from={"init_from": str(tmp_path / "nowhere"),
                                                      "checkpoint": str(tmp_path / "nowhere" / "checkpoint_best.pt"),
                                                      "sha256": "0" * 64})
    with pytest.raises(ValueError, match=r"stage final: train.init_from .*does not exist"):
        train(spec, progress=False)
