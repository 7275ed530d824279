"""`peft merge A B --combine RULE`: each rule equals HF PEFT's add_weighted_adapter on the same adapters, the
combined adapter loads in HF PEFT, the merged model equals base + combined adapter, and impossible requests are
refused before anything is written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from peftcli.export.combine import RULES, combine_loras, module_order, read_lora_source
from peftcli.tuners.adapter import apply_adapter, save_adapter
from peftcli.tuners.protocol import AdapterContext
from peftcli.tuners.registry import get_tuner

from support import logits, max_diff, perturb, run_cli

pytestmark = pytest.mark.filterwarnings("ignore:The PEFT config.s .base_model_name_or_path. was renamed")
EPS = torch.finfo(torch.float32).eps


def _adapter(tmp_path: Path, base: Path, name: str, seed: int, **params) -> Path:
    """A LoRA adapter saved by our code, its tensors moved off their initial values by seeded noise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    apply_adapter(model, get_tuner("lora").params(**{"r": 4, "alpha": 8, **params}), AdapterContext())
    perturb(model, seed=seed, scale=0.2)
    out = tmp_path / name
    save_adapter(model, out, base_model_name_or_path=str(base))
    (out / "recipe.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": str(base), "dtype": "fp32"}}))
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir):
    """Two rank-4 adapters of the tiny Llama: different noise, alphas and (partly) targets."""
    root = tmp_path_factory.mktemp("combine")
    a = _adapter(root, tiny_model_dir, "a", 1, target_modules=["q_proj", "v_proj", "down_proj"])
    b = _adapter(root, tiny_model_dir, "b", 2, alpha=4, target_modules=["q_proj", "k_proj", "down_proj"])
    return a, b


def _hf_combination(base_dir, dirs, weights, rule, **kwargs) -> dict[str, torch.Tensor]:
    """HF PEFT's add_weighted_adapter on the same adapters: the new adapter's tensors by module name."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name="s0")
    for i, path in enumerate(dirs[1:], 1):
        model.load_adapter(str(path), adapter_name=f"s{i}")
    names = [f"s{i}" for i in range(len(dirs))]
    model.add_weighted_adapter(names, weights, "combined", combination_type=rule, **kwargs)
    out = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "combined" in module.lora_A:
            out[name] = (module.lora_A["combined"].weight.detach(), module.lora_B["combined"].weight.detach())
    return out


CASES = {
    "linear": {},
    "cat": {},
    "svd": {},
    "ties": {"density": 0.5},
    "ties_svd": {"density": 0.5, "majority_sign": "frequency"},
    "dare_linear": {"density": 0.6},
    "dare_ties": {"density": 0.5},
    "dare_linear_svd": {"density": 0.7},
    "dare_ties_svd": {"density": 0.5},
    "magnitude_prune": {"density": 0.3},
    "magnitude_prune_svd": {"density": 0.4, "rank": 3},
}


def test_every_rule_is_tested():
    assert set(CASES) == set(RULES)


class _SharedMasks:
    """DARE's masks as our code draws them, handed to HF PEFT in the same order.

    HF PEFT draws its masks from torch's global generator after initialising the new adapter's A matrices from
    it, so its masks depend on how many numbers that initialisation took; ours come from a generator seeded by
    --seed alone. The rules are compared with the same masks; the order they are handed over in is checked by
    their shapes, and the draws by their count.
    """

    def __init__(self, monkeypatch):
        self.masks, self.original, self.monkeypatch = [], torch.bernoulli, monkeypatch

    def record(self):
        def recording(*args, **kwargs):
            mask = self.original(*args, **kwargs)
            self.masks.append(mask)
            return mask

        self.monkeypatch.setattr(torch, "bernoulli", recording)

    def replay(self):
        def replaying(probabilities, *args, **kwargs):
            mask = self.masks.pop(0)
            assert mask.shape == probabilities.shape
            return mask

        self.monkeypatch.setattr(torch, "bernoulli", replaying)


@pytest.mark.parametrize("rule", sorted(CASES))
def test_rule_equals_hf_peft(rule, pair, tiny_model_dir, one_torch_thread, monkeypatch):
    options = CASES[rule]
    weights = [0.7, -0.4]
    sources = [read_lora_source(path) for path in pair]
    masks = _SharedMasks(monkeypatch)
    random = rule.startswith("dare")
    if random:
        masks.record()
    order = module_order(sources[0]) if random else None
    ours = combine_loras(sources, weights, rule, seed=11 if random else None, module_order=order, **options)
    if random:
        assert masks.masks
        masks.replay()
    hf_kwargs = {"density": options.get("density"), "majority_sign_method": options.get("majority_sign", "total")}
    if "rank" in options:
        hf_kwargs["svd_rank"] = options["rank"]
    theirs = _hf_combination(tiny_model_dir, pair, weights, rule, **hf_kwargs)
    assert not masks.masks or not random, "HF PEFT drew fewer masks"
    assert set(ours.modules) == set(theirs)
    worst = 0.0
    for name, (a, b) in ours.modules.items():
        ha, hb = theirs[name]
        for mine, hf in ((a, ha), (b, hb)):
            assert mine.shape == hf.shape, name
            # fp32, the same operations in the same order: a few ulps of the largest entry at most.
            scale = max(hf.abs().max().item(), 1e-12)
            assert max_diff(mine, hf) <= 64 * EPS * scale, (name, max_diff(mine, hf), scale)
            worst = max(worst, max_diff(mine, hf))
    print(f"{rule}: max |ours - HF PEFT| = {worst:.3g}")


def test_combined_adapter_loads_in_hf_peft_with_our_logits(pair, tiny_model_dir, tmp_path, input_ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftcli.tuners.adapter import load_adapter

    out = tmp_path / "ties"
    result = run_cli("merge", *map(str, pair), "--combine", "ties", "--weights", "1,1", "--density", "0.5",
                     "--as", "adapter", "-o", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 4 and config["use_rslora"] is False
    record = json.loads((out / "combination.json").read_text())
    assert record["rule"] == "ties" and [s["weight"] for s in record["combined_from"]] == [1.0, 1.0]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    hf = PeftModel.from_pretrained(base, str(out)).eval()
    ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    load_adapter(ours, out)
    expected = logits(ours, input_ids)
    assert max_diff(logits(hf, input_ids), expected) <= 1e-4 * expected.abs().max().item()


def test_merged_model_equals_base_plus_combined_adapter(pair, tiny_model_dir, tmp_path, input_ids):
    from transformers import AutoModelForCausalLM

    from peftcli.tuners.adapter import load_adapter

    adapter, merged = tmp_path / "cat-adapter", tmp_path / "cat-model"
    common = [*map(str, pair), "--combine", "cat", "--weights", "0.6,0.4"]
    assert run_cli("merge", *common, "--as", "adapter", "-o", str(adapter)).returncode == 0
    result = run_cli("merge", *common, "--dtype", "fp32", "-o", str(merged))
    assert result.returncode == 0, result.stderr
    assert "combined by cat" in result.stdout
    assert (merged / "combination.json").is_file()
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    load_adapter(reference, adapter)
    expected = logits(reference, input_ids)
    got = logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval(), input_ids)
    assert max_diff(got, expected) <= 1e-4 * expected.abs().max().item()


@pytest.fixture(scope="module")
def odd_ones(tmp_path_factory, tiny_model_dir):
    """Adapters that cannot join the pair: one of another base, a DoRA one."""
    from peftcli.examples.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("odd")
    other_base = write_tiny_model(root / "other-base", seed=5)
    return {
        "other_base": _adapter(root, other_base, "other", 3),
        "dora": _adapter(root, tiny_model_dir, "dora", 3, dora=True),
    }


def _refused(*args: str, tmp_path: Path, message: str) -> None:
    out = tmp_path / "out"
    result = run_cli("merge", *args, "-o", str(out))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists() and not list(tmp_path.glob(".*out*"))


def test_refusals(pair, odd_ones, tiny_model_dir, tmp_path):
    a, b = map(str, pair)
    _refused(a, b, tmp_path=tmp_path, message="--combine RULE")
    _refused(a, b, "--combine", "average", tmp_path=tmp_path, message="is not a rule")
    _refused(a, b, "--combine", "ties", "--weights", "1,1,1", tmp_path=tmp_path, message="3 weights for 2 adapters")
    _refused(a, b, "--combine", "ties", tmp_path=tmp_path, message="needs --density")
    _refused(a, b, "--combine", "ties", "--density", "1.5", tmp_path=tmp_path, message="outside (0, 1]")
    _refused(a, b, "--combine", "linear", "--density", "0.5", tmp_path=tmp_path, message="--density goes with")
    _refused(a, "--combine", "ties", tmp_path=tmp_path, message="two or more adapter directories")
    _refused(a, str(odd_ones["other_base"]), "--combine", "cat", tmp_path=tmp_path, message="same base model")
    _refused(a, str(odd_ones["dora"]), "--combine", "cat", tmp_path=tmp_path, message="DoRA adapter cannot be")
    _refused(a, b, "--combine", "cat", "--as", "adapter", "--dtype", "fp16", tmp_path=tmp_path, message="--dtype")
    existing = tmp_path / "out"
    existing.mkdir()
    result = run_cli("merge", a, b, "--combine", "cat", "--as", "adapter", "-o", str(existing))
    assert result.returncode == 2 and "already exists" in result.stderr
    assert list(existing.iterdir()) == []


def test_linear_needs_one_rank(pair, tiny_model_dir, tmp_path):
    other = _adapter(tmp_path, tiny_model_dir, "r8", 4, r=8, target_modules=["q_proj"])
    out = tmp_path / "x"
    result = run_cli("merge", str(pair[0]), str(other), "--combine", "linear", "--as", "adapter", "-o", str(out))
    assert result.returncode == 2 and "needs one rank everywhere" in result.stderr
    ok = run_cli("merge", str(pair[0]), str(other), "--combine", "svd", "--as", "adapter", "-o", str(out))
    assert ok.returncode == 0, ok.stderr
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8


def _task_rows(kind: str, count: int, seed: int) -> list[dict]:
    import random

    from peftcli.examples.tiny import WORDS

    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = [rng.choice(WORDS[:26]) for _ in range(rng.randint(3, 5))]
        answer = words[::-1] if kind == "reverse" else [w.upper() for w in words]
        rows.append({"prompt": f"{kind} " + " ".join(words), "completion": " ".join(answer)})
    return rows


def test_ties_keeps_both_skills(tiny_model_dir, tmp_path, one_torch_thread):
    """Two runs on two toy tasks, combined by TIES: the merged model beats the base on both tasks."""
    from peftcli.examples.tiny import write_jsonl
    from peftcli.recipe.load import load_recipe
    from peftcli.serve.score import DataChoice, evaluate_run
    from peftcli.train.loop import train

    from support import make_recipe, write_recipe

    runs, evals = [], {}
    for seed, kind in enumerate(("reverse", "upper")):
        data = write_jsonl(tmp_path / f"{kind}.jsonl", _task_rows(kind, 200, seed))
        evals[kind] = write_jsonl(tmp_path / f"{kind}-eval.jsonl", _task_rows(kind, 24, 100 + seed))
        recipe = make_recipe(tmp_path, tiny_model_dir, data, training={"max_steps": 30, "batch_size": 8,
                             "learning_rate": 3e-3}, output={"dir": str(tmp_path / f"run-{kind}")})  # fmt: skip
        recipe["data"].pop("validation")
        train(load_recipe(write_recipe(tmp_path / f"{kind}.yaml", recipe)))
        runs.append(tmp_path / f"run-{kind}")
    merged = tmp_path / "merged"
    result = run_cli("merge", *map(str, runs), "--combine", "ties", "--weights", "1,1", "--density", "0.5",
                     "--dtype", "fp32", "-o", str(merged))  # fmt: skip
    assert result.returncode == 0, result.stderr

    def loss(target: Path, kind: str) -> float:
        return evaluate_run(target, DataChoice(str(evals[kind]), "prompt_completion"))["eval_loss"]

    for kind, run in zip(("reverse", "upper"), runs, strict=True):
        base, trained, combined = loss(tiny_model_dir, kind), loss(run, kind), loss(merged, kind)
        print(f"{kind}: base {base:.3f}, its own adapter {trained:.3f}, TIES-combined {combined:.3f}")
        assert trained < base and combined < base


def test_eval_scores_a_combined_adapter_directory(pair, tmp_path, copy_data):
    """A combined adapter has no training recipe: peft eval scores it on --data, and says so without."""
    out = tmp_path / "combined"
    assert run_cli("merge", *map(str, pair), "--combine", "svd", "--as", "adapter", "-o", str(out)).returncode == 0
    scored = run_cli("eval", str(out), "--data", str(copy_data), "--format", "prompt_completion", "--max-samples",
                     "8", "--json")  # fmt: skip
    assert scored.returncode == 0, scored.stderr
    assert math.isfinite(json.loads(scored.stdout.strip().splitlines()[-1])["eval_loss"])
    refused = run_cli("eval", str(out))
    assert refused.returncode == 2 and "pass --data FILE and --format F" in refused.stderr


def test_rslora_sources_are_scaled_by_their_own_rule(pair, tiny_model_dir, tmp_path, one_torch_thread):
    """An rsLoRA source enters with alpha/sqrt(r), as HF PEFT scales it; the result is written at scale 1."""
    rs = _adapter(tmp_path, tiny_model_dir, "rs", 5, rslora=True, target_modules=["q_proj", "v_proj"])
    sources = [read_lora_source(pair[0]), read_lora_source(rs)]
    ours = combine_loras(sources, [0.5, 1.0], "cat")
    theirs = _hf_combination(tiny_model_dir, [pair[0], rs], [0.5, 1.0], "cat")
    for name, (a, b) in ours.modules.items():
        assert max_diff(a, theirs[name][0]) == 0 and max_diff(b, theirs[name][1]) == 0
    out = tmp_path / "combined"
    result = run_cli("merge", str(pair[0]), str(rs), "--combine", "cat", "--as", "adapter", "-o", str(out))
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["lora_alpha"] == config["r"] == 8
