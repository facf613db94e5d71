"""Run folders as the pages see them: progress from the job log's bar, steps from the run's own files."""

from __future__ import annotations

from PIL import Image

from sdtune.ui.runs import log_progress, log_tail, run_detail, run_folders


def test_progress_comes_from_the_last_bar_redraw_and_the_tail_collapses_redraws(tmp_path):
    log = tmp_path / "1.log"
    log.write_text("[INFO] training a rank-4 LoRA\ntraining:   0%|   | 0/24 [00:00<?, ?step/s]\r"
                   "training:  50%|#  | 12/24 [00:03<00:04,  3.5step/s, loss=0.51]\rtraining:  54%|#  | 13/24 [01:02:03<1:04, 3step/s]")
    assert log_progress(log) == {"step": 13, "max_steps": 24, "elapsed_seconds": 3723.0, "eta_seconds": 64.0}
    assert log_tail(log).splitlines() == ["[INFO] training a rank-4 LoRA", "training:  54%|#  | 13/24 [01:02:03<1:04, 3step/s]"]
    assert log_progress(tmp_path / "none.log") is None


def test_a_run_folder_reads_as_its_steps_samples_and_figures(tmp_path):
    run = tmp_path / "runs" / "r1"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- experiment=quickstart\n- trainer.max_steps=24\n")
    (run / "config.yaml").write_text("trainer:\n  max_steps: 24\n")
    (run / "logs" / "csv").mkdir(parents=True)
    (run / "logs" / "csv" / "metrics.csv").write_text("step,train/loss_step,val/loss\n4,0.9,\n9,0.7,\n9,,0.8\n14,0.5")  # row cut
    (run / "samples").mkdir()
    for step in (16, 8):
        Image.new("RGB", (8, 8)).save(run / "samples" / f"step{step:06d}.png")
    Image.new("RGB", (8, 8)).save(run / "loss.png")
    (tmp_path / ".sdtune-ui" / "x" / ".hydra").mkdir(parents=True)  # the app's own folder is no run
    (tmp_path / ".sdtune-ui" / "x" / ".hydra" / "overrides.yaml").write_text("[]")
    assert run_folders(tmp_path) == [run]
    detail = run_detail(tmp_path, "runs/r1", None, None, "python -m sdtune")
    assert (detail["state"], detail["step"], detail["max_steps"]) == ("incomplete", 14, 24)
    assert detail["loss"] == {"train": [[4, 0.9], [9, 0.7], [14, 0.5]], "val": [[9, 0.8]]}
    assert [s["step"] for s in detail["samples"]] == [8, 16]
    assert detail["samples"][0]["url"] == "/files/runs/r1/samples/step000008.png"
    assert [f["name"] for f in detail["figures"]] == ["loss.png"] and detail["lora_url"] is None


def test_progress_is_the_training_bar_only(tmp_path):
    """The other bars of a job log (weights loading, the text-embedding cache) are not the run's step."""
    log = tmp_path / "2.log"
    log.write_text("Loading weights: 100%|##| 36/36 [00:00<00:00, 15225.87it/s]\n"
                   "caching text embeddings: 100%|##| 2/2 [00:00<00:00, 56.59batch/s]\n")
    assert log_progress(log) is None
    log.write_text(log.read_text() + "training:   4%|#  | 1/24 [00:00<00:12,  1.78step/s]\n")
    assert log_progress(log)["step"] == 1
