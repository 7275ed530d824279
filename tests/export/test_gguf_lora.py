"""`peft export RUN --format gguf-lora`: the LoRA adapter as llama.cpp's GGUF adapter. llama.cpp itself (xllamacpp's
server, base GGUF + `--lora`) must run it like transformers runs base + adapter; a file with the q/k rows left
unpermuted or rsLoRA's scale left out must fail that same check; what the file cannot express is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import yaml
from test_gguf import LOGPROB_LIMITS, _check_reply, _hf_greedy, _prompts, llama_server

from peftcli.errors import AdapterError, PeftCliError, VerificationError
from peftcli.examples.tiny import write_tiny_model
from peftcli.export import gguf_lora
from peftcli.export.gguf import permute_rows, write_gguf
from peftcli.export.gguf_lora import rounding_bound, write_gguf_lora
from peftcli.tuners.adapter import apply_adapter, load_adapter, save_adapter
from peftcli.tuners.protocol import AdapterContext
from peftcli.tuners.registry import get_tuner

from support import perturb, run_cli

pytestmark = pytest.mark.filterwarnings("ignore:The PEFT config.s .base_model_name_or_path. was renamed")

# Every linear layer, the embedding and the untied head; rsLoRA with a rank pattern, so the file's one alpha
# cannot give every layer its scale (down_proj's is multiplied into its lora_b).
LORA = {
    "r": 4,
    "alpha": 8,
    "rslora": True,
    "rank_pattern": {"down_proj": 2},
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    + ["embed_tokens", "lm_head"],
}
# llama.cpp (base f32 GGUF + adapter) vs transformers (base + adapter, fp32): worst next-token log-prob difference
# along greedy continuations of 4 prompts, where the adapter moves log-probs by up to 9.7. Measured: f32 0.020
# (llama.cpp's kernels; the merged f32 GGUF is as far), f16 0.023, q8_0 0.067 (llama.cpp also rounds the layer
# input to 8 bits for a Q8_0 lora_a); the unpermuted file 5.7, the one without rsLoRA's scale 8.4.
LIMITS = {"f32": LOGPROB_LIMITS["f32"], "f16": LOGPROB_LIMITS["f16"], "q8_0": 0.3}


def _hf(model_dir: Path, adapter_dir: Path | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    return model


def _run(tmp: Path, base: Path, method: str = "lora", **params) -> Path:
    """An adapter directory as a run leaves it, moved off its initialisation so every factor matters."""
    model = _hf(base)
    torch.manual_seed(0)
    apply_adapter(model, get_tuner(method).params(**params), AdapterContext())
    perturb(model, seed=3, scale=0.05)
    run = tmp / f"run-{method}"
    save_adapter(model, run, base_model_name_or_path=str(base))
    (run / "recipe.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": str(base)}}))
    return run


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    """The tiny base as an f32 GGUF (what `peft export BASE --format gguf` writes), a LoRA run, and the run's
    adapter as GGUF files: right ones in three types, and two wrong ones."""
    tmp = tmp_path_factory.mktemp("gguf-lora")
    base = tiny_model_dir
    base_gguf = write_gguf(base, tmp / "gguf" / "base.gguf", "f32")
    run = _run(tmp, base, **LORA)
    files = {quant: write_gguf_lora(run, tmp / "gguf" / f"lora-{quant}.gguf", quant).output for quant in LIMITS}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf_lora, "rope_permuted_heads", lambda config, name: 0)
        files["unpermuted"] = write_gguf_lora(run, tmp / "gguf" / "unpermuted.gguf").output
    # what llama.cpp's own converter writes for rsLoRA: alpha as trained, so llama.cpp scales by alpha / r
    plain = tmp / "run-no-rslora"
    shutil.copytree(run, plain)
    config = json.loads((plain / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": False}))
    files["alpha as trained"] = write_gguf_lora(plain, tmp / "gguf" / "plain-alpha.gguf").output
    return base, base_gguf, run, files


def test_llama_cpp_applies_the_adapter_like_transformers(exported, one_torch_thread):
    base, base_gguf, run, files = exported
    model, bare = _hf(base, run), _hf(base)
    prompts = _prompts()
    with torch.no_grad():  # the adapter matters: without it the next-token log-probs are far off
        batch = torch.tensor(prompts)
        moved = (torch.log_softmax(model(batch).logits, -1) - torch.log_softmax(bare(batch).logits, -1)).abs()
    assert moved.max() > 3, moved.max()
    names = list(files)

    def reply(post, prompt, which: str) -> dict:
        scales = [{"id": i, "scale": float(name == which)} for i, name in enumerate(names)]
        body = {"prompt": prompt, "n_predict": 8, "temperature": 0, "return_tokens": True, "cache_prompt": False}
        return post("/completion", {**body, "n_probs": 400, "lora": scales})

    with llama_server(base_gguf, tuple(files.values())) as post:
        assert [Path(a["path"]).name for a in post("/lora-adapters")] == [f.name for f in files.values()]
        replies = {name: [reply(post, prompt, name) for prompt in prompts] for name in names}
    for quant, limit in LIMITS.items():
        clear = [_check_reply(model, p, r, limit) for p, r in zip(prompts, replies[quant], strict=True)]
        if quant == "f32":  # where no step is a near-tie, llama.cpp's greedy tokens are transformers'
            assert any(clear)
            for prompt, answer, is_clear in zip(prompts, replies[quant], clear, strict=True):
                if is_clear:
                    assert answer["tokens"] == _hf_greedy(model, prompt, 8)
    for wrong in ("unpermuted", "alpha as trained"):  # the same check catches a wrong layout or scale
        with pytest.raises(AssertionError):
            for prompt, answer in zip(prompts, replies[wrong], strict=True):
                _check_reply(model, prompt, answer, LIMITS["f32"])


def test_layout_follows_llama_cpp(exported):
    """Names from the base GGUF's tensors, A/B orientation (token_embd's A transposed), q/k rows permuted like the
    full export's weights, and alpha such that llama.cpp's alpha / r is rsLoRA's alpha / sqrt(r)."""
    from safetensors.torch import load_file

    base, base_gguf, run, files = exported
    reader = gguf.GGUFReader(files["f32"])
    fields = {key: reader.fields[key].contents() for key in ("general.type", "general.architecture", "adapter.type")}
    assert fields == {"general.type": "adapter", "general.architecture": "llama", "adapter.type": "lora"}
    alpha = reader.fields["adapter.lora.alpha"].contents()
    assert alpha == pytest.approx(8 * 4**0.5)  # rsLoRA: alpha / sqrt(4) = (alpha * 2) / 4
    stored = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    base_names = {t.name for t in gguf.GGUFReader(base_gguf).tensors}
    assert {name.rsplit(".", 1)[0] for name in stored} <= base_names
    assert len(stored) == 2 * (7 * 2 + 2)
    source = {
        k.removeprefix("base_model.model."): v.numpy() for k, v in load_file(run / "adapter_model.safetensors").items()
    }
    layer = "model.layers.1."
    assert np.array_equal(stored["blk.1.attn_v.weight.lora_a"], source[layer + "self_attn.v_proj.lora_A.weight"])
    assert np.array_equal(stored["blk.1.attn_v.weight.lora_b"], source[layer + "self_attn.v_proj.lora_B.weight"])
    assert np.array_equal(
        stored["blk.1.attn_q.weight.lora_b"], permute_rows(source[layer + "self_attn.q_proj.lora_B.weight"], 4)
    )
    assert np.array_equal(
        stored["blk.1.attn_k.weight.lora_b"], permute_rows(source[layer + "self_attn.k_proj.lora_B.weight"], 2)
    )
    assert np.array_equal(stored["token_embd.weight.lora_a"], source["model.embed_tokens.lora_embedding_A"].T)
    assert stored["token_embd.weight.lora_a"].shape == (400, 4)
    assert np.array_equal(stored["output.weight.lora_b"], source["lm_head.lora_B.weight"])
    # down_proj has rank 2: rsLoRA's scale 8 / sqrt(2) against the file's alpha / 2; the ratio goes into lora_b
    ratio = (8 / 2**0.5) * 2 / alpha
    down = source[layer + "mlp.down_proj.lora_B.weight"]
    assert stored["blk.1.ffn_down.weight.lora_b"] == pytest.approx(down * ratio, rel=1e-6)
    assert stored["blk.1.ffn_down.weight.lora_a"].shape == (2, 128)


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0"])
def test_rounding_bound_is_tight(quant):
    """The read-back check's bound holds for what gguf's quantizer does, and a change of one step exceeds it."""
    qtype = gguf.GGMLQuantizationType[quant.upper()]
    values = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32) * np.float32(3e-3)
    values[0, :4] = [0.0, 1e-9, -7e-6, 65000.0 if quant != "q8_0" else 1.0]
    stored = gguf.quants.dequantize(gguf.quants.quantize(values, qtype), qtype)
    bound = rounding_bound(values, qtype)
    assert (np.abs(stored - values) <= bound).all()
    assert (np.abs(stored - values) > bound / 4).any()  # not loose by orders of magnitude
    assert not (np.abs(stored + 2 * bound - values) <= bound).all()


# ---------------------------------------------------------------- the command line, refusals, nothing half-written


def test_cli_writes_verifies_and_says_how_to_use_it(exported, tmp_path):
    _, _, run, files = exported
    out = tmp_path / "adapter.gguf"
    result = run_cli("export", str(run), "--format", "gguf-lora", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "verify: read back all 32 factors, equal to the adapter's" in result.stdout
    assert "(f32, llama, alpha 16, ranks 2-4, 16 weights)" in result.stdout
    assert "llama-server -m BASE.gguf --lora" in result.stdout
    assert out.read_bytes() == files["f32"].read_bytes()
    again = run_cli("export", str(run), "--format", "gguf-lora", "-o", str(out), "--quant", "q4_k")
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        "error: --quant: 'q4_k' is not one of f32, f16, bf16, q8_0"
    ], again.stderr


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("lora", {"r": 2, "dora": True}, "DoRA's per-feature magnitudes .* pass --rank R or --energy E"),
        ("lora", {"r": 2, "modules_to_save": ["lm_head"]}, r"modules_to_save \(lm_head\)"),
        ("loha", {}, "llama.cpp loads LoRA adapters only, not loha; pass --rank R"),
    ],
    ids=["dora", "modules_to_save", "loha"],
)
def test_what_llama_cpp_cannot_load_is_refused(method, params, message, tiny_model_dir, tmp_path):
    run = _run(tmp_path, tiny_model_dir, method, **params)
    with pytest.raises(AdapterError, match=message) as refused:
        write_gguf_lora(run, tmp_path / "out" / "a.gguf")
    assert refused.value.exit_code == 2 and len(refused.value.lines()) == 1  # the CLI prints one line, exits 2
    assert not (tmp_path / "out").exists()


def test_an_embedding_lora_on_tied_weights_is_refused(tmp_path):
    """llama.cpp reuses token_embd.weight as the head: it would apply the embedding's pair to the head as well."""
    base = write_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    run = _run(tmp_path, base, r=2, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(AdapterError, match="ties its output head to the token embedding"):
        write_gguf_lora(run, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_an_architecture_without_a_gguf_export_is_refused(tiny_bert_dir, tmp_path):
    run = _run(tmp_path, tiny_bert_dir, r=2, target_modules=["query"])
    with pytest.raises(PeftCliError, match="gguf export supports LlamaForCausalLM"):
        write_gguf_lora(run, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_a_file_that_reads_back_wrong_is_not_published(exported, tmp_path, monkeypatch):
    _, _, run, _ = exported
    out = tmp_path / "a.gguf"
    out.write_bytes(b"the previous export")
    with pytest.raises(PeftCliError, match="already exists; pass --overwrite"):
        write_gguf_lora(run, out)
    quantize = gguf.quants.quantize

    def damaged(array, qtype):  # one value off by a unit in the last place of bf16, as a flaky disk might
        data = quantize(array, qtype)
        if array.shape == (4, 64) and qtype == gguf.GGMLQuantizationType.BF16:
            data = data.copy()
            data.view(np.uint16)[0, 5] += 1
        return data

    monkeypatch.setattr(gguf_lora.gguf.quants, "quantize", damaged)
    with pytest.raises(VerificationError, match=r"lora_a read back differs .* beyond BF16's rounding"):
        write_gguf_lora(run, out, "bf16", overwrite=True)
    assert out.read_bytes() == b"the previous export" and [p.name for p in tmp_path.iterdir()] == ["a.gguf"]


def test_another_method_converts_by_svd_when_asked(exported, tiny_model_dir, tmp_path, one_torch_thread, capsys):
    """LoHa at full rank through --rank: the SVD conversion of --format lora, then the GGUF adapter, which llama.cpp
    runs like transformers runs base + LoHa."""
    from peftcli.cli.export import _export_gguf_lora

    run = _run(tmp_path, tiny_model_dir, "loha")
    out = tmp_path / "loha.gguf"
    _export_gguf_lora(run, out, "f32", 64, None, 0.5, None, False, True, True)
    printed = capsys.readouterr().out
    assert "converted loha to LoRA (rank 64)" in printed and "-> " + str(out) in printed
    assert gguf.GGUFReader(out).fields["general.name"].contents() == run.name
    base_gguf = exported[1]
    model, prompts = _hf(tiny_model_dir, run), _prompts(2)
    with llama_server(base_gguf, (out,)) as post:
        for prompt in prompts:
            body = {"prompt": prompt, "n_predict": 4, "temperature": 0, "return_tokens": True, "n_probs": 400}
            _check_reply(model, prompt, post("/completion", {**body, "lora": [{"id": 0, "scale": 1.0}]}), 0.1)
