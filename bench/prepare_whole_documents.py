"""prepare's time on one long document with a SentencePiece-style tokenizer (Llama 2's layout: "▁" prepended, no
pre-tokenizer), read whole as it is now, against in 256 KB pieces as before (whose seams differed from the whole's
tokens: a "▁" and lost merges every 256 KB).

    python bench/prepare_whole_documents.py [COPIES]   # tinyshakespeare COPIES times over (default 4), one document
"""

import shutil
import sys
import tempfile
import time
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, trainers

from homellm.config import PrepareConfig
from homellm.data import open_split, prepare
from homellm.tokenizer import Tokenizer, import_tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def main() -> None:
    copies = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    text = SHAKESPEARE.read_text(encoding="utf-8") * copies
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "in.txt").write_text(text, encoding="utf-8")
        hf = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
        hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(" ", 1, 0)])
        special = ["<unk>"] + [f"<0x{i:02X}>" for i in range(256)]
        hf.train_from_iterator([text[:200_000]], trainers.BpeTrainer(vocab_size=2000, special_tokens=special))
        hf.save(str(root / "llama2.json"))
        tok = import_tokenizer(root / "llama2.json")
        tok.save(root / "tok")
        whole = tok.encode(text) + [tok.eot_id]
        print(f"{len(text):,} characters, one document; the tokenizer cuts at lines: {tok.cuts_at_lines}")
        for label, pieces in (("whole (homellm now)", False), ("in 256 KB pieces (before)", True)):
            if pieces:
                Tokenizer.cuts_at_lines = property(lambda self: True)  # type: ignore[assignment,method-assign]
            shutil.rmtree(root / "out", ignore_errors=True)
            start = time.perf_counter()
            prepare(PrepareConfig(input=[str(root / "in.txt")], tokenizer=str(root / "tok"), out=str(root / "out"),
                                  val_fraction=0))
            took = time.perf_counter() - start
            ids = open_split(root / "out", "train")[0].tolist()
            print(f"{label}: {took:.2f} s, {len(ids):,} tokens, equal to encoding the whole text: {ids == whole}")


if __name__ == "__main__":
    main()
