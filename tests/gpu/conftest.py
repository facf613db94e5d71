"""tests/gpu: full-size training steps on a CUDA GPU (``make test-gpu``).

Every test here is marked ``gpu`` (``make test`` and ``make test-slow`` deselect them) and, on a
machine without CUDA, skipped at collection with one reason, so ``pytest tests/gpu`` reports
"skipped" rather than failing on the first ``.cuda()``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
REASON = "needs CUDA: run make test-gpu on a GPU machine"


@pytest.hookimpl(tryfirst=True)  # before -m filtering, so a test here missing its own mark is still deselected
def pytest_collection_modifyitems(config, items):
    # A conftest's collection hook sees the whole session's items: touch only this folder's.
    here = [item for item in items if HERE in Path(str(item.path)).resolve().parents]
    for item in here:
        item.add_marker(pytest.mark.gpu)
        if not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason=REASON))
