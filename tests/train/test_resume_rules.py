"""Which recipe changes --resume accepts: by dotted key, and a key an earlier version did not write counts as
unchanged while the current value is its default."""

from __future__ import annotations

import pytest
import yaml

from peftcli.errors import OutputError
from peftcli.train.resume_rules import changed_keys, check_resume_changes

SAVED = {"model": {"name_or_path": "/m"}, "method": {"name": "lora", "r": 8}, "training": {"max_steps": 10}}


def test_a_key_written_only_by_a_newer_version_is_unchanged_at_its_default():
    newer = {**SAVED, "objective": {"name": "sft"}, "training": {"max_steps": 10, "compile": False}}
    assert changed_keys(SAVED, newer) == []
    assert changed_keys(SAVED, {**newer, "objective": {"name": "dpo"}}) == ["objective.name"]


def test_resume_refuses_shape_changes_by_name_and_allows_length(tmp_path):
    saved = tmp_path / "recipe.yaml"
    saved.write_text(yaml.safe_dump(SAVED))
    longer = {**SAVED, "training": {"max_steps": 20}}
    assert check_resume_changes(saved, longer) == ["training.max_steps"]
    with pytest.raises(OutputError, match=r"differs from the run's .*recipe.yaml in method.r, which the checkpoint"):
        check_resume_changes(saved, {**SAVED, "method": {"name": "lora", "r": 16}})
