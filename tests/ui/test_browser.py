"""The web app in a real browser (headless Debian Chromium, Selenium) against a real
``python -m sdtune.ui`` process that trains real toy runs: the whole loop as a user sees it.

Every check reads what the page shows (texts, the loss chart's point count, decoded image sizes)
and saves a screenshot of its key page as docs/images/ui_<name>.png. Runs are short toy quickstart
runs (TOY); the runs whose settings match are shared: the page run of the first test is the
reference LoRA of the shell run (acceptance 2) and of the crashed-and-resumed run (acceptance 3).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.browser import (
    App,
    UiServer,
    child_env,
    http,
    kill_processes_under,
    require_browser,
    screenshot,
    start_browser,
    wait_for,
)
from tests.helpers.paths import QUICKSTART, ROOT

pytestmark = pytest.mark.slow

# 24 steps in ~5 s after ~10 s of start-up: a checkpoint and a sample grid every 8 steps, the loss every 2.
TOY = ("trainer.max_steps=24 trainer.log_every_n_steps=2 callbacks.model_checkpoint.every_n_train_steps=8 "
       "callbacks.samples.every_n_steps=8 callbacks.samples.steps=4 callbacks.samples.seeds=[0] "
       "callbacks.concept_probe.steps=4 callbacks.concept_probe.seeds=[0] data.val_images=0")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    require_browser()
    base = tmp_path_factory.mktemp("ui")
    (base / "outputs").mkdir()
    server = UiServer(base / "outputs", base / "server.log")
    driver = None
    try:
        server.start()
        driver = start_browser(tmp_path_factory.mktemp("chromium-profile"))
        app = App(server, driver)
        app.base, app.outputs, app.shared = base, base / "outputs", {}
        yield app
    finally:
        if driver is not None:
            driver.quit()
        server.stop()
        kill_processes_under(base)  # jobs outlive the server by design (their own session), and the shell run


def lora(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / "lora.safetensors"
    assert path.is_file(), f"{path} was not written"
    return load_file(str(path))


def assert_same_lora(a: Path, b: Path) -> None:
    first, second = lora(a), lora(b)
    assert sorted(first) == sorted(second) and first
    different = [key for key in first if not torch.equal(first[key], second[key])]
    assert not different, f"{len(different)} of {len(first)} tensors differ between {a} and {b}, e.g. {different[:3]}"


def fill_form(app: App, overrides: str, checked: bool = True) -> str:
    """/new with the quickstart preset and ``overrides`` typed in; the command the page shows once
    checked (``checked``: wait until it holds the overrides)."""
    from selenium.webdriver.support.ui import Select

    app.go("/new")
    wait_for(lambda: app.finds('#experiment option[value="quickstart"]') and app.finds('[data-key="lora.rank"]'),
             30, what="the presets in the form")
    Select(app.find("#experiment")).select_by_value("quickstart")
    box = app.find("#overrides")
    box.clear()
    box.send_keys(overrides)
    last = overrides.split()[-1]
    if not checked:
        return ""
    return wait_for(lambda: last in app.text("#command") and app.text("#command"), 60, what="the checked command")


def start_run(app: App, overrides: str) -> tuple[str, str]:
    """Start a run from the form: (its folder relative to outputs, the command the form showed)."""
    command = fill_form(app, overrides)
    errors = {e.get_attribute("data-error-for"): e.text for e in app.finds("[data-error-for]") if e.text.strip()}
    assert not errors, errors
    app.find("#submit").click()
    wait_for(lambda: "/run/" in app.driver.current_url, 60, what="the run page after Start")
    run = unquote(app.driver.current_url.split("/run/", 1)[1].split("?")[0])
    wait_for(lambda: app.text("#state") not in ("", "loading"), 30, what="the run's state")
    return run, command


def shell_command(command: str, run_dir: Path) -> str:
    """The page's command for a shell, writing into ``run_dir`` instead of the page's own run folder."""
    words = [w for w in shlex.split(command) if not w.startswith("hydra.run.dir=")]
    return shlex.join(words + [f"hydra.run.dir={run_dir}"])


def test_form_run_shows_command_live_loss_and_samples(app):
    run, command = start_run(app, TOY)
    assert command.startswith("python -m sdtune ") and "experiment=quickstart" in command
    assert "trainer.max_steps=24" in command and "data.val_images=0" in command
    shown = wait_for(lambda: app.text("#command"), 30, what="the run's command")
    # acceptance 2, in the background: the shown command from a shell, into its own folder
    shell_dir = app.base / "shell-run"
    env = {**child_env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    app.shared["shell"] = (subprocess.Popen(["bash", "-c", shell_command(shown, shell_dir)], cwd=ROOT, env=env,
                                            stdout=subprocess.DEVNULL, stderr=open(app.base / "shell-run.log", "w")),
                           shell_dir)
    seen = []  # (state, train points drawn), read as the page polls

    def finished():
        state = app.text("#state")
        seen.append((state, int(app.find("#loss-chart").get_attribute("data-points") or 0), app.text("#step")))
        if state in ("failed", "stopped", "interrupted"):
            raise AssertionError(f"the run ended {state}: {app.text('#log-tail')[-3000:]}")
        return state == "finished"

    wait_for(finished, 240, every=0.15, what="the page run to finish")
    final = int(app.find("#loss-chart").get_attribute("data-points"))
    live = sorted({n for state, n, _ in seen if state == "running" and n > 0})
    assert final >= 10 and live and live[0] < final, f"the chart did not grow while running: {seen}"
    assert app.text("#step") == "24 / 24"
    assert any(state == "running" and step.endswith("/ 24") for state, _, step in seen), seen
    shown = [tuple(map(int, step.split(" / "))) for state, _, step in seen if state == "running" and " / " in step]
    wrong = [f"{a} / {b}" for a, b in shown if b != 24 or a > 24]
    assert not wrong, f"the page showed another progress bar's count as the run's step: {wrong[:3]}"
    assert [a for a, _ in shown] == sorted(a for a, _ in shown), f"the step went back: {shown}"
    # the samples: one grid per 8 steps and the final samples.png, the slider steps through them
    slider, image = app.find("#samples-slider"), app.find("#sample-image")
    wait_for(lambda: app.loaded(image), 30, what="the newest sample grid")
    assert int(slider.get_attribute("max")) >= 3, slider.get_attribute("max")
    last_src, last_step = image.get_attribute("src"), app.text("#sample-step")
    from selenium.webdriver.common.keys import Keys

    slider.send_keys(Keys.HOME)
    wait_for(lambda: image.get_attribute("src") != last_src and app.loaded(image), 30, what="the first sample grid")
    assert app.text("#sample-step").startswith("step 8") and app.text("#sample-step") != last_step
    figures = app.finds("#figures img")
    wait_for(lambda: all(app.loaded(f) for f in figures), 30, what="the figures")
    names = {f.get_attribute("alt") for f in figures}
    assert {"loss.png", "concept_probe.png"} <= names, names
    assert app.find("#lora-download").get_attribute("href").endswith("lora.safetensors")
    slider.send_keys(Keys.END)
    wait_for(lambda: image.get_attribute("src") == last_src and app.loaded(image), 30, what="the last grid again")
    screenshot(app.driver, "run")
    app.shared["page_run"] = app.outputs / run
    fill_form(app, TOY)  # the form of that run, checked, for the docs
    screenshot(app.driver, "new")


def test_page_run_equals_shell_run_bit_for_bit(app):
    """Acceptance 2: the LoRA of the page's run and of its shown command run from a shell."""
    assert "page_run" in app.shared, "the page run of the first test did not finish"
    proc, shell_dir = app.shared["shell"]
    assert proc.wait(timeout=300) == 0, (app.base / "shell-run.log").read_text()[-3000:]
    assert_same_lora(app.shared["page_run"], shell_dir)


def test_stop_and_resume_from_the_page(app):
    run, _ = start_run(app, TOY.replace("max_steps=24", "max_steps=40"))
    def step_shown() -> int:  # "N / 40" as the page shows it, else -1
        done, _, total = app.text("#step").partition(" / ")
        return int(done) if total == "40" and done.isdigit() else -1

    points = lambda: int(app.find("#loss-chart").get_attribute("data-points") or 0)  # noqa: E731
    wait_for(lambda: points() >= 2, 180, every=0.1, what="two logged losses (training past step 2)")
    assert app.text("#state") == "running" and step_shown() < 40
    app.find("#stop").click()
    app.wait_state("stopped", 120)
    assert app.find("#resume").is_displayed() and not app.find("#stop").is_displayed()
    resume_command = app.text("#resume-command")
    assert f"ckpt_path={app.outputs / run}" in resume_command or "ckpt_path=" in resume_command, resume_command
    assert 2 <= step_shown() < 40, app.text("#step")
    assert json.loads((app.outputs / run / "summary.json").read_text())["training_finished"] is False
    screenshot(app.driver, "stopped", height=1250)
    app.find("#resume").click()
    wait_for(lambda: app.text("#state") in ("queued", "running"), 30, what="the resume job")
    app.wait_state("finished", 180)
    assert app.text("#step") == "40 / 40"
    assert json.loads((app.outputs / run / "summary.json").read_text())["training_finished"] is True
    app.shared["stopped_run"] = app.outputs / run


def test_queue_survives_a_crash_and_the_interrupted_run_resumes_bit_identical(app):
    """Acceptance 3: kill -9 the server and the running job once it has a checkpoint; the next server
    shows it interrupted (resumable) and the second job still queued; both finish, and the resumed
    LoRA equals the uninterrupted page run's (same settings) bit for bit."""
    first, _ = start_run(app, TOY)
    second, _ = start_run(app, TOY + " seed=7")
    assert first != second
    folder = app.outputs / first
    wait_for(lambda: (folder / "checkpoints" / "last.ckpt").exists(), 240, every=0.03, what="the first checkpoint")
    pid = json.loads((folder / ".sdtune.lock").read_text())["pid"]
    app.server.kill()
    os.kill(pid, 9)
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(),
             10, what="the run to die")
    assert not (folder / "lora.safetensors").exists(), "the run finished before it was killed"
    app.server.start()
    app.go("/")
    row = lambda run: next(r for r in app.finds("#queue [data-job]") if run in r.text)  # noqa: E731
    wait_for(lambda: row(first) and "interrupted" in row(first).text, 30, what="the first job shown interrupted")
    assert row(first).find_elements("css selector", "button.resume")
    assert any(s in row(second).text for s in ("queued", "running")), row(second).text
    wait_for(lambda: app.finds(f'tr[data-run="{first}"]'), 60, what="the runs table")
    screenshot(app.driver, "queue")
    app.go("/run/" + first.replace("/", "%2F"))
    app.wait_state("interrupted", 30)
    app.find("#resume").click()
    wait_for(lambda: app.text("#state") in ("queued", "running"), 30, what="the resume job")
    app.wait_state("finished", 300)
    app.go("/run/" + second.replace("/", "%2F"))
    app.wait_state("finished", 120)
    assert "page_run" in app.shared, "no uninterrupted run to compare with"
    assert_same_lora(app.shared["page_run"], folder)
    app.shared["second_run"] = second


def test_compare_two_runs(app):
    runs = [str(app.shared.get(k, "").relative_to(app.outputs)) if isinstance(app.shared.get(k), Path) else app.shared.get(k)
            for k in ("page_run", "second_run")]
    assert all(runs), app.shared
    app.go("/")
    for run in runs:
        box = wait_for(lambda run=run: app.find(f'tr[data-run="{run}"] input.compare'), 30, what=f"the row of {run}")
        box.click()
    app.find("#compare-button").click()
    for image in ("#compare-loss", "#compare-samples"):
        wait_for(lambda image=image: app.loaded(app.find(image)), 120, what=f"{image} to load")
    # sorting by a metric: the rows follow its values
    app.find('th[data-sort="final_train_loss"]').click()
    wait_for(lambda: app.find('th[data-sort="final_train_loss"]').get_attribute("class"), 10, what="the sorted header")
    column = [h.get_attribute("data-sort") for h in app.finds("#runs-table th")].index("final_train_loss")
    values = [float(r.find_elements("css selector", "td")[column].text) for r in app.finds("#runs-table tbody tr")
              if r.find_elements("css selector", "td")[column].text not in ("–", "")]
    assert len(values) >= 3 and values in (sorted(values), sorted(values, reverse=True)), values
    screenshot(app.driver, "compare")


def test_dataset_caption_edit_writes_the_caption_file_only(app):
    root = app.base / "dataset"
    shutil.copytree(QUICKSTART, root)
    images = {p: p.read_bytes() for p in root.rglob("*.png")}
    app.go("/dataset")
    from selenium.webdriver.support.ui import Select

    wait_for(lambda: app.finds('#dataset-model option[value="toy"]'), 30, what="the models")
    Select(app.find("#dataset-model")).select_by_value("toy")  # its resolution gives each image a bucket
    app.find("#dataset-root").send_keys(str(root))
    app.find("#dataset-open").click()
    cards = wait_for(lambda: len(app.finds("[data-file]")) == len(images) and app.finds("[data-file]"), 60,
                     what="a card per image")
    card = cards[0]
    file = card.get_attribute("data-file")
    assert card.find_element("css selector", ".verdict").text == "ok" and "bucket" in card.text, card.text
    wait_for(lambda: app.loaded(card.find_element("css selector", "img")), 30, what="the card's image")
    caption = card.find_element("css selector", ".caption")
    caption.clear()
    caption.send_keys("a sks square drawn in the browser test")
    card.find_element("css selector", ".save").click()
    wait_for(lambda: card.find_element("css selector", ".status").text.startswith("saved to metadata.csv"), 30,
             what="the saved message")
    status, listing = app.api(f"/api/dataset?root={quote(str(root))}")
    assert status == 200, listing
    entry = next(i for i in listing["images"] if i["file"] == file)
    assert entry["caption"] == "a sks square drawn in the browser test" and entry["caption_file"]
    assert "a sks square drawn in the browser test" in (root / entry["caption_file"]).read_text()
    assert {p: p.read_bytes() for p in root.rglob("*.png")} == images
    app.driver.refresh()
    wait_for(lambda: app.find(f'[data-file="{file}"] .caption').get_attribute("value")
             == "a sks square drawn in the browser test", 30, what="the new caption after a reload")
    screenshot(app.driver, "dataset", height=1000)


def test_traversal_and_bad_overrides_are_refused_on_the_page(app):
    for path in ("/files/..%2F..%2F..%2F..%2Fetc%2Fpasswd", "/dataset-files?root=/etc&file=passwd"):
        status, answer = app.api(path)
        assert status == 403, (path, status, answer)
        message = answer["error"] if isinstance(answer, dict) else answer
        app.go(path)
        shown = app.find("body").text
        assert message.strip()[:60] in shown and "root:" not in shown, shown
    _, before = app.api("/api/jobs")
    fill_form(app, "model._target_=os.system", checked=False)
    wait_for(lambda: "_target_" in app.text('[data-error-for="overrides"]'), 60, what="the _target_ refusal")
    app.find("#overrides").clear()
    rank = app.find('[data-key="lora.rank"]')
    rank.clear()
    rank.send_keys("-1")
    wait_for(lambda: "lora.rank" in app.text('[data-error-for="lora.rank"]'), 60, what="the lora.rank message")
    app.find("#submit").click()
    wait_for(lambda: app.text("#submit-error"), 30, what="the refused submit")
    assert "/new" in app.driver.current_url
    assert app.api("/api/jobs")[1]["jobs"] == before["jobs"], "something was queued"
    screenshot(app.driver, "errors")


def test_generate_panel_draws_with_the_lora(app):
    run = app.shared["page_run"].relative_to(app.outputs).as_posix()
    app.go("/run/" + run.replace("/", "%2F"))
    app.wait_state("finished", 30)
    app.find("#gen-prompt").send_keys("a blue square on a sks background")
    for css, value in (("#gen-seed", "3"), ("#gen-weight", "0.8")):
        app.find(css).clear()
        app.find(css).send_keys(value)
    app.find("#gen-compare").click()
    app.find("#gen-submit").click()
    images = wait_for(lambda: app.finds("#gen-images img") or (app.text("#gen-error") and
                      pytest.fail(app.text("#gen-error"))), 180, what="the generated images")
    wait_for(lambda: all(app.loaded(i) for i in images), 30, what="the generated images to load")
    screenshot(app.driver, "generate", element="#generate")


def test_pages_keep_the_token_and_send_it(app, tmp_path):
    """With --token, a page opened with ?token= keeps it (sessionStorage), sends it as X-Sdtune-Token
    (no cookie needed) and puts it in its links and file URLs."""
    (tmp_path / "outputs").mkdir()
    server = UiServer(tmp_path / "outputs", tmp_path / "server.log", ("--token", "s3cret-token"))
    try:
        server.start()
        assert http(server.url + "/api/runs")[0] == 401
        app.driver.get(server.url + "/?token=s3cret-token")
        wait_for(lambda: "No runs yet" in app.text("#runs-empty"), 30, what="the empty runs table")
        assert app.text("#runs-error") == "" and app.text("#queue-error") == ""
        app.driver.delete_all_cookies()
        answer = app.driver.execute_async_script("""const done = arguments[arguments.length - 1];
            import("/static/js/api.js").then(async (m) => done([(await m.api("/api/presets")).status,
                                                                  m.withToken("/files/runs/x/lora.safetensors")]));""")
        assert answer == [200, "/files/runs/x/lora.safetensors?token=s3cret-token"], answer
        app.finds("header nav a")[1].click()  # New run: the link carries the token
        wait_for(lambda: app.finds('#experiment option[value="quickstart"]'), 30, what="the form's presets")
        assert app.driver.current_url.endswith("/new?token=s3cret-token")
    finally:
        server.stop()
