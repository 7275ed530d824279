"""How much of a LoHa, LoKr, OFT, VeRA or IA3 adapter survives `peft export --format lora`? Each method trains
SmolLM2-135M-Instruct on the quickstart recipe (GSM8K) for a few steps, then the adapter is converted at each
setting (`--rank 16`, `--rank 64`, `--energy 0.99`) and the converted LoRA is loaded by HF PEFT's
`PeftModel.from_pretrained` here, independently of the export's own read-back.

    python bench/lora_conversion.py [--steps 25] [--methods loha,lokr,oft,vera,ia3] [--work DIR] [--json]

Training and converting are the CLI a user would type, each in its own process (`peft train
recipes/quickstart.yaml --set method=...`, `peft export RUN --format lora ...`, with --max-effect-loss 1e9 so
that every setting is measured rather than refused). The numbers come from each conversion's conversion.json
and from this process: on the fixed probe prompts of `peft merge --verify`, the adapter's own effect (max |logit
diff| of base + adapter, loaded by peftcli, against base) and the converted LoRA as HF PEFT loads it against
base + adapter. With --work DIR the runs are kept, and runs already finished there are not trained again.

The table: per method, the adapter's effect, then per setting the share of that effect the LoRA loses
(||LoRA - adapter|| / ||adapter - base|| over the probe logits, what --max-effect-loss bounds), the max |logit
diff| against base + adapter, and whether the default bound 0.5 passes (bold: it fails). One run on a busy
2-core CPU (20 steps of batch 2 each, 22 minutes in all):

    | method | adapter effect | `--rank 16` | `--rank 64` | `--energy 0.99` |
    | loha | 0.29 | 0.18 (0.048) | 0.00 (4.4e-05) | 0.01 (0.0042) r 53-62 |
    | lokr | 0.75 | 0.37 (0.3) | 0.09 (0.083) | 0.02 (0.025) r 69-157 |
    | oft | 12 | 0.47 (5.5) | 0.38 (5.2) | 0.04 (0.49) r 60-510 |
    | vera | 1.6 | 0.33 (0.59) | 0.11 (0.2) | 0.02 (0.031) r 114-222 |
    | ia3 | 3.4 | **0.79 (2.4)** | **0.55 (2.1)** | 0.07 (0.31) r 76-520 |

HF PEFT's load gave the export's own figures to the digits printed, for every conversion.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from itertools import pairwise
from pathlib import Path

HOME = Path(os.environ.get("PEFTCLI_HOME", Path.home() / ".cache" / "peftcli"))
MODEL = HOME / "models" / "SmolLM2-135M-Instruct"
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
# Each method's block (defaults otherwise) and learning rate: the vector methods (VeRA, IA3) train a few scales
# per layer and need a larger step than the quickstart's 5e-4 to move the model as much in a few steps.
METHODS = {
    "loha": ("{name: loha, r: 8, alpha: 8, target_modules: all-linear}", 1e-3),
    "lokr": ("{name: lokr, r: 8, alpha: 8, target_modules: all-linear}", 1e-3),
    "oft": ("{name: oft, block_size: 32, target_modules: all-linear}", 1e-3),
    "vera": ("{name: vera, r: 256, target_modules: all-linear}", 1e-2),
    "ia3": ("{name: ia3}", 5e-3),  # k_proj, v_proj, down_proj
}
SETTINGS = {"rank 16": ("--rank", "16"), "rank 64": ("--rank", "64"), "energy 0.99": ("--energy", "0.99")}
DEFAULT_BOUND = 0.5


def _peft(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "peftcli", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"peft {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def _train(run: Path, method: str, args) -> dict:
    """`peft train` of the quickstart recipe with `method`; the run's summary.json (kept runs are reused)."""
    if not (run / "summary.json").is_file():
        block, lr = METHODS[method]
        overrides = {
            "method": block,
            "model.dtype": "fp32",
            "training.max_steps": args.steps,
            "training.learning_rate": lr,
            "training.warmup_steps": 2,
            "training.eval_generation": "null",
            "training.save_every": "null",
            "data.validation.max_samples": args.val_rows,
            "data.max_length": args.max_length,
            "output.dir": str(run),
        }
        _peft("train", str(RECIPE), *(x for key, value in overrides.items() for x in ("--set", f"{key}={value}")))
    return json.loads((run / "summary.json").read_text(encoding="utf-8"))


def _convert(run: Path, out: Path, flags: tuple[str, str]) -> dict:
    if not (out / "conversion.json").is_file():
        _peft("export", str(run), "--format", "lora", *flags, "--max-effect-loss", "1e9", "-o", str(out), "--overwrite")
    return json.loads((out / "conversion.json").read_text(encoding="utf-8"))


def _max_abs(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def _norm(a, b) -> float:
    return math.sqrt(sum((x.double() - y.double()).square().sum().item() for x, y in zip(a, b, strict=True)))


def _independent(run: Path, converted: dict[str, Path]) -> dict:
    """On the probe prompts: the adapter's effect (peftcli's loader) and each converted LoRA loaded by
    `peft.PeftModel.from_pretrained` on a transformers base, against base + adapter."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftcli.export.verify import _inputs
    from peftcli.tuners.adapter import load_adapter

    batches = _inputs(AutoTokenizer.from_pretrained(MODEL), "causal_lm")
    base_model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    with torch.no_grad():
        base = [base_model(**x).logits for x in batches]
        model = copy.deepcopy(base_model)
        load_adapter(model, run)
        original = [model.eval()(**x).logits for x in batches]
        out = {"effect_max_abs": _max_abs(original, base), "peft_version": peft.__version__, "settings": {}}
        for name, path in converted.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), str(path)).eval()
            lora = [model(**x).logits for x in batches]
            out["settings"][name] = {
                "max_abs_vs_adapter": _max_abs(lora, original),
                "effect_lost": _norm(lora, original) / _norm(original, base),
            }
    return out


def _measure(method: str, root: Path, args) -> dict:
    run = root / f"run-{method}"
    clock = [time.perf_counter()]
    summary = _train(run, method, args)
    clock.append(time.perf_counter())
    conversions, paths = {}, {}
    for name, flags in SETTINGS.items():
        paths[name] = root / f"lora-{method}-{name.replace(' ', '')}"
        report = _convert(run, paths[name], flags)
        conversions[name] = {
            "ranks": [min(report["ranks"]), max(report["ranks"])],
            "median_error": report["median_relative_error"],
            "worst_error": report["worst_relative_error"],
            "max_abs_vs_adapter": report["probe"]["max_abs_logit_diff"],
            "effect_lost": report["probe"]["effect_lost"],
            "reader": report["read_back"]["reader"],
            "read_back_max_abs": report["read_back"]["max_abs_logit_diff"],
            "read_back_tolerance": report["read_back"]["tolerance"],
        }
    clock.append(time.perf_counter())
    check = _independent(run, paths)
    clock.append(time.perf_counter())
    return {
        "method": method,
        "method_block": METHODS[method][0],
        "learning_rate": METHODS[method][1],
        "steps": args.steps,
        "eval_loss": [(summary.get(key) or {}).get("eval_loss") for key in ("eval_before", "eval_after")],
        "effect_max_abs": check["effect_max_abs"],
        "conversions": conversions,
        "hf_peft": check,
        "seconds": dict(zip(("train", "convert", "check"), (b - a for a, b in pairwise(clock)), strict=True)),
    }


def _table(rows: list[dict]) -> list[str]:
    head = " | ".join(f"`--{name}`" for name in SETTINGS)
    lines = [f"| method | adapter effect | {head} |", f"|---|---|{'---|' * len(SETTINGS)}"]
    for row in rows:
        cells = []
        for name in SETTINGS:
            conv = row["conversions"][name]
            lost = conv["effect_lost"]
            text = f"{lost:.2f} ({conv['max_abs_vs_adapter']:.2g})"
            if name.startswith("energy"):
                low, high = conv["ranks"]
                text += f" r {low}" if low == high else f" r {low}-{high}"
            cells.append(f"**{text}**" if lost > DEFAULT_BOUND else text)
        lines.append(f"| {row['method']} | {row['effect_max_abs']:.2g} | {' | '.join(cells)} |")
    return lines


def _details(rows: list[dict]) -> list[str]:
    lines = ["| method | setting | ranks | layer error median / worst | effect lost (HF PEFT load) | "
             "max abs vs adapter (HF PEFT load) | read-back |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        for name, conv in row["conversions"].items():
            mine = row["hf_peft"]["settings"][name]
            low, high = conv["ranks"]
            lines.append(
                f"| {row['method']} | {name} | {low if low == high else f'{low}-{high}'} | "
                f"{conv['median_error']:.3g} / {conv['worst_error']:.3g} | {conv['effect_lost']:.4f} "
                f"({mine['effect_lost']:.4f}) | {conv['max_abs_vs_adapter']:.3g} ({mine['max_abs_vs_adapter']:.3g}) | "
                f"{conv['reader']}: {conv['read_back_max_abs']:.2g} (bound {conv['read_back_tolerance']:.2g}) |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--val-rows", type=int, default=4)
    parser.add_argument("--work", type=Path, default=None, help="Keep runs and conversions here (default: a temp dir).")
    parser.add_argument("--threads", type=int, default=None, help="Torch threads here and in the CLI processes.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        import torch

        torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(METHODS)}")
    with tempfile.TemporaryDirectory(prefix="lora-conversion-") as tmp:
        root = args.work or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        rows = []
        for method in methods:
            rows.append(_measure(method, root, args))
            print(f"{method}: {json.dumps(rows[-1]['seconds'])}", file=sys.stderr, flush=True)
    if args.work:
        (args.work / "results.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"SmolLM2-135M-Instruct, {args.steps} steps each; share of the adapter's effect lost (max |logit diff| vs "
          f"base + adapter), bold fails the default --max-effect-loss {DEFAULT_BOUND}:\n")  # fmt: skip
    print("\n".join(_table(rows)))
    print("\n" + "\n".join(_details(rows)))
    for row in rows:
        before, after = row["eval_loss"]
        print(f"{row['method']}: {row['method_block']}, lr {row['learning_rate']:g}; validation loss {before:.3f} -> "
              f"{after:.3f}; HF PEFT {row['hf_peft']['peft_version']}")  # fmt: skip


if __name__ == "__main__":
    main()
