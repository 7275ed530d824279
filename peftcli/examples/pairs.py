"""GSM8K preference pairs, built honestly from the model itself (for recipes/dpo-smollm2.yaml).

For each problem, `chosen` is GSM8K's reference solution and `rejected` is a solution SmolLM2-135M-Instruct
wrote for it (sampled through its chat template, as training will render the prompt) whose final number is
wrong. Problems where every sample was right, or where the sample never finished within the token budget,
give no pair: a rejected side is a real, complete, wrong answer, never a cut-off one. Training pairs come
from the GSM8K training file, validation pairs from the held-out eval file, so the two never share a problem.

Sampling is seeded per batch; the files are written once into the cache and kept (`.version` says which
build rule made them).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

PAIRS_VERSION = "1"  # bump when the rule below changes, so old caches are rebuilt
TRAIN_PROBLEMS = 192
EVAL_PROBLEMS = 64
MAX_NEW_TOKENS = 256
TEMPERATURE = 0.8
BATCH = 32
SEED = 1234
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """The answer a solution ends with: the number after its last '####', else its last number."""
    # after '####': the first number there; without one: the last number of the text
    numbers = _NUMBER.findall(text.rsplit("####", 1)[1])[:1] if "####" in text else _NUMBER.findall(text)[-1:]
    return float(numbers[0].replace(",", "")) if numbers else None


def is_wrong(sample: str, reference: str) -> bool:
    """A sampled solution is wrong when its final number differs from the reference's (or it has none)."""
    got, want = final_number(sample), final_number(reference)
    return want is not None and (got is None or abs(got - want) > 1e-6)


def sample_solutions(model_dir: Path, questions: list[str], seed: int, log=print) -> list[str | None]:
    """One sampled solution per question (None where it did not finish within MAX_NEW_TOKENS)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out: list[str | None] = []
    started = time.perf_counter()
    for start in range(0, len(questions), BATCH):
        chunk = questions[start : start + BATCH]
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in chunk
        ]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(seed + start)
        with torch.no_grad():
            generated = model.generate(
                **batch,
                do_sample=True,
                temperature=TEMPERATURE,
                top_p=1.0,
                top_k=0,
                max_new_tokens=MAX_NEW_TOKENS,
                pad_token_id=tokenizer.pad_token_id,
            )
        for row in generated[:, batch["input_ids"].shape[1] :]:
            ids = row.tolist()
            finished = tokenizer.eos_token_id in ids
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            out.append(text if finished and text else None)
        log(f"  sampled {min(start + BATCH, len(questions))}/{len(questions)} ({time.perf_counter() - started:.0f} s)")
    return out


def build_pairs(rows: list[dict], samples: list[str | None]) -> tuple[list[dict], dict]:
    """Pairs from problems and one sample each; with counts of why the other problems gave none."""
    pairs, counts = [], {"problems": len(rows), "right": 0, "unfinished": 0, "pairs": 0}
    for row, sample in zip(rows, samples, strict=True):
        if sample is None:
            counts["unfinished"] += 1
        elif not is_wrong(sample, row["answer"]):
            counts["right"] += 1
        else:
            pairs.append({"prompt": row["question"], "chosen": row["answer"], "rejected": sample})
    counts["pairs"] = len(pairs)
    return pairs, counts


def prepare_gsm8k_pairs(cache: Path, log=print) -> Path:
    """train.jsonl and eval.jsonl of {prompt, chosen, rejected} in cache/data/gsm8k-pairs."""
    from peftcli.examples.assets import prepare_gsm8k, prepare_smollm2

    out = cache / "data" / "gsm8k-pairs"
    marker = out / ".version"
    if marker.is_file() and marker.read_text().strip() == PAIRS_VERSION:
        return out
    gsm8k, model_dir = prepare_gsm8k(cache, log), prepare_smollm2(cache, log)
    out.mkdir(parents=True, exist_ok=True)
    report = {}
    for name, limit in (("train.jsonl", TRAIN_PROBLEMS), ("eval.jsonl", EVAL_PROBLEMS)):
        lines = (gsm8k / name).read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines[:limit] if line.strip()]
        log(f"sampling SmolLM2-135M-Instruct's solutions to {len(rows)} GSM8K problems ({name})")
        pairs, report[name] = build_pairs(rows, sample_solutions(model_dir, [r["question"] for r in rows], SEED, log))
        tmp = out / f".{name}.part"
        tmp.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
        tmp.replace(out / name)
        log(f"  {name}: {report[name]}")
    (out / "build.json").write_text(
        json.dumps({"version": PAIRS_VERSION, "seed": SEED, "temperature": TEMPERATURE, **report}, indent=2) + "\n"
    )
    marker.write_text(PAIRS_VERSION + "\n")
    return out
