"""Tiny random-weight SD3 / SD3.5 / FLUX.1 checkpoints, built in code and saved as diffusers directories.

They have the real architectures (4-block VAE with an 8x factor and 16 latent channels and the family's
scaling/shift factors, CLIP + T5 text encoders, the family's transformer and scheduler), so the whole
pipeline can run against a real ``model.source`` on a CPU with nothing downloaded. Used by the tests.
"""

from __future__ import annotations

from pathlib import Path

import torch

VARIANTS = ("sd3", "sd35", "flux-dev", "flux-schnell")
T5_DIM = 32
CLIP_DIM = 32
CLIP_TOKENS = 77  # the real CLIP encoders' context, which the pipelines pad to


def t5_tokenizer():
    """A character-level T5 tokenizer (a ``tokenizers`` Unigram model) over lower-case ASCII, built in code."""
    import string

    from transformers import T5TokenizerFast

    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def _clip(with_projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from gdro_core.models.builtin_tokenizer import BOS, EOS, build_tokenizer

    tok = build_tokenizer()
    tok.model_max_length = CLIP_TOKENS
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=len(tok.get_vocab()), hidden_size=CLIP_DIM, intermediate_size=37, projection_dim=CLIP_DIM,
        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=tok.model_max_length,
        bos_token_id=tok.convert_tokens_to_ids(BOS), eos_token_id=tok.convert_tokens_to_ids(EOS),
        pad_token_id=tok.convert_tokens_to_ids(EOS), hidden_act="gelu",
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg), tok


def _t5(seed: int):
    from transformers import T5Config, T5EncoderModel

    tok = t5_tokenizer()
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(tok.get_vocab()), d_model=T5_DIM, d_kv=8, d_ff=37, num_layers=1, num_heads=2,
                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg), tok


def _vae(scaling: float, shift: float, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
        sample_size=32, scaling_factor=scaling, shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False,
    )


def build_tiny_pipeline(variant: str, seed: int = 0):
    """A tiny random-weight pipeline of ``variant`` (one of :data:`VARIANTS`)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny variant {variant!r}; choose one of {VARIANTS}")
    if variant.startswith("sd3"):
        torch.manual_seed(seed)
        sd35 = variant == "sd35"
        transformer = SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=T5_DIM, caption_projection_dim=16,
            pooled_projection_dim=2 * CLIP_DIM, pos_embed_max_size=32,
            qk_norm="rms_norm" if sd35 else None, dual_attention_layers=(0,) if sd35 else (),
        )
        te, tok = _clip(True, seed + 1)
        te2, tok2 = _clip(True, seed + 2)
        te3, tok3 = _t5(seed + 3)
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_vae(1.5305, 0.0609, seed + 4), text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2,
            text_encoder_3=te3, tokenizer_3=tok3,
        )
    dev = variant == "flux-dev"
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_DIM, pooled_projection_dim=CLIP_DIM, guidance_embeds=dev,
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = (FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                 base_image_seq_len=256, max_image_seq_len=4096)
                 if dev else FlowMatchEulerDiscreteScheduler(shift=1.0))
    te, tok = _clip(False, seed + 1)
    te2, tok2 = _t5(seed + 2)
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=_vae(0.3611, 0.1159, seed + 3),
                        text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2)


def save_tiny_pipeline(variant: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build and ``save_pretrained`` a tiny pipeline; returns the directory (a valid ``model.source``)."""
    out_dir = Path(out_dir)
    build_tiny_pipeline(variant, seed).save_pretrained(out_dir)
    return out_dir
