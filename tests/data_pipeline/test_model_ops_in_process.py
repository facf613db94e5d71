"""sdtune's model ops run in the stage's own process and fail loudly (data_pipeline.models.IN_PROCESS_OPS).

On a GPU machine data-juicer switches to the forkserver start method for every op whose ``use_cuda()``
is true, and datasets maps even ``num_proc=1`` in a worker pool, whose worker then dies
(``AuthenticationError: digest sent was rejected``). The stage test here makes ``use_cuda()`` true on
this CPU machine (the device stays the CPU: no CUDA), which brings exactly that start method.
"""

from __future__ import annotations

import multiprocessing
import re
from pathlib import Path

import pytest
from PIL import Image

from data_pipeline.__main__ import main as cli_main
from data_pipeline.dj import load_data_juicer
from data_pipeline.errors import RUN_EXIT
from data_pipeline.models import IN_PROCESS_OPS
from data_pipeline.recipe import build_config
from sdtune.evaluation.aesthetics import AestheticScorer
from tests.data_pipeline.test_captioning import blip_reference
from tests.data_pipeline.test_model_filters import _between, _classifier_scores
from tests.helpers.captioners import build_blip
from tests.helpers.files import read_csv, recipe
from tests.helpers.images import add, textured
from tests.helpers.scorers import build_aesthetic, build_classifier

N = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("in_process")
    return {"blip": build_blip(root / "blip"), "aes": build_aesthetic(root / "aes"),
            "nsfw": build_classifier(root / "nsfw", "nsfw", seed=1)}  # fmt: skip


def test_model_ops_never_get_a_worker_pool_and_fail_loudly(tmp_path):
    """Catches an sdtune model op that datasets would map in a pool (np workers), or one that keeps
    data-juicer's skip_op_error default (a raising batch silently dropped); a recipe may still opt in."""
    load_data_juicer()
    from data_juicer.ops.base_op import OPERATORS

    for name in IN_PROCESS_OPS:
        assert OPERATORS.modules[name].runtime_np(object()) is None, name
    process = [{"sdtune_aesthetics_filter": {"model": "m"}}, {"image_nsfw_filter": None},
               {"image_watermark_filter": {"skip_op_error": True}}, {"image_shape_filter": {"min_width": 8}}]
    cfg = build_config({"process": process}, work=tmp_path, dataset=tmp_path / "d.jsonl",
                       export=tmp_path / "e.jsonl", np_workers=2, n_samples=3)  # fmt: skip
    assert cfg["process"] == [{"sdtune_aesthetics_filter": {"model": "m", "skip_op_error": False}},
                              {"image_nsfw_filter": {"skip_op_error": False}},
                              {"image_watermark_filter": {"skip_op_error": True}},
                              {"image_shape_filter": {"min_width": 8}}]  # fmt: skip
    assert process[0] == {"sdtune_aesthetics_filter": {"model": "m"}}  # the recipe itself is untouched


def test_model_paths_expand_home_and_a_recipe_wide_skip_op_error_is_kept(tmp_path, monkeypatch):
    """Catches ``~/models/x`` reaching data-juicer's loader as a Hub id after the check expanded it, and the
    per-op default hiding a recipe's top-level ``skip_op_error: true``."""
    load_data_juicer()  # registers sdtune's ops and their model parameters
    monkeypatch.setenv("HOME", str(tmp_path))
    process = [{"sdtune_image_captioner": {"model": "~/models/blip"}}, {"image_nsfw_filter": {"hf_nsfw_model": "~/n"}},
               {"sdtune_image_tagger": {"model": "/abs/wd14"}}]
    cfg = build_config({"process": process, "skip_op_error": True}, work=tmp_path, dataset=tmp_path / "d.jsonl",
                       export=tmp_path / "e.jsonl", np_workers=1, n_samples=1)  # fmt: skip
    assert cfg["skip_op_error"] is True
    assert cfg["process"] == [{"sdtune_image_captioner": {"model": f"{tmp_path}/models/blip"}},
                              {"image_nsfw_filter": {"hf_nsfw_model": f"{tmp_path}/n"}},
                              {"sdtune_image_tagger": {"model": "/abs/wd14"}}]  # fmt: skip


@pytest.fixture
def gpu_start_method(monkeypatch):
    """use_cuda() true for the captioner and two model filters, as on a GPU machine; the start
    method data-juicer then sets is put back afterwards."""
    from data_pipeline.ops import SdtuneAestheticsFilter, SdtuneImageCaptioner
    from data_pipeline.ops.sdtune_model_filters import TracedNSFWFilter

    for cls in (SdtuneImageCaptioner, SdtuneAestheticsFilter, TracedNSFWFilter):
        monkeypatch.setattr(cls, "use_cuda", lambda self: True)
    method = multiprocessing.get_start_method(allow_none=True)
    yield
    multiprocessing.set_start_method(method, force=True)


@pytest.mark.slow
def test_captioner_and_model_filters_run_under_the_gpu_start_method(models, tmp_path, capsys, gpu_start_method):
    """Catches the worker pool that dies under forkserver (every model op failed on any GPU machine),
    and a captioning bar that jumps from 0 to N at the end (the batches ran in another process)."""
    raw = tmp_path / "raw"
    names = [f"img{i}.png" for i in range(N)]
    for i, name in enumerate(names):
        add(raw, name, textured(30 + i, 48, 40), None)
    images = [Image.open(raw / n).convert("RGB") for n in names]
    aes = [float(AestheticScorer(models["aes"]).scores([im])[0]) for im in images]
    nsfw = _classifier_scores(models["nsfw"], images)
    min_aes = _between(aes, 2)  # the two lowest aesthetic scores go
    left = [i for i in range(N) if aes[i] >= min_aes]
    max_nsfw = _between([nsfw[i] for i in left], len(left) - 1)  # then the highest NSFW score
    kept = [names[i] for i in left if nsfw[i] <= max_nsfw]
    text = (f"process:\n  - sdtune_aesthetics_filter:\n      model: {models['aes']}\n      min_score: {min_aes}\n"
            f"  - image_nsfw_filter:\n      hf_nsfw_model: {models['nsfw']}\n      max_score: {max_nsfw}\n")
    out = tmp_path / "out"
    args = ["--caption", str(models["blip"]), "--caption-batch", "1", "--caption-max-tokens", "6"]
    assert cli_main([str(raw), str(out), "--recipe", str(recipe(tmp_path, "r.yaml", text)), "--np", "2", *args]) == 0

    assert sorted(r["file"] for r in read_csv(out / "dropped.csv")) == sorted(set(names) - set(kept))
    rows = {r["file_name"]: r["text"] for r in read_csv(out / "metadata.csv")}
    assert rows == dict(zip([f"images/{n}" for n in kept], blip_reference(models["blip"], [raw / n for n in kept], 6)))
    err = capsys.readouterr().err
    counts = [int(c) for c in re.findall(rf"captioning \(blip\):[^\r\n]*?\b(\d+)/{len(kept)} \[", err)]
    assert 1 in counts and counts.index(1) < counts.index(len(kept)), err[-2000:]  # it advanced batch by batch


@pytest.mark.slow
def test_an_error_inside_a_model_batch_reaches_the_user_as_itself(models, tmp_path, capsys, monkeypatch):
    """Catches skip_op_error (data-juicer's default) turning a failing batch into silently dropped images."""
    import data_pipeline.ops.sdtune_image_captioner as captioner

    def fails(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(captioner, "generate_captions", fails)  # sdtune's own function, in the stage's process
    raw, out = tmp_path / "raw", tmp_path / "out"
    for i in range(3):
        add(raw, f"img{i}.png", textured(i, 40, 40), None)
    ok = recipe(tmp_path, "ok.yaml", "process:\n  - image_shape_filter:\n      min_width: 8\n")
    assert cli_main([str(raw), str(out), "--recipe", str(ok), "--caption", str(models["blip"])]) == RUN_EXIT
    err = capsys.readouterr().err
    assert f"data-juicer failed running recipe {ok}: RuntimeError: CUDA out of memory (simulated)" in err
    assert "Traceback" not in err and len(err.splitlines()) < 40, err[-3000:]  # the traceback stays in the log
    assert not out.exists()
