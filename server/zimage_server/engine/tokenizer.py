"""An offline, Qwen-compatible tokenizer for the built-in presets.

It uses transformers' real ``Qwen2Tokenizer`` (the Qwen pre-tokenizer and
byte-level decoder) with a vocabulary of the 256 byte symbols plus Qwen's special
tokens and no merges, so any text (English, Chinese, emoji) tokenizes to bytes.
The chat template renders what the real Qwen3 template renders for the
pipeline's call (one user turn, generation prompt, ``enable_thinking=True``).
"""

from __future__ import annotations

from transformers import Qwen2Tokenizer

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_symbols() -> list[str]:
    """The 256 printable symbols GPT-2/Qwen byte-level BPE uses for the bytes 0-255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def build_offline_tokenizer() -> Qwen2Tokenizer:
    """Return a byte-level Qwen tokenizer that needs no files."""
    vocab = {s: i for i, s in enumerate(_byte_symbols())}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    # Registered as special so that the text "<|im_start|>" is one token, as in Qwen.
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
