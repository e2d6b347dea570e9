"""The terminal chat, driven by scripted input: slash commands change the settings generation uses, bad values
change nothing, /save and /reset keep and forget turns, old turns leave a full context with a notice (never the
system prompt), and Ctrl-C stops a reply without ending the chat."""

import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from homellm import repl
from homellm.chat import prompt_ids, render, to_markdown
from homellm.checkpoint import save_checkpoint
from homellm.config import ChatConfig, GenerateConfig, ModelConfig, TokenizerConfig, TrainConfig, save_json, to_dict
from homellm.io import stamped
from homellm.model import GPT
from homellm.repl import Chat, Continuations, chat_loop
from homellm.tokenizer import Tokenizer, train_tokenizer

JA = "むかしむかし、ある山のふもとに小さな村がありました。村には川が流れていて、春になると桜の花がたくさん咲きました。"
EN = "The quick brown fox jumps over the lazy dog. A small village sat at the foot of a mountain.\n"
USER = "こんにちは"
REPLY = "むかしむかし、ある山に | 小さな村がありました。\nおしまい"  # a pipe and a line break for compare's table
GREEDY = ChatConfig(temperature=0.0, max_new_tokens=40)


def build_chat_run(root: Path, sft: bool = False) -> tuple[GPT, Tokenizer, Path]:
    """A tiny model overfit on one chat (USER -> REPLY), and a run directory holding it (no training run)."""
    corpus = root / "corpus.txt"
    corpus.write_text((JA + "\n" + EN + USER + "\n" + REPLY + "\nsystem\nuser\nassistant\n") * 3, encoding="utf-8")
    tok = train_tokenizer(TokenizerConfig(input=[str(corpus)], out=str(root / "tok"), vocab_size=300))
    ids, _ = render(tok, [{"role": "user", "content": USER}, {"role": "assistant", "content": REPLY}])
    cfg = ModelConfig(family="llama", vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=64)
    assert len(ids) <= cfg.block_size
    torch.manual_seed(0)
    model = GPT(cfg)
    x = torch.tensor([ids])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32-wide model gains nothing from threads and loses much when the cores are busy
    try:
        for _ in range(200):
            _, loss = model(x[:, :-1], x[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.05
    run = root / "run"
    tok.save(run / "tokenizer")
    save_json(run / "config.json", {"model": to_dict(cfg), "train": to_dict(TrainConfig()), **({"sft": {}} if sft
                                                                                                else {})})
    save_checkpoint(run, "best", model, None, {"step": 200})
    return model.eval(), tok, run


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory) -> tuple[GPT, Tokenizer, Path]:
    return build_chat_run(tmp_path_factory.mktemp("chat"))


def script(*lines: str):
    """An input function that answers with `lines`, then end of input (Ctrl-D); `.rest` holds what is unread."""
    rest = iter(lines)

    def input_fn(prompt: str = "") -> str:
        try:
            return next(rest)
        except StopIteration:
            raise EOFError from None

    input_fn.rest = rest
    return input_fn


@pytest.fixture
def calls(monkeypatch) -> list[tuple[list[int], ChatConfig]]:
    """Every (prompt ids, config) the chat generates from."""
    seen, real = [], repl.stream_ids

    def spy(model, tok, ids, cfg, stats=None, generator=None, keep=0):
        seen.append((list(ids), cfg))
        yield from real(model, tok, ids, cfg, stats, generator, keep)

    monkeypatch.setattr(repl, "stream_ids", spy)
    return seen


def run_chat(chat_run, *lines: str, cfg: ChatConfig = GREEDY):
    model, tok, _ = chat_run
    out = io.StringIO()
    chat = chat_loop(model, tok, cfg, script(*lines), out)
    return chat, out.getvalue()


def stats_lines(text: str) -> list[int]:
    """The token counts of the `[N tokens, X tokens/s]` lines."""
    return [int(n) for n in re.findall(r"^\[(?:interrupted: )?(\d+) tokens?, [\d.]+ tokens/s\]$", text, re.M)]


def test_a_reply_streams_clean_japanese_and_reports_its_speed(chat_run):
    model, tok, _ = chat_run
    writes: list[str] = []
    out = io.StringIO()
    out.write = lambda s: writes.append(s) or len(s)
    chat = chat_loop(model, tok, GREEDY, script(USER), out)
    assert chat.turns == [(USER, REPLY)]
    end = next(i for i, w in enumerate(writes) if w.startswith("\n["))  # the speed line after the reply
    pieces = writes[1:end]  # after the banner
    assert "".join(pieces) == REPLY and len(pieces) > 1  # streamed piece by piece
    assert not any("\ufffd" in w for w in writes)
    assert stats_lines("".join(writes)) == [len(tok.encode(REPLY))]


def test_a_reply_cut_by_max_tokens_never_ends_in_half_a_character(chat_run):
    _, tok, _ = chat_run
    ids = tok.encode(REPLY)
    assert any(tok.decode(ids[:n]).endswith("\ufffd") for n in range(1, len(ids)))  # some cuts split a character
    for n in range(1, len(ids)):
        chat, text = run_chat(chat_run, USER, cfg=dataclasses.replace(GREEDY, max_new_tokens=n))
        reply = chat.turns[0][1]
        assert REPLY.startswith(reply) and "\ufffd" not in text
        assert len(reply) >= len(tok.decode(ids[:n]).rstrip("\ufffd"))  # only the broken character is held back


def test_slash_commands_change_what_generation_uses(chat_run, calls):
    _, tok, _ = chat_run
    chat, text = run_chat(chat_run, "/temperature 0.5", "/top_k 7", "/top_p 0.9", "/max_tokens 5",
                          "/repetition_penalty 1.3", "/seed 42", "/system Be brief.", "/help", "hello")
    assert len(calls) == 1
    ids, cfg = calls[0]
    assert (cfg.temperature, cfg.top_k, cfg.top_p, cfg.max_new_tokens) == (0.5, 7, 0.9, 5)
    assert (cfg.repetition_penalty, cfg.seed) == (1.3, 42)
    assert cfg == chat.cfg and cfg.system == "Be brief."
    assert ids == prompt_ids(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}])
    assert stats_lines(text)[0] <= 5
    # Written as the command line's flags are (they were unknown commands)
    chat, _ = run_chat(chat_run, "/top-p 0.5", "/max-new-tokens 4", "/repetition-penalty 1.1")
    assert (chat.cfg.top_p, chat.cfg.max_new_tokens, chat.cfg.repetition_penalty) == (0.5, 4, 1.1)
    for command in ("/temperature", "/top_k", "/top_p", "/max_tokens", "/repetition_penalty", "/seed", "/system",
                    "/reset", "/save", "/quit"):
        assert command in text  # /help lists it


def test_an_input_methods_full_width_slash_and_space_still_make_commands(chat_run, calls):
    """`/temperature　0.3` (an ideographic space) was an unknown command, and `／help` went to the model."""
    chat, text = run_chat(chat_run, "/temperature\u30000.3", "／top_k　7", "\u3000／help", "　／ｔｏｐ＿ｐ　０．５",
                          " /seed 3", "hello")
    assert (chat.cfg.temperature, chat.cfg.top_k, chat.cfg.top_p, chat.cfg.seed) == (0.3, 7, 0.5, 3)
    assert "/max_tokens" in text
    assert [c.temperature for _, c in calls] == [0.3]  # one message, the last: the commands reached no model


def test_a_message_of_several_lines_goes_between_triple_quotes(chat_run, calls):
    """Each pasted line was a message of its own, with a reply each: \"\"\" opens and closes one of several lines."""
    _, tok, _ = chat_run
    chat, _ = run_chat(chat_run, '"""一行目です', "二行目です", '三行目"""', '"""one line"""', '"""', "  x", '"""')
    asked = [m["content"] for m in chat.transcript if m["role"] == "user"]
    assert asked == ["一行目です\n二行目です\n三行目", "one line", "  x"]
    assert calls[0][0] == prompt_ids(tok, [{"role": "user", "content": "一行目です\n二行目です\n三行目"}])
    # Cut short by the end of input, or by a line that is not text: nothing is sent, and the chat says so.
    chat, text = run_chat(chat_run, '"""half', "a message")
    assert not chat.transcript and "[message cancelled]" in text
    chat, text = run_chat(chat_run, '"""half', "caf\udce9", 'end"""', "hello")
    assert "not valid UTF-8" in text and "[message cancelled]" in text
    assert [m["content"] for m in chat.transcript if m["role"] == "user"] == ['end"""', "hello"]
    # A slash alone is an unknown command, not a traceback that ended the chat.
    chat, text = run_chat(chat_run, "/", "／", "hello")
    assert text.count("unknown command") == 2 and len(chat.transcript) == 2


def test_seed_restarts_sampling_so_the_replies_after_it_replay(chat_run):
    """Two chats that began from other seeds say the same after /seed 7, and differ before it."""
    texts = []
    for start in (1, 2):
        sampled = dataclasses.replace(GREEDY, temperature=1.5, max_new_tokens=24, seed=start)
        _, text = run_chat(chat_run, USER, "/reset", "/seed 7", USER, cfg=sampled)
        texts.append(re.sub(r"[\d.]+ tokens/s", "", text).split("[seed = 7]"))  # the speed differs
    assert texts[0][1] == texts[1][1]
    assert texts[0][0] != texts[1][0]  # (the seeds were not the same to begin with)


def test_quit_ends_the_loop_and_leaves_the_rest_unread(chat_run):
    model, tok, _ = chat_run
    input_fn = script("/quit", "never read")
    chat_loop(model, tok, GREEDY, input_fn, io.StringIO())
    assert next(input_fn.rest) == "never read"


def test_bad_values_print_one_line_and_change_nothing(chat_run, calls):
    bad = ["/temperature abc", "/temperature -1", "/top_k 2.5", "/top_k", "/top_p -0.1", "/top_p 1.5", "/max_tokens 0",
           "/max_tokens many", "/save", "/nonsense", "/temperature nan", "/temperature inf", "/top_p nan",
           "/repetition_penalty 0", "/seed -1", f"/seed {2**63}", "/seed 1.5"]
    chat, text = run_chat(chat_run, *bad, USER)
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(bad)
    assert chat.cfg == GREEDY and calls[0][1] == GREEDY
    assert chat.turns == [(USER, REPLY)]  # and the chat went on


def test_save_writes_every_turn_as_markdown(chat_run, tmp_path):
    path = tmp_path / "notes" / "chat.md"
    cfg = dataclasses.replace(GREEDY, system="日本語で答えて", max_new_tokens=6)
    chat, text = run_chat(chat_run, USER, "/system 短く", "hello there", f"/save {path}", cfg=cfg)
    saved = path.read_text(encoding="utf-8")
    assert saved == stamped(to_markdown(chat.transcript))
    assert [m["role"] for m in chat.transcript] == ["system", "user", "assistant", "system", "user", "assistant"]
    for m in chat.transcript:
        assert m["content"] in saved
    assert os.listdir(path.parent) == ["chat.md"]  # written atomically: no temp file left
    assert f"6 messages saved to {path}" in text
    # Saving the conversation again over its own file is fine; over a file homellm did not write, refused (it
    # replaced someone's data); over another conversation's save (another chat's, or this one's before /reset),
    # refused too (it was replaced without a word). Quotes around a name are taken off: no shell does it here.
    notes = tmp_path / "notes" / "mine.jsonl"
    notes.write_text('{"text": "keep me"}\n')
    first = path.read_text(encoding="utf-8")
    chat, text = run_chat(chat_run, USER, "hi", f"/save {path}", f"/save {notes}", f"/save '{path.parent / 'b.md'}'",
                          "again", f"/save {path.parent / 'b.md'}", "/reset", "new", f"/save {path.parent / 'b.md'}",
                          cfg=cfg)
    assert f"error: {path} holds another conversation, saved before: choose another file name" in text
    assert path.read_text(encoding="utf-8") == first and notes.read_text() == '{"text": "keep me"}\n'
    assert f"error: {notes} exists, and homellm did not write it or it was changed since: choose another file " \
           "name" in text
    b = path.parent / "b.md"
    assert text.count(f"messages saved to {b}") == 2 and "again" in b.read_text(encoding="utf-8")
    assert text.count(f"error: {b} holds another conversation") == 1
    # Notes added below a saved chat were lost to the next /save: the file's checksum line tells.
    with open(path, "a", encoding="utf-8") as f:
        f.write("my notes\n")
    kept = path.read_text(encoding="utf-8")
    chat, text = run_chat(chat_run, USER, f"/save {path}", cfg=cfg)
    assert path.read_text(encoding="utf-8") == kept and "it was changed since: choose another file name" in text
    lookalike, empty = tmp_path / "notes" / "bob.md", tmp_path / "notes" / "empty.md"
    lookalike.write_text("# Conversation notes with Bob\n")
    empty.write_text("")
    long_name = tmp_path / ("x" * 300 + ".md")
    chat, text = run_chat(chat_run, USER, f"/save {lookalike}", f"/save {empty}", f"/save {long_name}", "hi",
                          cfg=cfg)
    assert lookalike.read_text() == "# Conversation notes with Bob\n" and f"messages saved to {empty}" in text
    assert "cannot write (File name too long): choose another file" in text and len(chat.transcript) >= 2


def test_reset_forgets_the_turns_but_keeps_the_system_prompt(chat_run, calls):
    _, tok, _ = chat_run
    cfg = dataclasses.replace(GREEDY, system="S", max_new_tokens=4)
    chat, _ = run_chat(chat_run, USER, "/reset", "hello", cfg=cfg)
    assert calls[1][0] == prompt_ids(tok, [{"role": "system", "content": "S"}, {"role": "user", "content": "hello"}])
    assert len(chat.turns) == 1 and chat.turns[0][0] == "hello"
    assert [m["role"] for m in chat.transcript] == ["system", "user", "assistant"]


def test_old_turns_leave_a_full_context_with_a_notice_but_the_system_prompt_stays(chat_run, calls):
    model, tok, _ = chat_run
    block, room = model.cfg.block_size, 8
    system = [{"role": "system", "content": "Be kind."}]
    messages = ["村に川", "山の花", "春の村", "川の桜", "村の山", "花の川"]
    cfg = dataclasses.replace(GREEDY, system="Be kind.", max_new_tokens=room)
    chat, text = run_chat(chat_run, *messages, cfg=cfg)
    assert text.count("[context full: dropped the oldest") == 1  # once: every turn's notice drowned the replies
    # it says what is left: "0 left" read as nothing at all, though the new message was there (and the system prompt,
    # which "only this message" left out)
    assert re.search(r"\[context full: dropped the oldest \d+ turns? \(question and reply\); (only the system prompt "
                     r"and this message|\d+ earlier turns? still) in the model's \d+-token context", text)
    head = render(tok, system)[0]
    for ids, _ in calls:
        assert len(ids) + room <= block
        assert ids[:len(head)] == head
    assert len(chat.turns) < len(messages)
    assert [m["content"] for m in chat.transcript if m["role"] == "user"] == messages  # /save still has them all
    # Every earlier turn dropped: what is left is named with the system prompt, which stays
    alone = next(EN[:n] for n in range(len(EN), 0, -1)
                 if len(prompt_ids(tok, [*system, {"role": "user", "content": EN[:n]}])) + room <= block)
    chat, text = run_chat(chat_run, "村に川", alone, cfg=cfg)
    assert "; only the system prompt and this message in the model's" in text and calls[-1][0][:len(head)] == head
    # a message too long for the context on its own: said so, and answered anyway
    # ("Be kind and gentle." is too long to keep: 23 tokens, over a quarter of the 64-token context)
    chat, text = run_chat(chat_run, EN * 2, cfg=dataclasses.replace(cfg, system="Be kind and gentle."))
    assert "the model sees only the end of them" in text and len(chat.turns) == 1
    chat, text = run_chat(chat_run, EN * 2, cfg=dataclasses.replace(cfg, system="S"))
    assert "the model sees only the system prompt and the end of the message" in text and len(chat.turns) == 1
    chat, text = run_chat(chat_run, EN * 2, cfg=dataclasses.replace(cfg, system=""))  # none set: none named
    assert "[this message takes " in text and "the model sees only its end]" in text and "system" not in text


def test_a_reply_that_slides_the_window_keeps_the_system_prompt(chat_run, monkeypatch):
    model, tok, _ = chat_run
    # A reply that never ends (the tiny model's own may end early, as its tokenizer decides): it must slide
    monkeypatch.setattr(type(tok), "end_ids", property(lambda self: frozenset()))
    block = model.cfg.block_size
    head = render(tok, [{"role": "system", "content": "S"}])[0]
    windows: list[list[int]] = []  # the ids of every forward pass that starts a fresh cache
    hook = model.register_forward_pre_hook(
        lambda m, args, kwargs: windows.append(args[0][0].tolist()) if kwargs["cache"].pos == 0 else None,
        with_kwargs=True)
    try:
        cfg = dataclasses.replace(GREEDY, system="S", max_new_tokens=3 * block, stop=[])
        chat, text = run_chat(chat_run, EN[:30], cfg=cfg)
    finally:
        hook.remove()
    assert len(windows) > 2, "the reply should have outrun the context more than once"
    assert all(w[:len(head)] == head for w in windows)  # the prompt, and every slide after it
    assert "slides the window, and the start of the conversation leaves it (the system prompt stays)" in text
    # a system prompt over a quarter of the context is not kept, and the chat says so
    cfg = dataclasses.replace(cfg, system="Be kind, be brief.")
    chat, text = run_chat(chat_run, "hi", cfg=cfg)
    assert chat.system_ids() == 0 and "(the system prompt too: it takes over a quarter of the context)" in text


def test_ctrl_c_during_a_reply_stops_only_the_reply(chat_run):
    model, tok, _ = chat_run
    forwards = 0

    def interrupt(module, args):
        nonlocal forwards
        forwards += 1
        if forwards == 6:  # the prompt, then 4 tokens fed back: 5 tokens generated
            raise KeyboardInterrupt

    hook = model.register_forward_pre_hook(interrupt)
    try:
        chat, text = run_chat(chat_run, USER, "hello", "/quit")
    finally:
        hook.remove()
    partial = chat.transcript[1]["content"]
    assert 0 < len(partial) < len(REPLY) and REPLY.startswith(partial)
    assert "[interrupted: 5 tokens" in text
    assert [m["role"] for m in chat.transcript] == ["user", "assistant"] * 2  # the chat went on
    assert not model.training  # generation restored the mode


def test_ctrl_c_or_end_of_input_at_the_prompt_leaves_cleanly(chat_run):
    model, tok, _ = chat_run

    def ctrl_c(prompt: str = "") -> str:
        raise KeyboardInterrupt

    out = io.StringIO()
    chat = chat_loop(model, tok, GREEDY, ctrl_c, out)
    assert chat.turns == [] and out.getvalue().endswith("\n")
    chat, _ = run_chat(chat_run)  # end of input at once
    assert chat.turns == []


def test_chat_from_the_command_line_reads_stdin(chat_run, tmp_path):
    _, _, run = chat_run
    saved = tmp_path / "chat.md"
    proc = subprocess.run([sys.executable, "-m", "homellm", "chat", str(run), "--temperature", "0",
                           "--max-new-tokens", "40"], input=f"{USER}\n/save {saved}\n", capture_output=True,
                          encoding="utf-8", env={**os.environ, "PYTHONIOENCODING": "utf-8"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert REPLY in proc.stdout and "tokens/s]" in proc.stdout
    assert REPLY in saved.read_text(encoding="utf-8")
    # Which checkpoint answers, up front: a fine-tuned run's `best` may stand far behind its `last`
    step = json.loads((run / "best" / "checkpoint.json").read_text())["step"]
    assert f"[checkpoint best (step {step}); " in proc.stdout
    # This run was never fine-tuned on conversations: chat says so once, up front (it used to answer regardless).
    assert f"note: {run} was pretrained only, not fine-tuned on conversations" in proc.stderr


def test_chat_on_the_quickstarts_base_model_names_its_chat_model(tmp_path, chat_run, capsys):
    """`quickstart --chat` leaves a base model in RUN and its chat model in RUN/chat: chatting with the first says
    where the second is."""
    _, _, base = chat_run
    run = tmp_path / "qs"
    shutil.copytree(base, run)
    repl.chat(run, GREEDY, script("/quit"), io.StringIO())
    assert "its chat model" not in capsys.readouterr().err
    _, _, sft = build_chat_run(tmp_path, sft=True)
    shutil.copytree(sft, run / "chat")
    repl.chat(run, GREEDY, script("/quit"), io.StringIO())
    assert f"; its chat model is {run / 'chat'}: `homellm chat {run / 'chat'}`" in capsys.readouterr().err


def test_chat_on_a_fine_tuned_run_adds_no_note_and_generate_points_to_chat(tmp_path, chat_run, capsys):
    from homellm.cli import main

    _, _, run = build_chat_run(tmp_path, sft=True)
    repl.chat(run, GREEDY, script("/quit"), io.StringIO())
    assert "pretrained only" not in capsys.readouterr().err
    note = f"note: {run} is a chat model: `homellm chat {run}` talks to it"
    assert main(["generate", str(run), "--prompt", USER, "--max-new-tokens", "2"]) == 0
    assert note in capsys.readouterr().err
    assert main(["generate", str(run), "--prompt", f"<|im_start|>user\n{USER}", "--max-new-tokens", "2"]) == 0
    assert note not in capsys.readouterr().err  # chat markup typed: they know
    assert main(["generate", str(chat_run[2]), "--prompt", USER, "--max-new-tokens", "2"]) == 0
    assert "fine-tuned on conversations" not in capsys.readouterr().err  # a pretrained run continues text


def test_characters_the_tokenizer_cannot_write_are_noted(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\nsystem user assistant\n")
    tok = train_tokenizer(TokenizerConfig(input=[str(tmp_path / "a.txt")], out=str(tmp_path / "tok"), kind="char"))
    assert tok.unknown_note("hello") == ""
    assert tok.unknown_note("hello 日本") == ("this model's tokenizer cannot write '日', '本': the model reads them as "
                                            "<|unk|>, so they mean nothing to it")
    # A prompt's special tokens are read whole where generate reads them so: not as characters it cannot write.
    assert tok.unknown_note("hello<|endoftext|>", allow_special=True) == ""
    assert "cannot write '<', '>', 'f', 'x', '|'" in tok.unknown_note("hello<|endoftext|>")
    model = GPT(ModelConfig(family="llama", vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=64))
    out = io.StringIO()
    chat = Chat(model, tok, dataclasses.replace(GREEDY, system="see 短"), out)
    chat.context("hello")
    assert "[note: this model's tokenizer cannot write '短'" in out.getvalue()
    # The system prompt's note is said once (it was said before every reply), and when /system sets one
    chat.context("hello")
    assert out.getvalue().count("cannot write") == 1
    chat.command("/system see 長")
    assert out.getvalue().endswith("[system prompt set; note: this model's tokenizer cannot write '長': the model "
                                   "reads them as <|unk|>, so they mean nothing to it]\n")
    chat.context("hello world")
    assert out.getvalue().count("cannot write") == 2
    chat.context("hello 日")
    assert out.getvalue().count("cannot write") == 3 and "'長'" not in out.getvalue().splitlines()[-1]
    # An input method's full-width letters, digits and space are read as the ones the tokenizer knows (they were
    # all unknowns to the quickstart's chat model); what it knows stays, and what has no such form stays unknown.
    assert tok.fold("ｈｅｌｌｏ　ｗｏｒｌｄ！ 短") == "hello world！ 短" and tok.fold("hello") == "hello"
    assert "'!'" in tok.unknown_note("!")  # ("！" stays: "!" is not in its text either)
    out = io.StringIO()
    chat = Chat(model, tok, dataclasses.replace(GREEDY, max_new_tokens=2), out)
    chat.reply("ｈｅｌｌｏ　ｗｏｒｌｄ")
    assert chat.turns[0][0] == "hello world" and "cannot write" not in out.getvalue()
    assert chat.transcript[0]["content"] == "ｈｅｌｌｏ　ｗｏｒｌｄ"  # (the transcript keeps what was typed)
    # Half-width katakana's voiced mark joins the letter before it: ｶﾞ is ガ (one at a time, it was カ and an unknown).
    (tmp_path / "k.txt").write_text("ガギ パピ\n", encoding="utf-8")
    kana = train_tokenizer(TokenizerConfig(input=[str(tmp_path / "k.txt")], out=str(tmp_path / "k"), kind="char"))
    assert kana.fold("ｶﾞｷﾞ ﾊﾟﾋﾟ") == "ガギ パピ" and kana.fold("ガギ") == "ガギ"


def test_input_that_is_not_utf8_is_refused_in_one_line_and_the_chat_goes_on(chat_run, tmp_path, monkeypatch):
    """Undecodable bytes reach input() as lone surrogates (or as UnicodeDecodeError from a strict stdin): the
    tokenizer raised a TypeError traceback and the conversation was lost. And /save ~/x.md saves in the home folder,
    not in a new folder named "~"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    answers = iter(["caf\udce9", None, USER, "/save ~/chat.md"])

    def input_fn(prompt: str = "") -> str:
        line = next(answers, "/quit")
        if line is None:
            raise UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid continuation byte")
        return line

    model, tok, _ = chat_run
    out = io.StringIO()
    chat = chat_loop(model, tok, GREEDY, input_fn, out)
    errors = [line for line in out.getvalue().splitlines() if line.startswith("error: ")]
    assert errors == ["error: the message is not valid UTF-8 text: set the terminal to UTF-8 and type it again",
                      "error: the message is not UTF-8 (invalid continuation byte at byte 0): set the terminal to "
                      "UTF-8"]
    assert chat.turns == [(USER, REPLY)] and (tmp_path / "chat.md").is_file()


def test_generate_interactive_continues_each_prompt_and_takes_chats_settings(chat_run, tmp_path):
    """Seed 002's inference.py had an interactive mode with settings changed on the fly: `generate --interactive`.
    Each prompt is continued afresh (no conversation), printed after the prompt; /system and /reset are chat's."""
    model, tok, run = chat_run
    prefix = tok.decode(prompt_ids(tok, [{"role": "user", "content": USER}]))  # as raw text, markup included
    out = io.StringIO()
    session = chat_loop(model, tok, GenerateConfig(temperature=0.0, max_new_tokens=40),
                        script(prefix, "/system be brief", "/reset", "/max_tokens 3", prefix, "/help",
                               f"/save {tmp_path / 'texts.md'}", "/quit"), out, session=Continuations)
    text = out.getvalue()
    assert prefix + REPLY + "\n[" in text  # the prompt, then what the model writes after it
    # The first ended by the model, said (review: generate's "[0 tokens ...]" alone looked broken); the second by length
    assert text.count(" tokens/s; the model ended the text (it chose an end token)]") == 1
    assert "error: /system is chat's" in text and "error: /reset is chat's" in text
    assert session.cfg.max_new_tokens == 3 and session.transcript[-1]["content"] == tok.decode(tok.encode(REPLY)[:3])
    assert "/system" not in text.split("/help")[-1] and "longest continuation in tokens" in text
    saved = (tmp_path / "texts.md").read_text(encoding="utf-8")
    assert saved.count("**prompt**:") == 2 and REPLY in saved
    assert f"[2 prompts and their continuations saved to {tmp_path / 'texts.md'}]" in text  # not "4 messages"


def test_generate_interactive_from_the_command_line(chat_run, monkeypatch, capsys):
    from homellm.cli import main

    model, tok, run = chat_run
    prefix = tok.decode(prompt_ids(tok, [{"role": "user", "content": USER}]))
    assert main(["generate", str(run), "--interactive", "--prompt", "-"]) == 2
    assert "--prompt - reads standard input, which --interactive reads prompts from" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO("/temperature 0.5\n"))  # then end of input
    assert main(["generate", str(run), "--interactive", "--prompt", prefix, "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert prefix + REPLY + "\n[" in out and "[temperature = 0.5]" in out
    # A first prompt that starts with "/" (a path, a regex) is continued, not read as a command.
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["generate", str(run), "--interactive", "--prompt", "/help me", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "\n/help me" in out and "/temperature" not in out  # (the help lists it)


def test_control_characters_a_model_writes_reach_a_terminal_as_symbols():
    """An undertrained byte-level model writes ESC, CR and BS, which moved the cursor and rewrote the screen."""
    from homellm.repl import visible

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    text = "a\x1b[2Jb\rc\x08\x7f\tend\n"
    assert visible(text, Terminal()) == "a␛[2Jb␍c␈␡\tend\n"
    assert visible(text, io.StringIO()) == text  # a file or pipe gets the text as written


def test_beam_search_chat_says_what_sampling_settings_do_not_do(chat_run, capsys):
    """With --num-beams, /temperature and /seed were accepted and changed nothing, unsaid; too many beams ended
    the chat at its first message, after the banner."""
    cfg = dataclasses.replace(GREEDY, num_beams=2, max_new_tokens=3)
    _, text = run_chat(chat_run, "/temperature 2", "/max_tokens 4", cfg=cfg)
    assert "beam search of 2" in text.splitlines()[0]
    assert "[temperature = 2.0; unused: --num-beams 2 searches, it does not sample]" in text
    assert "[max_tokens = 4]" in text
    _, tok, run = chat_run
    with pytest.raises(repl.HomeLLMError, match=f"--num-beams 400 is more than the {tok.vocab_size} tokens"):
        repl.chat(run, dataclasses.replace(cfg, num_beams=400), input_fn=lambda prompt: "hello")


def test_a_prompt_from_standard_input_loses_its_bom_and_last_line_break_and_closed_is_named(monkeypatch, capsys):
    from homellm.cli import read_stdin

    class Stdin:
        encoding = "utf-8"
        buffer = io.BytesIO("\ufeffROMEO:\r\n".encode())

    monkeypatch.setattr(sys, "stdin", Stdin())
    assert read_stdin("--prompt") == "ROMEO:"  # nor the line break that ends the file (`echo` writes one): one only
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"$12 \\times 7 =\n\n")))
    assert read_stdin("--prompt") == "$12 \\times 7 =\n"
    chatml = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # a turn's header ends in its own break
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(chatml.encode())))
    assert read_stdin("--prompt") == chatml
    # A UTF-8 file piped in where the locale's encoding is another (Windows: cp932 or cp1252) is UTF-8, as the same
    # file given by its path is; text that is not UTF-8 is read in the locale's encoding.
    for encoding in ("cp932", "cp1252"):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("吾輩は猫である。".encode()), encoding=encoding))
        assert read_stdin("--prompt") == "吾輩は猫である。"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("吾輩は猫".encode("cp932")), encoding="cp932"))
    assert read_stdin("--prompt") == "吾輩は猫"
    # Shift_JIS where the locale is UTF-8 (an Aozora file piped in) is read as prepare reads such files
    sjis = io.BytesIO("吾輩は猫である。".encode("cp932"))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(sjis, encoding="utf-8"))
    assert read_stdin("--prompt") == "吾輩は猫である。"
    assert "note: standard input read as Shift_JIS (cp932)" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", None)
    with pytest.raises(repl.HomeLLMError, match="standard input is closed"):
        read_stdin("--prompt")
    with pytest.raises(repl.HomeLLMError, match=r"^--text -: standard input is closed: pipe the text in, or give it as "
                                                r"--text TEXT$"):  # (review: tokenizer encode's said --prompt)
        read_stdin("--text")
