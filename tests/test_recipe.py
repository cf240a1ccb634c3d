"""recipe: auto — the dataset fingerprint and the rules that fill unset training values."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medtl.config import load_config
from medtl.io import ScanRecord, read_manifest, write_synthetic
from medtl.recipe import Fingerprint, fingerprint, resolve_recipe, rules


def _records(folder: Path, images: list[np.ndarray], suffix: str, labels=("a", "b")) -> list[ScanRecord]:
    records = []
    for i, array in enumerate(images):
        path = folder / f"scan{i}{suffix}"
        if suffix == ".nii.gz":
            nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 3.0, 1.0])), path)
        else:
            Image.fromarray(array).save(path)
        records.append(ScanRecord(image=path, label=labels[i % len(labels)], patient_id=f"P{i // 2}"))
    return records


def _fp(**overrides) -> Fingerprint:
    base = dict(scans=500, patients=500, per_class={"a": 400, "b": 100}, sites=1, spatial_dims=2, median_size=[28, 28],
                channels=1, colour=False, median_spacing=None, modality="unknown", intensity_range=[0.0, 255.0], sampled=64)
    return Fingerprint(**{**base, **overrides})


def test_fingerprint_of_synthetic_radiographs(tmp_path):
    manifest = write_synthetic(tmp_path, patients_per_site=6, test_per_site=1)["manifest"]
    records = read_manifest(manifest)
    fp = fingerprint(records, sample=16)
    labelled = [r for r in records if r.label]
    assert fp.scans == len(labelled) and fp.patients == len({r.patient_id for r in labelled})
    assert fp.per_class == {c: sum(r.label == c for r in labelled) for c in ("normal", "opacity")}
    assert fp.spatial_dims == 2 and fp.channels == 1 and not fp.colour
    assert fp.sampled == 16 and fp.median_size == [128, 128]
    assert fp.sites == 2 and fp.modality == "DX"
    assert fp.intensity_range[1] > fp.intensity_range[0]
    assert fingerprint(records, sample=16) == fp, "the sample is seeded: same fingerprint twice"


def test_fingerprint_tells_colour_from_grey_saved_as_rgb(tmp_path):
    rng = np.random.default_rng(0)
    colour = [rng.integers(0, 255, (40, 32, 3), dtype=np.uint8) for _ in range(4)]
    grey = [np.repeat(rng.integers(0, 255, (40, 32, 1), dtype=np.uint8), 3, axis=2) for _ in range(4)]
    (tmp_path / "c").mkdir()
    (tmp_path / "g").mkdir()
    fp_colour = fingerprint(_records(tmp_path / "c", colour, ".png"))
    fp_grey = fingerprint(_records(tmp_path / "g", grey, ".png"))
    assert fp_colour.colour and fp_colour.channels == 3
    assert not fp_grey.colour
    assert fp_colour.median_size == [40, 32]  # rows x columns, as displayed


def test_fingerprint_of_volumes(tmp_path):
    rng = np.random.default_rng(0)
    volumes = [rng.random((20, 24, 12)).astype(np.float32) for _ in range(4)]
    fp = fingerprint(_records(tmp_path, volumes, ".nii.gz"))
    assert fp.spatial_dims == 3 and fp.median_size == [20, 24, 12]
    assert fp.median_spacing == [1.5, 1.5, 3.0]


def test_unset_values_follow_the_rules_and_set_ones_win():
    config = load_config(None, ["train.epochs=7", "data.manifest=x.csv"])
    resolved, choices = resolve_recipe(config, _fp())
    by_key = {c.key: c for c in choices}
    assert by_key["train.epochs"].source == "user" and resolved.train.epochs == 7
    assert by_key["data.image_size"].source == "rule" and resolved.data.image_size == [28, 28]
    assert resolved.model.weights == "none" and resolved.train.lr == 1e-3
    assert resolved.train.folds == 5 and resolved.calibration.method == "platt"
    assert all(c.reason for c in choices)
    assert resolved.data.manifest == config.data.manifest


def test_recipe_none_keeps_the_schema_defaults():
    config = load_config(None, ["recipe=none"])
    resolved, choices = resolve_recipe(config, _fp())
    assert choices == [] and resolved == config


def test_rules_scale_with_the_data():
    config = load_config()
    large, _ = resolve_recipe(config, _fp(scans=20_000, per_class={"a": 15_000, "b": 5_000}, median_size=[2048, 2500]))
    assert large.train.folds == 1 and large.data.image_size == [224, 224]
    from medtl.backbones.sources import lite_checkpoint
    if lite_checkpoint("efficientnet_lite0")[0].is_file():  # the imagenet extra: real ImageNet weights offline
        assert (large.model.backbone, large.model.weights, large.train.lr) == ("efficientnet_lite0", "imagenet", 3e-4)
    colour, _ = resolve_recipe(config, _fp(channels=3, colour=True))
    assert colour.model.in_channels == 3
    volume, _ = resolve_recipe(config, _fp(spatial_dims=3, median_size=[512, 512, 200]))
    assert volume.data.spatial_dims == 3 and max(volume.data.image_size) == rules.MAX_SIDE_3D
    assert volume.train.batch_size == 4
    few, _ = resolve_recipe(config, _fp(per_class={"a": 490, "b": 8}))
    assert few.train.folds == 1 and few.calibration.method == "temperature"
    multi, _ = resolve_recipe(config, _fp(per_class={"a": 100, "b": 100, "c": 100}))
    assert multi.calibration.method == "temperature"


@pytest.mark.parametrize("scans", [100, 1_000, 5_000])
def test_step_budget_stays_within_bounds(scans):
    resolved, choices = resolve_recipe(load_config(), _fp(scans=scans, per_class={"a": scans // 2, "b": scans - scans // 2}))
    per_epoch = np.ceil(scans * (1 - 1 / resolved.train.folds) / resolved.train.batch_size)
    steps = resolved.train.epochs * per_epoch
    assert rules.MIN_STEPS <= steps < rules.MAX_STEPS + per_epoch
    assert "optimizer steps" in {c.key: c for c in choices}["train.epochs"].reason


def test_operating_point_rule_follows_the_class_balance():
    balanced, _ = resolve_recipe(load_config(), _fp(per_class={"a": 300, "b": 200}))
    rare, _ = resolve_recipe(load_config(), _fp(per_class={"a": 450, "b": 50}))
    assert balanced.operating_point.method == "most_probable" and rare.operating_point.method == "youden"


@pytest.mark.parametrize("task", [["task.type=multilabel", "data.classes=[x, y]"],
                                  ["task.type=multitask", "task.heads=[{name: x, classes: [a, b]}, {name: y, classes: [c, d, e]}]"]])
def test_several_outputs_keep_each_outputs_default_calibrator_and_youden(task):
    """The fingerprint's strata (joined findings) are not classes: each output is calibrated and thresholded on its own."""
    resolved, choices = resolve_recipe(load_config(None, task), _fp(per_class={"x|c": 200, "y|d": 200, "?|e": 100}))
    assert resolved.calibration.method == "auto" and resolved.operating_point.method == "youden"
    assert "each output's own default" in {c.key: c for c in choices}["calibration.method"].reason
