"""peft's LoRA layer computes exactly W x + (alpha / r) · B A x on our UNet."""

from __future__ import annotations

import pytest
import torch

from sdtune.families import get_family
from sdtune.lora.layers import LoraSpec, inject, lora_tensors, spec_from_config, trainable_lora_parameters


@pytest.mark.parametrize(("rank", "alpha"), [(4, 4.0), (2, 16.0)])
def test_lora_output_matches_hand_computation(tiny_sd15, rank, alpha):
    parts = get_family("sd15").load(str(tiny_sd15))
    inject(parts.unet, LoraSpec(rank=rank, alpha=alpha, targets=("to_q", "to_k", "to_v", "to_out.0")))
    layer = parts.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k  # cross-attention
    torch.manual_seed(1)
    with torch.no_grad():
        for p in trainable_lora_parameters(parts.unet):
            p.normal_()  # B starts at zero; make both factors non-trivial
    x = torch.randn(3, 32)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.shape == (rank, 32) and B.shape[1] == rank
    expected = x @ W.T + (b if b is not None else 0) + (alpha / rank) * (x @ A.T @ B.T)
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # scale really matters: the plain B A term alone would not match when alpha != rank
    if alpha != rank:
        assert not torch.allclose(got, x @ W.T + (b if b is not None else 0) + x @ A.T @ B.T, atol=1e-3)


def test_default_targets_and_only_attention_projections_get_lora(tiny_sd15):
    parts = get_family("sd15").load(str(tiny_sd15))
    spec = spec_from_config({"rank": 2, "alpha": None, "targets": None}, get_family("sd15").default_lora_targets)
    assert spec.alpha == 2.0 and spec.scale == 1.0
    inject(parts.unet, spec)
    lora_modules = {n.rsplit(".lora_A", 1)[0] for n, _ in parts.unet.named_parameters() if ".lora_A." in n}
    assert lora_modules and all(n.endswith(("to_q", "to_k", "to_v", "to_out.0")) for n in lora_modules)
    # every attention projection in the UNet got one
    expected = {n for n, m in parts.unet.named_modules() if n.endswith(("attn1.to_q", "attn2.to_v", "attn1.to_out.0"))}
    assert expected <= {n.removesuffix(".base_layer") for n in lora_modules} | lora_modules


def test_module_state_names_match_peft(tiny_sd15):
    """Our checkpoint-key rule gives exactly peft's own adapter state dict."""
    from peft.utils import get_peft_model_state_dict

    parts = get_family("sd15").load(str(tiny_sd15))
    inject(parts.unet, LoraSpec(rank=2, alpha=2.0, targets=("to_q", "to_v")))
    wrapper = torch.nn.Module()
    wrapper.unet = parts.unet
    ours = lora_tensors(wrapper.state_dict())
    theirs = get_peft_model_state_dict(parts.unet)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k])
