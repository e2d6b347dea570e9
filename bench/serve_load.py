"""Load test for `homellm serve`: aggregate tokens/s and request latency at 1, 8 and 32 concurrent streaming clients.

    python bench/serve_load.py --run RUN [--clients 1 8 32] [--requests 4] [--max-tokens 100]

Starts `homellm serve RUN --port 0` in a child process (so the clients here do not share its interpreter), then for
each concurrency level runs that many clients, each sending --requests streaming /v1/completions one after another
and counting tokens from the usage chunk. Without --run it first trains the `cpu` preset on tinyshakespeare for
--train-s seconds into /tmp/serve-bench-run (a realistic small model: 4 layers, 192 wide, 128-token context).
Every connection goes to the loopback address only; the test ends by itself.
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed", "KING HENRY:", "To be, or not", "JULIET:\nO Romeo",
           "MENENIUS:\nWhat work's", "The king is", "Good morrow"]


async def one_request(port: int, prompt: str, max_tokens: int, model: str) -> tuple[float, float, int]:
    """A streaming completion over a raw HTTP/1.1 connection: (seconds to first text, total seconds, tokens)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    first, tokens = None, 0
    status = (await reader.readline()).split()[1]
    if status != b"200":
        raise RuntimeError(f"HTTP {status.decode()}: {(await reader.read()).decode()[:200]}")
    async for line in reader:  # chunked encoding: size lines and data lines; only the data lines matter
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
            first = time.perf_counter() - start
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    writer.close()
    return first or 0.0, time.perf_counter() - start, tokens


async def level(port: int, clients: int, requests: int, max_tokens: int, model: str) -> dict:
    async def client(c: int) -> list[tuple[float, float, int]]:
        return [await one_request(port, PROMPTS[(c + r) % len(PROMPTS)], max_tokens, model) for r in range(requests)]

    start = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(client(c) for c in range(clients))) for r in rs]
    wall = time.perf_counter() - start
    latencies = sorted(r[1] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": sum(r[2] for r in results),
            "wall_s": round(wall, 2), "tok_per_s": round(sum(r[2] for r in results) / wall, 1),
            "ttft_p50_s": round(statistics.median(r[0] for r in results), 3),
            "latency_p50_s": round(statistics.median(latencies), 3),
            "latency_p99_s": round(latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", help="a run directory (default: train one, see --train-s)")
    parser.add_argument("--train-s", type=float, default=60.0, help="seconds of `cpu` preset training without --run")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=4, help="streaming requests per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument("--max-batch", type=int, default=32)
    args = parser.parse_args()
    homellm = [sys.executable, "-m", "homellm"]
    run = Path(args.run or "/tmp/serve-bench-run")
    if not args.run and not (run / "config.json").is_file():
        text = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
        subprocess.run([*homellm, "pretrain", "--preset", "cpu", "--data", str(text), "--out", str(run),
                        "--max-time", str(args.train_s), "--device", "cpu"], check=True)
    server = subprocess.Popen([*homellm, "serve", str(run), "--port", "0", "--max-batch", str(args.max_batch),
                               "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = server.stdout.readline().split(" at ")[1].split()[0]
        port = int(url.rsplit(":", 1)[1])
        threading.Thread(target=server.stdout.read, daemon=True).start()  # its request log must not fill the pipe
        asyncio.run(level(port, 1, 1, 8, run.name))  # warm-up
        rows = [asyncio.run(level(port, c, args.requests, args.max_tokens, run.name)) for c in args.clients]
    finally:
        server.terminate()
        server.wait(timeout=30)
    for row in rows:
        print(json.dumps(row))
    base = rows[0]["tok_per_s"]
    for row in rows[1:]:
        print(f"{row['clients']} clients: {row['tok_per_s'] / base:.1f}x the tokens/s of {rows[0]['clients']}")


if __name__ == "__main__":
    main()
