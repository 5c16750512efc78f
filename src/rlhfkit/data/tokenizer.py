"""Byte-level BPE tokenizers (trained with `tokenizers`, saved as HF tokenizer.json) and loading of any HF
tokenizer.

Byte-level means every string round-trips exactly: decode(encode(s)) == s, whatever the script.
Special tokens: <|endoftext|> (BOS = EOS, id 0), <|pad|> (id 1), and <|system|>, <|user|>,
<|assistant|> for the chat template. Encoding with special tokens prepends BOS, as Llama tokenizers do,
so a packed corpus reads BOS doc BOS doc ... and the model learns to end a document with EOS.
"""
from __future__ import annotations

import argparse
from collections.abc import Iterable

from rlhfkit.errors import ConfigError

EOS, PAD = "<|endoftext|>", "<|pad|>"
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [EOS, PAD, *CHAT_TOKENS]
# Jinja chat template: role marker on its own line, each turn ends with EOS; a generation prompt opens
# the assistant turn.
# (HF renders templates with trim_blocks, so literal newlines go inside {{ }}.)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ '<|endoftext|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2):
    """Train a byte-level BPE on `texts`; returns a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B",
                                                       special_tokens=[(EOS, tok.token_to_id(EOS))])
    return wrap(tok)


def wrap(tok):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=None, padding_side="left", clean_up_tokenization_spaces=False,
                                   model_max_length=1_000_000)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def load_tokenizer(path: str):
    """Load any HF tokenizer (local dir or hub id); make sure it has a pad token and EOS."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not load a tokenizer from {path!r}: {e}") from None
    if tok.eos_token is None:
        raise ConfigError(f"tokenizer {path!r} has no EOS token; set one before using it here")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # common for GPT-style tokenizers; masks keep pads out of losses
    return tok


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="rlhfkit tokenizer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE tokenizer on a source and save it")
    t.add_argument("--source", default="vader", help="text source (see `rlhfkit data list`)")
    t.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size incl. special tokens")
    t.add_argument("--min-frequency", type=int, default=2, help="minimum count of a learned merge")
    t.add_argument("--out", required=True, help="directory to save tokenizer.json and config into")
    e = sub.add_parser("encode", help="show how a tokenizer splits a text")
    e.add_argument("path", help="tokenizer directory or hub id")
    e.add_argument("text", help="text to encode")
    a = p.parse_args(argv)
    if a.cmd == "train":
        from rlhfkit.data.sources import load_texts

        texts = load_texts(a.source)
        tok = train_tokenizer(texts, a.vocab_size, a.min_frequency)
        tok.save_pretrained(a.out)
        n_tok = sum(len(tok(t)["input_ids"]) for t in texts)
        n_chr = sum(len(t) for t in texts)
        print(f"saved {len(tok)}-token tokenizer to {a.out}: {n_tok} tokens on {len(texts)} documents "
              f"({n_chr / n_tok:.2f} characters per token)")
    else:
        tok = load_tokenizer(a.path)
        ids = tok(a.text, add_special_tokens=False)["input_ids"]
        print(f"{len(ids)} tokens: {ids}")
        print(" | ".join(tok.convert_ids_to_tokens(ids)))
    return 0
