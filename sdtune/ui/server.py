"""The web app's Starlette application: the pages, the JSON API, the files, the guard around them.

:func:`create_app` wires the pieces: the queue (:mod:`.store`) and its runner (:mod:`.jobs`), the
form checks (:mod:`.forms`), run folders (:mod:`.runs`), datasets (:mod:`.datasets`) and the guard
(:mod:`.security`) around everything. The API handlers themselves are in :mod:`.api`; this module
adds the pages, the static files and the two file routes, whose paths are jailed (403 with a message
for anything that resolves outside outputs or an opened dataset folder).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from sdtune.ui import api, datasets
from sdtune.ui.jobs import Runner, default_command
from sdtune.ui.security import Forbidden, Guard, confined
from sdtune.ui.store import Store

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
#: The page behind each route (plain HTML + ES modules, written by hand: no build step, no CDN).
PAGES = {"/": "index.html", "/new": "new.html", "/run": "run.html", "/dataset": "dataset.html"}
PLACEHOLDER = ("<!doctype html><meta charset='utf-8'><title>sdtune</title>"
               "<p>sdtune ui: the pages are missing from sdtune/ui/static/. The API answers under /api.</p>\n")


@dataclass
class Context:
    """What every handler needs: the outputs folder, the queue, the runner, the served devices."""

    outputs: Path
    store: Store
    runner: Runner
    devices: list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ui_dir(self) -> Path:
        return self.outputs / ".sdtune-ui"


def page(name: str):
    async def endpoint(request: Request) -> Response:
        path = STATIC / name
        if not path.is_file():
            path = STATIC / "index.html"
        if not path.is_file():
            return PlainTextResponse(PLACEHOLDER, media_type="text/html")
        return FileResponse(path, headers={"Cache-Control": "no-cache"})
    return endpoint


def serve_output(request: Request) -> Response:
    """``GET /files/<path>``: a file under outputs (of the app's own folder, only the compare and
    generate images: the queue and the job logs are read through /api); a LoRA comes as a download."""
    ctx: Context = request.app.state.ctx
    try:
        path = confined(ctx.outputs, request.path_params["path"], "the outputs folder")
        parts = path.relative_to(ctx.outputs).parts
        if parts[:1] == (".sdtune-ui",) and parts[1:2] not in (("compare",), ("generate",)):
            raise Forbidden(f"refused {request.path_params['path']!r}: the web app's own state ({ctx.ui_dir}: the "
                            "queue, the job logs) is not served as files; only its compare/ and generate/ images are. "
                            "Fix: read jobs and logs through /api/jobs.")
    except Forbidden as err:
        return PlainTextResponse(str(err), status_code=403)
    if not path.is_file():
        return PlainTextResponse(f"no such file: {request.path_params['path']} (under {ctx.outputs})", status_code=404)
    if path.suffix == ".safetensors":
        return FileResponse(path, filename=f"{path.parent.name}_{path.name}", content_disposition_type="attachment")
    return FileResponse(path, headers={"Cache-Control": "no-cache"})


def dataset_image(ctx: Context, folder: Path, path: Path) -> bool:
    """Whether ``path`` (resolved) is an image of the dataset ``folder``: its list is read once and kept
    for 10 s (a page asks for every image at once), read again when it does not hold ``path``."""
    cache = ctx.extra.setdefault("dataset_images", {})
    when, images = cache.get(str(folder), (0.0, set()))
    if time.monotonic() - when > 10 or path not in images:
        images = datasets.image_files(folder)
        cache[str(folder)] = (time.monotonic(), images)
    return path in images


def serve_dataset_file(request: Request) -> Response:
    """``GET /dataset-files?root=<abs>&file=<rel>``: an image of a dataset folder the user opened (the
    images the run would train on; no other file of the folder)."""
    ctx: Context = request.app.state.ctx
    root, rel = request.query_params.get("root", ""), request.query_params.get("file", "")
    opened = {str(p) for p in ctx.store.roots()}
    try:
        folder = datasets.opened_root(root, opened)
        path = confined(folder, rel, f"the dataset folder {folder}")
        if path.is_file() and not dataset_image(ctx, folder, path):
            raise Forbidden(f"refused {rel!r}: only the images of the dataset {folder} are served (the images its "
                            "metadata or folder lists), not its other files.")
    except Forbidden as err:
        return PlainTextResponse(str(err), status_code=403)
    if not path.is_file():
        return PlainTextResponse(f"no such file: {rel} (in {folder})", status_code=404)
    return FileResponse(path, headers={"Cache-Control": "no-cache"})


def warm_up() -> None:
    """Import the training checks and the report (torch: seconds) in the background, so the first
    form check and runs table answer quickly while the server has started at once."""
    def work() -> None:
        with contextlib.suppress(Exception):
            import sdtune.report  # noqa: F401  # deferred: torch and the report, off the start-up path
            import sdtune.run.checks  # noqa: F401  # deferred: as above
    threading.Thread(target=work, name="sdtune-ui-warm-up", daemon=True).start()


def create_app(outputs: str | Path, *, token: str | None = None, local_only: bool = True,
               devices: list[str] | None = None, command=default_command, start_runner: bool = True) -> Starlette:
    """The app serving ``outputs``. ``start_runner=False`` leaves the queue unprocessed (tests of the API)."""
    outputs = Path(outputs).resolve()
    (outputs / ".sdtune-ui").mkdir(parents=True, exist_ok=True)
    store = Store(outputs / ".sdtune-ui" / "queue.sqlite3")
    devices = devices or ["auto"]
    runner = Runner(store, outputs, devices, command=command)
    ctx = Context(outputs, store, runner, devices)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if start_runner:
            runner.start()
        try:
            yield
        finally:
            runner.shutdown()  # the jobs keep running in their own sessions; the next server re-attaches them

    routes = [Route(path if path == "/" or path == "/new" or path == "/dataset" else "/run/{run:path}", page(name))
              for path, name in PAGES.items()]
    routes += [*api.routes(), Route("/files/{path:path}", serve_output),
               Route("/dataset-files", serve_dataset_file), Mount("/static", StaticFiles(directory=STATIC, check_dir=False))]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.ctx = ctx
    app.add_middleware(Guard, token=token, local_only=local_only)
    return app
