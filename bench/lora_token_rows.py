"""What training the chat tokens' rows costs a LoRA run: seconds per step and peak memory, with and without them.

    python bench/lora_token_rows.py [--vocab 32768] [--steps 6]

Each setting runs in its own process (peak RSS is per process): a llama of 4 layers, 512 wide, over a vocabulary
large enough for the chunked loss, LoRA rank 8 on every projection, batch 8 x 256 tokens, AdamW, float32 on CPU.
"With rows" adds <|im_start|>'s and <|im_end|>'s embedding and head rows (sft's LoraSpec.tokens): the head's weight
is then the base's plus those rows, a copy per step, with its gradient taken in the chunked loss.
"""

import argparse
import json
import resource
import subprocess
import sys
import time


def one(vocab: int, steps: int, tokens: list[int], tied: bool) -> dict:
    import torch

    from homellm.config import ModelConfig
    from homellm.lora import LoraSpec, attach_lora
    from homellm.model import GPT

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = GPT(ModelConfig(family="llama", vocab_size=vocab, n_layer=4, n_head=8, n_kv_head=8, n_embd=512,
                            intermediate_size=1376, block_size=256, tie_embeddings=tied))
    lora = attach_lora(model, LoraSpec(rank=8, tokens=tokens))
    opt = torch.optim.AdamW(lora.parameters(), lr=1e-3)
    x, y = torch.randint(0, vocab, (2, 8, 256))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"s_per_step": sorted(times[1:])[len(times[1:]) // 2],  # median, the first step's setup left out
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--child", default="")
    a = ap.parse_args()
    if a.child:
        tokens, tied = json.loads(a.child)
        print(json.dumps(one(a.vocab, a.steps, tokens, tied)))
        return
    print(f"vocabulary {a.vocab:,}, {a.steps} steps, median s/step after the first\n")
    print("| head | rows | s/step | peak RSS |\n|---|---|---|---|")
    for tied in (True, False):
        base = None
        for tokens in ([], [1, 2]):
            out = subprocess.run([sys.executable, __file__, "--vocab", str(a.vocab), "--steps", str(a.steps),
                                  "--child", json.dumps([tokens, tied])], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            ratio = "" if base is None else f" ({r['s_per_step'] / base:.2f}x)"
            base = base or r["s_per_step"]
            print(f"| {'tied' if tied else 'untied'} | {'chat tokens' if tokens else 'none'} | "
                  f"{r['s_per_step']:.3f}{ratio} | {r['peak_rss_mib']:,.0f} MiB |")


if __name__ == "__main__":
    main()
