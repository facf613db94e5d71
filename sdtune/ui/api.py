"""The JSON API under ``/api``: presets and form checks, jobs, runs, compare, generate, datasets.

Every handler answers a problem with the input as ``{"error": message}`` and a 4xx status (400 for a
bad value, 403 for a path outside the served folders, 404 for an unknown job or run): a bad dataset
or config never crashes the server (:func:`handler`). Handlers are plain functions, which Starlette
runs in its thread pool, so reading a dataset or composing a config never blocks the event loop.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shlex
import time
from pathlib import Path
from typing import Any

import yaml
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sdtune.config.overrides import hydra_quote
from sdtune.run.resume import OVERRIDES
from sdtune.ui import datasets, forms, runs
from sdtune.ui.jobs import has_checkpoint
from sdtune.ui.security import Forbidden, confined
from sdtune.utils.errors import SdtuneError

log = logging.getLogger(__name__)


class NotFound(Exception):
    """An unknown job or run (404)."""


def handler(fn):
    """A sync endpoint that answers errors as JSON: the body is parsed for it (``body`` argument)."""
    @functools.wraps(fn)
    def run(request: Request, body: Any) -> JSONResponse:
        try:
            result = fn(request.app.state.ctx, request, body)
        except Forbidden as err:
            return JSONResponse({"error": str(err)}, status_code=403)
        except NotFound as err:
            return JSONResponse({"error": str(err)}, status_code=404)
        except (SdtuneError, ValueError, TypeError, KeyError) as err:
            message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)  # KeyError's str is a repr
            return JSONResponse({"error": message}, status_code=400)
        except Exception as err:  # a bug: said, logged, the server goes on
            log.exception("sdtune ui: %s failed", fn.__name__)
            return JSONResponse({"error": f"internal error ({type(err).__name__}: {err})"}, status_code=500)
        status, data = result if isinstance(result, tuple) else (200, result)
        return JSONResponse(data, status_code=status)

    async def endpoint(request: Request) -> JSONResponse:
        body: Any = {}
        if request.method in ("POST", "PUT"):
            raw = await request.body()
            try:
                body = json.loads(raw) if raw.strip() else {}
            except ValueError as err:
                return JSONResponse({"error": f"the request body is not JSON ({err})."}, status_code=400)
            if not isinstance(body, dict):
                return JSONResponse({"error": "the request body must be a JSON object."}, status_code=400)
        return await run_in_threadpool(run, request, body)
    return endpoint


def job_json(ctx, job: dict[str, Any]) -> dict[str, Any]:
    """A job as the pages see it (the contract's fields; ``images`` for a generate job)."""
    folder = Path(job["out_dir"]) if job.get("out_dir") else None
    out = {k: job[k] for k in ("id", "kind", "state", "run", "device", "created", "started", "ended", "exit_code")}
    out["command"] = shlex.join(["python", *job["argv"]])
    # only the run's latest training job: once resumed, the older stopped job has nothing left to resume
    latest = next((j["id"] for j in ctx.store.jobs(run=job["run"]) if j["kind"] != "generate"), None) if job["run"] else None
    out["resumable"] = bool(job["kind"] != "generate" and job["state"] in ("stopped", "interrupted")
                            and job["id"] == latest and folder is not None and has_checkpoint(folder))
    if job["kind"] == "generate":
        found = sorted(folder.glob("*.png"), key=lambda p: (p.name == "grid.png", p.name)) if folder else []
        out["images"] = [runs.file_url(ctx.outputs, p) for p in found]
        out["params"] = job["params"]
    return out


def _job(ctx, job_id: str) -> dict[str, Any]:
    job = ctx.store.job(int(job_id)) if str(job_id).isdigit() else None
    if job is None:
        raise NotFound(f"no job {job_id}.")
    return job


def _run_folder(ctx, rel: str) -> tuple[str, Path]:
    folder = confined(ctx.outputs, rel, "the outputs folder")
    return folder.relative_to(ctx.outputs).as_posix(), folder


# -- forms and jobs ----------------------------------------------------------------------------------
@handler
def get_presets(ctx, request, body):
    q = request.query_params
    experiment, model = q.get("experiment") or None, q.get("model") or None
    if experiment and experiment not in forms.experiments() or model and model not in forms.models():
        raise ValueError(f"unknown preset: experiment={experiment!r} model={model!r}.")
    return forms.presets(experiment, model)


@handler
def post_check(ctx, request, body):
    return forms.check_form(body)


@handler
def post_job(ctx, request, body):
    checked = forms.check_form(body)
    if not checked["ok"]:
        return 400, checked
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")

    def argv_of(job_id: int):
        rel = f"runs/{stamp}-j{job_id}"
        folder = ctx.outputs / rel
        return ["-m", "sdtune", *checked["argv"], f"hydra.run.dir={hydra_quote(str(folder))}"], str(folder), rel

    job = ctx.runner.submit("train", argv_of, device=body.get("device"))
    return 201, {"job": job_json(ctx, job)}


@handler
def get_jobs(ctx, request, body):
    return {"jobs": [job_json(ctx, j) for j in ctx.store.jobs()]}


@handler
def get_job(ctx, request, body):
    job = _job(ctx, request.path_params["id"])
    out = job_json(ctx, job)
    out["log_tail"] = runs.log_tail(ctx.runner.log_path(job["id"]))
    return out


@handler
def stop_job(ctx, request, body):
    job = _job(ctx, request.path_params["id"])
    if job["state"] not in ("queued", "running", "stopping"):
        raise ValueError(f"job {job['id']} is {job['state']}: only a queued or running job can be stopped.")
    return {"job": job_json(ctx, ctx.runner.stop(job["id"]))}


@handler
def resume_job(ctx, request, body):
    job = _job(ctx, request.path_params["id"])
    folder = Path(job["out_dir"] or "")
    if job["kind"] == "generate" or not has_checkpoint(folder):
        raise ValueError(f"job {job['id']} ({job['kind']}, {job['state']}) left no checkpoint in {folder}: nothing "
                         "to resume. Fix: start a new run.")

    def still_resumable(conn) -> None:  # inside the insert's transaction: two clicks queue one resume
        latest = conn.execute("SELECT id, state FROM jobs WHERE run = ? AND kind != 'generate' ORDER BY id DESC "
                              "LIMIT 1", (job["run"],)).fetchone()
        if latest is None or latest["id"] != job["id"] or latest["state"] not in ("stopped", "interrupted"):
            raise ValueError(f"job {job['id']} cannot be resumed: only the latest job of a run ({job['run']}), once "
                             f"stopped or interrupted, is resumed (the latest is job {latest and latest['id']}, "
                             f"{latest and latest['state']}).")

    device = job["device"] if job["device"] in ctx.devices else None
    new = ctx.runner.submit("resume", lambda _id: (["-m", "sdtune", f"ckpt_path={hydra_quote(str(folder))}"],
                                                   str(folder), job["run"]), device=device, check=still_resumable)
    return 201, {"job": job_json(ctx, new)}


@handler
def post_generate(ctx, request, body):
    rel, folder = _run_folder(ctx, str(body.get("run") or ""))
    lora = folder / "lora.safetensors"
    if not lora.is_file():
        raise ValueError(f"the run {rel} has no lora.safetensors yet (it is written when the run ends or stops).")
    prompt = str(body.get("prompt") or "").strip()
    if not prompt or "${" in prompt:
        raise ValueError("prompt: write the text to draw (without ${...}).")
    seed, weight = int(body.get("seed") or 0), float(body.get("weight") if body.get("weight") is not None else 1.0)
    if seed < 0 or not -10 <= weight <= 10:
        raise ValueError(f"seed={seed} must be >= 0 and weight={weight} between -10 and 10.")
    compare = bool(body.get("compare"))
    extra = []
    for key in ("num_images", "steps"):
        if body.get(key) is not None:
            value = int(body[key])
            if not 1 <= value <= 200:
                raise ValueError(f"{key}={value}: from 1 to 200.")
            extra.append(f"{key}={value}")
    params = {"prompt": prompt, "seed": seed, "weight": weight, "compare": compare}

    def argv_of(job_id: int):
        out = ctx.ui_dir / "generate" / str(job_id)
        return (["-m", "sdtune.generate", f"loras=[{hydra_quote(f'{lora}@{weight}')}]", f"prompt={hydra_quote(prompt)}",
                 f"seed={seed}", f"compare={'true' if compare else 'false'}", *extra,
                 f"hydra.run.dir={hydra_quote(str(out))}"], str(out), rel)

    job = ctx.runner.submit("generate", argv_of, device=body.get("device"), params=params)
    return 201, {"job": job_json(ctx, job)}


# -- runs ----------------------------------------------------------------------------------------------
def _latest_jobs(ctx) -> dict[str, dict[str, Any]]:
    latest: dict[str, dict[str, Any]] = {}
    for job in ctx.store.jobs():  # newest first
        if job["kind"] != "generate" and job["run"]:
            latest.setdefault(job["run"], job)
    return latest


@handler
def get_runs(ctx, request, body):
    latest = _latest_jobs(ctx)
    return {"runs": [runs.run_row(ctx.outputs, f, latest.get(f.relative_to(ctx.outputs).as_posix()))
                     for f in runs.run_folders(ctx.outputs)]}


@handler
def get_run(ctx, request, body):
    rel, folder = _run_folder(ctx, request.path_params["run"])
    job = _latest_jobs(ctx).get(rel)
    if job is None and not (folder / OVERRIDES).is_file():
        raise NotFound(f"no run {rel} under {ctx.outputs} (no .hydra/overrides.yaml and no job).")
    if job is not None:
        command = shlex.join(["python", *job["argv"]])
    else:
        saved = yaml.safe_load((folder / OVERRIDES).read_text(encoding="utf-8")) or []
        command = forms.command_text([str(s) for s in saved])
    log = ctx.runner.log_path(job["id"]) if job else None
    return runs.run_detail(ctx.outputs, rel, job_json(ctx, job) if job else None, log, command)


@handler
def post_compare(ctx, request, body):
    chosen = body.get("runs")
    if not isinstance(chosen, list) or not chosen or not all(isinstance(r, str) for r in chosen):
        raise ValueError("runs: a list of run folders (relative to outputs) to compare.")
    rels = [_run_folder(ctx, r)[0] for r in chosen]
    key = hashlib.sha1("\n".join(rels).encode()).hexdigest()[:12]
    result = runs.compare(ctx.outputs, rels, ctx.ui_dir / "compare" / key)
    stamp = f"?v={int(time.time() * 1000)}"  # the same URL is rewritten by the next compare
    return {**result, "loss_curves": result["loss_curves"] + stamp,
            "samples_grid": result["samples_grid"] and result["samples_grid"] + stamp}


# -- datasets ---------------------------------------------------------------------------------------
def _dataset(ctx, q, *, opening: bool) -> dict[str, Any]:
    model = q.get("model") or None
    if model and model not in forms.models():
        raise ValueError(f"model={model!r} is not a preset of sdtune's conf/model/. Fix: one of {forms.models()}.")
    if not opening:
        datasets.opened_root(str(q.get("root") or ""), {str(p) for p in ctx.store.roots()})
    resolution = int(q["resolution"]) if q.get("resolution") else datasets.model_resolution(model)
    result = datasets.view(str(q.get("root") or ""), resolution, q.get("caption_extension") or None)
    if opening:
        ctx.store.add_root(result["root"])
    return result


@handler
def get_dataset(ctx, request, body):  # a folder opened before: a GET changes nothing
    return _dataset(ctx, request.query_params, opening=False)


@handler
def open_dataset(ctx, request, body):  # its images may then be served and its captions written
    return _dataset(ctx, body, opening=True)


@handler
def put_caption(ctx, request, body):
    folder = datasets.opened_root(str(body.get("root") or ""), {str(p) for p in ctx.store.roots()})
    target = datasets.write_caption(folder, str(body.get("file") or ""), body.get("caption"),
                                    body.get("caption_extension") or None)
    return {"ok": True, "caption_file": target.relative_to(folder).as_posix()}


def routes() -> list[Route]:
    return [
        Route("/api/presets", get_presets), Route("/api/check", post_check, methods=["POST"]),
        Route("/api/jobs", get_jobs), Route("/api/jobs", post_job, methods=["POST"]), Route("/api/jobs/{id}", get_job),
        Route("/api/jobs/{id}/stop", stop_job, methods=["POST"]), Route("/api/jobs/{id}/resume", resume_job, methods=["POST"]),
        Route("/api/runs", get_runs), Route("/api/runs/{run:path}", get_run),
        Route("/api/compare", post_compare, methods=["POST"]), Route("/api/generate", post_generate, methods=["POST"]),
        Route("/api/dataset", get_dataset), Route("/api/dataset", open_dataset, methods=["POST"]),
        Route("/api/dataset/caption", put_caption, methods=["PUT"]),
    ]
