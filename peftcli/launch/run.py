"""`peft train --launch PRESET`: hand the run to `accelerate launch`, or notice that a launcher already started us.

peftcli never spawns training processes itself: `--launch` runs accelerate's own launcher
(`python -m accelerate.commands.launch --config_file PRESET ... -m peftcli train ...`) and waits for it; the
launcher starts one `peft train` per process. Those find the launcher's variables in their environment and
just train.
"""

from __future__ import annotations

import os
import sys

from peftcli.errors import PeftCliError
from peftcli.launch.presets import preset_file, read_engine

LAUNCHED_MARK = "PEFTCLI_LAUNCHED"  # set for the processes `--launch` starts


def outside_launcher() -> str | None:
    """Which launcher made this process one of several (so `peft train` must not launch again), or None.

    srun is not one of them: it may start one `peft train --launch` per node (then each launches its node's
    processes) or one `peft train` per GPU without a launch section (then `adopt_slurm_environment` applies).
    """
    env = os.environ
    if env.get(LAUNCHED_MARK):
        return "peft train --launch"
    if "LOCAL_RANK" in env or "RANK" in env or "WORLD_SIZE" in env:
        return "accelerate launch" if any(k.startswith("ACCELERATE_") for k in env) else "torchrun"
    return None


def adopt_slurm_environment() -> None:
    """Under a bare `srun` (one task per process, no torchrun), give torch.distributed the variables it reads.

    MASTER_ADDR must come from the job script (the first host of the allocation); the port defaults to 29500.
    """
    env = os.environ
    if "RANK" in env or int(env.get("SLURM_NTASKS", "1") or 1) <= 1 or "SLURM_PROCID" not in env:
        return
    if "MASTER_ADDR" not in env:
        raise PeftCliError(
            "started by srun with several tasks but MASTER_ADDR is not set; export it in the job script "
            "(e.g. MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1)), see the README"
        )
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env["LOCAL_WORLD_SIZE"] = env.get("SLURM_NTASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "1")).split("(")[0]
    env.setdefault("MASTER_PORT", "29500")


def accelerate_command(launch, train_args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The `accelerate launch` command line and environment for a recipe's `launch` section.

    `train_args` are the arguments of `peft train` itself (recipe file, --set, --resume ...), passed on.
    """
    import torch

    engine = read_engine(launch.preset)
    gpus = torch.cuda.device_count()
    per_node = launch.nproc or max(1, gpus)
    if gpus and per_node > gpus:
        raise PeftCliError(f"launch.nproc: {per_node} processes per machine, but this machine has {gpus} GPUs")
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(preset_file(launch.preset))]
    argv += ["--num_processes", str(per_node * launch.nnodes), "--num_machines", str(launch.nnodes)]
    argv += ["--machine_rank", str(launch.node_rank), "--main_process_port", str(launch.main_port)]
    if launch.nnodes > 1:
        argv += ["--main_process_ip", launch.main_address]
    if engine.kind == "ddp" and per_node * launch.nnodes > 1:
        argv += ["--multi_gpu"]  # also what makes accelerate start several CPU processes (with ACCELERATE_USE_CPU)
    argv += ["-m", "peftcli", "train", *train_args]
    env = {**os.environ, LAUNCHED_MARK: "1"}
    if not gpus and engine.kind in ("ddp", "fsdp"):
        # CPU processes over gloo (DeepSpeed finds the CPU itself); FSDP is then selected by the loop,
        # see train.distributed.fsdp_between_cpu_processes
        env["ACCELERATE_USE_CPU"] = "true"
    # torchrun sets this to 1 per process; accelerate's DeepSpeed path does not, and 2 processes x N threads
    # on N cores are several times slower than 1 thread each.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // per_node)))
    return argv, env


ERROR_FILE = "PEFTCLI_ERROR_FILE"  # where a launched process leaves its one-line user error for `--launch`
FORWARDED_SIGNALS = ("SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2")  # what schedulers send to end or warn a job


def run_launcher(argv: list[str], env: dict[str, str]) -> int:
    """Run accelerate's launcher and wait for it; returns the exit status for `peft train --launch`.

    A process that stops on a user error (a data column missing, say) writes its message to ERROR_FILE
    before exiting; the launcher then reports the failure with torch-elastic's traceback, and this repeats
    that message as the last line, with exit status 2, so a batch job's log ends with what to fix.
    """
    import signal
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="peftcli-launch-") as scratch:
        error_file = os.path.join(scratch, "error")
        sys.stdout.flush()
        sys.stderr.flush()
        launcher = subprocess.Popen(argv, env={**env, ERROR_FILE: error_file})
        previous = {}
        for name in FORWARDED_SIGNALS:
            number = getattr(signal, name)
            previous[number] = signal.signal(number, lambda received, _frame: launcher.send_signal(received))
        # Ctrl-C reaches the launcher directly (same process group); it stops its processes and exits.
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            status = launcher.wait()
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
        if status != 0 and os.path.isfile(error_file):
            with open(error_file, encoding="utf-8") as handle:
                lines = [line for line in handle.read().splitlines() if line.strip()]
            if lines:
                raise PeftCliError("\n".join(lines))  # the launched process's lines, as it printed them
        return status


def report_error_to_launcher(lines: list[str]) -> None:
    """In a process started by `peft train --launch`: leave a user error for it (the first process to fail wins)."""
    path = os.environ.get(ERROR_FILE)
    if not path:
        return
    try:
        with open(path, "x", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
    except OSError:
        pass  # another process wrote its error first, or the launcher is gone
