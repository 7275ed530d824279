"""model.quantization and training.optimizer: what a recipe may combine, each refusal one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftcli.errors import RecipeError
from peftcli.recipe.load import load_recipe

from support import make_recipe, run_cli, write_recipe


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "model"
    path.mkdir()
    return path


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n')
    return path


def _recipe(tmp_path, model_dir, data_file, quantization, method=None, **sections) -> Path:
    raw = make_recipe(tmp_path, model_dir, data_file, model={"quantization": quantization}, **sections)
    if method is not None:
        raw["method"] = method
    return write_recipe(tmp_path / "r.yaml", raw)


def _only_problem(path: Path) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    lines = info.value.lines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{path}: "), lines[0]
    return lines[0]


def test_valid_4_and_8_bit_sections_load_with_defaults(tmp_path, model_dir, data_file):
    recipe = load_recipe(_recipe(tmp_path, model_dir, data_file, {"bits": 4}))
    q = recipe.model.quantization
    assert (q.bits, q.quant_type, q.double_quant, q.compute_dtype) == (4, None, None, "auto")
    recipe = load_recipe(_recipe(tmp_path, model_dir, data_file, {"bits": 8, "outlier_threshold": 4.0}))
    assert recipe.model.quantization.outlier_threshold == 4.0


@pytest.mark.parametrize(
    ("quantization", "expected"),
    [
        ({"bits": 8, "quant_type": "nf4"}, "model.quantization: quant_type: 4-bit option, but bits is 8"),
        (
            {"bits": 8, "double_quant": True, "compute_dtype": "bf16"},
            "double_quant, compute_dtype: 4-bit options, but bits is 8",
        ),
        ({"bits": 4, "outlier_threshold": 6.0}, "outlier_threshold: an 8-bit option, but bits is 4"),
        ({"bits": 3}, "model.quantization.bits: expected one of 4 or 8, got 3"),
        ({"bits": 4, "quant_type": "int4"}, "quantization.quant_type: expected one of 'nf4' or 'fp4', got 'int4'"),
        ({"bits": 4, "group_size": 64}, "model.quantization.group_size"),
    ],
)
def test_options_must_fit_the_bit_width(tmp_path, model_dir, data_file, quantization, expected):
    assert expected in _only_problem(_recipe(tmp_path, model_dir, data_file, quantization))


@pytest.mark.parametrize("method", ["full", "freeze", "bitfit"])
def test_methods_that_train_base_weights_are_refused(tmp_path, model_dir, data_file, method):
    problem = _only_problem(_recipe(tmp_path, model_dir, data_file, {"bits": 4}, method={"name": method}))
    assert f"model.quantization: method {method} cannot train on a quantized base (it trains base weights" in problem
    assert "use one of" in problem and "lora" in problem


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_lora_inits_that_rewrite_the_base_are_refused(tmp_path, model_dir, data_file, init):
    method = {"name": "lora", "init": init}
    problem = _only_problem(_recipe(tmp_path, model_dir, data_file, {"bits": 4}, method=method))
    assert f"method.init: {init} rewrites the base weights" in problem


def test_a_gguf_base_cannot_be_requantized(tmp_path, data_file):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    problem = _only_problem(_recipe(tmp_path, gguf, data_file, {"bits": 4}))
    assert "model.quantization: a .gguf base is already quantized in its own format" in problem


def test_unknown_optimizer_lists_the_choices(tmp_path, model_dir, data_file):
    path = _recipe(tmp_path, model_dir, data_file, None, training={"optimizer": "adafactor"})
    problem = _only_problem(path)
    assert "training.optimizer" in problem and "adamw_8bit" in problem and "paged_adamw" in problem


def test_cli_refuses_before_loading_anything(tmp_path, model_dir, data_file):
    path = _recipe(tmp_path, model_dir, data_file, {"bits": 8, "quant_type": "nf4"})
    result = run_cli("train", str(path))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "quant_type: 4-bit option, but bits is 8" in errors[0]
    assert not (tmp_path / "run").exists()
