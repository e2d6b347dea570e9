"""Device and precision choices for GPUs this machine does not have: torch.cuda's answers are faked, so what homellm
decides from them is tested here; the kernels themselves need the GPU."""

import json
import types

import pytest
import torch

from homellm.cli import main
from homellm.config import TrainConfig, replace
from homellm.errors import HomeLLMError
from homellm.muon import ns_dtype
from homellm.train import peak_flops, setup_env


def fake_gpu(monkeypatch, name: str, major: int, minor: int, count: int = 1) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: types.SimpleNamespace(
        major=major, minor=minor, name=name))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # emulation "works"
    monkeypatch.setattr(torch.version, "hip", None)


def test_auto_precision_is_float16_where_bfloat16_would_be_emulated(monkeypatch):
    """torch's is_bf16_supported() counts emulation: on a T4 (Colab's GPU) auto chose a bfloat16 that runs without
    tensor cores or fast attention. Now auto is float16 there (with the grad scaler), bfloat16 from Ampere on."""
    fake_gpu(monkeypatch, "NVIDIA A100-SXM4-80GB", 8, 0)
    assert setup_env(TrainConfig(device="cuda")).dtype == torch.bfloat16
    assert ns_dtype(torch.device("cuda")) == torch.bfloat16
    fake_gpu(monkeypatch, "Tesla T4", 7, 5)
    assert torch.cuda.is_bf16_supported()  # torch's own check says yes: the trap
    env = setup_env(TrainConfig(device="cuda"))
    assert env.dtype == torch.float16 and env.device == torch.device("cuda", 0)
    assert setup_env(TrainConfig(device="cuda", dtype="float32")).dtype == torch.float32
    with pytest.raises(HomeLLMError, match=r"--dtype bfloat16: Tesla T4 \(compute capability 7.5\) only emulates "
                                           r"bfloat16.*use --dtype float16 \(or auto\)"):
        setup_env(TrainConfig(device="cuda", dtype="bfloat16"))
    # Muon's Newton-Schulz iteration likewise: float32 there (and on MPS), and on a CPU without bfloat16 products
    # (AVX2 alone: 50x float32's time, the quickstart trained at 4,400 tokens/s against AdamW's 10,400)
    assert ns_dtype(torch.device("cuda")) == torch.float32 and ns_dtype(torch.device("mps")) == torch.float32
    from homellm import train

    for native in (True, False):
        monkeypatch.setattr(train, "bf16_cpu", lambda native=native: native)
        assert ns_dtype(torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
    assert setup_env(TrainConfig(device="cpu")).dtype == torch.float32


def test_training_on_a_cpu_with_amx_is_bfloat16_autocast_and_generation_float32(monkeypatch):
    """A CPU with AMX multiplies bfloat16 matrices 2-6x as fast as float32's: auto trains models of 128 or more wide
    in bfloat16 autocast there (narrower ones ran slower in it), in float32 on other CPUs, where oneDNN is capped
    below AMX (bfloat16 then ran 20x slower) or the process may not use it; loading weights to generate stays
    float32."""
    from homellm.train import pick_dtype

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_init_amx", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)  # AMX alone, whatever this CPU has
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert setup_env(TrainConfig(device="cpu"), 128).dtype == torch.bfloat16
    assert setup_env(TrainConfig(device="cpu"), 64).dtype == torch.float32  # the casts cost more than they save
    assert pick_dtype("auto", cpu) == torch.float32  # for generation
    assert setup_env(TrainConfig(device="cpu", dtype="float32"), 128).dtype == torch.float32
    for name, value, bf16 in [("ONEDNN_MAX_CPU_ISA", "AVX2", False), ("DNNL_MAX_CPU_ISA", "avx512_core_bf16", False),
                              ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX", True), ("ONEDNN_MAX_CPU_ISA", "ALL", True)]:
        monkeypatch.setenv(name, value)
        assert (setup_env(TrainConfig(device="cpu"), 128).dtype == torch.bfloat16) == bf16, (name, value)
        monkeypatch.delenv(name)
    monkeypatch.setattr(torch.cpu, "_init_amx", lambda: False)  # the kernel does not let the process use AMX
    assert setup_env(TrainConfig(device="cpu"), 128).dtype == torch.float32
    monkeypatch.setattr(torch.cpu, "_init_amx", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert setup_env(TrainConfig(device="cpu"), 128).dtype == torch.float32
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # another torch without the probe: float32
    assert setup_env(TrainConfig(device="cpu"), 128).dtype == torch.float32


def test_training_on_a_cpu_with_avx512_bf16_is_bfloat16_autocast_too(monkeypatch):
    """AMD's Zen 4 has no AMX but AVX512-BF16: a step of the arithmetic preset's model ran 1.33x, the cpu preset's
    1.42x as fast in bfloat16 autocast (bench/README.md), where auto trained in float32."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    for value, bf16 in [(None, True), ("ALL", True), ("AVX512_CORE_BF16", True), ("AVX512_CORE_AMX", True),
                        ("AVX512_CORE", False), ("AVX2", False)]:
        if value is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", value)
        assert (setup_env(TrainConfig(device="cpu"), 128).dtype == torch.bfloat16) == bf16, value
        assert setup_env(TrainConfig(device="cpu"), 64).dtype == torch.float32, value
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert setup_env(TrainConfig(device="cpu"), 128).dtype == torch.float32


def test_each_gpu_of_a_mixed_machine_is_asked_for_its_own_bfloat16(monkeypatch):
    """torch's is_bf16_supported() asks the current GPU: with an A100 as cuda:0, `generate --device cuda:1` on a T4
    loaded bfloat16 weights the T4 only emulates, and the other way round refused --dtype bfloat16 on an RTX 4090."""
    from homellm.train import pick_dtype

    fake_gpu(monkeypatch, "NVIDIA A100-SXM4-80GB", 8, 0, count=2)
    capability = {0: (8, 0), 1: (7, 5)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[
        torch.device(device).index if device is not None else 0])
    assert pick_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert pick_dtype("auto", torch.device("cuda", 1)) == torch.float16
    assert ns_dtype(torch.device("cuda", 1)) == torch.float32
    capability.update({0: (7, 5), 1: (8, 9)})
    assert pick_dtype("bfloat16", torch.device("cuda", 1)) == torch.bfloat16
    assert ns_dtype(torch.device("cuda", 1)) == torch.bfloat16


def test_a_cpu_only_pytorch_on_a_gpu_machine_and_float16_on_the_cpu_are_said(monkeypatch, tmp_path, capsys):
    import homellm.train as train_module
    from homellm.train import pick_dtype, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(train_module, "_NVIDIA_DRIVER", tmp_path / "absent")
    monkeypatch.setattr(train_module, "_WSL_CUDA", tmp_path / "absent")
    monkeypatch.setattr(train_module.shutil, "which", lambda name: None)
    monkeypatch.setattr(train_module, "_noted", set())
    assert resolve_device("auto").type == "cpu" and capsys.readouterr().err == ""  # a machine without a GPU
    (tmp_path / "version").write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.86\n")
    monkeypatch.setattr(train_module, "_NVIDIA_DRIVER", tmp_path / "version")
    assert resolve_device("auto").type == "cpu"
    assert "this machine has an NVIDIA GPU, but this PyTorch is a CPU-only build" in capsys.readouterr().err
    assert resolve_device("auto").type == "cpu" and capsys.readouterr().err == ""  # once: the quickstart asks twice
    # WSL2 has no /proc/driver/nvidia, Windows neither: its CUDA library, or nvidia-smi on the PATH, tell instead.
    monkeypatch.setattr(train_module, "_NVIDIA_DRIVER", tmp_path / "absent")
    for sign in ("wsl", "smi"):
        monkeypatch.setattr(train_module, "_noted", set())
        if sign == "wsl":
            monkeypatch.setattr(train_module, "_WSL_CUDA", tmp_path / "version")
        else:
            monkeypatch.setattr(train_module, "_WSL_CUDA", tmp_path / "absent")
            monkeypatch.setattr(train_module.shutil, "which", lambda name: "C:/Windows/System32/nvidia-smi.exe")
        assert resolve_device("auto").type == "cpu" and "is a CPU-only build" in capsys.readouterr().err, sign
    assert resolve_device("cpu").type == "cpu" and capsys.readouterr().err == ""  # asked for: nothing to say
    assert pick_dtype("float16", torch.device("cpu")) == torch.float16
    assert "--dtype float16 on the CPU is no faster than float32, and on most CPUs many times slower" in \
        capsys.readouterr().err
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32 and capsys.readouterr().err == ""
    # bfloat16 asked for on a CPU that emulates it: said (9x slower measured), as float16 is; not where it has it
    for native in (False, True):
        monkeypatch.setattr(train_module, "bf16_cpu", lambda native=native: native)
        assert pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
        assert ("--dtype bfloat16 on a CPU without bfloat16 matrix instructions (AMX, AVX512-BF16) is emulated" in
                capsys.readouterr().err) != native


def test_a_world_size_left_in_the_shell_without_torchruns_other_variables_is_named(monkeypatch):
    """(audit) torch's rendezvous raised a ValueError for the missing RANK, shown as a traceback."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(HomeLLMError, match=r"^WORLD_SIZE=2 is set, but RANK and MASTER_ADDR and MASTER_PORT are not: "
                                           r"start the run with torchrun \(`torchrun --nproc-per-node N -m homellm"):
        setup_env(TrainConfig(device="cpu"))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(HomeLLMError, match=r"^WORLD_SIZE=2 is set, but MASTER_PORT is not: "):
        setup_env(TrainConfig(device="cpu"))


def test_torchrun_with_more_processes_than_gpus_or_on_mps_says_so(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA GeForce RTX 4090", 8, 9, count=2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(HomeLLMError, match=r"started at least 3 processes on this machine, and they see 2 CUDA GPUs.*"
                                           r"--nproc-per-node 2\)"):
        setup_env(TrainConfig(device="auto"))
    # Local rank 0 (the one whose errors are shown) stops too: it had waited at the rendezvous, saying nothing.
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(HomeLLMError, match=r"started 4 processes on this machine, and they see 2 CUDA GPUs"):
        setup_env(TrainConfig(device="auto"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with pytest.raises(HomeLLMError, match="torchrun with Apple's MPS"):
        setup_env(TrainConfig(device="auto"))


@pytest.mark.parametrize("name, flops", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12),
    ("NVIDIA L4", 121e12), ("NVIDIA A10", 125e12), ("NVIDIA A10G", None), ("NVIDIA RTX A1000", None),
    ("NVIDIA GeForce RTX 4090", 165e12), ("NVIDIA GeForce RTX 4090 Laptop GPU", None), ("Tesla T4", 65e12),
    ("Tesla V100-SXM2-16GB", 125e12), ("Tesla V100-PCIE-32GB", 112e12), ("NVIDIA GeForce RTX 3090", 71e12),
    ("NVIDIA GeForce RTX 3090 Ti", 80e12), ("NVIDIA GeForce GTX 1080", None), ("NVIDIA H800", 989e12),
    ("NVIDIA H800 PCIe", 756e12), ("NVIDIA A800-SXM4-80GB", 312e12), ("NVIDIA A800 80GB PCIe", 312e12)])
def test_mfu_peaks_match_whole_gpu_names(name, flops):
    """Substrings used to match: an L40S took the L4's peak (MFU 3x too high), a 4090 laptop the desktop's."""
    assert peak_flops(name) == flops


def test_mfu_is_not_reported_against_half_precisions_peak_in_float32(monkeypatch):
    from homellm.train import _peak_flops

    fake_gpu(monkeypatch, "NVIDIA A100-SXM4-80GB", 8, 0)
    assert _peak_flops(torch.device("cuda", 0), torch.bfloat16) == _peak_flops(torch.device("cuda"), torch.float16)
    assert _peak_flops(torch.device("cuda", 0), torch.bfloat16) == 312e12
    assert _peak_flops(torch.device("cuda", 0), torch.float32) is None
    assert _peak_flops(torch.device("cpu"), torch.bfloat16) is None


def test_resuming_where_auto_means_float16_loads_a_run_saved_without_a_scaler(tmp_path, data_dir):
    """A run saved in bfloat16 or float32 has an empty scaler state; resumed where `auto` means float16 (a T4), the
    enabled scaler refused it. Emulated here by a saved float16 config over a float32 checkpoint."""
    run = tmp_path / "run"
    flags = ["--data", str(data_dir), "--out", str(run)]
    assert main(["pretrain", *flags, "--preset", "tiny", "--device", "cpu", "--eval-every", "0",
                 "--max-steps", "2"]) == 0
    config = json.loads((run / "config.json").read_text())
    config["train"]["dtype"] = "float16"
    (run / "config.json").write_text(json.dumps(config))
    assert main(["pretrain", *flags, "--max-steps", "3", "--resume"]) == 0
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()][-1] == 3


def test_float16_logs_its_loss_scale(tmp_path, data_dir):
    """float16 (auto on GPUs without native bfloat16) skips the steps whose gradients overflow and lowers its loss
    scale; nothing showed it. The scale is logged with every step's metrics. float16 autocast runs on the CPU too."""
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(data_dir), "--out", str(run), "--preset", "tiny", "--device", "cpu",
                 "--dtype", "float16", "--max-steps", "3", "--log-every", "1", "--eval-every", "0"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["loss_scale"] > 0 for r in rows)
    assert main(["pretrain", "--data", str(data_dir), "--out", str(tmp_path / "fp32"), "--preset", "tiny", "--device",
                 "cpu", "--max-steps", "1", "--eval-every", "0"]) == 0
    assert "loss_scale" not in (tmp_path / "fp32" / "metrics.jsonl").read_text()


def test_a_run_resumes_in_another_precision(tmp_path, data_dir):
    """A run saved with --dtype bfloat16 (the gpt2-124m preset's before it became auto) could not go on where
    bfloat16 is emulated: without --dtype it was refused as emulated, with --dtype float16 as a changed config."""
    from homellm.checkpoint import read_config
    from homellm.train import check_resume

    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(data_dir), "--out", str(run), "--preset", "tiny", "--device", "cpu",
                 "--dtype", "bfloat16", "--max-steps", "1", "--eval-every", "0"]) == 0
    model_cfg, cfg = read_config(run)
    for dtype in ("float16", "auto", "float32"):
        check_resume(run, model_cfg, replace(cfg, dtype=dtype))


def test_compile_where_it_cannot_work_trains_without_it_and_says_why(tmp_path, data_dir, monkeypatch, capsys):
    """torch.compile failed at the first step, with a page of traceback, where Triton is missing or too new for the
    GPU (P100, GTX 10xx, Windows), or the CPU has no C++ compiler. The gpt2-124m preset compiles."""
    from homellm import train as module

    fake_gpu(monkeypatch, "Tesla P100-PCIE-16GB", 6, 0)
    monkeypatch.setattr(module.importlib.util, "find_spec", lambda name: object())
    assert "compute capability 7.0 or later, and this GPU has 6.x" in module._cannot_compile(torch.device("cuda"))
    monkeypatch.setattr(module.importlib.util, "find_spec", lambda name: None)
    assert "Triton" in module._cannot_compile(torch.device("cuda"))
    monkeypatch.setattr(module.shutil, "which", lambda name: None)
    assert main(["pretrain", "--data", str(data_dir), "--out", str(tmp_path / "run"), "--preset", "tiny", "--device",
                 "cpu", "--compile", "--max-steps", "1", "--eval-every", "0"]) == 0
    assert "note: training without torch.compile: on the CPU it builds C++, and no compiler" in capsys.readouterr().err


def _rank_precision(rank: int, port: int, amx: bool, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.cpu._is_amx_tile_supported = lambda: amx
    torch.cpu._init_amx = lambda: True
    torch.cpu._is_avx512_bf16_supported = lambda: False
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):  # (a cap set outside would pass the test either way)
        os.environ.pop(name, None)
    from homellm import train

    train.shutil.which = lambda name: "/usr/bin/g++" if amx else None  # a C++ compiler on rank 0's machine only
    env = setup_env(TrainConfig(device="cpu", compile=True), 128)
    # GPUs of two kinds (an RTX 3090 beside a 2080 Ti): bfloat16 and Muon's bfloat16 iteration on one only
    mixed = train.agreed(*((torch.bfloat16, torch.bfloat16) if amx else (torch.float16, torch.float32)), True,
                         torch.device("cpu"))
    with open(f"{out}.{rank}", "w") as f:
        f.write(json.dumps([str(env.dtype), str(env.ns_dtype), env.cannot_compile, *map(str, mixed)]))
    dist.destroy_process_group()


def test_processes_of_one_run_train_in_one_precision_where_only_some_machines_have_amx(tmp_path):
    """torchrun across machines of which only some have AMX: each process chose its own precision. So did GPUs of
    two kinds (DDP averaged float16's scaled gradients with bfloat16's: the replicas drifted apart), Muon's
    iteration, and torch.compile where one machine had no C++ compiler."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_precision, args=(rank, port, rank == 0, str(tmp_path / "dtype")))
             for rank in range(2)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
    finally:
        for p in procs:  # a rank stuck in the collective must not hold the suite until gloo's timeout
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    chosen = [json.loads((tmp_path / f"dtype.{rank}").read_text()) for rank in range(2)]
    # (Muon's iteration: bfloat16 on the machine with AMX only, so float32 on both)
    assert [c[:2] for c in chosen] == [["torch.float32", "torch.float32"]] * 2
    assert "another process of this run cannot use it" in chosen[0][2] and "no compiler" in chosen[1][2]
    assert [c[3:] for c in chosen] == [["torch.float16", "torch.float32", "True"]] * 2  # float16 and its scaler


def test_an_empty_or_odd_world_size_is_one_process(monkeypatch, tmp_path, corpus):
    """WORLD_SIZE was read seven ways: the command line took an empty one as no torchrun, and pretrain from raw text
    then stopped on int("") with a traceback (review)."""
    from homellm.io import world_size

    for value, world in (("", 1), ("abc", 1), ("0", 1), ("1", 1), ("4", 4), ("\u00b2", 1)):
        monkeypatch.setenv("WORLD_SIZE", value)
        assert world_size() == world, value
    monkeypatch.setenv("WORLD_SIZE", "")
    assert main(["pretrain", "--data", str(corpus), "--out", str(tmp_path / "run"), "--preset", "tiny",
                 "--max-steps", "1", "--eval-every", "0", "--tokenizer-kind", "char"]) == 0
