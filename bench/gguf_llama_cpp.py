"""homellm's GGUF export run by llama.cpp itself (through llama-cpp-python): the same tokens, logits and greedy text.

    python bench/gguf_llama_cpp.py RUN [RUN...]   # needs `pip install llama-cpp-python` (it compiles llama.cpp)

For each run: export float32 GGUF, tokenize a text with llama.cpp and with homellm, compare llama.cpp's logits at
every position with homellm's (largest absolute difference, and whether the argmax agrees), and continue a prompt
greedily with both. Not a test: llama-cpp-python builds llama.cpp from source, minutes on two cores.
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from homellm.checkpoint import load_model
from homellm.config import SampleConfig
from homellm.generate import generate_ids
from homellm.gguf_file import export_gguf
from homellm.tokenizer import Tokenizer

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun."


def check(run: Path) -> None:
    from llama_cpp import Llama

    model, tok = load_model(run), Tokenizer.load(run)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_gguf(run, Path(tmp) / "m.gguf")
        llm = Llama(model_path=str(path), n_ctx=model.cfg.block_size, logits_all=True, verbose=False, n_threads=2)
        ids = llm.tokenize(TEXT.encode(), add_bos=False, special=True)
        ours = tok.encode(TEXT)
        n = min(len(ids), model.cfg.block_size)
        llm.reset()
        llm.eval(ids[:n])
        theirs = np.array(llm.scores[:n])[:, :model.cfg.vocab_size]
        with torch.no_grad():
            mine = model(torch.tensor([ids[:n]]))[0][0].numpy()
        diff = float(np.abs(theirs - mine).max())
        agree = float((theirs.argmax(-1) == mine.argmax(-1)).mean())
        prompt = ours[:8]
        llm.reset()
        greedy = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            greedy.append(token)
            if len(greedy) == 24:
                break
        own = list(generate_ids(model, prompt, SampleConfig(temperature=0.0, max_new_tokens=24)))
    print(f"{run}: {model.cfg.family}, {model.num_params():,} parameters; tokens equal: {ids == ours}; logits over "
          f"{n} positions: max |diff| {diff:.2e}, argmax agrees {agree:.1%}; greedy 24 tokens equal: {greedy == own}")
    print(f"  llama.cpp: {tok.decode(prompt + greedy)!r}\n  homellm:   {tok.decode(prompt + own)!r}")


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        check(Path(arg))
