"""A hub id where the hub cannot be reached: one clear line at once, not a minute of retries."""

from __future__ import annotations

import pytest

from peftcli.models.hub import is_hub_id

from support import run_cli, write_recipe


def test_what_reads_as_a_hub_id(tmp_path):
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") and is_hub_id("gpt2")
    assert not is_hub_id(str(tmp_path)) and not is_hub_id("models/x.gguf") and not is_hub_id("a/b/c")


@pytest.mark.parametrize("offline_env", [False, True])
def test_an_unreachable_hub_is_one_line_naming_the_model(offline_env, copy_data, tmp_path, monkeypatch):
    # An endpoint nobody listens on: the connection is refused at once, as on a machine without network.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    if offline_env:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    recipe = {
        "model": {"name_or_path": "someorg/some-model"},
        "method": {"name": "lora"},
        "data": {"train": {"path": str(copy_data), "format": "prompt_completion"}},
        "output": {"dir": str(tmp_path / "run")},
    }
    result = run_cli("train", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert result.returncode == 2, result.stderr
    why = "HF_HUB_OFFLINE is set" if offline_env else "the hub cannot be reached from this machine"
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        f"error: model.name_or_path: 'someorg/some-model' is not a local path, {why}, and it is not in the local "
        "Hugging Face cache; download it where there is network and point the recipe at that directory"
    )
    assert not (tmp_path / "run").exists()
