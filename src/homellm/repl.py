"""`homellm chat`: a terminal chat with a run. Replies stream as they are generated (whole characters only), the
conversation is kept as long as it fits the context, and slash commands change the sampling settings mid-chat.

    homellm chat runs/my-sft --system "You answer in one sentence." --temperature 0.7

In a notebook or a test, drive it with any input function and output stream:

    lines = iter(["hello", "/quit"])
    chat_loop(model, tok, ChatConfig(temperature=0.0), input_fn=lambda prompt: next(lines))
"""

from __future__ import annotations

import dataclasses
import math
import sys
import unicodedata
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import TextIO

from homellm.chat import Message, prompt_ids, render, to_markdown
from homellm.checkpoint import loaded_checkpoint
from homellm.config import SEED_LIMIT, ChatConfig, GenerateConfig
from homellm.errors import HomeLLMError, typed
from homellm.generate import check_beams, continuation_prompt, seeded_generator, stream_ids
from homellm.io import atomic_write_text, check_overwrite, stamped
from homellm.model import GPT
from homellm.tokenizer import Tokenizer

HELP = """\
/temperature X   sampling temperature; 0 = greedy (now {temperature})
/top_k N         sample among the N likeliest tokens; 0 = off (now {top_k})
/top_p X         nucleus sampling, 0 <= X <= 1; 1 = off (now {top_p})
/max_tokens N    longest reply in tokens (now {max_new_tokens})
/repetition_penalty X   > 1 discourages repeating tokens; 1 = off (now {repetition_penalty})
/seed N          restart the sampling from seed N: the replies that follow replay (now {seed})
/system TEXT     set the system prompt; /system alone shows it
/reset           forget the conversation (the system prompt stays)
/save FILE       write the whole conversation as Markdown
/help            this list
/quit            leave (also Ctrl-D; Ctrl-C stops a reply, or leaves at the prompt)
Start a message with // to send a text that begins with /.
A message of several lines: start it with \"\"\" and end it with \"\"\" (as in ollama), e.g. pasted text."""


def _number(kind: type, low: float, high: float | None = None, low_open: bool = False) -> Callable[[str], float]:
    """A parser for a slash command's value that says, in one line, what it accepts."""
    what = ("a whole number" if kind is int else "a number") + (f" above {low}" if low_open else f" >= {low}")
    if high is not None:
        what = f"{what} and <= {high}"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise HomeLLMError(f"{text!r} is not {what}") from None
        outside = value < low or (low_open and value == low) or (high is not None and value > high)
        if outside or not math.isfinite(value):  # nan passes every comparison
            raise HomeLLMError(f"{text} is out of range: give {what}")
        return value

    return parse


# slash command -> (the ChatConfig field it sets, its parser)
SETTINGS: dict[str, tuple[str, Callable[[str], float]]] = {
    "temperature": ("temperature", _number(float, 0.0)),
    "top_k": ("top_k", _number(int, 0)),
    "top_p": ("top_p", _number(float, 0.0, 1.0)),  # 0 keeps the likeliest token alone, as --top-p 0 does
    "max_tokens": ("max_new_tokens", _number(int, 0, low_open=True)),
    "repetition_penalty": ("repetition_penalty", _number(float, 0.0, low_open=True)),
    "seed": ("seed", _number(int, 0, SEED_LIMIT - 1)),
}


class Chat:
    """One conversation: the settings, the turns still in the context, and the whole transcript for /save."""

    ended_note = ""  # what the rate line adds when the model ended before the length: a reply's end is the rule

    def __init__(self, model: GPT, tok: Tokenizer, cfg: ChatConfig, out: TextIO = sys.stdout):
        if isinstance(cfg, ChatConfig) and not cfg.system and tok.system:
            # The run's default (an imported chat model's, or the one every sft conversation had): what the model
            # is asked after anyway, so /system shows it, /save keeps it, and it stays when the window slides.
            cfg = dataclasses.replace(cfg, system=tok.system)
        self.model, self.tok, self.cfg, self.out = model, tok, cfg, out
        self.turns: list[tuple[str, str]] = []  # (user, assistant) pairs the model still sees
        self.transcript: list[Message] = []  # everything said since the start or /reset, system prompts included
        # One generator for the whole chat: replies differ turn to turn, yet a session replays from its seed.
        self.generator = seeded_generator(cfg.seed, next(model.parameters()).device)
        self.dropped_said = False  # the notice that old turns leave a full context: said once
        self.system_noted = ""  # the system prompt whose unwritable characters were said: once, not every turn
        self.saved: set[Path] = set()  # files /save wrote this conversation to, which it may write again
        self.reset()

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def reset(self) -> None:
        self.turns.clear()
        self.transcript[:] = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []
        self.saved = set()  # another conversation: its /save must not replace the last one's file

    def messages(self, user: str) -> list[Message]:
        """What the model sees for the next reply: system prompt, the turns in context, the new message."""
        system = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []
        history = [{"role": r, "content": c} for u, a in self.turns for r, c in (("user", u), ("assistant", a))]
        return [*system, *history, {"role": "user", "content": user}]

    def system_ids(self) -> int:
        """How many of the prompt's first ids are the system prompt, which stays when the window slides; 0 when it
        would take more than a quarter of the context (half of what a slide keeps), or there is none."""
        n = len(render(self.tok, [{"role": "system", "content": self.cfg.system}])[0]) if self.cfg.system else 0
        return n if n <= self.model.cfg.block_size // 4 else 0

    def context(self, user: str) -> list[int]:
        """The prompt ids for `user`, after dropping the oldest turns until it leaves room for the reply. The room
        is max_new_tokens, at most half the context: a longer reply slides the window as it goes, keeping the
        system prompt."""
        block = self.model.cfg.block_size
        unsaid = self.cfg.system if self.cfg.system != self.system_noted else ""
        self.system_noted = self.cfg.system
        if note := self.tok.unknown_note(user + unsaid):
            self.say(f"[note: {note}]")
        room = min(self.cfg.max_new_tokens, block // 2)
        dropped = 0
        ids = prompt_ids(self.tok, self.messages(user))
        while len(ids) + room > block and self.turns:
            self.turns.pop(0)
            dropped += 1
            ids = prompt_ids(self.tok, self.messages(user))
        if dropped and not self.dropped_said:
            # Once a chat: on a small context it fills every turn, and the same line each time drowned the replies.
            self.dropped_said = True
            left = (f"{len(self.turns)} earlier turn{'s' * (len(self.turns) != 1)} still" if self.turns else
                    "only the system prompt and this message" if self.cfg.system else "only this message")
            self.say(f"[context full: dropped the oldest {dropped} turn{'s' * (dropped > 1)} (question and reply); "
                     f"{left} in the model's {block}-token context. From here on the oldest turns leave as the "
                     "context fills, without a notice; /save keeps them all]")
        keep = self.system_ids()
        what = "this message and the system prompt take" if self.cfg.system else "this message takes"
        if len(ids) >= block:
            seen = ("the system prompt and the end of the message" if keep else "the end of them" if self.cfg.system
                    else "its end")
            self.say(f"[{what} {len(ids)} of {block} tokens: the model sees only {seen}]")
        elif len(ids) + room > block:
            kept = " (the system prompt stays)" if keep else (
                " (the system prompt too: it takes over a quarter of the context)" if self.cfg.system else "")
            self.say(f"[{what} {len(ids)} of {block} tokens: a reply past {block - len(ids)} tokens slides the "
                     f"window, and the start of the conversation leaves it{kept}]")
        return ids

    def reply(self, user: str) -> str:
        """Stream the model's reply to `user`; Ctrl-C ends the reply early and keeps what was generated."""
        asked = self.tok.fold(user)  # as the model can read it (an input method's full-width digits, say)
        text = self.stream(self.context(asked), self.system_ids())
        self.turns.append((asked, text))
        self.transcript += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]
        return text

    def stream(self, ids: list[int], keep: int = 0) -> str:
        """Print what the model writes after `ids` as it comes, then its rate; Ctrl-C ends it early and keeps
        what was written."""
        pieces: list[str] = []
        stats: dict[str, float] = {}
        interrupted = False
        try:
            with closing(stream_ids(self.model, self.tok, ids, self.cfg, stats, self.generator, keep)) as stream:
                held = ""  # a reply cut off by max_tokens mid-character ends in U+FFFD: hold it, never show it
                for piece in stream:
                    text = held + piece
                    held = text[len(text.rstrip("\ufffd")):]
                    pieces.append(text[:len(text) - len(held)])
                    self.out.write(visible(pieces[-1], self.out))
                    self.out.flush()
        except KeyboardInterrupt:
            interrupted = True
        n = stats.get("new_tokens", 0)
        rate = f"{n} token{'s' * (n != 1)}, {stats.get('tok_per_s', 0.0):.1f} tokens/s"
        ended = self.ended_note * bool(stats.get("ended"))
        self.say(("\n[interrupted: " if interrupted else "\n[") + rate + ended + "]")
        return "".join(pieces)

    def help(self) -> str:
        return HELP.format(**dataclasses.asdict(self.cfg))

    def saved_count(self) -> str:
        """What /save wrote, counted: the transcript's messages."""
        n = len(self.transcript)
        return f"{n} message{'s' * (n != 1)}"

    def command(self, line: str) -> bool:
        """Run a slash command; False when it is /quit. Mistakes print one line and change nothing."""
        name, arg = command_parts(line)
        # As the command line's flags are written, too: /top-p, /max-new-tokens (they were unknown commands).
        name = {"max_new_tokens": "max_tokens"}.get(name.replace("-", "_"), name.replace("-", "_"))
        try:
            if name in SETTINGS:
                field, parse = SETTINGS[name]
                if not arg:
                    raise HomeLLMError(f"/{name} needs a value (now {getattr(self.cfg, field)})")
                # (a number typed full-width: ０．５)
                self.cfg = dataclasses.replace(self.cfg, **{field: parse(unicodedata.normalize("NFKC", arg))})
                if name == "seed":  # the chat's one generator starts over: what follows replays from here
                    self.generator = seeded_generator(self.cfg.seed, self.generator.device)
                unused = self.cfg.num_beams > 1 and name not in ("max_tokens", "repetition_penalty")
                self.say(f"[{name} = {getattr(self.cfg, field)}"
                         f"{f'; unused: --num-beams {self.cfg.num_beams} searches, it does not sample' * unused}]")
            elif name == "system":
                if not arg:
                    self.say(f"[system prompt: {self.cfg.system!r}]")
                    return True
                self.cfg = dataclasses.replace(self.cfg, system=self.tok.fold(arg))
                self.transcript.append({"role": "system", "content": arg})
                note, self.system_noted = self.tok.unknown_note(self.cfg.system), self.cfg.system
                self.say(f"[system prompt set{f'; note: {note}' if note else ''}]")
            elif name == "reset":
                self.reset()
                self.say("[conversation cleared]")
            elif name == "save":
                if not arg:
                    raise HomeLLMError("/save needs a file name, e.g. /save chat.md")
                if len(arg) > 1 and arg[0] == arg[-1] and arg[0] in "'\"":  # no shell here to take quotes off
                    arg = arg[1:-1]
                path = Path(arg).expanduser()  # nor to expand ~: it made a folder named "~"
                try:
                    check_overwrite(path, "choose another file name")
                    # homellm's save of another conversation (before /reset, or another chat's) was replaced
                    if path.is_file() and path.stat().st_size and path.resolve() not in self.saved:
                        raise HomeLLMError(f"{arg} holds another conversation, saved before: choose another file name "
                                           "(or delete it first)")
                    atomic_write_text(path, stamped(to_markdown(self.transcript)))
                except OSError as e:
                    raise HomeLLMError(f"{arg}: cannot write ({e.strerror}): choose another file") from None
                self.saved.add(path.resolve())
                self.say(f"[{self.saved_count()} saved to {arg}]")
            elif name == "help":
                self.say(self.help())
            elif name in ("quit", "exit"):
                return False
            else:
                raise HomeLLMError(f"unknown command /{name}: /help lists them")
        except HomeLLMError as e:
            self.say(f"error: {e}")
        return True


class Continuations(Chat):
    """`homellm generate RUN --interactive`: each line typed is a prompt the model continues, as `generate --prompt`
    continues it, printed after the prompt. Chat's settings and slash commands, but no conversation: every prompt
    starts afresh, and one random generator runs through the session, so a prompt typed again gets another text."""

    # (a reply ends at its end of turn as a rule; a continuation that ends before its length is worth a word)
    ended_note = "; the model ended the text (it chose an end token)"

    def reset(self) -> None:
        self.transcript.clear()

    def saved_count(self) -> str:
        n = len(self.transcript) // 2
        return f"{n} prompt{'s' * (n != 1)} and {'their' if n != 1 else 'its'} continuation{'s' * (n != 1)}"

    def reply(self, prompt: str) -> str:
        prompt, ids, notes = continuation_prompt(self.tok, prompt, self.model.cfg.block_size)
        for note in notes:
            self.say(f"[note: {note}]")
        self.out.write(prompt)
        text = self.stream(ids)
        self.transcript += [{"role": "prompt", "content": prompt}, {"role": "continuation", "content": text}]
        return text

    def help(self) -> str:
        lines = [line for line in super().help().splitlines() if not line.startswith(("/system", "/reset"))]
        return "\n".join(line.replace("the whole conversation", "the prompts and their continuations")
                         .replace("longest reply", "longest continuation").replace("a reply", "a continuation")
                         .replace("the replies", "the texts").replace("a message", "a prompt") for line in lines)

    def command(self, line: str) -> bool:
        if command_parts(line)[0] in ("system", "reset"):
            self.say(f"error: {line.split()[0]} is chat's: generate keeps no conversation (/help lists commands)")
            return True
        return super().command(line)


def chat_loop(model: GPT, tok: Tokenizer, cfg: ChatConfig | GenerateConfig, input_fn: Callable[[str], str] = input,
              out: TextIO = sys.stdout, session: type[Chat] = Chat) -> Chat:
    """Read messages (or, with session=Continuations, prompts) and slash commands from `input_fn` until /quit, end
    of input or Ctrl-C at the prompt."""
    chat = session(model, tok, cfg, out)
    how = f"beam search of {cfg.num_beams}" if cfg.num_beams > 1 else f"temperature {cfg.temperature}"
    which = loaded_checkpoint(model)
    chat.say(f"[{'checkpoint ' + which + '; ' if which else ''}{model.cfg.block_size}-token context, {how}, max_tokens "
             f"{cfg.max_new_tokens}; /help lists commands, /quit or Ctrl-D leaves]")
    if getattr(cfg, "system", None) == "" and getattr(chat.cfg, "system", ""):
        chat.say(f"[the run's default system prompt: {chat.cfg.system!r}; /system TEXT replaces it]")
    while True:
        try:
            line = read_line(input_fn, "> ", chat)
        except (EOFError, KeyboardInterrupt):
            chat.say("")
            return chat
        if line is None or not line.strip():
            continue
        if line.lstrip().startswith(FENCE):
            if (line := _fenced(line, input_fn, chat)) is not None:
                chat.reply(line)
            continue
        # A command may follow spaces (an input method's ideographic one: ` /help` went to the model) and start
        # with a Japanese or Chinese input method's full-width slash.
        head = line.lstrip()
        if head.startswith("／"):
            head = "/" + head[1:]
        if head.startswith("/") and not head.startswith("//"):
            if not chat.command(head.strip()):
                return chat
            continue
        chat.reply(head[1:] if head.startswith("//") else line)


FENCE = '"""'


def read_line(input_fn: Callable[[str], str], prompt: str, chat: Chat) -> str | None:
    """A line typed, or None where it is not text (said); the end of input and Ctrl-C are raised."""
    try:
        line = input_fn(prompt)
    except RuntimeError as e:  # input() with standard input closed (`<&-`): "lost sys.stdin"
        raise HomeLLMError(f"cannot read your messages ({e}): give the chat a terminal or a pipe") from None
    except UnicodeDecodeError as e:  # a terminal or pipe in another encoding: the message is lost, not the chat
        chat.say(f"error: the message is not UTF-8 ({e.reason} at byte {e.start}): set the terminal to UTF-8")
        return None
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes that Python's stdin kept as lone surrogates
        chat.say("error: the message is not valid UTF-8 text: set the terminal to UTF-8 and type it again")
        return None
    return line


def _fenced(first: str, input_fn: Callable[[str], str], chat: Chat) -> str | None:
    """The message of several lines that `first` opens with FENCE, read up to the line that ends with it; None
    when Ctrl-C or the end of input cancels it (said)."""
    lines = [first.lstrip()[len(FENCE):]]
    while not (len(lines) > 1 or lines[0].strip()) or not lines[-1].rstrip().endswith(FENCE):
        try:
            line = read_line(input_fn, "... ", chat)
        except (EOFError, KeyboardInterrupt):
            line = None
        if line is None:  # (a line that is not text: said, and the message with it)
            chat.say("\n[message cancelled]")
            return None
        lines.append(line)
    lines[-1] = lines[-1].rstrip()[:-len(FENCE)]
    text = "\n".join(lines).strip("\n")
    return text if text.strip() else None


def command_parts(line: str) -> tuple[str, str]:
    """A slash command's name and its argument, split at any space: an input method's ideographic one too. The name
    as NFKC folds it: a Japanese input method left on types the whole command full-width (／ｔｏｐ＿ｋ)."""
    parts = line[1:].split(maxsplit=1)  # ("/" alone: no name, an unknown command)
    return (unicodedata.normalize("NFKC", parts[0]) if parts else ""), (parts[1].strip() if len(parts) > 1 else "")


def visible(text: str, out: TextIO) -> str:
    """Text for `out`: on a terminal, control characters a model wrote (escape, carriage return, backspace) shown as
    their symbols (␛, ␍, ␈), which would otherwise move the cursor or rewrite the screen; elsewhere as written."""
    if not (getattr(out, "isatty", None) and out.isatty()):
        return text
    return text.translate(_CONTROL_SYMBOLS)


# C0 controls but newline and tab, and DEL, as Unicode's control pictures
_CONTROL_SYMBOLS = {c: 0x2400 + c for c in range(32) if chr(c) not in "\n\t"} | {0x7F: 0x2421}


def line_editing() -> None:
    try:
        import readline  # noqa: F401  (importing it gives input() line editing and history in a terminal)
    except ImportError:  # Windows
        pass


def chat(run: str | Path, cfg: ChatConfig, input_fn: Callable[[str], str] = input,
         out: TextIO = sys.stdout) -> Chat:
    """`homellm chat RUN`: load the run's model and tokenizer, then chat_loop."""
    from homellm.checkpoint import load_for_generation, pretrained_only_note

    line_editing()
    model = load_for_generation(run, cfg)
    tok = Tokenizer.load(run)
    check_beams(cfg, tok)  # before the chat starts, not at its first message
    # It never saw the chat format's turns: its "replies" continue text, if anything
    if note := pretrained_only_note(run, "chat", "it does not know turns, so replies may not answer; `homellm "
                                    f"generate {typed(run)} --prompt TEXT` continues text"):
        print(note, file=sys.stderr)
    return chat_loop(model, tok, cfg, input_fn, out)
