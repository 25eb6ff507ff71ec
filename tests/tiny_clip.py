"""A tiny random-weight CLIP checkpoint saved the way hub checkpoints are (config, safetensors weights, tokenizer,
image processor), for the tests of code that loads a CLIP from a local directory."""

from pathlib import Path

import torch

from gdro_core.models.builtin_tokenizer import build_tokenizer


def save_tiny_clip(path: Path, projection_dim: int = 16, seed: int = 0, processor: bool = True) -> Path:
    """A ``CLIPModel`` with one-layer 16-wide towers (32-pixel images, 8-pixel patches) and the built-in
    character-level CLIP tokenizer; ``processor=False`` saves the model only."""
    from transformers import CLIPConfig, CLIPModel

    tok = build_tokenizer()
    config = CLIPConfig(
        text_config={"vocab_size": len(tok.get_vocab()), "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                     "pad_token_id": tok.eos_token_id},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path, safe_serialization=True)
    if processor:
        save_tiny_clip_processor(path)
    return Path(path)


def save_tiny_clip_processor(path: Path) -> Path:
    from transformers import CLIPImageProcessor, CLIPProcessor

    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=build_tokenizer()).save_pretrained(path)
    return Path(path)
