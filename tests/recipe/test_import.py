"""`peft recipe import`: other tools' configs become recipes that validate, with every key accounted for."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from peftcli.examples.tiny import copy_task, write_jsonl
from peftcli.recipe.importers import import_config, render
from peftcli.recipe.load import load_recipe

FIXTURES = Path(__file__).parent / "import_fixtures"
CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
SHAREGPT = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
ALPACA = [{"instruction": "Add 2 and 3", "input": "", "output": "5"}, {"instruction": "Say hi", "output": "hi"}]


def write_data(root: Path) -> None:
    """The small data and DeepSpeed files the fixtures name, relative to their directory."""
    data = root / "data"
    write_jsonl(data / "alpaca.jsonl", ALPACA)
    # both column names: Axolotl's chat fixture reads `conversations`, TRL's `messages`
    write_jsonl(data / "chat.jsonl", [{"messages": CHAT, "conversations": CHAT}])
    write_jsonl(data / "sharegpt.jsonl", [{"conversations": SHAREGPT}])
    write_jsonl(data / "completion.jsonl", [{"content": "Once upon a time"}])
    write_jsonl(data / "pc.jsonl", copy_task(4))
    write_jsonl(data / "pc_eval.jsonl", copy_task(2, seed=1))
    (data / "identity.json").write_text(json.dumps(ALPACA), encoding="utf-8")
    (data / "alpaca_en_demo.json").write_text(json.dumps(ALPACA), encoding="utf-8")
    (data / "chat_openai.json").write_text(json.dumps([{"messages": CHAT}]), encoding="utf-8")
    (data / "glaive.json").write_text(json.dumps([{"conversations": SHAREGPT, "tools": "[]"}]), encoding="utf-8")
    info = {
        "identity": {"file_name": "identity.json"},
        "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
        "chat_openai": {
            "file_name": "chat_openai.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        },
        "glaive_toolcall_en_demo": {
            "file_name": "glaive.json",
            "formatting": "sharegpt",
            "columns": {"messages": "conversations", "tools": "tools"},
        },
        "alpaca_en": {"hf_hub_url": "llamafactory/alpaca_en"},
    }
    (data / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    for name, stage in (("deepspeed_configs/zero2.json", 2), ("examples/deepspeed/ds_z3_config.json", 3)):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        config = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": stage}}
        path.write_text(json.dumps(config), encoding="utf-8")


@pytest.fixture
def staged(tmp_path, monkeypatch):
    """Copy a fixture next to its data in a temporary directory, and work from another directory, so relative
    paths resolve against the config's own directory."""
    root = tmp_path / "configs"
    write_data(root)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    def stage(tool: str, name: str) -> Path:
        return Path(shutil.copy(FIXTURES / tool / name, root / name))

    return stage


def imported(staged, tool: str, name: str):
    """Import a fixture (tool detected), check the written recipe loads, and return the result and the recipe."""
    config = staged(tool, name)
    result = import_config(config)
    assert result.tool == tool
    out = config.with_name("out.yaml")
    out.write_text(render(result), encoding="utf-8")
    return result, load_recipe(out), {item.key: item.reason for item in result.unmapped}


def test_axolotl_llama3_qlora(staged):
    result, recipe, unmapped = imported(staged, "axolotl", "llama3-qlora.yml")
    quant = recipe.model.quantization
    assert (quant.bits, quant.quant_type, quant.double_quant) == (4, "nf4", True)
    assert recipe.model.attn_implementation == "flash_attention_2"
    method = recipe.method
    assert (method.name, method.r, method.alpha, method.dropout, method.target_modules) == (
        "lora",
        32,
        16,
        0.05,
        "all-linear",
    )
    first, hub = recipe.data.train
    assert first.path.endswith("configs/data/alpaca.jsonl") and Path(first.path).is_absolute()
    assert (first.format, hub.path) == ("alpaca", "teknium/GPT4-LLM-Cleaned")
    assert recipe.data.validation.fraction == 0.1
    assert (recipe.data.max_length, recipe.data.packing, recipe.data.mask_prompt) == (2048, True, True)
    training = recipe.training
    assert (training.epochs, training.batch_size, training.gradient_accumulation) == (1.0, 2, 4)
    assert (training.learning_rate, training.schedule, training.warmup_steps) == (2e-4, "cosine", 10)
    assert (training.optimizer, training.precision, training.activation_checkpointing) == (
        "paged_adamw_8bit",
        "auto",
        True,
    )
    assert recipe.output.dir == "./outputs/qlora-out"
    # defaults of Axolotl / HF made explicit
    assert (training.seed, training.max_grad_norm, recipe.data.group_by_length) == (42, 1.0, False)
    assert "hub dataset" in unmapped["datasets[1].path"] and "local" in unmapped["datasets[1].path"]
    for key in ("special_tokens", "evals_per_epoch", "saves_per_epoch", "lora_target_modules", "datasets[0].type"):
        assert key in unmapped
    assert unmapped["strict"].startswith("no effect in peftcli:")
    assert unmapped["model_type"].startswith("no effect in peftcli:")
    assert "empty" in unmapped["wandb_project"] and "empty" in unmapped["fp16"] and "empty" in unmapped["deepspeed"]


def test_axolotl_lora_on_chat_data(staged):
    result, recipe, unmapped = imported(staged, "axolotl", "lora-chat.yml")
    train = recipe.data.train  # the sharegpt (from/value) entry is left out, with the reason
    assert (train.format, train.columns) == ("chat", {"messages": "conversations"})
    assert "from" in unmapped["datasets[1].type"] and "convert" in unmapped["datasets[1].type"]
    assert "tokenizer's own chat template" in unmapped["chat_template"]
    method = recipe.method
    assert (method.r, method.alpha, method.dora) == (16, 32, True)
    assert method.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert method.modules_to_save == ["embed_tokens", "lm_head"]
    assert method.dropout == 0.0  # Axolotl's lora_dropout default, written out
    training = recipe.training
    assert (training.max_steps, training.epochs) == (500, None)
    assert "max_steps" in unmapped["num_epochs"]
    assert (training.schedule, training.optimizer, training.learning_rate) == ("linear", "adamw", 1e-4)
    assert (training.max_grad_norm, training.seed, training.precision) == (0.3, 314159, "bf16")
    assert training.warmup_ratio == 0.03 and "100" in unmapped["warmup_steps"]  # Axolotl's implicit warm-up
    assert (training.eval_every, training.save_every, training.keep_checkpoints) == (50, 100, 3)
    assert training.report_to == ["wandb"] and training.tracking.wandb.project == "chat-sft"
    assert training.tracking.run_name == "qwen-dora"
    assert recipe.model.attn_implementation == "sdpa"
    assert recipe.data.max_length == 4096 and training.batch_size == 4 and training.gradient_accumulation == 2
    assert "neftune_noise_alpha" in unmapped
    assert ("training.warmup_ratio", 0.03) in [(k, v) for k, v, _ in result.defaults]


def test_axolotl_deepspeed_completion(staged):
    _, recipe, unmapped = imported(staged, "axolotl", "deepspeed-lora.yml")
    assert (recipe.data.train.format, recipe.data.train.columns) == ("text", {"text": "content"})
    assert recipe.launch.preset == "zero2"
    assert "ZeRO stage 2" in unmapped["deepspeed"] and "approximated" in unmapped["deepspeed"]
    assert recipe.method.rslora is True
    assert recipe.training.schedule == "cosine" and "cosine_with_min_lr" in unmapped["lr_scheduler"]
    assert "cosine_min_lr_ratio" in unmapped
    training = recipe.training
    assert (training.precision, training.optimizer, training.warmup_ratio, training.weight_decay) == (
        "fp16",
        "adamw_8bit",
        0.05,
        0.01,
    )
    assert (training.epochs, training.batch_size, training.gradient_accumulation) == (3.0, 1, 1)
    assert unmapped["gradient_checkpointing_kwargs"].startswith("no effect in peftcli:")


def test_axolotl_fsdp_qlora(staged):
    _, recipe, unmapped = imported(staged, "axolotl", "fsdp-qlora.yml")
    assert recipe.launch.preset == "fsdp2"
    assert recipe.model.quantization.storage_dtype == "bf16" and recipe.training.precision == "bf16"
    assert "fsdp2" in unmapped["fsdp"] and "fsdp2" in unmapped["fsdp_config"]
    assert recipe.training.warmup_steps == 10 and recipe.data.packing is False
