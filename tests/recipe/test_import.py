"""`peft recipe import`: other tools' configs become recipes that validate, with every key accounted for."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from peftcli.examples.tiny import copy_task, write_jsonl
from peftcli.recipe.importers import import_config, render
from peftcli.recipe.load import load_recipe

from support import run_cli

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
        "alpaca_en": {
            "hf_hub_url": "llamafactory/alpaca_en",
            "ms_hub_url": "llamafactory/alpaca_en",
            "num_samples": 100,
        },
    }
    (data / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    # ms-swift: alpaca rows, self-cognition query/response rows, OpenAI-style chats
    for name in ("alpaca_gpt4_zh.jsonl", "alpaca_gpt4_en.jsonl"):
        write_jsonl(data / name, ALPACA)
    write_jsonl(data / "self_cognition.jsonl", [{"query": "Who are you?", "response": "I am {{NAME}}."}])
    write_jsonl(data / "chat_openai.jsonl", [{"messages": CHAT}])
    write_jsonl(data / "chat_eval.jsonl", [{"messages": CHAT}])
    write_jsonl(data / "qa.jsonl", [{"system": "Be brief.", "query": "2+2?", "response": "4"}])
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
    # evals_per_epoch: Axolotl evaluates, and so also before the first step (eval_on_start)
    assert recipe.data.validation.fraction == 0.1 and recipe.training.eval_at_start is True
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
    assert training.keep_checkpoints == 4  # Axolotl's save_total_limit when unset
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
    assert training.eval_at_start is True  # eval_steps with validation data: Axolotl's eval_on_start


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
    assert "every epoch" in unmapped["save_steps"]  # no save setting: Axolotl checkpoints each epoch


@pytest.mark.parametrize(
    "extra, quantized, noted",
    [
        ("adapter: qlora\nload_in_4bit: true\n", 4, None),
        ("adapter: lora\nload_in_4bit: true\n", None, "load_in_4bit"),  # 4-bit only with qlora
        ("adapter: lora\nload_in_8bit: true\n", 8, None),
    ],
)
def test_axolotl_quantizes_as_its_model_loader_does(tmp_path, extra, quantized, noted):
    data = write_jsonl(tmp_path / "pc.jsonl", copy_task(2))
    config = tmp_path / "config.yml"
    config.write_text(
        f"base_model: m\n{extra}learning_rate: 0.001\nlora_target_linear: true\n"
        f"datasets:\n  - path: {data}\n    type: completion\n",
        encoding="utf-8",
    )
    result = import_config(config)
    quant = result.recipe["model"].get("quantization")
    assert (quant or {}).get("bits") == quantized
    unmapped = {item.key: item.reason for item in result.unmapped}
    if noted:
        assert "only with adapter qlora" in unmapped[noted]
    # lora_r and lora_alpha unset: Axolotl hands None to HF PEFT; the recipe states peftcli's values
    assert (result.recipe["method"]["r"], result.recipe["method"]["alpha"]) == (8, 16)
    assert "refuses" in unmapped["lora_r"] and "refuses" in unmapped["lora_alpha"]


def test_axolotl_fsdp_qlora(staged):
    _, recipe, unmapped = imported(staged, "axolotl", "fsdp-qlora.yml")
    assert recipe.launch.preset == "fsdp2"
    assert recipe.model.quantization.storage_dtype == "bf16" and recipe.training.precision == "bf16"
    assert "fsdp2" in unmapped["fsdp"] and "fsdp2" in unmapped["fsdp_config"]
    assert recipe.training.warmup_steps == 10 and recipe.data.packing is False


def test_llama_factory_lora_sft(staged):
    result, recipe, unmapped = imported(staged, "llama-factory", "llama3_lora_sft.yaml")
    identity, demo = recipe.data.train
    assert identity.path.endswith("data/identity.json") and demo.path.endswith("data/alpaca_en_demo.json")
    assert identity.format == demo.format == "alpaca" and identity.max_samples == 1000
    method = recipe.method
    assert (method.r, method.alpha, method.dropout, method.target_modules) == (8, 16, 0.0, "all-linear")
    assert recipe.model.trust_remote_code is True
    assert (recipe.data.max_length, recipe.data.mask_prompt, recipe.data.packing) == (2048, True, False)
    assert recipe.data.validation.fraction == 0.1
    training = recipe.training
    assert (training.batch_size, training.gradient_accumulation, training.learning_rate) == (1, 8, 1e-4)
    assert (training.epochs, training.schedule, training.warmup_ratio, training.precision) == (
        3.0,
        "cosine",
        0.1,
        "bf16",
    )
    assert (training.eval_every, training.save_every, training.log_every) == (500, 500, 10)
    assert training.eval_at_start is False  # HF's eval_on_start default
    assert training.activation_checkpointing is True  # LLaMA-Factory checkpoints unless disabled
    assert recipe.output.dir == "saves/llama3-8b/lora/sft"
    assert "tokenizer's own chat template" in unmapped["template"]
    for key in ("overwrite_cache", "plot_loss", "overwrite_output_dir", "ddp_timeout", "do_train"):
        assert unmapped[key].startswith("no effect in peftcli:"), key
    assert "empty" in unmapped["resume_from_checkpoint"]
    assert ("method.alpha", 16) in [(k, v) for k, v, _ in result.defaults]


def test_llama_factory_qlora_datasets(staged):
    result, recipe, unmapped = imported(staged, "llama-factory", "llama3_qlora_sft.yaml")
    quant = recipe.model.quantization
    assert (quant.bits, quant.quant_type, quant.double_quant) == (4, "nf4", False)
    chat, hub = recipe.data.train  # chat_openai, then alpaca_en from the hub; glaive (from/value) left out
    assert (chat.format, chat.columns) == ("chat", {})
    assert (hub.path, hub.format) == ("llamafactory/alpaca_en", "alpaca")
    assert "hub dataset" in unmapped["dataset[2]"]
    assert "ms_hub_url, num_samples" in unmapped["dataset[2] (dataset_info)"]
    assert "from" in unmapped["dataset[1]"] and "convert" in unmapped["dataset[1]"]
    assert (recipe.method.r, recipe.method.alpha, recipe.method.target_modules) == (8, 16, ["q_proj", "v_proj"])
    assert recipe.data.mask_prompt is False  # train_on_prompt: true
    assert recipe.model.attn_implementation == "flash_attention_2"
    assert recipe.training.precision == "fp32"  # HF's default: neither bf16 nor fp16
    assert recipe.training.save_every == 500  # HF saves every 500 steps unless told otherwise
    assert ("training.precision", "fp32") in [(k, v) for k, v, _ in result.defaults]


def test_llama_factory_deepspeed_eval_dataset(staged):
    _, recipe, unmapped = imported(staged, "llama-factory", "llama3_lora_sft_ds3.yaml")
    assert recipe.launch.preset == "zero3" and "ZeRO stage 3" in unmapped["deepspeed"]
    assert recipe.data.validation.path.endswith("alpaca_en_demo.json")
    assert recipe.data.packing is True and recipe.data.max_length == 1024
    method = recipe.method
    assert (method.r, method.alpha, method.dropout, method.dora) == (16, 16, 0.05, False)
    assert method.modules_to_save == ["embed_tokens"]
    training = recipe.training
    assert (training.max_steps, training.schedule, training.warmup_steps, training.precision) == (
        300,
        "constant",
        20,
        "fp16",
    )
    assert (training.eval_every, training.save_every, training.keep_checkpoints) == (50, 200, 2)
    assert training.report_to == ["wandb"] and training.tracking.run_name == "llama3-ds3"


def test_refused_launch_preset_is_left_out_and_listed(staged):
    config = staged("llama-factory", "llama3_lora_sft_ds3.yaml")
    config.write_text(config.read_text(encoding="utf-8") + "use_dora: true\n", encoding="utf-8")
    result = import_config(config)
    assert "launch" not in result.recipe and result.recipe["method"]["dora"] is True
    reason = {item.key: item.reason for item in result.unmapped}["deepspeed"]
    assert reason.startswith("left out: launch.preset zero3 is refused") and "DoRA" in reason


@pytest.mark.parametrize("schedule_key, extra", [("lr_scheduler", ""), ("lr_scheduler_type", "use_peft: true\n")])
def test_constant_schedule_has_no_warmup(tmp_path, schedule_key, extra):
    data = write_jsonl(tmp_path / "pc.jsonl", copy_task(2))
    config = tmp_path / "config.yaml"
    if schedule_key == "lr_scheduler":  # Axolotl: also its implicit warm-up goes
        text = f"base_model: m\nadapter: lora\ndatasets:\n  - path: {data}\n    type: completion\n"
    else:
        text = f"model_name_or_path: m\ndataset_name: {data}\nwarmup_steps: 10\n{extra}"
    config.write_text(text + f"{schedule_key}: constant\n", encoding="utf-8")
    result = import_config(config)
    training = result.recipe["training"]
    assert training["schedule"] == "constant" and "warmup_steps" not in training and "warmup_ratio" not in training
    reasons = [item.reason for item in result.unmapped if item.key == "warmup_steps"]
    assert len(reasons) == 1 and "ignores warm-up" in reasons[0]


def test_trl_sft_lora(staged):
    result, recipe, unmapped = imported(staged, "hf", "trl_sft_lora.yaml")
    assert (recipe.data.train.format, recipe.data.train.columns) == ("chat", {})
    method = recipe.method
    assert (method.r, method.alpha, method.dropout, method.target_modules) == (32, 16, 0.05, "all-linear")
    quant = recipe.model.quantization
    assert (quant.bits, quant.double_quant) == (4, False)  # TRL ModelConfig: no nested quantization by default
    assert (recipe.model.dtype, recipe.model.attn_implementation) == ("bf16", "sdpa")
    assert (recipe.data.packing, recipe.data.max_length) == (True, 2048)
    assert recipe.data.mask_prompt is False  # TRL trains on whole conversations unless assistant_only_loss
    training = recipe.training
    assert (training.learning_rate, training.schedule, training.warmup_ratio, training.epochs) == (
        2e-4,
        "cosine",
        0.03,
        1.0,
    )
    assert (training.batch_size, training.gradient_accumulation, training.log_every) == (2, 8, 25)
    assert training.precision == "bf16"  # TRL's default when fp16 is not set
    assert "eos_token" in unmapped
    assert ("data.mask_prompt", False) in [(k, v) for k, v, _ in result.defaults]


def test_trl_full_on_hub_dataset(staged):
    _, recipe, unmapped = imported(staged, "hf", "trl_sft_full.yaml")
    assert recipe.method.name == "full"
    assert recipe.data.train.path == "trl-lib/Capybara" and "hub dataset" in unmapped["dataset_name"]
    assert "format could not be read" in unmapped["dataset_name (format)"]
    assert recipe.data.mask_prompt is True  # assistant_only_loss: true
    assert (recipe.training.learning_rate, recipe.data.max_length) == (2e-5, 1024)  # TRL SFTConfig defaults
    assert recipe.training.activation_checkpointing is True
    assert (recipe.training.seed, recipe.training.epochs) == (7, 2.0)
    assert unmapped["push_to_hub"].startswith("no effect in peftcli:")


def test_trainer_arguments_json(staged):
    result, recipe, unmapped = imported(staged, "hf", "trainer_args.json")
    assert recipe.method.name == "full"  # no use_peft: the Trainer trains every weight
    assert recipe.data.train.format == "prompt_completion"
    assert recipe.data.validation.path.endswith("pc_eval.jsonl")
    training = recipe.training
    assert (training.epochs, training.batch_size, training.learning_rate) == (3.0, 16, 3e-5)  # epochs: HF default
    assert (training.weight_decay, training.betas, training.warmup_steps) == (0.1, (0.9, 0.95), 100)
    assert training.schedule == "cosine" and "cosine_with_restarts" in unmapped["lr_scheduler_type"]
    assert (training.eval_every, training.save_every, training.keep_checkpoints) == (200, 500, 5)
    assert (training.seed, training.precision, training.report_to) == (1234, "fp16", ["tensorboard"])
    assert "clearml" in unmapped["report_to"] and unmapped["adam_epsilon"].startswith("no effect in peftcli:")
    assert recipe.launch.preset == "zero3_offload" and "name" in unmapped["deepspeed"]
    assert recipe.data.group_by_length is True and training.activation_checkpointing is False
    assert recipe.data.mask_prompt is False  # the plain HF Trainer's loss covers every token
    assert unmapped["logging_dir"].startswith("no effect in peftcli:")
    assert ("training.epochs", 3.0) in [(k, v) for k, v, _ in result.defaults]


def defaults_of(result) -> dict:
    """The source defaults an import wrote out, by recipe key."""
    return {key: value for key, value, _ in result.defaults}


# --- ms-swift ------------------------------------------------------------------------------------------------------


def test_ms_swift_lora_sft(staged):
    result, recipe, unmapped = imported(staged, "ms-swift", "lora_sft.yaml")
    assert set(unmapped) == {
        "model",  # a ModelScope id
        "model (remote code)",
        "dataset[0] (format)",  # alpaca rows: instruction and input joined differently
        "dataset[1] (format)",
        "truncation_strategy",  # unset: ms-swift drops long rows
        "model_name",
        "model_author",
        "per_device_eval_batch_size",
        "dataloader_num_workers",
        "dataset_num_proc",
        "add_version",
    }
    zh, en, cognition = recipe.data.train  # each #500 is a seeded sample of 500 rows, as ms-swift samples
    assert (zh.format, en.format, zh.samples, cognition.samples) == ("alpaca", "alpaca", 500, 500)
    assert (cognition.format, cognition.columns) == ("prompt_completion", {"prompt": "query", "completion": "response"})
    assert {source.system_prompt for source in recipe.data.train} == {"You are a helpful assistant."}
    assert recipe.data.validation.fraction == 0.01 and recipe.data.max_length == 2048
    method = recipe.method
    assert (method.r, method.alpha, method.dropout, method.target_modules) == (8, 32, 0.05, "all-linear")
    training = recipe.training
    assert (training.epochs, training.batch_size, training.gradient_accumulation) == (1.0, 1, 16)
    assert (training.learning_rate, training.warmup_ratio, training.log_every) == (1e-4, 0.05, 5)
    assert (training.eval_every, training.save_every, training.keep_checkpoints) == (50, 50, 2)
    assert recipe.model.dtype == "bf16" and recipe.output.dir == "output"
    # ms-swift's own defaults, stated: cosine, weight decay 0.1, AdamW beta2 0.95, activation checkpointing,
    # bf16 mixed precision for a bf16 model, every assistant turn trained
    assert defaults_of(result) == {
        "method.dropout": 0.05,
        "data.packing": False,
        "data.mask_prompt": True,
        "data.group_by_length": False,
        "training.schedule": "cosine",
        "training.weight_decay": 0.1,
        "training.max_grad_norm": 1.0,
        "training.seed": 42,
        "training.betas": [0.9, 0.95],
        "training.precision": "bf16",
        "training.activation_checkpointing": True,
        "training.eval_at_start": False,
    }
    assert (training.schedule, training.weight_decay, training.betas) == ("cosine", 0.1, (0.9, 0.95))
    assert (training.precision, training.activation_checkpointing, recipe.data.mask_prompt) == ("bf16", True, True)


def test_ms_swift_3x_qlora(staged):
    result, recipe, unmapped = imported(staged, "ms-swift", "qlora_bnb.yaml")
    assert set(unmapped) == {
        "model",
        "model (remote code)",
        "dataset[1]",  # its system column
        "loss_scale",  # last_round
        "gradient_accumulation_steps",  # ms-swift's default depends on the number of processes
        "add_version",
        "save_total_limit",  # the HF Trainer keeps every checkpoint
    }
    quant = recipe.model.quantization
    assert (quant.bits, quant.quant_type, quant.double_quant, quant.compute_dtype) == (4, "nf4", True, "bf16")
    assert recipe.model.attn_implementation == "flash_attention_2"
    chat, qa = recipe.data.train
    assert (chat.format, qa.format) == ("chat", "prompt_completion")
    assert recipe.data.validation.path.endswith("chat_eval.jsonl") and recipe.data.validation.format == "chat"
    assert (recipe.data.packing, recipe.data.max_length, recipe.data.mask_prompt) == (True, 4096, True)
    method = recipe.method
    assert (method.r, method.alpha, method.dropout, method.rslora) == (16, 32, 0.1, True)
    training = recipe.training
    assert (training.batch_size, training.gradient_accumulation, training.epochs) == (4, 4, 2.0)  # ceil(16 / 4)
    assert training.report_to == ["wandb"] and training.tracking.run_name == "qwen-qlora"
    assert (training.eval_every, training.save_every) == (500, 500)  # evaluation follows saving
    defaults = defaults_of(result)
    assert defaults["training.learning_rate"] == 1e-4  # ms-swift's rate for LoRA
    assert defaults["method.alpha"] == 32 and defaults["output.dir"] == "output/Qwen2.5-1.5B-Instruct"
    assert defaults["training.gradient_accumulation"] == 4


def test_ms_swift_full_deepspeed(staged):
    result, recipe, unmapped = imported(staged, "ms-swift", "deepspeed_zero3.yaml")
    assert set(unmapped) == {
        "model",
        "model (remote code)",
        "dataset[0]",  # from/value chats: left out, convert them
        "dataset[1] (format)",
        "truncation_strategy",
        "template",
        "deepspeed",
        "gradient_checkpointing_kwargs",
        "use_liger_kernel",
        "save_total_limit",
    }
    assert "convert the file" in unmapped["dataset[0]"]
    assert "ms-swift's built-in zero3" in unmapped["deepspeed"] and recipe.launch.preset == "zero3"
    assert recipe.method.name == "full" and recipe.data.train.format == "alpaca"
    training = recipe.training
    assert (training.max_steps, training.schedule, training.learning_rate, training.seed) == (
        1000,
        "linear",
        1e-5,
        1234,
    )
    assert defaults_of(result)["training.learning_rate"] == 1e-5  # ms-swift's rate for full training


def test_ms_swift_hub_datasets_keep_their_sample_counts(tmp_path):
    config = tmp_path / "swift.yaml"
    config.write_text(
        "model: Qwen/Qwen2.5-0.5B-Instruct\ndataset:\n  - AI-ModelScope/alpaca-gpt4-data-en#500\n"
        "  - hf::tatsu-lab/alpaca\n  - swift/self-cognition:default\ndeepspeed: zero2_offload\n",
        encoding="utf-8",
    )
    result = import_config(config)
    assert result.tool == "ms-swift"
    modelscope, hub, cognition = result.recipe["data"]["train"]
    assert (modelscope["path"], modelscope["samples"]) == ("AI-ModelScope/alpaca-gpt4-data-en", 500)
    assert (hub["path"], cognition["path"], "subset" in cognition) == (
        "tatsu-lab/alpaca",
        "swift/self-cognition",
        False,
    )
    unmapped = {item.key: item.reason for item in result.unmapped}
    assert "on ModelScope" in unmapped["dataset[0]"] and "ModelScope" not in unmapped["dataset[1]"]
    assert result.recipe["launch"] == {"preset": "zero2"} and "offload" in unmapped["deepspeed"]


# --- Oumi ----------------------------------------------------------------------------------------------------------


def test_oumi_lora(staged):
    result, recipe, unmapped = imported(staged, "oumi", "llama3_1_8b_lora.yaml")
    assert set(unmapped) == {
        "model.load_pretrained_weights",
        "model.enable_liger_kernel",
        "training.gradient_checkpointing_kwargs",
        "training.include_performance_metrics",
        "training.dataloader_num_workers",
        "training.dataloader_prefetch_factor",
        "training.ddp_find_unused_parameters",
        "training.empty_device_cache_steps",
        "training.save_steps",  # Oumi keeps every checkpoint
    }
    assert (recipe.data.train.format, recipe.data.validation.format) == ("alpaca", "chat")
    method = recipe.method
    assert (method.r, method.alpha, method.dropout, method.target_modules) == (8, 16, 0.0, ["q_proj", "v_proj"])
    assert (recipe.model.dtype, recipe.model.attn_implementation, recipe.model.trust_remote_code) == (
        "bf16",
        "sdpa",
        True,
    )
    training = recipe.training
    assert (training.batch_size, training.gradient_accumulation, training.learning_rate) == (2, 32, 3e-4)
    assert (training.schedule, training.warmup_steps, training.weight_decay) == ("cosine", 100, 0.01)
    assert (training.eval_every, training.save_every, training.log_every) == (25, 50, 100)
    assert training.report_to == ["wandb"] and recipe.data.max_length == 8192
    assert defaults_of(result) == {
        "method.dropout": 0.0,
        "data.mask_prompt": False,  # Oumi's loss covers every token without the completions collator
        "data.packing": False,
        "training.seed": 42,
        "training.max_grad_norm": 1.0,
        "training.precision": "fp32",  # mixed_precision_dtype none: no autocast
        "training.eval_at_start": False,
    }


def test_oumi_qlora_fsdp_mix(staged):
    result, recipe, unmapped = imported(staged, "oumi", "llama3_2_3b_qlora_fsdp.yaml")
    assert set(unmapped) == {
        "model.chat_template",  # a named Oumi template
        "data.train.datasets[0].sample_count",  # shuffled before sampling
        "data.train.datasets[1].dataset_name",  # Oumi's Alpaca prompt; a hub dataset
        "data.train.seed",
        "training.save_steps",
        "fsdp.enable_fsdp",
    }
    chat, alpaca = recipe.data.train
    assert (chat.format, chat.weight, chat.max_samples) == ("chat", 0.7, 1000)
    assert (alpaca.path, alpaca.format, alpaca.weight) == ("yahma/alpaca-cleaned", "alpaca", 0.3)
    assert recipe.data.mask_prompt is True  # text_completions_only_with_padding, all assistant turns
    quant = recipe.model.quantization
    assert (quant.bits, quant.quant_type, quant.double_quant, quant.compute_dtype, quant.storage_dtype) == (
        4,
        "nf4",
        False,
        "bf16",
        "bf16",
    )
    assert recipe.launch.preset == "fsdp2"
    method = recipe.method
    assert (method.r, method.alpha, method.dropout, len(method.target_modules)) == (64, 128, 0.05, 6)
    training = recipe.training
    assert (training.max_steps, training.batch_size, training.activation_checkpointing) == (2000, 16, True)
    assert training.report_to == ["tensorboard"] and training.tracking.run_name == "llama3b-qlora-fsdp"
    defaults = defaults_of(result)
    assert defaults["data.max_length"] == 1024  # TRL's max_length: no model_max_length
    assert defaults["model.quantization.double_quant"] is False and defaults["training.gradient_accumulation"] == 1


def test_oumi_full_deepspeed(staged):
    result, recipe, unmapped = imported(staged, "oumi", "qwen3_full_deepspeed.yaml")
    assert set(unmapped) == {
        "data.train.datasets[1].dataset_name",  # fineweb-edu: not an SFT dataset class, left out
        "training.lr_scheduler_type",  # cosine_with_min_lr
        "training.lr_scheduler_kwargs",
        "training.save_epoch",
        "training.save_final_model",
        "deepspeed.enable_deepspeed",
        "deepspeed.precision",
    }
    assert recipe.method.name == "full" and recipe.data.train.format == "alpaca"
    assert recipe.data.max_length == 4096  # ${model.model_max_length}, resolved
    assert (
        recipe.launch.preset == "zero3_offload"
        and "offload_optimizer and offload_param" in unmapped["deepspeed.enable_deepspeed"]
    )
    training = recipe.training
    assert (training.precision, training.max_grad_norm, training.schedule) == ("bf16", None, "cosine")
    assert (training.epochs, training.learning_rate, training.save_every) == (2.0, 5e-6, None)
    assert defaults_of(result) == {
        "data.mask_prompt": False,
        "data.packing": False,
        "training.seed": 42,
        "training.weight_decay": 0.0,
    }


@pytest.mark.parametrize(
    "name, text, expected",
    [
        (
            "swift.yaml",
            "model: Qwen/Qwen2.5-0.5B\ntuner_type: lora\ndataset: [data/odd.jsonl]\n",
            "dataset[0]: data/odd.jsonl: no dataset format fits its columns (bar, foo)",
        ),
        ("swift.yaml", "model: Qwen/Qwen2.5-0.5B\ntuner_type: vera\ndataset: [data/odd.jsonl]\n", "tuner_type vera"),
        ("swift.yaml", "model: Qwen/Qwen2.5-0.5B\nrlhf_type: dpo\ndataset: [x]\n", "rlhf_type dpo"),
        (
            "oumi.yaml",
            "model: {model_name: m}\ntraining: {trainer_type: TRL_DPO}\n",
            "training.trainer_type TRL_DPO: only supervised fine-tuning",
        ),
        (
            "oumi.yaml",
            "model: {model_name: m}\ntraining: {use_peft: true}\npeft: prefix_tuning\n",
            "peft: a section (mapping) of LoRA settings",
        ),
        (
            "oumi.yaml",
            "model: {model_name: m}\ndata: {train: {datasets: [{dataset_name: text_sft, "
            "dataset_path: data/odd.jsonl}]}}\ntraining: {trainer_type: TRL_SFT}\n",
            "data/odd.jsonl: unknown dataset format (columns bar, foo)",
        ),
        (
            "oumi.yaml",
            "model: {model_name: m, torch_dtype_str: bfloat16}\ntraining: {mixed_precision_dtype: BF16}\n",
            "needs model.torch_dtype_str float32",
        ),
    ],
)
def test_bad_ms_swift_and_oumi_configs_exit_2_with_one_line(tmp_path, name, text, expected):
    write_jsonl(tmp_path / "data" / "odd.jsonl", [{"foo": 1, "bar": 2}])
    config = tmp_path / name
    config.write_text(text, encoding="utf-8")
    proc = run_cli("recipe", "import", str(config))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert str(config) in lines[0] and expected in lines[0], lines[0]


def test_detection_tells_ms_swift_and_oumi_from_the_flat_tools(tmp_path):
    data = write_jsonl(tmp_path / "pc.jsonl", copy_task(2))
    cases = {
        # ms-swift shares lora_rank and template with LLaMA-Factory and the HF keys with TRL; `model` is its own
        "ms-swift": f"model: m\nlora_rank: 8\ntemplate: qwen\nper_device_train_batch_size: 2\ndataset: [{data}]\n",
        "oumi": f"model: {{model_name: m}}\ndata: {{train: {{datasets: [{{dataset_name: text_sft, dataset_path: "
        f"{tmp_path / 'chat.jsonl'}}}]}}}}\ntraining: {{output_dir: out, learning_rate: 0.001}}\n",
        "hf": f"model_name_or_path: m\ndataset_name: {data}\nper_device_train_batch_size: 2\nlora_r: 8\n",
    }
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    for tool, text in cases.items():
        config = tmp_path / f"{tool}.yaml"
        config.write_text(text, encoding="utf-8")
        assert import_config(config).tool == tool


# --- through the command line ------------------------------------------------------------------------------------


def test_cli_prints_unmapped_keys_and_writes_them_as_comments(staged, tmp_path):
    config = staged("axolotl", "llama3-qlora.yml")
    proc = run_cli("recipe", "import", str(config))
    assert proc.returncode == 0, proc.stderr
    out = config.with_name("llama3-qlora.peftcli.yaml")
    assert f"wrote {out}" in proc.stdout
    assert "special_tokens: peftcli uses the tokenizer's own special tokens" in proc.stdout
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# Imported by `peft recipe import` from axolotl config")
    assert "#   special_tokens: peftcli uses" in text
    assert run_cli("recipe", "validate", str(out)).returncode == 0


def test_cli_refuses_to_overwrite(staged, tmp_path):
    config = staged("hf", "trl_sft_lora.yaml")
    target = tmp_path / "recipe.yaml"
    target.write_text("keep me\n", encoding="utf-8")
    proc = run_cli("recipe", "import", str(config), "-o", str(target))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--overwrite" in proc.stderr
    assert target.read_text(encoding="utf-8") == "keep me\n"
    proc = run_cli("recipe", "import", str(config), "-o", str(target), "--overwrite", "--from", "hf")
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(target.read_text(encoding="utf-8"))["method"]["name"] == "lora"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("foo: 1\nbar: [1, 2]\n", "pass --from"),
        ("base_model: [unclosed\n", "invalid YAML"),
        ("- a\n- b\n", "mapping"),
        ("", "empty"),
    ],
)
def test_cli_refuses_unreadable_or_unknown_configs(tmp_path, text, expected):
    config = tmp_path / "config.yaml"
    config.write_text(text, encoding="utf-8")
    proc = run_cli("recipe", "import", str(config))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(config) in lines[0] and expected in lines[0], proc.stderr
    assert not (tmp_path / "config.peftcli.yaml").exists()


def test_detection_prefers_the_tool_whose_own_keys_appear(tmp_path):
    config = tmp_path / "lf.yaml"
    # mostly HF TrainingArguments keys, but finetuning_type and template are LLaMA-Factory's alone
    config.write_text(
        "model_name_or_path: m\nfinetuning_type: lora\ntemplate: llama3\nper_device_train_batch_size: 2\n"
        "num_train_epochs: 1\nlr_scheduler_type: cosine\noutput_dir: out\nlogging_steps: 5\noptim: adamw_torch\n",
        encoding="utf-8",
    )
    proc = run_cli("recipe", "import", str(config))
    assert proc.returncode == 2 and "no training data" in proc.stderr  # read as LLaMA-Factory: no dataset given
    proc = run_cli("recipe", "import", str(config), "--from", "hf")
    assert proc.returncode == 2 and "no training data" in proc.stderr


def test_preference_configs_are_refused(tmp_path):
    config = tmp_path / "dpo.yml"
    config.write_text("base_model: m\nrl: dpo\nadapter: lora\nmicro_batch_size: 1\n", encoding="utf-8")
    proc = run_cli("recipe", "import", str(config))
    assert proc.returncode == 2 and "dpo" in proc.stderr and "supervised" in proc.stderr


def test_written_recipe_has_an_ordinary_file_mode(staged):
    config = staged("hf", "trl_sft_lora.yaml")
    assert run_cli("recipe", "import", str(config)).returncode == 0
    umask = os.umask(0)
    os.umask(umask)
    mode = config.with_name("trl_sft_lora.peftcli.yaml").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask  # as any file the user writes, not mkstemp's private 0600


def test_cli_refuses_unknown_tool_name(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("base_model: x\n", encoding="utf-8")
    proc = run_cli("recipe", "import", str(config), "--from", "unsloth")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "axolotl, llama-factory, hf" in proc.stderr


def test_missing_local_data_file_is_an_error(tmp_path):
    config = tmp_path / "axolotl.yml"
    config.write_text(
        "base_model: m\nadapter: lora\nmicro_batch_size: 1\ndatasets:\n  - path: ./nowhere.jsonl\n    type: alpaca\n",
        encoding="utf-8",
    )
    proc = run_cli("recipe", "import", str(config))
    assert proc.returncode == 2 and "nowhere.jsonl" in proc.stderr and "not found" in proc.stderr


# --- an imported Axolotl config trains as it comes out -----------------------------------------------------------


def test_imported_axolotl_lora_trains(tmp_path, tiny_model_dir):
    rows = [{"instruction": r["prompt"], "input": "", "output": r["completion"]} for r in copy_task(24)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    config = tmp_path / "axolotl.yml"
    config.write_text(
        f"""
base_model: {tiny_model_dir}
tokenizer_type: AutoTokenizer
strict: false
datasets:
  - path: {data}
    type: alpaca
val_set_size: 0.1
output_dir: {tmp_path / "run"}
adapter: lora
lora_r: 4
lora_alpha: 8
lora_dropout: 0.05
lora_target_linear: true
sequence_len: 64
sample_packing: false
micro_batch_size: 4
gradient_accumulation_steps: 1
max_steps: 3
optimizer: adamw_torch
lr_scheduler: cosine
learning_rate: 0.001
warmup_steps: 1
bf16: false
logging_steps: 1
save_safetensors: true
""",
        encoding="utf-8",
    )
    recipe = tmp_path / "recipe.yaml"
    proc = run_cli("recipe", "import", str(config), "-o", str(recipe))
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("train", str(recipe), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "adapter_model.safetensors").is_file()
    config_json = json.loads((run / "adapter_config.json").read_text(encoding="utf-8"))
    assert (config_json["r"], config_json["lora_alpha"]) == (4, 8)
