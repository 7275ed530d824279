"""The learning-rate schedule: warm-up then constant, linear or cosine decay, set on every optimizer group
(LoRA+'s own groups included) and logged as applied."""

from __future__ import annotations

import math

import pytest
import torch

from peftcli.recipe.schema import TrainingSection
from peftcli.train.optim import LearningRateSchedule, build_optimizer


def _training(**options) -> TrainingSection:
    return TrainingSection(**{"learning_rate": 1e-3, "max_steps": 10, **options})


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # warm-up of 2 steps reaches the peak on step 2; then the shape runs over the remaining 8 steps
        ("constant", [1 / 3, 2 / 3, 1, 1, 1, 1, 1, 1, 1, 1]),
        ("linear", [1 / 3, 2 / 3, 1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8]),
        ("cosine", [1 / 3, 2 / 3] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]),
    ],
)
def test_the_factor_of_each_step(schedule, expected):
    plan = LearningRateSchedule(_training(schedule=schedule, warmup_steps=2), total_steps=10)
    assert [plan.factor(step) for step in range(10)] == pytest.approx(expected, abs=1e-12)


def test_warmup_ratio_rounds_up_and_never_exceeds_the_run():
    assert LearningRateSchedule(_training(warmup_ratio=0.15), total_steps=10).warmup == 2
    assert LearningRateSchedule(_training(warmup_steps=50), total_steps=10).warmup == 10


def test_every_group_gets_its_own_peak_times_the_factor_and_the_log_names_each_rate():
    """A LoRA+ run: B learns 16x faster than A; both rates move with the schedule, and both are logged."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 2, bias=False), torch.nn.Linear(2, 4, bias=False))
    a, b = model[0].weight, model[1].weight
    groups = [
        {"name": "lora_plus_A", "params": [a], "lr_scale": 1.0},
        {"name": "lora_plus_B", "params": [b], "lr_scale": 16.0},
    ]
    training = _training(schedule="linear", warmup_steps=0)
    optimizer = build_optimizer(model, training, groups)
    plan = LearningRateSchedule(training, total_steps=10)
    logged = plan.apply(optimizer, 5)
    rate_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert rate_of[id(a)] == pytest.approx(1e-3 * 0.5) and rate_of[id(b)] == pytest.approx(16e-3 * 0.5)
    assert logged == pytest.approx({"lr": 1e-3 * 0.5, "lr_lora_plus_B": 16e-3 * 0.5})
    assert plan.apply(optimizer, 0) == pytest.approx({"lr": 1e-3, "lr_lora_plus_B": 16e-3})


def test_a_run_logs_the_rates_it_applied(tmp_path, tiny_model_dir, copy_data):
    """The metrics of a LoRA+ run follow the schedule for both rates."""
    import json

    from peftcli.recipe.load import validate_recipe_dict
    from peftcli.train.loop import train

    from support import make_recipe

    recipe = make_recipe(
        tmp_path,
        tiny_model_dir,
        copy_data,
        method={"name": "lora", "r": 4, "alpha": 8, "loraplus_lr_ratio": 4.0},
        training={"max_steps": 4, "batch_size": 4, "learning_rate": 1e-3, "schedule": "linear", "warmup_steps": 1},
    )
    train(validate_recipe_dict(recipe, "test"))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r["type"] == "train"]
    factors = [0.5, 1.0, 2 / 3, 1 / 3]  # warm-up 1 of 4 steps, then linear over 3
    assert [r["lr"] for r in records] == pytest.approx([1e-3 * f for f in factors])
    assert [r["lr_lora_plus_B"] for r in records] == pytest.approx([4e-3 * f for f in factors])
