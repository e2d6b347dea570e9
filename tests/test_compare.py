"""homellm compare: both runs' outputs land in the screen table and the Markdown report, a run with an sft section
is prompted in ChatML, cells survive pipes, line breaks and HTML, .txt prompts skip a byte-order mark and end
only at \\n, and bad prompt files say what is wrong in one line."""

import html
import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from homellm.cli import main
from homellm.compare import compare, md_cell, read_prompts, wrap
from homellm.config import CompareConfig, SampleConfig, load_json, save_json
from homellm.errors import HomeLLMError
from homellm.generate import stream_text
from homellm.io import display_width
from test_repl import REPLY, USER, build_chat_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(model, tok, base run, sft run): the same weights; only the sft run's config says it was fine-tuned."""
    root = tmp_path_factory.mktemp("compare")
    model, tok, base = build_chat_run(root)
    sft = root / "sft"
    shutil.copytree(base, sft)
    save_json(sft / "config.json", {**load_json(base / "config.json"), "sft": {"init": str(base)}})
    return model, tok, base, sft


def cells(row: str) -> list[str]:
    """A Markdown table row split at its unescaped pipes."""
    parts, cell, i = [], "", 1
    while i < len(row) - 1:
        if row[i] == "\\" and row[i + 1] == "|":
            cell, i = cell + "\\|", i + 2
            continue
        if row[i] == "|":
            parts.append(cell.strip())
            cell = ""
        else:
            cell += row[i]
        i += 1
    return [*parts, cell.strip()]


def test_both_outputs_appear_side_by_side_and_sft_runs_get_chatml(runs, tmp_path):
    model, tok, base, sft = runs
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{USER}\n\nleft | right\n", encoding="utf-8")
    screen = io.StringIO()
    report = compare(base, sft, CompareConfig(prompts=str(prompts), out=str(tmp_path / "r.md")), screen)
    assert report == tmp_path / "r.md"
    text = report.read_text(encoding="utf-8")
    greedy = SampleConfig(temperature=0.0, max_new_tokens=CompareConfig().max_new_tokens)
    raw = "".join(stream_text(model, tok, USER, greedy))  # the base run continues the prompt as text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 3 and all(len(cells(r)) == 4 for r in rows)  # header and two prompts, four columns each
    assert cells(rows[1]) == ["1", USER, md_cell(raw), md_cell(REPLY)]
    assert cells(rows[2])[1] == "left \\| right"
    assert "continued raw" in text and "as a user message" in text
    shown = screen.getvalue()
    assert f"A: {base.name}" in shown and f"B: {sft.name}" in shown and "おしまい" in shown


def test_chat_flag_wraps_prompts_for_both_and_the_report_defaults_to_run_b(runs, tmp_path):
    _, _, base, sft = runs
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": USER}, ensure_ascii=False) + "\n", encoding="utf-8")
    report = compare(base, sft, CompareConfig(prompts=str(prompts), chat=True), io.StringIO())
    assert report == sft / "compare.md"
    row = [line for line in report.read_text(encoding="utf-8").splitlines() if line.startswith("| 1 ")][0]
    assert cells(row) == ["1", USER, md_cell(REPLY), md_cell(REPLY)]


def test_no_chat_continues_a_chat_runs_prompts_raw_and_the_header_says_what_was_done(runs, tmp_path):
    """--no-chat did nothing for a chat run (`chat or speaks_chatml`); the header said "best checkpoint" where
    `last` was loaded, "greedy, ..., 2 beams", and nothing of a repetition penalty or stop strings."""
    model, tok, base, sft = runs
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(USER + "\n", encoding="utf-8")
    unevaluated = tmp_path / "unevaluated"
    shutil.copytree(sft, unevaluated)
    if (unevaluated / "best").exists():
        shutil.copytree(unevaluated / "best", unevaluated / "last", dirs_exist_ok=True)
        shutil.rmtree(unevaluated / "best")
    cfg = CompareConfig(prompts=str(prompts), chat=False, num_beams=2, temperature=0.9, repetition_penalty=1.3,
                        stop=["。"])
    text = compare(base, unevaluated, cfg, io.StringIO()).read_text(encoding="utf-8")
    assert f"- B: `{unevaluated}` (last checkpoint), prompts continued raw" in text
    assert f"- A: `{base}` (best checkpoint), prompts continued raw" in text
    assert "beam search, 2 beams, repetition penalty 1.3, stopping at '。', at most" in text
    assert "temperature" not in text
    raw = "".join(stream_text(model, tok, USER, SampleConfig(**{k: getattr(cfg, k) for k in (
        "num_beams", "temperature", "repetition_penalty", "stop", "max_new_tokens")})))
    row = [line for line in text.splitlines() if line.startswith("| 1 ")][0]
    assert cells(row)[3] == md_cell(raw)


def test_cells_escape_pipes_and_line_breaks():
    assert md_cell("a|b\nc\r\nd") == "a\\|b<br>c<br>d"
    assert cells("| " + " | ".join(map(md_cell, ["x|y", "1\n2", ""])) + " |") == ["x\\|y", "1<br>2", ""]


@pytest.mark.parametrize("text", ["|pipe| and <b>html</b>", "a &lt; b & c > d", "<br>\n<script>x</script>", REPLY,
                                  "2*3*4 = 24, a_b_c, **bold**", "$12 \\times 7 = 84$ and \\{x\\} \\\\ \\|",
                                  "`code` [link](u) ![img](v) ~~gone~~ \\*"])
def test_cells_show_html_and_markdown_as_written(text):
    """Rendered by a Markdown viewer (markdown-it, CommonMark with GitHub's tables), the cell shows the text itself:
    no tag, emphasis, code, link or struck text, and every backslash kept."""
    import markdown_it  # (the dev extra's)

    cell = md_cell(text)
    assert "<" not in cell.replace("<br>", "") and ">" not in cell.replace("<br>", "")  # no tag but the line breaks
    viewer = markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"])
    rendered = viewer.render(f"| a |\n|---|\n| {cell} |\n")
    shown = rendered.split("<td>", 1)[1].split("</td>", 1)[0]
    assert html.unescape(shown.replace("<br>", "\n")) == text  # (<br> is the only tag: escaped text renders none)
    assert "$" not in cell.replace("\\$", "")  # GitHub's math reads an unescaped $ (markdown-it does not: said here)


def test_txt_prompts_skip_a_bom_and_end_only_at_newlines(tmp_path):
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfROMEO:\r\nJULIET:\r\n")
    assert read_prompts(bom) == ["ROMEO:", "JULIET:"]
    separators = tmp_path / "separators.txt"  # U+2028, U+0085, form feed and a lone \r are inside a prompt
    separators.write_text("a\u2028b\u0085c\nd\x0ce\rf\n", encoding="utf-8", newline="")
    assert read_prompts(separators) == ["a\u2028b\u0085c", "d\x0ce\rf"]
    (tmp_path / "bad.txt").write_bytes(b"\xef\xbb\xbfok\n\xff")
    with pytest.raises(HomeLLMError, match="byte offset 6"):  # the offset counts the byte-order mark
        read_prompts(tmp_path / "bad.txt")


@pytest.mark.parametrize("text", [REPLY * 3, "The quick brown fox jumps over the lazy dog. " * 4, "x" * 50, ""])
def test_screen_cells_wrap_within_their_width(text):
    lines = wrap(text, 12)
    assert all(display_width(line) <= 12 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace("\n", "").replace(" ", "")


def test_prompt_files(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "two\\nlines"}\n\n{"prompt": "x", "other": 1}\n', encoding="utf-8")
    assert read_prompts(good) == ["two\nlines", "x"]
    array = tmp_path / "p.json"  # read as lines of text, the JSON's brackets and quotes the prompts
    array.write_text('[\n  "first",\n  {"prompt": "second"}\n]\n', encoding="utf-8")
    assert read_prompts(array) == ["first", "second"]
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n', encoding="utf-8")
    (tmp_path / "broken.jsonl").write_text("{not json\n", encoding="utf-8")
    (tmp_path / "sjis.txt").write_bytes("日本語".encode("cp932"))
    for name, message in [("missing.txt", "no such file"), ("empty.txt", "no prompts"), ("bad.jsonl", "bad.jsonl:2"),
                          ("broken.jsonl", "not valid JSON"), ("sjis.txt", "not UTF-8")]:
        with pytest.raises(HomeLLMError, match=message):
            read_prompts(tmp_path / name)
    with pytest.raises(HomeLLMError, match="--prompts is missing"):
        read_prompts("")


def test_a_bad_prompt_file_is_one_line_from_the_cli(runs, tmp_path, capsys):
    _, _, base, sft = runs
    assert main(["compare", str(base), str(sft), "--prompts", str(tmp_path / "nowhere.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("homellm: error:") and err.count("\n") == 1 and "nowhere.txt" in err


def test_an_unusable_second_run_fails_before_the_first_generates(runs, tmp_path, monkeypatch):
    from homellm import compare as module

    _, _, base, _ = runs
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    shutil.rmtree(broken / "best")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(USER + "\n", encoding="utf-8")
    monkeypatch.setattr(module, "complete", lambda *a: pytest.fail("generated before checking both runs"))
    with pytest.raises(HomeLLMError, match="broken"):
        compare(base, broken, CompareConfig(prompts=str(prompts)))


def test_compare_from_the_command_line(runs, tmp_path):
    _, _, base, sft = runs
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(USER + "\n", encoding="utf-8")
    out = tmp_path / "report.md"
    proc = subprocess.run([sys.executable, "-m", "homellm", "compare", str(base), str(sft), "--prompts", str(prompts),
                           "--out", str(out), "--max-new-tokens", "30"], capture_output=True, encoding="utf-8",
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert md_cell(REPLY) in out.read_text(encoding="utf-8") and "おしまい" in proc.stdout
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "keep me"}\n')
    proc = subprocess.run([sys.executable, "-m", "homellm", "compare", str(base), str(sft), "--prompts", str(prompts),
                           "--out", str(data)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and f"{data} exists, and homellm did not write it or it was changed since: choose " \
                                   "another --out" in proc.stderr
    assert data.read_text() == '{"text": "keep me"}\n'
