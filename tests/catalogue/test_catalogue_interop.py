"""Catalogue, interop: the files we write, read by each peer tool's own rules.

* **DoRA**: what each tool computes from a DoRA file we write must be what the file's header
  (``sdtune.dora_readers``), the log at export and the README say. The tools' maths is re-implemented
  below from their sources: A1111 v1.10.1 extensions-builtin/Lora/network.py
  (``NetworkModule.finalize_updown`` -> ``apply_weight_decompose``: per-input norm only) and
  network_lora.py (``calc_updown``: ``up @ down``); ComfyUI v0.19.3 comfy/weight_adapter/base.py
  ``weight_decompose`` (tests/helpers/comfyui.py), which Forge copies (lllyasviel/stable-diffusion-webui-forge
  @dfdcbab backend/patcher/lora.py ``weight_decompose``); kohya sd-scripts @48d368fa networks/lora.py
  ``load_weights`` (``load_state_dict(weights_sd, False)``: ``dora_scale`` is an unexpected key, skipped)
  applies a plain LoRA; diffusers runs as itself.
* **merge's text encoders** must be stored in the key layout both transformers 4.x (which kohya
  sd-scripts pins) and 5.x read. transformers 4.x's ``CLIPTextModel`` nests its weights under
  ``self.text_model = CLIPTextTransformer(config)`` (transformers v4.54.1,
  src/transformers/models/clip/modeling_clip.py) and loads a file by exact key, so a file without
  ``text_model.`` loads random weights with a mere "newly initialized" warning; transformers 5
  flattens the class and maps ``text_model.`` away on loading (conversion_mapping.py:
  ``"CLIPTextModel": [PrefixChange(prefix_to_remove="text_model")]``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdtune import export
from sdtune.families import get_family
from sdtune.families.builder import build_parts
from sdtune.inference.loading import LoraRef, apply_loras
from sdtune.lora.adapters import base_weights
from sdtune.lora.apply import fuse
from sdtune.lora.files import LoraHeader, save_lora
from sdtune.lora.keys import kohya_module_name, te_file_module, te_kohya_prefix
from sdtune.lora.layers import LoraSpec, inject, live_lora_state, trainable_lora_parameters
from sdtune.merge import merge
from tests.helpers.comfyui import merge_like_comfyui, unet_key_map
from tests.helpers.files import snapshot
from tests.helpers.models import tiny_model
from tests.helpers.paths import ROOT

MODEL = {"sd15": "tiny", "sdxl": "tiny_sdxl", "kolors": "tiny_kolors"}


def _compose(name: str, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


# -- merge: text encoders in the layout transformers 4.x and 5.x both read ------------------------
def _kohya_lora_with_text_encoders(path: Path, family: str) -> Path:
    """A kohya LoRA (as kohya sd-scripts writes one) with random rank-2 layers on two UNet attention
    linears and on the first attention/MLP linears of every text encoder."""
    fam = get_family(family)
    parts = fam.load(str(tiny_model(family)))
    g = torch.Generator().manual_seed(0)
    tensors = {}

    def layer(name: str, module: torch.nn.Linear) -> None:
        out_f, in_f = module.weight.shape
        tensors[f"{name}.lora_down.weight"] = torch.randn(2, in_f, generator=g) * 0.3
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_f, 2, generator=g) * 0.3
        tensors[f"{name}.alpha"] = torch.tensor(2.0)

    unet_layers = [n for n, m in parts.unet.named_modules() if n.endswith(("attn2.to_q", "attn1.to_v"))][:2]
    for m in unet_layers:
        layer(kohya_module_name(m, fam, parts.unet.config), parts.unet.get_submodule(m))
    for index, (encoder, kind) in enumerate(zip(parts.text_encoders, fam.text_encoder_kinds, strict=True)):
        linears = [n for n, m in encoder.named_modules() if isinstance(m, torch.nn.Linear) and ".0." in n
                   and n.endswith(("q_proj", "fc1", "query_key_value", "dense_h_to_4h"))]
        assert linears, f"no text-encoder layer found in {type(encoder).__name__}"
        prefix = te_kohya_prefix(index, len(parts.text_encoders))
        for m in linears:
            layer(prefix + te_file_module(m, kind).replace(".", "_"), encoder.get_submodule(m))
    save_file(tensors, str(path))
    return path


def _file_keys(folder: Path) -> list[str]:
    keys = []
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as fh:
            keys += list(fh.keys())
    return sorted(keys)


def _legacy_keys(encoder: torch.nn.Module) -> list[str]:
    """The state-dict keys transformers 4.x's class of ``encoder`` has (and loads by exact match):
    4.x ``CLIPTextModel`` = ``text_model.`` + the flattened 5.x class's keys; 4.x
    ``CLIPTextModelWithProjection`` and diffusers' ChatGLM are laid out as in 5.x."""
    keys = encoder.state_dict().keys()
    if type(encoder).__name__ == "CLIPTextModel" and not hasattr(encoder, "text_model"):
        keys = ["text_model." + k for k in keys]
    return sorted(keys)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "kolors"])
def test_merged_text_encoders_are_in_the_layout_transformers_4_and_5_read(family, tmp_path):
    """Catches merge's text_encoder/model.safetensors written in transformers 5's flattened layout
    (no ``text_model.``), which transformers 4.x, kohya's pin, loads as random weights with only a
    warning. transformers 5.25 must load the folder with exactly the fused weights."""
    (tmp_path / "in").mkdir()
    lora = _kohya_lora_with_text_encoders(tmp_path / "in" / "te_lora.safetensors", family)
    before = snapshot(tmp_path / "in"), snapshot(tiny_model(family))
    out = tmp_path / "merged"
    merge(_compose("merge", f"loras=[{lora}]", f"out={out}", f"model={MODEL[family]}", "save_dtype=fp32",
                   "single_file=false"))

    fam, parts = build_parts({"family": family, "path": str(tiny_model(family))})
    base = [{k: v.clone() for k, v in e.state_dict().items()} for e in parts.text_encoders]
    fuse(parts, apply_loras(parts, fam, [LoraRef(str(lora), 1.0)]))
    index = json.loads((out / "model_index.json").read_text())
    for i, (subfolder, fused) in enumerate(zip(fam.text_encoder_subfolders, parts.text_encoders, strict=True)):
        assert index[subfolder][1] == type(fused).__name__
        assert _file_keys(out / subfolder) == _legacy_keys(fused), f"{subfolder}: not the key layout transformers 4.x loads"
        reloaded = type(fused).from_pretrained(str(out / subfolder))  # transformers 5.25's own loading
        got, want = reloaded.state_dict(), fused.state_dict()
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=f"{subfolder}: {k} is not the merged weight")
        assert any(not torch.equal(want[k], base[i][k]) for k in want)  # the LoRA changed this encoder
    assert (snapshot(tmp_path / "in"), snapshot(tiny_model(family))) == before  # nothing the user gave us changed


# -- DoRA: what each tool computes from a file we write ------------------------------------------
DORA_TARGETS = ("to_q", "to_v", "proj_in")  # proj_in: a 1x1 conv in the tiny SD1.5 UNet
DORA_SPEC = LoraSpec(4, 3.0, DORA_TARGETS, use_dora=True)
README = ROOT / "docs" / "lora_files.md"  # the LoRA-files page holds the DoRA table


def a1111_merge(lora: dict[str, torch.Tensor], key_map: dict[str, str], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weight A1111 v1.10.1 patches each module to, at multiplier 1 (extensions-builtin/Lora):
    network_lora.py ``calc_updown`` gives ``up @ down`` (reshaped to the weight), network.py
    ``finalize_updown`` scales it by ``alpha / dim`` and, with a ``dora_scale``, calls
    ``apply_weight_decompose``, which divides by the per-*input* norm of ``W + updown`` ([1, in, ...])
    and returns ``W' - W``; networks.py adds that to the weight. A1111 resolves the same
    ``lora_unet_<diffusers path>`` names ComfyUI does for SD1.5 (``convert_diffusers_name_to_compvis``)."""
    merged = {}
    for stem, module in key_map.items():
        if f"{stem}.lora_up.weight" not in lora:
            continue
        weight = base[module].float()
        up, down = lora[f"{stem}.lora_up.weight"].float(), lora[f"{stem}.lora_down.weight"].float()
        updown = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
        alpha = lora.get(f"{stem}.alpha")
        updown = updown * (float(alpha) / down.shape[0] if alpha is not None else 1.0)
        if f"{stem}.dora_scale" in lora:
            dora_scale = lora[f"{stem}.dora_scale"].float()
            merged_scale1 = updown + weight
            norm = (merged_scale1.transpose(0, 1).reshape(merged_scale1.shape[1], -1).norm(dim=1, keepdim=True)
                    .reshape(merged_scale1.shape[1], *[1] * (weight.dim() - 1)).transpose(0, 1))
            updown = merged_scale1 * (dora_scale / norm) - weight
        merged[module] = weight + updown
    return merged


def plain_lora_merge(lora, key_map, base) -> dict[str, torch.Tensor]:
    """kohya sd-scripts' ``LoRAModule``: ``W + multiplier * up @ down * alpha / dim``, ``dora_scale`` skipped."""
    return a1111_merge({k: v for k, v in lora.items() if not k.endswith(".dora_scale")}, key_map, base)


def diffusers_merge(path: Path, modules) -> dict[str, torch.Tensor]:
    """diffusers' own ``load_lora_weights`` + ``fuse_lora`` on the tiny SD1.5 pipeline."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model("sd15")))
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    return {m: pipe.unet.get_submodule(m).weight.detach().float().clone() for m in modules}


def _dora_unet(seed: int = 0):
    """The tiny SD1.5 UNet carrying a DoRA with random (trained-like) weights, magnitudes included."""
    parts = build_parts({"family": "sd15", "path": str(tiny_model("sd15"))})[1]
    inject(parts.unet, DORA_SPEC)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_lora_parameters(parts.unet):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    parts.unet.eval()
    return parts.unet


def _peft_merged(unet) -> dict[str, torch.Tensor]:
    """Every DoRA layer's weight as peft merges it (the truth the trained model saw)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
            out[name] = module.get_base_layer().weight.detach().float().clone()
    return out


def _close(a: dict, b: dict, tol: float = 1e-4) -> bool:
    return a.keys() == b.keys() and max((a[m] - b[m]).abs().max().item() for m in a) < tol


def _readme_dora_table(column: int) -> dict[str, str]:
    """The README's table "| DoRA file read by | kohya layout (default) | `--format diffusers` |":
    tool -> its cell in ``column`` (1: kohya layout, 2: diffusers layout)."""
    rows, inside = {}, False
    for line in README.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| DoRA file read by |"):
            inside = True
        elif inside and not line.startswith("|"):
            break
        elif inside and len(cells) == 3 and not cells[0].startswith("---"):
            rows[cells[0]] = cells[column]
    return rows


def test_kohya_dora_file_says_what_each_reader_computes(tmp_path, caplog):
    """Catches a DoRA file that A1111 applies with no message and a wrong weight (its per-input
    ``apply_weight_decompose`` broadcasts our per-output [out, 1] ``dora_scale``), while kohya
    sd-scripts and diffusers drop the magnitude, and nothing says so: the header, the log and
    the README must each list every reader under what it really computes from the file."""
    unet = _dora_unet()
    tensors = live_lora_state(unet)
    base_unet = build_parts({"family": "sd15", "path": str(tiny_model("sd15"))})[1].unet
    base = {n: m.weight.detach().float() for n, m in base_unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    before = snapshot(tiny_model("sd15"))
    with caplog.at_level("WARNING", logger="sdtune"):
        path = save_lora(tmp_path / "dora.safetensors", tensors, LoraHeader(DORA_SPEC, "sd15"), format="kohya",
                         base_weights=base_weights(unet, tensors), denoiser_config=unet.config)
    from safetensors.torch import load_file

    raw = load_file(str(path))
    with safe_open(str(path), "pt") as fh:
        header = json.loads(fh.metadata()["sdtune.dora_readers"])
    truth = _peft_merged(unet)
    key_map = unet_key_map(base_unet)
    comfy, not_loaded = merge_like_comfyui(raw, key_map, base)
    assert not_loaded == []
    computed = {"ComfyUI": comfy, "Forge": comfy, "A1111": a1111_merge(raw, key_map, base),
                "kohya sd-scripts": plain_lora_merge(raw, key_map, base), "diffusers": diffusers_merge(path, truth)}
    plain = plain_lora_merge(raw, key_map, base)
    assert header == {"exact": ["ComfyUI", "Forge", "sdtune"], "magnitude_dropped": ["kohya sd-scripts", "diffusers"],
                      "wrong": ["A1111"]}
    assert set(computed) | {"sdtune"} == {tool for tools in header.values() for tool in tools}
    for tool in header["exact"]:
        assert tool == "sdtune" or _close(computed[tool], truth), f"{tool} is listed as exact but does not give peft's weight"
    for tool in header["magnitude_dropped"]:
        assert _close(computed[tool], plain, 1e-5) and not _close(computed[tool], truth), f"{tool}: not the plain LoRA"
    for tool in header["wrong"]:
        wrong = computed[tool]
        assert not _close(wrong, truth, 1e-2) and not _close(wrong, plain, 1e-2), f"{tool} is listed as wrong but is not"
        off = max(((wrong[m] - truth[m]).norm() / (truth[m] - base[m]).norm()).item() for m in truth)
        assert off > 0.5, f"{tool} is off by only {off:.2f} of the DoRA's own change"
    log = caplog.text
    for words in ("ComfyUI, Forge, sdtune apply it exactly", "kohya sd-scripts and diffusers drop its dora_scale",
                  "A1111 loads it with no message but computes a wrong weight", "--dora-as-lora RANK"):
        assert words in log, log
    table = _readme_dora_table(1)
    for column, tools in header.items():
        word = {"exact": "exact", "magnitude_dropped": "plain LoRA", "wrong": "wrong weight"}[column]
        for tool in tools:
            assert word in table.get(tool, ""), f"README's DoRA table says {table.get(tool)!r} for {tool}, not {word!r}"
    assert "use the diffusers layout" not in README.read_text(encoding="utf-8")
    assert snapshot(tiny_model("sd15")) == before


def test_diffusers_layout_dora_file_says_who_reads_it(tmp_path, caplog):
    """The diffusers (peft) layout: exact in diffusers and sdtune; A1111 matches none of its keys
    (the README once advised it for A1111). Header, log and README must say so."""
    unet = _dora_unet()
    tensors = live_lora_state(unet)
    with caplog.at_level("WARNING", logger="sdtune"):
        path = save_lora(tmp_path / "dora.safetensors", tensors, LoraHeader(DORA_SPEC, "sd15"), format="diffusers")
    with safe_open(str(path), "pt") as fh:
        header, keys = json.loads(fh.metadata()["sdtune.dora_readers"]), list(fh.keys())
    assert header == {"exact": ["diffusers", "sdtune"], "not_read": ["ComfyUI", "Forge", "A1111", "kohya sd-scripts"]}
    # A1111's networks.load_network looks a layer up by the key's part before the first "." (lora_unet_*, lora_te*_*)
    assert {k.split(".", 1)[0] for k in keys} == {"unet"}
    assert "DoRA file in the diffusers layout: diffusers, sdtune apply it exactly" in caplog.text
    table = _readme_dora_table(2)
    assert all("not read" in table[tool] for tool in header["not_read"]) and "exact" in table["diffusers"]


def _dora_checkpoint(path: Path, unet, dora: bool = True) -> Path:
    """A checkpoint of the shape sdtune's Lightning module writes for a DoRA run (``dora=False``: a
    plain LoRA run of the same layers, its magnitudes left out)."""
    cfg = {"model": {"family": "sd15", "path": str(tiny_model("sd15")), "tiny": True, "resolution": 64},
           "lora": {"rank": DORA_SPEC.rank, "alpha": DORA_SPEC.alpha, "targets": list(DORA_TARGETS), "use_dora": dora},
           "data": {"resolution": 64}}
    state = {f"unet.{k}": v for k, v in unet.state_dict().items() if ".lora_" in k and (dora or "magnitude" not in k)}
    torch.save({"state_dict": state, "hyper_parameters": {"cfg": cfg}, "global_step": 4,
                "sdtune": {"family": "sd15", "num_train_images": 3}}, path)
    return path


@pytest.mark.slow  # two exports, each an eigendecomposition per layer: ~4 s alone, up to 18 s on a busy machine
def test_dora_as_lora_export_gives_every_tool_the_same_weight(tmp_path, capsys):
    """``--dora-as-lora RANK`` writes the DoRA's whole weight change as a plain LoRA (truncated SVD):
    A1111, ComfyUI/Forge and kohya sd-scripts then compute the same weight, equal to peft's DoRA at
    full rank (64 covers the tiny layers), with the error the header and the command report below it."""
    unet = _dora_unet()
    (tmp_path / "run").mkdir()
    ckpt = _dora_checkpoint(tmp_path / "run" / "last.ckpt", unet)
    before = snapshot(tmp_path / "run")
    base_unet = build_parts({"family": "sd15", "path": str(tiny_model("sd15"))})[1].unet
    base = {n: m.weight.detach().float() for n, m in base_unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    key_map = unet_key_map(base_unet)
    truth = _peft_merged(unet)
    from safetensors.torch import load_file

    for rank in (64, 2):
        out = tmp_path / f"plain{rank}.safetensors"
        assert export.main([str(ckpt), "--dora-as-lora", str(rank), "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        raw = load_file(str(out))
        with safe_open(str(out), "pt") as fh:
            meta = fh.metadata()
        record = json.loads(meta["sdtune.dora_as_lora"])
        assert not any(k.endswith(".dora_scale") for k in raw) and "sdtune.dora_readers" not in meta
        assert meta["sdtune.adapter"] == "lora" and record["rank"] == rank and meta["ss_network_dim"] == str(rank)
        comfy, not_loaded = merge_like_comfyui(raw, key_map, base)
        assert not_loaded == [] and comfy.keys() == truth.keys()
        assert _close(a1111_merge(raw, key_map, base), comfy, 1e-5) and _close(plain_lora_merge(raw, key_map, base), comfy, 1e-5)
        worst = max(((comfy[m] - truth[m]).norm() / (truth[m] - base[m]).norm()).item() for m in truth)
        assert worst == pytest.approx(record["worst_relative_error"], abs=1e-4)
        if rank == 64:
            assert _close(comfy, truth) and record["worst_relative_error"] < 1e-5
        else:
            assert worst > 1e-3  # rank 2 cannot hold the change: the error is real, and reported
        assert f"plain rank-{rank} LoRA" in printed and f"{100 * record['worst_relative_error']:.2f}%" in printed
    assert snapshot(tmp_path / "run") == before


@pytest.mark.parametrize(("args", "message"), [
    (["--dora-as-lora", "0"], "--dora-as-lora must be a rank of at least 1, got 0. Fix: "),
    (["--dora-as-lora", "4", "--lora-file"], "--dora-as-lora needs the training checkpoint, not the LoRA file"),
    (["--dora-as-lora", "4", "--plain"], "--dora-as-lora converts a DoRA run"),
])
def test_dora_as_lora_refusals_name_the_fix(args, message, tmp_path, capsys):
    """A rank below 1, a LoRA file instead of the checkpoint, a run that is not DoRA: each refused
    with exit 2 and the fix, before anything is written."""
    unet = _dora_unet()
    (tmp_path / "run").mkdir()
    ckpt = _dora_checkpoint(tmp_path / "run" / "last.ckpt", unet, dora=args[-1] != "--plain")
    source = ckpt
    if args[-1] == "--lora-file":
        source = save_lora(tmp_path / "run" / "lora.safetensors", live_lora_state(unet), LoraHeader(DORA_SPEC, "sd15"),
                           format="diffusers")
    args = [a for a in args if a not in ("--lora-file", "--plain")]
    before = snapshot(tmp_path / "run")
    out = tmp_path / "out.safetensors"
    assert export.main([str(source), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Fix: " in err, err
    assert not out.exists() and snapshot(tmp_path / "run") == before
