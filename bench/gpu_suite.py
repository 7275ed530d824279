"""Every GPU figure of the training benchmarks in one run, written as one JSON file (bench/gpu_suite.sh wraps it).

Steps, each in its own process group with a time budget (a step that fails or runs out of time is recorded
with its error and the suite goes on; the budgets also stop at a deadline for the whole suite):

    llama-1b      bench/train_vs_hf.py --device cuda --shape llama-1b: ours vs hf vs hf-flat, bf16
    llama-8b      the same at the Llama-3.1-8B shape
    llama-8b-nf4  QLoRA (bitsandbytes nf4, double quant, bf16 compute) at the 8B shape: ours vs hf
    fsdp2, zero3  `peft train recipe.yaml` with `launch: {preset: ..., nproc: 1}` on the 1B shape, then, in a
                  fresh process, the saved adapter loaded by HF PEFT (`PeftModel.from_pretrained`) on the same
                  base against peftcli's own base + adapter, logits on a fixed batch (see `compare`)

    python bench/gpu_suite.py run --out $OUT/gpu_suite.json     # the suite (about 8 minutes on one H200)
    python bench/gpu_suite.py run --dry-run                     # print every command, run nothing
    python bench/gpu_suite.py run --smoke --out /tmp/smoke.json # all of it on CPU, tiny shape, a few steps
    python bench/gpu_suite.py assets --dest bench/.cache/gpu-assets   # tokenizer + GSM8K for a machine without
    python bench/gpu_suite.py wheels --dest .whl                      # the packages a bare GPU image lacks
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

BF16_EPS = 2.0**-7  # spacing of bf16 numbers in [1, 2)
# Wheels for a GPU image that has torch, transformers (older), accelerate, peft, tokenizers, safetensors, typer,
# rich, pyyaml and numpy but not the rest of peftcli's stack (see bench/gpu_suite.sh). Pinned to the versions
# this project's lock tested.
WHEELS = [
    "transformers==5.24.0",
    "peft==0.21.2",
    "datasets==5.2.0",
    "dill==0.4.1",
    "multiprocess==0.70.19",
    "pydantic==2.14.4",
    "pydantic_core==2.50.5",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    "typing-extensions==4.16.0",
    "typer==0.29.2",
    "rich==15.0.0",
    "regex==2026.11.19",
    "hjson==3.1.0",
    "bitsandbytes==0.50.2",
]
SDIST_WHEELS = ["deepspeed==0.19.8"]  # an sdist: built here into a pure-Python wheel
# bitsandbytes ships a library per CUDA/ROCm/XPU version (43 MB); the GPU image's torch is a CUDA 13 build.
BNB_KEEP = ("libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so", "libbitsandbytes_cpu.so")
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64"]
PLATFORMS += ["manylinux2014_x86_64", "manylinux1_x86_64"]


# --- the plan -----------------------------------------------------------------------------------------------------


def plan(args) -> list[dict]:
    """The steps: name, time budget (s) and how to run it."""
    py, tvh = sys.executable, str(BENCH / "train_vs_hf.py")
    work = Path(args.work)
    common = ["--work", str(work / "shapes")] + (["--assets", args.assets] if args.assets else [])
    if args.smoke:
        shapes = {"1b": "tiny", "8b": "tiny"}
        device, samples = "cpu", {"1b": 48, "8b": 48, "nf4": 48, "dist": 32}
    else:
        shapes = {"1b": "llama-1b", "8b": "llama-8b"}
        device, samples = "cuda", {"1b": 256, "8b": 64, "nf4": 48, "dist": 32}

    def bench(key: str, shape: str, n: int, *extra: str) -> list[str]:
        out = str(work / f"{key}.json")
        return [py, tvh, "--device", device, "--shape", shape, "--samples", str(n), "--json", out, *common, *extra]

    steps = []
    for name, shape, n, extra in (
        ("llama-1b", shapes["1b"], samples["1b"], []),
        ("llama-8b", shapes["8b"], samples["8b"], []),
        ("llama-8b-nf4", shapes["8b"], samples["nf4"], ["--quant", "nf4", "--sides", "ours,hf"]),
    ):
        budget = {"llama-1b": 90, "llama-8b": 170, "llama-8b-nf4": 100}[name]
        cmd = bench(name, shape, n, *extra)
        steps.append({"name": name, "budget": budget, "json": work / f"{name}.json", "cmd": cmd})
    if args.smoke:
        steps[1]["skip"] = "the same code path as llama-1b under --smoke (both are the tiny shape)"
    for preset in ("fsdp2", "zero3"):
        cmd = [py, __file__, "distributed", "--preset", preset, "--shape", shapes["1b"], "--device", device]
        cmd += ["--samples", str(samples["dist"]), "--work", str(work)]
        cmd += ["--assets", args.assets] if args.assets else []
        budget = {"fsdp2": 50, "zero3": 55}[preset]
        # after the 1B step, whose base they reuse; before the 8B steps, which take most of the time
        steps.insert(
            1 + ("fsdp2", "zero3").index(preset),
            {"name": preset, "budget": budget, "json": work / f"{preset}.json", "cmd": cmd},
        )
    return steps


# --- running steps --------------------------------------------------------------------------------------------------


def run_step(step: dict, timeout: float, log: Path) -> dict:
    """One step in its own process group (killed whole on timeout, launchers' children too)."""
    started = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as handle:
        proc = subprocess.Popen(step["cmd"], stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = proc.returncode
    output = log.read_text(errors="replace")
    record = {
        "command": step["cmd"],
        "rc": rc,
        "seconds": round(time.perf_counter() - started, 1),
        "budget_s": round(timeout, 1),
        "timed_out": timed_out,
        "log_tail": output[-4000:],
    }
    json_path = step["json"]
    if json_path.is_file():  # written as the step goes: a timed-out step still has the sides it finished
        record["result"] = json.loads(json_path.read_text())
    if rc != 0:
        record["error"] = "timed out" if timed_out else (output.strip().splitlines() or ["(no output)"])[-1][-500:]
    return record


def environment() -> dict:
    facts = {"python": sys.version.split()[0], "host": os.uname().nodename}
    # torch's view of the GPU from a child: a CUDA context in this process would hold GPU memory all along
    probe = "import json, torch; c = torch.cuda.is_available(); "
    probe += "print(json.dumps({'cuda': c, 'gpu': torch.cuda.get_device_name() if c else None}))"
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
        facts.update(json.loads(done.stdout.strip().splitlines()[-1]))
    except (subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        facts["cuda"] = f"unknown: {type(exc).__name__}"
    from importlib.metadata import PackageNotFoundError, version

    # Read from the installed metadata, not imported: importing them all costs seconds of the budget.
    for name in ("transformers", "peft", "accelerate", "datasets", "bitsandbytes", "deepspeed", "pydantic", "torch"):
        try:
            facts[name] = version(name)
        except PackageNotFoundError:
            facts[name] = "missing"
    return facts


def command_run(args) -> None:
    default = Path(os.environ["OUT"]) / "gpu_suite.json" if os.environ.get("OUT") else Path("/tmp/gpu_suite.json")
    out = Path(args.out) if args.out else default
    args.work = args.work or tempfile.mkdtemp(prefix="peftcli-gpu-suite-")
    # The budgets are sized for the H200; CPU processes of the tiny shape spend minutes on imports and set-up.
    args.deadline = args.deadline or (1800 if args.smoke else 470)
    args.budget_scale = args.budget_scale or (5.0 if args.smoke else 1.0)
    work = Path(args.work)
    steps = plan(args)
    if args.dry_run:
        for step in steps:
            note = f"   # skipped: {step['skip']}" if step.get("skip") else ""
            print(f"# {step['name']} (budget {step['budget']}s)\n{' '.join(step['cmd'])}{note}")
            if step["cmd"][2] == "distributed":
                print(distributed(parse_distributed(step["cmd"][3:]), dry_run=True))
        print(f"# figures -> {out}")
        return
    work.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = {"mode": "smoke (CPU, tiny shape)" if args.smoke else "gpu", "environment": environment(), "steps": {}}
    for step in steps:
        if step.get("skip"):
            report["steps"][step["name"]] = {"skipped": step["skip"], "command": step["cmd"]}
            continue
        left = args.deadline - (time.perf_counter() - started)
        budget = step["budget"] * args.budget_scale
        if left < 15:
            report["steps"][step["name"]] = {
                "error": "not run: the suite's deadline was passed",
                "command": step["cmd"],
            }
            continue
        print(f"[{time.perf_counter() - started:6.0f}s] {step['name']} (budget {min(budget, left):.0f}s)", flush=True)
        record = run_step(step, min(budget, left), work / f"{step['name']}.log")
        report["steps"][step["name"]] = record
        status = "ok" if record["rc"] == 0 else f"FAILED: {record.get('error')}"
        print(f"[{time.perf_counter() - started:6.0f}s] {step['name']}: {status} ({record['seconds']}s)", flush=True)
        report["seconds"] = round(time.perf_counter() - started, 1)
        out.write_text(json.dumps(report, indent=1, default=str))  # after every step: a killed suite keeps them
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["failed"] = [n for n, r in report["steps"].items() if "error" in r]
    out.write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps(headline(report), indent=1))
    print(f"figures: {out}")
    if report["failed"]:
        sys.exit(f"FAILED steps: {', '.join(report['failed'])}")


def headline(report: dict) -> dict:
    """The figures worth reading first, per step."""
    lines = {}
    for name, record in report["steps"].items():
        result = record.get("result") or {}
        if "medians" in result:
            lines[name] = {
                side: {k: m.get(k) for k in ("tokens_per_s", "peak_alloc_mb", "peak_rss_mb", "mfu", "steps")}
                for side, m in result["medians"].items()
            }
        elif result:
            lines[name] = {k: result.get(k) for k in ("engine", "tokens_per_s", "ok", "problems")}
            lines[name].update({f"logits_{k}": v.get("ok") for k, v in result.get("logits", {}).items()})
        if "error" in record or "skipped" in record:
            lines.setdefault(name, {})["error" if "error" in record else "skipped"] = record.get(
                "error", record.get("skipped")
            )
    return lines


# --- fsdp2 / zero3 with one process, and the adapter against HF PEFT -------------------------------------------------


def parse_distributed(argv: list[str]):
    parser = argparse.ArgumentParser(prog="gpu_suite.py distributed")
    parser.add_argument("--preset", required=True)
    parser.add_argument("--shape", required=True)
    parser.add_argument("--device", choices=["cpu", "cuda"], required=True)
    parser.add_argument("--samples", type=int, default=32)
    # one packed row per step: enough steps from a few examples to see the loss fall
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--work", required=True)
    parser.add_argument("--assets", default=None)
    return parser.parse_args(argv)


def shape_args(args) -> argparse.Namespace:
    """train_vs_hf's view of the same shape job (its base and data files)."""
    max_length = 256 if args.shape == "tiny" else 2048
    return argparse.Namespace(
        shape=args.shape,
        work=str(Path(args.work) / "shapes"),
        assets=args.assets,
        samples=args.samples,
        max_length=max_length,
        device=args.device,
        batch_size=args.batch_size,
        lr=1e-3,
        quant="none",
        dtype="fp32",
        activation_checkpointing=False,
        ours_packing=None,
        ours_loss=None,
        ours_compile=None,
        ours_group_by_length=None,
        model="smollm2",
    )


def distributed(args, dry_run: bool = False):
    """`peft train` with a one-process launch preset, its run checked, then the adapter compared with HF PEFT."""
    import train_vs_hf as tvh
    import yaml

    job = shape_args(args)
    run_dir = Path(args.work) / f"run-{args.preset}"
    recipe = tvh.recipe_dict(job, run_dir)
    recipe["launch"] = {"preset": args.preset, "nproc": 1}
    recipe_file = Path(args.work) / f"{args.preset}.yaml"
    train_cmd = [sys.executable, "-m", "peftcli", "train", str(recipe_file), "--overwrite"]
    compare_cmd = [sys.executable, __file__, "compare", "--base", recipe["model"]["name_or_path"]]
    compare_cmd += ["--adapter", str(run_dir), "--data", str(tvh.shape_data_path(job)), "--device", args.device]
    if dry_run:
        return f"  recipe {recipe_file}:\n    {json.dumps(recipe)}\n  {' '.join(train_cmd)}\n  {' '.join(compare_cmd)}"

    tvh.prepare_inputs(job)  # the base (once) and the examples, as the benchmark writes them
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    result: dict = {"preset": args.preset, "recipe": recipe, "problems": []}
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(train_cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    result["train_process_s"] = round(time.perf_counter() - started, 1)
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file() or not (run_dir / "adapter_model.safetensors").is_file():
        result["problems"].append(f"peft train exit {proc.returncode}: {(proc.stdout + proc.stderr)[-3000:]}")
        print("RESULT " + json.dumps(result))
        sys.exit(f"{args.preset}: training did not finish")
    if proc.returncode != 0:  # the files are there: a launcher's exit-time abort is recorded, not fatal
        result["train_exit"] = {"rc": proc.returncode, "tail": (proc.stdout + proc.stderr)[-1500:]}
    summary = json.loads(summary_file.read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "train"]
    losses, norms = [r["loss"] for r in steps], [r.get("grad_norm") for r in steps]
    result.update(
        engine=summary.get("engine"),
        world_size=summary.get("world_size"),
        steps=len(steps),
        loop_s=summary.get("time_s"),
        tokens_per_s=summary.get("tokens_per_s"),
        losses=losses,
        grad_norms=norms,
    )
    result["problems"] += tvh.check_run(losses, norms)
    expected = {"fsdp2": "FSDP2", "zero3": "DeepSpeed ZeRO-3"}.get(args.preset)
    if expected and summary.get("engine") != expected:
        result["engine_note"] = f"asked for {args.preset}, the run reports {summary.get('engine')}"
        if args.device == "cuda":
            result["problems"].append(result["engine_note"])

    proc = subprocess.run(compare_cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        result["problems"].append(f"compare exit {proc.returncode}: {proc.stderr[-3000:]}")
    else:
        result["logits"] = json.loads(line[len("RESULT ") :])
        result["problems"] += [f"logits {k}: {v}" for k, v in result["logits"].items() if not v["ok"]]
    result["ok"] = not result["problems"]
    (Path(args.work) / f"{args.preset}.json").write_text(json.dumps(result, indent=1))
    print("RESULT " + json.dumps(result))
    if result["problems"]:
        sys.exit(f"{args.preset}: " + "; ".join(result["problems"]))


def compare(args) -> None:
    """HF PEFT's `PeftModel.from_pretrained` on the base vs peftcli's `load_base_model` + `load_adapter`.

    Two sequences of the run's data (128 tokens each, or less) through both, in fp32 and in bf16. Tolerances,
    relative to the largest |logit| of the fp32 HF PEFT output (`scale`):
      fp32  1e-4 x scale: the same arithmetic up to summation order (a wrong scale, target or transposition
            moves logits by the adapter's whole effect, reported as `adapter_effect`, the change the adapter
            makes to the base's logits; the check is conclusive when that effect is over 10x the tolerance)
      bf16  4 x 2^-7 x scale: 2^-7 is the spacing of bf16 numbers in [1, 2); the two implementations round
            where the adapter's output joins the base's (HF PEFT adds an fp32 LoRA term to the bf16 base
            output) and those roundings of the hidden state reach the logits at their own relative size
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftcli.models.load import load_base_model
    from peftcli.recipe.schema import ModelSection
    from peftcli.tuners.adapter import load_adapter

    device = args.device
    tokenizer = AutoTokenizer.from_pretrained(args.adapter)
    texts = [json.loads(line)["text"] for line in Path(args.data).read_text().splitlines()[:8]]
    rows = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    length = min(128, *(len(r) for r in rows[:2]))
    ids = torch.tensor([r[:length] for r in rows[:2]], device=device)

    def logits(model) -> torch.Tensor:
        model.to(device).eval()
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits.float().cpu()

    figures = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        base = AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype)
        plain = logits(base)
        hf = logits(PeftModel.from_pretrained(base, args.adapter))
        del base
        ours_model = load_base_model(ModelSection(name_or_path=args.base, dtype=name))
        load_adapter(ours_model, args.adapter)
        ours = logits(ours_model)
        del ours_model
        if device == "cuda":
            torch.cuda.empty_cache()
        if name == "fp32":
            scale = float(hf.abs().max())
            effect = float((hf - plain).abs().max())
        tolerance = (1e-4 if name == "fp32" else 4 * BF16_EPS) * scale
        diff = float((ours - hf).abs().max())
        figures[name] = {
            "max_diff": diff,
            "tolerance": tolerance,
            "scale": scale,
            "adapter_effect": float((hf - plain).abs().max()),
            "ok": diff <= tolerance,
        }
    figures["fp32"]["conclusive"] = effect > 10 * figures["fp32"]["tolerance"]
    print("RESULT " + json.dumps(figures))


# --- what a GPU machine without network needs ---------------------------------------------------------------------


def command_assets(args) -> None:
    """SmolLM2's tokenizer and GSM8K (train split) from the example cache, for --assets on another machine."""
    from peftcli.examples.assets import cache_dir

    cache, dest = cache_dir(), Path(args.dest)
    (dest / "tokenizer").mkdir(parents=True, exist_ok=True)
    source = cache / "models" / "SmolLM2-135M-Instruct"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).is_file():
            shutil.copy2(source / name, dest / "tokenizer" / name)
    shutil.copy2(cache / "data" / "gsm8k" / "train.jsonl", dest / "gsm8k.jsonl")
    if (cache / "models" / "tiny-llama").is_dir():
        shutil.copytree(cache / "models" / "tiny-llama", dest / "tiny-llama", dirs_exist_ok=True)
    total = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"{dest}: {total / 2**20:.1f} MiB")


def slim_bitsandbytes(wheel: Path) -> None:
    """Rewrite the bitsandbytes wheel with only the libraries in BNB_KEEP (and its RECORD to match)."""
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        kept = []
        for info in src.infolist():
            name = info.filename
            base = name.rsplit("/", 1)[-1]
            if base.startswith("libbitsandbytes_") and base not in BNB_KEEP:
                continue
            if name.endswith(".dist-info/RECORD"):
                record_name = name
                continue
            data = src.read(info)
            dst.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            kept.append(f"{name},sha256={digest},{len(data)}")
        dst.writestr(record_name, "\n".join([*kept, f"{record_name},,"]) + "\n")
    slim.replace(wheel)


def command_wheels(args) -> None:
    """Download (and build, for sdists) the wheels of WHEELS and SDIST_WHEELS for CPython 3.12 on x86-64."""
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    target = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
    for platform in PLATFORMS:
        target += ["--platform", platform]
    subprocess.run([*pip, "download", "--no-deps", *target, "-d", str(dest), *WHEELS], check=True)
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(dest), *SDIST_WHEELS], check=True)
    for wheel in dest.glob("bitsandbytes-*.whl"):
        slim_bitsandbytes(wheel)
    total = sum(f.stat().st_size for f in dest.glob("*.whl"))
    print(f"{dest}: {len(list(dest.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the suite")
    run.add_argument("--out", default=None, help="the JSON file (default $OUT/gpu_suite.json, else /tmp)")
    run.add_argument("--work", default=None, help="bases, data, runs and logs (default a temporary folder)")
    run.add_argument("--assets", default=None, help="tokenizer/ and gsm8k.jsonl (from `assets`) instead of the cache")
    run.add_argument("--smoke", action="store_true", help="everything on CPU with the tiny shape")
    run.add_argument("--dry-run", action="store_true", help="print the commands only")
    run.add_argument("--deadline", type=float, default=None, help="seconds for the whole suite (470; --smoke 1800)")
    run.add_argument("--budget-scale", type=float, default=None, help="multiply every step's budget")
    sub.add_parser("distributed", help="one launch-preset step (internal; see parse_distributed)")
    cmp_ = sub.add_parser("compare", help="adapter logits, HF PEFT vs peftcli (internal)")
    cmp_.add_argument("--base", required=True)
    cmp_.add_argument("--adapter", required=True)
    cmp_.add_argument("--data", required=True)
    cmp_.add_argument("--device", choices=["cpu", "cuda"], required=True)
    ast = sub.add_parser("assets", help="copy the tokenizer and GSM8K for a machine without the example cache")
    ast.add_argument("--dest", required=True)
    whl = sub.add_parser("wheels", help="download the wheels a bare GPU image lacks")
    whl.add_argument("--dest", required=True)
    if sys.argv[1:2] == ["distributed"]:  # its own parser (parse_distributed), shared with --dry-run
        distributed(parse_distributed(sys.argv[2:]))
        return
    args = parser.parse_args()
    if args.command == "compare":
        compare(args)
    elif args.command == "assets":
        command_assets(args)
    elif args.command == "wheels":
        command_wheels(args)
    else:
        command_run(args)


if __name__ == "__main__":
    main()
