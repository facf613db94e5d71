"""The guard: files only from outputs and opened dataset folders, the token on every route, the Host check."""

from __future__ import annotations

import os

import pytest

from sdtune.ui.__main__ import parse, problem
from tests.helpers.ui import client, kohya_set


def test_traversal_and_symlinks_out_of_outputs_are_refused_with_a_message(tmp_path):
    outputs = tmp_path / "outputs"
    (outputs / "runs" / "r").mkdir(parents=True)
    (outputs / "runs" / "r" / "loss.png").write_bytes(b"png")
    (tmp_path / "secret.txt").write_text("secret")
    os.symlink(tmp_path, outputs / "runs" / "up")
    web = client(outputs)
    assert web.get("/files/runs/r/loss.png").content == b"png"
    for path in ("/files/%2e%2e/secret.txt", "/files/runs/%2e%2e/%2e%2e/secret.txt", "/files/..%2F..%2Fsecret.txt",
                 "/files/runs/up/secret.txt", "/files/%2Fetc%2Fpasswd"):
        answer = web.get(path)
        assert answer.status_code == 403, path
        assert "outside the outputs folder" in answer.text and "secret" not in answer.text.split("refused")[0]
    assert "root:" not in web.get("/files/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd").text


def test_dataset_files_only_inside_an_opened_root(tmp_path):
    root = kohya_set(tmp_path / "set")
    (tmp_path / "secret.txt").write_text("secret")
    os.symlink(tmp_path / "secret.txt", root / "link.txt")
    web = client(tmp_path / "outputs")
    refused = web.get("/dataset-files", params={"root": str(root), "file": "img0.png"})
    assert refused.status_code == 403 and "open it there first" in refused.text  # not opened yet
    assert web.post("/api/dataset", json={"root": str(root)}).status_code == 200
    assert web.get("/dataset-files", params={"root": str(root), "file": "img0.png"}).content == (root / "img0.png").read_bytes()
    for rel in ("../secret.txt", "link.txt", str(tmp_path / "secret.txt")):
        answer = web.get("/dataset-files", params={"root": str(root), "file": rel})
        assert answer.status_code == 403 and "outside the dataset folder" in answer.text, rel
    other = web.get("/dataset-files", params={"root": str(tmp_path), "file": "secret.txt"})
    assert other.status_code == 403 and "only dataset folders opened" in other.text


def test_the_token_guards_pages_api_and_files_and_a_page_load_sets_the_cookie(tmp_path):
    outputs = tmp_path / "outputs"
    (outputs / "a.txt").parent.mkdir(parents=True)
    (outputs / "a.txt").write_text("a")
    web = client(outputs, token="s3cret")
    for path in ("/", "/new", "/api/jobs", "/files/a.txt", "/static/app.css"):
        answer = web.get(path)
        assert answer.status_code == 401 and "needs its token" in answer.text, path
    assert web.get("/api/jobs", headers={"X-Sdtune-Token": "wrong"}).status_code == 401
    assert web.get("/api/jobs", headers={"X-Sdtune-Token": "s3cret"}).json() == {"jobs": []}
    assert web.get("/files/a.txt", params={"token": "s3cret"}).text == "a"
    page = web.get("/", params={"token": "s3cret"})
    assert page.status_code == 200 and "sdtune_token=s3cret" in page.headers["set-cookie"]
    assert web.get("/api/jobs").json() == {"jobs": []}  # the cookie the page load set


def test_host_check_refuses_other_hosts_when_bound_to_localhost(tmp_path):
    web = client(tmp_path / "outputs")
    refused = web.get("/api/jobs", headers={"Host": "evil.example:7860"})
    assert refused.status_code == 403 and "DNS rebinding" in refused.json()["error"]
    for host in ("localhost:7860", "127.0.0.1", "[::1]:7860"):
        assert web.get("/api/jobs", headers={"Host": host}).status_code == 200, host
    assert client(tmp_path / "outputs", token="t", local_only=False).get(
        "/api/jobs", headers={"Host": "box.lan:7860", "X-Sdtune-Token": "t"}).status_code == 200


@pytest.mark.parametrize("argv", [["--host", "0.0.0.0"], ["--host", "192.168.1.5", "--port", "80"]])
def test_another_host_needs_a_token(argv, monkeypatch):
    monkeypatch.delenv("SDTUNE_UI_TOKEN", raising=False)
    why = problem(parse(argv))
    assert "--host" in why and "--token" in why and "SDTUNE_UI_TOKEN" in why
    assert problem(parse([*argv, "--token", "x"])) is None
    assert problem(parse([])) is None


def test_cross_site_and_non_json_writes_are_refused_and_opening_a_folder_is_a_post(tmp_path):
    root = kohya_set(tmp_path / "set")
    web = client(tmp_path / "outputs")
    simple = web.post("/api/jobs/1/stop", content=b'{"a": 1}', headers={"Content-Type": "text/plain"})
    assert simple.status_code == 415 and "application/json" in simple.json()["error"]
    assert web.post("/api/jobs/1/stop").status_code == 415  # no body, no type: a form could send that too
    evil = web.post("/api/jobs/1/stop", json={}, headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403 and "'http://evil.example'" in evil.json()["error"]
    fetch = web.put("/api/dataset/caption", json={}, headers={"Sec-Fetch-Site": "cross-site"})
    assert fetch.status_code == 403 and "cross-site" in fetch.json()["error"]
    assert web.get("/api/jobs", headers={"Origin": "http://127.0.0.1:9"}).status_code == 403  # another port
    own = web.post("/api/jobs/1/stop", json={}, headers={"Origin": "http://127.0.0.1", "Sec-Fetch-Site": "same-origin"})
    assert own.status_code == 404 and own.json() == {"error": "no job 1."}  # the guard let it through
    unopened = web.get("/api/dataset", params={"root": str(root)})
    assert unopened.status_code == 403 and "POST /api/dataset" in unopened.json()["error"]
    assert web.get("/dataset-files", params={"root": str(root), "file": "img0.png"}).status_code == 403  # still closed
    assert web.post("/api/dataset", json={"root": str(root)}, headers={"Origin": "http://evil.example"}).status_code == 403
    assert web.post("/api/dataset", json={"root": str(root)}).status_code == 200
    assert web.get("/api/dataset", params={"root": str(root)}).json()["root"] == str(root)


def test_only_the_sets_images_and_the_apps_image_folders_are_served(tmp_path):
    root = kohya_set(tmp_path / "set")
    (root / "notes.md").write_text("private")
    outputs = tmp_path / "outputs"
    web = client(outputs)
    web.post("/api/dataset", json={"root": str(root)})
    image = web.get("/dataset-files", params={"root": str(root), "file": "img1.png"})
    assert image.content == (root / "img1.png").read_bytes()
    for rel in ("img0.txt", "notes.md"):
        answer = web.get("/dataset-files", params={"root": str(root), "file": rel})
        assert answer.status_code == 403 and "only the images of the dataset" in answer.text, rel
    for rel in ("compare/k/loss.png", "generate/3/grid.png", "jobs/1.log"):
        (outputs / ".sdtune-ui" / rel).parent.mkdir(parents=True, exist_ok=True)
        (outputs / ".sdtune-ui" / rel).write_bytes(b"x")
    assert web.get("/files/.sdtune-ui/compare/k/loss.png").content == b"x"
    assert web.get("/files/.sdtune-ui/generate/3/grid.png").content == b"x"
    for path in ("/files/.sdtune-ui/queue.sqlite3", "/files/.sdtune-ui/jobs/1.log", "/files/runs/%2E%2E/.sdtune-ui/jobs/1.log"):
        answer = web.get(path)
        assert answer.status_code == 403 and "not served as files" in answer.text, path
