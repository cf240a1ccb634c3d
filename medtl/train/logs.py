"""The per-epoch training log: a CSV always, TensorBoard scalars when it is installed."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)


class EpochLog:
    """Rows of per-epoch figures, appended to ``path`` (a CSV) and, when the ``tensorboard``
    package is importable, to event files under ``path.parent / "tensorboard"``.

    ``history`` (rows already logged by an interrupted run) is written first, so a resumed
    run's CSV holds each epoch once."""

    def __init__(self, path: Path, fields: Sequence[str], history: Sequence[dict] = ()) -> None:
        self._handle = open(path, "w", newline="")
        self._csv = csv.DictWriter(self._handle, fieldnames=list(fields), lineterminator="\n")
        self._csv.writeheader()
        self._board = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.debug("tensorboard not installed: CSV log only")
        else:
            self._board = SummaryWriter(str(path.parent / "tensorboard"), purge_step=len(history) + 1)
        for row in history:
            self._csv.writerow(row)

    def write(self, row: dict) -> None:
        self._csv.writerow(row)
        self._handle.flush()
        if self._board is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)) and not math.isnan(value):
                    self._board.add_scalar(key, value, row["epoch"])
            self._board.flush()

    def close(self) -> None:
        self._handle.close()
        if self._board is not None:
            self._board.close()
