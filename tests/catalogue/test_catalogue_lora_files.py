"""Catalogue, LoRA files and checkpoints: nothing lost, nothing silently wrong.

NaN/Inf weights, files that are not what their name says, forged or garbled header values, headers
that contradict their tensors, an ``--out`` that cannot be written, and LoRA paths that are not
LoRA files. Each case gives our one error (``LoraFileError``; exit 2 from a CLI) naming the file,
key or value and the fix, and leaves every file the user gave us byte for byte as it was.

Fixtures are small: LoRA files are written with safetensors directly (so a broken one can be
written at all), with layers for exactly the tiny SD1.5 UNet's ``to_q``/``to_out.0`` modules, and
checkpoints are plain ``torch.save`` dicts of the shape Lightning writes for sdtune.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import save_file

from sdtune import export
from sdtune.families.builder import build_parts
from sdtune.generate import generate
from sdtune.inference.loading import LoraRef, apply_loras
from sdtune.lora.checks import check_finite
from sdtune.lora.files import LoraHeader, read_lora, save_lora
from sdtune.lora.keys import peft_to_diffusers, peft_to_kohya
from sdtune.lora.layers import LoraSpec
from sdtune.merge import merge
from sdtune.utils.errors import LoraFileError
from tests.helpers.cli import run_cli
from tests.helpers.paths import QUICKSTART, ROOT

TARGETS = ("to_q", "to_out.0")
SPEC = LoraSpec(rank=4, alpha=8.0, targets=TARGETS)
PNG = QUICKSTART / "images" / "sks_00_red_circle.png"


class RunsCodeWhenUnpickled:
    """What a malicious .ckpt carries: unpickling it would call a function of the attacker's choice."""

    def __reduce__(self):
        return (print, ("this would have run arbitrary code",))


def snapshot(*paths: Path) -> dict[str, str]:
    """sha256 of every file at or under ``paths``: compared before/after to prove nothing changed."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")) if p.is_dir() else []) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _compose(name: str, *overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.fixture(scope="module")
def peft_tensors(tiny_sd15) -> dict[str, torch.Tensor]:
    """Finite rank-4 LoRA weights for every to_q/to_out.0 layer of the tiny SD1.5 UNet (built on meta)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(tiny_sd15), subfolder="unet"))
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in TARGETS):
            out[f"{name}.lora_A.weight"] = torch.randn(SPEC.rank, m.in_features, generator=g) * 0.1
            out[f"{name}.lora_B.weight"] = torch.randn(m.out_features, SPEC.rank, generator=g) * 0.1
    assert len(out) >= 4
    return out


@pytest.fixture(scope="module")
def tiny_parts(tiny_sd15):
    """The tiny SD1.5 base model, loaded once; the cases here never get as far as changing it."""
    return build_parts({"family": "sd15", "path": str(tiny_sd15)})


def _header(tiny_sd15, spec: LoraSpec = SPEC) -> LoraHeader:
    cfg = {"model": {"family": "sd15", "path": str(tiny_sd15), "tiny": True, "resolution": 64}}
    return LoraHeader(spec, family="sd15", base_model="tiny", base_model_version="sd_v1", resolution=64, config=cfg)


def _meta(tiny_sd15, spec: LoraSpec = SPEC) -> dict[str, str]:
    """The header of a diffusers-format file as strings, for tests that edit it before writing."""
    return _header(tiny_sd15, spec).metadata("diffusers")


def write_lora(path: Path, tensors, meta, fmt: str = "diffusers") -> Path:
    """Write peft-named ``tensors`` with safetensors itself (save_lora would refuse the broken ones)."""
    meta = dict(meta)
    if fmt == "kohya":
        on_disk = peft_to_kohya(tensors, json.loads(meta["lora_adapter_metadata"])["unet.lora_alpha"], "sd15")
        meta.pop("lora_adapter_metadata", None)
        meta["sdtune.format"] = "kohya"
    else:
        on_disk = peft_to_diffusers(tensors)
    save_file({k: v.contiguous() for k, v in on_disk.items()}, str(path), metadata=meta)
    return path


def with_nonfinite(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Two up weights broken: 5 NaN in one, 2 Inf in another (7 non-finite values in 2 tensors)."""
    out = {k: v.clone() for k, v in tensors.items()}
    ups = sorted(k for k in out if k.endswith("lora_B.weight"))
    out[ups[0]][0, :4] = float("nan")
    out[ups[0]][1, 0] = float("nan")
    out[ups[1]][2, :2] = float("inf")
    return out


NONFINITE = r"holds non-finite values: 2 tensor\(s\), 7 value\(s\) NaN/Inf, e\.g\. \S+lora[._](up|B)[._]weight.*Fix: "


def write_checkpoint(path: Path, tensors, tiny_sd15, *, lora_cfg=None, drop=None) -> Path:
    """A checkpoint of the shape sdtune's Lightning module writes (LoRA state_dict, run config, sdtune section)."""
    cfg = {
        "model": {"family": "sd15", "path": str(tiny_sd15), "tiny": True, "resolution": 64},
        "lora": lora_cfg or {"rank": SPEC.rank, "alpha": SPEC.alpha, "targets": list(TARGETS)},
        "data": {"resolution": 64},
    }
    ckpt = {
        "state_dict": {f"unet.{k.replace('.lora_A.', '.lora_A.default.').replace('.lora_B.', '.lora_B.default.')}": v
                       for k, v in tensors.items()},
        "hyper_parameters": {"cfg": cfg},
        "sdtune": {"family": "sd15", "rank": SPEC.rank, "alpha": SPEC.alpha, "targets": list(TARGETS), "num_train_images": 3},
        "global_step": 5,
    }
    if drop:
        del ckpt["hyper_parameters"]["cfg"][drop]
    torch.save(ckpt, path)
    return path


def export_cli(capsys, *args: str) -> tuple[int, str]:
    """``python -m sdtune.export ARGS`` in-process: (exit code, stderr)."""
    code = export.main([str(a) for a in args])
    return code, capsys.readouterr().err


# -- 1. NaN/Inf weights ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
@pytest.mark.parametrize("via", ["read_lora", "apply_loras", "export"])
def test_nonfinite_lora_is_refused_everywhere_it_is_read(tmp_path, capsys, peft_tensors, tiny_sd15, tiny_parts, fmt, via):
    path = write_lora(tmp_path / "nan.safetensors", with_nonfinite(peft_tensors), _meta(tiny_sd15), fmt)
    before = snapshot(tmp_path)
    message = r"'.*nan\.safetensors' " + NONFINITE
    if via == "read_lora":
        with pytest.raises(LoraFileError, match=message):
            read_lora(path)
    elif via == "apply_loras":
        family, parts = tiny_parts
        with pytest.raises(LoraFileError, match=message):
            apply_loras(parts, family, [LoraRef(str(path))])
        assert not getattr(parts.unet, "peft_config", None)  # nothing was added to the model
    else:
        code, err = export_cli(capsys, path, "--out", tmp_path / "out.safetensors")
        assert code == 2 and re.search("error: " + message, err), err
    assert snapshot(tmp_path) == before  # the input unchanged, nothing written beside it


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_nonfinite_checkpoint_is_not_exported(tmp_path, capsys, peft_tensors, tiny_sd15, fmt):
    good = write_checkpoint(tmp_path / "good.ckpt", peft_tensors, tiny_sd15)
    bad = write_checkpoint(tmp_path / "nan.ckpt", with_nonfinite(peft_tensors), tiny_sd15)
    before = snapshot(good, bad)
    code, err = export_cli(capsys, bad, "--format", fmt, "--out", tmp_path / "out.safetensors")
    assert code == 2 and re.search(r"error: '.*nan\.ckpt' " + NONFINITE + "the training diverged", err), err
    assert not (tmp_path / "out.safetensors").exists()
    code, err = export_cli(capsys, good, "--format", fmt, "--out", tmp_path / "ok.safetensors")  # the same, finite
    assert code == 0, err
    assert read_lora(tmp_path / "ok.safetensors").spec == SPEC
    assert snapshot(good, bad) == before


def test_save_lora_refuses_nonfinite_weights_and_keeps_the_old_file(tmp_path, peft_tensors, tiny_sd15):
    target = save_lora(tmp_path / "lora.safetensors", peft_tensors, _header(tiny_sd15), format="diffusers")
    before = snapshot(tmp_path)
    for path in (target, tmp_path / "new" / "lora.safetensors"):
        with pytest.raises(LoraFileError, match=r"refusing to write '.*lora\.safetensors': the LoRA " + NONFINITE.replace("Fix: ", r"Nothing was written\. Fix: ")):
            save_lora(path, with_nonfinite(peft_tensors), _header(tiny_sd15), format="diffusers")
    assert snapshot(tmp_path) == before and not (tmp_path / "new").exists()


def test_check_finite_is_one_importable_check(peft_tensors):
    """``check_finite(tensors, source)``: what read_lora, export and save_lora use, and resume can."""
    check_finite({**peft_tensors, "step": 3, "ids": torch.tensor([1, 2])}, "run/last.ckpt")  # finite: no error
    with pytest.raises(LoraFileError, match=r"^'run/last\.ckpt' " + NONFINITE):
        check_finite(with_nonfinite(peft_tensors), "run/last.ckpt")


@pytest.mark.slow
@pytest.mark.parametrize("module", ["sdtune.generate", "sdtune.merge"])
def test_generate_and_merge_clis_refuse_a_nan_lora(tmp_path, peft_tensors, tiny_sd15, module):
    """Before: all-black images, or a merged model full of NaN, and exit 0."""
    lora = write_lora(tmp_path / "nan.safetensors", with_nonfinite(peft_tensors), _meta(tiny_sd15))
    before = snapshot(lora)
    run = tmp_path / "run"
    extra = ["prompt=x", "steps=2", "num_images=1"] if module == "sdtune.generate" else [f"out={run / 'merged'}"]
    proc = run_cli(f"loras=[{lora}]", *extra, f"hydra.run.dir={run}", module=module, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.search(r"error: '.*nan\.safetensors' " + NONFINITE, proc.stderr) and "Traceback" not in proc.stderr
    assert not list(run.glob("*.png")) and not (run / "merged").exists() and not (run / "merged.safetensors").exists()
    assert snapshot(lora) == before


def test_merge_refuses_a_model_that_overflows_fp16(tmp_path, peft_tensors, tiny_sd15):
    """Finite LoRA weights can still fuse into values beyond fp16's 65504: refused, nothing written."""
    big = {k: v * 3000 for k, v in peft_tensors.items()}
    lora = write_lora(tmp_path / "loud.safetensors", big, _meta(tiny_sd15))
    before = snapshot(lora)
    with pytest.raises(LoraFileError, match=r"merged model would hold non-finite values: unet has \d+ tensor\(s\) .*"
                                            r"save_dtype=fp16.*Nothing was written\. Fix: save_dtype=bf16 or fp32"):
        merge(_compose("merge", f"loras=[{lora}]", f"out={tmp_path / 'merged'}", "save_dtype=fp16"))
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loud.safetensors"] and snapshot(lora) == before


# -- 2. checkpoints that are not checkpoints --------------------------------------------------------
def _torch_bytes(obj, *, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


CHECKPOINT_CASES = {
    "empty": (lambda: b"", r"it is empty \(0 bytes\).*Fix: use another checkpoint"),
    "png": (lambda: PNG.read_bytes(), r"it is not a PyTorch/Lightning checkpoint at all \(it is a PNG image\)\. Fix: pass a \.ckpt"),
    "text": (lambda: b"not a checkpoint", r"it is not a PyTorch/Lightning checkpoint at all \(it starts with the bytes b'not a checkpoint'\)"),
    "truncated-zip": (lambda: _torch_bytes({"w": torch.zeros(1000)})[:-200],
                      r"it is truncated or damaged \((RuntimeError|OSError): [^)]*\)\. Fix: use another checkpoint"),
    "truncated-legacy": (lambda: _torch_bytes({"w": torch.zeros(1000)}, legacy=True)[:10],  # EOFError with no message
                         r"it is truncated or damaged \(EOFError\)\. Fix: use another checkpoint"),
    "pickle-with-code": (lambda: _torch_bytes({"sdtune": {}, "x": RunsCodeWhenUnpickled()}),
                         r"it holds Python objects other than tensors .* could run arbitrary code.*Fix: use another checkpoint"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_checkpoint_that_is_not_a_checkpoint(tmp_path, capsys, case):
    content, message = CHECKPOINT_CASES[case]
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(content())
    before = snapshot(tmp_path)
    with pytest.raises(LoraFileError, match=r"'.*x\.ckpt' is not a readable sdtune checkpoint: " + message):
        export.load_checkpoint(ckpt)
    code, err = export_cli(capsys, ckpt, "--out", tmp_path / "out.safetensors")
    assert code == 2 and re.search(r"error: '.*x\.ckpt' is not a readable sdtune checkpoint: " + message, err), err
    assert "weights_only" not in err and "Traceback" not in err  # never PyTorch's advice to unpickle it anyway
    assert snapshot(tmp_path) == before


def test_checkpoint_path_that_is_a_folder(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    code, err = export_cli(capsys, run, "--out", tmp_path / "out.safetensors")
    assert code == 2 and re.search(r"error: checkpoint '.*run' is a folder, not a file\. Fix: name a \.ckpt file in it, "
                                   r"e\.g\. '.*run/checkpoints/last\.ckpt'", err), err
    assert not (tmp_path / "out.safetensors").exists()


# -- 3. forged or garbled header values ------------------------------------------------------------------
LONG = "x" * 500
HEADER_CASES = [
    ("sdtune.rank", "abc", "sdtune.rank", "'abc'", "an integer rank >= 1"),
    ("sdtune.rank", "0", "sdtune.rank", "'0'", "an integer rank >= 1"),
    ("sdtune.alpha", "x", "sdtune.alpha", "'x'", "a finite number"),
    ("sdtune.alpha", "nan", "sdtune.alpha", "'nan'", "a finite number"),
    ("sdtune.targets", '"to_q"', "sdtune.targets", "'\"to_q\"'", "a non-empty JSON list of module names"),
    ("sdtune.targets", "to_q,to_out.0", "sdtune.targets", "'to_q,to_out.0'", "a non-empty JSON list of module names"),
    ("sdtune.config", "{not json", "sdtune.config", "'{not json'", "a JSON object"),
    ("sdtune.config", '{"model": "sd15"}', "sdtune.config", "'{\"model\": \"sd15\"}'", "a run config whose 'model' entry"),
    ("sdtune.config", LONG, "sdtune.config", repr("x" * 80 + "..."), "a JSON object"),
    ("lora_adapter_metadata", "{oops", "lora_adapter_metadata", "'{oops'", "a JSON object"),
    ("lora_adapter_metadata", json.dumps({"unet.r": "four", "unet.lora_alpha": 8.0, "unet.target_modules": list(TARGETS)}),
     "lora_adapter_metadata.unet.r", "'four'", "an integer rank >= 1"),
]


@pytest.mark.parametrize(("key", "value", "named", "shown", "expected"), HEADER_CASES, ids=[f"{c[0]}={c[1][:12]}" for c in HEADER_CASES])
def test_garbled_header_value(tmp_path, capsys, peft_tensors, tiny_sd15, key, value, named, shown, expected):
    path = write_lora(tmp_path / "x.safetensors", peft_tensors, {**_meta(tiny_sd15), key: value})
    before = snapshot(tmp_path)
    message = (rf"'.*x\.safetensors': header key {re.escape(repr(named))} holds {re.escape(shown)}, which is not "
               rf"{re.escape(expected)}.*Fix: re-export the file")
    with pytest.raises(LoraFileError, match=message) as err:
        read_lora(path)
    assert LONG not in str(err.value)  # values are shown truncated
    code, stderr = export_cli(capsys, path, "--out", tmp_path / "out.safetensors")
    assert code == 2 and re.search("error: " + message, stderr), stderr
    assert snapshot(tmp_path) == before


# -- 4. headers that contradict their tensors ------------------------------------------------------------
def _rank8(meta):
    return {**meta, "sdtune.rank": "8", "ss_network_dim": "8",
            "lora_adapter_metadata": meta["lora_adapter_metadata"].replace('"unet.r": 4', '"unet.r": 8')}


def _targets_q_k(meta):
    targets = json.dumps(["to_q", "to_k"])
    adapter = json.loads(meta["lora_adapter_metadata"])
    return {**meta, "sdtune.targets": targets, "lora_adapter_metadata": json.dumps({**adapter, "unet.target_modules": ["to_q", "to_k"]})}


def _disagreeing_headers(meta):  # as in a file written by sdtune before 2026-11, which also had sdtune.rank
    return {**meta, "sdtune.rank": "4", "lora_adapter_metadata": meta["lora_adapter_metadata"].replace('"unet.r": 4', '"unet.r": 8')}


def _drop_one_up(tensors):
    return {k: v for k, v in tensors.items() if k != sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]}


CONTRADICTIONS = {
    "rank": ("diffusers", _rank8, None,
             r"the header \(sdtune\.\*\) says rank 8 but tensor 'unet\.\S+\.lora\.down\.weight' has rank 4"),
    "targets": ("diffusers", _targets_q_k, None,
                r"the header \(sdtune\.\*\) names targets \['to_k', 'to_q'\] but \d+ layer\(s\) in the file match none of "
                r"them, e\.g\. \['\S+to_out\.0'.*; target\(s\) \['to_k'\] match no layer in the file"),
    "two-headers": ("diffusers", _disagreeing_headers, None,
                    r"the header contradicts itself: sdtune\.rank is 4 but lora_adapter_metadata gives rank 8"),
    "kohya-alpha": ("kohya", lambda m: {**m, "sdtune.alpha": "4.0"}, None,
                    r"the header \(sdtune\.\*\) says alpha 4\.0 but tensor 'lora_unet_\S+\.alpha' holds alpha 8\.0"),
    "format": ("diffusers", lambda m: {**m, "sdtune.format": "kohya"}, None,
               r"header key 'sdtune\.format' says 'kohya' but its tensor names are diffusers format"),
    "unpaired": ("diffusers", None, _drop_one_up, r"1 LoRA layer\(s\) have a down or an up weight but not both, e\.g\. \['unet\."),
}


@pytest.mark.parametrize("case", sorted(CONTRADICTIONS))
def test_header_that_contradicts_its_tensors(tmp_path, capsys, peft_tensors, tiny_sd15, case):
    fmt, edit_meta, edit_tensors, message = CONTRADICTIONS[case]
    meta = _meta(tiny_sd15)
    if fmt == "kohya":  # the kohya writer takes alpha from the header: write 8.0 tensors, then change the header
        path = write_lora(tmp_path / "x.safetensors", peft_tensors, meta, fmt)
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            raw = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = {k: v for k, v in edit_meta(meta).items() if k != "lora_adapter_metadata"}  # as kohya files are written
        save_file(raw, str(path), metadata={**meta, "sdtune.format": "kohya"})
    else:
        tensors = edit_tensors(peft_tensors) if edit_tensors else peft_tensors
        path = write_lora(tmp_path / "x.safetensors", tensors, edit_meta(meta) if edit_meta else meta, fmt)
    before = snapshot(tmp_path)
    with pytest.raises(LoraFileError, match=r"'.*x\.safetensors': " + message):
        read_lora(path)
    code, err = export_cli(capsys, path, "--out", tmp_path / "out.safetensors")
    assert code == 2 and re.search(r"error: '.*x\.safetensors': " + message, err), err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(("lora_cfg", "message"), [
    ({"rank": 8, "alpha": 8.0, "targets": list(TARGETS)},
     r"the run config stored in it \(lora\.rank/alpha/targets\) says rank 8 but tensor '\S+\.lora_A\.weight' has rank 4"),
    ({"rank": 4, "alpha": 8.0, "targets": ["to_q"]},
     r"the run config stored in it \(lora\.rank/alpha/targets\) names targets \['to_q'\] but \d+ layer\(s\) in the file match none of them, e\.g\. \['\S+to_out\.0'"),
])
def test_checkpoint_whose_config_contradicts_its_tensors(tmp_path, capsys, peft_tensors, tiny_sd15, lora_cfg, message):
    ckpt = write_checkpoint(tmp_path / "x.ckpt", peft_tensors, tiny_sd15, lora_cfg=lora_cfg)
    before = snapshot(tmp_path)
    code, err = export_cli(capsys, ckpt, "--out", tmp_path / "out.safetensors")
    assert code == 2 and re.search(r"error: '.*x\.ckpt': " + message + r".*Fix: use another checkpoint", err), err
    assert snapshot(tmp_path) == before


def test_checkpoint_without_a_run_config(tmp_path, capsys, peft_tensors, tiny_sd15):
    ckpt = write_checkpoint(tmp_path / "x.ckpt", peft_tensors, tiny_sd15, drop="lora")
    before = snapshot(tmp_path)
    code, err = export_cli(capsys, ckpt, "--out", tmp_path / "out.safetensors")
    assert code == 2 and re.search(r"error: '.*x\.ckpt' is not a complete sdtune checkpoint: its run config or state_dict "
                                   r"is missing or malformed \(KeyError: 'lora'\)\. Fix: use another checkpoint", err), err
    assert snapshot(tmp_path) == before


# -- 5. an --out that cannot be written -------------------------------------------------------------------
def _existing_folder(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "keep.txt").write_text("the user's")
    return tmp_path / "folder", r"--out '.*folder' is an existing folder; --out names the \.safetensors file to write\. Fix: e\.g\. --out '.*folder/lora\.safetensors'"


def _parent_is_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("the user's")
    return tmp_path / "notes.txt" / "sub" / "x.safetensors", r"--out '.*notes\.txt/sub/x\.safetensors' cannot be written: '.*notes\.txt' is a file, not a folder"


def _read_only_parent(tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    return tmp_path / "ro" / "x.safetensors", r"--out '.*ro/x\.safetensors' cannot be written: the folder '.*ro' is not writable"


@pytest.mark.parametrize("make_out", [
    _existing_folder,
    _parent_is_a_file,
    pytest.param(_read_only_parent, marks=pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")),
])
@pytest.mark.parametrize("source_kind", ["lora", "checkpoint"])
def test_export_out_that_cannot_be_written(tmp_path, capsys, peft_tensors, tiny_sd15, make_out, source_kind):
    src = tmp_path / "src"
    src.mkdir()
    source = (write_lora(src / "lora.safetensors", peft_tensors, _meta(tiny_sd15)) if source_kind == "lora"
              else write_checkpoint(src / "last.ckpt", peft_tensors, tiny_sd15))
    out, message = make_out(tmp_path)
    before = snapshot(tmp_path)
    code, err = export_cli(capsys, source, "--out", out)
    assert code == 2 and re.search("^error: " + message, err), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before and not list(tmp_path.rglob("*.tmp"))


# -- 6. LoRA paths that are not LoRA files ------------------------------------------------------------------
def _folder(tmp_path):
    (tmp_path / "run").mkdir()
    return tmp_path / "run", r"LoRA file '.*run' is a folder, not a file\. Fix: name the \.safetensors file itself"


def _empty(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    return tmp_path / "empty.safetensors", r"'.*empty\.safetensors' is not a readable \.safetensors file: it is empty \(0 bytes\)\..*Fix: "


def _png(tmp_path):
    (tmp_path / "image.safetensors").write_bytes(PNG.read_bytes())
    return tmp_path / "image.safetensors", r"'.*image\.safetensors' is not a readable \.safetensors file: it is a PNG image\..*Fix: "


def _pickle(tmp_path):
    (tmp_path / "lora.bin").write_bytes(_torch_bytes({"unet.a.lora.down.weight": torch.zeros(2, 2)}))
    return tmp_path / "lora.bin", (r"'.*lora\.bin' is not a readable \.safetensors file: it is a zip archive, such as a PyTorch "
                                   r"\.ckpt/\.pt/\.bin file\..*Fix: .*python -m sdtune\.export")


@pytest.mark.parametrize("make", [_folder, _empty, _png, _pickle])
@pytest.mark.parametrize("via", ["read_lora", "apply_loras", "generate", "merge"])
def test_lora_path_that_is_not_a_lora_file(tmp_path, tiny_parts, make, via):
    path, message = make(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(LoraFileError, match=message):
        if via == "read_lora":
            read_lora(path)
        elif via == "apply_loras":
            family, parts = tiny_parts
            apply_loras(parts, family, [LoraRef(str(path))])
        elif via == "generate":  # the CLI prints this as `error: <message>` and exits 2
            generate(_compose("generate", f"loras=[{path}]", "prompt=x", "steps=1", "num_images=1"), tmp_path / "gen")
        else:
            merge(_compose("merge", f"loras=[{path}]", f"out={tmp_path / 'merged'}", "model=tiny"))
    assert snapshot(tmp_path) == before and not (tmp_path / "merged").exists()
