"""The pipeline configuration (SPEC): a validated model whose errors name the offending key.

Unknown or mistyped keys are errors (`extra="forbid"`), so `max_epoch: 10` fails loudly instead of
silently training for the default 50 epochs.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, create_model, field_serializer, field_validator,
                      model_validator)
from pydantic.fields import FieldInfo

from .labels import label_map_from_merge


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key."""


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def safe_name(value: object, what: str = "name", max_len: int = 64) -> str:
    """The one check for every name that becomes a folder or file name (cohort, stage, run id): ASCII
    letters, digits, '.', '_' or '-', starting with a letter or digit, at most `max_len` characters. Such a
    name cannot leave its folder ('..', '/'), hide ('.x'), look like an option ('-x'), or differ between
    file systems (spaces, non-ASCII)."""
    if not isinstance(value, str) or not _SAFE_NAME.fullmatch(value) or len(value) > max_len:
        raise ValueError(f"{what} must be 1-{max_len} ASCII letters, digits, '.', '_' or '-', starting with a "
                         f"letter or digit (it becomes a folder name), got {value!r}")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CohortConfig(_Section):
    name: str
    source: str | None = None  # folder to ingest; resolved against the working directory, then the config's folder
    modality: Literal["CT", "MRI", "other"] = "other"
    labels_dir: str | None = None  # plain-folder sources: the folder of labels matched by case id
    # a folder of scans without labels (images or DICOM series), ingested into the same cohort as unlabelled
    # cases: validated, preprocessed and segmented, never in train/val/test; resolved as `source` is
    unlabelled_source: str | None = None
    # sparse annotation: a folder of dense (complete) labels of sparsely annotated cases, matched by case id; the
    # evaluate stage then scores the filled-in (unannotated) voxels of every predicted case that has one
    dense_labels_dir: str | None = None

    @field_validator("name")
    @classmethod
    def _name_is_a_path_component(cls, v: str) -> str:
        return safe_name(v, "cohort name")


class PreprocessConfig(_Section):
    target_spacing: Literal["auto"] | list[float] = "auto"
    # one scheme for every channel, or a list with one per channel of a multi-channel cohort (e.g. [ct, zscore])
    normalisation: Literal["auto", "ct", "zscore", "none"] | list[Literal["auto", "ct", "zscore", "none"]] = "auto"
    workers: int = Field(2, ge=1)
    dask_address: str | None = None
    image_interpolation: Literal["linear", "cubic"] = "cubic"
    label_interpolation: Literal["nearest", "linear"] = "linear"
    memory_limit: str = "auto"  # per Dask worker, e.g. "4GB"

    @field_validator("target_spacing")
    @classmethod
    def _three_positive(cls, v):
        # `not s > 0` and isfinite: YAML's .nan and .inf are floats that `s <= 0` lets through
        if isinstance(v, list) and (len(v) != 3 or any(not s > 0 or not math.isfinite(s) for s in v)):
            raise ValueError("target_spacing must be 'auto' or three positive millimetre values [x, y, z]")
        return v

    @field_validator("memory_limit")
    @classmethod
    def _dask_memory(cls, v):
        # Dask would refuse any other word only when the cluster starts, after ingestion has run
        if not re.fullmatch(r"auto|\d+(\.\d+)?(e\d+)?\s*([kmgtp]i?)?b?", v.strip(), re.IGNORECASE):
            raise ValueError(f"memory_limit must be 'auto' or a size such as '4GB' or '512MiB', got {v!r}")
        return v


class SplitConfig(_Section):
    ratios: list[float] = [0.8, 0.1, 0.1]
    seed: int = 0
    group_by: Literal["patient_id", "case_id"] = "patient_id"

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v):
        if len(v) != 3 or any(not r >= 0 for r in v) or abs(sum(v) - 1) > 1e-6:
            raise ValueError("ratios must be three non-negative numbers (train, val, test) summing to 1")
        if v[0] <= 0:
            raise ValueError("ratios: the train share must be positive")
        return v


# A stage's own train keys that exist as direct stage keys too (the older form, still accepted).
STAGE_TRAIN_KEYS: tuple[str, ...] = ("max_epochs", "patch_size", "time_limit_min")


class StageConfig(_Section):
    """One stage of the cascade. `classes` are the stage's output classes; `merge` says which source label
    values make each of them (default: the class's own index)."""

    name: str
    classes: dict[int, str]
    merge: dict[int, list[int]] | None = None
    spacing_factor: float = Field(1.0, gt=0, allow_inf_nan=False)
    roi_from: str | None = None
    margin_mm: float = Field(10.0, ge=0, allow_inf_nan=False)
    patch_size: list[int] | None = None
    max_epochs: int | None = Field(None, ge=1)  # overrides train.max_epochs for this stage
    time_limit_min: float | None = Field(None, gt=0, allow_inf_nan=False)  # default: a share of the cascade's budget
    # Any key of the top-level train section, for this stage only (architecture, features, lr, ...); see
    # train_overrides. Annotated by name: StageTrainConfig is made from TrainConfig, defined below.
    train: "StageTrainConfig | None" = None

    @field_validator("name")
    @classmethod
    def _stage_name_is_a_path_component(cls, v: str) -> str:
        return safe_name(v, "stage name")

    @model_validator(mode="after")
    def _train_keys_given_once(self):
        # The direct keys predate `train`; a value in both places would leave the reader to guess which counts.
        given_in_train = self.train.model_fields_set if self.train is not None else set()
        for key in STAGE_TRAIN_KEYS:
            if getattr(self, key) is not None and key in given_in_train:
                raise ValueError(f"stage {self.name}: {key} is given twice, as {key} and as train.{key}: keep one")
        return self

    @field_serializer("train")
    def _train_as_given(self, train):
        # only the keys the stage gives: a dumped null would read as "overridden to planned" when loaded again
        return train.model_dump(mode="json", exclude_unset=True) if train is not None else None

    def train_overrides(self) -> dict[str, Any]:
        """The keys of the top-level train section this stage overrides, with their values (JSON data): its
        `train` keys and its direct keys max_epochs, patch_size and time_limit_min (never both for one key).
        A key given as null in `train` overrides too (null: planned, for the recipe keys)."""
        overrides = self.train.model_dump(mode="json", exclude_unset=True) if self.train is not None else {}
        for key in STAGE_TRAIN_KEYS:
            if getattr(self, key) is not None:
                overrides[key] = getattr(self, key)
        return overrides

    @model_validator(mode="after")
    def _merge_covers_classes(self):
        if not self.classes:
            raise ValueError(f"stage {self.name}: classes must list at least one class")
        if self.merge is not None and any(not srcs for srcs in self.merge.values()):
            raise ValueError(f"stage {self.name}: every merge entry must list at least one label value")
        if 0 in self.classes:
            raise ValueError(f"stage {self.name}: class 0 is background and must not be listed in classes")
        if self.merge is not None:
            missing = set(self.classes) - set(self.merge)
            extra = set(self.merge) - set(self.classes)
            if missing or extra:
                raise ValueError(f"stage {self.name}: merge keys {sorted(self.merge)} must equal classes keys {sorted(self.classes)}")
        if self.patch_size is not None and (len(self.patch_size) != 3 or min(self.patch_size) < 4):
            raise ValueError(f"stage {self.name}: patch_size must be three sizes >= 4")
        return self

    def label_map(self) -> dict[int, int]:
        """source label value -> stage class index."""
        return label_map_from_merge(self.classes, self.merge)


class TrainConfig(_Section):
    """Training settings. Recipe keys left unset (None) are planned per stage from the data, the device and the
    time budget (`unet3d.recipe`, recorded with its reasons in model.json); a value given here is used as is."""

    # unet3d.models.ARCHITECTURE_PARTS: each name is a block, a skip pattern and a gate (unet2d: slice-wise)
    architecture: Literal["unet3d", "residual_unet3d", "attention_unet3d", "unet3d_plusplus", "mobile_unet3d",
                          "unet2d"] = "unet3d"
    # One part of the architecture replaced (null: the architecture's own), e.g. attention_unet3d + skip: nested
    block: Literal["double_conv", "residual", "inverted_residual"] | None = None
    skip: Literal["plain", "nested"] | None = None
    gate: Literal["none", "attention"] | None = None
    features: list[int] | None = None  # planned: widths timed on the device against the budget
    stem_stride: list[int] | None = None  # planned: [2, 2, 2] runs stage 0 on a 2x coarser grid (cheap on a CPU)
    norm: Literal["instance", "batch", "group"] = "instance"
    dropout: float = Field(0.0, ge=0, lt=1)
    deep_supervision: bool = True
    max_epochs: int | None = Field(None, ge=1)  # planned: 50 without a time budget, else until the budget ends
    iterations_per_epoch: int | None = Field(None, ge=1)  # planned: 50, or about 1/40 of the time budget
    time_limit_min: float | None = Field(None, gt=0, allow_inf_nan=False)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # DDP processes on this node (the train stage launches them with torch.distributed.run): one GPU each with
    # NCCL when CUDA has that many, else CPU processes with gloo. Part of the model's identity: the batch is
    # per process and every process samples its own patches, so another world size trains another model.
    devices: int = Field(1, ge=1, le=64)
    batch_size: int | None = Field(None, ge=1)  # planned: 2
    patch_size: list[int] | None = None  # planned from the data
    max_patch_voxels: int = Field(128 * 128 * 128, ge=4096)
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float | None = Field(None, gt=0, allow_inf_nan=False)  # default 1e-2 for sgd, 3e-3 for adamw
    weight_decay: float = Field(3e-5, ge=0, allow_inf_nan=False)
    foreground_oversample: float = Field(0.33, ge=0, le=1)
    # planned: light_no_mirror for short runs, full for long ones; true = full, false = none
    augment: Literal["full", "light", "light_no_mirror", "none"] | bool | None = None
    val_every: int | None = Field(None, ge=1)  # planned: keeps validation under 10 % of a time budget
    val_max_cases: int | None = Field(None, ge=1)
    postprocess: Literal["auto", "none", "largest_component"] = "auto"  # auto: kept where it helps validation
    # e.g. 0.999: validation and the kept model use this moving average of the weights; default none (unet3d.recipe)
    ema_decay: float | None = Field(None, ge=0, lt=1, allow_inf_nan=False)
    seed: int = 0
    threads: int | None = Field(None, ge=1)
    compile: bool = False
    deterministic: bool = False
    roi_jitter_mm: float = Field(6.0, ge=0)  # cascade stage 2: random shift of the reference ROI box
    # One loss weight per class of the stage, background first (Çiçek et al. weight the background down). Its
    # length is checked against each stage's classes in PipelineConfig, where they are known.
    class_weights: list[float] | None = None
    # Warm start: null (random init) | champion (the cohort's serving model, unet3d.champion) | a model folder or
    # checkpoint file. The network then has the source's shape; the source's checksum is part of the model.
    init_from: str | None = Field(None, min_length=1)

    @field_validator("class_weights")
    @classmethod
    def _class_weights(cls, v):
        if v is not None and (len(v) < 2 or any(not w >= 0 or not math.isfinite(w) for w in v) or not any(v)):
            raise ValueError(f"class_weights must be one finite weight >= 0 per class (background first), not all "
                             f"0, got {v}")
        return v

    @field_validator("features")
    @classmethod
    def _features(cls, v):
        if v is not None and (len(v) < 2 or min(v) < 1):
            raise ValueError("features must list at least two positive channel counts")
        return v

    @field_validator("stem_stride", "patch_size")
    @classmethod
    def _three_positive_ints(cls, v, info):
        if v is not None and (len(v) != 3 or min(v) < 1):
            raise ValueError(f"{info.field_name} must be three positive integers [x, y, z]")
        return v

    @field_validator("augment")
    @classmethod
    def _augment_bool(cls, v):
        return {True: "full", False: "none"}.get(v, v) if isinstance(v, bool) else v


def _partial(model: type[BaseModel], name: str) -> type[BaseModel]:
    """`model` with every field optional and unset by default: the same types, bounds and validators (inherited),
    so that a partial section is validated exactly as the full one; `model_fields_set` says what was given."""
    fields = {key: (info.annotation | None, FieldInfo.merge_field_infos(info, default=None))
              for key, info in model.model_fields.items()}
    return create_model(name, __base__=model, __module__=__name__, **fields)


#: A stage's `train` section: any subset of TrainConfig's keys.
StageTrainConfig = _partial(TrainConfig, "StageTrainConfig")
StageConfig.model_rebuild()


class InferConfig(_Section):
    overlap: float = Field(0.5, ge=0, lt=1)
    tta: bool = True  # mirroring test-time augmentation (nnU-Net's default): +0.5-1 Dice point on hippocampus
    batch_size: int = Field(4, ge=1)
    splits: list[Literal["train", "val", "test"]] = Field(["val", "test"], min_length=1)

    @field_validator("splits")
    @classmethod
    def _unique_splits(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"splits must not repeat a split, got {v}")
        return v


class PromoteConfig(_Section):
    """Champion / challenger: a newly trained model serves only when its mean Dice on the frozen test cases is not
    worse than the champion's by more than `margin`, judged on the paired bootstrap interval of the difference."""

    margin: float = Field(0.01, ge=0, le=1, allow_inf_nan=False)  # Dice points
    n_boot: int = Field(2000, ge=100)
    confidence: float = Field(0.95, gt=0, lt=1)


class EvaluateConfig(_Section):
    n_boot: int = Field(1000, ge=0)
    lesion_connectivity: Literal[6, 18, 26] = 26


class PipelineConfig(_Section):
    cohort: CohortConfig
    labels: dict[int, str] | None = None
    # The label value of unannotated voxels in the cohort's label files (sparse annotation, Çiçek et al.): accepted
    # by ingestion, left out of the loss, of foreground patch sampling and of every metric. null: no sparse labels
    # declared (ingestion refuses undeclared values; 255 is still never learned nor scored, as always).
    ignore_label: int | None = Field(None, ge=1, le=65535)
    preprocess: PreprocessConfig = PreprocessConfig()
    split: SplitConfig = SplitConfig()
    stages: list[StageConfig] | None = None
    train: TrainConfig = TrainConfig()
    infer: InferConfig = InferConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    promote: PromoteConfig = PromoteConfig()

    @model_validator(mode="after")
    def _splits_have_cases(self):
        if self.labels is not None and not self.labels:
            raise ValueError("labels: must declare at least one label value (or leave the section out)")
        if self.labels and min(self.labels) <= 0:
            raise ValueError(f"labels: values must be positive (0 is the background, never listed), got "
                             f"{sorted(v for v in self.labels if v <= 0)}")
        if self.ignore_label is not None and self.labels and self.ignore_label in self.labels:
            raise ValueError(f"ignore_label: {self.ignore_label} is also declared in labels as "
                             f"{self.labels[self.ignore_label]!r}: a label value is either a class or ignored")
        ratios = dict(zip(("train", "val", "test"), self.split.ratios))
        empty = [s for s in self.infer.splits if ratios[s] <= 0]
        if empty:
            raise ValueError(f"infer.splits: {', '.join(empty)} would be empty: split.ratios gives "
                             f"{' and '.join(empty)} a share of 0 (ratios are train, val, test)")
        return self

    @model_validator(mode="after")
    def _stages_consistent(self):
        if self.stages is None:
            return self
        if not 1 <= len(self.stages) <= 2:
            raise ValueError("stages: one entry (single stage) or two (cascade)")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stages: names must be unique, got {names}")
        if self.stages[0].roi_from is not None:
            raise ValueError("stages.0.roi_from: the first stage has no earlier stage to take an ROI from")
        if len(self.stages) == 2 and self.stages[1].roi_from not in (None, self.stages[0].name):
            raise ValueError(f"stages.1.roi_from: must name stage {self.stages[0].name!r}, got {self.stages[1].roi_from!r}")
        if self.labels:
            for s in self.stages:
                unknown = sorted(set(s.label_map()) - set(self.labels))
                if unknown:
                    raise ValueError(f"stages.{s.name}.merge: label values {unknown} are not among labels {sorted(self.labels)}")
        for s in self.stages:
            if self.ignore_label is not None and self.ignore_label in s.label_map():
                raise ValueError(f"stages.{s.name}: label value {self.ignore_label} is the ignore_label and cannot "
                                 f"make a class")
        return self

    @model_validator(mode="after")
    def _class_weights_fit_the_stages(self):
        """One class weight per class of each stage (background included), where the stages are known."""
        if not self.stages and not self.labels:
            return self
        for i, stage in enumerate(self.resolved_stages()):
            own = stage.train_overrides()
            weights = own.get("class_weights", self.train.class_weights)
            n_classes = max(stage.classes) + 1
            if weights is not None and len(weights) != n_classes:
                key = f"stages.{i}.train.class_weights" if "class_weights" in own else "train.class_weights"
                raise ValueError(f"{key}: {len(weights)} weights for the {n_classes} classes of stage {stage.name} "
                                 f"(background, then classes 1-{n_classes - 1}): give one weight per class")
        return self

    def resolved_stages(self) -> list[StageConfig]:
        """The stages; without a `stages` section, one stage segmenting every declared label."""
        if self.stages:
            return list(self.stages)
        if not self.labels:
            raise ConfigError("stages: give a stages section or a labels section (one stage then segments every label)")
        return [StageConfig(name="final", classes=dict(self.labels))]

    def section_dict(self, name: str) -> dict[str, Any]:
        value = getattr(self, name)
        if isinstance(value, list):
            return {"items": [v.model_dump(mode="json") for v in value]}
        return value.model_dump(mode="json") if value is not None else {}


# Sections at their defaults. Library functions whose keyword arguments are these settings take their defaults
# from here, so that every default is written once, in the fields above.
SPLIT_DEFAULTS = SplitConfig()
TRAIN_DEFAULTS = TrainConfig()
INFER_DEFAULTS = InferConfig()
EVALUATE_DEFAULTS = EvaluateConfig()
PROMOTE_DEFAULTS = PromoteConfig()


def _format_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key")
        else:
            parts.append(f"{loc}: {msg}" if loc else msg)  # a cross-field error names its keys itself
    return "; ".join(parts)


def parse_config(data: dict[str, Any], base_dir: str | Path | None = None) -> PipelineConfig:
    if not isinstance(data, dict):
        raise ConfigError("config must be a YAML mapping with at least a 'cohort' section")
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid config: {_format_error(exc)}") from None
    if cfg.cohort.source is not None:
        cfg.cohort.source = _resolve(cfg.cohort.source, base_dir)
    if cfg.cohort.labels_dir is not None:
        cfg.cohort.labels_dir = _resolve(cfg.cohort.labels_dir, base_dir)
    if cfg.cohort.unlabelled_source is not None:
        cfg.cohort.unlabelled_source = _resolve(cfg.cohort.unlabelled_source, base_dir)
    if cfg.cohort.dense_labels_dir is not None:
        cfg.cohort.dense_labels_dir = _resolve(cfg.cohort.dense_labels_dir, base_dir)
    return cfg


def _resolve(path: str, base_dir: str | Path | None) -> str:
    p = Path(os.path.expanduser(path))
    if p.is_absolute():
        return str(p)
    if p.exists() or base_dir is None:
        return str(p.resolve())
    alt = Path(base_dir) / p
    return str(alt.resolve() if alt.exists() else p.resolve())


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last one silently,
    so a repeated `train:` would replace a whole section)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _value in node.value:  # the keys written in this mapping (`<<` merges may be overridden)
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hashable = key in seen
                except TypeError:
                    continue  # an unhashable key: the base constructor reports it
                if hashable:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{path}: not valid YAML: {problem} at line {mark.line + 1}, column {mark.column + 1}"
    return f"{path}: not valid YAML: {' '.join(str(exc).split())}"


def load_yaml(text: str, path: str | Path = "<config>"):
    """Safe YAML with duplicate keys refused (ConfigError, one line naming the key and its lines)."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error(Path(path), exc)) from None


def load_config(path: str | Path) -> PipelineConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")  # YAML is UTF-8; the locale's encoding may be ASCII
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}): "
                          f"save the config as UTF-8") from None
    data = load_yaml(text, path)
    return parse_config(data or {}, base_dir=path.parent)


# Train settings added after models were first trained with this project. At their default they are left out
# of every identity of a model (its checkpoint folder, its checkpoints' resume check, its recipe), so a model
# trained before a setting existed is still found and resumed instead of trained again from scratch.
LATER_TRAIN_SETTINGS = ("devices", "class_weights", "init_from", "block", "skip", "gate", "ema_decay")


def model_train_settings(train: dict) -> dict:
    """A stage's train settings as they identify its model: the later settings left out at their default."""
    return {k: v for k, v in train.items()
            if not (k in LATER_TRAIN_SETTINGS and v == getattr(TRAIN_DEFAULTS, k))}
