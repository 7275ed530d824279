"""Side by side: `peft merge` (peftcli's streaming merge) vs HF PEFT's `merge_and_unload` on the same input.

A random-weight Llama of the chosen shape is written once under --work, straight to bf16 safetensors shards
(tensor by tensor from a meta-device model's key names and shapes, so the whole model is never in memory),
with a random LoRA adapter in HF PEFT format: r=16, alpha 32, on q/k/v/o/gate/up/down of every block, A and
B both random so the merge does real work. Then, each in a fresh process:

    ours      merge_adapter_dir(adapter, out, base=base, dtype="bf16")     (streams tensor by tensor; huge pages on,
              as `peft merge` sets them: --hf-huge-pages gives the HF side the same)
    HF        AutoModelForCausalLM.from_pretrained(base, dtype=bf16) -> PeftModel.from_pretrained(adapter)
              -> merge_and_unload() -> save_pretrained(out, max_shard_size=<the base's>)
    baseline  a process that only imports what ours imports (torch, transformers' Llama, peftcli's merge)

Printed, medians over --rounds (ours and HF alternate): whole-process seconds (the parent's clock, startup
and imports included), in-process seconds (from after the imports, the same on both sides, to the output
written) and peak RSS (the child's own, from wait4), with ratios ours / HF (below 1: ours is faster or
leaner); the largest base shard, the adapter file, and our peak minus (largest shard + adapter), which the
streaming merge should keep near the import baseline. Last, a few tensors of the two outputs are compared
with each other and with W + (alpha/r)·B·A computed in fp32, in bf16 ulps (spacings) of the values: a
correctly rounded merge is within 0.5 ulp of the fp32 result, and the two sides within 1 ulp of each other.

Page cache: the base was just written (or read by the previous child), so both sides read it from memory;
dirty pages are synced before each child starts, so none pays for the previous one's writeback.

    .venv/bin/python bench/merge_vs_hf.py --work /tmp/merge-bench              # Llama-3.2-3B shape, 2GB shards
    .venv/bin/python bench/merge_vs_hf.py --work /tmp/merge-bench --rounds 3
    .venv/bin/python bench/merge_vs_hf.py --shape tiny                         # a seconds-long smoke run

With --gguf QUANT the two sides are both ours, exporting the run to a GGUF file: "staged" is what
`peft export --format gguf` did until it streamed (merge into an fp32 model directory, then convert it), and
"streamed" is what it does now (each merged tensor straight to the quantizer and the file). Printed: seconds,
peak RSS and the staging bytes on disk, with ratios streamed / staged, and whether the two files are identical.

    .venv/bin/python bench/merge_vs_hf.py --work /tmp/merge-bench --gguf q8_0

The 3B shape needs ~20 GB of free disk (base 6.4 GB + two merged copies) and ~10 GB of RAM for the HF side
(--gguf: ~13 GB of disk for the staged side's fp32 copy).
The merged outputs are deleted after the check (--keep-outputs keeps them); the base and adapter stay cached.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    # Llama-3.2-3B's architecture (3.21B parameters, tied embeddings), random weights.
    "llama-3b": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
}
DEFAULT_SHARD_SIZE = {"llama-3b": "2GB", "tiny": "100KB"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, INIT_STD = 16, 32, 0.02
INDEX_NAME = "model.safetensors.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MiB = 2**20


# --- the input: base and adapter ------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    value = text.strip().upper()
    for unit, factor in units.items():
        if value.endswith(unit):
            return int(float(value[: -len(unit)]) * factor)
    return int(value)


def write_base(shape: str, out: Path, shard_size: str) -> None:
    """Random bf16 weights in LlamaForCausalLM's checkpoint layout, written shard by shard."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftcli.examples.tiny import build_tokenizer

    config = LlamaConfig(**SHAPES[shape], dtype=torch.bfloat16)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    # The keys save_pretrained writes: the state dict less tied copies (lm_head.weight here).
    owned = set(dict(model.named_parameters()))
    every_param = set(dict(model.named_parameters(remove_duplicate=False)))
    layout = [(k, tuple(v.shape)) for k, v in model.state_dict().items() if k in owned or k not in every_param]
    del model

    out.mkdir(parents=True, exist_ok=True)
    limit = parse_size(shard_size)
    generator = torch.Generator().manual_seed(0)
    files: list[tuple[str, list[str]]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = total = 0

    def flush() -> None:
        nonlocal pending, pending_bytes, total
        name = f"part-{len(files):05d}.safetensors"
        save_file(pending, str(out / name), metadata={"format": "pt"})
        files.append((name, list(pending)))
        total += pending_bytes
        pending, pending_bytes = {}, 0

    for key, shape_ in layout:
        if key.endswith("norm.weight"):
            tensor = torch.ones(shape_, dtype=torch.bfloat16)  # RMSNorm weights start at 1, as in Llama
        else:
            tensor = torch.empty(shape_, dtype=torch.bfloat16).normal_(0.0, INIT_STD, generator=generator)
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > limit:
            flush()
        pending[key] = tensor
        pending_bytes += size
    flush()

    weight_map = {}
    for i, (name, keys) in enumerate(files, start=1):
        final = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        (out / name).rename(out / final)
        weight_map.update(dict.fromkeys(keys, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    config.save_pretrained(out)
    build_tokenizer().save_pretrained(out)


def write_adapter(shape: str, base: Path, out: Path) -> None:
    """A LoRA adapter in HF PEFT's on-disk format, with random A and B (fp32)."""
    import torch
    from safetensors.torch import save_file

    spec = SHAPES[shape]
    hidden, inter = spec["hidden_size"], spec["intermediate_size"]
    kv = spec["num_key_value_heads"] * hidden // spec["num_attention_heads"]
    shapes = {  # module -> (in_features, out_features), as in LlamaAttention / LlamaMLP
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, kv),
        "self_attn.v_proj": (hidden, kv),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
        "mlp.down_proj": (inter, hidden),
    }
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for layer in range(spec["num_hidden_layers"]):
        for module, (fan_in, fan_out) in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, fan_in, generator=generator) * INIT_STD
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, RANK, generator=generator) * INIT_STD
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {  # the fields HF PEFT writes for a plain LoRA
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "revision": None,
        "inference_mode": True,
        "r": RANK,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.0,
        "target_modules": TARGETS,
        "exclude_modules": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "recipe.yaml").write_text(f"model:\n  name_or_path: {json.dumps(str(base))}\n", encoding="utf-8")


def run_build(args) -> None:
    work = Path(args.work)
    base, adapter = work / f"base-{args.shape}", work / f"adapter-{args.shape}"
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(adapter, ignore_errors=True)
    write_base(args.shape, base, args.shard_size)
    write_adapter(args.shape, base, adapter)
    (work / f"complete-{args.shape}.json").write_text(json.dumps({"shard_size": args.shard_size}) + "\n")
    print("RESULT {}", flush=True)


# --- the two sides ----------------------------------------------------------------------------------------------


def common_imports() -> None:
    """What both sides import before their clocks start: torch and transformers' Llama (imported lazily)."""
    import torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: F401


def run_ours(base: Path, adapter: Path, out: Path, shard_size: str) -> dict:
    from peftcli.cli.merge import use_huge_pages

    use_huge_pages()  # what `peft merge` does before torch loads
    common_imports()
    from peftcli.export.merge import merge_adapter_dir

    started = time.perf_counter()
    result = merge_adapter_dir(adapter, out, base=str(base), dtype="bf16")
    return {"seconds": time.perf_counter() - started, "shards": result.shards, "merged": result.merged_modules}


def run_hf(base: Path, adapter: Path, out: Path, shard_size: str) -> dict:
    common_imports()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
    loaded = time.perf_counter()
    model = PeftModel.from_pretrained(model, str(adapter))
    model = model.merge_and_unload()
    merged = time.perf_counter()
    model.save_pretrained(str(out), max_shard_size=shard_size)
    done = time.perf_counter()
    return {"seconds": done - started, "load_s": loaded - started, "merge_s": merged - loaded, "save_s": done - merged}


def run_gguf_streamed(base: Path, adapter: Path, out: Path, quant: str) -> dict:
    common_imports()
    import peftcli.export.merge  # noqa: F401  (imported before the clock, as the staged side does)
    from peftcli.export.gguf import write_gguf_from_run

    started = time.perf_counter()
    out.mkdir(parents=True)
    # verify off on both sides: the bench compares ways of writing; the read-back check is the same for both
    write_gguf_from_run(adapter, out / "model.gguf", quant, base=str(base), verify=False)
    return {"seconds": time.perf_counter() - started, "staged_bytes": 0}


def run_gguf_staged(base: Path, adapter: Path, out: Path, quant: str) -> dict:
    from peftcli.cli.merge import use_huge_pages

    use_huge_pages()
    common_imports()
    from peftcli.export.gguf import write_gguf
    from peftcli.export.merge import merge_adapter_dir

    started = time.perf_counter()
    out.mkdir(parents=True)
    merge_adapter_dir(adapter, out / "staging", base=str(base), dtype="fp32")
    staged = sum(f.stat().st_size for f in (out / "staging").iterdir())
    write_gguf(out / "staging", out / "model.gguf", quant, metadata_name=adapter.resolve().name, verify=False)
    shutil.rmtree(out / "staging")
    return {"seconds": time.perf_counter() - started, "staged_bytes": staged}


def run_baseline(base: Path, adapter: Path, out: Path, shard_size: str) -> dict:
    common_imports()
    import peftcli.export.merge  # noqa: F401  (ours' imports: the floor of its RSS)

    return {"seconds": 0.0}


def child(args) -> None:
    work = Path(args.work)
    base, adapter = work / f"base-{args.shape}", work / f"adapter-{args.shape}"
    out = work / f"out-{args.child}-{args.shape}"
    if args.child.startswith("gguf-"):
        runner = {"gguf-streamed": run_gguf_streamed, "gguf-staged": run_gguf_staged}[args.child]
        result = runner(base, adapter, out, args.gguf)
    else:
        runner = {"ours": run_ours, "hf": run_hf, "baseline": run_baseline}[args.child]
        result = runner(base, adapter, out, args.shard_size)
    print("RESULT " + json.dumps(result), flush=True)


def spawn(args, side: str) -> dict:
    """Run one side in a fresh interpreter; its peak RSS comes from wait4, its seconds from this clock."""
    command = [sys.executable, __file__, "--shape", args.shape, "--work", args.work, "--shard-size", args.shard_size]
    if args.gguf:
        command += ["--gguf", args.gguf]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if side == "hf" and args.hf_huge_pages:
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        started = time.perf_counter()
        proc = subprocess.Popen([*command, "--child", side], stdout=stdout, stderr=stderr, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"{side} failed (exit {proc.returncode}):\n{err[-4000:]}")
    result = json.loads(line.removeprefix("RESULT "))
    result["process_seconds"] = seconds
    result["peak_rss_mib"] = usage.ru_maxrss * 1024 / MiB  # Linux reports KiB
    return result


# --- the check --------------------------------------------------------------------------------------------------


def run_check(args) -> None:
    """Compare a few tensors of the two outputs with each other and with the fp32 merge; prints a JSON line."""
    import torch
    from safetensors import safe_open

    work = Path(args.work)
    base, adapter = work / f"base-{args.shape}", work / f"adapter-{args.shape}"
    dirs = {side: work / f"out-{side}-{args.shape}" for side in ("ours", "hf")}

    def weight_map(directory: Path) -> dict[str, str]:
        index = directory / INDEX_NAME
        if index.is_file():
            return json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
            return dict.fromkeys(handle.keys(), "model.safetensors")  # noqa: SIM118

    maps = {name: weight_map(d) for name, d in {**dirs, "base": base}.items()}

    def read(name: str, key: str) -> torch.Tensor:
        directory = dirs.get(name, base)
        with safe_open(str(directory / maps[name][key]), framework="pt") as handle:
            return handle.get_tensor(key)

    def shapes(name: str) -> dict[str, tuple]:
        found = {}
        directory = dirs[name]
        for file in sorted(set(maps[name].values())):
            with safe_open(str(directory / file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118
                    found[key] = (tuple(handle.get_slice(key).get_shape()), handle.get_slice(key).get_dtype())
        return found

    ours_keys, hf_keys = shapes("ours"), shapes("hf")
    report = {
        "same_keys_and_shapes": ours_keys == hf_keys,
        "keys_only_ours": sorted(set(ours_keys) - set(hf_keys))[:5],
        "keys_only_hf": sorted(set(hf_keys) - set(ours_keys))[:5],
        "tensors": {},
    }
    last = SHAPES[args.shape]["num_hidden_layers"] - 1
    picks = {
        "model.layers.0.self_attn.q_proj.weight": "model.layers.0.self_attn.q_proj",
        f"model.layers.{last}.mlp.down_proj.weight": f"model.layers.{last}.mlp.down_proj",
        "model.embed_tokens.weight": None,
    }
    with safe_open(str(adapter / ADAPTER_WEIGHTS), framework="pt") as handle:
        lora = {key: handle.get_tensor(key) for key in handle.keys() if any(m and m in key for m in picks.values())}  # noqa: SIM118

    def ulps(a: torch.Tensor, b: torch.Tensor) -> float:
        """Largest |a - b| in units of the bf16 spacing at max(|a|, |b|) (bf16 keeps 8 significant bits)."""
        a, b = a.float(), b.float()
        scale = torch.maximum(a.abs(), b.abs()).clamp_min(2.0**-126)
        spacing = torch.exp2(torch.floor(torch.log2(scale)) - 7)
        return float(((a - b).abs() / spacing).max())

    for key, module in picks.items():
        ours, hf, original = read("ours", key), read("hf", key), read("base", key)
        entry = {
            "dtypes": f"{ours.dtype}/{hf.dtype}",
            "max_abs_diff": float((ours.float() - hf.float()).abs().max()),
            "ulps_ours_vs_hf": ulps(ours, hf),
            "changed_vs_base": float((ours.float() - original.float()).abs().max()),
        }
        if module is not None:
            a = lora[f"base_model.model.{module}.lora_A.weight"]
            b = lora[f"base_model.model.{module}.lora_B.weight"]
            reference = original.float() + (ALPHA / RANK) * (b @ a)
            entry["ulps_ours_vs_fp32"] = ulps(ours, reference)
            entry["ulps_hf_vs_fp32"] = ulps(hf, reference)
        report["tensors"][key] = entry
    print("RESULT " + json.dumps(report), flush=True)


# --- driver -----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3b")
    parser.add_argument("--work", default=None, help="caches the base and adapter between runs (default: a temp dir)")
    parser.add_argument("--shard-size", default=None, help="base shards and HF's output (default 2GB; tiny 100KB)")
    parser.add_argument("--rounds", type=int, default=1, help="alternate ours/HF this many times; medians shown")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the two merged model directories")
    parser.add_argument(
        "--hf-huge-pages", action="store_true", help="give the HF side THP_MEM_ALLOC_ENABLE=1 too, as `peft merge` sets"
    )
    parser.add_argument("--gguf", choices=["f32", "f16", "bf16", "q8_0"], help="GGUF export: streamed vs staged")
    parser.add_argument(
        "--child",
        choices=["build", "ours", "hf", "baseline", "check", "gguf-streamed", "gguf-staged"],
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args()
    args.shard_size = args.shard_size or DEFAULT_SHARD_SIZE[args.shape]
    if args.child:
        {"build": run_build, "check": run_check}.get(args.child, child)(args)
        return

    args.work = str(Path(args.work or tempfile.mkdtemp(prefix="peftcli-merge-bench-")).resolve())
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base, adapter = work / f"base-{args.shape}", work / f"adapter-{args.shape}"
    marker = work / f"complete-{args.shape}.json"
    if not marker.is_file() or json.loads(marker.read_text())["shard_size"] != args.shard_size:
        started = time.perf_counter()
        spawn(args, "build")  # in a child: this process stays small, so it adds nothing to the children's RSS
        print(f"base and adapter written in {time.perf_counter() - started:.1f}s under {work}", flush=True)
    else:
        print(f"using the cached base and adapter under {work}", flush=True)

    if args.gguf:
        compare_gguf(args, work)
        return

    results: dict[str, list[dict]] = {"ours": [], "hf": [], "baseline": []}
    for round_ in range(args.rounds):
        for side in ("baseline", "ours", "hf"):
            shutil.rmtree(work / f"out-{side}-{args.shape}", ignore_errors=True)
            os.sync()  # no writeback of the previous child's files (or the build's) during this one's clock
            results[side].append(spawn(args, side))
            print(f"round {round_ + 1} {side}: {json.dumps(results[side][-1])}", flush=True)
    check = spawn(args, "check")
    if not args.keep_outputs:
        for side in ("ours", "hf"):
            shutil.rmtree(work / f"out-{side}-{args.shape}", ignore_errors=True)

    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in results[side])

    index = json.loads((base / INDEX_NAME).read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    largest = max((base / f).stat().st_size for f in shard_files) / MiB
    adapter_mib = (adapter / ADAPTER_WEIGHTS).stat().st_size / MiB
    params = index["metadata"]["total_size"] / 2 / 1e9
    spec = SHAPES[args.shape]
    print(
        f"\nMerge LoRA r={RANK} alpha={ALPHA} ({len(TARGETS)} projections x {spec['num_hidden_layers']} layers) "
        f"into {args.shape} ({params:.2f}B params, bf16, {len(shard_files)} shards <= {args.shard_size}), "
        f"{args.rounds} round(s), medians"
    )
    print(f"{'':34}{'peftcli':>12}{'HF PEFT':>12}{'ratio':>9}")
    for key, label in (("process_seconds", "whole process seconds"), ("seconds", "in-process seconds")):
        ours, hf = median("ours", key), median("hf", key)
        print(f"{label:34}{ours:12.1f}{hf:12.1f}{ours / hf:9.2f}")
    ours_rss, hf_rss = median("ours", "peak_rss_mib"), median("hf", "peak_rss_mib")
    print(f"{'peak RSS MiB':34}{ours_rss:12.0f}{hf_rss:12.0f}{ours_rss / hf_rss:9.2f}")
    hf_phases = ", ".join(f"{k.removesuffix('_s')} {median('hf', k):.1f}s" for k in ("load_s", "merge_s", "save_s"))
    print(f"HF phases: {hf_phases}")
    baseline = median("baseline", "peak_rss_mib")
    over = ours_rss - largest - adapter_mib
    print(f"{'largest base shard MiB':34}{largest:12.0f}")
    print(f"{'adapter file MiB':34}{adapter_mib:12.1f}")
    print(f"{'import baseline peak RSS MiB':34}{baseline:12.0f}")
    beyond = f"(import baseline {baseline:.0f}; {over - baseline:+.0f} beyond it)"
    print(f"{'ours peak - (shard + adapter) MiB':34}{over:12.0f}   {beyond}")
    print(f"{'HF peak - model size MiB':34}{hf_rss - index['metadata']['total_size'] / MiB:12.0f}")
    print(f"\noutputs: same keys, shapes and dtypes: {check['same_keys_and_shapes']}", end="")
    if not check["same_keys_and_shapes"]:
        print(f" (only ours: {check['keys_only_ours']}, only HF: {check['keys_only_hf']})", end="")
    print()
    print(f"{'tensor':44}{'max|ours-HF|':>13}{'ulps':>6}{'ours vs fp32':>14}{'HF vs fp32':>12}{'max|Δ base|':>13}")
    for key, t in check["tensors"].items():
        vs = [f"{t[k]:.2f}" if k in t else "-" for k in ("ulps_ours_vs_fp32", "ulps_hf_vs_fp32")]
        print(
            f"{key:44}{t['max_abs_diff']:13.2e}{t['ulps_ours_vs_hf']:6.2f}{vs[0]:>14}{vs[1]:>12}"
            f"{t['changed_vs_base']:13.2e}"
        )
    print("(ulps: largest difference in bf16 spacings of the values; fp32: W + (alpha/r)·B·A in fp32)")


def compare_gguf(args, work: Path) -> None:
    """The GGUF export of the run, staged (merge to fp32, then convert) against streamed, side by side."""
    import hashlib

    sides = ("gguf-staged", "gguf-streamed")
    results: dict[str, list[dict]] = {side: [] for side in sides}
    digests = {}
    for round_ in range(args.rounds):
        for side in sides:
            out = work / f"out-{side}-{args.shape}"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            results[side].append(spawn(args, side))
            print(f"round {round_ + 1} {side}: {json.dumps(results[side][-1])}", flush=True)
            with open(out / "model.gguf", "rb") as handle:
                digests[side] = hashlib.file_digest(handle, "sha256").hexdigest()
            gguf_bytes = (out / "model.gguf").stat().st_size
            if not args.keep_outputs:
                shutil.rmtree(out, ignore_errors=True)

    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in results[side])

    print(f"\nGGUF export ({args.gguf}) of LoRA r={RANK} on {args.shape}, {args.rounds} round(s), medians")
    print(f"{'':34}{'staged':>12}{'streamed':>12}{'ratio':>9}")
    for key, label in (("process_seconds", "whole process seconds"), ("seconds", "in-process seconds")):
        staged, streamed = median("gguf-staged", key), median("gguf-streamed", key)
        print(f"{label:34}{staged:12.1f}{streamed:12.1f}{streamed / staged:9.2f}")
    staged, streamed = median("gguf-staged", "peak_rss_mib"), median("gguf-streamed", "peak_rss_mib")
    print(f"{'peak RSS MiB':34}{staged:12.0f}{streamed:12.0f}{streamed / staged:9.2f}")
    print(f"{'staging on disk GB':34}{median('gguf-staged', 'staged_bytes') / 1e9:12.2f}{0:12.2f}")
    print(f"{'GGUF file GB':34}{gguf_bytes / 1e9:12.2f}")
    print(f"the two files are byte-identical: {digests['gguf-staged'] == digests['gguf-streamed']}")


if __name__ == "__main__":
    main()
