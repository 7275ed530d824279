"""The `peft` command as a user runs it: exit codes, one `error:` line per problem, nothing written on failure."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

import peftcli
from peftcli.examples.tiny import write_jsonl

from support import make_recipe, run_cli, write_recipe

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def assert_user_error(result: subprocess.CompletedProcess) -> list[str]:
    """Exit 2, at least one `error:` line, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = error_lines(result.stderr)
    assert lines, result.stderr
    return lines


@pytest.fixture
def good_recipe(tmp_path: Path, tiny_model_dir: Path, copy_data: Path) -> Path:
    return write_recipe(tmp_path / "good.yaml", make_recipe(tmp_path, tiny_model_dir, copy_data))


@pytest.fixture
def bad_recipe(tmp_path: Path, tiny_model_dir: Path, copy_data: Path) -> Path:
    """Three problems: a misspelled key, a wrong type, a missing data file."""
    recipe = make_recipe(tmp_path, tiny_model_dir, copy_data)
    recipe["training"]["lerning_rate"] = 1e-3
    recipe["training"]["batch_size"] = "four"
    recipe["data"]["train"]["path"] = str(tmp_path / "missing.jsonl")
    return write_recipe(tmp_path / "bad.yaml", recipe)


def _listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.fixture(scope="module")
def slow_runs(tmp_path_factory, tiny_model_dir: Path, copy_data: Path) -> dict:
    """Every scenario that imports torch, in two chains run side by side (each run is mostly import time).

    Chain 1: a real `peft train` of the tiny model, then, on a copy of its output directory, a second run without
    flags, one with --resume --overwrite, and one with --overwrite. Chain 2: two recipes whose data is unusable.
    """
    tmp = tmp_path_factory.mktemp("runs")
    recipe_file = write_recipe(tmp / "tiny.yaml", make_recipe(tmp, tiny_model_dir, copy_data))
    again_dir = tmp / "again" / "run"
    again = make_recipe(tmp / "again", tiny_model_dir, copy_data)
    again_file = write_recipe(tmp / "again.yaml", again)

    wrong_columns = write_jsonl(tmp / "wrong.jsonl", [{"question": "copy a", "answer": "a"}] * 20)
    empty = tmp / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    data_cases = {}
    for name, data in (("columns", wrong_columns), ("empty", empty)):
        recipe = make_recipe(tmp / name, tiny_model_dir, copy_data)
        recipe["data"]["train"]["path"] = str(data)
        data_cases[name] = (write_recipe(tmp / f"{name}.yaml", recipe), tmp / name / "run")

    def train_chain() -> dict:
        runs = {"first": run_cli("train", str(recipe_file))}
        if runs["first"].returncode != 0:
            return runs
        shutil.copytree(tmp / "run", again_dir)
        runs["before"] = _listing(again_dir)
        runs["no_flags"] = run_cli("train", str(again_file))
        runs["after_no_flags"] = _listing(again_dir)
        runs["resume_and_overwrite"] = run_cli("train", str(again_file), "--resume", "--overwrite")
        runs["after_resume_and_overwrite"] = _listing(again_dir)
        runs["overwrite"] = run_cli("train", str(again_file), "--overwrite", "--set", "training.max_steps=2")
        return runs

    def data_chain() -> dict:
        return {name: run_cli("train", str(path)) for name, (path, _) in data_cases.items()}

    # One thread per run: the tiny model gains nothing from more, and two runs share the cores.
    with pytest.MonkeyPatch.context() as env, ThreadPoolExecutor(2) as pool:
        env.setenv("OMP_NUM_THREADS", "1")
        train_runs, data_runs = pool.submit(train_chain), pool.submit(data_chain)
        runs = train_runs.result()
        runs["data"] = {name: (result, data_cases[name][1]) for name, result in data_runs.result().items()}
    runs.update(out=tmp / "run", again_dir=again_dir)
    return runs


@pytest.fixture(scope="module")
def trained_run(slow_runs: dict) -> Path:
    """The output directory of the tiny training run."""
    first = slow_runs["first"]
    assert first.returncode == 0, first.stderr
    assert "Traceback" not in first.stderr
    return slow_runs["out"]


# recipe validate / show / schema


def test_validate_good_recipe(good_recipe: Path) -> None:
    result = run_cli("recipe", "validate", str(good_recipe))
    assert result.returncode == 0, result.stderr
    assert f"ok: {good_recipe}" in result.stdout


def test_validate_bad_recipe_reports_every_problem(bad_recipe: Path, good_recipe: Path) -> None:
    result = run_cli("recipe", "validate", str(bad_recipe))
    lines = assert_user_error(result)
    assert len(lines) == 3, result.stderr
    assert all(line.startswith(f"error: {bad_recipe}: ") for line in lines), lines
    assert any("training.lerning_rate" in line and "did you mean 'learning_rate'" in line for line in lines)
    assert any("training.batch_size" in line and "'four'" in line for line in lines)
    assert any("data.train.path" in line for line in lines)
    # several files: every file is checked, the good one still says ok
    result = run_cli("recipe", "validate", str(good_recipe), str(bad_recipe))
    assert len(assert_user_error(result)) == 3
    assert f"ok: {good_recipe}" in result.stdout


def test_validate_bad_override_is_a_user_error(good_recipe: Path) -> None:
    result = run_cli("recipe", "validate", str(good_recipe), "--set", "training.max_stepz=3")
    (line,) = assert_user_error(result)
    assert "did you mean 'max_steps'" in line


def test_show_applies_overrides_and_fills_defaults(good_recipe: Path, tmp_path: Path) -> None:
    result = run_cli("recipe", "show", str(good_recipe), "--set", "training.max_steps=3")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["training"]["max_steps"] == 3
    assert shown["training"]["schedule"] == "cosine"
    assert shown["method"]["dropout"] == 0.0
    assert shown["data"]["mask_prompt"] is True
    assert re.search(r"^  max_steps: 3$", result.stdout, re.MULTILINE)
    assert re.search(r"^  schedule: cosine$", result.stdout, re.MULTILINE)
    # what `show` prints is itself a valid recipe
    again = run_cli("recipe", "validate", str(write_recipe(tmp_path / "shown.yaml", shown)))
    assert again.returncode == 0, again.stderr

    as_json = run_cli("recipe", "show", str(good_recipe), "--set", "training.max_steps=3", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == shown


def test_schema_describes_every_section() -> None:
    result = run_cli("recipe", "schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert {"model", "method", "data", "training", "output"} <= set(schema["properties"])
    assert set(schema["required"]) >= {"model", "method", "data", "output"}

    def resolve(node: dict) -> list[dict]:
        if "$ref" in node:
            return [schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]]
        members = node.get("oneOf") or node.get("anyOf")
        return [d for member in members for d in resolve(member)] if members else [node]

    methods = resolve(schema["properties"]["method"])
    lora = next(
        m for m in methods if "lora" in (m["properties"]["name"].get("const"), m["properties"]["name"].get("default"))
    )
    assert "Rank of the update" in lora["properties"]["r"]["description"]
    assert lora["properties"]["alpha"]["description"]
    assert lora["additionalProperties"] is False


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert peftcli.__version__ in result.stdout


# importing the CLI stays light


def _imported_modules(*args: str) -> tuple[subprocess.CompletedProcess, str]:
    env = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "peftcli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    times = "\n".join(line for line in result.stderr.splitlines() if line.startswith("import time:"))
    return result, times


@pytest.mark.parametrize("args", [("--help",), ("recipe", "validate", "GOOD")], ids=["help", "validate"])
def test_cli_does_not_import_torch(args: tuple[str, ...], good_recipe: Path) -> None:
    args = tuple(str(good_recipe) if a == "GOOD" else a for a in args)
    result, times = _imported_modules(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "peftcli.cli.app" in times  # the import log is really there
    if "validate" in args:
        assert "peftcli.recipe.load" in times
    torch_lines = [line for line in times.splitlines() if re.search(r"\|\s+torch(\.|$)", line)]
    assert not torch_lines, torch_lines[:5]
    assert "transformers" not in result.stderr


# train: failures write nothing


def test_train_bad_recipe_writes_nothing(bad_recipe: Path, tmp_path: Path) -> None:
    result = run_cli("train", str(bad_recipe))
    assert len(assert_user_error(result)) == 3
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("case", "expected"), [("columns", "prompt, completion"), ("empty", "empty")])
def test_train_data_errors_exit_2_before_anything_is_written(slow_runs: dict, case: str, expected: str) -> None:
    result, out = slow_runs["data"][case]
    (line,) = assert_user_error(result)
    assert "data.train" in line and expected in line, line
    assert not out.exists(), f"{case}: the output dir was created"


def test_dry_run_prints_the_plan_and_writes_nothing(good_recipe: Path, tmp_path: Path) -> None:
    result = run_cli("train", str(good_recipe), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "plan" in result.stdout
    assert "lora" in result.stdout and "6 steps" in result.stdout
    assert not (tmp_path / "run").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.yaml"]


# train: a real run


def test_train_writes_the_run(trained_run: Path) -> None:
    out = trained_run
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "recipe.yaml",
        "summary.json",
        "metrics.jsonl",
        *TOKENIZER_FILES,
    ):
        assert (out / name).is_file(), f"{name} missing; have {sorted(p.name for p in out.iterdir())}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6
    assert summary["method"] == "lora"
    for key in ("first_train_loss", "final_train_loss"):
        assert isinstance(summary[key], float) and math.isfinite(summary[key]), (key, summary[key])
    assert math.isfinite(summary["eval_before"]["eval_loss"]) and math.isfinite(summary["eval_after"]["eval_loss"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in train)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["training"]["max_steps"] == 6
    assert saved["training"]["schedule"] == "cosine"  # the resolved recipe, defaults included


def test_a_plain_run_prints_nothing_from_engines_it_does_not_use(slow_runs: dict, trained_run: Path) -> None:
    # accelerate's unwrap_model imports DeepSpeed when installed, which warns "Setting accelerator to CPU"
    output = slow_runs["first"].stdout + slow_runs["first"].stderr
    assert "loading the base model" in output
    assert "DeepSpeed" not in output and "Setting accelerator" not in output, output


def test_existing_run_needs_overwrite(slow_runs: dict, trained_run: Path) -> None:
    copy = slow_runs["again_dir"]
    assert "summary.json" in slow_runs["before"]

    (line,) = assert_user_error(slow_runs["no_flags"])
    assert "--overwrite" in line and str(copy) in line
    assert slow_runs["after_no_flags"] == slow_runs["before"]

    (line,) = assert_user_error(slow_runs["resume_and_overwrite"])
    assert "--resume" in line and "--overwrite" in line
    assert slow_runs["after_resume_and_overwrite"] == slow_runs["before"]

    result = slow_runs["overwrite"]
    assert result.returncode == 0, result.stderr
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["steps"] == 2
    records = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2]  # the old run's metrics are gone


def test_overwrite_refuses_a_directory_that_is_not_a_run(good_recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    precious = out / "notes.txt"
    precious.write_text("mine", encoding="utf-8")
    result = run_cli("train", str(good_recipe), "--overwrite")
    (line,) = assert_user_error(result)
    assert "not a peftcli run" in line
    assert precious.read_text(encoding="utf-8") == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # without --overwrite too
    assert_user_error(run_cli("train", str(good_recipe)))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_targets_shows_matches_without_loading_weights(good_recipe: Path, tmp_path: Path) -> None:
    result = run_cli("targets", str(good_recipe), "--set", "method.target_modules=[q_proj,v_proj]")
    assert result.returncode == 0, result.stderr
    rows = dict(re.findall(r"^\s*(q_proj|v_proj)\s+(\d+)\s*$", result.stdout, re.MULTILINE))
    assert rows == {"q_proj": "2", "v_proj": "2"}  # the tiny Llama has 2 layers
    # r=4: q_proj 64->64 and v_proj 64->32 in each of 2 layers: 2 * (4*(64+64) + 4*(64+32)) = 1792
    assert "4 modules, 1,792 trainable parameters" in result.stdout
    assert not (tmp_path / "run").exists()

    miss = run_cli("targets", str(good_recipe), "--set", "method.target_modules=[q_prj]")
    lines = assert_user_error(miss)
    assert "q_prj matched nothing" in lines[0] and "q_proj" in lines[0]
