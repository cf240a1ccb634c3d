"""One-line errors with exit 2 everywhere: malformed YAML, unknown keys and values with a
"did you mean", --set mistakes blamed on the --set argument, an unknown backbone refused before
any run folder exists, -v on either side of the command, quiet third-party loggers, --version."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from medtl import __version__
from medtl.cli import main
from medtl.config import ConfigError, load_config


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_malformed_yaml_is_one_line_with_exit_2(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("train:\n  epochs: [3\nmodel: x\n")
    assert main(["train", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith(f"error: {tmp_path / 'bad.yaml'}: not valid YAML") and "line 3" in err


def test_unknown_backbone_is_refused_before_any_run_folder(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("train:\n  epochs: 1\n")
    out = tmp_path / "run"
    assert main(["train", str(tmp_path / "c.yaml"), "--set", "model.backbone=resnet999", "--out", str(out)]) == 2
    (line,) = _error_lines(capsys)
    assert line.startswith("error: --set model.backbone=resnet999: unknown backbone 'resnet999'; did you mean 'resnet")
    assert not out.exists()
    (tmp_path / "d.yaml").write_text("model:\n  backbone: densenet12\n")
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'd.yaml'}: unknown backbone 'densenet12'; did you mean 'densenet121'"):
        load_config(tmp_path / "d.yaml")


def test_a_failed_start_leaves_no_run_folder(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("data:\n  manifest: nowhere.csv\nmodel:\n  weights: none\n")
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")]) == 2
    assert "manifest not found" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_validation_errors_one_line_per_key_with_did_you_mean_and_their_source(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  epoch: 3\nadapt:\n  strategy: ful\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "c.yaml", ["train.lr=-1", "calibration.method=platts"])
    lines = str(info.value).splitlines()
    assert len(lines) == 4 and not any("https://" in line for line in lines)
    file = str(tmp_path / "c.yaml")
    assert f"{file}: unknown key 'train.epoch'; did you mean 'epochs'?" in lines
    assert f"{file}: adapt.strategy: unknown fine-tuning strategy 'ful'; did you mean 'full'? (registered: full, linear_probe, " \
           "lp_ft, gradual_unfreeze)" in lines
    assert any(line.startswith("--set train.lr=-1: train.lr: Input should be greater than 0") for line in lines)
    assert any(line.startswith("--set calibration.method=platts: calibration.method: unknown calibration method 'platts'; "
                               "did you mean 'platt'? (registered: auto, ") for line in lines)


def test_set_mistakes_name_the_set_argument(capsys, tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  epochs: 2\n")
    assert main(["train", str(tmp_path / "c.yaml"), "--set", "train.epochs=0"]) == 2
    (line,) = _error_lines(capsys)
    assert line.startswith("error: --set train.epochs=0: train.epochs:") and str(tmp_path) not in line
    with pytest.raises(ConfigError, match=r"^--set data.image_size=\[1, 2: not a valid YAML value"):
        load_config(None, ["data.image_size=[1, 2"])


def test_verbose_after_the_command_keeps_exit_2_and_quietens_third_party_loggers(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml"), "-v"]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert logging.getLogger("medtl").getEffectiveLevel() == logging.DEBUG
    assert not logging.getLogger("pylibjpeg").isEnabledFor(logging.DEBUG)
    assert main(["-v", "predict", str(tmp_path / "no_bundle"), str(tmp_path), "--out", str(tmp_path / "p.csv")]) == 2


def test_version():
    out = subprocess.run([sys.executable, "-m", "medtl", "--version"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and out.stdout.strip() == f"medtl {__version__}"
