"""Configs and stand-in families for the flow transformers' LoRA key tests.

The published full-size transformer configs (as /work/briefs/issue27_check_meta.py has them), tiny
configs of the same layouts, and :func:`keys_family`: a registered-able :class:`FlowFamily` whose
only real fact is its kohya table, for tests of the LoRA file code that need no loaded model.
"""

from __future__ import annotations

from types import ModuleType

from sdtune.families.flow import FlowFamily

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
                  joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
                  pos_embed_max_size=192, dual_attention_layers=(), qk_norm="rms_norm")
SD35_MEDIUM = dict(SD35_LARGE, num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)))
#: the plan's tiny FLUX (one double, two single blocks, width 32)
TINY_FLUX = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
#: a small SD3 whose width is 64 x its depth, as ComfyUI's MMDiT detection assumes; dual attention in
#: block 0, and the last block context_pre_only (both Medium features)
TINY_SD3 = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=32, num_attention_heads=4,
                joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=32, out_channels=16,
                pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")


def keys_family(keys: ModuleType, name: str = "flow_keys_test", **attrs) -> FlowFamily:
    """A :class:`FlowFamily` named ``name`` whose kohya table is ``keys.kohya_modules`` (every other
    abstract method does nothing); ``attrs`` set class attributes (text_encoder_kinds, ...)."""
    namespace = {n: (lambda self, *a, **k: None) for n in FlowFamily.__abstractmethods__}
    namespace.update(name=name, base_model_version="test", default_resolution=64, default_guidance=1.0, pipelines={},
                     kohya_modules=lambda self, config=None: keys.kohya_modules(config), **attrs)
    return type(f"KeysOnly_{name}", (FlowFamily,), namespace)()
