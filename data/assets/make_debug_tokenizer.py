"""Trains the debug model's tokenizer: a byte-level BPE of 1024 entries with the same
normaliser, pre-tokeniser and decoder as Qwen2 (NFC, Qwen's split regex, byte-level),
so code that runs the debug model exercises the same tokenizer path as the real one.

Run by hand from the repository root (output committed as data/assets/debug-tokenizer.json):

    python3 data/assets/make_debug_tokenizer.py

Pinned: tokenizers==0.23.3. Corpus: Debian's license texts (base-files, present on
every Debian/Ubuntu machine) and the phrasings of longview's synthetic tasks (written
below), so haystack questions tokenize compactly. Same inputs, same output.
"""

import pathlib

import tokenizers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

assert tokenizers.__version__ == "0.23.3", tokenizers.__version__

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "data" / "assets" / "debug-tokenizer.json"
VOCAB = 1024
# First ids, in this order: 0 <|endoftext|>, 1 <|im_start|>, 2 <|im_end|>, 3 <image>.
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
# Qwen2's pre-tokenisation regex (from its tokenizer.json).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LICENSES = ["GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "GFDL-1.3", "Artistic"]
TASK_TEXT = """
You are a helpful assistant.
<video>
What digit appears in the video? Answer with the digit only.
Which frame shows the red number? The answer is 7.
Respond with only the letter of the correct option.
A. 3
B. 5
C. 8
D. 9
Answer: B
<think>
The needle frame shows a large coloured digit. I count the frames and compare.
</think>
<answer>C</answer>
Describe the video in detail. The video shows a barcode and a moving pattern.
"""


def corpus():
    for name in LICENSES:
        yield pathlib.Path("/usr/share/common-licenses", name).read_text(encoding="utf-8")
    for _ in range(50):
        yield TASK_TEXT
    for i in range(1000):
        yield f"frame {i} at {i / 30:.2f} seconds; digit {i % 10}; option {'ABCD'[i % 4]}\n"


def main():
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=2,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    for i, s in enumerate(SPECIAL):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    tok.save(str(OUT))
    print(f"wrote {OUT} ({tok.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
