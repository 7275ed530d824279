"""`peft train --launch PRESET --nproc 2` on CPU (gloo): DDP, DeepSpeed ZeRO-2/ZeRO-3 and FSDP2 runs of the tiny
model train the adapter that one process trains with the same effective batch, save it whole, and resume exactly."""

from __future__ import annotations

import json
import os
import re

import pytest
from safetensors.torch import load_file

from peftcli.recipe.load import validate_recipe_dict
from peftcli.train.loop import train

from support import make_recipe, run_cli, write_recipe

ENGINES = {"ddp": "DDP", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3", "fsdp2": "FSDP2"}
STEPS, PER_DEVICE, ACCUMULATION, WORLD = 4, 2, 2, 2


def _recipe(tmp_path, tiny_model_dir, copy_data, out: str, **training) -> dict:
    return make_recipe(
        tmp_path,
        tiny_model_dir,
        copy_data,
        data={
            "train": {"path": str(copy_data), "format": "prompt_completion", "max_samples": 64},
            "validation": {"fraction": 0.125},
            "max_length": 64,
        },
        training={
            "max_steps": STEPS,
            "batch_size": PER_DEVICE,
            "gradient_accumulation": ACCUMULATION,
            "learning_rate": 3e-3,
            # generation before and after: under ZeRO-3 every process must take part in each forward
            "eval_generation": {"prompts": 2, "max_new_tokens": 4, "pattern": "a"},
            **training,
        },
        output={"dir": str(tmp_path / out)},
    )


def _launch(recipe_file, preset: str, *extra: str):
    """`peft train RECIPE --launch PRESET --nproc 2`, as a user runs it."""
    return run_cli("train", str(recipe_file), "--launch", preset, "--nproc", str(WORLD), *extra)


def _finished(out_dir) -> bool:
    """Judged by the files: about 1 in 10 multi-process CPU runs aborts at interpreter exit after its work is
    done ("terminate called without an active exception"), so a failed exit is retried once, not trusted."""
    return (out_dir / "summary.json").is_file() and (out_dir / "adapter_model.safetensors").is_file()


def _train_losses(out_dir) -> list[tuple[float, float]]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["grad_norm"]) for r in records if r["type"] == "train"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir, copy_data):
    """The reference: one process, the same effective batch (per-device batch x world size)."""
    tmp_path = tmp_path_factory.mktemp("one")
    recipe = _recipe(tmp_path, tiny_model_dir, copy_data, "run", batch_size=PER_DEVICE * WORLD)
    train(validate_recipe_dict(recipe, "one.yaml"))
    return tmp_path / "run"


def _check_same_as_one_process(result, out, reference, preset: str) -> None:
    """A 2-process run (`result`, written to `out`) did what the one-process run `reference` did."""
    assert "launching through accelerate" in result.stderr
    assert json.loads((reference / "summary.json").read_text())["engine"] == "single process"  # not "DDP"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == ENGINES[preset] and summary["world_size"] == WORLD
    assert len((out / "samples.jsonl").read_text().splitlines()) == 4  # 2 prompts x 2 times, by one process
    assert summary["effective_batch_size"] == PER_DEVICE * ACCUMULATION * WORLD == 8
    printed = " ".join((result.stdout + result.stderr).split())
    assert f"effective batch 8 = 2 per device x 2 accumulation x 2 processes ({ENGINES[preset]})" in printed
    if preset == "zero3":  # no process ever holds the whole base
        assert "loading the base model partitioned (zero.Init)" in printed
    assert "all_gather_into_tensor" not in printed  # torch's deprecation of DeepSpeed's own call, once per process
    # The one-process run tokenized the same data: both processes read its cache entry (the main one says so).
    assert printed.count("tokenized data: from cache ") == 1 and "tokenized data.train" not in printed

    # The same computation: every step's loss and gradient norm agree to float32 summation order.
    ours, expected_losses = _train_losses(out), _train_losses(reference)
    assert len(ours) == len(expected_losses) == summary["steps"]
    for (loss, norm), (ref_loss, ref_norm) in zip(ours, expected_losses, strict=True):
        assert loss == pytest.approx(ref_loss, rel=1e-6) and norm == pytest.approx(ref_norm, rel=1e-5)

    # Whole tensors (never a rank's slice), and the same adapter. Adam divides each gradient by its own running
    # magnitude, so in the first steps an element whose gradient is near zero moves by up to the learning rate
    # (3e-3) whatever its size: reduction-order noise in such elements shows up at 1e-5..1e-4 (measured 5e-5
    # for DDP and ZeRO-2, 1e-4 for ZeRO-3, with elements up to 0.13). 3e-4 is a tenth of one step's reach.
    tensors, expected = (
        load_file(str(out / "adapter_model.safetensors")),
        load_file(str(reference / "adapter_model.safetensors")),
    )
    assert tensors.keys() == expected.keys()
    for key, value in expected.items():
        assert tensors[key].shape == value.shape and tensors[key].numel() > 0, key
        assert (tensors[key] - value).abs().max().item() < 3e-4, key
    assert sum(float(t.norm()) for k, t in tensors.items() if "lora_B" in k) > 0


# ZeRO-3 and FSDP2 are checked against one process by test_resume_with_two_processes (its unbroken run), which
# saves two launches of CI time.
@pytest.mark.parametrize("preset", ["ddp", "zero2"])
def test_two_processes_train_the_adapter_one_process_trains(preset, one_process, tmp_path, tiny_model_dir, copy_data):
    if preset != "ddp":
        pytest.importorskip("deepspeed")
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(tmp_path, tiny_model_dir, copy_data, "run"))
    out = tmp_path / "run"
    result = _launch(recipe, preset)
    if not _finished(out):
        result = _launch(recipe, preset, "--overwrite")
    assert _finished(out), result.stderr[-3000:]
    _check_same_as_one_process(result, out, one_process, preset)


# zero2 writes the same DeepSpeed checkpoint as zero3 (which is tested), only unpartitioned. DDP writes the
# one-process checkpoint (resumed exactly in tests/cli/test_faults.py); a 2-process DDP stop and resume is
# test_sigterm_stops_both_processes_at_one_step_with_one_checkpoint_and_resume_finishes (CI time).
@pytest.mark.parametrize("preset", ["zero3", "fsdp2"])
def test_resume_with_two_processes(preset, tmp_path, tiny_model_dir, copy_data):
    """The unbroken 2-process run trains what one process trains; a run stopped after its step-2 checkpoint and
    resumed gives the unbroken run's adapter."""
    pytest.importorskip("deepspeed")
    sections = {"schedule": "constant", "save_every": 2, "keep_checkpoints": 3, "max_steps": 6}
    reference = _recipe(tmp_path, tiny_model_dir, copy_data, "one", **{**sections, "batch_size": PER_DEVICE * WORLD})
    train(validate_recipe_dict(reference, "one.yaml"))
    unbroken = write_recipe(tmp_path / "u.yaml", _recipe(tmp_path, tiny_model_dir, copy_data, "unbroken", **sections))
    result = _launch(unbroken, preset)
    if not _finished(tmp_path / "unbroken"):
        result = _launch(unbroken, preset, "--overwrite")
    assert _finished(tmp_path / "unbroken"), result.stderr[-3000:]
    _check_same_as_one_process(result, tmp_path / "unbroken", tmp_path / "one", preset)
    # The first run ends at step 4 (its checkpoints: steps 2 and 4 is the end, so only 2); resuming with 6 steps
    # continues from step 2, as after a crash between steps 2 and 4.
    broken = write_recipe(
        tmp_path / "b.yaml",
        _recipe(tmp_path, tiny_model_dir, copy_data, "broken", **{**sections, "max_steps": 4}),
    )
    first = _launch(broken, preset)
    assert _finished(tmp_path / "broken"), first.stderr[-3000:]
    resumed = _launch(broken, preset, "--set", "training.max_steps=6", "--resume")
    assert "resuming from" in resumed.stdout + resumed.stderr and "(step 2 of 6)" in resumed.stdout + resumed.stderr
    summary = json.loads((tmp_path / "broken" / "summary.json").read_text())
    assert summary["steps"] == 6, resumed.stderr[-3000:]
    a = load_file(str(tmp_path / "unbroken" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "broken" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    steps = [
        r["step"]
        for r in map(json.loads, (tmp_path / "broken" / "metrics.jsonl").read_text().splitlines())
        if r["type"] == "train"
    ]
    assert steps == [1, 2, 3, 4, 5, 6]  # the log keeps each step once: 3 and 4 of the first run were replaced


def test_qlora_under_fsdp2_trains_what_one_process_trains(tmp_path, tiny_model_dir, copy_data):
    """A 4-bit base whose packed weights are stored as a float type: FSDP2 shards them like any weight (with the
    default uint8 storage accelerate keeps a whole copy on each process instead, which the recipe refuses).
    Two processes train the adapter one process trains on the same quantized base."""
    quantized = {"bits": 4, "storage_dtype": "fp32", "compute_dtype": "fp32"}

    def recipe(out: str, **training) -> dict:
        r = _recipe(tmp_path, tiny_model_dir, copy_data, out, **training)
        r["model"] = {**r["model"], "quantization": quantized}
        return r

    reference = train(validate_recipe_dict(recipe("one", batch_size=PER_DEVICE * WORLD), "one.yaml"))
    assert reference["quantization"].startswith("nf4")
    recipe_file = write_recipe(tmp_path / "r.yaml", recipe("run"))
    result = _launch(recipe_file, "fsdp2")
    if not _finished(tmp_path / "run"):
        result = _launch(recipe_file, "fsdp2", "--overwrite")
    assert _finished(tmp_path / "run"), result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["engine"] == "FSDP2" and summary["quantization"] == reference["quantization"]
    for (loss, norm), (ref_loss, ref_norm) in zip(
        _train_losses(tmp_path / "run"), _train_losses(tmp_path / "one"), strict=True
    ):
        assert loss == pytest.approx(ref_loss, rel=1e-6) and norm == pytest.approx(ref_norm, rel=1e-5)
    ours = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    expected = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    assert ours.keys() == expected.keys()
    for key, value in expected.items():
        assert ours[key].shape == value.shape, key
        assert (ours[key] - value).abs().max().item() < 3e-4, key


ZERO3_CASES = {
    "lora": ("lora", {"r": 4, "target_modules": "all-linear"}),
    "lora-embeddings": ("lora", {"r": 4, "target_modules": ["q_proj", "embed_tokens"]}),
    "loha": ("loha", {}),
    "lokr": ("lokr", {}),
    "ia3": ("ia3", {}),
    "oft": ("oft", {}),
    "vera": ("vera", {"r": 8}),
    "bottleneck": ("bottleneck", {}),
    "freeze": ("freeze", {}),
    "full": ("full", {}),
    "prompt_tuning-text": ("prompt_tuning", {"num_virtual_tokens": 4, "init": "text", "init_text": "copy this"}),
    "prefix_tuning": ("prefix_tuning", {"num_virtual_tokens": 4}),
    "p_tuning": ("p_tuning", {"num_virtual_tokens": 4}),
    "pissa": ("lora", {"r": 4, "init": "pissa"}),
}


def test_under_zero3_methods_apply_to_a_base_built_partitioned(tmp_path, tiny_model_dir):
    """ZeRO-3 builds the base already partitioned (zero.Init: no process holds all of it). Every method safe
    under ZeRO-3 applies there and trains tensors of the shapes it trains on the whole base; PiSSA, which starts
    from the whole weights, is refused on a partitioned base (the loop loads the base whole for it)."""
    import subprocess
    import sys
    from pathlib import Path

    from peftcli.train.distributed import starts_from_base_weights
    from peftcli.tuners.registry import get_tuner

    pytest.importorskip("deepspeed")
    probe = Path(__file__).with_name("zero3_partitioned_probe.py")
    result = subprocess.run(
        [sys.executable, str(probe), str(tiny_model_dir), json.dumps(ZERO3_CASES)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for label, (name, params) in ZERO3_CASES.items():
        whole, partitioned = report[label]["whole"], report[label]["partitioned"]
        assert "error" not in whole, (label, whole)
        assert whole["base_partitioned"] is False
        if starts_from_base_weights(get_tuner(name).params(**params)):
            assert "needs the whole weight to start from" in partitioned.get("error", ""), (label, partitioned)
            continue
        assert "error" not in partitioned, (label, partitioned)
        assert partitioned["base_partitioned"] is True, label
        assert partitioned["trainable"] == whole["trainable"] and whole["trainable"], label


def test_the_tokenized_data_is_found_in_the_cache_by_the_other_processes(tmp_path, tiny_model_dir, copy_data):
    """The loop tokenizes on the first process of each machine; the others must then find its cache entry rather
    than tokenize again (which is also what keeps them from timing out on a big dataset). The cache key comes
    from the recipe, the data's content and the tokenizer alone, so a fresh process computes the same one."""
    import subprocess
    import sys

    recipe = write_recipe(tmp_path / "r.yaml", _recipe(tmp_path, tiny_model_dir, copy_data, "run"))
    script = (
        "import sys; from peftcli.recipe.load import load_recipe; from peftcli.models.load import load_tokenizer;"
        "from peftcli.data.cache import tokenized_data; r = load_recipe(sys.argv[1]);"
        "d, e = tokenized_data(r, load_tokenizer(r.model)); import os;"
        "print(e.path, e.reused, os.stat(e.path / 'entry.json').st_mtime_ns)"
    )
    env = {**os.environ, "PEFTCLI_DATA_CACHE": str(tmp_path / "tokenized")}
    first, second = (
        subprocess.run([sys.executable, "-c", script, str(recipe)], capture_output=True, text=True, check=True, env=env)
        for _ in range(2)
    )
    entry, reused, written = first.stdout.split()[-3:]
    assert entry.startswith(str(tmp_path / "tokenized")) and reused == "False"
    assert second.stdout.split()[-3:] == [entry, "True", written]  # the same entry, read, not written again


def test_a_slice_of_a_sharded_tensor_is_never_saved(tmp_path, tiny_model_dir):
    """What ZeRO-3 leaves in a parameter outside a gather (an empty tensor; the whole shape in ds_shape), or a
    1-D piece of a 2-D tensor, is refused by name instead of being written as the adapter."""
    from transformers import AutoModelForCausalLM

    from peftcli.errors import AdapterError
    from peftcli.tuners.adapter import apply_adapter, save_adapter
    from peftcli.tuners.protocol import AdapterContext
    from peftcli.tuners.registry import get_tuner

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    apply_adapter(model, get_tuner("lora").params(r=4), AdapterContext())
    name, param = next((n, p) for n, p in model.named_parameters() if "lora_B" in n)
    whole = tuple(param.shape)
    param.ds_shape = whole
    param.data = param.data.new_empty(0)
    message = f"refusing to save {name}: it is a slice (0,) of a {whole} tensor"
    with pytest.raises(AdapterError, match=re.escape(message)):
        save_adapter(model, tmp_path / "out", None)
    param.data = param.data.new_zeros(whole[0])
    with pytest.raises(AdapterError, match="it is a slice"):
        save_adapter(model, tmp_path / "out", None)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_a_process_left_alone_by_accelerate_refuses_to_train(tmp_path, tiny_model_dir, copy_data):
    """An external `accelerate launch` on a machine without GPUs and without ACCELERATE_USE_CPU starts 2 processes
    for which accelerate picks no engine: nothing would keep their copies of the model in step."""
    import os
    import subprocess
    import sys

    import torch

    from peftcli.launch.presets import preset_file

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(tmp_path, tiny_model_dir, copy_data, "run"))
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"} | {"OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(preset_file("fsdp2"))]
    result = subprocess.run(
        [*launcher, "--num_processes", "2", "-m", "peftcli", "train", str(recipe)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    assert "was started as one of 2, but accelerate set it up to run alone" in result.stderr
    assert not (tmp_path / "run").exists()


def test_lora_on_fused_experts_under_fsdp2_trains_what_one_process_trains(tmp_path, copy_data):
    """LoRA on Mixtral's fused expert parameters (target_parameters) sharded by FSDP2: each step's loss and the
    saved adapter equal the one-process run's (ZeRO-3 is refused by the recipe check instead)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from peftcli.examples.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    model_dir = tmp_path / "mixtral"
    MixtralForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    method = {"name": "lora", "r": 4, "target_modules": ["q_proj"], "target_parameters": ["mlp.experts.gate_up_proj"]}

    def recipe(out: str, **training) -> dict:
        return {**_recipe(tmp_path, model_dir, copy_data, out, eval_generation=None, **training), "method": method}

    train(validate_recipe_dict(recipe("one", batch_size=PER_DEVICE * WORLD), "one.yaml"))
    recipe_file = write_recipe(tmp_path / "r.yaml", recipe("two"))
    result = _launch(recipe_file, "fsdp2")
    if not _finished(tmp_path / "two"):
        result = _launch(recipe_file, "fsdp2", "--overwrite")
    assert _finished(tmp_path / "two"), result.stderr[-3000:]
    assert "and 2 expert parameters" in " ".join((result.stdout + result.stderr).split())
    ours, reference = _train_losses(tmp_path / "two"), _train_losses(tmp_path / "one")
    assert len(ours) == len(reference) == STEPS
    for (loss, norm), (ref_loss, ref_norm) in zip(ours, reference, strict=True):
        assert loss == pytest.approx(ref_loss, rel=1e-6) and norm == pytest.approx(ref_norm, rel=1e-5)
    tensors = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    expected = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    assert tensors.keys() == expected.keys() and any(".experts.lora_B." in key for key in tensors)
    for key, value in expected.items():  # the bound of the test above, for the same reason
        assert tensors[key].shape == value.shape and (tensors[key] - value).abs().max().item() < 3e-4, key


def test_sigterm_stops_both_processes_at_one_step_with_one_checkpoint_and_resume_finishes(
    tmp_path, tiny_model_dir, copy_data
):
    """A scheduler's SIGTERM to `peft train --launch`: passed on to every process, which agree on the step to
    stop after, write the checkpoint together, and say how to continue; --resume then finishes the run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from peftcli.train.run_dir import list_checkpoints

    steps = 16
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, tiny_model_dir, copy_data, "run", max_steps=steps, eval_generation=None,
                     eval_at_start=False, save_every=1000)  # fmt: skip
    recipe_file = write_recipe(tmp_path / "r.yaml", recipe)
    command = [sys.executable, "-m", "peftcli", "train", str(recipe_file), "--launch", "ddp", "--nproc", str(WORLD)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ((out / "metrics.jsonl").is_file() and '"type": "train"' in (out / "metrics.jsonl").read_text()):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    stdout, stderr = launcher.communicate(timeout=300)

    assert launcher.returncode != 0, stderr[-3000:]
    checkpoints = list_checkpoints(out)
    assert len(checkpoints) == 1, stderr[-3000:]
    ((step, checkpoint),) = checkpoints
    assert 0 < step < steps
    said = re.findall(r"stopped by SIGTERM after step (\d+) of \d+; checkpoint written to", stdout + stderr)
    assert said and set(said) == {str(step)}, stderr[-3000:]  # every process that spoke stopped at that step
    assert not (out / "adapter_model.safetensors").exists()

    resumed = _launch(recipe_file, "ddp", "--resume")
    if not _finished(out):  # see _finished: a rare abort at exit after the work is done
        resumed = _launch(recipe_file, "ddp", "--resume")
    assert _finished(out), resumed.stderr[-3000:]
    assert f"(step {step} of {steps})" in resumed.stdout + resumed.stderr
    logged = [
        r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"
    ]
    assert logged == list(range(1, steps + 1))


# ZeRO-2 splits the pairs as DDP does and keeps a whole model on each process, so its reference is live as under
# DDP: nothing of its own to check here (left out for CI time).
@pytest.mark.parametrize("preset", ["ddp", "zero3", "fsdp2"])
def test_dpo_on_two_processes_equals_one_process(preset, tmp_path, tiny_model_dir, copy_data):
    """A preference run: each process holds its pairs whole (chosen and rejected rows together), and the
    reference (the starting adapter swapped in) is the same on every process. Under ZeRO-3 and FSDP2 the
    reference is precomputed (objective.reference: auto), shared out over both processes, and equals the one
    process's live reference."""
    if preset != "ddp":
        pytest.importorskip("deepspeed")
    from peftcli.examples.tiny import copy_task, write_jsonl

    rows = copy_task(64, seed=3)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": r["prompt"], "chosen": r["completion"], "rejected": rows[(i + 1) % 64]["completion"]}
        for i, r in enumerate(rows)
    ])  # fmt: skip

    def recipe(out: str, batch: int) -> dict:
        base = _recipe(tmp_path, tiny_model_dir, copy_data, out, batch_size=batch, eval_generation=None)
        base["objective"] = {"name": "dpo", "beta": 0.1}
        base["data"] = {"train": {"path": str(pairs), "format": "preference"}, "validation": {"fraction": 0.125},
                        "max_length": 64}  # fmt: skip
        return base

    train(validate_recipe_dict(recipe("one", PER_DEVICE * WORLD), "one.yaml"))
    recipe_file = write_recipe(tmp_path / "r.yaml", recipe("two", PER_DEVICE))
    result = _launch(recipe_file, preset)
    if not _finished(tmp_path / "two"):
        result = _launch(recipe_file, preset, "--overwrite")
    assert _finished(tmp_path / "two"), result.stderr[-3000:]
    records = {
        name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("one", "two")
    }
    one, two = ([r for r in records[n] if r["type"] == "train"] for n in ("one", "two"))
    assert len(one) == len(two) == STEPS
    for a, b in zip(one, two, strict=True):  # float32 sums in another order: 1e-6 relative
        for key in ("loss", "rewards/margin", "rewards/accuracy", "logps/chosen"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-6), (key, a, b)
    eval_one, eval_two = ([r for r in records[n] if r["type"] == "eval"][-1] for n in ("one", "two"))
    assert eval_two["eval_pairs"] == eval_one["eval_pairs"] == 8
    assert eval_two["eval_loss"] == pytest.approx(eval_one["eval_loss"], rel=1e-6)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    sharded = preset in ("zero3", "fsdp2")
    assert summary["reference"] == ("precomputed" if sharded else "live")
    assert (tmp_path / "two" / "reference_logps.safetensors").is_file() == sharded


def test_kto_on_two_processes_equals_one_process(tmp_path, tiny_model_dir, copy_data):
    """kto's kl estimate is added up over both processes' mismatched rows (fixed when the data is prepared),
    so each process computes the loss one process computes on the whole micro-batch."""
    from peftcli.examples.tiny import copy_task, write_jsonl
    from peftcli.train.unpaired import METRICS

    rows = copy_task(64, seed=4)
    examples = write_jsonl(tmp_path / "unpaired.jsonl", [
        {"prompt": r["prompt"], "completion": r["completion"] if i % 3 else rows[(i + 5) % 64]["completion"],
         "label": bool(i % 3)}
        for i, r in enumerate(rows)
    ])  # fmt: skip

    def recipe(out: str, batch: int) -> dict:
        base = _recipe(tmp_path, tiny_model_dir, copy_data, out, batch_size=batch, eval_generation=None)
        base["objective"] = {"name": "kto", "beta": 0.1, "undesirable_weight": 1.5}
        base["data"] = {"train": {"path": str(examples), "format": "unpaired_preference"},
                        "validation": {"fraction": 0.125}, "max_length": 64}  # fmt: skip
        return base

    train(validate_recipe_dict(recipe("one", PER_DEVICE * WORLD), "one.yaml"))
    recipe_file = write_recipe(tmp_path / "r.yaml", recipe("two", PER_DEVICE))
    result = _launch(recipe_file, "ddp")
    if not _finished(tmp_path / "two"):
        result = _launch(recipe_file, "ddp", "--overwrite")
    assert _finished(tmp_path / "two"), result.stderr[-3000:]
    records = {
        name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("one", "two")
    }
    one, two = ([r for r in records[n] if r["type"] == "train"] for n in ("one", "two"))
    assert len(one) == len(two) == STEPS and any(r["kl"] > 0 for r in one)  # the estimate is used, not clamped away
    for a, b in zip(one, two, strict=True):
        # float32 sums in another order: 1e-6 relative; kl and the rewards are differences of log-probabilities
        # (sums of tens of tokens, |logp| up to ~50), so their bound is 1e-6 of those (times beta for the
        # rewards), not of the difference
        scale = max(abs(a[key] or 0.0) for key in ("logps/chosen", "logps/rejected"))
        for key in ("loss", *METRICS):
            bound = {"kl": 1e-6 * scale, "rewards/": 0.1 * 1e-6 * scale}.get(key[:8], 1e-6)
            expected = a[key] if a[key] is None else pytest.approx(a[key], rel=1e-6, abs=bound)
            assert b[key] == expected, (key, a, b)
    eval_one, eval_two = ([r for r in records[n] if r["type"] == "eval"][-1] for n in ("one", "two"))
    assert eval_two["eval_examples"] == eval_one["eval_examples"] == 8
    scale = max(abs(eval_one[key] or 0.0) for key in ("eval_logps/chosen", "eval_logps/rejected"))
    assert eval_two["eval_loss"] == pytest.approx(eval_one["eval_loss"], rel=1e-6)
    for key in ("eval_kl", "eval_rewards/margin"):
        assert eval_two[key] == pytest.approx(eval_one[key], rel=1e-6, abs=1e-6 * scale), key
