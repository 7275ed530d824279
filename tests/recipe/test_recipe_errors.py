"""Recipe loading errors: one line per problem, naming the file, the dotted path and what to do."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from peftcli.errors import PeftCliError, RecipeError
from peftcli.examples.assets import cache_dir
from peftcli.recipe.load import apply_overrides, load_recipe, parse_override

from support import REPO, make_recipe, write_recipe


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A directory standing in for a local model: validation only checks that it exists."""
    path = tmp_path / "model"
    path.mkdir()
    return path


@pytest.fixture
def recipe(tmp_path: Path, model_dir: Path, copy_data: Path) -> dict:
    return make_recipe(tmp_path, model_dir, copy_data)


def problems(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The lines of the RecipeError that loading `path` raises."""
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    lines = info.value.lines()
    assert lines, "a RecipeError must carry at least one line"
    assert all("\n" not in line for line in lines)
    return lines


def only_problem(path: Path) -> str:
    lines = problems(path)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{path}: "), lines[0]
    return lines[0]


def test_good_recipe_loads(tmp_path: Path, recipe: dict) -> None:
    loaded = load_recipe(write_recipe(tmp_path / "good.yaml", recipe))
    assert loaded.method.name == "lora"
    assert loaded.method.r == 4
    assert loaded.training.max_steps == 6
    assert loaded.training.schedule == "cosine"  # a default filled in


def test_misspelled_training_key_suggests_the_right_one(tmp_path: Path, recipe: dict) -> None:
    recipe["training"]["lerning_rate"] = 1e-3
    line = only_problem(write_recipe(tmp_path / "r.yaml", recipe))
    assert "training.lerning_rate" in line
    assert "did you mean 'learning_rate'" in line


def test_misspelled_method_key_suggests_alpha(tmp_path: Path, recipe: dict) -> None:
    recipe["method"]["alpah"] = 32
    line = only_problem(write_recipe(tmp_path / "r.yaml", recipe))
    assert "method.alpah" in line
    assert "did you mean 'alpha'" in line


def test_misspelled_section_suggests_it(tmp_path: Path, recipe: dict) -> None:
    recipe["trainng"] = recipe.pop("training")
    line = only_problem(write_recipe(tmp_path / "r.yaml", recipe))
    assert re.search(r": trainng: unknown key .*did you mean 'training'", line), line


def test_wrong_type_names_path_and_value(tmp_path: Path, recipe: dict) -> None:
    recipe["training"]["batch_size"] = "four"
    line = only_problem(write_recipe(tmp_path / "r.yaml", recipe))
    assert "training.batch_size" in line
    assert "'four'" in line
    assert "integer" in line


def test_wrong_type_of_union_field_is_one_line_with_the_users_path(tmp_path: Path, recipe: dict) -> None:
    # target_modules is list[str] | str: pydantic reports one error per union member, labelled 'list[str]'
    # and 'str'; the user wrote neither, and it is one problem.
    recipe["method"]["target_modules"] = 5
    line = only_problem(write_recipe(tmp_path / "r.yaml", recipe))
    assert ": method.target_modules: " in line
    assert "list[str]" not in line and ".str" not in line
    assert "a list" in line and "a string" in line and "got 5" in line


def test_validation_that_is_not_a_mapping_names_data_validation(tmp_path: Path, recipe: dict) -> None:
    recipe["data"]["validation"] = 5
    line = only_problem(write_recipe(tmp_path / "r.yaml", recipe))
    assert ": data.validation: " in line, line
    assert "DataSource" not in line


def test_unknown_key_in_validation_source_is_suggested(tmp_path: Path, recipe: dict, copy_data: Path) -> None:
    recipe["data"]["validation"] = {"path": str(copy_data), "formt": "prompt_completion"}
    lines = problems(write_recipe(tmp_path / "r.yaml", recipe))
    assert any("data.validation.formt" in line and "did you mean 'format'" in line for line in lines), lines
    assert not any("DataSource" in line for line in lines), lines


def test_missing_data_file_names_path_and_file(tmp_path: Path, recipe: dict) -> None:
    missing = tmp_path / "nowhere" / "train.jsonl"
    recipe["data"]["train"]["path"] = str(missing)
    line = only_problem(write_recipe(tmp_path / "r.yaml", recipe))
    assert "data.train.path" in line
    assert str(missing) in line
    assert "not found" in line


def test_missing_local_model_is_an_error_not_a_hub_id(tmp_path: Path, recipe: dict) -> None:
    recipe["model"]["name_or_path"] = "./no-such-model-dir"
    line = only_problem(write_recipe(tmp_path / "r.yaml", recipe))
    assert "model.name_or_path" in line and "./no-such-model-dir" in line


def test_several_problems_reported_at_once(tmp_path: Path, recipe: dict) -> None:
    recipe["training"]["lerning_rate"] = 1e-3
    recipe["training"]["batch_size"] = "four"
    recipe["method"]["alpah"] = 2
    recipe["model"]["dtype"] = "bf17"
    recipe["data"]["train"]["path"] = str(tmp_path / "missing.jsonl")
    path = write_recipe(tmp_path / "many.yaml", recipe)
    lines = problems(path)
    assert len(lines) == 5, lines
    assert all(line.startswith(f"{path}: ") for line in lines), lines
    joined = "\n".join(lines)
    for where in ("training.lerning_rate", "training.batch_size", "method.alpah", "model.dtype", "data.train.path"):
        assert f": {where}: " in joined, where
    assert "did you mean 'bf16'" in joined


def test_unknown_method_name_suggests_a_method(tmp_path: Path, recipe: dict) -> None:
    recipe["method"]["name"] = "lorra"
    line = only_problem(write_recipe(tmp_path / "r.yaml", recipe))
    assert "method.name" in line
    assert "'lorra'" in line
    assert "did you mean 'lora'" in line


def test_missing_required_section(tmp_path: Path, recipe: dict) -> None:
    del recipe["output"]
    line = only_problem(write_recipe(tmp_path / "r.yaml", recipe))
    assert ": output: " in line
    assert "required" in line


def test_missing_required_key_in_section(tmp_path: Path, recipe: dict) -> None:
    del recipe["data"]["train"]["format"]
    line = only_problem(write_recipe(tmp_path / "r.yaml", recipe))
    assert "data.train.format" in line and "required" in line


# --set overrides


def test_parse_override_reads_values_as_yaml() -> None:
    assert parse_override("training.max_steps=7") == (["training", "max_steps"], 7)
    assert parse_override("method.target_modules=[q_proj,v_proj]") == (
        ["method", "target_modules"],
        ["q_proj", "v_proj"],
    )
    assert parse_override("data.mask_prompt=false") == (["data", "mask_prompt"], False)
    assert parse_override("output.dir=a=b") == (["output", "dir"], "a=b")
    with pytest.raises(PeftCliError, match="KEY=VALUE"):
        parse_override("training.max_steps")


def test_overrides_are_typed(tmp_path: Path, recipe: dict) -> None:
    path = write_recipe(tmp_path / "r.yaml", recipe)
    loaded = load_recipe(
        path,
        ["training.max_steps=7", "method.target_modules=[q_proj,v_proj]", "training.learning_rate=0.001"],
    )
    assert loaded.training.max_steps == 7
    assert isinstance(loaded.training.max_steps, int)
    assert loaded.method.target_modules == ["q_proj", "v_proj"]
    assert loaded.training.learning_rate == pytest.approx(1e-3)


def test_overrides_apply_in_order_and_do_not_touch_the_input(recipe: dict) -> None:
    result = apply_overrides(recipe, ["training.max_steps=3", "training.max_steps=9", "data.validation.fraction=0.2"])
    assert result["training"]["max_steps"] == 9
    assert result["data"]["validation"] == {"fraction": 0.2}
    assert recipe["training"]["max_steps"] == 6
    assert recipe["data"]["validation"] == {"fraction": 0.1}


def test_override_can_create_a_section(tmp_path: Path, recipe: dict) -> None:
    del recipe["training"]
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", recipe), ["training.max_steps=4"])
    assert loaded.training.max_steps == 4


def test_unknown_override_key_is_refused_with_a_suggestion(tmp_path: Path, recipe: dict) -> None:
    path = write_recipe(tmp_path / "r.yaml", recipe)
    with pytest.raises(PeftCliError) as info:
        load_recipe(path, ["training.max_stepz=7"])
    message = str(info.value)
    assert "max_stepz" in message
    assert "did you mean 'max_steps'" in message
    with pytest.raises(PeftCliError, match="did you mean 'training'"):
        load_recipe(path, ["trainin.max_steps=7"])


def test_override_of_method_key_is_checked_against_the_method(tmp_path: Path, recipe: dict) -> None:
    path = write_recipe(tmp_path / "r.yaml", recipe)
    with pytest.raises(PeftCliError, match="did you mean 'alpha'") as info:
        load_recipe(path, ["method.alpah=3"])
    assert not isinstance(info.value, RecipeError)  # refused as an override, before validation
    lines = problems(path, ["method.alpha=abc"])
    assert len(lines) == 1 and "method.alpha" in lines[0] and "'abc'" in lines[0], lines
    lines = problems(path, ["method.r=0"])
    assert len(lines) == 1 and "method.r" in lines[0], lines
    assert load_recipe(path, ["method.alpha=4", "method.rslora=true"]).method.alpha == 4


def test_override_below_a_free_form_mapping_is_allowed(tmp_path: Path, recipe: dict) -> None:
    path = write_recipe(tmp_path / "r.yaml", recipe)
    loaded = load_recipe(path, ["data.train.columns.prompt=question"])
    assert loaded.data.train.columns == {"prompt": "question"}


# environment variables


def test_env_expansion(tmp_path: Path, recipe: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe["output"]["dir"] = "${PEFTCLI_TEST_OUT}/run"
    recipe["training"]["seed"] = "${PEFTCLI_TEST_SEED:-13}"
    recipe["training"]["schedule"] = "${PEFTCLI_TEST_SCHEDULE:-linear}"
    path = write_recipe(tmp_path / "r.yaml", recipe)
    monkeypatch.setenv("PEFTCLI_TEST_OUT", str(tmp_path / "out"))
    monkeypatch.delenv("PEFTCLI_TEST_SEED", raising=False)
    monkeypatch.setenv("PEFTCLI_TEST_SCHEDULE", "constant")
    loaded = load_recipe(path)
    assert loaded.output.dir == f"{tmp_path / 'out'}/run"
    assert loaded.training.seed == 13
    assert loaded.training.schedule == "constant"  # set variables win over the default
    monkeypatch.setenv("PEFTCLI_TEST_SEED", "5")
    assert load_recipe(path).training.seed == 5


def test_unset_env_var_without_default_names_the_path(
    tmp_path: Path, recipe: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PEFTCLI_TEST_UNSET", raising=False)
    recipe["output"]["dir"] = "${PEFTCLI_TEST_UNSET}/run"
    line = only_problem(write_recipe(tmp_path / "r.yaml", recipe))
    assert "output.dir" in line
    assert "PEFTCLI_TEST_UNSET" in line
    assert "not set" in line


# the file itself


def test_invalid_yaml_reports_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  name_or_path: x\nmethod: [lora\n  r: 4\n", encoding="utf-8")
    with pytest.raises(PeftCliError) as info:
        load_recipe(path)
    lines = info.value.lines()
    assert len(lines) == 1
    assert re.match(rf"{re.escape(str(path))}:4:\d+: invalid YAML", lines[0]), lines


def test_invalid_yaml_mapping_indent_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  name_or_path: x\n   dtype: fp32\n", encoding="utf-8")
    with pytest.raises(PeftCliError, match=rf"^{re.escape(str(path))}:3:\d+: invalid YAML"):
        load_recipe(path)


def test_empty_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    with pytest.raises(PeftCliError, match="empty"):
        load_recipe(path)


def test_non_mapping_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- model\n- method\n", encoding="utf-8")
    with pytest.raises(PeftCliError, match="mapping") as info:
        load_recipe(path)
    assert "list" in str(info.value)


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(PeftCliError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


# cross-field rules


def test_max_steps_and_epochs_together(tmp_path: Path, recipe: dict) -> None:
    recipe["training"]["epochs"] = 2
    line = only_problem(write_recipe(tmp_path / "r.yaml", recipe))
    assert "max_steps" in line and "epochs" in line and "not both" in line


def test_warmup_steps_and_ratio_together(tmp_path: Path, recipe: dict) -> None:
    recipe["training"].update(warmup_steps=2, warmup_ratio=0.1)
    line = only_problem(write_recipe(tmp_path / "r.yaml", recipe))
    assert "warmup_steps" in line and "warmup_ratio" in line


def test_eval_every_without_validation(tmp_path: Path, recipe: dict) -> None:
    del recipe["data"]["validation"]
    recipe["training"]["eval_every"] = 2
    line = only_problem(write_recipe(tmp_path / "r.yaml", recipe))
    assert "training.eval_every" in line and "data.validation" in line


def test_eval_generation_without_validation(tmp_path: Path, recipe: dict) -> None:
    del recipe["data"]["validation"]
    recipe["training"]["eval_generation"] = {"pattern": r"\d+"}
    line = only_problem(write_recipe(tmp_path / "r.yaml", recipe))
    assert "training.eval_generation" in line and "data.validation" in line


def test_eval_generation_with_text_format(tmp_path: Path, recipe: dict) -> None:
    recipe["data"]["train"]["format"] = "text"
    recipe["training"]["eval_generation"] = {"pattern": r"\d+"}
    line = only_problem(write_recipe(tmp_path / "r.yaml", recipe))
    assert "eval_generation" in line and "text" in line


def test_eval_generation_bad_regex(tmp_path: Path, recipe: dict) -> None:
    recipe["training"]["eval_generation"] = {"pattern": "(unclosed"}
    line = only_problem(write_recipe(tmp_path / "r.yaml", recipe))
    assert "training.eval_generation.pattern" in line and "regular expression" in line


def test_columns_must_belong_to_the_format(tmp_path: Path, recipe: dict) -> None:
    recipe["data"]["train"]["columns"] = {"promt": "question"}
    line = only_problem(write_recipe(tmp_path / "r.yaml", recipe))
    assert "data.train" in line and "promt" in line and "prompt, completion" in line


# the recipes shipped with the project


# Data that `python -m peftcli.examples gsm8k-pairs` builds on request (minutes of sampling), not at set-up.
BUILT_ON_REQUEST = {"gsm8k-pairs": {"prompt": "1 + 1?", "chosen": "2\n#### 2", "rejected": "3"}}


def test_every_shipped_recipe_validates(tmp_path: Path) -> None:
    import json

    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert recipes, f"no recipes found in {REPO / 'recipes'}"
    failures: list[str] = []
    for path in recipes:
        overrides = []
        for name, row in BUILT_ON_REQUEST.items():  # absent here: a stand-in file of the same format
            text = path.read_text(encoding="utf-8")
            built = all((cache_dir() / "data" / name / f).is_file() for f in ("train.jsonl", "eval.jsonl"))
            if f"/data/{name}/" in text and not built:
                stand_in = tmp_path / f"{name}.jsonl"
                stand_in.write_text(json.dumps(row) + "\n", encoding="utf-8")
                overrides = [f"data.train.path={stand_in}", f"data.validation.path={stand_in}"]
        try:
            load_recipe(path, overrides)
        except PeftCliError as error:
            failures.extend(error.lines())
    assert not failures, "\n".join(failures)


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path: Path, recipe: dict) -> None:
    text = write_recipe(tmp_path / "r.yaml", recipe).read_text()
    path = tmp_path / "twice.yaml"
    path.write_text(text + "method:\n  name: ia3\n")
    with pytest.raises(PeftCliError) as info:
        load_recipe(path)
    line = str(info.value)
    assert line.startswith(f"{path}:") and "key 'method' appears twice in one mapping (first on line" in line
    nested = tmp_path / "nested.yaml"
    nested.write_text(text.replace("  r: 4\n", "  r: 4\n  r: 8\n"))
    with pytest.raises(PeftCliError, match="key 'r' appears twice"):
        load_recipe(nested)


def test_a_recipe_that_is_not_utf8_names_the_byte(tmp_path: Path, recipe: dict) -> None:
    path = write_recipe(tmp_path / "r.yaml", recipe)
    raw = path.read_bytes()
    path.write_bytes(raw[:10] + b"\xe9" + raw[10:])
    with pytest.raises(PeftCliError) as info:
        load_recipe(path)
    assert str(info.value) == f"{path}: the recipe is not UTF-8 text (byte 0xe9 at offset 10); save it as UTF-8"


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("training", "learning_rate", float("inf"), "training.learning_rate: inf is not a finite number"),
        ("training", "weight_decay", float("nan"), "training.weight_decay: nan is not a finite number"),
        ("training", "seed", 2**40, "training.seed:"),
        ("output", "dir", "", "output.dir:"),
    ],
)
def test_numbers_and_paths_that_cannot_work(tmp_path, recipe, section, key, value, expected) -> None:
    recipe[section][key] = value
    line = only_problem(write_recipe(tmp_path / "r.yaml", recipe))
    assert expected in line, line


def test_an_output_dir_that_expands_to_nothing_is_refused(tmp_path, recipe, monkeypatch) -> None:
    monkeypatch.delenv("PEFTCLI_TEST_EMPTY", raising=False)
    recipe["output"]["dir"] = "${PEFTCLI_TEST_EMPTY:-}"
    line = only_problem(write_recipe(tmp_path / "r.yaml", recipe))
    assert "output.dir: empty; name the run's directory" in line, line
