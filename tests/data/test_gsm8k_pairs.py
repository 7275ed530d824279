"""The GSM8K preference pairs of recipes/dpo-smollm2.yaml: a rejected side is a finished solution whose final
number is wrong; right and unfinished samples give no pair."""

from __future__ import annotations

import pytest

from peftcli.examples.pairs import build_pairs, final_number, is_wrong


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("She makes 9 * 2 = $18 a day.\n#### 18", 18.0),
        ("so 1,200 apples in all\n#### 1,200", 1200.0),
        ("#### -7, and later 9", -7.0),
        ("The answer is 4.5 hours, after 3 stops", 3.0),  # no '####': the last number
        ("no number at all", None),
    ],
)
def test_the_final_number_of_a_solution(text, number):
    assert final_number(text) == number


def test_pairs_keep_only_finished_wrong_samples():
    rows = [
        {"question": "q1", "answer": "2 + 2 = 4\n#### 4"},
        {"question": "q2", "answer": "3 * 3 = 9\n#### 9"},
        {"question": "q3", "answer": "10 - 1 = 9\n#### 9"},
        {"question": "q4", "answer": "#### 12"},
    ]
    samples = ["so it is 4", "it is 8 in all", None, "I cannot tell"]
    pairs, counts = build_pairs(rows, samples)
    assert counts == {"problems": 4, "right": 1, "unfinished": 1, "pairs": 2}
    assert pairs == [
        {"prompt": "q2", "chosen": "3 * 3 = 9\n#### 9", "rejected": "it is 8 in all"},
        {"prompt": "q4", "chosen": "#### 12", "rejected": "I cannot tell"},  # no number is no right answer
    ]
    assert is_wrong("#### 9.0", "#### 9") is False
