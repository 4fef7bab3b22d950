import pytest

from mtseg.config import Config, ConfigError, coerce_value, config_from_dict, load_config, save_config


def test_defaults_and_overrides():
    cfg = load_config(
        None, ["train.lr=0.01", "model.backbone=resnet50", "tasks.names=[semantic, boundary]", "weighting.static.semantic=2"]
    )
    assert isinstance(cfg, Config)
    assert cfg.train.lr == 0.01
    assert cfg.model.backbone == "resnet50"
    assert cfg.tasks.names == ["semantic", "boundary"]
    assert cfg.weighting.static == {"semantic": 2.0}


def test_yaml_file_and_resolved_copy(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\nmodel:\n  decoder: aspp\n")
    cfg = load_config(str(path), ["train.epochs=5"])
    assert cfg.train.epochs == 5 and cfg.model.decoder == "aspp"
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, str(out))
    assert load_config(str(out)) == cfg


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lrr=0.1", "train.lrr: unknown key"),
        ("nosection.x=1", "nosection.x: unknown key"),
        ("train.lr=abc", "train.lr: expected a number"),
        ("train.lr=-1", "train.lr: -1.0 is below the minimum"),
        ("model.backbone=vgg", "model.backbone: 'vgg' is not one of"),
        ("tasks.names=[semantic, depth]", "tasks.names: 'depth' is not one of"),
        ("train.epochs=1.5", "train.epochs: expected an integer"),
        ("train.amp=maybe", "train.amp: expected true or false"),
        ("train.lr", "an override is key=value"),
        ("weighting.static.depth=1", "weighting.static.depth: unknown task"),
    ],
)
def test_bad_override_is_one_line_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    msg = str(info.value)
    assert needle in msg
    assert "\n" not in msg


def test_bad_yaml_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  batchsize: 3\n")
    with pytest.raises(ConfigError, match=r"^data.batchsize: unknown key; data has .*batch_size"):
        load_config(str(path))


def test_missing_file_and_cross_field_checks(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="tasks.names"):
        load_config(None, ["tasks.names=[boundary]"])
    with pytest.raises(ConfigError, match="needs at least two tasks"):
        load_config(None, ["tasks.names=[semantic]", "weighting.name=pcgrad"])


def test_coerce_value_for_search_spaces():
    assert coerce_value("model.decoder_channels", "128") == 128
    with pytest.raises(ConfigError, match="model.decoder"):
        coerce_value("model.decoder", "unet")


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lr=.nan", "train.lr: expected a finite number, got nan"),
        ("train.lr=inf", "train.lr: expected a finite number, got inf"),
        ("data.scale_min=-.inf", "data.scale_min: expected a finite number, got -inf"),
        ("weighting.static.semantic=-1", "weighting.static.semantic: -1.0 is below the minimum 0.0"),
        ("train.storage_path=s3://", "train.storage_path: s3://: no bucket name"),
        ("data.uri=s3://mtseg//x", "data.uri: s3://mtseg//x: empty, '.' or '..' path segment"),
    ],
)
def test_non_finite_numbers_negative_task_weights_and_bad_uris_are_refused(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_search_space_values_get_the_same_checks():
    with pytest.raises(ConfigError, match="weighting.static.boundary: -0.5 is below the minimum"):
        coerce_value("weighting.static.boundary", -0.5)
    with pytest.raises(ConfigError, match="finite"):
        coerce_value("train.weight_decay", float("nan"))


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"train:\n  lr: 0.01 \xe9\n", "not UTF-8 text (byte 0xe9 at offset 18)"),
        (b"- train\n- model\n", "the top level must be a mapping of sections"),
        (b"a: &x [*x]\n", "the YAML alias at a[0] refers to a mapping or list that contains it"),
        (b"train: &x\n  lr: *x\n", "the YAML alias at train.lr refers to"),
    ],
)
def test_unreadable_config_files_are_one_line_naming_the_file(tmp_path, content, needle):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(f"{path}: {needle}") and "\n" not in str(info.value)


def test_config_path_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match=r": is a directory, not a config file$"):
        load_config(str(tmp_path))


@pytest.mark.parametrize("override", ["train.run_name=x ", "train.run_name= x", "tune.experiment_name=e "])
def test_a_name_with_spaces_around_it_is_refused_not_stripped(override):
    """YAML reads `x ` as `x`: a run named other than typed would resume or start the wrong run."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    msg = str(info.value)
    assert msg.startswith(f"{key}: ") and "not a plain name" in msg and "\n" not in msg


def test_a_name_ending_in_a_newline_is_refused():
    """A regex `$` matches before a final newline; a YAML file can spell one ("x\\n")."""
    with pytest.raises(ConfigError, match=r"^train.run_name: 'x\\n' is not a plain name"):
        config_from_dict({"train": {"run_name": "x\n"}})


@pytest.mark.parametrize("weights", ["", "imagenet", "/data/backbones/resnet50.pth", "weights/r18.pt"])
def test_model_weights_takes_imagenet_or_a_local_file(weights, tmp_path, monkeypatch):
    # Validation only reads the value: workers and checkpoint loads re-validate configs on
    # machines that need no cache, so an empty TORCH_HOME and a missing local file pass here.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    assert load_config(None, [f"model.weights={weights}"]).model.weights == weights
    assert config_from_dict({"model": {"weights": weights}}).model.weights == weights


@pytest.mark.parametrize(
    "weights",
    ["DEFAULT", "IMAGENET1K_V1", "IMAGENET1K_V2", "ResNet50_Weights.DEFAULT", "ImageNet", "https://x.org/resnet50.pth"],
)
def test_model_weights_hub_names_and_urls_point_at_imagenet(weights):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"model.weights={weights}"])
    msg = str(info.value)
    assert msg.startswith(f"model.weights: {weights!r} ") and "use model.weights=imagenet" in msg and "\n" not in msg


def test_a_retired_key_at_its_default_loads_and_any_other_value_says_what_replaced_it():
    from mtseg.config import ConfigError, config_from_dict

    assert config_from_dict({"data": {"unlabeled_uri": ""}}).data.labeled_fraction == 1.0  # old checkpoints load
    with pytest.raises(ConfigError, match=r"data.unlabeled_uri: no longer a key: .*data.labeled_fraction"):
        config_from_dict({"data": {"unlabeled_uri": "s3://b/unlabelled"}})
    with pytest.raises(ConfigError, match="data.labeled_fraction"):
        config_from_dict({"data": {"labeled_fraction": 0}})
