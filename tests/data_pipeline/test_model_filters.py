"""The model-based filters of `make data`: aesthetics, NSFW, watermark and image-text match.

Each model is a tiny random one built with the real transformers classes (tests/helpers/scorers.py)
and run by the real data-juicer operators inside the stage. The test scores every image itself,
straight from the models, puts each threshold between two of the measured values, and expects
exactly the images on the wrong side of it in dropped.csv, with the value.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from data_pipeline.__main__ import main as cli_main
from data_pipeline.errors import PipelineError
from data_pipeline.recipe import load_recipe, validate_recipe
from sdtune.evaluation.aesthetics import AestheticScorer
from tests.helpers.files import read_csv, recipe, snapshot
from tests.helpers.images import add, textured
from tests.helpers.scorers import build_aesthetic, build_blip_itm, build_classifier

CAPTIONS = ["a red circle", "a photo of the cat", "a blue square on the background", "the dog", "a green circle",
            "a photo of a red square", "the cat on a blue background", "a dog", "green", None]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scorers")
    return {"aes": build_aesthetic(root / "aes"), "nsfw": build_classifier(root / "nsfw", "nsfw", seed=1),
            "wm": build_classifier(root / "wm", "watermark", seed=2), "itm": build_blip_itm(root / "itm")}


def _classifier_scores(folder: Path, images: list[Image.Image]) -> list[float]:
    from transformers import AutoProcessor, ViTForImageClassification

    model, proc = ViTForImageClassification.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
    with torch.no_grad():
        return [float(torch.softmax(model(**proc(images=[im], return_tensors="pt")).logits, -1)[0, 1]) for im in images]


def _match_scores(folder: Path, images: list[Image.Image], captions: list[str | None]) -> list[float | None]:
    from transformers import AutoProcessor, BlipForImageTextRetrieval

    model, proc = BlipForImageTextRetrieval.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
    out: list[float | None] = []
    for im, text in zip(images, captions):
        if not text:
            out.append(None)
            continue
        inputs = proc(text=text, images=im, return_tensors="pt", truncation=True, padding=True, max_length=40)
        with torch.no_grad():
            out.append(float(model(**inputs).itm_score.softmax(-1)[0, 1]))
    return out


def _between(values: list[float], k: int) -> float:
    """A round threshold strictly between the k-th and (k+1)-th smallest of ``values``."""
    lo, hi = sorted(values)[k - 1 : k + 1]
    for digits in range(2, 9):
        t = round((lo + hi) / 2, digits)
        if lo < t < hi:
            return t
    raise AssertionError(f"values too close: {lo} {hi}")


def test_each_filter_drops_exactly_the_images_past_its_threshold_with_the_value(models, tmp_path):
    """Acceptance 3 (and NSFW, watermark, match): one stage run with all four filters. Catches a
    threshold on another scale (data-juicer's aesthetics /10), a filter that keeps everything (the
    data-juicer ITM op on captions without its image token), values not in dropped.csv, a sample
    without caption dropped by the match filter, and RAW touched."""
    raw = tmp_path / "raw"
    names = [f"img{i}.png" for i in range(len(CAPTIONS))]
    for i, (name, caption) in enumerate(zip(names, CAPTIONS)):
        add(raw, name, textured(10 + i, 64, 64), caption)
    before = snapshot(raw)
    images = [Image.open(raw / n).convert("RGB") for n in names]
    aes = [float(AestheticScorer(models["aes"]).scores([im])[0]) for im in images]
    nsfw, wm = _classifier_scores(models["nsfw"], images), _classifier_scores(models["wm"], images)
    itm = _match_scores(models["itm"], images, CAPTIONS)

    min_aes = _between(aes, 2)  # the two lowest aesthetic scores go
    left = [i for i in range(len(names)) if aes[i] >= min_aes]
    max_nsfw = _between([nsfw[i] for i in left], len(left) - 1)  # the highest NSFW score of the rest goes
    left = [i for i in left if nsfw[i] <= max_nsfw]
    max_wm = _between([wm[i] for i in left], len(left) - 1)
    left = [i for i in left if wm[i] <= max_wm]
    min_itm = _between([itm[i] for i in left if itm[i] is not None], 1)  # the worst-matching caption goes
    expected = {}
    for i, name in enumerate(names):
        if aes[i] < min_aes:
            expected[name] = f"sdtune_aesthetics_filter: aesthetic score {aes[i]:.4g} is below min {min_aes}"
        elif nsfw[i] > max_nsfw:
            expected[name] = f"image_nsfw_filter: NSFW score {nsfw[i]:.4g} is above max {max_nsfw}"
        elif wm[i] > max_wm:
            expected[name] = f"image_watermark_filter: watermark probability {wm[i]:.4g} is above max {max_wm}"
        elif itm[i] is not None and itm[i] < min_itm:
            expected[name] = f"sdtune_image_text_matching_filter: image-text match score {itm[i]:.4g} is below min {min_itm}"
    assert names[-1] not in expected, "pick seeds whose uncaptioned image reaches the match filter"
    text = (f"process:\n  - sdtune_aesthetics_filter:\n      model: {models['aes']}\n      min_score: {min_aes}\n"
            f"  - image_nsfw_filter:\n      hf_nsfw_model: {models['nsfw']}\n      max_score: {max_nsfw}\n"
            f"  - image_watermark_filter:\n      hf_watermark_model: {models['wm']}\n      prob_threshold: {max_wm}\n"
            f"  - sdtune_image_text_matching_filter:\n      hf_blip: {models['itm']}\n      min_score: {min_itm}\n")
    out = tmp_path / "out"
    assert cli_main([str(raw), str(out), "--recipe", str(recipe(tmp_path, "models.yaml", text)), "--np", "1"]) == 0

    assert {r["file"]: r["reason"] for r in read_csv(out / "dropped.csv")} == expected
    kept = {r["file_name"]: r["text"] for r in read_csv(out / "metadata.csv")}
    assert kept == {f"images/{n}": CAPTIONS[i] or "" for i, n in enumerate(names) if n not in expected}
    assert f"images/{names[-1]}" in kept  # no caption: nothing to match, kept
    assert snapshot(raw) == before


@pytest.mark.parametrize("op, param, ours", [("image_aesthetics_filter", "hf_scorer_model", "sdtune_aesthetics_filter"),
                                             ("image_text_matching_filter", "hf_blip", "sdtune_image_text_matching_filter"),
                                             ("image_captioning_mapper", "hf_img2seq", "sdtune_image_captioner"),
                                             ("mllm_mapper", "hf_model", "sdtune_image_captioner")])
def test_data_juicers_own_aesthetics_matching_and_captioning_ops_are_refused_naming_ours(models, tmp_path, op, param, ours):
    """Catches a recipe that would pip-install simple-aesthetics-predictor, a match filter that scores nothing,
    or a data-juicer captioner whose captions never reach OUT (or reach it as an echoed chat transcript)."""
    path = recipe(tmp_path, "r.yaml", f"process:\n  - {op}:\n      {param}: {models['itm']}\n")
    with pytest.raises(PipelineError) as err:
        validate_recipe(load_recipe(path), path)
    assert f"{path}: process entry 1 is data-juicer's {op}" in str(err.value)
    assert f"Fix: use {ours}" in str(err.value)


def test_a_bad_predictor_folder_is_refused_before_any_image_is_read(models, tmp_path):
    """Catches a CLIP folder without an aesthetic head, a Hub id or a missing folder reaching the run."""
    for value, what in [(models["nsfw"], "is no CLIP vision predictor (config.json model_type 'vit'"),
                        ("shunk031/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE", "is not a local folder"),
                        (tmp_path / "missing", "does not exist")]:
        path = recipe(tmp_path, "r.yaml", f"process:\n  - sdtune_aesthetics_filter:\n      model: {value}\n")
        with pytest.raises(PipelineError) as err:
            validate_recipe(load_recipe(path), path)
        assert f"sdtune_aesthetics_filter.model='{value}' {what}" in str(err.value)
        assert "Fix: give a local LAION aesthetic predictor folder" in str(err.value)


def test_the_shipped_examples_name_real_ops_and_params(models, tmp_path):
    """Catches a commented example in recipes/models.yaml with a wrong op or parameter name: uncommented,
    with the tiny models as its folders, it passes the stage's recipe check."""
    shipped = Path(__file__).resolve().parents[2] / "data_pipeline" / "recipes" / "models.yaml"
    validate_recipe(load_recipe(shipped), shipped)
    lines = [line.replace("  # ", "  ", 1) if line.startswith(("  # - ", "  #     ")) else line
             for line in shipped.read_text(encoding="utf-8").splitlines()]
    text = "\n".join(lines)
    for placeholder, key in [("models/aesthetic", "aes"), ("models/nsfw_image_detection", "nsfw"),
                             ("models/watermark_detector", "wm"), ("models/blip-itm-base-coco", "itm")]:
        text = text.replace(f": {placeholder}\n", f": {models[key]}\n")
    path = recipe(tmp_path, "uncommented.yaml", text + "\n")
    ops = [next(iter(item)) for item in load_recipe(path)["process"]]
    assert ops == ["image_shape_filter", "sdtune_aesthetics_filter", "image_nsfw_filter", "image_watermark_filter",
                   "sdtune_image_text_matching_filter"]
    validate_recipe(load_recipe(path), path)


def test_a_pickle_only_predictor_needs_the_recipes_allow_pickle(models, tmp_path):
    """Catches a predictor folder holding only pytorch_model.bin passing the check (data-juicer then
    dropped every image with a wrong fix), and an allow_pickle that does not reach the loader."""
    from data_juicer.utils.model_utils import get_model

    from data_pipeline.ops import SdtuneAestheticsFilter
    from sdtune.evaluation.aesthetics import HEADS

    folder = tmp_path / "aes_bin"
    model = HEADS["AestheticsPredictorV2Linear"].from_pretrained(models["aes"])
    model.save_pretrained(folder)  # then as the published predictor folders: pytorch_model.bin only
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    (folder / "preprocessor_config.json").write_bytes((models["aes"] / "preprocessor_config.json").read_bytes())
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "preprocessor_config.json", "pytorch_model.bin"]
    path = recipe(tmp_path, "r.yaml", f"process:\n  - sdtune_aesthetics_filter:\n      model: {folder}\n")
    with pytest.raises(PipelineError) as err:
        validate_recipe(load_recipe(path), path)
    assert (f"recipe {path}: sdtune_aesthetics_filter.model='{folder}' is a model folder whose weights are only "
            "pickles (pytorch_model.bin)") in str(err.value)
    assert "Fix: set `allow_pickle: true` on sdtune_aesthetics_filter in the recipe if you trust the file, or " \
           "convert the weights to safetensors" in str(err.value)
    assert "model.allow_pickle" not in str(err.value)  # training's switch, not the stage's
    path.write_text(path.read_text() + "      allow_pickle: true\n")
    validate_recipe(load_recipe(path), path)
    loaded, _ = get_model(SdtuneAestheticsFilter(model=str(folder), allow_pickle=True).model_key)
    pixels = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(pixel_values=pixels).logits, model.eval()(pixel_values=pixels).logits, atol=1e-5)
