"""The next flow-matching family (Qwen-Image, Z-Image, FLUX.2) is one file: a family defined and
registered here, with no edit anywhere else, builds its tiny transformer, trains through
``python -m sdtune``, writes its LoRA in kohya names by its own rule, reads it back through
sdtune's apply path to the live LoRA's output, and the bench times it and counts its FLOPs. If any
of those paths compared family names, or read the SD3.5 key table instead of the family's own,
this family would fall through to SD3.5's behaviour and an assertion below would catch it.
(The UNet twin of this test is tests/families/test_family_registry.py.)"""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

from sdtune.families import FAMILIES, get_family, register_family, sd35_keys
from sdtune.families.kohya import KohyaModule
from sdtune.families.sd35 import SD35
from sdtune.families.tiny import ensure_tiny_model
from sdtune.lora.apply import apply_lora
from sdtune.lora.files import read_lora
from sdtune.lora.layers import LoraSpec, inject
from sdtune.training.checkpointing import load_checkpoint
from tests.helpers.cli import run_entry, run_main
from tests.helpers.paths import CACHE

#: MMDiT names -> this family's own (a made-up original layout: "dit_blocks.{i}.img/txt...").
RENAMES = (("joint_blocks.", "dit_blocks."), (".x_block.", ".img."), (".context_block.", ".txt."))


class RenamedMMDiT(SD35):
    """SD3.5's architecture under another name, with facts of its own: kohya files name its
    blocks ``dit_blocks.{i}.img``/``.txt`` (still fusing q/k/v), the run's file is kohya (SD3.5's is
    diffusers), and its header has its own version string."""

    name = "mmdit_renamed"
    base_model_version = "mmdit_renamed_v0"
    default_export_format = "kohya"
    single_file_pipeline = None

    def kohya_modules(self, denoiser_config=None) -> dict[str, KohyaModule]:
        renamed: dict[str, KohyaModule] = {}  # one object per fused module, as the table builder keeps them
        table = {}
        for part, module in sd35_keys.kohya_modules(denoiser_config).items():
            if module.name not in renamed:
                name = module.name
                for old, new in RENAMES:
                    name = name.replace(old, new)
                renamed[module.name] = replace(module, name=name)
            table[part] = renamed[module.name]
        return table

    def lora_base_model_version(self, denoiser_config=None) -> str:
        return self.base_model_version

    def lora_architecture(self, denoiser_config=None) -> str | None:
        return None


@pytest.fixture
def flow_family():
    register_family(RenamedMMDiT)
    try:
        yield get_family(RenamedMMDiT.name)
    finally:
        FAMILIES.pop(RenamedMMDiT.name)


def _forward(denoiser: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    config = denoiser.config
    with torch.no_grad():
        return denoiser(hidden_states=torch.randn(2, 16, 8, 8, generator=g),
                        encoder_hidden_states=torch.randn(2, 12, config.joint_attention_dim, generator=g),
                        pooled_projections=torch.randn(2, config.pooled_projection_dim, generator=g),
                        timestep=torch.tensor([250.0, 800.0]), return_dict=False)[0]


def test_the_renamed_table_is_the_sd35_table_under_other_names(flow_family):
    """Fast: the rule the slow test relies on, on the full-size (meta) layout, in one call."""
    ours, theirs = flow_family.kohya_modules(None), sd35_keys.kohya_modules(None)
    assert ours.keys() == theirs.keys() and len({m.name for m in ours.values()}) == len({m.name for m in theirs.values()})
    qkv = ours["transformer_blocks.3.attn.to_k"]
    assert (qkv.name, qkv.parts, qkv.dims) == ("dit_blocks.3.img.attn.qkv", theirs["transformer_blocks.3.attn.to_k"].parts,
                                               (2432,) * 3)
    assert ours["transformer_blocks.37.norm1_context.linear"].name == "dit_blocks.37.txt.adaLN_modulation.1"
    assert ours["transformer_blocks.37.norm1_context.linear"].swap_halves
    assert ours["proj_out"].name == "final_layer.linear"
    assert flow_family.default_export_format == "kohya" and get_family("sd35").default_export_format == "diffusers"


@pytest.mark.slow
def test_a_flow_family_trains_exports_applies_and_is_benchmarked_through_the_registry(capsys, tmp_path, flow_family):
    from sdtune.bench.__main__ import main as bench_main
    from sdtune.bench.flops import count_step_flops
    from sdtune.export import main as export_main
    from tests.helpers.config import bench_cfg

    folder = ensure_tiny_model(flow_family.name, CACHE / f"tiny-{flow_family.name}")
    assert json.loads((folder / "sdtune_tiny.json").read_text())["family"] == flow_family.name
    model = ("model=tiny_sd35", f"model.family={flow_family.name}", f"model.path={folder}")
    run = tmp_path / "run"
    code, err = run_main(capsys, "experiment=quickstart", *model, "lora.rank=4", "lora.alpha=8", "trainer.max_steps=4",
                         "callbacks.samples=null", "callbacks.concept_probe=null", "data.val_images=0",
                         f"hydra.run.dir={run}")
    assert code == 0, err[-3000:]
    lora = read_lora(run / "lora.safetensors")
    assert (lora.family, lora.format, lora.spec.rank, lora.spec.alpha) == (flow_family.name, "kohya", 4, 8.0)
    assert lora.metadata["ss_base_model_version"] == "mmdit_renamed_v0"

    # the run's file: this family's names (q/k/v fused at 3x the rank), not SD3.5's MMDiT names
    with safe_open(str(run / "lora.safetensors"), "pt") as f:
        keys = list(f.keys())
        qkv = f.get_tensor("lora_unet_dit_blocks_0_img_attn2_qkv.lora_down.weight")
        alpha = f.get_tensor("lora_unet_dit_blocks_0_txt_attn_qkv.alpha")
    assert keys and all(k.startswith("lora_unet_dit_blocks_") for k in keys), keys[:3]
    assert qkv.shape == (12, 32) and float(alpha) == 3 * 8.0
    assert not any("joint_blocks" in k or "x_block" in k for k in keys)

    # sdtune's apply path reads it back onto a fresh base: the output of the live (checkpointed) LoRA
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    prefix = f"{flow_family.denoiser_subfolder}."
    trained = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and ".lora_" in k}
    live = flow_family.load(str(folder)).denoiser
    inject(live, LoraSpec(4, 8.0, flow_family.default_lora_targets))
    assert not live.load_state_dict(trained, strict=False).unexpected_keys
    base = flow_family.load(str(folder))
    plain = _forward(base.denoiser)
    assert apply_lora(base, lora, family=flow_family, path=run / "lora.safetensors", adapter_name="run") == ["denoiser"]
    expected, got = _forward(live), _forward(base.denoiser)
    assert (expected - plain).abs().max() > 1e-4  # the 4 steps moved the output
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # ... and its diffusers-layout export holds the same tensors as the kohya names resolve to
    diffusers = tmp_path / "diffusers.safetensors"
    assert export_main([str(run / "lora.safetensors"), "--format", "diffusers", "--out", str(diffusers)]) == 0
    names = [n for n, _ in flow_family.load(str(folder)).denoiser.named_modules()]
    resolved = lora.peft_tensors(names, live.config, family=flow_family.name)
    assert resolved.keys() == read_lora(diffusers).tensors.keys() and len(resolved) == 2 * 19

    # the bench: FLOPs (the same architecture as SD3.5: the same count) and a timed row per case
    cfg = bench_cfg(*model, "data.batch_size=1")
    batch = {"pixel_values": torch.zeros(1, 3, 64, 64)}
    ours = count_step_flops(cfg, batch, folder=folder)
    sd35 = count_step_flops({**cfg, "model": {**cfg["model"], "family": "sd35"}}, batch, folder=folder)
    assert ours["fwd_bwd"] > ours["fwd"] > 0 and ours == sd35
    out = tmp_path / "bench"
    code, err = run_entry(capsys, bench_main, "sdtune.bench", *model, "bench.steps=1", "bench.warmup=0", "bench.rounds=1",
                          "bench.prime=false", "bench.switch_models=[]", "bench.matmul.seconds=0.05", "data.batch_size=2",
                          f"hydra.run.dir={out}")
    assert code == 0, err[-3000:]
    with open(out / "bench.csv", newline="") as fh:
        rows = {r["case"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"reference", "cache_off", "cache_on"}
    for row in rows.values():
        assert (row["family"], row["model"]) == (flow_family.name, "tiny_sd35")
        assert float(row["gflop_per_image"]) == pytest.approx(ours["fwd_bwd"] / 1e9, rel=1e-3)
        assert float(row["ms_per_step"]) > 0
