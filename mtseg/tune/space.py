"""The search space: parse ``tune.space``, check it against the typed config, build trial configs.

An experiment lives in ``<storage_path>/<tune.experiment_name>/``: Tune's state, ``runs/``,
``pbt_init/`` and ``results/``; baselines are shared under ``<storage_path>/baselines/``.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import math
import re
from dataclasses import dataclass
from typing import Any

import yaml

from mtseg import storage
from mtseg.config import Config, ConfigError, coerce_value, config_from_dict, field_spec, set_dotted
from mtseg.errors import MtsegError

RUNS_DIR = "runs"
PBT_INIT_DIR = "pbt_init"
RESULTS_DIR = "results"
BASELINES_DIR = "baselines"
CONFIG_FILE = "tune_config.yaml"

# Keys PBT may change in a running trial: hyperparameters that leave the checkpoint's layout
# intact (model, task set and strategy stay as the donor's; a key in ``grid[...]`` only sets
# the initial population).
PBT_MUTABLE = (
    "train.lr",
    "train.weight_decay",
    "train.momentum",
    "weighting.static.",
    "weighting.dwa_temperature",
    "weighting.gradnorm_alpha",
    "weighting.gradnorm_lr",
    "weighting.famo_lr",
    "weighting.famo_gamma",
)

_FORM = re.compile(r"^\s*(choice|grid|uniform|loguniform|randint)\s*\[(.*)\]\s*$", re.DOTALL)
_FORMS = "choice[a, b, ...] | grid[a, b, ...] | uniform[lo, hi] | loguniform[lo, hi] | randint[lo, hi]"


class SearchError(MtsegError, RuntimeError):
    """A search cannot start, resume or finish; the message is one line saying why."""


def experiment_uri(cfg: Config) -> str:
    """``<storage_path>/<tune.experiment_name>``: Tune's state, the trials' runs, the results."""
    return storage.join(cfg.train.storage_path, cfg.tune.experiment_name)


@dataclass(frozen=True)
class Param:
    """One searched key: its kind (``choice``, ``grid``, ``uniform``, ...) and the candidate values
    or inclusive bounds, already in the key's type."""

    key: str
    kind: str
    values: tuple

    def domain(self):
        """The Ray Tune domain (or ``grid_search`` spec) of this key."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        lo, hi = self.values
        if self.kind == "uniform":
            return tune.uniform(lo, hi)
        if self.kind == "loguniform":
            return tune.loguniform(lo, hi)
        return tune.randint(lo, hi + 1)  # Tune's upper bound is exclusive; ours is not


def parse_param(key: str, text: Any) -> Param:
    """Parse one search-space entry (``key``: dotted config key, ``text``: ``choice[..]``, ...).

    Raises:
        ConfigError: one line naming ``tune.space.<key>`` and what is wrong.
    """
    where = f"tune.space.{key}"
    try:
        tp, _ = field_spec(key)
    except ConfigError as e:
        raise ConfigError(f"tune.space: {e}") from None
    match = _FORM.match(str(text))
    if not match:
        raise ConfigError(f"{where}: {text!r} is not one of {_FORMS}")
    kind, inner = match.groups()
    try:
        items = yaml.safe_load(f"[{inner}]")
    except yaml.YAMLError:
        raise ConfigError(f"{where}: cannot read the values in {text!r}") from None

    def coerce(value):
        try:
            return coerce_value(key, value)
        except ConfigError as e:
            raise ConfigError(f"tune.space.{e}") from None

    if kind in ("choice", "grid"):
        if not items:
            raise ConfigError(f"{where}: {kind}[] needs at least one value")
        return Param(key, kind, tuple(coerce(v) for v in items))
    if len(items) != 2:
        raise ConfigError(f"{where}: {kind}[lo, hi] takes two bounds, got {len(items)}")
    if kind == "randint" and tp is not int:
        raise ConfigError(f"{where}: randint needs an integer key; use choice[...] for this {getattr(tp, '__name__', tp)} key")
    if kind in ("uniform", "loguniform") and tp is not float:
        hint = "randint[lo, hi]" if tp is int else "choice[...]"
        raise ConfigError(f"{where}: {kind} needs a float key; use {hint} for this {getattr(tp, '__name__', tp)} key")
    lo, hi = (coerce(v) for v in items)
    if not lo < hi:
        raise ConfigError(f"{where}: {kind}[{lo}, {hi}] needs lo < hi")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: loguniform needs bounds > 0, got {lo}")
    return Param(key, kind, (lo, hi))


def trial_config(base: dict, values: dict[str, Any]) -> Config:
    """The resolved config of one trial: ``base`` (a ``Config.to_dict()``) with dotted ``values`` set.

    Raises:
        ConfigError: the combination is invalid (e.g. ``dwa`` with one task).
    """
    tree = copy.deepcopy(base)
    for key, value in values.items():
        set_dotted(tree, key, value)
    return config_from_dict(tree)


# Above this many combinations of discrete values, each key is checked on its own.
_MAX_CHECKED_COMBINATIONS = 4096


def _check_combinations(cfg: Config, params: dict[str, Param]) -> None:
    """Build the config of every combination of discrete values (ranges at each bound)."""
    base = cfg.to_dict()
    discrete = [p for p in params.values() if p.kind in ("choice", "grid")]
    ranges = [p for p in params.values() if p.kind not in ("choice", "grid")]
    lows = {p.key: p.values[0] for p in ranges}
    combos: list[dict] = []
    if math.prod(len(p.values) for p in discrete) <= _MAX_CHECKED_COMBINATIONS:
        for values in itertools.product(*(p.values for p in discrete)):
            combos.append({**lows, **{p.key: v for p, v in zip(discrete, values)}})
    else:
        combos += [{p.key: v} for p in discrete for v in p.values]
    combos += [{**lows, p.key: p.values[1]} for p in ranges]
    for values in combos or [lows]:
        try:
            trial_config(base, values)
        except ConfigError as e:
            shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
            raise ConfigError(f"tune.space: {shown} gives an invalid config ({e})") from None


def validate_search(cfg: Config) -> dict[str, Param]:
    """Check ``cfg.tune`` and its search space against the typed config, before Ray starts.

    Every combination of discrete values, ranges at their bounds, is validated, so no trial
    fails on its config.

    Returns:
        ``{dotted key: Param}`` in the order written.

    Raises:
        ConfigError: one line naming the key and what is wrong.
    """
    t = cfg.tune
    if not t.space:
        raise ConfigError("tune.space: empty; name at least one dotted key, e.g. 'weighting.name: choice[equal, uncertainty]'")
    params = {key: parse_param(key, text) for key, text in t.space.items()}
    _check_combinations(cfg, params)
    tasks = set(cfg.tasks.names)
    if "tasks.names" in params:
        tasks = {n for names in params["tasks.names"].values for n in names}
    for key in params:
        if key.startswith("weighting.static.") and key.split(".")[2] not in tasks:
            raise ConfigError(
                f"tune.space.{key}: task {key.split('.')[2]!r} is not trained (tasks.names: {', '.join(cfg.tasks.names)})"
            )
    has_grid = any(p.kind == "grid" for p in params.values())
    if t.search_alg == "optuna":
        if importlib.util.find_spec("optuna") is None:
            raise ConfigError('tune.search_alg: optuna is not installed (pip install "mtseg[optuna]"), use random')
        if has_grid:
            raise ConfigError("tune.search_alg: optuna samples its own points; write choice[...] instead of grid[...]")
    if t.scheduler == "asha" and t.grace_period > cfg.train.epochs:
        raise ConfigError(f"tune.grace_period: {t.grace_period} epochs exceeds train.epochs {cfg.train.epochs}")
    if t.scheduler == "pbt":
        _validate_pbt(cfg, params)
    return params


def _validate_pbt(cfg: Config, params: dict[str, Param]) -> None:
    t = cfg.tune
    if t.search_alg != "random":
        raise ConfigError(f"tune.search_alg: PBT chooses configs itself; {t.search_alg} cannot be combined with it")
    if t.perturbation_interval >= cfg.train.epochs:
        raise ConfigError(
            f"tune.perturbation_interval: {t.perturbation_interval} epochs leaves no perturbation within train.epochs {cfg.train.epochs}"
        )
    mutated = [p for p in params.values() if p.kind != "grid"]
    if not mutated:
        raise ConfigError(
            "tune.space: PBT needs at least one mutated key (choice/uniform/loguniform/randint); grid[...] only seeds the population"
        )
    for p in mutated:
        if not any(p.key == k or (k.endswith(".") and p.key.startswith(k)) for k in PBT_MUTABLE):
            raise ConfigError(
                f"tune.space.{p.key}: PBT cannot change it inside a running trial (the checkpoint's layout depends on it); "
                f"use grid[...] to seed the population, or mutate one of "
                f"{', '.join(k + '<task>' if k.endswith('.') else k for k in PBT_MUTABLE)}"
            )
        if p.key.startswith("weighting.static."):
            names = params["weighting.name"].values if "weighting.name" in params else (cfg.weighting.name,)
            if any(n != "static" for n in names):
                raise ConfigError(f"tune.space.{p.key}: PBT mutates static task weights only with weighting.name: static")
