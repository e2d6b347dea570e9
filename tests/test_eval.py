"""Evaluation and the quickstart: answer-only training rows, batched greedy answers, the eval verbs, and a short
quickstart end to end."""

import json
import math
import random
import shutil
import time

import numpy as np
import pytest
import torch

from conftest import homellm
from homellm.checkpoint import load_model
from homellm.config import ModelConfig, PrepareConfig, QuickstartConfig, SampleConfig, TokenizerConfig
from homellm.data import prepare
from homellm.errors import HomeLLMError
from homellm.eval import greedy_complete, stop_ids
from homellm.generate import generate_ids
from homellm.info import table
from homellm.io import display_width
from homellm.model import GPT
from homellm.quickstart import ROW_TOKENS, AnswerBatches, default_problems
from homellm.tasks import arithmetic
from homellm.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    (root / "train.txt").write_text(arithmetic.corpus_text(arithmetic.generate(3000, seed=0)) + "\n")
    (root / "alphabet.txt").write_text(arithmetic.chars())
    train_tokenizer(TokenizerConfig(input=[str(root / "alphabet.txt")], out=str(root / "tok"), kind="char"))
    prepare(PrepareConfig(input=[str(root / "train.txt")], tokenizer=str(root / "tok"), out=str(root / "data")))
    return root / "data", Tokenizer.load(root / "tok")


def test_answer_rows_start_at_a_problem_and_train_only_the_answers_and_their_end(task_data):
    """After the answer's closing '$' the target is end-of-text (where the text has its newline): untrained, the
    model wrote `84$$$$$...` after the answer, and `generate` had no reason to stop."""
    data_dir, tok = task_data
    batches = AnswerBatches(data_dir, tok, block_size=64, seed=0)
    x, y = batches.train_batch(step=3, batch_size=16, part=0, parts=1)
    assert x.shape == y.shape == (16, 64)
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        chars = [tok.decode([t]) for t in row_x]  # a char tokenizer: one character per token
        assert chars[0] == "$"
        for j in range(len(chars) - 1):
            line_start = "".join(chars[:j + 1]).rfind("\n") + 1
            answer = "=" in chars[line_start:j + 1] and chars[j + 1] != "\n"
            assert (row_y[j] != -100) == (answer or chars[j + 1] == "\n"), (j, "".join(chars))
            if answer:
                assert row_y[j] == row_x[j + 1]
            elif chars[j + 1] == "\n":
                assert chars[j] == "$" and row_y[j] == tok.eot_id


def test_packed_answer_rows_make_each_problem_line_a_document(task_data):
    data_dir, tok = task_data
    plain = AnswerBatches(data_dir, tok, block_size=64, seed=0)
    x, y, documents = AnswerBatches(data_dir, tok, block_size=64, seed=0, packed=True).train_batch(3, 16, 0, 1)
    assert all(torch.equal(a, b) for a, b in zip((x, y), plain.train_batch(3, 16, 0, 1)))  # the same rows
    newline = tok.encode("\n")[0]
    after_newline = torch.zeros_like(x, dtype=torch.bool)
    after_newline[:, 1:] = x[:, :-1] == newline
    starts = torch.ones_like(after_newline)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    assert torch.equal(starts[:, 1:], after_newline[:, 1:]) and bool(after_newline.any())
    assert (x[starts] == tok.encode("$")[0]).all()  # every document is a problem from its start


def test_train_batches_are_deterministic_and_sliced_per_rank(task_data):
    data_dir, tok = task_data
    batches = AnswerBatches(data_dir, tok, block_size=64, seed=0)
    x, y = batches.train_batch(5, 8, part=0, parts=1)
    x0, _ = batches.train_batch(5, 4, part=0, parts=2)
    x1, _ = batches.train_batch(5, 4, part=1, parts=2)
    assert torch.equal(torch.cat([x0, x1]), x)
    assert torch.equal(batches.train_batch(5, 8, 0, 1)[1], y)
    assert not torch.equal(batches.train_batch(6, 8, 0, 1)[0], x)


def test_batched_greedy_answers_equal_one_prompt_at_a_time(task_data):
    _, tok = task_data
    torch.manual_seed(0)
    model = GPT(ModelConfig(family="llama", n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=64,
                            tie_embeddings=False)).eval()
    with torch.no_grad():  # answers that differ with the prompt (at init all were "=========="; review)
        for w in model.parameters():
            w.mul_(8 if w.dim() == 2 else 1)
    problems = arithmetic.generate(12, seed=5, split="heldout")
    prompts = [arithmetic.prompt(p) for p in problems]
    stop = stop_ids(tok, "$\n")
    batched = greedy_complete(model, tok, prompts, 10, stop, batch_size=4)
    assert len(set(batched)) > 3  # each answer must be its own prompt's to match below
    for prompt, got in zip(prompts, batched):
        # (the guard keeps to the tokenizer's ids, as eval does: the model's padding rows are none of them)
        ids = list(generate_ids(model, tok.encode(prompt), SampleConfig(max_new_tokens=10, temperature=0.0),
                                stop_ids=set(stop.tolist()), guard=tok.utf8_guard))
        alone = tok.decode(ids)
        # generate_ids ends before the stop token; the batch keeps it, so an answer shows its closing '$'.
        ends = {tok.decode([i]) for i in stop.tolist()}
        assert got == alone or (len(ids) < 10 and got.startswith(alone) and got[len(alone):] in ends), (got, alone)


def test_greedy_answers_read_prompts_as_generate_does(task_data):
    """Chat markup in a prompt is the special token there (it was plain characters in eval but not in generate),
    and an empty prompt starts a document (it got no answer)."""
    _, tok = task_data
    torch.manual_seed(3)
    model = GPT(ModelConfig(family="llama", n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=64)).eval()
    with torch.no_grad():  # larger weights: answers that differ with the prompt (at init they are all "=")
        for w in model.parameters():
            w.mul_(8 if w.dim() == 2 else 1)
    prompts = ["<|im_start|>user\n$1 + 2 =", "", "<|endoftext|>$3 - 1 ="]
    stop = stop_ids(tok, "")
    for prompt, got in zip(prompts, greedy_complete(model, tok, prompts, 8, stop)):
        ids = list(generate_ids(model, tok.encode_prompt(prompt), SampleConfig(max_new_tokens=8, temperature=0.0),
                                stop_ids=set(stop.tolist()), guard=tok.utf8_guard))  # (no padded ids: as eval)
        assert got == tok.decode(ids) or got[:len(tok.decode(ids))] == tok.decode(ids) and len(ids) < 8, prompt


def test_greedy_answers_keep_to_whole_characters_and_read_the_end_of_long_prompts(tmp_path, capsys):
    """A byte-level model's argmax may be half a character: generate never takes it (its UTF-8 guard), eval took it
    and scored U+FFFD. A prompt longer than the context went unanswered, and counted right against an empty
    answer; it keeps its last tokens now, as generate's does."""
    corpus = tmp_path / "ja.txt"
    corpus.write_text("むかしむかし、ある山のふもとに小さな村がありました。 ROMEO: But soft!\n" * 20, encoding="utf-8")
    tok = train_tokenizer(TokenizerConfig(input=[str(corpus)], out=str(tmp_path / "tok"), vocab_size=300))
    assert tok.utf8_guard.needed
    torch.manual_seed(0)
    model = GPT(ModelConfig(family="llama", n_layer=2, n_head=2, n_embd=32, block_size=32,
                            vocab_size=tok.vocab_size)).eval()
    with torch.no_grad():  # larger weights: peaked, varied answers
        for w in model.parameters():
            w.mul_(8 if w.dim() == 2 else 1)
    prompts = ["むかし", "ROMEO:", "山の", "But", "ある", "、", "村が", "soft"]
    none = torch.tensor([], dtype=torch.long)
    got = greedy_complete(model, tok, prompts, 8, none)
    for prompt, answer in zip(prompts, got):
        ids = list(generate_ids(model, tok.encode_prompt(prompt), SampleConfig(max_new_tokens=8, temperature=0.0),
                                guard=tok.utf8_guard))
        assert answer == tok.decode(ids), prompt
    assert not any("\ufffd" in a for a in got)
    capsys.readouterr()
    long = "むかしむかし、ある山のふもとに" * 10  # over 32 tokens
    answer = greedy_complete(model, tok, [long, "むかし"], 8, none)[0]
    assert len(tok.encode(answer)) == 8
    assert answer == greedy_complete(model, tok, [tok.encode_prompt(long)[-(32 - 8):]], 8, none)[0]
    assert "note: 1 prompt fills the model's 32-token context: only the last 24 tokens of each are read, to leave " \
        "room for the answer" in capsys.readouterr().err


def test_exact_reads_alpaca_records_as_sft_does_and_says_what_n_leaves_out(tmp_path, capsys):
    from homellm.eval import read_qa

    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Add 2 and 3.", "input": "", "output": "5", "category": None},
        {"instruction": "Translate", "input": "cat", "output": "neko", "system": "Be brief."},
        {"prompt": "1 + 1 =", "answer": 2}]) + "\n")
    assert read_qa(qa, 5) == [
        {"prompt": "Add 2 and 3.", "answer": "5", "category": "", "system": ""},
        {"prompt": "Translate\n\ncat", "answer": "neko", "category": "", "system": "Be brief."},
        {"prompt": "1 + 1 =", "answer": "2", "category": "", "system": ""}]
    assert "note" not in capsys.readouterr().err
    assert len(read_qa(qa, 2)) == 2
    assert (f"note: --data {qa} holds more than --n 2 records: the first 2 are scored (raise --n for more)"
            in capsys.readouterr().err)
    qa.write_text('{"prompt": "ok", "answer": "1"}\n{"prompt": "ab\\ud800", "answer": "c"}\n')  # (a TypeError)
    with pytest.raises(HomeLLMError, match=r"qa.jsonl:2: the prompt holds '\\ud800' at character 2, half of a UTF-16"):
        read_qa(qa, 5)


def test_eval_refuses_runs_not_trained_on_the_task_and_bad_n(tmp_path, data_dir, capsys):
    from homellm.cli import main

    def refused(*argv: str) -> str:  # in this process: each CLI start costs seconds of imports, and these are many
        assert main(list(argv)) == 2, argv
        return capsys.readouterr().err

    run = tmp_path / "run"
    assert main(["pretrain", "--preset", "tiny", "--data", str(data_dir), "--out", str(run), "--max-steps", "4"]) == 0
    assert "not trained by the quickstart on the arithmetic task" in refused("eval", str(run), "--task", "arithmetic")
    assert "are scored by `--task exact --data QA.jsonl`" in refused("eval", str(run), "--task", "arithmetic")
    assert "--n 0: must be 1 or more" in refused("eval", str(run), "--n", "0")
    # Without --task, such a run is scored by its val loss, and a line says so (it was the refusal above).
    assert main(["eval", str(run), "--batches", "1"]) == 0
    err = capsys.readouterr().err
    assert "eval: --task loss (the run's val loss; --task arithmetic, chat-arithmetic, loss or exact chooses)" in err
    assert json.loads((run / "eval_loss.json").read_text())["task"] == "loss"
    assert "--max-digits 0 is out of range: use 1 to 9" in refused("eval", str(run), "--max-digits", "0")
    assert "nonsense" in refused("eval", str(run), "--task", "nonsense")
    # As a fine-tuned run (an sft section, no data folder of its own), each refusal says what applies instead.
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**{k: v for k, v in config.items() if k != "data_dir"}, "sft": {}}))
    assert "is scored by `--task chat-arithmetic`" in refused("eval", str(run), "--task", "arithmetic")
    assert "was not trained on a prepared data folder" in refused("eval", str(run), "--task", "loss")
    assert "is a fine-tuned run: score it with `--task loss --data CHATS.jsonl`" in refused("eval", str(run))
    shutil.rmtree(run / "tokenizer")
    assert "tokenizer is missing: copy back the tokenizer/ folder" in refused("generate", str(run), "--prompt", "the")


def test_a_shard_of_prepared_data_given_as_text_is_named_with_its_folder(tmp_path, data_dir, capsys):
    """A train_00000.bin read as text looked like UTF-16 (its uint16 ids' NUL bytes at every other byte), and the
    --encoding utf-16-le it was told to pass had eval report a loss on garbage."""
    from homellm.cli import main

    run = tmp_path / "run"
    assert main(["pretrain", "--preset", "tiny", "--data", str(data_dir), "--out", str(run), "--max-steps", "1"]) == 0
    apart = tmp_path / "apart"  # a shard copied away from its meta.json: known by its name
    apart.mkdir()
    shutil.copy(data_dir / "val_00000.bin", apart / "val_00000.bin")
    for shard, fix in [(data_dir / "train_00000.bin", f"--data {data_dir},"),
                       (apart / "val_00000.bin", "--data DIR, the folder `homellm prepare` wrote it in")]:
        for argv in (["eval", str(run), "--task", "loss", "--data", str(shard)],
                     ["eval", str(run), "--task", "loss", "--data", str(shard), "--encoding", "utf-16-le"],
                     ["pretrain", "--preset", "tiny", "--data", str(shard), "--out", str(tmp_path / "new")],
                     ["prepare", "--input", str(shard), "--tokenizer", str(data_dir), "--out", str(tmp_path / "d")]):
            capsys.readouterr()
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "utf-16" not in err
            assert f"{shard}: token ids (a shard of homellm's prepared data), not text: give the prepared folder " \
                   f"instead, as it is ({fix}" in err, (argv, err)
    assert not (tmp_path / "new").exists() and not (tmp_path / "d").exists()


def test_eval_loss_reports_loss_and_bits_per_byte(tmp_path, data_dir, capsys, monkeypatch, windows_deletes):
    from homellm import train
    from homellm.cli import main

    run = tmp_path / "run"
    assert main(["pretrain", "--preset", "tiny", "--data", str(data_dir), "--out", str(run), "--max-steps", "10"]) == 0
    capsys.readouterr()
    # On the CPU the loss is scored in float32 even where training runs in bfloat16 (AMX): the same on every CPU.
    monkeypatch.setattr(train, "BF16_MIN_WIDTH", 1)
    monkeypatch.setattr(train, "bf16_cpu", lambda: True)
    dtypes, pick_dtype = [], train.pick_dtype
    monkeypatch.setattr(train, "pick_dtype", lambda *a, **k: dtypes.append(pick_dtype(*a, **k)) or dtypes[-1])
    assert main(["pretrain", "--preset", "tiny", "--data", str(data_dir), "--out", str(tmp_path / "amx"),
                 "--max-steps", "1"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--task", "loss", "--batches", "3"]) == 0
    assert dtypes == [torch.bfloat16, torch.float32]  # the training (with AMX), then the evaluation
    out = capsys.readouterr()
    result = json.loads((run / "eval_loss.json").read_text())
    assert "bits per byte" in out.out
    assert 0 < result["val_loss"] < math.log(64) + 0.5
    assert result["batch_size"] == 64 and 1 <= result["batches"] <= 3  # what was read, not what was asked
    assert math.isclose(result["val_bpb"], result["val_loss"] / math.log(2), rel_tol=1e-6)  # ASCII: 1 byte/char
    assert "note:" not in out.err
    # 50 batches of 64 random windows (the default) read a small val split many times over, for minutes: the
    # batches stop at about one window per block_size val tokens.
    meta = json.loads((data_dir / "meta.json").read_text())
    block = json.loads((run / "config.json").read_text())["model"]["block_size"]
    assert main(["eval", str(run), "--task", "loss"]) == 0
    batches = math.ceil(math.ceil(meta["val_tokens"] / block) / 64)
    assert 1 <= batches < 50 and f"evaluating {batches} batch" in capsys.readouterr().err
    # --batches 0: the whole val split once, in order: every token but each shard's first scored once, whatever
    # the batch; exact and repeatable, where random windows estimate (seed 000's users compare runs by it)
    from homellm.data import open_split
    from homellm.eval import whole_split_loss

    assert main(["eval", str(run), "--task", "loss", "--batches", "0"]) == 0
    assert "the whole val split" in capsys.readouterr().err
    whole = json.loads((run / "eval_loss.json").read_text())
    shards = open_split(data_dir, "val")
    assert whole["tokens"] == sum(len(m) - 1 for m in shards)
    model = load_model(run, "best")
    env = train.setup_env(train.TrainConfig(device="cpu", dtype="float32"))
    tok = Tokenizer.load(data_dir)
    one = whole_split_loss(model, shards, block, 1, tok.token_bytes(), env)  # a window at a time: no padding
    assert math.isclose(one["val_loss"], whole["val_loss"], rel_tol=1e-5) and one["tokens"] == whole["tokens"]
    nats = count = 0.0  # and the loss itself, computed here: each next token from consecutive windows (review)
    with torch.no_grad():
        for m in shards:
            ids = torch.from_numpy(np.asarray(m, dtype=np.int64))
            for i in range(0, len(ids) - 1, block):
                x, y = ids[i:i + block][None], ids[i + 1:i + block + 1]
                logits = model(x[:, :len(y)])[0][0]
                nats += torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
                count += len(y)
    assert count == whole["tokens"] and math.isclose(whole["val_loss"], nats / count, rel_tol=1e-5)
    nbytes = sum(int(tok.token_bytes()[np.asarray(m[1:])].sum()) for m in shards)  # the bytes of every target
    assert math.isclose(whole["val_bpb"], whole["val_loss"] * whole["tokens"] / math.log(2) / nbytes, rel_tol=1e-6)
    # Raw text, as pretrain --data takes it: every token of it scored once with the run's tokenizer (it said "not a
    # prepared data folder"); a small text of one document: each id a target (the first read after end of text, as
    # a document is in training: it was never scored), ASCII one byte each
    text = "the cat sat on the mat.\n" * 40
    (tmp_path / "held.txt").write_text(text)
    assert main(["eval", str(run), "--task", "loss", "--data", str(tmp_path / "held.txt")]) == 0
    out, err = capsys.readouterr()
    assert f"evaluating all of {tmp_path / 'held.txt'} once" in err
    assert "val loss" not in out and "val bits" not in out and "loss (nats/token)" in out  # all of it: no val split
    raw = json.loads((run / "eval_loss.json").read_text())
    assert raw["tokens"] == len(tok.encode(text)) + 1  # the ids and the end of text after them
    assert math.isclose(raw["val_bpb"] * math.log(2) * len(text), raw["val_loss"] * raw["tokens"], rel_tol=1e-6)
    assert main(["eval", str(run), "--task", "loss", "--data", str(tmp_path / "nowhere.txt")]) == 2
    assert "--data " + str(tmp_path / "nowhere.txt") + ": not found" in capsys.readouterr().err
    # A .jsonl with another field, through a glob (as pretrain --data takes them): the same text, the same score
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "held.jsonl").write_text(json.dumps({"content": text}) + "\n")
    assert main(["eval", str(run), "--task", "loss", "--data", str(tmp_path / "texts" / "*.jsonl"), "--text-field",
                 "content"]) == 0
    assert json.loads((run / "eval_loss.json").read_text())["val_loss"] == raw["val_loss"]
    # Token files are not text (nanoGPT's pair was taken over as the text to score, its train.bin only); a run
    # neither
    nano = tmp_path / "nano"
    nano.mkdir()
    for name in ("train.bin", "val.bin"):
        np.arange(50, dtype=np.uint16).tofile(nano / name)
    capsys.readouterr()
    assert main(["eval", str(run), "--task", "loss", "--data", str(nano)]) == 2
    assert f"--data {nano}: nanoGPT's token files, without homellm's meta.json: `homellm prepare --input {nano} " \
           f"--tokenizer {run} --out DATA` takes them as they are (no copy), then --data DATA" in \
           capsys.readouterr().err  # (prepare takes a nanoGPT pair over: it was told to prepare "the text")
    assert main(["eval", str(run), "--task", "loss", "--data", str(run)]) == 2
    assert f"--data {run} is a run: omit --data to score {run}'s own data" in capsys.readouterr().err
    # A quickstart run trained on answers alone: its every-token loss is said not to be its val loss.
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "task": "arithmetic"}))
    assert main(["eval", str(run), "--task", "loss", "--batches", "1"]) == 0
    assert "trained on the arithmetic answers alone; this loss scores every token" in capsys.readouterr().err


def test_quickstart_generates_problems_in_proportion_to_its_budget():
    assert [default_problems(t) for t in (600, 1800, 20, 0.5)] == [500_000, 500_000, 16_667, 1000]


def test_a_quickstart_budget_that_the_evaluation_fills_says_so(tmp_path):
    """It blamed the data: "preparing the data took 2 s, no time is left to train"."""
    from homellm.quickstart import quickstart

    with pytest.raises(HomeLLMError, match=r"--max-time 20: starting took \d+ s and 76 s are "
                                           r"kept for the evaluation \(50,000 problems\), so no time is left to train: "
                                           r"raise --max-time, or lower --problems or --n"):
        quickstart(QuickstartConfig(out=str(tmp_path / "q"), max_time=20, n=50_000, problems=1000))
    assert not (tmp_path / "q").exists()  # refused before its data was made (review: stages 1-3 ran first)
    # The budget is the command's, from its start: importing PyTorch took 2 s of a --max-time 30 before it counted.
    with pytest.raises(HomeLLMError, match=r"--max-time 30: starting took 3[0-9] s and 4 s"):
        quickstart(QuickstartConfig(out=str(tmp_path / "r"), max_time=30, problems=1000), time.perf_counter() - 30)


def test_short_quickstart_runs_end_to_end(tmp_path, capsys, monkeypatch):
    from homellm.cli import main

    run = tmp_path / "qs"
    # (10 s: a loaded machine took 5 s to start and prepare, and 6 s left no time to train)
    proc = homellm("quickstart", "--out", str(run), "--max-time", "10", "--problems", "3000", "--n", "40")
    assert "accuracy" in proc.stdout and "overall" in proc.stdout and "homellm generate" in proc.stdout
    assert f"homellm info {run}" in proc.stdout
    if json.loads((run / "eval_arithmetic.json").read_text())["accuracy"] < 0.5:  # (10 s: a few dozen steps)
        assert "(few steps for this task: it takes some thousands" in proc.stdout and "--max-digits" not in proc.stdout
    for stage in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert stage in proc.stderr
    result = json.loads((run / "eval_arithmetic.json").read_text())
    assert result["n"] == 40 and 0 <= result["accuracy"] <= 1
    assert sum(b["n"] for b in result["by"]["operator"].values()) == 40
    # Rows are shorter than the model's context, and the token counts say what was really read.
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["block_size"] > ROW_TOKENS
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["tokens"] == last["step"] * config["train"]["batch_size"] * ROW_TOKENS
    # The run is an ordinary run directory: every verb takes it (in-process, for the suite's time).
    assert main(["generate", str(run), "--prompt", "$12 \\times 7 =", "--temperature", "0", "--max-new-tokens",
                 "8"]) == 0
    assert capsys.readouterr().out.startswith("$12 \\times 7 =")
    assert main(["info", str(run)]) == 0  # one of the next commands the quickstart prints
    info = capsys.readouterr().out
    assert " train / " in info and "val bits/byte" in info and " ok" in info
    assert main(["quickstart", "--out", str(run), "--max-time", "4"]) == 2
    assert "already holds" in capsys.readouterr().err
    # Trained further (the seed-004 user wanted to stop and go on): from its `last`, on its own rows, for --max-time
    # more; the run was refused as trained, and pretrain --resume refused it too
    steps = json.loads((run / "last" / "checkpoint.json").read_text())["step"]
    first = json.loads((run / "quickstart.json").read_text())
    assert first["sessions"] == [{"minutes": first["minutes"], "step": steps, "accuracy": first["accuracy"]}]
    assert main(["quickstart", "--out", str(run), "--resume", "--max-time", "8", "--n", "20"]) == 0
    out, err = capsys.readouterr()
    # The report keeps each start's figures, and its minutes are the whole run's (they were the last start's, beside
    # the steps of both, and the first report was lost)
    report = json.loads((run / "quickstart.json").read_text())
    assert report["sessions"][0] == first["sessions"][0] and report["sessions"][1]["step"] > steps, (first, report)
    assert report["minutes"] == pytest.approx(sum(s["minutes"] for s in report["sessions"]), abs=0.011)
    assert f"min for this part, {report['minutes']:.1f} in all over 2 starts" in out
    assert f"training {run} further for" in err and f"resuming {run} from last at step {steps}" in err
    assert json.loads((run / "last" / "checkpoint.json").read_text())["step"] > steps
    assert json.loads((run / "quickstart.json").read_text())["summary"]["steps"] > steps
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == sorted({r["step"] for r in records})  # one log, going on
    for argv, message in ((["--chat"], "--resume trains the quickstart's model further, not its chat stage"),
                          ([], "is not a run of `homellm quickstart`")):
        where = run if argv else tmp_path / "plain"
        if not argv:
            shutil.copytree(run, where)
            config = json.loads((where / "config.json").read_text())
            (where / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "task"}))
        assert main(["quickstart", "--out", str(where), "--resume", *argv]) == 2
        assert message in capsys.readouterr().err
    assert main(["pretrain", "--out", str(run), "--resume"]) == 2
    assert f"`homellm quickstart --out {run} --resume --max-time SECONDS`" in capsys.readouterr().err
    assert main(["quickstart", "--out", str(run), "--resume", "--problems", "9000"]) == 2  # (was ignored, unsaid)
    assert capsys.readouterr().err == ("homellm: error: --problems 9000: --resume trains on the problems the run was "
                                       "made with; drop --problems, or start a new run with another --out\n")
    assert main(["eval", str(run), "--n", "20", "--max-digits", "3"]) == 0
    assert "eval: --task arithmetic (the run was trained on the arithmetic task;" in capsys.readouterr().err
    assert json.loads((run / "eval_arithmetic_3d.json").read_text())["max_digits"] == 3
    # The score is of the model's own answers to the held-out problems: scripted answers, right, wrong and malformed
    # in turn, score as written (a score of the expected answers passed the checks above).
    from homellm import eval as module
    from homellm.config import EvalConfig

    problems = arithmetic.generate(40, 7, split="heldout")
    asked: list[str] = []

    def scripted(model, tok, prompts, *args, **kwargs) -> list[str]:
        asked.extend(prompts)
        return [[arithmetic.completion(p), " 1234567$", " x$"][i % 3] for i, p in enumerate(problems)]

    monkeypatch.setattr(module, "greedy_complete", scripted)
    result = module.eval_arithmetic(run, EvalConfig(n=40, seed=7), quiet=True)
    assert asked == [arithmetic.prompt(p) for p in problems]
    assert (result["correct"], result["malformed"]) == (14, 13)
    for op, bucket in result["by"]["operator"].items():
        assert bucket["correct"] == sum(i % 3 == 0 for i, p in enumerate(problems) if p.operator == op), op
    assert {f["got"] for f in result["failures"]} == {" 1234567$", " x$"}
    # Your own prompts typed with an input method's full-width digits: asked and compared as the model writes them
    # (its char tokenizer read ５ as unknown, and could never write the expected ８)
    qa = tmp_path / "fw.jsonl"
    qa.write_text(json.dumps({"prompt": "$５ + ３ =", "answer": " ８$"}, ensure_ascii=False) + "\n", encoding="utf-8")
    monkeypatch.setattr(module, "greedy_complete", lambda model, tok, prompts, *a, **k: asked.extend(prompts)
                        or [" 8$"])
    capsys.readouterr()
    assert module.eval_exact(run, EvalConfig(task="exact", data=str(qa)))["correct"] == 1
    assert asked[-1] == "$5 + 3 =" and "1 line of" in capsys.readouterr().err


def test_quickstart_chat_stage_fine_tunes_and_scores_each_phrasing(tmp_path, capsys, monkeypatch):
    run = tmp_path / "qs"
    proc = homellm("quickstart", "--out", str(run), "--max-time", "10", "--problems", "3000", "--n", "20", "--chat",
                   "--chat-problems", "400")
    for stage in ("[1/7]", "[6/7]", "[7/7]"):
        assert stage in proc.stderr
    assert f"homellm chat {run / 'chat'}" in proc.stdout
    result = json.loads((run / "chat" / "eval_chat_arithmetic.json").read_text())
    assert set(result["by_phrasing"]) == {"en", "ja", "symbols"}
    assert all(r["n"] == 20 for r in result["by_phrasing"].values())
    config = json.loads((run / "chat" / "config.json").read_text())
    assert config["sft"]["init"] == str(run.resolve())
    assert config["sft_data"]["conversations"] + config["sft_data"]["duplicates_dropped"] == 400  # a problem may recur
    # Pretraining for chat reads rows of the whole context, since replies come after the question.
    pretrained = json.loads((run / "config.json").read_text())
    last = json.loads((run / "quickstart.json").read_text())["summary"]
    assert last["tokens"] == last["steps"] * pretrained["train"]["batch_size"] * pretrained["model"]["block_size"]
    # The chat run is an ordinary run: eval takes it again, and a pretrained-only run is not a chat model.
    from homellm.cli import main  # (in this process: each start costs seconds of imports)

    assert main(["eval", str(run / "chat"), "--n", "5"]) == 0  # the task it was fine-tuned on, unasked
    out, err = capsys.readouterr()
    assert "ja" in out and "overall" in out and "eval: --task chat-arithmetic (the run is the quickstart's chat" in err
    # Trained further, the base leaves its chat model behind: said, with how to fine-tune anew
    assert main(["quickstart", "--out", str(run), "--resume", "--max-time", "4", "--n", "5"]) == 0
    assert f"note: {run / 'chat'}, the chat model fine-tuned from this one, stays as it was" in capsys.readouterr().err
    assert json.loads((run / "quickstart.json").read_text())["chat"]["by_phrasing"].keys() == {"en", "ja", "symbols"}
    assert main(["eval", str(run / "chat"), "--task", "arithmetic"]) == 2
    assert "is the quickstart's chat model, fine-tuned to answer the task's questions: `homellm eval " \
           f"{run / 'chat'} --task chat-arithmetic` scores it" in capsys.readouterr().err
    assert main(["eval", str(run), "--task", "chat-arithmetic", "--n", "5"]) == 2
    assert f"is the quickstart's base model; its chat model is {run / 'chat'}" in capsys.readouterr().err
    # Scored as replied: scripted replies (the problem's line, another answer, and another problem's line, each a
    # third of every phrasing's), asked as user messages of the held-out problems (review: only n was checked)
    from homellm import eval as module
    from homellm.chat import prompt_ids
    from homellm.config import EvalConfig

    problems = arithmetic.generate(9, 4, split="heldout")
    tok, asked = Tokenizer.load(run / "chat"), []

    def replies(model, tok_, prompts, *args, **kwargs) -> list[str]:
        asked.append(prompts)
        return [[arithmetic.line(p) + "<|im_end|>", arithmetic.prompt(p) + " 1234567$",
                 arithmetic.line(problems[(i + 1) % len(problems)])][i % 3] for i, p in enumerate(problems)]

    monkeypatch.setattr(module, "greedy_complete", replies)
    scored = module.eval_chat_arithmetic(run / "chat", EvalConfig(task="chat-arithmetic", n=9, seed=4), quiet=True)
    assert [(r["n"], r["correct"]) for r in scored["by_phrasing"].values()] == [(9, 3)] * 3
    assert scored["accuracy"] == 1 / 3
    first = prompt_ids(tok, [{"role": "user", "content": arithmetic.question(problems[0], "en", random.Random(4))}])
    assert len(asked) == 3 and asked[0][0] == first  # the first question, as the chat model is asked it
    monkeypatch.undo()
    # Killed in its chat stage, the quickstart cannot start again there: it says how to finish that stage

    def rerun() -> str:
        assert main(["quickstart", "--chat", "--out", str(run)]) == 2
        return capsys.readouterr().err

    assert "chat stage" not in rerun()  # (finished)
    (run / "quickstart.json").unlink()
    assert f"its chat stage stopped: go on with `homellm sft --resume --out {run / 'chat'}`" in rerun()
    shutil.rmtree(run / "chat")
    assert (f"its chat stage stopped before its first checkpoint: fine-tune it with `homellm sft --init {run} --data "
            f"{run / 'task' / 'chat.jsonl'} --out {run / 'chat'}`") in rerun()


def test_ctrl_c_in_the_quickstarts_training_goes_on_to_evaluate_and_skips_the_chat_stage(tmp_path, monkeypatch):
    """It said "with a checkpoint to --resume from", which no quickstart can, then fine-tuned for minutes."""
    run = tmp_path / "qs"
    proc = homellm("quickstart", "--out", str(run), "--max-time", "60", "--problems", "3000", "--n", "20", "--chat",
                   "--chat-problems", "400", env={"HOMELLM_FAULT_SIGINT_AT_STEP": "1"}, check=False)
    assert proc.returncode == 130 and "--resume" not in proc.stderr and "Traceback" not in proc.stderr
    assert "stopping after this step, then the evaluation of the model as it is, without the chat stage" in proc.stderr
    assert "[5/7]" in proc.stderr and "[6/7]" not in proc.stderr and not (run / "chat").exists()
    assert "held-out problems after 1 step (" in proc.stdout and "; the training stopped early by Ctrl-C" in proc.stdout
    assert "homellm chat" not in proc.stdout
    assert proc.stderr.endswith("homellm: interrupted: the training stopped early (Ctrl-C), and the figures above are "
                                "for the model as it was then; for the whole run, run the quickstart again with a new "
                                "--out\n")
    # Trained further, it goes on from the seconds it used, not the budget it had: after 1 step of about 40 s, a
    # --resume of 6 s trained all the unused budget besides (review: 81 s more for --max-time 20)
    from homellm.cli import main

    before = json.loads((run / "config.json").read_text())["train"]["max_time"]
    assert main(["quickstart", "--out", str(run), "--resume", "--max-time", "6", "--n", "5"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["max_time"] < before / 2
    # Stopped again a step past its `best`: the model as it is, `last`, is evaluated, as said (audit: `best` was)
    best = json.loads((run / "best" / "checkpoint.json").read_text())["step"]
    assert json.loads((run / "last" / "checkpoint.json").read_text())["step"] == best  # (its end evaluated)
    monkeypatch.setenv("HOMELLM_FAULT_SIGINT_AT_STEP", str(best + 1))
    with pytest.raises(SystemExit) as stop:
        main(["quickstart", "--out", str(run), "--resume", "--max-time", "30", "--n", "5"])
    assert stop.value.code == 130
    assert json.loads((run / "last" / "checkpoint.json").read_text())["step"] == best + 1
    assert json.loads((run / "eval_arithmetic.json").read_text())["checkpoint"] == "last"


def test_quickstart_never_replaces_a_users_files_where_it_writes_its_own(tmp_path, capsys):
    """task/train.txt and the rest were written over whatever the --out folder held there; what an earlier start
    of the same run left (stopped before training) is its own, and is written again."""
    from homellm.quickstart import build_data, check_own_files

    run = tmp_path / "qs"
    build_data(run, 1000, 0, words=arithmetic.WORDS)
    problems = arithmetic.generate(5, 0)
    records = arithmetic.conversations(problems, 0)
    (run / "task" / "chat.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    (run / "chat").mkdir()
    check_own_files(run, chat=True)  # all the quickstart's own: no error
    for name, theirs in [("task/train.txt", "my notes\n"), ("task/alphabet.txt", "abc"),
                         ("task/chat.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n'),
                         ("data_tokenizer", None), ("chat", "")]:
        mine = tmp_path / name.replace("/", "-")
        shutil.copytree(run, mine)
        target = mine / name
        if theirs is None:  # another tokenizer in its place
            train_tokenizer(TokenizerConfig(input=[str(mine / "task" / "train.txt")], out=str(tmp_path / "t"),
                                            kind="char"))
            shutil.rmtree(target)
            shutil.copytree(tmp_path / "t", target)
            shutil.rmtree(tmp_path / "t")
        elif target.is_dir():
            (target / "notes.txt").write_text("mine")
        else:
            target.write_text(theirs)
        with pytest.raises(HomeLLMError, match=f"--out {mine} holds {name}, which the quickstart did not write"):
            check_own_files(mine, chat=True)
    for name in ("task/chat.jsonl", "chat"):  # looked at only where the quickstart writes them: with --chat
        check_own_files(tmp_path / name.replace("/", "-"), chat=False)
    # A start killed while its tokenizer was written left the save's first files, or an empty folder: its own
    killed = tmp_path / "killed"
    shutil.copytree(run, killed)
    for gone in ("tokenizer.json", "special_tokens_map.json", "tokenizer_config.json"):
        (killed / "data_tokenizer" / gone).unlink()
        check_own_files(killed, chat=True)
    (killed / "data_tokenizer" / ".tokenizer_config.json.999999999.ab12_cd.tmp").write_text('{"tok')  # mid-write
    check_own_files(killed, chat=True)
    (killed / "data_tokenizer" / "NOTES.txt").write_text("mine")  # but not beside the user's own files
    with pytest.raises(HomeLLMError, match="holds data_tokenizer, which the quickstart did not write"):
        check_own_files(killed, chat=True)
    # As the command runs it: refused before anything is written
    from homellm.cli import main

    mine = tmp_path / "task-train.txt"
    capsys.readouterr()
    assert main(["quickstart", "--out", str(mine), "--max-time", "5"]) == 2
    assert "holds task/train.txt, which the quickstart did not write" in capsys.readouterr().err
    assert (mine / "task" / "train.txt").read_text() == "my notes\n"


def test_chat_questions_keep_the_problem_and_score_replies_exactly():
    import random

    problems = arithmetic.generate(200, seed=3)
    rng = random.Random(0)
    for p in problems:
        for phrasing in arithmetic.PHRASINGS:
            q = arithmetic.question(p, phrasing, rng)
            assert arithmetic.format_operand(p.a) in q and arithmetic.format_operand(abs(p.b)) in q
    records = arithmetic.conversations(problems[:6], seed=0)
    assert [r["messages"][1]["content"] for r in records] == [arithmetic.line(p) for p in problems[:6]]
    p = arithmetic.Problem(12, r"\times", 7)
    scored = arithmetic.score([p] * 4, [arithmetic.reply_completion(p, r) for r in (
        r"$12 \times 7 = 84$", r"$12 \times 7 = 85$", r"$12 \times 8 = 84$", r"$12 \times 7 = 84$ and more")])
    assert scored["correct"] == 1 and scored["malformed"] == 2
    assert set(arithmetic.chat_chars()) >= set("What is×÷は？かける")


def test_quickstart_decodes_on_one_thread_and_gives_the_threads_back():
    from homellm.quickstart import _one_thread

    before = torch.get_num_threads()
    with pytest.raises(KeyboardInterrupt), _one_thread():
        assert torch.get_num_threads() == 1
        raise KeyboardInterrupt  # given back however the evaluation ends
    assert torch.get_num_threads() == before


def test_exact_scores_your_own_prompts_line_or_turn(tmp_path, capsys, monkeypatch):
    """Seed 004 asked its model "1 + 1 =" by hand: `eval --task exact --data FILE` scores such prompts. A pretrained
    run's answer ends at the line's end, a chat run's at the end of its turn; surrounding spaces do not count."""
    import homellm.eval as eval_module
    from homellm.cli import main
    from test_repl import REPLY, USER, build_chat_run

    (tmp_path / "base").mkdir()
    (tmp_path / "chat").mkdir()
    _, tok, run = build_chat_run(tmp_path / "base")
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"prompt": "1 + 1 =", "answer": "2", "category": "add"},
        {"question": "2 + 2 =", "expected": 4, "category": "add"},
        {"prompt": "3 x 3 =", "answer": "9", "category": "mul"}, {"prompt": "5 + 3 =", "answer": "8"}]) + "\n")
    asked = []

    def scripted(model, tok, prompts, max_new_tokens, stop, batch_size=256, desc=""):
        asked.append(prompts)
        return [" 2\n3 + 3 = 6", " 4<|endoftext|>", "9.0\n", " 3.5\n"]

    monkeypatch.setattr(eval_module, "greedy_complete", scripted)
    assert main(["eval", str(run), "--task", "exact", "--data", str(qa)]) == 0
    out = capsys.readouterr().out
    assert asked == [["1 + 1 =", "2 + 2 =", "3 x 3 =", "5 + 3 ="]]  # continued as text: a pretrained run
    result = json.loads((run / "eval_exact.json").read_text())
    assert (result["n"], result["correct"], result["chat"]) == (4, 2, False)
    assert result["by_category"] == {"add": {"n": 2, "correct": 2, "accuracy": 1.0},
                                     "mul": {"n": 1, "correct": 0, "accuracy": 0.0}}
    assert [f["got"] for f in result["failures"]] == ["9.0", " 3.5"]
    assert [line.split() for line in out.splitlines()[2:6]] == [
        ["(none)", "1", "0", "0.0", "%"], ["add", "2", "2", "100.0", "%"], ["mul", "1", "0", "0.0", "%"],
        ["overall", "4", "2", "50.0", "%"]]
    assert "'5 + 3 =' -> '3.5' (expected '8')" in out
    assert main(["eval", str(run), "--task", "exact", "--data", str(qa), "--n", "1"]) == 0
    assert asked[-1] == ["1 + 1 ="]
    monkeypatch.undo()
    # A chat run, really decoded: the overfit model answers its one conversation, as a whole turn of two lines.
    _, tok, chat = build_chat_run(tmp_path / "chat", sft=True)
    qa.write_text(json.dumps({"prompt": USER, "answer": REPLY}, ensure_ascii=False) + "\n"
                  + json.dumps({"prompt": USER, "answer": "おしまい"}, ensure_ascii=False) + "\n")
    assert main(["eval", str(chat), "--task", "exact", "--data", str(qa)]) == 0
    result = json.loads((chat / "eval_exact.json").read_text())
    assert (result["chat"], result["correct"], result["failures"][0]["got"]) == (True, 1, REPLY)
    assert result["compared"] == "whole answers"
    # GSM8K's answers are worked solutions ending in "#### N": the final answers are compared (the whole solution
    # compared scored about 0 for any model).
    qa.write_text("\n".join(json.dumps(r) for r in [
        {"question": "Ann has 3 bags of 4 apples. How many?", "answer": "3 bags of 4 is <<3*4=12>>12.\n#### 12"},
        {"question": "1000 + 234?", "answer": "1000 + 234 = <<1000+234=1234>>1234\n#### 1,234"},
        {"question": "9 - 2?", "answer": "9 - 2 = 7\n#### 7"}]) + "\n")
    monkeypatch.setattr(eval_module, "greedy_complete", lambda *a, **k: [
        "Each bag has 4, so 3 x 4 = 12.\n#### $12.", "It is 1234.\n#### 1234", "9 - 2 = 7, so 7"])
    capsys.readouterr()
    assert main(["eval", str(chat), "--task", "exact", "--data", str(qa)]) == 0
    result = json.loads((chat / "eval_exact.json").read_text())
    assert (result["compared"], result["correct"], result["n"]) == ("final answers (####)", 2, 3)
    said = capsys.readouterr()
    assert "the final answers are compared, not the worked solutions" in said.err
    # The failure shown is of what was compared (the whole worked solution was shown as "expected")
    assert "  '9 - 2?' -> no #### ANSWER (expected 7)\n" in said.out
    assert (result["failures"][0]["expected_final"], result["failures"][0]["got_final"]) == ("7", None)
    # A model going on past its answer ("cents", the next question) is right as GSM8K's `#### (-?[0-9.,]+)` reads it;
    # "####" with nothing after is no answer; one line without "####" is compared whole, the others still by it (it
    # turned every comparison to whole solutions, unsaid: review)
    qa.write_text("\n".join(json.dumps(r) for r in [
        {"question": "Cents?", "answer": "#### 800"}, {"question": "Next?", "answer": "#### 5"},
        {"question": "Empty?", "answer": "#### 3"}, {"question": "2+2?", "answer": "4"}]) + "\n")
    monkeypatch.setattr(eval_module, "greedy_complete", lambda *a, **k: [
        "So #### 800 cents", "#### 5\nQuestion: and 6?", "####", "4"])
    assert main(["eval", str(chat), "--task", "exact", "--data", str(qa)]) == 0
    result, said = json.loads((chat / "eval_exact.json").read_text()), capsys.readouterr()
    assert (result["correct"], result["compared"]) == (3, "final answers (####) where given, else whole answers")
    assert "note: 3 of the 4 answers end in GSM8K's '#### ANSWER', and are compared by it; the other is " \
           "compared whole (the first asks '2+2?')" in said.err
    assert "  'Empty?' -> no #### ANSWER (expected 3)\n" in said.out
    assert result["checkpoint"] == "best"
    shutil.copytree(chat / "best", chat / "last")  # no `best` yet: `last` is scored, and the report says so (review)
    shutil.move(chat / "best", tmp_path / "best")
    assert main(["eval", str(chat), "--task", "exact", "--data", str(qa)]) == 0
    assert json.loads((chat / "eval_exact.json").read_text())["checkpoint"] == "last"
    shutil.move(tmp_path / "best", chat / "best")
    shutil.rmtree(chat / "last")
    monkeypatch.undo()
    capsys.readouterr()
    no_answer = "qa.jsonl:1: no answer (a string in 'answer' or 'expected' or 'completion' or 'response' or 'output')"
    for lines, message in [(None, "no such file"), ("{bad\n", "qa.jsonl:1: "), ('{"prompt": "x"}\n', no_answer),
                           ("", "no prompt and answer pairs"), ('["x"]\n', "qa.jsonl[0]: not a JSON object"),
                           ('{"prompt": "x", "answer": true}\n',
                            "qa.jsonl:1: 'answer' is True, not a string: write the answer as text")]:
        qa.unlink(missing_ok=True)
        if lines is not None:
            qa.write_text(lines)
        assert main(["eval", str(run), "--task", "exact", "--data", str(qa)]) == 2
        assert message in capsys.readouterr().err, message
    qa.write_text(json.dumps({"prompt": "a", "answer": "two\nlines"}) + "\n")
    assert main(["eval", str(run), "--task", "exact", "--data", str(qa)]) == 2
    assert "spans lines, but a pretrained run's answer ends at the line's end" in capsys.readouterr().err
    assert main(["eval", str(run), "--task", "exact"]) == 2
    assert "--task exact needs --data FILE" in capsys.readouterr().err


def test_tables_align_categories_named_in_japanese():
    """A category of kanji takes two terminal columns a character: the counts after it still line up."""
    lines = table([("足し算", "2", "50.0 %"), ("overall", "12", "75.0 %")], ("category", "n", "accuracy")).splitlines()
    ends = {display_width(line[:line.index(n) + len(n)]) for line, n in zip(lines[2:], ("2", "12"))}
    assert len(ends) == 1
    assert len({display_width(line) for line in lines[2:]}) == 1  # the accuracy column too


def test_an_interrupted_quickstart_says_how_to_go_on(monkeypatch, capsys):
    """Its training stopped by Ctrl-C: the model trains further with --resume (a --chat run's chat stage does not:
    it is run again); before --resume there was only a new --out."""
    import homellm.quickstart as module
    from homellm.cli import main

    for chat, further in ((False, "`homellm quickstart --out runs/q --resume --max-time SECONDS` trains it further"),
                          (True, "for the whole run, run the quickstart again with a new --out")):
        monkeypatch.setattr(module, "quickstart", lambda cfg, started, chat=chat: {
            "interrupted": ["training"], "run": "runs/q", "chat": chat})
        with pytest.raises(SystemExit) as stop:
            main(["quickstart", "--out", "runs/q"])
        assert stop.value.code == 130
        assert capsys.readouterr().err.endswith(f"the figures above are for the model as it was then; {further}\n")
