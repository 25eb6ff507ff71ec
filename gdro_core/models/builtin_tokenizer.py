"""The built-in model's tokenizer, built in code, apart from the model: the prompts stage checks that every prompt
fits it without loading torch or diffusers."""

from __future__ import annotations

import string
from collections.abc import Sequence

from transformers import CLIPTokenizer, PreTrainedTokenizerFast

from gdro_core.models.checkpoint_files import ModelError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CHARACTERS = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))


def build_tokenizer(words: Sequence[str] = ()) -> CLIPTokenizer | PreTrainedTokenizerFast:
    """The built-in text encoder's tokenizer, built in code.

    No ``words``: a character-level CLIP BPE tokenizer (no merges) over lower-case ASCII. With ``words``:
    a WordPiece tokenizer that reads each of them as one token and spells any other word out in characters,
    so a caption's words need not be learnt from their letters (``model.builtin.tokenizer: word``).
    """
    if not words:
        vocab = {c: i for i, c in enumerate(CHARACTERS)}
        vocab.update({c + "</w>": len(CHARACTERS) + i for i, c in enumerate(CHARACTERS)})
        vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
        return CLIPTokenizer(vocab=vocab, merges=[])
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    whole = sorted({w.lower() for w in words} - set(CHARACTERS))
    bad = [w for w in whole if not w.isalnum()]
    if bad:
        raise ModelError(f"tokenizer words must be letters or digits, got {bad[:3]}")
    tokens = [BOS, EOS, *CHARACTERS, *(f"##{c}" for c in CHARACTERS), *whole]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(WordPiece(vocab, unk_token=EOS))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS)
