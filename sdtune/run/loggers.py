"""A CSV logger that can continue an earlier run's ``metrics.csv``.

Lightning's CSV writer starts each process with no known columns; resuming into a run folder it
rewrites the existing file with the first new batch's narrower header and fails on the old rows.
This writer starts from the existing header instead, so resumed runs append to one table.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from sdtune.utils.io import write_text_atomic


class _ContinuingWriter(ExperimentWriter):
    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
                self.metrics_keys = sorted(next(csv.reader(fh), []))

    def _check_log_dir_exists(self) -> None:
        """Lightning warns that old logs will be deleted; here they are continued."""


class CSVLogger(LightningCSVLogger):
    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment


def drop_rows_after(metrics_csv: str | Path, step: int) -> int:
    """Remove rows logged after ``step`` (work lost when a run died after its last checkpoint)."""
    path = Path(metrics_csv)
    if not path.is_file():
        return 0
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields, rows = reader.fieldnames or [], list(reader)
    kept = [r for r in rows if not r.get("step") or int(float(r["step"])) <= step]
    if len(kept) != len(rows):
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
        write_text_atomic(path, buf.getvalue())
    return len(rows) - len(kept)
