"""Caching of preprocessed scans: disk caches keyed by the recipe, memory caches, no cache."""

from pathlib import Path

import numpy as np
import pytest
import torch

from medtl.io import ScanReader
from medtl.io.synthetic import write_dicom
from medtl.train.data import make_dataset, make_loader
from medtl.transforms import build_transforms, make_preprocessing, recipe_key


def _recipe(size: int = 16) -> dict:
    return make_preprocessing(spatial_dims=2, image_size=size, channels=1, intensity="cxr", ct_window=(40, 400),
                              normalization={"kind": "mean_std", "mean": 0.5, "std": 0.25})


def _items(tmp_path, n: int = 6) -> list[dict]:
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        path = tmp_path / "scans" / f"{i}.dcm"
        write_dicom(path, rng.random((24, 20)), patient=f"P{i}", uid_seed=str(i))
        items.append({"image": str(path), "label": i % 2})
    return items


def _epoch(loader) -> torch.Tensor:
    return torch.cat([batch["image"] for batch in loader])


def test_disk_cache_serves_second_epoch_without_decoding(tmp_path, monkeypatch):
    items, pre = _items(tmp_path), _recipe()
    loader = make_loader(items, build_transforms(pre), batch_size=4, shuffle=False, num_workers=0, cache="disk",
                         cache_dir=tmp_path / "cache", recipe=pre)
    first = _epoch(loader)
    folder = tmp_path / "cache" / recipe_key(pre)
    assert len(list(folder.glob("*.pt"))) == len(items)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a cached scan")

    monkeypatch.setattr(ScanReader, "read", no_decoding)
    torch.testing.assert_close(_epoch(loader), first)


def test_change_of_recipe_or_scan_rebuilds_the_disk_cache(tmp_path):
    items = _items(tmp_path, n=2)
    for size in (16, 20):
        pre = _recipe(size)
        dataset = make_dataset(items, build_transforms(pre), cache="disk", cache_dir=tmp_path / "cache", recipe=pre)
        assert tuple(dataset[0]["image"].shape) == (1, size, size)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one folder per recipe
    pre = _recipe(16)
    folder = tmp_path / "cache" / recipe_key(pre)
    before = {p.name for p in folder.glob("*.pt")}
    write_dicom(Path(items[0]["image"]), np.ones((24, 20)), patient="P0", uid_seed="new")  # the scan is replaced
    make_dataset(items, build_transforms(pre), cache="disk", cache_dir=tmp_path / "cache", recipe=pre)[0]
    assert len({p.name for p in folder.glob("*.pt")} - before) == 1


@pytest.mark.parametrize("cache", ["memory", "none", "disk"])
def test_every_cache_gives_the_same_items(tmp_path, cache):
    items, pre = _items(tmp_path, n=3), _recipe()
    reference = _epoch(make_loader(items, build_transforms(pre), batch_size=3, shuffle=False, num_workers=0, cache="none"))
    loader = make_loader(items, build_transforms(pre), batch_size=3, shuffle=False, num_workers=0, cache=cache,
                         cache_dir=tmp_path / "cache", recipe=pre)
    torch.testing.assert_close(_epoch(loader), reference)


def test_unknown_cache_and_disk_without_recipe_are_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown cache 'ram'"):
        make_dataset([], None, cache="ram")
    with pytest.raises(ValueError, match="recipe"):
        make_dataset([], None, cache="disk", cache_dir=tmp_path)
