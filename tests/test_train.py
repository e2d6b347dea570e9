"""The training loop: exact resume after SIGKILL, crash-safe checkpoints, DDP equals one process, bad input."""

import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import homellm
from homellm.checkpoint import find_checkpoint, load_model, read_config
from homellm.config import ModelConfig, TrainConfig, preset, replace
from homellm.errors import HomeLLMError
from homellm.muon import Muon
from homellm.train import TokenBatches, check_resume, lr_factor, pretrain

RUN_FLAGS = ["--preset", "tiny", "--max-steps", "16", "--checkpoint-every", "5", "--eval-every", "4",
             "--log-every", "2", "--dropout", "0.1", "--batch-size", "4"]


def metrics(run: Path) -> list[dict]:
    """metrics.jsonl without the timing fields, which differ between any two runs."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "tok_per_s")} for r in rows]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    homellm("pretrain", "--data", str(data_dir), "--out", str(run), *RUN_FLAGS)
    return run


def test_resume_after_sigkill_is_bit_identical(tmp_path, data_dir, reference):
    run = tmp_path / "run"
    killed = homellm("pretrain", "--data", str(data_dir), "--out", str(run), *RUN_FLAGS,
                     env={"HOMELLM_FAULT_KILL_AT_STEP": "13"}, check=False)
    assert killed.returncode == -9
    # `best` of step 12 has a whole training state too: resuming from `last`'s step 10 trained 11 and 12 again
    assert [json.loads((run / c / "checkpoint.json").read_text())["step"] for c in ("last", "best")] == [10, 12]
    assert max(r["step"] for r in metrics(run)) == 12
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "tok')  # and a line a crash cut short
    resumed = homellm("pretrain", "--out", str(run), "--resume")
    assert f"resuming {run} from best at step 12" in resumed.stderr
    assert "metrics.jsonl:" in resumed.stderr and "is an incomplete log line: dropped" in resumed.stderr
    assert metrics(run) == metrics(reference)
    assert_same_weights(run / "last", reference / "last")
    assert_same_weights(run / "best", reference / "best")


def test_a_damaged_metrics_line_before_the_end_is_named(tmp_path):
    from homellm.train import _truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n[1, 2]\n{"step": 2}\n')
    with pytest.raises(HomeLLMError, match=r"metrics.jsonl:2: not a metrics record with a step"):
        _truncate_metrics(path, 1)
    assert path.read_text() == '{"step": 1}\n[1, 2]\n{"step": 2}\n'


def test_muon_run_resumes_bit_identically(tmp_path, data_dir):
    flags = ["--preset", "tiny", "--optimizer", "muon", "--max-steps", "6", "--checkpoint-every", "3",
             "--eval-every", "3", "--log-every", "1"]
    from homellm.cli import main  # but for the killed run, in-process, for the suite's time

    assert main(["pretrain", "--data", str(data_dir), "--out", str(tmp_path / "ref"), *flags]) == 0
    killed = homellm("pretrain", "--data", str(data_dir), "--out", str(tmp_path / "run"), *flags,
                     env={"HOMELLM_FAULT_KILL_AT_STEP": "4"}, check=False)
    assert killed.returncode == -9
    assert main(["pretrain", "--out", str(tmp_path / "run"), "--resume"]) == 0
    assert metrics(tmp_path / "run") == metrics(tmp_path / "ref")
    assert_same_weights(tmp_path / "run" / "last", tmp_path / "ref" / "last")


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, data_dir, reference):
    run = tmp_path / "run"
    killed = homellm("pretrain", "--data", str(data_dir), "--out", str(run), *RUN_FLAGS,
                     env={"HOMELLM_FAULT_KILL_IN_CHECKPOINT": "10"}, check=False)
    assert killed.returncode == -9
    assert (run / ".last.tmp").is_dir()  # the half-done swap of step 10
    assert json.loads((run / "last" / "checkpoint.json").read_text())["step"] == 5
    from homellm.cli import main  # the resume in-process, for the suite's time

    assert main(["pretrain", "--out", str(run), "--resume"]) == 0
    assert metrics(run) == metrics(reference)
    assert_same_weights(run / "last", reference / "last")


def test_a_kill_while_writing_the_first_checkpoint_leaves_a_run_to_start_again(tmp_path, data_dir, reference,
                                                                                capsys):
    """Killed with the first checkpoint (`best` of step 4) half written: nothing to resume, and the same command
    starts the run again (the half-written .best.tmp counted as a trained run, and no way on was left)."""
    from homellm.cli import main

    run = tmp_path / "run"
    args = ["pretrain", "--data", str(data_dir), "--out", str(run), *RUN_FLAGS]
    killed = homellm(*args, env={"HOMELLM_FAULT_KILL_MID_CHECKPOINT": "4"}, check=False)
    assert killed.returncode == -9 and (run / ".best.tmp").is_dir() and not (run / ".best.tmp" / "checkpoint.json"
                                                                               ).exists()
    assert main(["pretrain", "--out", str(run), "--resume"]) == 2
    assert capsys.readouterr().err.startswith(
        f"homellm: error: {run}: no checkpoint yet, the run stopped before its first: start it again without --resume")
    homellm(*args)
    assert metrics(run) == metrics(reference)
    assert_same_weights(run / "last", reference / "last")


def test_a_checkpoint_stopped_mid_write_by_ctrl_c_is_removed(tmp_path, monkeypatch):
    from homellm.checkpoint import save_checkpoint
    from homellm.model import GPT

    model = GPT(replace(preset("tiny")[0], vocab_size=16))
    save_checkpoint(tmp_path, "last", model, {"step": 1}, {"step": 1})

    def interrupted(*args, **kwargs):  # a second Ctrl-C while the state is written
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, "last", model, {"step": 2}, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert find_checkpoint(tmp_path, "last", need_state=True) == tmp_path / "last"


def test_a_kill_between_a_checkpoints_two_renames_resumes_from_the_new_one(tmp_path, data_dir, reference,
                                                                            capsys):
    """Killed while `best` of step 4 was being swapped in, before any `last`: the complete .best.tmp is used, and the
    step's metrics line, written before the checkpoint, is kept (it used to be written after, and was lost)."""
    from homellm.cli import main  # the resumes in-process, for the suite's time

    run = tmp_path / "run"
    killed = homellm("pretrain", "--data", str(data_dir), "--out", str(run), *RUN_FLAGS,
                     env={"HOMELLM_FAULT_KILL_IN_CHECKPOINT": "4"}, check=False)
    assert killed.returncode == -9 and not (run / "best").exists() and not (run / "last").exists()
    assert max(r["step"] for r in metrics(run)) == 4
    capsys.readouterr()
    assert main(["pretrain", "--out", str(run), "--resume"]) == 0
    assert f"using {run / '.best.tmp'} (step 4)" in capsys.readouterr().err
    assert metrics(run) == metrics(reference)
    assert_same_weights(run / "last", reference / "last")
    assert_same_weights(run / "best", reference / "best")
    # At the very end, `last` moved aside and the new one not yet in place: resuming puts it back, trains nothing.
    (run / "last").rename(run / ".last.old")
    assert main(["pretrain", "--out", str(run), "--resume"]) == 0
    assert "had already finished at step 16 (max_steps)" in capsys.readouterr().err
    assert_same_weights(run / "last", reference / "last") and metrics(run) == metrics(reference)


def test_resume_takes_a_complete_best_tmp_newer_than_last(tmp_path):
    """Killed between the two renames of a `best` newer than `last`: `last` was used, and the steps between were
    trained again."""
    from homellm.checkpoint import resume_point, save_checkpoint
    from homellm.model import GPT

    model = GPT(replace(preset("tiny")[0], vocab_size=16))
    for name, step in (("best", 8), ("best", 12), ("last", 10)):
        save_checkpoint(tmp_path, name, model, {"step": step}, {"step": step})
        if step == 8:
            (tmp_path / "best").rename(tmp_path / ".best.old")
    (tmp_path / "best").rename(tmp_path / ".best.tmp")  # step 12's, complete, not yet renamed
    assert resume_point(tmp_path) == tmp_path / ".best.tmp"
    (tmp_path / ".best.tmp").rename(tmp_path / "best")
    assert resume_point(tmp_path) == tmp_path / "best"
    save_checkpoint(tmp_path, "last", model, {"step": 13}, {"step": 13})
    assert resume_point(tmp_path) == tmp_path / "last"


def test_a_kill_between_the_renames_of_a_best_newer_than_last_resumes_from_it(tmp_path, data_dir, reference,
                                                                                monkeypatch, capsys):
    from homellm import checkpoint as module
    from homellm.cli import main

    def kill_in_best_12(var, step, *args):
        if var == "HOMELLM_FAULT_KILL_IN_CHECKPOINT" and step == 12:
            raise RuntimeError("killed")  # as a kill would: .best.tmp complete, not yet renamed

    run = tmp_path / "run"
    monkeypatch.setattr(module, "fault_point", kill_in_best_12)
    with pytest.raises(RuntimeError, match="killed"):
        main(["pretrain", "--data", str(data_dir), "--out", str(run), *RUN_FLAGS])
    monkeypatch.undo()
    assert [json.loads((run / c / "checkpoint.json").read_text())["step"] for c in ("last", ".best.tmp")] == [10, 12]
    assert main(["pretrain", "--out", str(run), "--resume"]) == 0
    assert f"resuming {run} from best at step 12" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
    assert metrics(run) == metrics(reference)
    assert_same_weights(run / "last", reference / "last")
    assert_same_weights(run / "best", reference / "best")


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_ctrl_c_finishes_the_step_and_writes_last_to_resume_from(tmp_path, data_dir, reference, signal_name):
    """Relay training stopped with Ctrl-C used to lose every step since the last periodic checkpoint (5 here); and
    SIGTERM, how a scheduler or container stops a job (audit), killed it at once."""
    run = tmp_path / "run"
    stopped = homellm("pretrain", "--data", str(data_dir), "--out", str(run), *RUN_FLAGS,
                      env={"HOMELLM_FAULT_SIGINT_AT_STEP": "7", "HOMELLM_FAULT_SIGNAL": signal_name}, check=False)
    assert stopped.returncode == 130 and "interrupted at step 7; `--resume` continues from there" in stopped.stderr
    assert ("terminated (SIGTERM): stopping after this step" in stopped.stderr) == (signal_name == "SIGTERM")
    assert "Traceback" not in stopped.stderr and json.loads(stopped.stdout.splitlines()[-1])["stop"] == "interrupted"
    assert json.loads((run / "last" / "checkpoint.json").read_text())["step"] == 7
    homellm("pretrain", "--out", str(run), "--resume")
    assert metrics(run) == metrics(reference)
    assert_same_weights(run / "last", reference / "last")
    assert_same_weights(run / "best", reference / "best")


def test_ctrl_c_in_a_slow_step_drops_it_at_the_micro_batch_and_resume_does_it_again(tmp_path, data_dir, monkeypatch,
                                                                                     capsys):
    """torchrun kills its ranks 30 s after passing on a Ctrl-C, and finishing a step of many micro-batches took longer
    (a CPU's gpt2-124m): no checkpoint was left. A slow step (a session's first is taken as one) is now dropped at the
    micro-batch the Ctrl-C lands in, `last` written at the step before with its random state; a fast one finishes."""
    from homellm.cli import main

    flags = ["--preset", "tiny", "--max-steps", "6", "--eval-every", "3", "--log-every", "1", "--dropout", "0.1",
             "--batch-size", "2", "--grad-accum", "2", "--data", str(data_dir)]
    assert main(["pretrain", "--out", str(reference := tmp_path / "ref"), *flags]) == 0
    run = tmp_path / "run"
    for micro, step in (("2.0", 3), ("3.0", 3)):  # step 2 is fast, and finishes; 3 begins the resumed session
        monkeypatch.setenv("HOMELLM_FAULT_SIGINT_AT_MICRO", micro)
        with pytest.raises(SystemExit) as stop:
            main(["pretrain", "--out", str(run), *(["--resume"] if micro == "3.0" else flags)])
        err = capsys.readouterr().err
        assert stop.value.code == 130 and f"interrupted at step {step}; `--resume` continues" in err, err
        assert ("dropping the unfinished step" in err) == (micro == "3.0")
        record = json.loads((run / "last" / "checkpoint.json").read_text())
        assert record["step"] == 3 and "val_loss" in record  # (kept when written again: its weights are the same)
    monkeypatch.delenv("HOMELLM_FAULT_SIGINT_AT_MICRO")
    assert main(["pretrain", "--out", str(run), "--resume"]) == 0
    assert metrics(run) == metrics(reference)
    assert_same_weights(run / "last", reference / "last")


def test_a_checkpoint_that_fills_the_disk_is_removed_and_said_in_one_line(tmp_path, reference, monkeypatch):
    """torch.save on a full disk says "unexpected pos"; the half-written .last.tmp was left filling the disk, and
    the next --resume failed on it. The previous checkpoint stays as it was."""
    from homellm import checkpoint as module

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = (run / "last" / "model.safetensors").read_bytes()

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 268096 vs 267988")

    monkeypatch.setattr(module.torch, "save", full)
    monkeypatch.setattr(module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 4096))
    model = module.load_model(run, "last")
    with pytest.raises(HomeLLMError, match=r"run/last: cannot write the checkpoint \(the disk is full; 0.0 MiB free\): "
                                           r"make room, then --resume from the previous checkpoint, which is intact"):
        module.save_checkpoint(run, "last", model, {"step": 1}, {"step": 1})
    assert not (run / ".last.tmp").exists() and (run / "last" / "model.safetensors").read_bytes() == before
    # The same error with room on the disk is not the disk's: it keeps its own message (a bug keeps its traceback).
    monkeypatch.setattr(module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 0, 10**12))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        module.save_checkpoint(run, "last", model, {"step": 1}, {"step": 1})
    assert not (run / ".last.tmp").exists()


def test_a_damaged_checkpoint_record_is_named_and_skipped(tmp_path, reference, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    record = run / "last" / "checkpoint.json"
    good = json.loads(record.read_text())
    for bad in ([1, 2], {k: v for k, v in good.items() if k != "step"}, {**good, "step": "x"}):
        record.write_text(json.dumps(bad))
        assert find_checkpoint(run, "last", need_state=True) == run / "best"
        assert "checkpoint.json: not a checkpoint record (it needs a whole-number step" in capsys.readouterr().err
    # A run with no evaluation yet has no `best`: not damage, and not said as if it were ("best: missing").
    record.write_text(json.dumps(good))
    shutil.copytree(run / "best", run / "was_best")
    shutil.rmtree(run / "best")
    assert find_checkpoint(run, "best") == run / "last"
    assert capsys.readouterr().err == (f"note: {run} has no `best` yet (it is written at an evaluation, which this run "
                                       "has not had); using last (step 16)\n")
    (run / ".best.old").mkdir()  # but a kill between a save's renames left one: that is said as it is
    find_checkpoint(run, "best")
    assert capsys.readouterr().err.startswith(f"note: {run / 'best'} is not usable ({run / 'best'}: missing)")
    (run / ".best.old").rmdir()
    shutil.move(run / "was_best", run / "best")
    shutil.rmtree(run / "last")
    (run / "last").write_text("not a folder")  # and a file where `last` should be is replaced by the next save
    assert "last: not a folder" in str(find_checkpoint(run, "last", need_state=True)) + capsys.readouterr().err
    model_cfg, cfg = read_config(run)
    pretrain(model_cfg, replace(cfg, out=str(run), resume=True, max_steps=18))
    assert (run / "last").is_dir() and json.loads((run / "last" / "checkpoint.json").read_text())["step"] == 18


def test_corrupt_checkpoint_falls_back_to_newest_valid(tmp_path, reference, capsys, monkeypatch):
    from homellm import checkpoint

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    weights = run / "last" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    hashed, sha256_file = [], checkpoint.sha256_file
    monkeypatch.setattr(checkpoint, "sha256_file", lambda path: hashed.append(path) or sha256_file(path))
    chosen = find_checkpoint(run, "last", need_state=True)
    assert chosen == run / "best"
    assert hashed.count(weights) == 1  # each file read once (a 1B model's weights take seconds to hash)
    monkeypatch.undo()
    assert "corrupt" in capsys.readouterr().err
    load_model(run, "last")  # loads best instead
    from homellm.info import describe

    table = describe(run)
    assert "not usable: " in table and "last/model.safetensors: corrupt" in table
    assert [line.split()[0] for line in table.splitlines() if line.endswith(" ok")] == ["best"]
    shutil.rmtree(run / "best")
    with pytest.raises(HomeLLMError, match="no valid resumable checkpoint"):
        find_checkpoint(run, "last", need_state=True)


def test_a_damaged_config_json_is_named_not_a_traceback(tmp_path, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({"model": config["model"]}))
    with pytest.raises(HomeLLMError, match="config.json: no 'train' section"):
        load_model(run)
    (run / "config.json").write_text("[]")
    with pytest.raises(HomeLLMError, match="config.json: no 'model' section"):
        load_model(run)
    config["model"]["n_embd"] *= 2
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(HomeLLMError, match=r"model.safetensors: embed_tokens.weight has shape .* restore config"):
        load_model(run)


def test_a_run_finds_its_data_from_any_folder_and_a_quickstart_run_is_not_resumed(tmp_path, data_dir, reference,
                                                                                     capsys, monkeypatch):
    """The run kept --data as typed ("prep"): resumed from another folder it trained, without a word, on whatever
    folder of that name was there. Now the config holds the absolute path."""
    from homellm.cli import main

    here, there = tmp_path / "here", tmp_path / "there"
    shutil.copytree(data_dir, here / "prep")
    (there / "prep").mkdir(parents=True)  # another folder of the same name, empty
    cli = ["pretrain", "--out", str(tmp_path / "run")]
    monkeypatch.chdir(here)
    assert main(cli + ["--data", "prep", "--preset", "tiny", "--max-steps", "2", "--eval-every", "0"]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["data"] == [str(here / "prep")] and config["data_dir"] == str(here / "prep")
    monkeypatch.chdir(there)
    capsys.readouterr()
    assert main(cli + ["--resume", "--max-steps", "3"]) == 0
    assert '"steps": 3' in capsys.readouterr().out
    quick = tmp_path / "quick"
    shutil.copytree(reference, quick)
    config = json.loads((quick / "config.json").read_text())
    (quick / "config.json").write_text(json.dumps({**config, "task": "arithmetic"}))
    assert main(["pretrain", "--out", str(quick), "--resume", "--max-steps", "20"]) == 2
    assert "was trained by `homellm quickstart` on the arithmetic task's answers" in capsys.readouterr().err


def test_resume_with_a_different_config_is_refused(tmp_path, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    proc = homellm("pretrain", "--out", str(run), "--resume", "--n-layer", "3", check=False)
    assert proc.returncode == 2
    assert "n_layer: run has 2, asked 3" in proc.stderr
    assert "Traceback" not in proc.stderr and "--init" not in proc.stderr  # its weights would not fit
    # Another rate for the weights trained so far is a new run from them: the refusal says how
    for flag, value in (("--lr", "0.5"), ("--dropout", "0.2")):  # (audit: --init takes another dropout too)
        proc = homellm("pretrain", "--out", str(run), "--resume", flag, value, check=False)
        assert proc.returncode == 2 and proc.stderr.strip().endswith(
            f"or train into a new --out from its weights with --init {run} --init-checkpoint last"), proc.stderr
    proc = homellm("pretrain", "--data", "x", "--out", str(run), "--preset", "tiny", check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr


def test_resuming_on_another_number_of_processes_keeps_the_global_batch(tmp_path, reference, capsys):
    """A run trained by 2 processes at --batch-size 4 and resumed by 1 went on at batches of 4, other data and
    other maths, without a word; and --batch-size 8, which keeps them, was refused."""
    from homellm.cli import main

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    config = json.loads((run / "config.json").read_text())
    assert config["world"] == 1  # kept since
    batch = config["train"]["batch_size"]
    config["world"], config["train"]["batch_size"] = 2, batch // 2  # as torchrun with 2 processes would have saved
    (run / "config.json").write_text(json.dumps(config))
    assert main(["pretrain", "--out", str(run), "--resume", "--max-steps", "17"]) == 2
    # The suggestion keeps the asked batch, which is what fits the GPU's memory, and names both flags.
    fix = f"--batch-size {batch // 2} --grad-accum 2 on 1 process"
    assert (f"--resume: {run} trained on batches of {batch} sequences ({batch // 2} x 2 processes), and {batch // 2} "
            f"x 1 process would draw other data and change the maths: resume with {fix} (or another --batch-size "
            f"and --grad-accum whose product is {batch})") in capsys.readouterr().err
    assert main(["pretrain", "--out", str(run), "--resume", "--max-steps", "17", *fix.split()[:4]]) == 0
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 17


@pytest.mark.parametrize("world, batch, accum, fix", [
    (3, 4, 1, "--batch-size 4 --grad-accum 1 on 1 process (or on a number of processes that divides 4)"),
    (1, 1, 3, "--batch-size 1 --grad-accum 4 on 1 process"),  # the batch kept, the accumulation made to fit
    (1, 3, 2, "--batch-size 2 --grad-accum 2 on 1 process"),  # the batch cannot be: the accumulation kept
    (1, 3, 3, "--batch-size 4 --grad-accum 1 on 1 process"),  # neither: --grad-accum 1 named, or it stays 3
    (2, 1, 1, "--batch-size 1 --grad-accum 2 on 2 processes"),
])
def test_the_refusal_to_change_the_global_batch_names_flags_that_work(tmp_path, reference, monkeypatch, world, batch,
                                                                      accum, fix):
    """Its advice was broken: "resume with on 2 processes" where the run's batch does not divide among them, and a
    --grad-accum of 1 left unsaid, so the typed one stayed and the next resume was refused again."""
    model_cfg, train_cfg = read_config(reference)
    assert train_cfg.batch_size * train_cfg.grad_accum == 4
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(HomeLLMError) as err:
        check_resume(reference, model_cfg, replace(train_cfg, batch_size=batch, grad_accum=accum))
    assert f"resume with {fix}" in str(err.value), str(err.value)


def test_a_run_resumes_with_half_the_batch_and_twice_the_accumulation(tmp_path, data_dir, capsys):
    """Relay training onto a GPU that fits fewer rows (seed 003): --batch-size 2 --grad-accum 2 was refused for a
    run of --batch-size 4. A step's rows are now drawn for the whole global batch, so any split of it reads the same
    rows, and the run goes on as it would have, up to the rounding of summing two micro-batches. Its evaluations
    score the same val rows too (they scored half of them: best and --patience compared two val sets)."""
    flags = ["--preset", "tiny", "--max-steps", "10", "--checkpoint-every", "5", "--eval-every", "5", "--log-every",
             "1", "--dropout", "0", "--batch-size", "4"]
    from homellm.cli import main  # in-process where no kill is needed, for the suite's time

    whole, run = tmp_path / "whole", tmp_path / "run"
    assert main(["pretrain", "--data", str(data_dir), "--out", str(whole), *flags]) == 0
    homellm("pretrain", "--data", str(data_dir), "--out", str(run), *flags, env={"HOMELLM_FAULT_KILL_AT_STEP": "7"},
            check=False)
    assert json.loads((run / "last" / "checkpoint.json").read_text())["step"] == 5
    capsys.readouterr()
    assert main(["pretrain", "--out", str(run), "--resume", "--batch-size", "2", "--grad-accum", "2"]) == 0
    assert ("note: --resume: the same batches of 4 sequences, split otherwise (2 x 2 micro-batches x 1 process, not "
            "4 x 1 process): their sums add up in another order, so the run goes on as it would have to rounding, not "
            "bit for bit") in capsys.readouterr().err
    got, want = metrics(run), metrics(whole)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 11))
    for a, b in zip(got, want):
        assert a["tokens"] == b["tokens"] and math.isclose(a["train_loss"], b["train_loss"], rel_tol=1e-4), a
    assert [r["step"] for r in got if "val_loss" in r] == [5, 10]
    for a, b in zip(got, want):
        assert math.isclose(a.get("val_loss", 0), b.get("val_loss", 0), rel_tol=1e-4), (a, b)
    wa, wb = (load_file(str(r / "last" / "model.safetensors")) for r in (run, whole))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def test_windows_start_anywhere_they_fit_up_to_the_last_token(monkeypatch):
    """A shard of L tokens has L - block_size windows of block_size + 1: the count was one short, so a shard's last
    token was never a target and a split of exactly one window was refused."""
    import homellm.train as train_module

    shards = {"train": [np.arange(12), np.arange(100, 109)], "val": [np.arange(9)]}
    monkeypatch.setattr(train_module, "open_split", lambda data_dir, split: shards[split])
    data = TokenBatches("d", 8, 0, np.ones(128, dtype=np.int64))
    firsts = {int(v) for step in range(200) for v in data.train_batch(step, 4, 0, 1)[0][:, 0]}
    assert firsts == {0, 1, 2, 3, 100}  # 12 tokens: starts 0-3; 9 tokens: start 0 only
    x, y = data.val_batch(0, 2, 0, 1)
    assert x[0].tolist() == list(range(8)) and y[0].tolist() == list(range(1, 9))


def test_each_process_reads_its_own_slice_of_the_global_batch(monkeypatch):
    """Rank r of 4 gets rows r*b to (r+1)*b of the batch one process draws at batch 4b, train and val alike, and
    reads only those (it built the whole global batch and dropped the rest: work that grew with the processes)."""
    import homellm.train as train_module

    shards = {"train": [np.arange(5000), np.arange(10_000, 13_000)], "val": [np.arange(20_000, 20_500)]}
    monkeypatch.setattr(train_module, "open_split", lambda data_dir, split: shards[split])
    data = TokenBatches("d", 16, 3, np.ones(32_768, dtype=np.int64))
    whole = data.train_batch(7, 12, 0, 1)
    parts = [data.train_batch(7, 3, rank, 4) for rank in range(4)]
    assert all(torch.equal(torch.cat([p[i] for p in parts]), whole[i]) for i in range(2))
    whole = data.val_batch(1, 8, 0, 1)
    parts = [data.val_batch(1, 4, rank, 2) for rank in range(2)]
    assert all(torch.equal(torch.cat([p[i] for p in parts]), whole[i]) for i in range(2))
    read = []
    stack = np.stack
    monkeypatch.setattr(train_module.np, "stack", lambda rows: read.append(len(rows)) or stack(rows))
    data.train_batch(7, 3, 1, 4)
    assert read == [3]


def test_the_windows_a_step_draws_stay_as_they_were(monkeypatch):
    """Pinned: a run resumed by a later homellm must read the windows its first session would have. These are the
    windows homellm drew at 8e80831, before a step's rows were drawn for the whole global batch; runs without
    accumulation kept them, and any split of a global batch reads the same ones."""
    import homellm.train as train_module

    shards = {"train": [np.arange(5000), np.arange(10_000, 13_000)], "val": [np.arange(20_000, 20_500)]}
    monkeypatch.setattr(train_module, "open_split", lambda data_dir, split: shards[split])
    data = TokenBatches("d", 16, 0, np.ones(32_768, dtype=np.int64))
    assert data.train_batch(3, 4, 0, 1)[0][:, 0].tolist() == [10793, 11107, 12576, 3525]
    assert data.train_batch(3, 2, 1, 2)[0][:, 0].tolist() == [12576, 3525]
    assert data.val_batch(0, 4, 0, 1)[0][:, 0].tolist() == [20252, 20430, 20480, 20269]


def assert_same_training(a: Path, b: Path) -> None:
    """Two runs of the same global batch (one process and torchrun's two): the same steps, tokens, losses within
    float reordering, and weights."""
    ma, mb = metrics(a), metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for ra, rb in zip(ma, mb):
        assert ra["tokens"] == rb["tokens"]
        assert math.isclose(ra["train_loss"], rb["train_loss"], rel_tol=1e-4)
        if "val_loss" in ra:
            assert math.isclose(ra["val_loss"], rb["val_loss"], rel_tol=1e-4)
    wa, wb = (load_file(str(run / "last" / "model.safetensors")) for run in (a, b))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def test_ddp_two_processes_match_one_at_the_same_global_batch(tmp_path, data_dir):
    flags = ["--preset", "tiny", "--max-steps", "6", "--eval-every", "3", "--log-every", "1", "--device", "cpu"]
    from homellm.cli import main  # the one process in this one, for the suite's time

    single, double = tmp_path / "one", tmp_path / "two"
    assert main(["pretrain", "--data", str(data_dir), "--out", str(single), *flags, "--batch-size", "8"]) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "homellm", "pretrain", "--data", str(data_dir), "--out", str(double), *flags, "--batch-size", "4"]
    proc = subprocess.run(torchrun, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_training(single, double)


def test_a_config_error_under_torchrun_is_said_once_per_machine(monkeypatch, capsys):
    """Every rank used to print it, rank-prefixed: N copies of one mistake. Before the ranks connect, a machine's
    first rank speaks for it (another machine's first rank still speaks: its files may differ)."""
    from homellm.cli import main

    argv = ["pretrain", "--data", "x.txt", "--out", "r", "--preset", "tiny", "--n-head", "3"]
    said = {}
    for rank, local_rank in (("0", "0"), ("1", "1"), ("2", "0"), ("3", "1")):  # two machines of two processes
        monkeypatch.setenv("WORLD_SIZE", "4")
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert main(argv) == 2
        said[rank] = capsys.readouterr().err
    assert said["0"] == "homellm: error: --n-embd 32 is not divisible by --n-head 3: change one\n"
    assert said["1"] == said["3"] == "" and said["2"].startswith("homellm: error (rank 2): --n-embd 32")


def test_ctrl_c_under_torchrun_stops_every_rank_at_one_step_with_a_checkpoint(tmp_path, data_dir):
    """torchrun passes Ctrl-C on to each rank, which may be a step apart when it lands: here only rank 1 sees it.
    The ranks used to each stop at a step of their own (or not at all), with no checkpoint, and hang in a collective
    until torchrun killed them. Now all stop after step 5 with `last`, and resuming matches one process. Resumed,
    the session's first step is dropped where the Ctrl-C lands (see the one-process test): again at step 5."""
    flags = ["--preset", "tiny", "--max-steps", "8", "--eval-every", "4", "--log-every", "1", "--device", "cpu",
             "--grad-accum", "2"]
    from homellm.cli import main  # the one process in this one, for the suite's time

    single, double = tmp_path / "one", tmp_path / "two"
    assert main(["pretrain", "--data", str(data_dir), "--out", str(single), *flags, "--batch-size", "8"]) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "homellm", "pretrain", "--out", str(double)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(torchrun + ["--data", str(data_dir), *flags, "--batch-size", "4"], capture_output=True,
                          text=True, timeout=240,
                          env={**env, "HOMELLM_FAULT_SIGINT_AT_STEP": "5", "HOMELLM_FAULT_RANK": "1"})
    assert proc.returncode != 0 and proc.stderr.count("interrupted at step 5; `--resume` continues") == 1, \
        proc.stderr[-3000:]
    assert proc.stdout.count('"stop": "interrupted"') == 1
    assert json.loads((double / "last" / "checkpoint.json").read_text())["step"] == 5
    proc = subprocess.run(torchrun + ["--resume"], capture_output=True, text=True, timeout=240,
                          env={**env, "HOMELLM_FAULT_SIGINT_AT_MICRO": "5.0", "HOMELLM_FAULT_RANK": "1"})
    assert proc.returncode != 0 and proc.stderr.count("interrupted at step 5; `--resume` continues") == 1, \
        proc.stderr[-3000:]
    assert json.loads((double / "last" / "checkpoint.json").read_text())["step"] == 5
    proc = subprocess.run(torchrun + ["--resume"], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in metrics(double)] == list(range(1, 9))
    assert_same_training(single, double)


def test_training_lowers_val_loss_and_bpb_is_loss_over_ln2_for_ascii_chars(tmp_path, data_dir):
    model_cfg, cfg = preset("tiny")
    cfg = replace(cfg, data=[str(data_dir)], out=str(tmp_path / "run"), max_steps=60, eval_every=30)
    summary = pretrain(model_cfg, cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < math.log(64)
    # One ASCII character is one byte and one token: bits per byte is nats per token over ln 2.
    assert math.isclose(summary["val_bpb"], summary["val_loss"] / math.log(2), rel_tol=1e-6)
    assert {"step", "tokens", "elapsed_s", "tok_per_s", "lr", "train_loss"} <= rows[0].keys()
    assert all(r["tokens"] == r["step"] * cfg.batch_size * cfg.grad_accum * model_cfg.block_size for r in rows)


def test_a_sample_on_the_last_step_is_shown_once(tmp_path, data_dir, capsys):
    model_cfg, cfg = preset("tiny")
    cfg = replace(cfg, data=[str(data_dir)], out=str(tmp_path / "run"), max_steps=4, eval_every=0, sample_every=2)
    pretrain(model_cfg, cfg)

    def shown() -> int:
        out, err = capsys.readouterr()
        return (out + err).count("sample: ")

    assert shown() == 2  # steps 2 and 4: the end's sample is step 4's
    pretrain(model_cfg, replace(cfg, out=str(tmp_path / "odd"), max_steps=3))
    assert shown() == 2  # step 2's, and the end's


def test_a_time_budget_too_short_for_the_warmup_is_said(tmp_path, data_dir, capsys):
    """A GPT-2 vocabulary on a CPU fitted 17 steps in --max-time 60, of the preset's 50 warmup steps: the rate never
    reached --lr, nor decayed, and nothing said so (a --max-steps run gets a note at its start)."""
    model_cfg, cfg = preset("tiny")
    cfg = replace(cfg, data=[str(data_dir)], out=str(tmp_path / "run"), max_steps=0, max_time=1.5, eval_every=0,
                  warmup_steps=100_000)
    pretrain(model_cfg, cfg)
    note = re.search(r"note: at \S+ s a step, --max-time 1.5 fits about (\d+) steps, not more than --warmup-steps "
                     r"100000: the learning rate never reaches --lr \S+, nor decays; give fewer warmup steps \(a "
                     r"tenth of the run is usual: --warmup-steps (\d+)\)", capsys.readouterr().err)
    assert note and int(note[2]) == max(1, int(note[1]) // 10)
    pretrain(model_cfg, replace(cfg, out=str(tmp_path / "short"), warmup_steps=5))
    assert "fits about" not in capsys.readouterr().err


def test_muon_trains(tmp_path, data_dir):
    model_cfg, cfg = preset("tiny")
    cfg = replace(cfg, data=[str(data_dir)], out=str(tmp_path / "run"), max_steps=30, eval_every=15,
                  optimizer="muon")
    rows = pretrain(model_cfg, cfg)
    assert rows["val_loss"] < math.log(64) - 0.5


def test_epochs_set_the_steps_from_the_training_tokens(tmp_path, data_dir, capsys):
    """nanoGPT-style random windows: an epoch is the split's token count, read batch x block tokens a step."""
    model_cfg, cfg = preset("tiny")
    cfg = replace(cfg, data=[str(data_dir)], out=str(tmp_path / "run"), epochs=0.25, max_steps=0, eval_every=0,
                  grad_accum=2)
    train_tokens = json.loads((data_dir / "meta.json").read_text())["train_tokens"]
    steps = math.ceil(0.25 * train_tokens / (cfg.batch_size * 2 * model_cfg.block_size))
    summary = pretrain(model_cfg, cfg)
    assert summary["steps"] == steps and summary["tokens"] == steps * cfg.batch_size * 2 * model_cfg.block_size
    assert f"--epochs 0.25: {steps:,} steps of {cfg.batch_size * 2 * model_cfg.block_size:,} tokens" in (
        capsys.readouterr().err)
    # Resumed for more epochs: the new end named as given (review: "--max-steps 36", a flag never typed)
    more = pretrain(model_cfg, replace(cfg, epochs=0.5, resume=True))
    assert f"note: the run now ends at --epochs 0.5, {more['steps']:,} steps (it was --epochs 0.25, {steps:,} steps)" \
        in capsys.readouterr().err


def test_time_budget_stops_the_run(tmp_path, data_dir):
    model_cfg, cfg = preset("tiny")
    cfg = replace(cfg, data=[str(data_dir)], out=str(tmp_path / "run"), max_steps=10**9, max_time=1.5,
                  eval_every=10**6)
    summary = pretrain(model_cfg, cfg)
    assert summary["stop"] == "max_time"
    assert 1.0 <= summary["elapsed_s"] < 5  # (training stops short of it by the final evaluation's time)
    assert (tmp_path / "run" / "last").is_dir()


def test_resuming_a_finished_run_says_so_and_trains_only_when_given_more(tmp_path, reference, capsys):
    """--resume of a run at its end used to report "stop": "max_steps" whatever had ended it; now it names the
    reason, leaves the run as it was, and a higher limit trains on."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    model_cfg, cfg = read_config(run)
    cfg = replace(cfg, out=str(run), resume=True)
    before = (run / "metrics.jsonl").read_text()
    summary = pretrain(model_cfg, cfg)
    assert (summary["steps"], summary["stop"]) == (16, "max_steps")
    final = json.loads(before.splitlines()[-1])
    assert (summary["val_loss"], summary["val_bpb"]) == (final["val_loss"], final["val_bpb"])  # reported again
    err = capsys.readouterr().err
    assert f"note: {run} had already finished at step 16 (max_steps): raise --max-steps" in err
    assert "sample:" not in err  # (shown when it finished: the same weights, the same text)
    assert (run / "metrics.jsonl").read_text() == before
    # A lower --max-steps than the run's step: not "had already finished" (it may have been stopped midway)
    assert pretrain(model_cfg, replace(cfg, max_steps=3))["steps"] == 16
    assert (f"note: {run} is at step 16, past --max-steps 3: nothing to train; give --max-steps above 16"
            in (err := capsys.readouterr().err)) and "the run now ends" not in err  # (nothing trains to it)
    assert (run / "metrics.jsonl").read_text() == before
    assert read_config(run)[1].max_steps == 16  # the flags of a resume that trained nothing are not recorded
    # A time budget given where the steps end it: "raise --max-steps or --max-time" was advised, and the higher
    # --max-time did not train either.
    assert pretrain(model_cfg, replace(cfg, max_time=3600))["steps"] == 16
    assert (f"note: {run} had already finished at step 16: its --max-steps 16 ends it before its --max-time 3600 "
            "does: raise --max-steps, or give --max-steps 0 to end it by time alone") in capsys.readouterr().err
    timed = replace(cfg, max_steps=0, max_time=0.001)
    assert pretrain(model_cfg, timed)["stop"] == "max_time"  # the 16 steps took longer than a millisecond
    assert re.search(r"note: .*run has used \d+ s of its --max-time 0.001: raise --max-time above \d+ to train it "
                     r"further \(evaluations count too, and the final one keeps about \d+ s of the budget\)",
                     capsys.readouterr().err)
    # Ended by the room kept for the final evaluation (38 s used, 8 s kept, --max-time 45): "max_steps" was said,
    # and the --max-time it advised (above 38) did not train
    timed_run = tmp_path / "timed"
    shutil.copytree(run, timed_run)
    from homellm.checkpoint import sha256_file

    last = timed_run / "last"
    state = torch.load(last / "state.pt", weights_only=False)
    torch.save({**state, "elapsed": 38.0, "final_eval": [8.0, True]}, last / "state.pt")
    info = json.loads((last / "checkpoint.json").read_text())
    info["sha256"]["state.pt"] = sha256_file(last / "state.pt")
    (last / "checkpoint.json").write_text(json.dumps(info))
    kept = replace(timed, out=str(timed_run), max_time=45)
    assert pretrain(model_cfg, kept)["stop"] == "max_time"
    assert (f"note: {timed_run} has used 38 s of its --max-time 45: raise --max-time above 46 to train it further "
            "(evaluations count too, and the final one keeps about 8 s of the budget)") in capsys.readouterr().err
    # Under a budget of 12 the room kept is capped at half of it, 6 s: that was said, and 38 + 6 is not 46.
    assert pretrain(model_cfg, replace(kept, max_time=12))["stop"] == "max_time"
    assert "--max-time 12: raise --max-time above 46 to train it further (evaluations count too, and the final one " \
           "keeps about 8 s of the budget)" in capsys.readouterr().err
    assert pretrain(model_cfg, replace(kept, max_time=50, max_steps=20))["steps"] == 20  # (4 s for 4 steps)
    more = pretrain(model_cfg, replace(timed, max_steps=18, max_time=0))
    err = capsys.readouterr().err
    assert (more["steps"], more["stop"]) == (18, "max_steps") and "already finished" not in err
    # (limits never set are not named: "--max-time 0 (it was 16 and 0)" read as a budget of 0 s)
    assert "note: the run now ends at --max-steps 18 (it was --max-steps 16): the learning rate's" in err
    pretrain(model_cfg, replace(timed, max_time=55, max_steps=21))
    assert "now ends at --max-steps 21 or --max-time 55 (it was --max-steps 18)" in capsys.readouterr().err


def fake_clock(monkeypatch, reading: float, evaluation: float = 0.0, save: float = 0.0) -> None:
    """The training loop's clock, faked: each reading moves it `reading` seconds, each evaluation `evaluation`, each
    checkpoint written `save`."""
    from homellm import train as module

    clock = [0.0]

    def tick() -> float:
        clock[0] += reading
        return clock[0]

    def slowed(work, seconds: float):
        def slow(*args, **kwargs):
            clock[0] += seconds
            return work(*args, **kwargs)
        return slow

    monkeypatch.setattr(module.time, "perf_counter", tick)
    monkeypatch.setattr(module, "evaluate", slowed(module.evaluate, evaluation))
    monkeypatch.setattr(module, "save_checkpoint", slowed(module.save_checkpoint, save))


def test_a_time_budget_counts_the_checkpoints_written(tmp_path, data_dir, monkeypatch):
    """--max-time is wall-clock: writing checkpoints counts (to a slow disk, a relay session overran its
    --session-time by their time). It counted only under torchrun, where the other ranks wait for rank 0's writes in
    the next step, so the same flags trained other steps in one process and in two."""
    fake_clock(monkeypatch, reading=1e-4, save=20.0)
    model_cfg, cfg = preset("tiny")
    cfg = replace(cfg, data=[str(data_dir)], out=str(tmp_path / "run"), max_steps=8, max_time=50.0, eval_every=0,
                  checkpoint_every=1)
    summary = pretrain(model_cfg, cfg)
    assert (summary["steps"], summary["stop"]) == (4, "max_time")  # 20 s written after each of steps 1-3: 60 s
    assert 60 <= summary["elapsed_s"] < 61


def test_an_evaluation_that_spends_the_budget_ends_the_run_with_its_checkpoint(tmp_path, data_dir, monkeypatch):
    """Evaluation counts against --max-time: one that takes the rest must make that step the last, with `last`
    written and the stop said, not leave the loop without them. A fake clock makes evaluation slow."""
    fake_clock(monkeypatch, reading=1e-4, evaluation=100.0)
    model_cfg, cfg = preset("tiny")
    cfg = replace(cfg, data=[str(data_dir)], out=str(tmp_path / "run"), max_steps=0, max_time=50.0, eval_every=3,
                  checkpoint_every=0)
    summary = pretrain(model_cfg, cfg)
    assert (summary["steps"], summary["stop"]) == (3, "max_time")
    assert json.loads((tmp_path / "run" / "last" / "checkpoint.json").read_text())["step"] == 3


def test_a_time_budget_keeps_room_for_the_final_evaluation(tmp_path, data_dir, monkeypatch):
    """The evaluation after the last step ran past --max-time (a 30 s run took 54 s on a busy machine, and the
    excess was carried into the next session's budget). The budget now keeps room for it: as long as the latest
    evaluation took. A fake clock: every reading moves it 0.1 s, an evaluation 10 s."""
    fake_clock(monkeypatch, reading=0.1, evaluation=10.0)
    model_cfg, cfg = preset("tiny")
    cfg = replace(cfg, data=[str(data_dir)], out=str(tmp_path / "run"), max_steps=0, max_time=50.0, eval_every=20,
                  checkpoint_every=0)
    summary = pretrain(model_cfg, cfg)
    evals = [r for r in metrics(tmp_path / "run") if "val_loss" in r]
    assert summary["stop"] == "max_time" and len(evals) >= 2 and evals[-1]["step"] == summary["steps"]
    assert 40 <= summary["elapsed_s"] <= 50.5  # the final evaluation included; before, 60.1
    # Resumed, it is finished: the room it kept is in its checkpoint (without it, resuming trained on past 60 s).
    again = pretrain(model_cfg, replace(cfg, resume=True))
    assert (again["steps"], again["elapsed_s"]) == (summary["steps"], summary["elapsed_s"])


def test_schedule_warmup_cosine_and_wsd():
    cfg = TrainConfig(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0.0, 0, cfg) == pytest.approx(0.1)
    assert lr_factor(0.1, 9, cfg) == pytest.approx(1.0)
    assert lr_factor(1.0, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(0.5, 50, cfg) == pytest.approx(0.55)
    wsd = replace(cfg, schedule="wsd", decay_fraction=0.2)
    assert lr_factor(0.79, 79, wsd) == 1.0
    assert lr_factor(0.9, 90, wsd) == pytest.approx(0.55)
    assert lr_factor(1.0, 100, wsd) == pytest.approx(0.1)
    # The decay starts where warmup ended: full rate there, half way down half way through the rest.
    assert lr_factor(0.1, 10, cfg, decay_start=0.1) == 1.0
    assert lr_factor(0.55, 55, cfg, decay_start=0.1) == pytest.approx(0.55)
    assert lr_factor(0.9, 90, wsd, decay_start=0.5) == 1.0 and lr_factor(0.95, 95, wsd, 0.5) == pytest.approx(0.55)


def test_weight_decay_means_the_matrices_with_either_optimizer():
    """Under Muon the embedding matrices went to AdamW undecayed, while --optimizer adamw decays them."""
    from homellm.model import GPT
    from homellm.train import make_optimizers

    model = GPT(replace(preset("tiny")[0], vocab_size=64, tie_embeddings=False))
    names = {id(p): n for n, p in model.named_parameters()}
    for optimizer in ("adamw", "muon"):
        cfg = TrainConfig(optimizer=optimizer, weight_decay=0.1)
        decayed = {names[id(p)] for opt in make_optimizers(model, cfg, torch.device("cpu"))
                   for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        assert decayed == {n for n, p in model.named_parameters() if p.dim() == 2}, optimizer


def test_the_rate_peaks_when_warmup_ends_and_decays_smoothly_to_the_end(tmp_path, data_dir):
    """Counted from the run's start, the cosine dropped from the peak at once after warmup (1.0 -> 0.55 here)."""
    model_cfg, cfg = preset("tiny")
    cfg = replace(cfg, data=[str(data_dir)], out=str(tmp_path / "run"), max_steps=20, warmup_steps=10, log_every=1,
                  eval_every=0, min_lr_ratio=0.0)
    pretrain(model_cfg, cfg)
    lrs = [r["lr"] / cfg.lr for r in metrics(tmp_path / "run")]  # the rate each step trained with
    assert lrs[9] == lrs[10] == 1.0 and lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert all(0 < b - a < 0.16 for a, b in zip(lrs[11:], lrs[10:])) and lrs[19] == pytest.approx(0.0245, abs=1e-3)


def test_bad_inputs_give_one_line_errors(tmp_path, data_dir, capsys):
    from homellm.cli import main  # in-process: a bug's traceback would fail the test here as well

    cases = [
        (["--data", str(tmp_path / "missing.txt")], "missing.txt"),
        (["--data", str(data_dir), "--block-size", "100000"], "--block-size"),
        (["--data", str(data_dir), "--n-embd", "30", "--n-head", "4"], "--n-embd 30"),
        (["--data", str(data_dir), "--optimizer", "sgd"], "--optimizer"),
        (["--data", str(data_dir), "--log-every", "0"], "--log-every"),
        (["--data", str(data_dir), "--resume"], "does not exist: check the path (a relay's first session starts "
                                                 "without --resume)"),  # a typo, or a drive not mounted
        (["--data", str(data_dir), "--n-head", "0"], "--n-head 0: must be 1 or more"),  # was a ZeroDivisionError
    ]
    for i, (flags, needle) in enumerate(cases):
        assert main(["pretrain", "--preset", "tiny", "--out", str(tmp_path / f"r{i}"), *flags]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
        assert len(err.strip().splitlines()[-1]) > 20
    # A run trained on prepared data, moved where its data is not: where to give it, not only "check the path"
    shutil.copytree(data_dir, tmp_path / "data")
    assert main(["pretrain", "--preset", "tiny", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "moved"),
                 "--max-steps", "1", "--eval-every", "0"]) == 0
    shutil.rmtree(tmp_path / "data")
    capsys.readouterr()
    assert main(["pretrain", "--out", str(tmp_path / "moved"), "--resume", "--max-steps", "2"]) == 2
    assert capsys.readouterr().err == (
        f"homellm: error: {tmp_path / 'data'}: no such file or folder: check the path; to resume {tmp_path / 'moved'}, "
        f"pass --data where its data is now: the text itself, or a folder made by `homellm prepare --tokenizer "
        f"{tmp_path / 'moved'}`\n")
    (tmp_path / "empty").mkdir()  # made for the run, before its first session
    assert main(["pretrain", "--preset", "tiny", "--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert "holds no run yet: start it without --resume" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="this PyTorch has no torch.optim.Muon to compare with")
def test_batched_muon_equals_torch_muon_bit_for_bit():
    torch.manual_seed(0)
    shapes = [(32, 32)] * 3 + [(96, 32)] * 2 + [(32, 96)] * 2  # square, tall and wide, several of each
    ours = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    # (torch's iterates in bfloat16 on every device; ours too where it multiplies bfloat16 natively: ns_dtype)
    a = Muon(ours, lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16)
    b = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1)
    for step in range(4):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        a.step()
        b.step()
        if step == 1:  # each resumes the other's state (a copy, as from a checkpoint: not shared tensors)
            a.load_state_dict(copy.deepcopy(b.state_dict()))
        if step == 2:
            b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))
    assert all((p - s).abs().max() > 1e-3 for p, s in zip(ours, start))  # and both really trained


def test_checkpoint_every_0_writes_last_only_at_the_end(tmp_path, data_dir):
    model_cfg, cfg = preset("tiny")
    run = tmp_path / "run"
    pretrain(model_cfg, replace(cfg, data=[str(data_dir)], out=str(run), max_steps=6, checkpoint_every=0))
    assert json.loads((run / "last" / "checkpoint.json").read_text())["step"] == 6


def test_last_carries_a_val_loss_only_when_measured_on_its_weights(tmp_path, data_dir, monkeypatch):
    """`last` written at step 3 said step 2's val loss, and `info` showed it as that checkpoint's."""
    from homellm import train as train_module

    def stop_at_4(var, step, *args):
        if var == "HOMELLM_FAULT_KILL_AT_STEP" and step == 4:
            raise RuntimeError("stopped")  # as a kill would: after step 3's checkpoint, before step 4's

    monkeypatch.setattr(train_module, "fault_point", stop_at_4)
    model_cfg, cfg = preset("tiny")
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="stopped"):
        pretrain(model_cfg, replace(cfg, data=[str(data_dir)], out=str(run), max_steps=6, eval_every=2,
                                    checkpoint_every=3))
    last = json.loads((run / "last" / "checkpoint.json").read_text())
    best = json.loads((run / "best" / "checkpoint.json").read_text())
    assert last["step"] == 3 and "val_loss" not in last
    assert best["step"] == 4 and best["val_loss"] > 0  # (step 4 evaluated before it stopped)


def test_the_summary_names_the_step_its_val_loss_was_measured_at(tmp_path, data_dir, reference, monkeypatch):
    """A session stopped between evaluations reported the last val loss as if of its final step."""
    model_cfg, cfg = preset("tiny")
    monkeypatch.setenv("HOMELLM_FAULT_SIGINT_AT_STEP", "5")  # Ctrl-C in step 5: the run stops after it
    halted = pretrain(model_cfg, replace(cfg, data=[str(data_dir)], out=str(tmp_path / "run"), max_steps=9,
                                         eval_every=3))
    assert (halted["stop"], halted["steps"], halted["val_step"]) == ("interrupted", 5, 3)
    shutil.copytree(reference, run := tmp_path / "ended")
    ended_model, ended = read_config(run)
    summary = pretrain(ended_model, replace(ended, out=str(run), resume=True))
    assert summary["val_step"] == summary["steps"] == 16  # an ended run's final val loss, reported again


def test_vocab_is_padded_to_a_multiple_of_64(tmp_path, data_dir):
    model_cfg, cfg = preset("tiny")
    pretrain(model_cfg, replace(cfg, data=[str(data_dir)], out=str(tmp_path / "run"), max_steps=2))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert saved["vocab_size"] % 64 == 0
    assert ModelConfig(**saved).vocab_size >= json.loads((data_dir / "meta.json").read_text())["vocab_size"]


def test_written_files_follow_the_umask_like_any_other(reference):
    mask = os.umask(0)
    os.umask(mask)
    for path in (reference / "config.json", reference / "best" / "model.safetensors", reference / "metrics.jsonl",
                 reference / "tokenizer" / "tokenizer.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path


def test_ddp_ranks_agree_on_a_time_budget(tmp_path, corpus):
    """Each rank's own clock once left one rank in the final checkpoint's collective and the other in a step.
    From raw text: rank 1 waits while rank 0 builds the tokenizer and shards in the run."""
    run = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "homellm", "pretrain", "--data", str(corpus), "--out", str(run), "--preset", "tiny",
                "--max-steps", "0", "--max-time", "3", "--eval-every", "5", "--checkpoint-every", "0", "--device",
                "cpu", "--batch-size", "4"]
    proc = subprocess.run(torchrun, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"stop": "max_time"') == 1  # the summary, from rank 0 only
    assert (run / "last" / "model.safetensors").is_file()


def test_on_gpus_the_ranks_agree_on_the_clock_in_a_group_of_their_hosts(monkeypatch):
    """The per-step agreement on the clock and a Ctrl-C ran in NCCL's group, which made each host wait for its GPU
    every step: on GPUs it runs in a gloo group with a CPU tensor. (The CPU tests run gloo already: group None.)"""
    from homellm import train as train_module
    from homellm.train import Env, _any_rank, _clock_group, _one_clock

    hosts = object()
    monkeypatch.setattr(train_module.dist, "new_group", lambda backend: hosts if backend == "gloo" else None)
    seen = []

    def all_reduce(t, op, group=None):
        seen.append((t.device.type, group))
        t[0] = max(t[0].item(), 5.0)  # another rank's slower clock, or its Ctrl-C mid-step
        if len(t) > 1:
            t[1:] = torch.tensor([1.0, 7.0])  # and its Ctrl-C, and its slower step

    monkeypatch.setattr(train_module.dist, "all_reduce", all_reduce)
    gpus, cpus = (Env(0, 2, 0, torch.device(d), torch.float32) for d in ("cuda", "cpu"))
    assert _clock_group(gpus) is hosts and _clock_group(cpus) is None
    assert _clock_group(Env(0, 1, 0, torch.device("cuda"), torch.float32)) is None  # one process: nothing to agree
    assert _one_clock(2.0, TrainConfig(max_time=60), gpus, False, _clock_group(gpus), 3.0) == (5.0, True, 7.0)
    assert _any_rank(False, gpus, _clock_group(gpus))
    assert seen == [("cpu", hosts)] * 2


def test_resuming_on_data_prepared_again_since_says_so(tmp_path, data_dir, corpus, capsys):
    """`prepare` into the folder a run trained on replaced its shards: --resume went on with the new text, and the
    run's config took the new counts, without a word."""
    from homellm.checkpoint import sha256_file
    from homellm.cli import main

    prep, run = tmp_path / "prep", tmp_path / "run"
    shutil.copytree(data_dir, prep)
    flags = ["--out", str(run), "--eval-every", "1", "--eval-batches", "1"]
    assert main(["pretrain", "--data", str(prep), "--preset", "tiny", "--max-steps", "2", *flags]) == 0
    assert main(["pretrain", "--resume", "--max-steps", "3", *flags]) == 0
    assert "changed since" not in capsys.readouterr().err  # the same data: nothing to say
    half = tmp_path / "half.txt"
    half.write_text("".join(corpus.read_text().splitlines(keepends=True)[:1500]))
    assert main(["prepare", "--input", str(half), "--tokenizer", str(prep), "--out", str(prep)]) == 0
    # A best no val loss can beat: on the old data it stood for good, and --patience stopped the run early
    last = run / "last"
    torch.save({**torch.load(last / "state.pt", weights_only=False), "best_val": 0.0}, last / "state.pt")
    info = json.loads((last / "checkpoint.json").read_text())
    info["sha256"]["state.pt"] = sha256_file(last / "state.pt")
    (last / "checkpoint.json").write_text(json.dumps(info))
    # ...and a session on the new data killed before its first checkpoint has written the new data's counts into
    # config.json already: the checkpoint's own record tells (config.json's alone made the next session miss it)
    config = json.loads((run / "config.json").read_text())
    kept = ("train_tokens", "val_tokens", "train_bytes", "val_bytes", "documents", "split")
    config["data_meta"] = {k: v for k, v in json.loads((prep / "meta.json").read_text()).items() if k in kept}
    (run / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["pretrain", "--resume", "--max-steps", "5", "--patience", "1", *flags]) == 0
    assert re.search(rf"note: the data in {prep} is not what {run} last trained on \([\d,]+ -> [\d,]+ training "
                     r"tokens\): training goes on with it, and its val loss compares with none before it: `best` and "
                     r"--patience start again from its first evaluation; the split is by position, so val may now "
                     r"hold text trained on before\n", capsys.readouterr().err)  # (one document each time)
    assert json.loads((run / "best" / "checkpoint.json").read_text())["step"] >= 4


def test_resuming_on_raw_text_that_grew_prepares_it_again(tmp_path, corpus, capsys):
    """`pretrain --data corpus.txt --resume` after text was added to corpus.txt went on with the shards of the old
    text, without a word."""
    from homellm.cli import main

    text, run = tmp_path / "corpus.txt", tmp_path / "run"
    lines = corpus.read_text().splitlines(keepends=True)
    text.write_text("".join(lines[:1500]))
    flags = ["--data", str(text), "--out", str(run), "--eval-every", "0", "--tokenizer-kind", "char"]
    assert main(["pretrain", *flags, "--preset", "tiny", "--max-steps", "2"]) == 0
    before = json.loads((run / "data" / "meta.json").read_text())["train_tokens"]
    assert main(["pretrain", *flags, "--resume", "--max-steps", "3"]) == 0
    assert "changed since" not in capsys.readouterr().err  # the same text: the same shards
    text.write_text("".join(lines))
    assert main(["pretrain", *flags, "--resume", "--max-steps", "4"]) == 0
    err = capsys.readouterr().err
    assert f"note: {text} changed since {run / 'data'} was prepared (" in err and "preparing it again" in err
    assert json.loads((run / "data" / "meta.json").read_text())["train_tokens"] > before
    # One document, split by position: the text added moved the cut, and val may hold text trained on (the README
    # said each document keeps its side, which holds for a split by document only): said when it is prepared and
    # when training goes on with it
    assert "note: one document: split by position instead, the last 10% of the tokens held out; text added later " \
        "moves that cut (several documents keep their sides)" in err
    assert "; the split is by position, so val may now hold text trained on before\n" in err
    # The run moved to another machine without its text (a relay): it goes on with its own shards, and says so.
    moved = tmp_path / "moved"
    shutil.move(run, moved)
    text.unlink()
    shards = (moved / "data" / "meta.json").read_text()
    assert main(["pretrain", "--out", str(moved), "--resume", "--max-steps", "5"]) == 0
    assert f"resuming on the shards {moved} prepared from it, in {moved / 'data'}" in capsys.readouterr().err
    assert (moved / "data" / "meta.json").read_text() == shards and read_config(moved)[1].max_steps == 5
    assert main(["pretrain", "--data", str(text), "--out", str(tmp_path / "new"), "--preset", "tiny"]) == 2
    assert "no such file" in capsys.readouterr().err  # a new run has no shards to fall back on


def test_a_split_by_position_that_becomes_one_by_document_is_said_on_resuming(tmp_path, capsys):
    """A book held out that outweighed the stories fell back to a split by position, which trains on most of it; a
    bigger book added on the training side splits by document again, and that book is all val now (review)."""
    from homellm import data
    from homellm.cli import main

    def held_out(text: str) -> bool:
        return data._is_val(0, text[:data._KEY_CHARS], 0.1)

    book = next(b for i in range(100) if held_out(b := f"book {i}\n" + "the long book goes on. " * 400))
    stories = [s for i in range(200) if not held_out(s := f"story {i}: a short one.\n" * 20)][:10]
    (tmp_path / "books").mkdir()
    for n, text in enumerate([book, *stories]):
        (tmp_path / "books" / f"{n:02}.txt").write_text(text)
    flags = ["--data", str(tmp_path / "books"), "--out", str(tmp_path / "run"), "--tokenizer-kind", "char"]
    assert main(["pretrain", *flags, "--preset", "tiny", "--max-steps", "1", "--eval-every", "0"]) == 0
    assert "split by position instead" in capsys.readouterr().err
    bigger = next(b for i in range(100, 200) if not held_out(b := f"book {i}\n" + "a longer book goes on. " * 900))
    (tmp_path / "books" / "99.txt").write_text(bigger)
    assert main(["pretrain", *flags, "--resume", "--max-steps", "2"]) == 0
    assert "; the split was by position and is by document now, so val may now hold text trained on before\n" in \
        capsys.readouterr().err


def test_a_new_start_never_overwrites_a_trained_run(tmp_path, data_dir, capsys):
    """A run whose `last` was never written or was deleted, `best` alone left, was silently started over: its
    metrics and `best` replaced."""
    from homellm.cli import main

    run = tmp_path / "run"
    flags = ["--data", str(data_dir), "--out", str(run), "--preset", "tiny", "--max-steps", "2", "--eval-every", "1"]
    assert main(["pretrain", *flags]) == 0
    before = (run / "metrics.jsonl").read_text()
    for gone in ("none", "last"):
        if gone == "last":
            shutil.rmtree(run / "last")
        assert main(["pretrain", *flags]) == 2
        assert f"{run} already holds a trained run: add --resume to continue it" in capsys.readouterr().err
        assert (run / "metrics.jsonl").read_text() == before and (run / "best").is_dir()


def test_a_run_stopped_before_its_first_checkpoint_says_to_start_again(tmp_path, data_dir, capsys):
    """Killed before its first checkpoint, --resume said "no valid resumable checkpoint (...): train again into a
    new --out", though the same --out starts again fine."""
    from homellm.cli import main

    run = tmp_path / "run"
    flags = ["--data", str(data_dir), "--out", str(run), "--preset", "tiny", "--max-steps", "2", "--eval-every", "0"]
    assert main(["pretrain", *flags]) == 0
    shutil.rmtree(run / "last")  # as if killed before it was written: config.json and metrics are there
    assert main(["pretrain", "--out", str(run), "--resume"]) == 2
    assert f"{run}: no checkpoint yet, the run stopped before its first: start it again without --resume (the " \
           "same --out is fine)" in capsys.readouterr().err
    assert main(["pretrain", *flags]) == 0 and (run / "last").is_dir()


def test_keep_every_keeps_the_weights_of_those_steps_to_sample_and_start_from(tmp_path, data_dir, capsys,
                                                                              monkeypatch):
    """Seed 003 saved its model every so many steps to compare and go back to; a run kept `last` and `best` only."""
    from homellm.cli import main

    run = tmp_path / "run"
    flags = ["--data", str(data_dir), "--preset", "tiny", "--eval-every", "2", "--device", "cpu"]
    assert main(["pretrain", *flags, "--max-steps", "6", "--keep-every", "2", "--out", str(run)]) == 0
    kept = sorted(p.name for p in run.glob("step-*"))
    assert kept == ["step-2", "step-4", "step-6"]
    assert all(sorted(f.name for f in (run / k).iterdir()) == ["checkpoint.json", "model.safetensors"] for k in kept)
    record = json.loads((run / "step-4" / "checkpoint.json").read_text())
    assert record["step"] == 4 and record["val_loss"] > 0  # evaluated at that step: its val loss kept with it
    # The weights of step 6 are the run's last; step 2's are other, and load by name wherever --checkpoint is taken
    last, six, two = (load_model(run, n) for n in ("last", "step-6", "step-2"))
    assert all(torch.equal(a, b) for a, b in zip(last.state_dict().values(), six.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(last.state_dict().values(), two.state_dict().values()))
    capsys.readouterr()
    assert main(["generate", str(run), "--checkpoint", "step-4", "--prompt", "the", "--max-new-tokens", "3"]) == 0
    assert main(["info", str(run)]) == 0
    assert re.search(r"step-4 +4 .* kept \(checked when loaded\)", capsys.readouterr().out)
    assert main(["generate", str(run), "--checkpoint", "step-5", "--prompt", "the"]) == 2
    assert capsys.readouterr().err == (f"homellm: error: {run / 'step-5'}: missing: the run's kept steps: step-2, "
                                       "step-4, step-6\n")
    assert main(["generate", str(run), "--checkpoint", "step", "--prompt", "the"]) == 2
    assert "--checkpoint 'step' is unknown: use best, last or a kept step-N" in capsys.readouterr().err
    # A run started from a kept step's weights (rolled back)
    from homellm import train

    read, loaded = train.read_weights, []
    monkeypatch.setattr(train, "read_weights", lambda folder: loaded.append(folder.name) or read(folder))
    assert main(["pretrain", *flags, "--max-steps", "2", "--init", str(run), "--init-checkpoint", "step-2", "--out",
                 str(tmp_path / "again")]) == 0
    assert loaded == ["step-2"]
    assert main(["pretrain", *flags, "--init-checkpoint", "step-2", "--out", str(tmp_path / "lost")]) == 2
    assert "--init-checkpoint step-2 names weights of an --init run: add --init RUN" in capsys.readouterr().err
    # Resumed, at another pace: weights kept after the checkpoint it resumes from are of steps it trains again
    shutil.copytree(run / "step-6", run / "step-8")  # as if kept, then stopped before `last` was written again
    assert main(["pretrain", "--out", str(run), "--resume", "--max-steps", "9", "--keep-every", "3"]) == 0
    assert "note: removed step-8, kept after last's step 6" in capsys.readouterr().err
    assert sorted(p.name for p in run.glob("step-*")) == ["step-2", "step-4", "step-6", "step-9"]
    # Kept weights alone (killed before its first `last`): a new start would mix its own with them, or replace them
    for name in ("last", "best"):
        shutil.rmtree(run / name)
    assert main(["pretrain", *flags, "--out", str(run)]) == 2
    assert f"{run} already holds a trained run" in capsys.readouterr().err
    assert main(["pretrain", "--out", str(run), "--resume"]) == 2
    assert (f"{run}: no checkpoint to resume (`last`, `best`), only the weights --keep-every kept (step-2, step-4, "
            f"step-6, step-9): train on from one with `homellm pretrain --init {run} --init-checkpoint step-9"
            in capsys.readouterr().err)


def test_sessions_of_a_relay_run_add_up_to_one_uninterrupted_run(tmp_path, data_dir, capsys):
    """Relay training (a few sessions a day, as on Colab): --session-time ends a session with `last` written and
    the schedule untouched, where --max-time would reshape the schedule to the session. Resumed session after
    session, the run ends bit-identical to one that ran straight through."""
    from homellm.cli import main

    flags = ["--data", str(data_dir), "--preset", "tiny", "--max-steps", "4", "--eval-every", "2", "--log-every", "1",
             "--device", "cpu"]
    assert main(["pretrain", *flags, "--out", str(tmp_path / "straight")]) == 0
    relay = tmp_path / "relay"
    assert main(["pretrain", *flags, "--out", str(relay), "--session-time", "1e-9"]) == 0  # one step a session
    sessions = 1
    while json.loads((relay / "last" / "checkpoint.json").read_text())["step"] < 4:
        assert main(["pretrain", "--out", str(relay), "--resume", "--session-time", "1e-9"]) == 0
        sessions += 1
    assert sessions == 4
    assert "this session ended at step 1 (--session-time); `--resume` continues" in (err := capsys.readouterr().err)
    assert "the same --session-time (kept with the run; add --session-time 0 to train to the end)" in err
    assert [{k: v for k, v in r.items() if k not in ("elapsed_s", "tok_per_s")} for r in metrics(relay)] == \
        [{k: v for k, v in r.items() if k not in ("elapsed_s", "tok_per_s")} for r in metrics(tmp_path / "straight")]
    a, b = (load_file(str(tmp_path / r / "last" / "model.safetensors")) for r in ("straight", "relay"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_learning_rate_never_climbs_back_when_an_evaluation_runs_faster_than_guessed(tmp_path, data_dir,
                                                                                      monkeypatch):
    """Before the first evaluation the room kept for the final one is a guess from the steps' pace; a faster
    evaluation shrinks it, which moved the run's progress back and the cosine rate up again. A fake clock makes
    every reading 0.1 s, so 150 evaluation batches are guessed at 5 s and take 0.1 s."""
    fake_clock(monkeypatch, reading=0.1)
    model_cfg, cfg = preset("tiny")
    cfg = replace(cfg, data=[str(data_dir)], out=str(tmp_path / "run"), max_steps=0, max_time=20.0, eval_every=20,
                  eval_batches=150, log_every=1, checkpoint_every=0, warmup_steps=2)
    pretrain(model_cfg, cfg)
    rates = [r["lr"] for r in metrics(tmp_path / "run") if "lr" in r][2:]
    assert len(rates) > 30 and all(b <= a for a, b in zip(rates, rates[1:]))


def test_checkpoints_are_written_where_folders_cannot_be_opened_as_files(tmp_path, data_dir, monkeypatch):
    """Windows: os.open on a folder raises PermissionError, and fsync of the folder after each rename made every
    checkpoint, and so every run, fail there."""
    from homellm import io

    real_open = os.open

    def no_folders(path, flags, *args):
        if os.path.isdir(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(io, "FOLDERS_OPEN", False)  # as on Windows (os.name itself cannot be faked: pathlib uses it)
    monkeypatch.setattr(io.os, "open", no_folders)
    model_cfg, cfg = preset("tiny")
    pretrain(model_cfg, replace(cfg, data=[str(data_dir)], out=str(tmp_path / "run"), max_steps=2, eval_every=1))
    assert (tmp_path / "run" / "last").is_dir() and (tmp_path / "run" / "best").is_dir()


def test_token_ids_beyond_the_tokenizer_in_a_shard_are_named(tmp_path, data_dir, capsys):
    """A damaged shard (ids past the vocabulary) was an IndexError deep in the embedding."""
    from homellm.cli import main

    bad = tmp_path / "data"
    shutil.copytree(data_dir, bad)
    shard = bad / json.loads((bad / "meta.json").read_text())["shards"]["train"][0]["file"]
    ids = np.memmap(shard, dtype=np.uint16, mode="r+")
    ids[:] = 60_000
    ids.flush()
    del ids
    assert main(["pretrain", "--data", str(bad), "--out", str(tmp_path / "run"), "--preset", "tiny"]) == 2
    assert f"{bad}: its train shards hold token id 60,000, beyond the tokenizer's" in capsys.readouterr().err
    # Each rank reads its own rows, so under torchrun it is that rank's error to say: as one said by rank 0 for all
    # (`everywhere`), it went unsaid where rank 0's rows were whole, and the run stopped without a reason.
    from homellm.tokenizer import Tokenizer

    tok = Tokenizer.load(bad)
    with pytest.raises(HomeLLMError, match="token id 60,000") as error:
        TokenBatches(bad, 16, 0, tok.token_bytes()).train_batch(0, 2, part=1, parts=2)
    assert not error.value.everywhere


def test_library_functions_refuse_the_folders_the_cli_refuses(tmp_path, corpus, data_dir):
    # Called from a notebook as from the CLI: nothing is written into a run, prepared data or a tokenizer
    from homellm.config import PrepareConfig, QuickstartConfig, SFTConfig, TokenizerConfig
    from homellm.data import prepare
    from homellm.quickstart import quickstart
    from homellm.sft import sft
    from homellm.tokenizer import train_tokenizer

    tok = data_dir.parent / "tok"
    before = {p: p.read_bytes() for d in (data_dir, tok) for p in d.rglob("*") if p.is_file()}
    for call, message in [
        (lambda: train_tokenizer(TokenizerConfig(input=[str(corpus)], out=str(tok), kind="char")),
         "already holds a tokenizer"),
        (lambda: train_tokenizer(TokenizerConfig(input=[str(corpus)], out=str(data_dir), kind="char")),
         "already holds prepared data"),
        (lambda: prepare(PrepareConfig(input=[str(corpus)], tokenizer=str(tok), out=str(tok))),
         "already holds a tokenizer"),
        (lambda: pretrain(preset("tiny")[0], replace(preset("tiny")[1], data=[str(corpus)], out=str(data_dir))),
         "already holds prepared data"),
        (lambda: sft(SFTConfig(init=str(data_dir), data=[str(corpus)]), replace(preset("tiny")[1], out=str(tok))),
         "already holds a tokenizer"),
        (lambda: quickstart(QuickstartConfig(out=str(data_dir), max_time=5)), "already holds prepared data"),
    ]:
        with pytest.raises(HomeLLMError, match=message):
            call()
    assert {p: p.read_bytes() for d in (data_dir, tok) for p in d.rglob("*") if p.is_file()} == before
    # another tool's files where a run writes its own
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(HomeLLMError, match="holds metrics.jsonl, which homellm did not write"):
        pretrain(preset("tiny")[0], replace(preset("tiny")[1], data=[str(corpus)], out=str(tmp_path / "theirs")))
    assert (tmp_path / "theirs" / "metrics.jsonl").read_text() == "{}\n"


def test_data_whose_prepare_was_killed_mid_swap_is_named_so(tmp_path, data_dir):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    (data / ".preparing").mkdir()
    (data / "meta.json").rename(data / ".preparing" / "meta.json")  # the old one gone, the new one not yet in
    with pytest.raises(HomeLLMError, match=r"no meta.json \(a prepare into it was interrupted or is running\)\): run "
                                           r"`homellm prepare"):
        pretrain(preset("tiny")[0], replace(preset("tiny")[1], data=[str(data)], out=str(tmp_path / "run")))


def test_resuming_a_run_killed_before_its_first_checkpoint_says_start_again(tmp_path, reference, corpus, capsys):
    """Killed between its config.json and its tokenizer/: --resume said to copy back a tokenizer/ folder."""
    from homellm.cli import main

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(reference / "config.json", run / "config.json")
    assert main(["pretrain", "--out", str(run), "--resume"]) == 2
    assert "no checkpoint yet, the run stopped before its first: start it again without --resume" in \
        capsys.readouterr().err
    (tmp_path / "chat").mkdir()  # sft the same: it said only "chat/config.json: not found"
    assert main(["sft", "--init", str(reference), "--data", str(corpus), "--out", str(tmp_path / "chat"),
                 "--resume"]) == 2
    assert capsys.readouterr().err == (f"homellm: error: --resume: {tmp_path / 'chat'} holds no fine-tuning run to "
                                       "continue (no config.json): start it again without --resume\n")


def test_steps_of_many_slow_micro_batches_are_said_after_the_first(tmp_path, data_dir, monkeypatch, capsys):
    """gpt2-124m's 32 micro-batches a step on a CPU: its progress bar stood still for minutes without a word."""
    model_cfg, cfg = preset("tiny")
    for reading, said in [(10.0, True), (1.0, False)]:  # each reading of the loop's clock that many seconds on
        fake_clock(monkeypatch, reading)
        pretrain(model_cfg, replace(cfg, data=[str(data_dir)], out=str(tmp_path / str(reading)), max_steps=2,
                                    grad_accum=8, eval_every=0))
        err = capsys.readouterr().err
        note = re.findall(r"note: a step is 8 micro-batches of 256 tokens, and one took 10.0 s: about 1 min a "
                          r"step here, the progress bar moving once a step \(`--preset cpu` is sized to train in "
                          r"minutes on a CPU\)", err)
        assert len(note) == said, err


def test_a_rank_the_checkpoint_had_not_gets_a_random_stream_of_its_own():
    """Resumed on more processes than it was saved from, every new rank took rank 0's state: the same dropout."""
    from homellm.train import Env, _resume_rng, _rng_state

    cpu = torch.device("cpu")
    torch.manual_seed(5)
    saved = [_rng_state(cpu)]
    draws = []
    for rank in (0, 1, 2):
        _resume_rng(saved, Env(rank, 3, rank, cpu, torch.float32), seed=1, step=10)
        draws.append(torch.rand(4))
    torch.manual_seed(5)
    assert torch.equal(draws[0], torch.rand(4))  # rank 0: where it was saved
    assert not torch.equal(draws[1], draws[0]) and not torch.equal(draws[2], draws[1])
    _resume_rng(saved, Env(2, 3, 2, cpu, torch.float32), seed=1, step=10)
    assert torch.equal(torch.rand(4), draws[2])  # and reproducibly so


def test_text_a_trained_runs_tokenizer_cannot_write_is_not_fixed_by_another_tokenizer(tmp_path, reference, capsys):
    """It advised training a tokenizer on the text, which a run resumed or started from trained weights cannot use."""
    from homellm.cli import main

    text = tmp_path / "ja.txt"
    text.write_text("日本語の文章です。\n" * 20, encoding="utf-8")
    assert main(["pretrain", "--init", str(reference), "--data", str(text), "--out", str(tmp_path / "run"),
                 "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "are characters the tokenizer" in err and "such as '。 す で の 文 日 本 章 語'" in err  # (as often each)
    assert err.endswith(f"replace or drop those characters in the text, or train a new run with a tokenizer that "
                        f"knows them ({reference}'s tokenizer is the one its weights read)\n")
    # `prepare --tokenizer RUN`, which the message for a moved run's data advises, says the same
    assert main(["prepare", "--input", str(text), "--tokenizer", str(reference), "--out", str(tmp_path / "d")]) == 2
    assert capsys.readouterr().err.endswith("its weights read)\n")


def test_training_gives_threads_up_to_other_work_on_the_cores_and_takes_them_back(tmp_path, data_dir, monkeypatch,
                                                                                   capsys):
    """PyTorch's threads wait for each other at every operation: with another process on one of 2 cores, steps took
    2 to 7 times longer (the audits' sft: 3.1 against 0.45 s; the quickstart's step 1.3-4.1 s on 2 threads against
    0.55-0.94 s on 1), and a note told the user to start again with OMP_NUM_THREADS=1."""
    from homellm import io

    samples = iter([(0.0, 0.0, 0.0), (9.0, 1.0, 5.0), (30.0, 20.0, 40.0)])  # (busy, own, wall) seconds
    monkeypatch.setattr(io, "_cpu_sample", lambda: next(samples))  # (read only once a window is over)
    monkeypatch.setattr(io, "_cores", lambda: [0, 1])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    now = [0.0]
    monkeypatch.setattr(io.BusyCores, "clock", staticmethod(lambda: now[0]))
    busy = io.BusyCores(2)
    now[0] = 1.0
    assert busy.threads(2) == (2, "")  # 1 s: too soon to tell
    now[0] = 5.0
    threads, note = busy.threads(2)  # others: (9 - 1) / 5 = 1.6 cores
    assert threads == 1 and note.startswith("note: other work keeps about 1.6 of the 2 cores busy: training goes on "
                                            "with 1 PyTorch thread instead of 2")
    now[0] = 9.0
    assert busy.threads(1) == (1, "")  # the next window is longer: 4 s is too soon
    now[0] = 40.0
    assert busy.threads(1) == (2, "note: the other work now leaves room: training goes on with 2 PyTorch threads")
    for threads, env, sample in ((1, {}, (9.0, 1.0, 5.0)), (2, {"OMP_NUM_THREADS": "2"}, (9.0, 1.0, 5.0)),
                                 (2, {}, (2.0, 1.0, 5.0))):  # one thread; threads chosen; a spare core (0.2 busy)
        samples = iter([(0.0, 0.0, 0.0), sample])
        monkeypatch.setattr(io, "_cpu_sample", lambda samples=samples: next(samples))
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert io.BusyCores(threads).threads(threads) == (threads, ""), (threads, env, sample)
    # In a run: said above the bar once, as soon as its first seconds are measured; the threads given back at the end
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(io.BusyCores, "window_s", 0.0)
    monkeypatch.setattr(io.BusyCores, "later_s", 0.0)
    clock = iter(range(10**6))
    monkeypatch.setattr(io, "_cpu_sample", lambda: (3.0 * (t := next(clock)), 1.0 * t, float(t)))  # 2 cores busy
    now, asked = [2], []
    monkeypatch.setattr(torch, "get_num_threads", lambda: now[0])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (asked.append(n), now.__setitem__(0, n)))
    model_cfg, train_cfg = preset("tiny")
    pretrain(model_cfg, replace(train_cfg, data=[str(data_dir)], out=str(tmp_path / "run"), max_steps=3,
                                eval_every=0))
    assert capsys.readouterr().err.count("note: other work keeps about 2.0 of the 2 cores busy: training goes on "
                                         "with 1 PyTorch thread instead of 2") == 1
    assert asked == [1, 2]
    # given back however training ends (a notebook that caught a diverged run was left on one thread)
    from homellm.train import _threads_kept

    with pytest.raises(HomeLLMError), _threads_kept(io.BusyCores(2)):
        torch.set_num_threads(1)
        raise HomeLLMError("training diverged")
    assert now == [2]
