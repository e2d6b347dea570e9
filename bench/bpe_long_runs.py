"""BPE training time on one long run of letters without a space, whole or cut as homellm cuts it (issue #2).

    python bench/bpe_long_runs.py 100000 0       # one 100,000-character word
    python bench/bpe_long_runs.py 100000 1000    # the same text in 1,000-character pieces (homellm.tokenizer)

Tokenizers' BpeTrainer alone, byte-level, vocabulary 1,000, random letters a-j (seed 0): the trainer's time grows
with the square of a word's length, which homellm bounds by cutting such runs (bounded_runs).
"""

import random
import sys
import time

from tokenizers import Tokenizer, models, pre_tokenizers, trainers


def seconds(texts: list[str]) -> float:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    start = time.perf_counter()
    tok.train_from_iterator(texts, trainer)
    return time.perf_counter() - start


if __name__ == "__main__":
    n, cut = int(sys.argv[1]), int(sys.argv[2])
    random.seed(0)
    text = "".join(random.choice("abcdefghij") for _ in range(n))
    pieces = [text[i:i + cut] for i in range(0, n, cut)] if cut else [text]
    print(f"{n:,} characters in {len(pieces):,} piece(s): {seconds(pieces):.2f} s")
