"""`peft eval`, `peft generate` and `peft chat` on tiny trained runs, with the loop and HF PEFT as oracles."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from peftcli.errors import PeftCliError
from peftcli.recipe.load import load_recipe
from peftcli.serve.generate import Sampling, complete, prompt_style, render_prompt
from peftcli.serve.load import load_run
from peftcli.serve.score import DataChoice, evaluate_run
from peftcli.train.loop import train
from peftcli.train.run_dir import read_jsonl, read_summary

from support import make_recipe, run_cli, write_recipe

pytestmark = pytest.mark.filterwarnings("ignore:The PEFT config.s .base_model_name_or_path. was renamed")

METHODS = {
    "lora": {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
    "ia3": {"name": "ia3", "target_modules": ["q_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
    "prompt_tuning": {"name": "prompt_tuning", "num_virtual_tokens": 4},
}
PROMPTS = ["copy red green blue", "copy one two"]
GENERATION = {"prompts": 4, "max_new_tokens": 6, "pattern": "a"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, copy_data):
    """Finished tiny runs, one per method, trained on demand (LoRA also scores generations while training)."""
    made = {}

    def run_for(method: str):
        if method not in made:
            tmp = tmp_path_factory.mktemp(method)
            training = {"max_steps": 3, "eval_every": 3, "learning_rate": 1e-2}
            if method == "lora":
                training["eval_generation"] = GENERATION
            recipe = make_recipe(tmp, tiny_model_dir, copy_data, training=training)
            recipe["method"] = METHODS[method]
            train(load_recipe(write_recipe(tmp / "recipe.yaml", recipe)))
            made[method] = tmp / "run"
        return made[method]

    return run_for


@pytest.fixture(scope="module")
def merged_lora(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "lora-merged"
    result = run_cli("merge", str(runs("lora")), "-o", str(out), "--dtype", "fp32")
    assert result.returncode == 0, result.stderr
    return out


def test_eval_equals_the_runs_own_final_evaluation(runs):
    run = runs("lora")
    result = run_cli("eval", str(run), "--json")
    assert result.returncode == 0, result.stderr
    assert "scored" in result.stderr  # progress lines while scoring
    ours = json.loads(result.stdout)
    summary = read_summary(run)
    final = summary["eval_after"]
    assert final == [r for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "eval"][-1]
    # fp32 weights, the same batches: only summation order may differ.
    assert ours["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-5)
    assert ours["eval_ppl"] == pytest.approx(final["eval_ppl"], rel=1e-4)
    assert ours["eval_tokens"] == final["eval_tokens"]
    generated = summary["generation_after"]
    assert (ours["gen_matches"], ours["gen_prompts"]) == (generated["gen_matches"], generated["gen_prompts"])


def test_eval_of_a_file_and_of_the_merged_model(runs, merged_lora, copy_data):
    run = runs("lora")
    choice = DataChoice(path=str(copy_data), max_samples=12, batch_size=3)
    on_run = evaluate_run(run, choice)
    assert on_run["examples"] == 12 and math.isfinite(on_run["eval_loss"])
    with_merged = evaluate_run(run, choice, merged=merged_lora)
    bare = evaluate_run(merged_lora, DataChoice(path=str(copy_data), format="prompt_completion", max_samples=12))
    # The fp32 merge changes each weight by rounding only.
    assert with_merged["eval_loss"] == pytest.approx(on_run["eval_loss"], rel=1e-4)
    assert bare["eval_loss"] == pytest.approx(on_run["eval_loss"], rel=1e-4)
    assert bare["eval_tokens"] == on_run["eval_tokens"]
    # Plain text has no prompt to answer: the loss alone, no generation score.
    text = DataChoice(path=str(copy_data), format="text", columns={"text": "prompt"}, max_samples=4)
    as_text = evaluate_run(run, text)
    assert as_text["examples"] == 4 and "gen_score" not in as_text and math.isfinite(as_text["eval_loss"])


def _hf_answers(run, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers of the base with the run's adapter loaded by HF PEFT, prompts through the chat template."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    base = AutoModelForCausalLM.from_pretrained(recipe["model"]["name_or_path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run).eval()
    tokenizer = AutoTokenizer.from_pretrained(run)
    answers = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        new = []
        # A greedy loop over full forwards (no cache): HF PEFT's own generate is not what is being checked.
        while len(new) < max_new_tokens and (not new or new[-1] != tokenizer.eos_token_id):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids + new])).logits
            new.append(int(logits[0, -1].argmax()))
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
        answers.append(tokenizer.decode(new, skip_special_tokens=True))
    return answers


def test_generate_equals_hf_peft_on_a_lora_run(runs, tmp_path):
    run = runs("lora")
    out = tmp_path / "answers.jsonl"
    args = ["generate", str(run), "--max-new-tokens", "6", "--batch-size", "1", "-o", str(out)]
    result = run_cli(*args, "-p", PROMPTS[0], "-p", PROMPTS[1])
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == PROMPTS
    assert [r["completion"] for r in records] == _hf_answers(run, PROMPTS, 6)
    assert any(r["completion"] for r in records)
    again = run_cli(*args, "-p", PROMPTS[0])
    assert again.returncode == 2 and f"--output: {out} already exists; pass --overwrite" in again.stderr


@pytest.mark.parametrize("method", ["ia3", "prompt_tuning"])
def test_generate_equals_hf_peft_for_other_methods(runs, method):
    run = runs(method)
    loaded = load_run(run)
    style = prompt_style(loaded)
    assert style.chat  # the tiny tokenizer has a chat template and prompt_style is auto
    ids = [render_prompt(loaded, style, p) for p in PROMPTS]
    ours = [a["completion"] for a in complete(loaded, ids, Sampling(max_new_tokens=6), batch_size=1)]
    assert ours == _hf_answers(run, PROMPTS, 6)


def test_generate_from_a_merged_directory_and_with_a_seed(runs, merged_lora):
    on_run = load_run(runs("lora"))
    merged = load_run(merged_lora)
    assert merged.merged and not on_run.merged
    prompts = [render_prompt(on_run, prompt_style(on_run), p) for p in PROMPTS]
    assert prompts == [render_prompt(merged, prompt_style(merged), p) for p in PROMPTS]
    greedy = Sampling(max_new_tokens=6)
    assert complete(merged, prompts, greedy) == complete(on_run, prompts, greedy)
    sampled = Sampling(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=7)
    assert complete(on_run, prompts, sampled) == complete(on_run, prompts, sampled)


def _chat(run, lines: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "peftcli", "chat", str(run), "--max-new-tokens", "5", *args]
    return subprocess.run(command, input=lines, env=env, capture_output=True, text=True, timeout=300)


def test_chat_keeps_the_conversation_through_the_template(runs, tmp_path):
    run = runs("lora")
    result = _chat(run, "copy red green\ncopy blue\n/reset\ncopy one\n/exit\nnever read\n", "--show-prompt")
    assert result.returncode == 0, result.stderr
    prompts = result.stderr.split("--- prompt ---\n")[1:]
    prompts = [p.split("--- end of prompt ---")[0] for p in prompts]
    answers = result.stdout.splitlines()
    assert len(prompts) == 3 and len(answers) == 3
    first = "<|im_start|>user\ncopy red green<|im_end|>\n<|im_start|>assistant\n"
    assert prompts[0] == first
    # The second turn reads the first exchange: the user's words and the streamed answer.
    second = "<|im_start|>user\ncopy blue<|im_end|>\n<|im_start|>assistant\n"
    assert prompts[1] == f"{first}{answers[0]}<|im_end|>\n{second}"
    assert prompts[2] == "<|im_start|>user\ncopy one<|im_end|>\n<|im_start|>assistant\n"  # after /reset

    plain = tmp_path / "no-template"
    shutil.copytree(run, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    refused = _chat(plain, "hello\n")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: {plain}: the tokenizer has no chat template, so there is no conversation format to chat in; use "
        "peft generate RUN --prompt TEXT for single prompts"
    )


def test_what_is_not_a_finished_run_is_refused(runs, tmp_path):
    nothing = run_cli("eval", str(tmp_path / "missing"))
    assert nothing.returncode == 2
    assert nothing.stderr.strip() == (
        f"error: {tmp_path / 'missing'}: not found; give a run directory (peft train) or a merged model (peft merge)"
    )
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "notes.txt").write_text("hello")
    stray = run_cli("generate", str(tmp_path / "stray"), "-p", "hi")
    assert stray.returncode == 2 and "neither a finished run directory" in stray.stderr
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(runs("lora") / "recipe.yaml", unfinished / "recipe.yaml")
    with pytest.raises(PeftCliError, match="this run has not finished"):
        load_run(unfinished)
    moved = tmp_path / "moved"
    shutil.copytree(runs("lora"), moved)
    recipe = yaml.safe_load((moved / "recipe.yaml").read_text())
    recipe["model"]["name_or_path"] = str(tmp_path / "gone-base")
    (moved / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(PeftCliError, match="gone-base.*pass --base PATH"):
        load_run(moved)
