"""Search spaces (mtseg/tune/space.py): every form parses into the key's type, bad entries and combinations fail in one line before any trial, trial configs."""

from __future__ import annotations

import pytest

from mtseg.config import ConfigError
from mtseg.tune import parse_param, trial_config, validate_search


def test_every_form_parses_into_the_keys_type():
    assert parse_param("weighting.name", "choice[equal, uncertainty]").values == ("equal", "uncertainty")
    assert parse_param("model.decoder_channels", "grid[64, 128]").values == (64, 128)
    assert parse_param("train.lr", "loguniform[1e-4, 1e-2]").values == (1e-4, 1e-2)
    assert parse_param("weighting.static.semantic", "uniform[0.5, 2]").values == (0.5, 2.0)
    assert parse_param("train.epochs", "randint[2, 4]").values == (2, 4)
    names = parse_param("tasks.names", "choice[[semantic], [semantic, boundary]]")
    assert names.values == (["semantic"], ["semantic", "boundary"])


def test_randint_includes_its_upper_bound():
    domain = parse_param("train.epochs", "randint[2, 3]").domain()
    assert {domain.sample() for _ in range(200)} == {2, 3}


@pytest.mark.parametrize(
    "key, text, message",
    [
        ("weighting.name", "choice[equal, bogus]", "'bogus' is not one of"),
        ("train.lr", "0.01", "is not one of choice["),
        ("train.lr", "uniform[0.1]", "takes two bounds"),
        ("train.lr", "loguniform[0, 1]", "bounds > 0"),
        ("train.epochs", "uniform[1, 3]", "use randint"),
        ("model.backbone", "loguniform[1, 2]", "needs a float key"),
        ("train.lr", "randint[1, 3]", "needs an integer key"),
        ("train.epochs", "randint[3, 1]", "lo < hi"),
        ("data.scale_min", "uniform[0.01, 0.5]", "below the minimum"),
        ("weighting.nmae", "choice[equal]", "unknown key"),
        ("model.backbone", "choice[]", "at least one value"),
    ],
)
def test_a_bad_entry_is_one_line_naming_the_key(key, text, message):
    with pytest.raises(ConfigError, match="^tune.space") as e:
        parse_param(key, text)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_space_combinations_are_validated_before_any_trial(make_cfg):
    cfg = make_cfg({"weighting.name": "choice[equal, dwa]", "tasks.names": "choice[[semantic], [semantic, boundary]]"})
    with pytest.raises(ConfigError, match="dwa needs at least two tasks"):
        validate_search(cfg)
    cfg = make_cfg({"weighting.static.instance": "uniform[0.5, 2]"}, weighting={"name": "static"})
    with pytest.raises(ConfigError, match="'instance' is not trained"):
        validate_search(cfg)
    with pytest.raises(ConfigError, match="tune.space: empty"):
        validate_search(make_cfg({}))


def test_scheduler_and_search_rules(make_cfg):
    space = {"weighting.name": "grid[equal, uncertainty]"}
    with pytest.raises(ConfigError, match="grace_period"):
        validate_search(make_cfg(space, tune={"grace_period": 5}, train={"epochs": 2}))
    optuna_cfg = make_cfg({"weighting.name": "choice[equal, uncertainty]"}, tune={"search_alg": "optuna"})
    try:
        import optuna  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="optuna is not installed"):
            validate_search(optuna_cfg)
    else:
        validate_search(optuna_cfg)
        with pytest.raises(ConfigError, match="write choice"):
            validate_search(make_cfg(space, tune={"search_alg": "optuna"}))
    pbt = {"scheduler": "pbt", "perturbation_interval": 1}
    with pytest.raises(ConfigError, match="cannot change it inside a running trial"):
        validate_search(make_cfg({"model.decoder_channels": "choice[16, 32]"}, tune=pbt, train={"epochs": 3}))
    with pytest.raises(ConfigError, match="only with weighting.name: static"):
        validate_search(make_cfg({"weighting.static.semantic": "uniform[0.5, 2]"}, tune=pbt, train={"epochs": 3}))
    with pytest.raises(ConfigError, match="needs at least one mutated key"):
        validate_search(make_cfg(space, tune=pbt, train={"epochs": 3}))
    with pytest.raises(ConfigError, match="perturbation_interval"):
        validate_search(make_cfg({"train.lr": "loguniform[1e-3, 1e-2]"}, tune=pbt, train={"epochs": 1}))
    ok = make_cfg(
        {"weighting.static.semantic": "uniform[0.5, 2]", "model.decoder_channels": "grid[16, 32]"},
        tune=pbt,
        train={"epochs": 3},
        weighting={"name": "static"},
    )
    assert list(validate_search(ok)) == ["weighting.static.semantic", "model.decoder_channels"]


def test_trial_config_sets_dotted_keys_including_dict_entries(make_cfg):
    base = make_cfg({"train.lr": "loguniform[1e-3, 1e-2]"}).to_dict()
    cfg = trial_config(base, {"weighting.name": "static", "weighting.static.semantic": 0.3, "train.lr": 0.004})
    assert cfg.weighting.static == {"semantic": 0.3} and cfg.train.lr == 0.004
    assert base["weighting"]["static"] == {}  # the base is not modified
