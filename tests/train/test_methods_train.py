"""Every registered method trains the tiny Llama from a recipe: the validation loss on the copy task goes down."""

from __future__ import annotations

import json

import pytest

from peftcli.recipe.load import load_recipe
from peftcli.train.loop import train
from peftcli.tuners.registry import all_tuners

from support import make_recipe, write_recipe

# Learning rates that suit each kind of method on the toy task: soft prompts and tiny vector methods need
# larger steps than low-rank matrices. Options keep the methods small for the tiny model.
METHOD_SETTINGS: dict[str, tuple[float, dict]] = {
    "lora": (3e-3, {"r": 4}),
    "adalora": (3e-2, {"init_r": 6, "target_r": 2, "tinit": 5, "tfinal": 5}),
    "bottleneck": (1e-2, {}),
    "ia3": (1e-1, {}),
    "ln_tuning": (3e-2, {}),
    "loha": (3e-2, {}),
    "lokr": (3e-2, {}),
    "vera": (1e-1, {"r": 16}),
    "oft": (3e-3, {}),
    "prompt_tuning": (3e-1, {"num_virtual_tokens": 16}),
    "prefix_tuning": (3e-1, {"num_virtual_tokens": 8}),
    "p_tuning": (3e-3, {"num_virtual_tokens": 20, "encoder_hidden_size": 256}),
    "full": (1e-3, {}),
    "freeze": (1e-3, {}),
}
SKIP_ON_LLAMA = {"bitfit": "the tiny Llama has no biases (tested on BERT in tests/tuners)"}


@pytest.mark.parametrize("name", sorted(all_tuners()))
def test_method_trains_from_a_recipe(name, tmp_path, tiny_model_dir, copy_data, one_torch_thread):
    if name in SKIP_ON_LLAMA:
        pytest.skip(SKIP_ON_LLAMA[name])
    lr, options = METHOD_SETTINGS.get(name, (3e-3, {}))
    recipe = make_recipe(
        tmp_path,
        tiny_model_dir,
        copy_data,
        training={"max_steps": 30, "batch_size": 8, "learning_rate": lr, "eval_at_start": True, "seed": 3},
    )
    recipe["method"] = {"name": name, **options}  # replace, not merge into, the default LoRA section
    recipe_file = write_recipe(tmp_path / "recipe.yaml", recipe)
    summary = train(load_recipe(recipe_file))
    before, after = summary["eval_before"]["eval_loss"], summary["eval_after"]["eval_loss"]
    assert after < 0.85 * before, f"{name}: validation loss {before:.3f} -> {after:.3f}"
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert saved["peft_type"] == all_tuners()[name].peft_type
