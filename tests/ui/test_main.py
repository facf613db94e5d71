"""``python -m sdtune.ui`` end to end: a real server process trains the quickstart from a posted form,
the run page's numbers come from the run folder, and the LoRA is the command line's, bit for bit."""

from __future__ import annotations

import urllib.parse

import httpx
import pytest

from sdtune.utils.io import tensor_sha256
from tests.helpers.cli import run_cli
from tests.helpers.ui import start_server, wait_for

SHORT = ("trainer.max_steps=16 callbacks.model_checkpoint.every_n_train_steps=8 callbacks.samples=null "
         "callbacks.concept_probe=null data.val_images=0")


@pytest.mark.slow  # a server process and a short training run
def test_a_posted_quickstart_trains_and_the_lora_is_the_command_lines(tmp_path):
    server, url = start_server(tmp_path / "outputs")
    try:
        web = httpx.Client(base_url=url, timeout=60)
        answer = web.post("/api/jobs", json={"experiment": "quickstart", "fields": {"lora.rank": 8}, "overrides": SHORT})
        assert answer.status_code == 201, answer.text
        job = answer.json()["job"]
        assert job["state"] == "queued" and job["run"].startswith("runs/") and job["run"].endswith(f"-j{job['id']}")
        path = f"/api/runs/{urllib.parse.quote(job['run'], safe='')}"

        def done():
            state = web.get(f"/api/jobs/{job['id']}").json()
            return state if state["state"] not in ("queued", "running") else None
        ended = wait_for(done, timeout=300, every=0.5, what="the job to end")
        assert ended["state"] == "finished" and ended["exit_code"] == 0, ended["log_tail"]
        run = web.get(path).json()
        assert (run["state"], run["step"], run["max_steps"], run["eta_seconds"]) == ("finished", 16, 16, 0)
        assert [s for s, _ in run["loss"]["train"]] == [4, 9, 14] and all(v > 0 for _, v in run["loss"]["train"])
        assert run["lora_url"] == f"/files/{job['run']}/lora.safetensors" and "loss.png" in [f["name"] for f in run["figures"]]
        download = web.get(run["lora_url"])
        assert download.headers["content-disposition"].startswith("attachment")
        lora = tmp_path / "outputs" / job["run"] / "lora.safetensors"
        assert download.content == lora.read_bytes()
        assert [r["run"] for r in web.get("/api/runs").json()["runs"]] == [job["run"]]
    finally:
        server.terminate()
        server.wait(timeout=30)
    argv = job["command"].split()[3:-1]  # python -m sdtune ... hydra.run.dir=<run>
    assert argv == ["experiment=quickstart", "lora.rank=8", *SHORT.split()]
    cli = run_cli(*argv, f"hydra.run.dir={tmp_path / 'cli'}")
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert tensor_sha256(tmp_path / "cli" / "lora.safetensors") == tensor_sha256(lora)
