"""Each message once, and none that does not concern the user.

Lightning gives its ``lightning`` logger a console handler of its own at import, while its records
also reach the root logger, which Hydra has set up: every Lightning line printed twice. Some
library messages are about the library, not the run (a tip to install another logger, a
deprecation inside Lightning's own code); they are dropped at their source, by logger and text,
so that anything else those libraries say still shows.
"""

from __future__ import annotations

import logging
import warnings

#: (logger name, text) of records that only advertise or describe library internals
DROPPED_RECORDS = (
    ("lightning.pytorch.utilities.rank_zero", "litlogger"),
    ("lightning.fabric.utilities.rank_zero", "litlogger"),
)
#: (library root logger, text): filtered on that library's own handlers, which print its records
#: (transformers says this for every image processor a pipeline builds; sdtune uses none of them)
DROPPED_LIBRARY_RECORDS = (("transformers", "requires torchvision (not installed); falling back"),)
#: warnings raised inside libraries about their own code, or by sdtune's short example runs
DROPPED_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # Lightning's pytree helper, torch >= 2.10
    r"The number of training batches \(\d+\) is smaller than the logging interval.*",  # we log every step
)


class _DropText(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def tidy_console() -> None:
    """Apply the rules above; safe to call more than once."""
    root = logging.getLogger()
    lightning = logging.getLogger("lightning")
    if root.handlers:  # Hydra (or the user) prints records already: drop Lightning's duplicate handler
        lightning.handlers = [h for h in lightning.handlers if type(h) is not logging.StreamHandler]
    for name, text in DROPPED_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropText) and f.text == text for f in logger.filters):
            logger.addFilter(_DropText(text))
    for name, text in DROPPED_LIBRARY_RECORDS:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _DropText) and f.text == text for f in handler.filters):
                handler.addFilter(_DropText(text))
    for message in DROPPED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
