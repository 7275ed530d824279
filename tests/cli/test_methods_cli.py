"""`peft methods`: every registered method listed with its capabilities; one method's options in full."""

from __future__ import annotations

import re

from peftcli.cli.methods import trainable_share
from peftcli.tuners.registry import all_tuners

from support import run_cli


def test_methods_table_lists_every_registered_method_with_its_share():
    result = run_cli("methods")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    for name, spec in all_tuners().items():
        assert name in rows, f"{name} missing from the table"
        if spec.model_requirement:  # cannot apply to the reference Llama (BitFit: no biases)
            assert rows[name].rstrip().endswith("n/a")
            assert f"{name}: n/a, needs" in result.stdout
            continue
        share = re.search(r"(\d+\.\d+)%\s*$", rows[name])
        assert share, rows[name]
        _, fraction = trainable_share(name)
        assert abs(float(share.group(1)) - 100 * fraction) < 0.001
        assert ("yes" in rows[name]) == any(
            [spec.capabilities.mergeable, spec.capabilities.quantized_base, spec.capabilities.zero3_safe]
            + [spec.in_hf_peft]
        )


def test_trainable_share_of_lora_defaults_matches_the_arithmetic():
    # r=8 on all seven linear layers of 30 blocks: r * (in + out) each.
    hidden, inter, kv, layers, r = 576, 1536, 192, 30, 8
    per_block = r * (
        (hidden + hidden) * 2  # q, o
        + (hidden + kv) * 2  # k, v
        + (hidden + inter) * 2  # gate, up
        + (inter + hidden)  # down
    )
    count, fraction = trainable_share("lora")
    assert count == per_block * layers
    assert 0 < fraction < 0.05


def test_method_options_show_descriptions_and_defaults():
    result = run_cli("methods", "lora", "--no-share")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "lora:" in out and "adapter format HF PEFT LORA" in out
    for field in all_tuners()["lora"].params.model_fields:
        if field != "name":
            assert field in out
    assert "[lm_head]" in out  # rich markup must not eat bracketed text


def test_unknown_method_is_a_one_line_error_with_a_suggestion():
    result = run_cli("methods", "lorra")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown method 'lorra' (did you mean 'lora'?); `peft methods` lists them"


def test_methods_table_in_an_80_column_pipe_keeps_every_name_whole():
    import os
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "80"}  # what a CI log or `| less` reports
    result = subprocess.run(
        [sys.executable, "-m", "peftcli", "methods", "--no-share"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    first_words = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    assert set(all_tuners()) <= first_words
    assert "…" not in result.stdout
