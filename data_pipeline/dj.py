"""Import data-juicer, once, the way the stage needs it: sdtune's operators registered and Pillow's
global setting left as it was.

Both checking a recipe (:mod:`data_pipeline.recipe`) and running one (:mod:`data_pipeline.juicer`)
need this; it sits below both so that neither imports the other.
"""

from __future__ import annotations

from data_pipeline.models import forbid_runtime_installs


def load_data_juicer() -> None:
    """Import data-juicer and register sdtune's ops, undoing the import's global Pillow change.

    ``import data_juicer`` sets ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` for the whole process;
    the stage already drops truncated files, and whoever else uses Pillow here keeps its default.
    """
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    import data_juicer  # noqa: F401

    # deferred: data-juicer itself (seconds), imported only when a recipe is checked or run
    from data_pipeline import ops  # noqa: F401

    forbid_runtime_installs()  # an op's missing package is an error, never a pip install into this venv
    ImageFile.LOAD_TRUNCATED_IMAGES = before
