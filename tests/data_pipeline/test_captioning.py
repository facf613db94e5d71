"""Captioning and booru tagging in the data stage, with tiny random models run by the real data-juicer
executor: the caption the model wrote lands in its own row, existing captions stay byte for byte,
RAW never changes, a broken model is refused before any image is read, a killed run leaves OUT."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from data_pipeline.__main__ import main as cli_main
from data_pipeline.captioning import CAPTION_BY, combine
from data_pipeline.errors import USAGE_EXIT
from data_pipeline.ops.sdtune_image_captioner import FLORENCE_TASKS, SdtuneImageCaptioner, florence_task
from data_pipeline.ops.sdtune_image_tagger import SdtuneImageTagger, preprocess
from sdtune.data.images import load_rgb
from tests.helpers.captioners import TAGS, build_blip, build_florence, build_llava, build_wd14, wd14_probs
from tests.helpers.files import SMALL_OK, listing, read_csv, recipe
from tests.helpers.images import add, textured
from tests.helpers.paths import ROOT

COLOURS = [(255, 0, 0), (0, 0, 255), (0, 200, 0), (20, 20, 20), (250, 250, 0)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioners")
    return {"blip": build_blip(root / "blip"), "wd14": build_wd14(root / "wd14")}


def run_stage(raw: Path, out: Path, tmp_path: Path, *args: str) -> int:
    return cli_main([str(raw), str(out), "--recipe", str(recipe(tmp_path, "ok.yaml", SMALL_OK)), "--np", "1", *args])


def blip_reference(folder: Path, paths: list[Path], max_new_tokens: int, num_beams: int = 3) -> list[str]:
    """What transformers itself generates for each image alone: beam search, no sampling."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(folder)
    model = BlipForConditionalGeneration.from_pretrained(folder).eval()
    captions = []
    for path in paths:
        with Image.open(path) as image:
            inputs = processor(images=image.convert("RGB"), return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
        captions.append(processor.decode(ids[0], skip_special_tokens=True).strip())
    return captions


def expected_tags(image: Image.Image, general=0.35, character=0.85) -> str:
    """The tags the tiny tagger's probabilities put above the thresholds, highest first, ratings never."""
    probs = wd14_probs(image)
    cats = dict(TAGS)
    chosen = [(p, n) for n, p in probs.items() if (cats[n] == 0 and p > general) or (cats[n] == 4 and p > character)]
    return ", ".join(n if n == "^_^" else n.replace("_", " ") for _, n in sorted(chosen, key=lambda pn: -pn[0]))


def test_acceptance_five_uncaptioned_images_get_the_models_captions(models, tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    for i in range(5):
        add(raw, f"img{i}.png", textured(i, 48 + 8 * i, 40), None)
    before = listing(raw, with_mtime=True)

    assert run_stage(raw, out, tmp_path, "--caption", str(models["blip"]), "--caption-max-tokens", "10") == 0

    assert listing(raw, with_mtime=True) == before  # bytes, mtimes, and no new file under RAW
    rows = {r["file_name"]: r["text"] for r in read_csv(out / "metadata.csv")}
    refs = blip_reference(models["blip"], [raw / f"img{i}.png" for i in range(5)], 10)
    expected = {f"images/img{i}.png": caption for i, caption in enumerate(refs)}
    assert rows == expected
    assert len(set(expected.values())) > 1  # the images get different captions: rows cannot be swapped unseen
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    caps = report["captions"]
    assert caps["files"] == {f: str(models["blip"]) for f in expected}
    assert (caps["written"], caps["kept"], caps["ops"][0]["mode"]) == (5, 0, "missing")
    assert report["counts"]["uncaptioned"] == 0
    captured = capsys.readouterr()
    assert f"5 written by {models['blip']}" in captured.out
    assert "captioning (blip)" in captured.err and "sdtune_image_captioner_process" not in captured.err
    assert "have no caption" not in captured.err  # the warning counts after captioning


def test_missing_mode_keeps_existing_captions_and_tags_only_the_empty(models, tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    existing = {"c0.png": 'ohwx, a "quoted", caption; ünïcode', "c1.png": "x" * 300, "c2.png": "tiny"}
    for n, (name, text) in enumerate(existing.items()):
        add(raw, name, Image.new("RGB", (40, 36), COLOURS[n]), text)
    add(raw, "e0.png", Image.new("RGB", (40, 36), COLOURS[3]), None)
    add(raw, "e1.png", Image.new("RGB", (36, 50), COLOURS[4]), "   ")  # whitespace only counts as empty
    before = listing(raw, with_mtime=True)

    assert run_stage(raw, out, tmp_path, "--caption", str(models["wd14"]), "--trigger", "ohwx") == 0

    assert listing(raw, with_mtime=True) == before
    rows = {r["file_name"]: r["text"] for r in read_csv(out / "metadata.csv")}
    for name in existing:
        assert rows[f"images/{name}"] == (raw / name).with_suffix(".txt").read_text(encoding="utf-8")
    for name in ("e0.png", "e1.png"):
        with Image.open(raw / name) as image:
            assert rows[f"images/{name}"] == "ohwx, " + expected_tags(image.convert("RGB"))
    assert "hatsune miku" in rows["images/e1.png"] and "red eyes" in rows["images/e0.png"]  # both categories
    assert "hatsune miku" not in rows["images/e0.png"]  # 0.62: above general_threshold, below character's
    caps = json.loads((out / "report.json").read_text(encoding="utf-8"))["captions"]
    assert caps["files"] == {"images/e0.png": str(models["wd14"]), "images/e1.png": str(models["wd14"])}
    assert (caps["written"], caps["kept"]) == (2, 3)


def test_the_tagger_sees_transparency_on_white_as_training_does(models, tmp_path):
    """Catches data-juicer's load_image (RGB convert: transparent pixels black) feeding the tagger."""
    path = tmp_path / "cutout.png"
    cutout = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    cutout.paste(Image.new("RGBA", (20, 20), (200, 30, 30, 255)), (10, 10))
    cutout.save(path)
    fed = preprocess(load_rgb(str(path)), 16)
    assert fed.shape == (16, 16, 3) and (fed[0, 0] == 255).all()  # the corner the model sees is white
    on_white = Image.alpha_composite(Image.new("RGBA", (40, 40), (255, 255, 255, 255)), cutout).convert("RGB")
    assert expected_tags(on_white) != expected_tags(cutout.convert("RGB"))  # black corners would tag otherwise
    op = SdtuneImageTagger(model=str(models["wd14"]))
    out = op.process_batched({"text": [""], "images": [[str(path)]]})
    assert out["text"] == [expected_tags(on_white)] and out[CAPTION_BY] == [str(models["wd14"])]


def test_the_captioner_sees_transparency_on_white_as_training_does(models, tmp_path):
    """Catches data-juicer's load_image (transparent pixels black) feeding the captioner: the caption of a
    cut-out is the caption of the same picture on white."""
    cutout = Image.new("RGBA", (48, 40), (0, 0, 0, 0))
    cutout.paste(Image.new("RGBA", (24, 20), (200, 30, 30, 255)), (12, 10))
    cutout.save(tmp_path / "cutout.png")
    white = Image.alpha_composite(Image.new("RGBA", cutout.size, (255, 255, 255, 255)), cutout).convert("RGB")
    white.save(tmp_path / "white.png")
    cutout.convert("RGB").save(tmp_path / "black.png")
    on_white, on_black = blip_reference(models["blip"], [tmp_path / "white.png", tmp_path / "black.png"], 8)
    assert on_white != on_black  # the tiny model tells the two apart, so the check below means something
    op = SdtuneImageCaptioner(model=str(models["blip"]), max_new_tokens=8)
    out = op.process_batched({"text": [""], "images": [[str(tmp_path / "cutout.png")]]})
    assert out["text"] == [on_white]


def test_modes_and_trigger_as_documented():
    assert combine("a dog", "a cat", "replace", None) == "a cat"
    assert combine("a dog", "a cat", "prefix", None) == "a dog, a cat"
    assert combine("", "a cat", "prefix", "ohwx") == "ohwx, a cat"
    assert combine("a dog", "a cat", "prefix", "ohwx") == "ohwx, a dog, a cat"
    assert combine("", "ohwx on a beach", "missing", "ohwx") == "ohwx on a beach"  # already starts with it


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["replace", "prefix"])
def test_replace_and_prefix_modes_in_the_stage(models, tmp_path, mode):
    raw, out = tmp_path / "raw", tmp_path / "out"
    add(raw, "a.png", Image.new("RGB", (40, 36), COLOURS[0]), "my own caption")
    add(raw, "b.png", Image.new("RGB", (40, 36), COLOURS[1]), None)
    assert run_stage(raw, out, tmp_path, "--caption", str(models["wd14"]), "--caption-mode", mode) == 0
    rows = {r["file_name"]: r["text"] for r in read_csv(out / "metadata.csv")}
    tags = {n: expected_tags(Image.new("RGB", (40, 36), COLOURS[i])) for i, n in enumerate("ab")}
    own = "my own caption, " if mode == "prefix" else ""
    assert rows == {"images/a.png": own + tags["a"], "images/b.png": tags["b"]}


def vlm_reference(folder: Path, path: Path, prompt: str, max_new_tokens: int) -> tuple[str, str]:
    """(new tokens only, whole sequence) as transformers decodes them for one image and one chat turn."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(folder)
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    with Image.open(path) as image:
        inputs = processor(images=[image.convert("RGB")], text=[text], return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=3, do_sample=False)
    new = processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return new, processor.decode(ids[0], skip_special_tokens=True).strip()


@pytest.mark.slow
def test_chat_vlm_writes_only_the_new_tokens(tmp_path):
    model = build_llava(tmp_path / "llava")
    raw, out = tmp_path / "raw", tmp_path / "out"
    for i in range(3):
        add(raw, f"v{i}.png", textured(10 + i, 48, 40 + 4 * i), None)
    prompt = "describe this image in one detailed sentence"
    args = ("--caption", str(model), "--caption-prompt", prompt, "--caption-max-tokens", "8", "--caption-batch", "2")
    assert run_stage(raw, out, tmp_path, *args) == 0
    rows = {r["file_name"]: r["text"] for r in read_csv(out / "metadata.csv")}
    for i in range(3):
        new, whole = vlm_reference(model, raw / f"v{i}.png", prompt, 8)
        assert rows[f"images/v{i}.png"] == new and whole.startswith(prompt) and not new.startswith(prompt)


def florence_reference(folder: Path, paths: list[Path], task: str, max_new_tokens: int) -> list[str]:
    """What transformers' Florence-2 writes for each image alone, the task token as the prompt."""
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(folder)
    model = Florence2ForConditionalGeneration.from_pretrained(folder).eval()
    captions = []
    for path in paths:
        with Image.open(path) as image:
            inputs = processor(images=image.convert("RGB"), text=task, return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=3, do_sample=False)
        captions.append(processor.decode(ids[0], skip_special_tokens=True).strip())
    return captions


@pytest.mark.slow
def test_florence2_writes_its_detailed_caption_without_the_task_prompt(tmp_path):
    model = build_florence(tmp_path / "florence")
    raw, out = tmp_path / "raw", tmp_path / "out"
    paths = [add(raw, f"f{i}.png", textured(20 + i, 48, 40 + 4 * i), None) for i in range(4)]
    args = ("--caption", str(model), "--caption-max-tokens", "12", "--caption-batch", "3")  # 2 batches, 1 partial
    assert run_stage(raw, out, tmp_path, *args) == 0
    rows = {r["file_name"]: r["text"] for r in read_csv(out / "metadata.csv")}
    refs = florence_reference(model, paths, "<DETAILED_CAPTION>", 12)  # the default task
    assert rows == {f"images/f{i}.png": ref for i, ref in enumerate(refs)}
    assert all(refs) and len(set(refs)) > 1  # written, and different per image: rows cannot be swapped unseen
    assert florence_reference(model, paths, "<CAPTION>", 12) != refs  # the task token reaches the model
    assert not any("Describe" in r or "<" in r for r in rows.values())  # no prompt, no task token
    files = json.loads((out / "report.json").read_text(encoding="utf-8"))["captions"]["files"]
    assert files == dict.fromkeys(rows, str(model))


def test_florence_prompt_must_be_a_caption_task():
    assert florence_task(None) == "<DETAILED_CAPTION>" and florence_task("<CAPTION>") == "<CAPTION>"
    with pytest.raises(ValueError, match=r"prompt='<OD>' is not a Florence-2 caption task. Fix: use one of") as err:
        florence_task("<OD>")
    assert all(task in str(err.value) for task in FLORENCE_TASKS)


@pytest.mark.parametrize("broken", ["missing", "no weights", "bad config", "tagger without csv", "tagger without onnx"])
def test_broken_model_is_refused_before_any_image_is_read(models, tmp_path, capsys, broken):
    raw, out = tmp_path / "raw", tmp_path / "out"
    add(raw, "a.png", textured(1, 40, 40), None)
    model = tmp_path / "model"
    if broken == "no weights":
        model.mkdir()
        (model / "config.json").write_text((models["blip"] / "config.json").read_text())
    elif broken == "bad config":
        model.mkdir()
        (model / "config.json").write_text("{not json")
    elif broken.startswith("tagger"):  # one of its two files is enough to be taken for a tagger
        model.mkdir()
        keep = "model.onnx" if broken == "tagger without csv" else "selected_tags.csv"
        (model / keep).write_bytes((models["wd14"] / keep).read_bytes())
    assert run_stage(raw, out, tmp_path, "--caption", str(model)) == USAGE_EXIT
    err = capsys.readouterr().err
    op = "sdtune_image_tagger" if broken.startswith("tagger") else "sdtune_image_captioner"
    assert f"{op}.model={str(model)!r}" in err and "Fix:" in err
    if broken.startswith("tagger"):
        missing = "selected_tags.csv" if broken == "tagger without csv" else "model.onnx"
        assert f"has no {missing}. Fix: give a WD14 tagger folder" in err
    assert "pre-check" not in err and not out.exists()  # no image was opened, OUT was not created


def test_caption_knobs_without_a_captioner_are_refused(models, tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    add(raw, "a.png", textured(1, 40, 40), None)
    assert run_stage(raw, out, tmp_path, "--trigger", "ohwx") == USAGE_EXIT
    assert "--trigger given without --caption" in capsys.readouterr().err
    assert run_stage(raw, out, tmp_path, "--caption", str(models["wd14"]), "--caption-prompt", "hi") == USAGE_EXIT
    assert "is a WD14 tagger" in capsys.readouterr().err and not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the stage's lifeline is Linux-only")
def test_run_killed_while_captioning_leaves_out_as_it_was(models, tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    for i in range(40):
        add(raw, f"img{i:02}.png", textured(i, 40, 40), None)
    args = [sys.executable, "-m", "data_pipeline", str(raw), str(out), "--recipe",
            str(recipe(tmp_path, "ok.yaml", SMALL_OK)), "--np", "1", "--caption", str(models["blip"])]  # fmt: skip
    assert subprocess.run([*args, "--caption-max-tokens", "2"], cwd=ROOT, capture_output=True).returncode == 0
    previous = listing(out, with_mtime=True)
    proc = subprocess.Popen([*args, "--caption-mode", "replace", "--caption-max-tokens", "60", "--caption-batch", "1"],
                            cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)  # fmt: skip
    seen = b""
    while not re.search(rb"captioning \(blip\):[^\r\n]*\b[1-9]\d*/40 \[", seen):  # an image done, not 0/40
        chunk = proc.stderr.read1(4096)
        assert chunk, seen.decode(errors="replace")[-2000:]
        seen += chunk
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    deadline = time.monotonic() + 10
    while any(p.name.startswith(".out.") for p in tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []
    assert listing(out, with_mtime=True) == previous
