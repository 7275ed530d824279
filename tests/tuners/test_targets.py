"""Which modules a method adapts: the pure matching rules, and the errors find_targets gives on the tiny Llama."""

from __future__ import annotations

import pytest

from peftcli.errors import PeftCliError
from peftcli.models.heads import output_head_names
from peftcli.tuners.inject import find_targets
from peftcli.tuners.targets import name_matches, select_targets, short_names, unmatched_entries

LAYERS = [
    "model.embed_tokens",
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.xq_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.self_attn.v_proj",
    "model.layers.1.mlp.down_proj",
    "lm_head",
]


@pytest.mark.parametrize(
    ("name", "entry", "expected"),
    [
        ("model.layers.0.self_attn.q_proj", "q_proj", True),
        ("model.layers.0.self_attn.xq_proj", "q_proj", False),
        ("model.layers.0.self_attn.q_proj", "self_attn.q_proj", True),
        ("model.layers.0.self_attn.q_proj", "attn.q_proj", False),
        ("encoder.bar.0.query", "bar.0.query", True),
        ("encoder.foo_bar.0.query", "bar.0.query", False),
        ("foo_bar.0.query", "bar.0.query", False),
        ("bar.0.query", "bar.0.query", True),
        ("q_proj", "q_proj", True),
        ("model.layers.0.self_attn.q_proj", "proj", False),
        ("model.layers.0.self_attn.q_proj_extra", "q_proj", False),
    ],
)
def test_list_entry_matches_whole_dotted_suffix(name, entry, expected):
    assert name_matches(name, [entry]) is expected


def test_list_matches_if_any_entry_matches():
    assert name_matches("model.layers.0.mlp.down_proj", ["q_proj", "down_proj"])
    assert not name_matches("model.layers.0.mlp.up_proj", ["q_proj", "down_proj"])


@pytest.mark.parametrize(
    ("name", "regex", "expected"),
    [
        ("model.layers.0.self_attn.q_proj", r".*\.q_proj", True),
        # a string is a full match, not a search: neither a suffix nor a substring is enough
        ("model.layers.0.self_attn.q_proj", "q_proj", False),
        ("model.layers.0.self_attn.q_proj", r"self_attn", False),
        ("model.layers.0.self_attn.q_proj", r"model\.layers\.0", False),
        ("model.layers.0.self_attn.q_proj", r"model\.layers\.0\..*", True),
        ("model.layers.1.self_attn.q_proj", r"model\.layers\.0\..*", False),
        ("model.layers.0.self_attn.xq_proj", r".*\.(q_proj|v_proj)", False),
        ("model.layers.0.self_attn.v_proj", r".*\.(q_proj|v_proj)", True),
    ],
)
def test_string_is_a_full_regex(name, regex, expected):
    assert name_matches(name, regex) is expected


def test_select_targets_with_list_keeps_model_order():
    chosen = select_targets(LAYERS, ["v_proj", "q_proj"])
    assert chosen == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]


def test_select_targets_with_regex():
    assert select_targets(LAYERS, r"model\.layers\.1\..*_proj") == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
        "model.layers.1.mlp.down_proj",
    ]


def test_all_linear_leaves_out_output_head_only():
    chosen = select_targets(LAYERS, "all-linear", output_heads=["lm_head"])
    assert "lm_head" not in chosen
    assert chosen == [n for n in LAYERS if n != "lm_head"]


def test_all_linear_is_a_keyword_not_a_regex():
    # "all-linear" as a regex would match only the literal name "all-linear"
    assert len(select_targets(LAYERS, "all-linear")) == len(LAYERS)


@pytest.mark.parametrize(
    "exclude", [["down_proj", "layers.1.self_attn.q_proj"], r".*down_proj|model\.layers\.1\.self_attn\.q_proj"]
)
def test_exclude_wins(exclude):
    expected = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    assert select_targets(LAYERS, ["q_proj", "v_proj", "down_proj"], exclude=exclude) == expected
    assert select_targets(LAYERS, "all-linear", exclude=exclude, output_heads=["lm_head"]) == [
        "model.embed_tokens",
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.xq_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.v_proj",
    ]


def test_exclude_everything_leaves_nothing():
    assert select_targets(LAYERS, ["q_proj"], exclude=["q_proj"]) == []


def test_unmatched_entries_reports_typos_only():
    assert unmatched_entries(LAYERS, ["q_proj", "q_prj", "v_proj", "self_atn.v_proj"]) == ["q_prj", "self_atn.v_proj"]
    assert unmatched_entries(LAYERS, ["q_proj", "self_attn.v_proj"]) == []
    # a partial-component entry is a typo too
    assert unmatched_entries(LAYERS, ["proj"]) == ["proj"]
    # a regex is never checked entry by entry
    assert unmatched_entries(LAYERS, r"nothing.*") == []


def test_short_names():
    assert short_names(LAYERS[:4]) == ["embed_tokens", "q_proj", "v_proj", "xq_proj"]


# --- find_targets on the tiny Llama -------------------------------------------------------------------------------

LINEAR = ("Linear",)


@pytest.fixture
def model(load_base):
    return load_base()


def test_find_targets_list(model):
    chosen = find_targets(model, ["q_proj", "v_proj"], None, LINEAR, "lora")
    assert chosen == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]


def test_find_targets_all_linear_leaves_out_lm_head(model):
    assert output_head_names(model) == ["lm_head"]
    chosen = find_targets(model, "all-linear", None, LINEAR, "lora")
    assert "lm_head" not in chosen
    assert len(chosen) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    assert all(type(model.get_submodule(n)).__name__ == "Linear" for n in chosen)


def test_find_targets_lm_head_can_be_named_explicitly(model):
    assert find_targets(model, ["lm_head"], None, LINEAR, "lora") == ["lm_head"]


def test_list_matching_nothing_lists_candidates(model):
    with pytest.raises(PeftCliError) as err:
        find_targets(model, ["query", "value"], None, LINEAR, "lora")
    message = str(err.value)
    assert "query" in message and "value" in message
    for candidate in ("q_proj", "v_proj", "down_proj", "lm_head"):
        assert candidate in message


def test_typo_in_otherwise_matching_list_raises(model):
    with pytest.raises(PeftCliError, match="v_prj") as err:
        find_targets(model, ["q_proj", "v_prj"], None, LINEAR, "lora")
    blamed, _, candidates = str(err.value).partition("; candidates: ")
    assert blamed == "method.target_modules: v_prj matched nothing"  # only the typo is blamed
    assert "v_proj" in candidates.split(", ")  # and the right spelling is offered


@pytest.mark.parametrize("target", [["embed_tokens"], ["input_layernorm"], ["q_proj", "post_attention_layernorm"]])
def test_non_linear_module_is_refused(model, target):
    with pytest.raises(PeftCliError, match="not a layer lora can wrap") as err:
        find_targets(model, target, None, LINEAR, "lora")
    assert target[-1] in str(err.value)


def test_regex_matching_nothing_raises(model):
    with pytest.raises(PeftCliError, match="matched no Linear module") as err:
        find_targets(model, r".*\.query", None, LINEAR, "lora")
    assert "q_proj" in str(err.value)


def test_regex_matching_only_non_linear_raises(model):
    with pytest.raises(PeftCliError, match="matched no Linear module"):
        find_targets(model, r".*layernorm", None, LINEAR, "lora")


@pytest.mark.parametrize("exclude", [["self_attn.q_proj"], r".*self_attn.*"])
def test_exclude_that_removes_everything_raises(model, exclude):
    with pytest.raises(PeftCliError, match="exclude_modules"):
        find_targets(model, ["q_proj"], exclude, LINEAR, "lora")


def test_exclude_entry_is_a_whole_suffix_too(model):
    # "self_attn" is not a suffix of "...self_attn.q_proj", so it excludes nothing here
    assert len(find_targets(model, ["q_proj"], ["self_attn"], LINEAR, "lora")) == 2
