"""Typed configuration: YAML file -> dataclass defaults, dotted ``key=value`` overrides on top.

Every run resolves one :class:`Config` before touching any cluster resource; a bad key or
value fails here with one line naming the key and what is allowed::

    cfg = load_config("jobs/configs/demo.yaml", ["train.lr=0.01", "model.backbone=resnet50"])
    save_config(cfg, "runs/demo/config.yaml")

A field's allowed values live in its metadata (``choices``, ``min``, ``max``) so that the
checks, the error messages and the Tune search-space validation share one source.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from mtseg import storage
from mtseg.errors import MtsegError

TASK_NAMES = ("semantic", "supercategory", "boundary", "instance", "reconstruction")
#: Every task a config may name: the built-in ones, then those ``mtseg.tasks.register`` adds.
KNOWN_TASK_NAMES: list[str] = list(TASK_NAMES)
WEIGHTING_NAMES = ("equal", "static", "uncertainty", "dwa", "gradnorm", "pcgrad", "famo")
BACKBONES = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_large")
#: ``model.weights`` naming the backbone's default ImageNet weights (torchvision's weights API).
IMAGENET_WEIGHTS = "imagenet"


class ConfigError(MtsegError, ValueError):
    """A config key or value is wrong; the message is one line naming the key."""


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]+")
#: The keys :func:`validate` checks with :func:`validate_name`.
NAME_KEYS = ("train.run_name", "tune.experiment_name", "study.name")


def validate_name(key: str, value: str) -> str:
    """Return ``value`` if it is a plain name (one path segment), else raise ConfigError naming ``key``.

    Names become storage prefixes that ``--restart`` deletes, so ``..``, ``.`` or a ``/`` would
    point a delete outside the run.
    """
    # fullmatch: `$` would also match before a trailing newline.
    if not isinstance(value, str) or not _PLAIN_NAME.fullmatch(value) or value in (".", ".."):
        raise ConfigError(f"{key}: {value!r} is not a plain name (letters, digits and -_. only, not '.' or '..')")
    return value


# What someone who knows torchvision may write for pretrained weights: an enum member name
# (DEFAULT, IMAGENET1K_V2, ResNet50_Weights.DEFAULT) or `imagenet` in another case.
_WEIGHTS_ENUM_NAME = re.compile(r"(?:\w+_Weights\.)?(?:DEFAULT|IMAGENET1K_\w+)|imagenet", re.IGNORECASE)


def check_weights_value(value: str) -> str:
    """Return ``model.weights`` if it is ``""``, ``imagenet`` or a local file path, else raise ConfigError.

    A torchvision weights name or a URL is refused with one line pointing at ``imagenet``: the
    backbone's default ImageNet weights come only through torch's cache (see
    :func:`mtseg.models.backbones.ensure_weights`), never from an arbitrary URL.

    Args:
        value: the ``model.weights`` value.

    Returns:
        ``value``, unchanged.
    """
    if value == IMAGENET_WEIGHTS:
        return value
    use = (
        f"use model.weights={IMAGENET_WEIGHTS} for the backbone's default ImageNet weights, "
        "a local state_dict file, or empty for random init"
    )
    if "://" in value:
        raise ConfigError(f"model.weights: {value!r} is a URL, which mtseg does not download from; {use}")
    if _WEIGHTS_ENUM_NAME.fullmatch(value):
        raise ConfigError(f"model.weights: {value!r} is not a weights name mtseg takes; {use}")
    return value


def _f(default: Any = dataclasses.MISSING, *, choices=None, min=None, max=None, help: str = "", **kw):
    """A dataclass field with validation metadata."""
    return field(default=default, metadata={"choices": choices, "min": min, "max": max, "help": help}, **kw)


@dataclass
class DataConfig:
    uri: str = _f("runs/demo/shards", help="root of the sharded dataset: <uri>/<split>/manifest.json")
    train_split: str = _f("train2017")
    val_split: str = _f("val2017")
    image_size: int = _f(64, min=16, help="square crop side fed to the model, pixels")
    scale_min: float = _f(0.5, min=0.05, max=1.0, help="RandomResizedCrop smallest area fraction")
    hflip: bool = _f(True)
    batch_size: int = _f(16, min=1, help="images per worker per step")
    max_bad_fraction: float = _f(0.05, min=0.0, max=1.0, help="share of bad images that fails a shard run")
    images_per_shard: int = _f(256, min=1)
    labeled_fraction: float = _f(
        1.0,
        min=0.01,
        max=1.0,
        help="semi-supervised training: keep the labels of this share of the train images (the same "
        "images for every seed, by a hash of the image id); the rest stream unlabelled, so only "
        "self-supervised tasks (reconstruction) learn from them and every task set takes the same steps",
    )
    map_num_cpus: float = _f(0.5, min=0.0, help="CPUs reserved by each Ray Data read/decode task")
    rows_per_read_task: int = _f(32, min=1, help="images per Ray Data read task in the training stream")
    max_image_side: int = _f(2048, min=16, help="predict: larger images are decoded reduced and downscaled to this side")


@dataclass
class ModelConfig:
    backbone: str = _f("resnet18", choices=BACKBONES)
    decoder: str = _f("fpn", choices=("fpn", "aspp"))
    decoder_channels: int = _f(64, min=8)
    weights: str = _f(
        "",
        help="backbone weights: 'imagenet' = torchvision's default ImageNet weights, read from "
        "$TORCH_HOME/hub/checkpoints/ (the driver downloads a missing file once, when it can); "
        "a local state_dict file; empty = random init",
    )
    channels_last: bool = _f(False)
    sync_batchnorm: bool = _f(
        False,
        help="SyncBatchNorm: normalise with global-batch statistics (for small per-GPU "
        "batches); off, rank 0's BatchNorm buffers are broadcast after each step",
    )


@dataclass
class TasksConfig:
    names: list[str] = _f(default_factory=lambda: list(TASK_NAMES), choices=KNOWN_TASK_NAMES)
    hierarchical: bool = _f(True, help="tie category and supercategory heads through the COCO hierarchy")
    boundary_width: int = _f(2, min=1, help="boundary target thickness, pixels")
    center_sigma: float = _f(2.0, min=0.1, help="instance center heatmap Gaussian sigma, pixels")
    mask_ratio: float = _f(0.5, min=0.0, max=1.0, help="reconstruction: share of patches masked")
    patch_size: int = _f(8, min=1, help="reconstruction: masked patch side, pixels")
    panoptic_min_area: float = _f(
        0.001,
        min=0.0,
        max=1.0,
        help="panoptic fusion: thing and stuff segments smaller than this share of the image become void",
    )


@dataclass
class WeightingConfig:
    name: str = _f("equal", choices=WEIGHTING_NAMES)
    static: dict[str, float] = _f(default_factory=dict, min=0.0, help="per-task weights for 'static' (missing = 1.0)")
    dwa_temperature: float = _f(2.0, min=1e-6)
    gradnorm_alpha: float = _f(1.5, min=0.0)
    gradnorm_lr: float = _f(0.025, min=0.0)
    famo_lr: float = _f(0.025, min=0.0)
    famo_gamma: float = _f(0.001, min=0.0)
    rep_grad: bool = _f(
        False,
        help="pcgrad/gradnorm: per-task gradients at the shared representation, one encoder "
        "backward (LibMTL's rep_grad; an approximation, faster)",
    )
    pcgrad_batched: bool = _f(False, help="exact pcgrad: the per-task encoder backwards as one batched (vmap) backward")


@dataclass
class TrainConfig:
    run_name: str = _f("demo")
    storage_path: str = _f("runs", help="local dir or s3://bucket/prefix for checkpoints and results")
    epochs: int = _f(10, min=1)
    optimizer: str = _f("adamw", choices=("adamw", "sgd"))
    lr: float = _f(2e-3, min=0.0)
    weight_decay: float = _f(1e-4, min=0.0)
    momentum: float = _f(0.9, min=0.0, max=1.0)
    schedule: str = _f("poly", choices=("poly", "cosine", "constant"))
    warmup_steps: int = _f(20, min=0)
    grad_accum: int = _f(1, min=1)
    grad_clip: float = _f(5.0, min=0.0, help="max grad norm; 0 disables")
    seed: int = _f(0)
    amp: bool = _f(True, help="bf16 autocast on GPU (ignored on CPU)")
    compile: bool = _f(False, help="wrap the model in torch.compile (the first steps compile; for GPU runs)")
    num_workers: int = _f(2, min=1)
    cpus_per_worker: float = _f(1.0, min=0.0)
    use_gpu: str = _f("auto", choices=("auto", "true", "false"))
    checkpoint_every_steps: int = _f(50, min=0, help="0 = only at epoch end")
    val_every_epochs: int = _f(1, min=1, help="validate (and checkpoint at epoch end) every N epochs, and after the last")
    keep_checkpoints: int = _f(2, min=1, help="best K by val/miou are kept")
    log_every_steps: int = _f(10, min=1)
    max_failures: int = _f(3, min=-1)
    val_max_images: int = _f(0, min=0, help="0 = whole val split")
    log_image_ids: bool = _f(False, help="audit the data order: write each step's image ids to <run dir>/image_ids/")
    ray_log_level: str = _f(
        "WARNING",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="Ray Train's own console logs (mtseg's progress line is printed regardless)",
    )


@dataclass
class TuneConfig:
    space: dict[str, str] = _f(
        default_factory=dict, help="dotted key -> choice[..] | uniform[a,b] | loguniform[a,b] | randint[a,b] | grid[..]"
    )
    num_samples: int = _f(4, min=1)
    scheduler: str = _f("asha", choices=("asha", "pbt", "fifo"))
    search_alg: str = _f("random", choices=("random", "optuna"))
    metric: str = _f("val/miou", choices=("val/miou", "val/delta_m"))
    mode: str = _f("max", choices=("max", "min"))
    max_concurrent_trials: int = _f(2, min=1)
    grace_period: int = _f(1, min=1)
    reduction_factor: int = _f(2, min=2)
    perturbation_interval: int = _f(1, min=1)
    pbt_synch: bool = _f(False, help="synchronous PBT: perturb the whole population at once (reproducible; every member waits)")
    experiment_name: str = _f("tune")


#: Arm override keys a study sets itself: the seed per run, and where the runs go.
STUDY_OWNED_KEYS = ("train.seed", "train.run_name", "train.storage_path")
#: Prefixes of a study's per-run metric keys (``train/miou``, ``gap/miou``, ``mpc/miou``...): an
#: extra split cannot take one as its name, or its metrics would be mistaken for them.
STUDY_RESERVED_SPLITS = ("train", "val", "gap", "mpc", "rpc")
#: Corruption severities, as Hendrycks & Dietterich number them.
SEVERITY_RANGE = (1, 5)


@dataclass
class StudyConfig:
    name: str = _f("study", help="the study's directory under train.storage_path: Tune's state, runs/, results/")
    seeds: int = _f(3, min=1, help="runs per arm, with train.seed, train.seed+1, ...; 3 or more for a useful interval")
    reference: str = _f("", help="the arm every other arm is compared with (paired differences, Δm%)")
    arms: dict[str, dict[str, Any]] = _f(
        default_factory=dict,
        help="arm name -> dotted overrides of `mtseg train` (a string value is read as a command-line override)",
    )
    metrics: list[str] = _f(
        default_factory=lambda: ["val/miou", "val/pq", "val/boundary_f1"],
        help="validation metrics summarised per arm and averaged into Δm%",
    )
    corruptions: str = _f(
        "", help="corruptions of the val split, as evaluate's --corruptions: 'all' or comma-separated names; empty = none"
    )
    severities: str = _f("1-5", help="corruption severities: '1-5', '1,3,5' or '3'")
    extra_splits: list[str] = _f(
        default_factory=list, help="more splits of data.uri each model is evaluated on (a held-out domain)"
    )
    train_split_limit: int = _f(0, min=0, help="images of the train split evaluated for the train-val gap; 0 = skip")
    contrasts: list[str] = _f(
        default_factory=list,
        help="more paired comparisons than each arm against the reference, 'arm - other' "
        "(e.g. 'mtl_hier - mtl'): every metric's difference seed by seed, its interval and p-value",
    )


@dataclass
class ClusterConfig:
    address: str = _f("", help="Ray address; empty = RAY_ADDRESS or a local head")
    s3_endpoint: str = _f("", help="S3 endpoint URL; empty = AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------- coercion


def _coerce(key: str, tp, value: Any, meta: dict) -> Any:
    """Coerce ``value`` to the annotated type ``tp`` and check the field's metadata.

    A mapping field's ``choices``/``min``/``max`` apply to each of its values.
    """
    if tp is Any:  # a study arm's override value: checked against its own key by validate_study
        return value
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item_tp,) = typing.get_args(tp)[:1]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(key, item_tp, v, meta) for v in value]
    if origin is dict:
        v_tp = typing.get_args(tp)[1]
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(f"{key}.{k}", v_tp, v, meta) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            out = value
        elif isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            out = value.lower() in ("true", "yes", "1", "on")
        else:
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            out = int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    elif tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(out):  # YAML reads .nan and .inf, and min/max comparisons let them through
            raise ConfigError(f"{key}: expected a finite number, got {out!r}")
    elif tp is str:
        if value is None:
            value = ""
        if isinstance(value, bool):  # YAML reads `true` as a boolean; string fields spell it
            value = "true" if value else "false"
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        out = str(value)
    else:  # pragma: no cover - every field uses one of the types above
        raise ConfigError(f"{key}: unsupported type {tp}")

    choices, lo, hi = meta.get("choices"), meta.get("min"), meta.get("max")
    if choices and out not in choices:
        raise ConfigError(f"{key}: {out!r} is not one of {', '.join(map(str, choices))}")
    if lo is not None and out < lo:
        raise ConfigError(f"{key}: {out!r} is below the minimum {lo}")
    if hi is not None and out > hi:
        raise ConfigError(f"{key}: {out!r} is above the maximum {hi}")
    return out


def field_spec(dotted: str) -> tuple[Any, dict]:
    """Type and metadata of a dotted config key (``train.lr``); ConfigError if unknown."""
    parts = dotted.split(".")
    cls = Config
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            break
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            where = ".".join(parts[:i]) or "config"
            raise ConfigError(f"{dotted}: unknown key; {where} has {', '.join(sorted(fields))}")
        tp = typing.get_type_hints(cls)[part]
        if dataclasses.is_dataclass(tp):
            cls = tp
            continue
        rest = parts[i + 1 :]
        if typing.get_origin(tp) is dict and len(rest) == 1:
            return typing.get_args(tp)[1], dict(fields[part].metadata)
        if rest:
            raise ConfigError(f"{dotted}: unknown key; {'.'.join(parts[: i + 1])} has no sub-keys")
        return tp, dict(fields[part].metadata)
    raise ConfigError(f"{dotted}: is a section, not a key")


def coerce_value(dotted: str, value: Any) -> Any:
    """Validate one value for a dotted key, returning it in the field's type."""
    tp, meta = field_spec(dotted)
    return _coerce(dotted, tp, value, meta)


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise ConfigError(f"{key}: unknown key; {prefix.rstrip('.') or 'config'} has {', '.join(sorted(fields))}")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, f"{key}.")
        else:
            kwargs[name] = _coerce(key, tp, value, dict(fields[name].metadata))
    return cls(**kwargs)


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set ``tree[a][b] = value`` for ``dotted`` ``a.b``, creating sections on the way."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is a value, not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``train.lr=0.01`` -> ("train.lr", 0.01); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"{text}: an override is key=value, e.g. train.lr=0.01")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    field_spec(key)  # unknown keys fail here with the list of known ones
    if key in NAME_KEYS and isinstance(value, str) and raw != raw.strip():
        # YAML drops the spaces around `x `: a name is checked as typed, so `x ` is refused, not renamed.
        value = raw
    return key, value


#: Keys mtseg once accepted but never read: configs and checkpoints that still carry them at their
#: default load, any other value is an error saying what replaced it.
RETIRED_KEYS = {
    ("data", "unlabeled_uri"): ("", "it was never read; data.labeled_fraction trains on unlabelled images"),
}


def _drop_retired(tree: dict) -> None:
    for (section, name), (default, why) in RETIRED_KEYS.items():
        node = tree.get(section)
        if isinstance(node, dict) and name in node:
            if node.pop(name) not in (default, None):
                raise ConfigError(f"{section}.{name}: no longer a key: {why}")


def config_from_dict(data: dict | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    tree = _deep_copy(data or {})
    if not isinstance(tree, dict):
        raise ConfigError(f"config: expected a mapping of sections (data, model, train, ...), got a {type(tree).__name__}")
    _drop_retired(tree)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(tree, key, value)
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def _deep_copy(d, where: str = "config", key: str = "", _open: frozenset = frozenset()):
    """Copy nested dicts and lists; a YAML alias that contains itself is a ConfigError, not a RecursionError."""
    if isinstance(d, (dict, list)):
        if id(d) in _open:
            raise ConfigError(f"{where}: the YAML alias at {key or 'the top level'} refers to a mapping or list that contains it")
        inner = _open | {id(d)}
        if isinstance(d, dict):
            return {k: _deep_copy(v, where, f"{key}.{k}" if key else str(k), inner) for k, v in d.items()}
        return [_deep_copy(v, where, f"{key}[{i}]", inner) for i, v in enumerate(d)]
    return d


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config file (or defaults when ``path`` is None) and apply dotted overrides.

    Raises:
        ConfigError: one line naming the file, or the bad key or value.
    """
    data: dict = {}
    if path:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a directory, not a config file") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
        try:
            data = yaml.safe_load(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(
                f"{path}: the top level must be a mapping of sections (data, model, train, ...), not a {type(data).__name__}"
            )
        data = _deep_copy(data, where=path)
    return config_from_dict(data, overrides)


def validate(cfg: Config) -> None:
    """Checks across fields, after each field has passed its own."""
    if not cfg.tasks.names:
        raise ConfigError("tasks.names: at least one task is required")
    if len(set(cfg.tasks.names)) != len(cfg.tasks.names):
        raise ConfigError(f"tasks.names: duplicate task in {cfg.tasks.names}")
    for task in cfg.weighting.static:
        if task not in KNOWN_TASK_NAMES:
            raise ConfigError(f"weighting.static.{task}: unknown task; tasks are {', '.join(KNOWN_TASK_NAMES)}")
    if cfg.weighting.name in ("gradnorm", "pcgrad", "famo", "dwa") and len(cfg.tasks.names) < 2:
        raise ConfigError(f"weighting.name: {cfg.weighting.name} needs at least two tasks")
    if cfg.weighting.rep_grad and cfg.weighting.name not in ("gradnorm", "pcgrad"):
        raise ConfigError(f"weighting.rep_grad: only gradnorm and pcgrad have it, not {cfg.weighting.name}")
    if cfg.tasks.patch_size > cfg.data.image_size:
        raise ConfigError(f"tasks.patch_size: {cfg.tasks.patch_size} exceeds data.image_size {cfg.data.image_size}")
    if {"supercategory", "boundary", "instance"} & set(cfg.tasks.names) and "semantic" not in cfg.tasks.names:
        raise ConfigError("tasks.names: supercategory, boundary and instance refine 'semantic', which must be in the set")
    for key, uri in (("data.uri", cfg.data.uri), ("train.storage_path", cfg.train.storage_path)):
        try:
            storage.check_uri(uri)
        except storage.StorageError as e:
            raise ConfigError(f"{key}: {e}") from None
    check_weights_value(cfg.model.weights)
    validate_name("train.run_name", cfg.train.run_name)
    validate_name("tune.experiment_name", cfg.tune.experiment_name)
    validate_study(cfg)


# ---------------------------------------------------------------------------- studies


def parse_severities(text: str) -> list[int]:
    """``"1-5"`` -> [1, 2, 3, 4, 5]; ``"1,3,5"`` -> [1, 3, 5]; each within :data:`SEVERITY_RANGE`.

    The syntax of ``mtseg evaluate --severities``, checked here so that a study fails on it before
    submission; the corruption suite's own parser reads it again where the corruptions run.

    Raises:
        ConfigError: one line naming ``study.severities``.
    """
    lo, hi = SEVERITY_RANGE
    out: list[int] = []
    for part in (p.strip() for p in str(text).split(",")):
        a, sep, b = part.partition("-")
        try:
            first, last = (int(a), int(b)) if sep else (int(part), int(part))
        except ValueError:
            raise ConfigError(f"study.severities: {text!r} is not a severity list like '1-5' or '1,3,5'") from None
        if not lo <= first <= last <= hi:
            raise ConfigError(f"study.severities: {part!r} is outside {lo}-{hi}")
        out += [s for s in range(first, last + 1) if s not in out]
    return out


def arm_overrides(cfg: Config) -> dict[str, dict[str, Any]]:
    """Each arm's overrides with every value in its key's type, in the order written.

    A string value is read as a command-line override is (``"[semantic, boundary]"`` is a list).

    Raises:
        ConfigError: one line naming ``study.arms.<arm>.<key>``.
    """
    out: dict[str, dict[str, Any]] = {}
    for arm, overrides in cfg.study.arms.items():
        validate_name(f"study.arms.{arm}", arm)
        if not isinstance(overrides, dict):
            raise ConfigError(f"study.arms.{arm}: expected a mapping of dotted overrides, got {overrides!r}")
        values: dict[str, Any] = {}
        for key, value in (overrides or {}).items():
            where = f"study.arms.{arm}.{key}"
            if key in STUDY_OWNED_KEYS or key.split(".")[0] in ("study", "tune"):
                raise ConfigError(
                    f"{where}: the study sets it (seeds: study.seeds; runs: under study.name); drop it from the arm"
                )
            try:
                if isinstance(value, str):
                    key, value = parse_override(f"{key}={value}")
                values[key] = coerce_value(key, value)
            except ConfigError as e:
                raise ConfigError(f"study.arms.{arm}: {e}") from None
        out[str(arm)] = values
    return out


def arm_configs(cfg: Config) -> dict[str, Config]:
    """The config each arm trains, before its seed: ``cfg`` with the arm's overrides, no tune or study section.

    Raises:
        ConfigError: one line naming the arm and what is wrong with the config it makes.
    """
    base = cfg.to_dict()
    base["tune"] = dataclasses.asdict(TuneConfig())
    base["study"] = dataclasses.asdict(StudyConfig())
    out = {}
    for arm, values in arm_overrides(cfg).items():
        tree = _deep_copy(base)
        for key, value in values.items():
            set_dotted(tree, key, value)
        try:
            out[arm] = config_from_dict(tree)
        except ConfigError as e:
            raise ConfigError(f"study.arms.{arm}: {e}") from None
    return out


def validate_study(cfg: Config) -> None:
    """Check the study section: names, reference, metrics, splits, severities, and that every arm
    builds a valid config. A config without arms is no study and passes.

    Raises:
        ConfigError: one line naming the key.
    """
    st = cfg.study
    validate_name("study.name", st.name)
    parse_severities(st.severities)
    for arm in st.arms:
        validate_name(f"study.arms.{arm}", arm)
    if not st.arms:
        if st.reference:
            raise ConfigError(f"study.reference: names arm {st.reference!r} but study.arms is empty")
        return
    if not st.reference:
        raise ConfigError(f"study.reference: name the arm the others are compared with, one of {', '.join(st.arms)}")
    if st.reference not in st.arms:
        raise ConfigError(f"study.reference: {st.reference!r} is not an arm; arms are {', '.join(st.arms)}")
    if not st.metrics:
        raise ConfigError("study.metrics: at least one metric, e.g. val/miou")
    for metric in st.metrics:
        if not metric.startswith("val/") or metric == "val/":
            raise ConfigError(f"study.metrics: {metric!r} is not a validation metric (val/<name>, e.g. val/miou)")
    if len(set(st.metrics)) != len(st.metrics):
        raise ConfigError(f"study.metrics: duplicate metric in {st.metrics}")
    for split in st.extra_splits:
        validate_name("study.extra_splits", split)
        if split in STUDY_RESERVED_SPLITS:
            raise ConfigError(
                f"study.extra_splits: {split!r} is reserved for the study's own metrics ({', '.join(STUDY_RESERVED_SPLITS)})"
            )
    if len(set(st.extra_splits)) != len(st.extra_splits):
        raise ConfigError(f"study.extra_splits: duplicate split in {st.extra_splits}")
    for text in st.contrasts:
        parse_contrast(text, list(st.arms))
    arm_configs(cfg)


def parse_contrast(text: str, arms: list[str]) -> tuple[str, str]:
    """``"mtl_hier - mtl"`` -> ("mtl_hier", "mtl"): two different arms of the study.

    Raises:
        ConfigError: not of the form ``arm - other``, or a name that is not an arm.
    """
    parts = [p.strip() for p in str(text).split(" - ")]
    if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
        raise ConfigError(f"study.contrasts: {text!r} is not 'arm - other' (two different arms, spaces around the minus)")
    for name in parts:
        if name not in arms:
            raise ConfigError(f"study.contrasts: {text!r}: {name!r} is not an arm; arms are {', '.join(arms)}")
    return parts[0], parts[1]


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config beside a run's outputs (a local path or URI, atomically).

    Raises:
        mtseg.storage.StorageError: the file cannot be written (one line naming it).
    """
    storage.write_bytes(path, to_yaml(cfg).encode())
