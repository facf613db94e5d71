"""The LAION aesthetic predictor (sdtune.evaluation.aesthetics) and ``eval.aesthetic_model``.

The predictors are tiny random ones in simple-aesthetics-predictor's layout (tests/helpers/scorers.py).
That package cannot be installed here (transformers < 5), so its forward pass is written out below
from plain transformers and torch.nn, as its source defines it, and the two must agree.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from sdtune.evaluation.aesthetics import AestheticScorer, load_predictor
from sdtune.evaluation.config import check_optimized_metric, parse_eval
from sdtune.run.checks import validate
from sdtune.toy.domain import Scene, render
from sdtune.utils.errors import ConfigError
from sdtune.utils.metrics import higher_is_better, sweep_direction
from tests.helpers.cli import run_cli
from tests.helpers.config import compose_cfg
from tests.helpers.scorers import build_aesthetic, build_classifier

ARCHS = ("AestheticsPredictorV1", "AestheticsPredictorV2Linear", "AestheticsPredictorV2ReLU")
IMAGES = [render(Scene("circle", "red", "blue")), render(Scene("square", "yellow", "black")),
          render(Scene("circle", "green", "white"))]


@pytest.fixture(scope="module")
def predictors(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("aesthetic")
    return {arch: build_aesthetic(root / arch, arch, seed=i) for i, arch in enumerate(ARCHS)}


def _reference_head(arch: str, dim: int) -> nn.Sequential:
    """simple-aesthetics-predictor 0.1.2's heads, layer for layer."""
    if arch == "AestheticsPredictorV1":
        return nn.Sequential(nn.Linear(dim, 1))
    if arch == "AestheticsPredictorV2Linear":
        return nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                             nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    return nn.Sequential(nn.Linear(dim, 1024), nn.ReLU(), nn.Dropout(0.2), nn.Linear(1024, 128), nn.ReLU(),
                         nn.Dropout(0.2), nn.Linear(128, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 16),
                         nn.ReLU(), nn.Linear(16, 1))


@pytest.mark.parametrize("arch", ARCHS)
def test_scores_equal_the_packages_forward_and_the_keys_match_shunk031s_layout(predictors, arch):
    """Catches a head on the wrong embedding (unprojected or not L2-normalised), a wrong layer order,
    a score rescaled (data-juicer divides by ten) and parameter names a downloaded folder would not fill."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    folder = predictors[arch]
    config = json.loads((folder / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("clip_vision_model", [arch])
    tower = CLIPVisionModelWithProjection.from_pretrained(folder).eval()
    weights = load_file(folder / "model.safetensors")
    head = _reference_head(arch, config["projection_dim"]).eval()
    # V1 names its one Linear "predictor", V2 its Sequential "layers"
    names = {f"layers.{k}": k for k in head.state_dict()} if "V2" in arch else {"predictor.weight": "0.weight",
                                                                               "predictor.bias": "0.bias"}
    head.load_state_dict({ours: weights[theirs] for theirs, ours in names.items()})
    # the shunk031 layout: the CLIP tower's own names plus the head's, nothing else
    assert set(weights) == set(tower.state_dict()) | set(names)
    pixels = CLIPImageProcessor.from_pretrained(folder)(images=IMAGES, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embeds = tower(pixel_values=pixels).image_embeds
        expected = head(embeds / embeds.norm(dim=-1, keepdim=True))[:, 0]
    ours = AestheticScorer(folder).scores(IMAGES)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    assert ours.std() > 0.01  # the images get different scores, so the comparison means something


def test_the_head_comes_from_the_config_or_the_weights_never_the_folder_name(predictors, tmp_path):
    """Catches data-juicer's rule (v1/v2/linear/relu read from the path): a ReLU head in a folder named
    '...-v2-...-linearMSE', and a config without architectures, still load the right head."""
    misnamed = tmp_path / "aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE"
    shutil.copytree(predictors["AestheticsPredictorV2ReLU"], misnamed)
    assert type(load_predictor(misnamed, key="k")[0]).__name__ == "AestheticsPredictorV2ReLU"
    bare = tmp_path / "v2-linear"
    shutil.copytree(predictors["AestheticsPredictorV1"], bare)
    config = json.loads((bare / "config.json").read_text())
    del config["architectures"]
    (bare / "config.json").write_text(json.dumps(config))
    assert type(load_predictor(bare, key="k")[0]).__name__ == "AestheticsPredictorV1"


def test_a_prompt_without_references_is_evaluated_by_the_aesthetic_score_alone(predictors):
    """Catches the rule 'no references and no CLIP: nothing measured' refusing an aesthetic-only prompt,
    and eval/aesthetic missing from the metrics an optimized_metric may name."""
    spec = parse_eval({"prompts": ["a red circle"], "seeds": [0], "steps": 2,
                       "aesthetic_model": str(predictors["AestheticsPredictorV2Linear"])})
    assert spec.metrics() == {"eval/aesthetic"}
    check_optimized_metric("eval/aesthetic", spec)
    check_optimized_metric("eval/a_red_circle/aesthetic", spec)
    assert higher_is_better("eval/aesthetic") and sweep_direction("eval/a_red_circle/aesthetic") == "maximize"


def test_a_bad_predictor_folder_is_refused_with_the_key_and_the_fix(predictors, tmp_path):
    """Catches a CLIP or classifier folder (no aesthetic head) or a missing folder failing only mid-run."""
    classifier = build_classifier(tmp_path / "vit")
    for value, message in [("/nonexistent", "eval.aesthetic_model=/nonexistent: /nonexistent is no local aesthetic predictor folder"),
                           (classifier, f"eval.aesthetic_model={classifier}: the folder is no CLIP vision predictor")]:
        with pytest.raises(ConfigError) as err:
            validate(compose_cfg("model=tiny", "data.root=/tmp", "eval.prompts=[a red circle]", f"eval.aesthetic_model={value}"))
        assert message in str(err.value) and "Fix:" in str(err.value)


TINY_RUN = ("experiment=quickstart", "model=tiny", "trainer.max_steps=2", "callbacks.samples=null",
            "callbacks.concept_probe=null", "data.val_images=0", "eval.every_n_steps=1", "eval.steps=2",
            "eval.prompts=[{prompt: a red circle, name: red}]")


@pytest.mark.slow
def test_eval_logs_the_aesthetic_score_of_each_evaluations_images_and_the_report_ranks_by_it(predictors, tmp_path):
    """Acceptance 4. Catches eval/aesthetic missing from metrics.csv or summary.json, a number that is not
    the predictor's mean over the images that evaluation rendered, and a report sorting it ascending."""
    model = predictors["AestheticsPredictorV2Linear"]
    sweep = tmp_path / "sweep"
    for name, seeds in (("0", "[0,1]"), ("1", "[2,3]")):  # two real runs; other seeds, other images, other scores
        proc = run_cli(*TINY_RUN, f"eval.seeds={seeds}", f"eval.aesthetic_model={model}", f"hydra.run.dir={sweep / name}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    run = sweep / "0"
    with open(run / "logs" / "csv" / "metrics.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("eval/aesthetic")]
    summary = json.loads((run / "summary.json").read_text())
    history = summary["eval"]["history"]
    assert [int(r["step"]) for r in rows] == [h["step"] for h in history] == [0, 1, 2]
    assert [float(r["eval/aesthetic"]) for r in rows] == pytest.approx([h["eval/aesthetic"] for h in history])
    assert summary["final_metrics"]["eval/aesthetic"] == pytest.approx(history[-1]["eval/aesthetic"])
    scorer = AestheticScorer(model)
    for h in history:
        images = [Image.open(run / "eval" / f"step{h['step']:06d}" / f"red_seed{s}.png").convert("RGB") for s in (0, 1)]
        assert float(scorer.scores(images).mean()) == pytest.approx(h["eval/aesthetic"], abs=1e-5)
        assert h["eval/red/aesthetic"] == h["eval/aesthetic"]  # one prompt: the mean over prompts is its own

    from sdtune.report import report

    finals = {n: json.loads((sweep / n / "summary.json").read_text())["eval"]["final"]["eval/aesthetic"] for n in "01"}
    assert finals["0"] != finals["1"]
    ranked = report(sweep, sort="eval/aesthetic")
    assert [r["run"] for r in ranked] == sorted(finals, key=finals.get, reverse=True)  # highest first
