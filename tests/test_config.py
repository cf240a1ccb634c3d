from pathlib import Path

import pytest

from medtl.config import Config, ConfigError, dump_config, load_config


def test_defaults_without_file():
    config = load_config()
    assert config == Config()
    assert config.model.backbone == "resnet18" and config.model.weights == "imagenet"
    assert config.calibration.method == "auto"


def test_file_overrides_and_relative_manifest(tmp_path: Path):
    (tmp_path / "run.yaml").write_text("data:\n  manifest: data/m.csv\ntrain:\n  epochs: 3\n")
    config = load_config(tmp_path / "run.yaml", ["train.lr=0.01", "model.weights=none", "data.image_size=[32, 32]"])
    assert config.data.manifest == (tmp_path / "data" / "m.csv").resolve()
    assert config.train.epochs == 3 and config.train.lr == 0.01
    assert config.model.weights == "none" and config.data.image_size == [32, 32]


def test_override_paths_are_relative_to_the_working_directory(tmp_path: Path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "run.yaml").write_text("data:\n  manifest: data/m.csv\n")
    monkeypatch.chdir(tmp_path)
    config = load_config("configs/run.yaml", ["data.target_manifest=site_b/unlabelled.csv"])
    assert config.data.manifest == (tmp_path / "configs" / "data" / "m.csv").resolve()  # written in the file
    assert config.data.target_manifest == (tmp_path / "site_b" / "unlabelled.csv").resolve()  # typed on the command line
    config = load_config("configs/run.yaml", ["data.manifest=mine.csv"])
    assert config.data.manifest == (tmp_path / "mine.csv").resolve()


def test_round_trip_through_yaml(tmp_path: Path):
    config = load_config(None, ["train.epochs=2", "operating_point.method=sensitivity", "operating_point.target=0.9"])
    (tmp_path / "c.yaml").write_text(dump_config(config))
    assert load_config(tmp_path / "c.yaml") == config


@pytest.mark.parametrize(
    "override, fragment",
    [
        (["train.epochs=0"], "epochs"),
        (["train.epoch=3"], "epoch"),
        (["model.backbone"], "key=value"),
        (["operating_point.method=sensitivity"], "operating_point.target"),
        (["data.spatial_dims=4"], "spatial_dims"),
    ],
)
def test_invalid_settings_name_the_field(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, override)


def test_missing_file_is_named(tmp_path: Path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    from medtl.cli import main

    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "error: config file not found" in err and "missing.yaml" in err and "Traceback" not in err
    assert main(["-v", "train", str(tmp_path / "missing.yaml")]) == 2  # -v adds the traceback, not another exit code
    assert "Traceback" in capsys.readouterr().err
