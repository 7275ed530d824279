"""data.train as a list of sources: exact counts, seeded order, each source rendered as its own, the per-source
validation share, labels of all sources, one-line errors, and the realised mix in summary.json."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from peftcli.data.mix import draw_rows, mix_counts
from peftcli.data.prepare import prepare_data
from peftcli.errors import DataError, PeftCliError
from peftcli.examples.tiny import copy_task, write_jsonl
from peftcli.recipe.load import load_recipe, validate_recipe_dict

from support import make_recipe, write_recipe


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """Three sources of the copy task in different formats and column names (distinct rows in each)."""
    folder = tmp_path_factory.mktemp("mix")
    chat = [
        {"conversation": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
        for r in copy_task(30, seed=1)
    ]
    alpaca = [{"task": r["prompt"], "reply": r["completion"]} for r in copy_task(12, seed=2)]
    plain = copy_task(20, seed=3)
    return {
        "chat": {
            "path": str(write_jsonl(folder / "chat.jsonl", chat)),
            "format": "chat",
            "columns": {"messages": "conversation"},
        },
        "alpaca": {
            "path": str(write_jsonl(folder / "alpaca.jsonl", alpaca)),
            "format": "alpaca",
            "columns": {"instruction": "task", "output": "reply"},
            "prompt_style": "plain",
        },
        "plain": {"path": str(write_jsonl(folder / "plain.jsonl", plain)), "format": "prompt_completion"},
    }


def mixed_recipe(tmp_path: Path, model_dir: Path, train, validation=None, seed: int = 42, **data):
    raw = make_recipe(tmp_path, model_dir, Path(train[0]["path"] if isinstance(train, list) else train["path"]))
    raw["data"].update(train=train, validation=validation, max_length=256, **data)
    raw["training"]["seed"] = seed
    return validate_recipe_dict(raw, "mix.yaml")


def examples(split) -> list[tuple]:
    return [(tuple(e["input_ids"]), tuple(e["labels"])) for e in split]


# the rule: how many examples each source gives


def test_weights_realise_exact_counts() -> None:
    keys = ["data.train[0]", "data.train[1]", "data.train[2]"]
    # the largest mix with the shares that repeats no row: the scarcest source (for its share) is used whole
    assert mix_counts([720, 90], [3, 1], [None, None], keys[:2]) == [270, 90]
    assert mix_counts([100, 100, 10], [0.5, 0.25, 0.25], [None] * 3, keys) == [20, 10, 10]
    assert mix_counts([4, 100], [1, 2], [None, None], keys[:2]) == [4, 8]
    # decimal weights are taken as written: 0.7 + 0.3 is one, although their binary floats do not add up to it
    assert mix_counts([70, 30], [0.7, 0.3], [None, None], keys[:2]) == [70, 30]
    assert mix_counts([7, 3], [0.7, 0.3], [None, None], keys[:2]) == [7, 3]
    # shares 2/7, 2/7, 3/7 of 23: quotas 6.57, 6.57, 9.86; the two left go to the largest remainders
    assert mix_counts([10, 10, 10], [1, 1, 1.5], [None] * 3, keys) == [7, 6, 10]
    # no weights: samples is the count (repeating a source when larger), no samples gives every row
    assert mix_counts([5, 8], [None, None], [12, None], keys[:2]) == [12, 8]


def test_a_weight_too_small_for_one_example_names_its_key() -> None:
    with pytest.raises(DataError, match=r"^data\.train\[0\]\.weight: .* gives this source none"):
        mix_counts([10, 1000], [1, 10000], [None, None], ["data.train[0]", "data.train[1]"])


def test_drawn_rows_repeat_evenly_and_follow_the_seed() -> None:
    rows = draw_rows(4, 10, seed=7, source=0)
    assert sorted(Counter(rows).values()) == [2, 2, 3, 3]
    assert all(a != b for a, b in zip(rows, rows[1:], strict=False))  # neighbours differ (kto pairs each with the next)
    assert draw_rows(100, 50, seed=7, source=0) == draw_rows(100, 50, seed=7, source=0)
    assert draw_rows(100, 50, seed=7, source=0) != draw_rows(100, 50, seed=8, source=0)
    assert draw_rows(100, 50, seed=7, source=0) != draw_rows(100, 50, seed=7, source=1)
    assert len(set(draw_rows(100, 50, seed=7, source=0))) == 50


# prepared data


def test_each_source_is_rendered_as_on_its_own(tmp_path: Path, tiny_model_dir: Path, sources, tokenizer) -> None:
    alone = {}
    for name in ("chat", "alpaca"):
        single = mixed_recipe(tmp_path, tiny_model_dir, sources[name])
        alone[name] = Counter(examples(prepare_data(single, tokenizer).train))
    assert not set(alone["chat"]) & set(alone["alpaca"])  # the formats render the copy task differently
    mixed = prepare_data(mixed_recipe(tmp_path, tiny_model_dir, [sources["chat"], sources["alpaca"]]), tokenizer)
    # no weights and no samples: every row of both, each example exactly as its own source renders it
    assert Counter(examples(mixed.train)) == alone["chat"] + alone["alpaca"]
    mix = mixed.stats["train"].mix
    assert [(row["source"], row["format"], row["examples"]) for row in mix] == [
        ("data.train[0]", "chat", 30),
        ("data.train[1]", "alpaca", 12),
    ]
    assert mix[0]["examples_share"] == pytest.approx(30 / 42)
    tokens = Counter()
    for ids, _ in examples(mixed.train):
        tokens["chat" if (ids, _) in alone["chat"] else "alpaca"] += len(ids)
    assert [row["tokens"] for row in mix] == [tokens["chat"], tokens["alpaca"]]
    assert sum(row["tokens_share"] for row in mix) == pytest.approx(1.0)


def test_weights_give_the_counts_and_the_seed_the_order(
    tmp_path: Path, tiny_model_dir: Path, sources, tokenizer
) -> None:
    train = [{**sources["chat"], "weight": 1}, {**sources["alpaca"], "weight": 2}, {**sources["plain"], "weight": 1}]
    first = prepare_data(mixed_recipe(tmp_path, tiny_model_dir, train), tokenizer)
    # shares 1/4, 1/2, 1/4 of min(30 * 4, 12 * 2, 20 * 4) = 24 examples
    assert [row["examples"] for row in first.stats["train"].mix] == [6, 12, 6]
    assert len(first.train) == 24
    again = prepare_data(mixed_recipe(tmp_path, tiny_model_dir, train), tokenizer)
    assert examples(again.train) == examples(first.train)
    other = prepare_data(mixed_recipe(tmp_path, tiny_model_dir, train, seed=43), tokenizer)
    assert examples(other.train) != examples(first.train)
    assert [row["examples"] for row in other.stats["train"].mix] == [6, 12, 6]
    by_shuffle_seed = prepare_data(mixed_recipe(tmp_path, tiny_model_dir, train, seed=43, shuffle_seed=42), tokenizer)
    assert examples(by_shuffle_seed.train) == examples(first.train)


def test_validation_is_held_out_of_each_source_before_repeating(
    tmp_path: Path, tiny_model_dir: Path, sources, tokenizer
) -> None:
    train = [{**sources["chat"], "samples": 10}, {**sources["alpaca"], "samples": 40}]
    prepared = prepare_data(mixed_recipe(tmp_path, tiny_model_dir, train, validation={"fraction": 0.25}), tokenizer)
    mix = prepared.stats["train"].mix
    # 30 and 12 rows: 8 and 3 held out; the alpaca source's 9 remaining rows give 40 examples, repeated
    assert [(row["rows"], row["validation_examples"], row["examples"]) for row in mix] == [(22, 8, 10), (9, 3, 40)]
    assert mix[1]["repeated"] and not mix[0]["repeated"]
    assert len(prepared.validation) == 11
    assert not set(examples(prepared.validation)) & set(examples(prepared.train))


def test_a_validation_source_of_its_own_beside_a_mix(tmp_path: Path, tiny_model_dir: Path, sources, tokenizer) -> None:
    train = [sources["chat"], {**sources["plain"], "samples": 5}]
    prepared = prepare_data(mixed_recipe(tmp_path, tiny_model_dir, train, validation=sources["alpaca"]), tokenizer)
    assert len(prepared.train) == 35 and len(prepared.validation) == 12
    assert [row["validation_examples"] for row in prepared.stats["train"].mix] == [0, 0]


def test_classification_labels_are_the_union_of_the_sources(tmp_path: Path, tiny_model_dir: Path, tokenizer) -> None:
    first = write_jsonl(
        tmp_path / "a.jsonl", [{"text": "alpha bravo", "label": "neg"}, {"text": "echo", "label": "pos"}]
    )
    second = write_jsonl(tmp_path / "b.jsonl", [{"review": "delta", "stars": "neu"}] * 3)
    raw = make_recipe(tmp_path, tiny_model_dir, first)
    raw["model"]["task"] = "seq_cls"
    raw["data"].update(
        validation=None,
        train=[
            {"path": str(first), "format": "classification"},
            {"path": str(second), "format": "classification", "columns": {"text": "review", "label": "stars"}},
        ],
    )
    prepared = prepare_data(validate_recipe_dict(raw, "mix.yaml"), tokenizer)
    assert prepared.label_names == ["neg", "neu", "pos"]
    assert prepared.stats["train"].label_counts == {"neg": 1, "neu": 3, "pos": 1}
    assert sorted(e["labels"] for e in prepared.train) == [0, 1, 1, 1, 2]


# errors


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda t: t[1].update(weight=1, samples=3), "data.train[1]: set weight or samples, not both"),
        (lambda t: t[0].update(weight=-1), "data.train[0].weight: input should be greater than 0"),
        (lambda t: t[0].update(samples=0), "data.train[0].samples: input should be greater than 0"),
        (lambda t: t[0].update(weight=2), "data.train[1].weight: data.train[0] has a weight but this entry has no"),
        (lambda t: (t[0].update(weight=2), t[1].update(samples=4)), "data.train[1].samples: data.train[0] has a"),
        (lambda t: t[1].update(wieght=2), "data.train[1].wieght: unknown key (did you mean 'weight'?)"),
        (lambda t: t[1].update(format="classification"), "data.train[1].format: model.task causal_lm reads"),
        (lambda t: t[1].update(columns={"promt": "x"}), "data.train[1]: columns: promt not a field of format"),
        (lambda t: t.clear(), "data.train: an empty list"),
    ],
)
def test_bad_mix_specs_are_one_line_naming_the_key(tmp_path: Path, tiny_model_dir: Path, sources, change, expected):
    train = [dict(sources["chat"]), dict(sources["plain"])]
    change(train)
    raw = make_recipe(tmp_path, tiny_model_dir, Path(sources["chat"]["path"]))
    raw["data"]["train"] = train
    path = write_recipe(tmp_path / "bad.yaml", raw)
    with pytest.raises(PeftCliError) as info:
        load_recipe(path)
    lines = info.value.lines()
    assert len(lines) == 1 and lines[0].startswith(f"{path}: {expected}"), lines


def test_overrides_name_an_entry_by_its_index(tmp_path: Path, tiny_model_dir: Path, sources) -> None:
    raw = make_recipe(tmp_path, tiny_model_dir, Path(sources["chat"]["path"]))
    raw["data"]["train"] = [{**sources["chat"], "weight": 1}, {**sources["plain"], "weight": 1}]
    path = write_recipe(tmp_path / "mix.yaml", raw)
    assert load_recipe(path, ["data.train.1.weight=3"]).data.train[1].weight == 3
    with pytest.raises(PeftCliError, match=r"data\.train is a list of 2 entries; name one by its index"):
        load_recipe(path, ["data.train.path=other.jsonl"])
    with pytest.raises(PeftCliError, match=r"no key 'wieght' under data\.train\.0 \(did you mean 'weight'\?\)"):
        load_recipe(path, ["data.train.0.wieght=3"])


def test_a_source_too_small_to_hold_out_from_names_it(tmp_path: Path, tiny_model_dir: Path, sources, tokenizer):
    one = write_jsonl(tmp_path / "one.jsonl", copy_task(1))
    train = [sources["plain"], {"path": str(one), "format": "prompt_completion"}]
    recipe = mixed_recipe(tmp_path, tiny_model_dir, train, validation={"fraction": 0.1})
    with pytest.raises(DataError, match=r"^data\.validation\.fraction: 0\.1 of the 1 examples of data\.train\[1\]"):
        prepare_data(recipe, tokenizer)


# the run


def test_a_mixed_run_writes_the_realised_mix(tmp_path: Path, tiny_model_dir: Path, sources) -> None:
    from peftcli.cli.progress import _mix_lines
    from peftcli.train.loop import train as run_training

    train = [{**sources["chat"], "weight": 1}, {**sources["plain"], "weight": 1}]
    recipe = mixed_recipe(tmp_path, tiny_model_dir, train, validation={"fraction": 0.1})
    recipe.training.max_steps = 2
    summary = run_training(recipe)
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["data"] == summary["data"]
    mix = written["data"]["mix"]
    # 27 and 18 rows after the held-out tenth: shares of 1/2 each of 36 examples
    assert [(row["source"], row["rows"], row["examples"], row["validation_examples"]) for row in mix] == [
        ("data.train[0]", 27, 18, 3),
        ("data.train[1]", 18, 18, 2),
    ]
    assert [row["examples_share"] for row in mix] == [0.5, 0.5]
    # the exported adapter's model card lists every source
    from peftcli.export.peft_format import model_card

    card = model_card(tmp_path / "run", "lora", {})
    assert f"- training data: `{sources['chat']['path']}` (format chat, weight 1)" in card
    assert f"- training data: `{sources['plain']['path']}` (format prompt_completion, weight 1)" in card
    # peft eval --data FILE on the run reads the file like its first source
    from peftcli.serve.score import DataChoice, eval_recipe

    evaluated = eval_recipe(tmp_path / "run", DataChoice(path=sources["chat"]["path"]), None)
    assert evaluated.data.train.format == "chat" and evaluated.data.train.columns == {"messages": "conversation"}
    # the lines `peft train` prints before the first step
    lines = _mix_lines(mix)
    assert lines[0] == "data mix (one epoch, after truncation and dropping):"
    assert lines[1].startswith(f"  data.train[0] {sources['chat']['path']} [chat]: 18 examples (50.0%), ")


def test_the_dry_run_plan_shows_a_row_per_source(tmp_path: Path, tiny_model_dir: Path, sources, capsys, monkeypatch):
    from peftcli.cli.progress import print_plan

    monkeypatch.setenv("COLUMNS", "200")
    train = [{**sources["chat"], "weight": 3}, {**sources["plain"], "weight": 1}]
    print_plan(mixed_recipe(tmp_path, tiny_model_dir, train, validation={"fraction": 0.1}), "new")
    out = capsys.readouterr().out
    assert f"data.train[0]  {sources['chat']['path']} [chat]; weight 3 (75.0% of the examples)" in out
    assert f"data.train[1]  {sources['plain']['path']} [prompt_completion]; weight 1 (25.0% of the examples)" in out
    assert "the largest mix with these shares that repeats no row, drawn and interleaved with seed 42" in out
    assert "10.0% held out of each training source (before mixing)" in out


def test_a_mixed_run_answers_in_its_first_sources_prompt_style(tokenizer, sources) -> None:
    from types import SimpleNamespace

    from peftcli.serve.generate import prompt_style

    recipe = {"data": {"train": [{**sources["alpaca"], "weight": 1}, {**sources["chat"], "weight": 1}]}}
    style = prompt_style(SimpleNamespace(recipe=recipe, tokenizer=tokenizer, task="causal_lm"))
    assert (style.chat, style.alpaca) == (False, True)  # the first source: alpaca in plain style


def test_a_preference_mix_trains_the_same_with_a_precomputed_reference(
    tmp_path: Path, tiny_model_dir: Path, one_torch_thread
) -> None:
    rows = copy_task(24, seed=5)
    pairs = [
        {"prompt": r["prompt"], "chosen": r["completion"], "rejected": rows[(i + 1) % 24]["completion"]}
        for i, r in enumerate(rows)
    ]
    first = write_jsonl(tmp_path / "pairs.jsonl", pairs[:14])
    second = write_jsonl(tmp_path / "renamed.jsonl", [{"q": p["prompt"], "good": p["chosen"], "bad": p["rejected"]}
                                                      for p in pairs[14:]])  # fmt: skip
    train = [
        {"path": str(first), "format": "preference", "weight": 1},
        {"path": str(second), "format": "preference", "columns": {"prompt": "q", "chosen": "good", "rejected": "bad"},
         "weight": 1},
    ]  # fmt: skip
    from peftcli.train.loop import train as run_training

    summaries, records = {}, {}
    for reference in ("live", "precomputed"):
        raw = make_recipe(
            tmp_path,
            tiny_model_dir,
            first,
            objective={"name": "dpo", "beta": 0.1, "reference": reference},
            data={"train": train, "validation": {"fraction": 0.25}, "max_length": 64},
            training={"max_steps": 3, "batch_size": 4, "learning_rate": 1e-2, "schedule": "constant"},
            output={"dir": str(tmp_path / reference)},
        )
        summaries[reference] = run_training(validate_recipe_dict(raw, f"{reference}.yaml"))
        lines = (tmp_path / reference / "metrics.jsonl").read_text().splitlines()
        records[reference] = [r for r in map(json.loads, lines) if r["type"] in ("train", "eval")]
    assert summaries["precomputed"]["reference"] == "precomputed"
    # 14 and 10 pairs, 4 and 2 held out: shares of 1/2 of min(10 * 2, 8 * 2) = 16
    assert [row["examples"] for row in summaries["precomputed"]["data"]["mix"]] == [8, 8]
    assert len(records["live"]) == len(records["precomputed"]) > 3
    for a, b in zip(records["live"], records["precomputed"], strict=True):  # each row found its own reference
        for key in ("loss", "eval_loss", "rewards/margin", "eval_rewards/margin"):
            if a.get(key) is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (key, a, b)
