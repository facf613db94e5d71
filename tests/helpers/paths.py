"""Where the repository, the quickstart data and the shared tiny-model cache are."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart"
CACHE = Path(os.environ.get("SDTUNE_CACHE", ROOT / ".cache"))
