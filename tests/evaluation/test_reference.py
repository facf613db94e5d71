"""Evaluation against reference images (``eval:``): the metrics' numbers, where they are logged, bad config.

CLIP and DINOv2 are tiny random models built here with the real transformers classes, saved with
``save_pretrained`` and loaded back through ``from_pretrained`` like downloaded ones; the base is
the tiny random SD1.5. Whether the distance follows what a LoRA learns is tests/toy/test_eval_learning.py.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdtune.evaluation.config import parse_eval
from sdtune.evaluation.metrics import ClipScorer, DinoScorer, mean_cosine, nearest_rms, vae_latents
from sdtune.run.checks import validate
from sdtune.toy.domain import Scene, render
from sdtune.utils.errors import ConfigError
from tests.helpers.cli import run_cli
from tests.helpers.config import compose_cfg
from tests.helpers.models import tiny_model

RED_CIRCLE = Scene("circle", "red", "blue")
GREEN_SQUARE = Scene("square", "yellow", "black")


@pytest.fixture(scope="module")
def scorers(tmp_path_factory) -> dict[str, Path]:
    """Tiny random CLIP (with the tiny BPE tokenizer) and DINOv2 folders, as save_pretrained writes them."""
    from transformers import (
        BitImageProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        Dinov2Config,
        Dinov2Model,
    )

    from sdtune.families.tiny_parts import build_clip_tokenizer

    root = tmp_path_factory.mktemp("scorers")
    tok = build_clip_tokenizer()
    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(root / "clip")
    crop = {"height": 32, "width": 32}
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=crop),
                  tokenizer=tok).save_pretrained(root / "clip")
    Dinov2Model(Dinov2Config(**vision)).save_pretrained(root / "dino")
    BitImageProcessor(size={"shortest_edge": 32}, crop_size=crop, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(root / "dino")
    return {"clip": root / "clip", "dino": root / "dino"}


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("refs")
    render(RED_CIRCLE).save(folder / "red_circle.png")
    render(GREEN_SQUARE).save(folder / "other.png")
    return folder


def test_identical_images_score_one_and_distance_zero_and_a_different_image_less(scorers):
    """Catches similarities that are not normalised cosines (identical images must give exactly 1),
    a distance that is not 0 for a rendered image equal to a reference, and metrics blind to content."""
    from diffusers import AutoencoderKL

    same, other = render(RED_CIRCLE), render(GREEN_SQUARE)
    clip, dino = ClipScorer(scorers["clip"]), DinoScorer(scorers["dino"])
    cpu = torch.device("cpu")
    for scorer in (clip, dino):
        a, b = scorer.images([same], cpu), scorer.images([other], cpu)
        assert mean_cosine(a, scorer.images([same.copy()], cpu)) == pytest.approx(1.0, abs=1e-5)
        assert mean_cosine(a, b) < 0.999
    vae = AutoencoderKL.from_pretrained(tiny_model("sd15") / "vae").eval()
    z_same, z_other = vae_latents(vae, [same]), vae_latents(vae, [other])
    assert nearest_rms(z_same, torch.cat([z_other, z_same])) == 0.0  # the nearest of two references counts
    assert nearest_rms(z_same, z_other) > 0.0
    assert nearest_rms(torch.cat([z_same, z_other]), z_same) == pytest.approx(nearest_rms(z_other, z_same) / 2)


def test_latent_distance_uses_the_vaes_shift_as_the_denoiser_sees_latents():
    """SD3's and FLUX's VAEs shift their latents before scaling (shift_factor): the metric encodes as
    training does, (mean - shift) * scale, not mean * scale."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_model("sd35") / "vae").eval()
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    assert (shift, scale) == (0.0609, 1.5305)
    image = render(RED_CIRCLE)
    pixels = torch.from_numpy(__import__("numpy").asarray(image, dtype="float32")).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        mean = vae.encode(pixels).latent_dist.mean
    ours = vae_latents(vae, [image])
    torch.testing.assert_close(ours, ((mean - shift) * scale).flatten(1), rtol=0, atol=5e-4)  # conv rounding (thread count)
    assert (ours - (mean * scale).flatten(1)).abs().min() > 0.09  # shift * scale = 0.093 apart everywhere


def test_clip_t_is_the_cosine_clip_itself_computes(scorers):
    """Catches CLIP-T read from the wrong features (unprojected, unnormalised, another prompt): it must be
    CLIPModel's own image-text logit divided by its logit scale."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(scorers["clip"], local_files_only=True).eval()
    proc = CLIPProcessor.from_pretrained(scorers["clip"], local_files_only=True)
    images, prompt = [render(RED_CIRCLE), render(GREEN_SQUARE)], "a red circle on a blue background"
    inputs = proc(images=images, text=[prompt], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = float((model(**inputs).logits_per_image / model.logit_scale.exp()).mean())
    clip = ClipScorer(scorers["clip"])
    cpu = torch.device("cpu")
    assert mean_cosine(clip.images(images, cpu), clip.texts([prompt], cpu)) == pytest.approx(expected, abs=1e-5)


def _cfg(*overrides: str):
    return compose_cfg("model=tiny", "data.root=/tmp", *overrides)


@pytest.mark.parametrize("overrides, message", [
    (["+eval.promts=[a]"], "eval.promts is not a setting of sdtune"),
    (["eval.prompts=[{prompt: a, references: [/nonexistent/ref.png]}]"], "eval.prompts[0].references: reference image /nonexistent/ref.png does not exist"),
    (["eval.prompts=[{prompt: a, refs: [x.png]}]"], "has unknown key(s) ['refs']"),
    (["eval.prompts=[a red circle]"], "eval.prompts[0] ('a red circle') has no references and eval.clip_model and eval.aesthetic_model are null"),
    (["eval.prompts=[{prompt: a, references: REFS, name: 'a b'}]"], "eval.prompts[0].name = 'a b'"),
    (["eval.prompts=[{prompt: a, references: REFS}]", "eval.clip_model=/nonexistent"], "eval.clip_model=/nonexistent: /nonexistent is no local CLIP model folder"),
    (["eval.prompts=[{prompt: a, references: REFS}]", "eval.seeds=[]"], "eval.seeds must be a non-empty list"),
    (["eval.prompts=[{prompt: a, references: REFS}]", "eval.every_n_steps=0"], "eval.every_n_steps must be an integer >= 1 or null"),
    (["eval.prompts=[{prompt: a, references: REFS}]", "optimized_metric=eval/clip_i"], "optimized_metric=eval/clip_i is not logged by this evaluation"),
    (["optimized_metric=eval/latent_dist"], "optimized_metric=eval/latent_dist, but eval.prompts is empty"),
])
def test_bad_eval_config_is_refused_with_the_key_and_the_fix(references, overrides, message):
    """Catches a typo or a missing reference that would only fail (or silently measure nothing) mid-run."""
    overrides = [o.replace("REFS", f"[{references}]") for o in overrides]
    with pytest.raises(ConfigError) as err:
        validate(_cfg(*overrides))
    assert message in str(err.value)


def test_empty_reference_folder_is_named(tmp_path):
    """Catches a folder of references that silently yields no images (a distance over nothing)."""
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ConfigError, match=f"the folder {tmp_path} holds no images"):
        parse_eval({"prompts": [{"prompt": "a", "references": [str(tmp_path)]}], "seeds": [0], "steps": 2})


def test_names_come_from_prompts_and_folders_expand(references):
    """Catches metric names that collide (two prompts logging into one key) and folders not expanded."""
    spec = parse_eval({"prompts": [{"prompt": "A red circle!", "references": str(references)},
                                   {"prompt": "a red circle", "references": [str(references / "other.png")]}],
                       "seeds": [0, 1], "steps": 2})
    assert [p.name for p in spec.prompts] == ["a_red_circle", "a_red_circle_2"]
    assert [p.name for p in spec.prompts[0].references] == ["other.png", "red_circle.png"]
    assert spec.metrics() == {"eval/latent_dist"}


@pytest.mark.parametrize("metric, direction", [("eval/clip_i", "maximize"), ("eval/red/dino", "maximize"),
                                               ("eval/latent_dist", "minimize"), ("val/loss", "minimize")])
def test_the_optuna_sweep_direction_follows_the_metric(references, metric, direction):
    """Catches a sweep that minimises a similarity (it would pick the worst run)."""
    from hydra import compose, initialize_config_dir

    from sdtune.config.paths import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hparams_search=optuna", f"optimized_metric={metric}"], return_hydra_config=True)
    assert cfg.hydra.sweeper.direction == direction


TINY_RUN = ("experiment=quickstart", "model=tiny", "trainer.max_steps=2", "callbacks.samples=null",
            "callbacks.concept_probe=null", "data.val_images=0")


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, scorers, references) -> Path:
    """A 2-step tiny-SD1.5 run evaluating two prompts every step with the VAE distance, CLIP and DINO."""
    run = tmp_path_factory.mktemp("eval") / "run"
    proc = run_cli(*TINY_RUN, "eval.every_n_steps=1", "eval.steps=2",
                   f"eval.prompts=[{{prompt: a red circle, references: [{references / 'red_circle.png'}], name: red}}, a blue square]",
                   f"eval.clip_model={scorers['clip']}", f"eval.dino_model={scorers['dino']}", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


AVERAGED = ["eval/latent_dist", "eval/clip_t", "eval/clip_i", "eval/dino"]
PER_PROMPT = ["eval/red/latent_dist", "eval/red/clip_t", "eval/red/clip_i", "eval/red/dino", "eval/a_blue_square/clip_t"]


@pytest.mark.slow
def test_metrics_reach_csv_tensorboard_and_summary_under_their_names(eval_run):
    """Catches metrics computed but not logged (or under other names), a missing step-0 baseline or
    final evaluation, and averages that are not the mean over prompts."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with open(eval_run / "logs" / "csv" / "metrics.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("eval/latent_dist")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    acc = EventAccumulator(str(eval_run / "logs" / "tensorboard")).Reload()
    summary = json.loads((eval_run / "summary.json").read_text())
    history = summary["eval"]["history"]
    assert [h["step"] for h in history] == [0, 1, 2]
    # "a blue square" has no references: CLIP-T only, and no key for the distances it cannot have
    assert set(history[-1]) == {"step", *AVERAGED, *PER_PROMPT}
    for name in AVERAGED + PER_PROMPT:
        assert [e.step for e in acc.Scalars(name)] == [0, 1, 2], name
        assert [float(r[name]) for r in rows] == pytest.approx([h[name] for h in history]), name
        assert [e.value for e in acc.Scalars(name)] == pytest.approx([h[name] for h in history], rel=1e-6), name
        assert summary["final_metrics"][name] == pytest.approx(history[-1][name]), name
    last = history[-1]
    assert last["eval/clip_t"] == pytest.approx((last["eval/red/clip_t"] + last["eval/a_blue_square/clip_t"]) / 2)
    assert last["eval/latent_dist"] == last["eval/red/latent_dist"]
    assert sorted(p.name for p in (eval_run / "eval" / "step000002").iterdir()) == [
        "a_blue_square_seed0.png", "a_blue_square_seed1.png", "red_seed0.png", "red_seed1.png"]


@pytest.mark.slow
def test_logged_numbers_are_the_saved_images_scores(eval_run, scorers, references):
    """Catches logged numbers that do not belong to the images of that step (another seed or prompt,
    references resized differently): the final images, scored again here, give the same numbers."""
    from diffusers import AutoencoderKL

    last = json.loads((eval_run / "summary.json").read_text())["eval"]["final"]
    images = [Image.open(eval_run / "eval" / "step000002" / f"red_seed{s}.png").convert("RGB") for s in (0, 1)]
    ref = Image.open(references / "red_circle.png").convert("RGB")
    vae = AutoencoderKL.from_pretrained(tiny_model("sd15") / "vae").eval()
    assert nearest_rms(vae_latents(vae, images), vae_latents(vae, [ref])) == pytest.approx(last["eval/red/latent_dist"], rel=1e-4)
    dino, cpu = DinoScorer(scorers["dino"]), torch.device("cpu")
    assert mean_cosine(dino.images(images, cpu), dino.images([ref], cpu)) == pytest.approx(last["eval/red/dino"], rel=1e-4)


@pytest.mark.slow
def test_report_ranks_runs_by_an_eval_metric(eval_run, tmp_path):
    """Catches a report that drops the eval columns or sorts a similarity ascending (best run last)."""
    import shutil

    from sdtune.report import report

    sweep = tmp_path / "sweep"
    for name, shift in (("0", 0.0), ("1", 0.5)):  # run 1: the same run with CLIP-I 0.5 higher and distance 0.5 larger
        shutil.copytree(eval_run, sweep / name)
        path = sweep / name / "summary.json"
        summary = json.loads(path.read_text())
        summary["eval"]["final"]["eval/clip_i"] += shift
        summary["eval"]["final"]["eval/latent_dist"] += shift
        path.write_text(json.dumps(summary))
    by_similarity = report(sweep, sort="eval/clip_i")
    assert [r["run"] for r in by_similarity] == ["1", "0"] and [r["rank"] for r in by_similarity] == [1, 2]
    assert [r["run"] for r in report(sweep, sort="eval/latent_dist")] == ["0", "1"]
    assert "eval/dino" in (sweep / "report.csv").read_text().splitlines()[0]


@pytest.mark.slow
def test_evaluating_does_not_change_what_is_trained(eval_run, tmp_path):
    """Catches an evaluation that disturbs training (the UNet left in eval mode, LoRA scale left
    set, shared scheduler or RNG state): the same run without ``eval`` ends with the same LoRA."""
    from safetensors.torch import load_file

    proc = run_cli(*TINY_RUN, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with_eval, without = load_file(eval_run / "lora.safetensors"), load_file(tmp_path / "run" / "lora.safetensors")
    assert with_eval.keys() == without.keys()
    assert all(torch.equal(with_eval[k], without[k]) for k in without)
    assert not (tmp_path / "run" / "eval").exists()


@pytest.mark.slow
def test_a_resumed_run_keeps_its_evaluation_history(eval_run, tmp_path):
    """Catches evaluation history lost on resume (summary.json would start at the resume step) and a
    resumed run scoring its trained LoRA again as a step-0 baseline: the history continues."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(eval_run, run)
    before = json.loads((run / "summary.json").read_text())["eval"]["history"]
    proc = run_cli(f"ckpt_path={run}", "trainer.max_steps=3", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((run / "summary.json").read_text())["eval"]["history"]
    assert [h["step"] for h in history] == [0, 1, 2, 3]
    assert history[:3] == before
    with open(run / "logs" / "csv" / "metrics.csv", newline="") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh) if r.get("eval/latent_dist")] == [0, 1, 2, 3]


@pytest.mark.slow
def test_an_optuna_search_maximises_an_eval_similarity(tmp_path, scorers, references):
    """Catches a sweep that minimises a similarity (Optuna's default direction): the best trial of
    a 3-trial search on eval/clip_i must be the trial with the highest CLIP-I."""
    import yaml

    folder = tmp_path / "search"
    proc = run_cli("-m", "hparams_search=optuna", *TINY_RUN, "trainer.max_steps=2", "hydra.sweeper.n_trials=3",
                   "hydra.sweeper.sampler.n_startup_trials=3", "optimized_metric=eval/clip_i", "eval.steps=2",
                   f"eval.prompts=[{{prompt: a red circle, references: [{references}], name: red}}]",
                   f"eval.clip_model={scorers['clip']}", f"hydra.sweep.dir={folder}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = yaml.safe_load((folder / "optimization_results.yaml").read_text())
    values = [json.loads((folder / str(i) / "summary.json").read_text())["eval"]["final"]["eval/clip_i"] for i in range(3)]
    assert len(set(values)) == 3, values  # the trials differ, so picking the maximum is a real choice
    assert result["best_value"] == pytest.approx(max(values))


@pytest.mark.slow
def test_with_no_interval_it_evaluates_at_each_validation(tmp_path, references):
    """Catches eval.every_n_steps=null evaluating only at the start and end (validation ignored) or
    twice at one step: 12 images in batches of 4 validate at steps 3 and 6 (the end)."""
    run = tmp_path / "run"
    proc = run_cli(*TINY_RUN, "trainer.max_steps=6", "data.val_images=2", "eval.steps=2",
                   f"eval.prompts=[{{prompt: a red circle, references: [{references}], name: red}}]", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert [h["step"] for h in summary["eval"]["history"]] == [0, 3, 6]
    assert "val/loss" in summary["final_metrics"] and "eval/red/latent_dist" in summary["final_metrics"]
