"""`peft merge`: every mergeable method, streamed over a multi-shard base, loads in plain transformers and gives
the logits of base + adapter; wrong bases, existing outputs and non-mergeable methods are refused cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from peftcli.errors import AdapterError, PeftCliError
from peftcli.examples.tiny import write_tiny_encoder, write_tiny_model
from peftcli.export.merge import merge_adapter_dir
from peftcli.tuners.adapter import apply_adapter, load_adapter, save_adapter
from peftcli.tuners.protocol import AdapterContext
from peftcli.tuners.registry import all_tuners, get_tuner

from support import run_cli

pytestmark = pytest.mark.filterwarnings("ignore:The PEFT config.s .base_model_name_or_path. was renamed")

TINY_PARAMS = {
    "lora": {"r": 4},
    "dora": {"r": 4, "dora": True},
    "adalora": {"init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 2, "total_step": 10},
    "vera": {"r": 8},
    "bitfit": {},
}
MERGEABLE = sorted(n for n, s in all_tuners().items() if s.capabilities.mergeable and n != "bitfit") + ["dora"]


@pytest.fixture(scope="module")
def sharded_base(tmp_path_factory) -> Path:
    """The tiny Llama saved in several safetensors shards (about 60 kB each)."""
    path = write_tiny_model(tmp_path_factory.mktemp("sharded") / "model", max_shard_size="60KB")
    assert len(list(path.glob("model-*.safetensors"))) >= 3
    return path


def _params(name: str):
    spec = get_tuner("lora" if name == "dora" else name)
    return spec.params(**TINY_PARAMS.get(name, {}))


def _perturb(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=gen).to(param.dtype))


def _run_dir(
    tmp_path: Path, base: Path, name: str, auto_class: str = "AutoModelForCausalLM", task="causal_lm", params=None
):
    """An adapter directory like a training run leaves: adapter, recipe (naming the base), tokenizer."""
    import transformers

    model = getattr(transformers, auto_class).from_pretrained(base, dtype=torch.float32).eval()
    apply_adapter(model, params or _params(name), AdapterContext(task=task))
    _perturb(model, 7)
    run = tmp_path / "run"
    save_adapter(model, run, base_model_name_or_path=str(base))
    (run / "recipe.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": str(base), "task": task}}))
    transformers.AutoTokenizer.from_pretrained(base).save_pretrained(run)
    return run, model


def _ids() -> torch.Tensor:
    return torch.randint(5, 390, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", MERGEABLE)
def test_merged_model_loads_in_transformers_with_the_same_logits(name, sharded_base, tmp_path, one_torch_thread):
    from transformers import AutoModelForCausalLM

    run, adapted = _run_dir(tmp_path, sharded_base, name)
    with torch.no_grad():
        expected = adapted(input_ids=_ids()).logits
    result = merge_adapter_dir(run, tmp_path / "merged", dtype="fp32", max_shard_size="80KB")
    assert result.shards >= 2 and (tmp_path / "merged" / "model.safetensors.index.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(input_ids=_ids()).logits
    # fp32 throughout; merged and unmerged differ by summation order only (logits reach about 5 here).
    assert (got - expected).abs().max().item() < 3e-5
    assert not any(f.name.startswith(".") for f in tmp_path.iterdir()), "no temporary directory left behind"
    if get_tuner("lora" if name == "dora" else name).capabilities.kind == "wraps_layers":
        assert result.merged_modules > 0


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory) -> Path:
    """The tiny Llama with its output head tied to the input embedding (as SmolLM2, Gemma, Qwen3 ship)."""
    return write_tiny_model(tmp_path_factory.mktemp("tied") / "model", tie_word_embeddings=True)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "embed_tokens"], ["q_proj", "lm_head"]])
def test_a_tied_pair_is_untied_when_the_adapter_changes_one_side(targets, tied_base, tmp_path, one_torch_thread):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    params = get_tuner("lora").params(r=4, target_modules=targets)
    run, adapted = _run_dir(tmp_path, tied_base, "lora", params=params)
    with torch.no_grad():
        expected = adapted(input_ids=_ids()).logits
    result = merge_adapter_dir(run, tmp_path / "merged", dtype="fp32")
    assert any("tie_word_embeddings: false" in note for note in result.notes)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        stored = {key: f.get_tensor(key) for key in ("model.embed_tokens.weight", "lm_head.weight")}
    base = AutoModelForCausalLM.from_pretrained(tied_base, dtype=torch.float32)
    unchanged = "lm_head.weight" if "embed_tokens" in targets else "model.embed_tokens.weight"
    assert torch.equal(stored[unchanged], base.model.embed_tokens.weight.detach())  # the side left as it was
    assert not torch.equal(stored["lm_head.weight"], stored["model.embed_tokens.weight"])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(input_ids=_ids()).logits
    # fp32 throughout, logits about 5: merged and unmerged differ by summation order only.
    assert (got - expected).abs().max().item() < 1e-4


def test_a_tied_pair_the_adapter_leaves_alone_stays_tied(tied_base, tmp_path, one_torch_thread):
    run, _ = _run_dir(tmp_path, tied_base, "lora")  # all-linear: the head is not a target
    result = merge_adapter_dir(run, tmp_path / "merged", dtype="fp32")
    assert not any("tie_word_embeddings" in note for note in result.notes)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is True


def test_bitfit_merges_its_biases_into_a_bert_classifier(tmp_path, one_torch_thread):
    from transformers import AutoModelForSequenceClassification

    base = write_tiny_encoder(tmp_path / "bert", task="seq_cls")
    run, adapted = _run_dir(tmp_path, base, "bitfit", "AutoModelForSequenceClassification", "seq_cls")
    with torch.no_grad():
        expected = adapted(input_ids=_ids()).logits
    merge_adapter_dir(run, tmp_path / "merged", dtype="fp32")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (merged(input_ids=_ids()).logits - expected).abs().max().item() < 1e-5


def test_bf16_output_and_what_is_copied(sharded_base, tmp_path):
    run, _ = _run_dir(tmp_path, sharded_base, "lora")
    merge_adapter_dir(run, tmp_path / "merged")
    out = tmp_path / "merged"
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()
    assert (out / "generation_config.json").is_file()
    from safetensors import safe_open

    with safe_open(str(next(out.glob("*.safetensors"))), framework="pt") as handle:
        assert all(handle.get_tensor(k).dtype == torch.bfloat16 for k in handle.keys())  # noqa: SIM118


def test_a_wrong_base_is_refused_before_anything_is_written(sharded_base, tmp_path):
    run, _ = _run_dir(tmp_path, sharded_base, "lora")
    other = write_tiny_model(tmp_path / "wider", hidden_size=96, intermediate_size=160)
    with pytest.raises(AdapterError, match="adapter does not fit this model: .*lora_A.* has shape"):
        merge_adapter_dir(run, tmp_path / "merged", base=str(other))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "wider"]


def test_an_existing_output_needs_overwrite(sharded_base, tmp_path):
    run, _ = _run_dir(tmp_path, sharded_base, "lora")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PeftCliError, match="already exists; pass --overwrite"):
        merge_adapter_dir(run, out)
    assert (out / "keep.txt").read_text() == "mine"
    merge_adapter_dir(run, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_non_mergeable_methods_are_refused_with_the_reason(sharded_base, tmp_path):
    run, _ = _run_dir(tmp_path, sharded_base, "prompt_tuning")
    with pytest.raises(AdapterError, match="method prompt_tuning cannot be merged: "):
        merge_adapter_dir(run, tmp_path / "merged")


def test_peft_merge_cli_with_verify(sharded_base, tmp_path):
    run, _ = _run_dir(tmp_path, sharded_base, "lora")
    result = run_cli("merge", str(run), "--dtype", "fp32", "--verify")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run-merged" / "config.json").is_file()
    line = next(x for x in result.stdout.splitlines() if x.startswith("verify: "))
    difference = float(line.split("merged model: ", 1)[1].split(" ", 1)[0])
    assert difference < 1e-4 and "(bound " in line
    again = run_cli("merge", str(run))
    assert again.returncode == 2 and "already exists; pass --overwrite" in again.stderr
    bad = run_cli("merge", str(run), "--dtype", "int4", "--output", str(tmp_path / "x"))
    assert bad.returncode == 2 and "--dtype: 'int4' is not one of bf16, fp16, fp32" in bad.stderr


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_verify_passes_a_right_merge_within_the_rounding_of_its_dtype(dtype, tied_base, tmp_path, one_torch_thread):
    from peftcli.export.verify import verify_merged
    from peftcli.models.load import DTYPES

    params = get_tuner("lora").params(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"])
    run, _ = _run_dir(tmp_path, tied_base, "lora", params=params)
    merge_adapter_dir(run, tmp_path / "merged", dtype=dtype)
    result = verify_merged(run, tmp_path / "merged", DTYPES[dtype])
    assert result.passed, result
    assert result.rounding > 0 and (result.rounding > 1e-3) == (dtype == "bf16"), result  # logits reach about 5


def test_verify_refuses_a_wrong_merge_and_publishes_nothing(tied_base, tmp_path, monkeypatch, capsys):
    import peftcli.export.merge as merge_module
    from peftcli.cli.merge import run_merge
    from peftcli.errors import VerificationError

    run, _ = _run_dir(tmp_path, tied_base, "lora")
    real_merge_layer = merge_module._merge_layer

    def merged_twice(layer, prefix, tensors):  # a merge bug: the update folded in twice
        merged = real_merge_layer(layer, prefix, tensors)
        return real_merge_layer(layer, prefix, merged)

    monkeypatch.setattr(merge_module, "_merge_layer", merged_twice)
    with pytest.raises(VerificationError, match="differs from base . adapter by .*; nothing was written") as error:
        run_merge(run, tmp_path / "merged", "fp32", None, None, False, verify=True)
    assert error.value.exit_code == 1
    assert "verify: max |logit difference|" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "neither the output nor a staging directory"


def test_loading_merged_equals_loading_the_adapter_on_the_real_layout(sharded_base, tmp_path):
    """The adapter loads back onto the sharded base as well (the merge did not change the run directory)."""
    from transformers import AutoModelForCausalLM

    run, _ = _run_dir(tmp_path, sharded_base, "ia3")
    before = sorted(p.name for p in run.iterdir())
    merge_adapter_dir(run, tmp_path / "merged", dtype="fp32")
    assert sorted(p.name for p in run.iterdir()) == before
    load_adapter(AutoModelForCausalLM.from_pretrained(sharded_base), run)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_base_stored_quantized_is_dequantized_and_merged(bits, sharded_base, tmp_path, one_torch_thread):
    """A checkpoint saved by bitsandbytes (packed weights + quantization state, split across shards) merges
    into plain float weights: the merged model equals transformers' own dequantization of that checkpoint
    with the adapter on top."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
        if bits == 4
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    stored = tmp_path / f"stored-{bits}bit"
    quantized = AutoModelForCausalLM.from_pretrained(sharded_base, quantization_config=quant, device_map={"": "cpu"})
    quantized.save_pretrained(stored, max_shard_size="40KB")
    assert len(list(stored.glob("model-*.safetensors"))) >= 2
    run, _ = _run_dir(tmp_path, sharded_base, "lora")

    result = merge_adapter_dir(run, tmp_path / "merged", base=str(stored), dtype="fp32", max_shard_size="80KB")
    kind = "nf4" if bits == 4 else "int8"
    assert any(
        f"stored {kind}-quantized (bitsandbytes); its 14 quantized weights were dequantized" in n for n in result.notes
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert not hasattr(merged.config, "quantization_config")

    reference = AutoModelForCausalLM.from_pretrained(stored, device_map={"": "cpu"})
    reference.dequantize()
    reference = reference.float().eval()
    load_adapter(reference, run)
    with torch.no_grad():
        expected = reference(input_ids=_ids()).logits
        got = merged(input_ids=_ids()).logits
    assert (got - expected).abs().max().item() < 3e-5
    # the quantization changed the weights: merging into the original checkpoint gives other logits
    original = merge_adapter_dir(run, tmp_path / "from-original", dtype="fp32")
    from_original = AutoModelForCausalLM.from_pretrained(original.output, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (from_original(input_ids=_ids()).logits - got).abs().max().item() > 1e-3


def test_other_stored_quantizations_are_refused(sharded_base, tmp_path):
    run, _ = _run_dir(tmp_path, sharded_base, "lora")
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    config = json.loads((sharded_base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (gptq / "config.json").write_text(json.dumps(config))
    with pytest.raises(PeftCliError, match="stored gptq-quantized; the merge can dequantize bitsandbytes"):
        merge_adapter_dir(run, tmp_path / "merged", base=str(gptq))
    assert not (tmp_path / "merged").exists()
