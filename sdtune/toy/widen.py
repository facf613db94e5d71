"""The 16-channel toy VAE (FLUX's and SD3's layout) started from the trained 4-channel one.

Trained from scratch on the 2-core build machine, the 16-channel VAE reached a reconstruction
error five times the 4-channel one's in the time a build can give it (MSE 0.17 against 0.033
after a quarter of the 4-channel recipe's images; the probe read 62% of reconstructed shape
colours right). Both are the same network but for the latent width and the quant convs, so
:func:`widen_vae` copies every shared weight and folds the 4-channel VAE's 1x1 quant convs into
the convs beside them: latent channels 0-3 carry the 4-channel code, channels 4-15 start as small
random projections, and a short fine-tune (``Recipe.vae16_steps``) lets them take part and
absorbs the fold's one inexact spot (``post_quant_conv``'s bias met zero padding at the border).

The 4-channel VAE enters rounded to fp16, as the committed toy folders hold it, so building the
FLUX and SD3 toys alone (from ``models/toy/<unet toy>/vae``) and rebuilding everything give the
same weights.
"""

from __future__ import annotations

import torch

from sdtune.toy.pretrain import toy_vae

#: Scale of the random weights of the new latent channels, relative to a fresh conv's.
NEW_CHANNEL_SCALE = 0.1


@torch.no_grad()
def widen_vae(vae4, latent_channels: int = 16, seed: int = 0):
    """A ``latent_channels`` AutoencoderKL without quant convs that encodes and decodes as ``vae4`` does."""
    torch.manual_seed(seed)
    vae = toy_vae(latent_channels)
    old = {k: v.to(torch.float16).float() for k, v in vae4.state_dict().items()}  # as committed
    own = vae.state_dict()
    for key, value in old.items():
        if key in own and own[key].shape == value.shape:
            own[key].copy_(value)
    c = vae4.config.latent_channels
    # encoder: conv_out (3x3 -> 2c moments), then quant_conv (1x1, 2c -> 2c), as one 3x3 conv
    q_w, q_b = old["quant_conv.weight"][:, :, 0, 0], old["quant_conv.bias"]
    w = torch.einsum("oi,ichw->ochw", q_w, old["encoder.conv_out.weight"])
    b = q_w @ old["encoder.conv_out.bias"] + q_b
    out_w, out_b = own["encoder.conv_out.weight"], own["encoder.conv_out.bias"]
    out_w[c:latent_channels] *= NEW_CHANNEL_SCALE
    out_b[c:latent_channels] = 0.0
    out_w[:c], out_b[:c] = w[:c], b[:c]  # means
    out_w[latent_channels:], out_b[latent_channels:] = 0.0, -8.0  # log-variances, as toy_vae starts them
    # decoder: post_quant_conv (1x1, c -> c), then conv_in (3x3), as one 3x3 conv
    p_w, p_b = old["post_quant_conv.weight"][:, :, 0, 0], old["post_quant_conv.bias"]
    in_w, in_b = old["decoder.conv_in.weight"], old["decoder.conv_in.bias"]
    dec_w, dec_b = own["decoder.conv_in.weight"], own["decoder.conv_in.bias"]
    dec_w[:, c:] *= NEW_CHANNEL_SCALE
    dec_w[:, :c] = torch.einsum("oihw,ij->ojhw", in_w, p_w)
    dec_b.copy_(in_b + in_w.sum(dim=(2, 3)) @ p_b)
    vae.load_state_dict(own)
    return vae
