"""The study section of the config (mtseg/config.py) and the checks before Ray starts (mtseg/study/runner.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

import mtseg.evaluate
from mtseg.config import ConfigError, arm_configs, arm_overrides, load_config
from mtseg.study import StudyError, check_study

REPO_CONFIG = str(Path(__file__).resolve().parents[2] / "jobs" / "configs" / "study-synth.yaml")
CAMVID_STUDY = str(Path(__file__).resolve().parents[2] / "jobs" / "configs" / "study.yaml")
ARMS = {
    "single": ["semantic"],
    "mtl": ["semantic", "boundary", "instance"],
    "mtl_hier": ["semantic", "supercategory", "boundary", "instance"],
    "mtl_hier_ssl": ["semantic", "supercategory", "boundary", "instance", "reconstruction"],
}


@pytest.mark.parametrize("path", [REPO_CONFIG, CAMVID_STUDY])
def test_the_studies_of_the_claims_build_their_four_arms_on_one_recipe(path):
    cfg = load_config(path)
    arms = arm_configs(cfg)
    assert cfg.study.reference == "single" and cfg.study.seeds == 3
    assert {name: a.tasks.names for name, a in arms.items()} == ARMS
    assert arms["mtl_hier"].tasks.hierarchical  # p(super) x p(cat | super)
    # Every arm: the same labelled quarter, schedule and data; only the task set differs.
    for a in arms.values():
        assert a.data.labeled_fraction == 0.25 and a.train.epochs == cfg.train.epochs and a.data.uri == cfg.data.uri
        assert a.to_dict() | {"tasks": {}} == arms["single"].to_dict() | {"tasks": {}}
    # What an arm trains is a plain `mtseg train` config: no study or search of its own.
    assert all(a.study.arms == {} and a.tune.space == {} for a in arms.values())


def test_arm_values_are_read_like_command_line_overrides_or_taken_typed(study_cfg):
    cfg = study_cfg(
        arms={"single": {"tasks.names": "[semantic]", "train.lr": "0.01"}, "b": {"tasks.names": ["semantic", "boundary"]}}
    )
    assert arm_overrides(cfg) == {
        "single": {"tasks.names": ["semantic"], "train.lr": 0.01},
        "b": {"tasks.names": ["semantic", "boundary"]},
    }
    assert arm_configs(cfg)["single"].train.lr == 0.01
    # On the command line, as any other key.
    assert load_config(REPO_CONFIG, ["study.seeds=5", "study.arms.mtl={weighting.name: uncertainty}"]).study.seeds == 5


@pytest.mark.parametrize(
    ("study", "message"),
    [
        ({"reference": "nope"}, "study.reference: 'nope' is not an arm; arms are single, mtl"),
        ({"reference": ""}, "study.reference: name the arm the others are compared with, one of single, mtl"),
        ({"reference": "", "arms": {}, "name": "s"}, None),  # no arms: no study, nothing to check
        ({"seeds": 0}, "study.seeds: 0 is below the minimum 1"),
        ({"arms": {"single": {"train.seed": 3}}}, "study.arms.single.train.seed: the study sets it"),
        ({"arms": {"single": {"tune.num_samples": 3}}}, "study.arms.single.tune.num_samples: the study sets it"),
        ({"arms": {"single": {"train.lr": "fast"}}}, "study.arms.single: train.lr: expected a number, got 'fast'"),
        ({"arms": {"single": {"nope.x": 1}}}, "study.arms.single: nope.x: unknown key"),
        (
            {"arms": {"single": {"tasks.names": "[boundary]"}}},
            "study.arms.single: tasks.names: supercategory, boundary and instance",
        ),
        ({"arms": {"single": {}, "a b": {}}}, "study.arms.a b: 'a b' is not a plain name"),
        ({"arms": {"single": "x"}}, "study.arms.single: expected a mapping"),
        ({"severities": "0-3"}, "study.severities: '0-3' is outside 1-5"),
        ({"severities": "mild"}, "study.severities: 'mild' is not a severity list"),
        ({"metrics": ["miou"]}, "study.metrics: 'miou' is not a validation metric"),
        ({"metrics": []}, "study.metrics: at least one metric"),
        ({"contrasts": ["mtl-single"]}, "study.contrasts: 'mtl-single' is not 'arm - other'"),
        ({"contrasts": ["mtl - mtl"]}, "study.contrasts: 'mtl - mtl' is not 'arm - other' (two different arms"),
        ({"contrasts": ["mtl - nope"]}, "study.contrasts: 'mtl - nope': 'nope' is not an arm; arms are single, mtl"),
        ({"extra_splits": ["gap"]}, "study.extra_splits: 'gap' is reserved"),
        ({"name": "../x"}, "study.name: '../x' is not a plain name"),
    ],
)
def test_a_bad_study_section_is_one_line_naming_the_key(study_cfg, study, message):
    if message is None:
        study_cfg(**study)
        return
    with pytest.raises(ConfigError) as e:
        study_cfg(**study)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_check_study_before_ray(study_cfg, monkeypatch):
    with pytest.raises(ConfigError, match=r"^study.arms: empty"):
        check_study(study_cfg(arms={}, reference=""))
    with pytest.raises(ConfigError, match="exclude each other"):
        check_study(study_cfg(), resume=True, restart=True)
    assert list(check_study(study_cfg())) == ["single", "mtl"]
    # Without the corruption suite only a study that asks for corruptions fails, in one line.
    monkeypatch.delattr(mtseg.evaluate, "evaluate_robustness", raising=False)
    assert list(check_study(study_cfg(corruptions=""))) == ["single", "mtl"]
    with pytest.raises(StudyError, match=r"^study.corruptions: this mtseg has no corruption suite"):
        check_study(study_cfg(corruptions="fog"))


def test_corruption_names_are_read_by_the_suite(study_cfg):
    if not hasattr(mtseg.evaluate, "evaluate_robustness"):
        pytest.skip("no corruption suite in this mtseg")
    from mtseg.study.runner import corruption_plan

    names, severities = corruption_plan(study_cfg(corruptions="all", severities="1,3-4"))
    assert len(names) == 15 and severities == [1, 3, 4]
    assert corruption_plan(study_cfg()) == ([], [])
    with pytest.raises(ConfigError, match=r"^study.corruptions: unknown nope"):
        corruption_plan(study_cfg(corruptions="fog, nope"))
