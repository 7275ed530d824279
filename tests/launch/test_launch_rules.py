"""The launch section and flags: presets shipped in the package, and the combinations refused before launching."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from peftcli.errors import PeftCliError, RecipeError
from peftcli.launch.presets import PRESETS, preset_file, read_engine
from peftcli.launch.run import accelerate_command, adopt_slurm_environment, outside_launcher
from peftcli.recipe.load import validate_recipe_dict

from support import make_recipe, run_cli, write_recipe

REPO = Path(__file__).resolve().parents[2]


def test_every_preset_is_shipped_in_the_package_and_in_configs_accelerate():
    for name in PRESETS:
        packaged = preset_file(name)
        assert packaged.is_file() and packaged.parent.name == "presets"
        assert packaged.read_text() == (REPO / "configs" / "accelerate" / f"{name}.yaml").read_text(), name
    assert sorted(p.stem for p in (REPO / "configs" / "accelerate").glob("*.yaml")) == sorted(PRESETS)
    engines = {name: read_engine(name).describe() for name in PRESETS}
    assert engines == {
        "ddp": "DDP",
        "zero1": "DeepSpeed ZeRO-1",
        "zero2": "DeepSpeed ZeRO-2",
        "zero3": "DeepSpeed ZeRO-3",
        "zero3_offload": "DeepSpeed ZeRO-3 with CPU offload",
        "fsdp2": "FSDP2",
    }


def _validate(tmp_path, tiny_model_dir, copy_data, **sections):
    data = make_recipe(tmp_path, tiny_model_dir, copy_data, **sections)
    if sections.get("method", {}).get("name", "lora") != "lora":
        data["method"] = sections["method"]  # another method: none of LoRA's defaults
    return validate_recipe_dict(data, "test.yaml")


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"launch": {"preset": "zero4"}}, "launch.preset: 'zero4' is neither a preset (ddp, zero1"),
        ({"launch": {"preset": "ddp", "nnodes": 2}}, "main_address: needed with nnodes > 1"),
        ({"launch": {"preset": "ddp", "nnodes": 2, "node_rank": 2, "main_address": "h"}}, "node_rank: 2 is not below"),
        (
            {"launch": {"preset": "zero3"}, "method": {"name": "adalora", "total_step": 10}},
            "launch.preset: method adalora is not safe when parameters are sharded (DeepSpeed ZeRO-3)",
        ),
        (
            {"launch": {"preset": "zero2"}, "method": {"name": "adalora", "total_step": 10}},
            "launch.preset: method adalora cannot train under DeepSpeed",
        ),
        ({"launch": {"preset": "fsdp2"}, "method": {"name": "ln_tuning"}}, "method ln_tuning is not safe when"),
        ({"launch": {"preset": "zero3"}, "method": {"dora": True}}, "method.dora: DoRA reads each layer's whole"),
        (
            {"launch": {"preset": "zero3"}, "method": {"target_parameters": ["mlp.experts.gate_up_proj"]}},
            "method.target_parameters: LoRA reads each adapted parameter whole before its module's forward",
        ),
        (
            {"launch": {"preset": "zero3_offload"}, "model": {"quantization": {"bits": 4}}},
            "launch.preset: ZeRO-3 cannot partition bitsandbytes-quantized layers",
        ),
        (
            {"launch": {"preset": "fsdp2"}, "model": {"quantization": {"bits": 4}}},
            "model.quantization.storage_dtype: FSDP2 shards a 4-bit base only when",
        ),
        ({"launch": {"preset": "fsdp2"}, "model": {"quantization": {"bits": 8}}}, "FSDP2 cannot shard 8-bit"),
    ],
)
def test_refused_combinations(tmp_path, tiny_model_dir, copy_data, sections, message):
    if "model" in sections:
        sections["model"] = {"name_or_path": str(tiny_model_dir), "dtype": "fp32", **sections["model"]}
    with pytest.raises(RecipeError) as info:
        _validate(tmp_path, tiny_model_dir, copy_data, **sections)
    assert message in str(info.value)


def test_accepted_combinations(tmp_path, tiny_model_dir, copy_data):
    _validate(tmp_path, tiny_model_dir, copy_data, launch={"preset": "zero3"})  # plain LoRA
    _validate(tmp_path, tiny_model_dir, copy_data, launch={"preset": "zero2"}, method={"dora": True})
    quantized = {"name_or_path": str(tiny_model_dir), "quantization": {"bits": 4, "storage_dtype": "bf16"}}
    _validate(tmp_path, tiny_model_dir, copy_data, launch={"preset": "fsdp2"}, model=quantized)


def test_an_accelerate_config_with_fsdp_and_deepspeed_is_refused(tmp_path, tiny_model_dir, copy_data):
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump({"distributed_type": "FSDP", "deepspeed_config": {"zero_stage": 2}}))
    with pytest.raises(RecipeError, match="asks for both FSDP and DeepSpeed"):
        _validate(tmp_path, tiny_model_dir, copy_data, launch={"preset": str(both)})
    own = tmp_path / "own.yaml"
    own.write_text(yaml.safe_dump({"distributed_type": "DEEPSPEED", "deepspeed_config": {"zero_stage": 1}}))
    recipe = _validate(tmp_path, tiny_model_dir, copy_data, launch={"preset": str(own)})
    assert read_engine(recipe.launch.preset).describe() == "DeepSpeed ZeRO-1"


def test_launch_flags_are_validated_before_anything_starts(tmp_path, tiny_model_dir, copy_data):
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tmp_path, tiny_model_dir, copy_data))
    result = run_cli("train", str(recipe), "--launch", "zero3", "--set", "method.dora=true", "--nproc", "2")
    assert result.returncode == 2
    assert "method.dora: DoRA reads each layer's whole base weight" in result.stderr
    assert "launching" not in result.stderr and not (tmp_path / "run").exists()
    plan = run_cli("train", str(recipe), "--launch", "zero2", "--nproc", "2", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "2 per machine, DeepSpeed ZeRO-2" in plan.stdout
    assert "x 1 accumulation x 2 = 8 effective" in plan.stdout


def test_the_accelerate_command(tmp_path, tiny_model_dir, copy_data, monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_NTASKS", "PEFTCLI_LAUNCHED"):
        monkeypatch.delenv(var, raising=False)
    assert outside_launcher() is None
    launch = {"preset": "zero2", "nproc": 2, "nnodes": 2, "node_rank": 1, "main_address": "10.0.0.1"}
    recipe = _validate(tmp_path, tiny_model_dir, copy_data, launch=launch)
    argv, env = accelerate_command(recipe.launch, ["r.yaml", "--resume"])
    line = " ".join(argv)
    assert "-m accelerate.commands.launch --config_file" in line and str(preset_file("zero2")) in line
    assert "--num_processes 4 --num_machines 2 --machine_rank 1 --main_process_port 29500" in line
    assert "--main_process_ip 10.0.0.1" in line and line.endswith("-m peftcli train r.yaml --resume")
    assert env["PEFTCLI_LAUNCHED"] == "1"
    monkeypatch.setenv("PEFTCLI_LAUNCHED", "1")
    assert outside_launcher() == "peft train --launch"
    monkeypatch.delenv("PEFTCLI_LAUNCHED")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert outside_launcher() == "torchrun"


def test_a_bare_srun_task_becomes_a_torch_distributed_rank(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(var, "")  # recorded, so what adopt_slurm_environment sets is undone afterwards
        monkeypatch.delenv(var)
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    assert outside_launcher() is None  # srun may also start one `peft train --launch` per node
    with pytest.raises(PeftCliError, match="started by srun with several tasks but MASTER_ADDR is not set"):
        adopt_slurm_environment()
    monkeypatch.setenv("MASTER_ADDR", "node01")
    adopt_slurm_environment()
    import os

    got = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")}
    assert got == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_PORT": "29500"}


def test_cpu_processes_are_asked_for_where_there_are_no_gpus(tmp_path, tiny_model_dir, copy_data, monkeypatch):
    """Without GPUs, DDP and FSDP2 run between CPU processes (the loop then selects FSDP itself, see
    test_distributed); DeepSpeed finds the CPU on its own."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    for preset, cpu in (("ddp", True), ("fsdp2", True), ("zero2", False)):
        recipe = _validate(tmp_path, tiny_model_dir, copy_data, launch={"preset": preset, "nproc": 2})
        argv, env = accelerate_command(recipe.launch, ["r.yaml"])
        assert (env.get("ACCELERATE_USE_CPU") == "true") is cpu, preset
        assert ("--multi_gpu" in argv) is (preset == "ddp"), preset


def test_a_user_error_inside_the_launched_processes_ends_the_output_with_exit_2(tmp_path, tiny_model_dir):
    """Data problems show only once the processes read the data; `--launch` repeats the first one as the last
    line (after the launcher's own report) and exits 2, as for errors it finds itself."""
    data = tmp_path / "data.jsonl"
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(16)]  # not the prompt_completion columns
    data.write_text("".join(__import__("json").dumps(row) + "\n" for row in rows), encoding="utf-8")
    recipe = write_recipe(tmp_path / "r.yaml", make_recipe(tmp_path, tiny_model_dir, data))
    result = run_cli("train", str(recipe), "--launch", "ddp", "--nproc", "2")
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data.train: format prompt_completion needs column(s) prompt, completion"), last
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_sigterm_to_peft_train_launch_stops_every_launched_process(tmp_path, tiny_model_dir, copy_data):
    """A scheduler ending a job signals the process it started: `--launch` passes SIGTERM on to accelerate's
    launcher, which stops the training processes; none is left running."""
    import os
    import signal
    import subprocess
    import sys
    import time

    long_run = make_recipe(tmp_path, tiny_model_dir, copy_data, training={"max_steps": 3000, "batch_size": 2})
    recipe = write_recipe(tmp_path / "r.yaml", long_run)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "output.txt"
    with log.open("w") as sink:  # a file, not a pipe: a closed pipe would stop the processes by itself
        parent = subprocess.Popen(
            [sys.executable, "-m", "peftcli", "train", str(recipe), "--launch", "ddp", "--nproc", "2"],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )

    def training_processes() -> list[int]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(recipe).encode() in cmdline and int(pid) != parent.pid:
                found.append(int(pid))
        return found

    deadline = time.monotonic() + 300
    while "step 2/" not in log.read_text() and parent.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(training_processes()) >= 2, log.read_text()[-3000:]  # the launcher and its 2 processes
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=120) != 0
    deadline = time.monotonic() + 30
    while training_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    left = training_processes()
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == []
