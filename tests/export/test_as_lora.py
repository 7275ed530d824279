"""`peft export --format lora`: every mergeable method's update as a plain LoRA adapter (truncated SVD), loaded
by our loader and by HF PEFT with the original adapter's logits at full rank; a conversion that loses most of
the adapter, or that HF PEFT reads differently from what was computed, fails and writes nothing; bad requests
refused cleanly."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from peftcli.errors import AdapterError, PeftCliError, VerificationError
from peftcli.examples.tiny import write_tiny_model
from peftcli.export.as_lora import DEFAULT_MAX_EFFECT_LOSS, REPORT_NAME, check_request, convert_to_lora, factorize
from peftcli.tuners.adapter import apply_adapter, load_adapter, save_adapter
from peftcli.tuners.protocol import AdapterContext
from peftcli.tuners.registry import get_tuner

from support import logits, max_diff, perturb

pytestmark = pytest.mark.filterwarnings("ignore:The PEFT config.s .base_model_name_or_path. was renamed")

PARAMS = {
    "lora": {"r": 4},
    "dora": {"r": 4, "dora": True},
    "loha": {},
    "lokr": {},
    "oft": {},
    "vera": {"r": 8},
    "ia3": {},
    "adalora": {"init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 2, "total_step": 10},
    "freeze": {"layers": [1]},  # block 1 trained in full: its linear weights by SVD, its norms kept whole
}
CONVERTIBLE = sorted(PARAMS)
FULL_RANK = 64  # the tiny Llama's hidden size: no layer's update has a higher rank
EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("aslora") / "base")


def _ids() -> torch.Tensor:
    return torch.randint(5, 390, (2, 12), generator=torch.Generator().manual_seed(3))


def _run_dir(tmp_path: Path, base: Path, name: str, params: dict | None = None):
    """An adapter directory as a run leaves it (perturbed so every part of the adapter matters) and its model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    spec = get_tuner("lora" if name == "dora" else name)
    apply_adapter(model, spec.params(**(params if params is not None else PARAMS[name])), AdapterContext())
    perturb(model, seed=7, scale=0.05)
    run = tmp_path / f"run-{name}"
    save_adapter(model, run, base_model_name_or_path=str(base))
    (run / "recipe.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": str(base)}}))
    AutoTokenizer.from_pretrained(base).save_pretrained(run)
    return run, model


def _ours(base: Path, adapter_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    load_adapter(model, adapter_dir)
    return model


def _logit_tolerance(reference: torch.Tensor) -> float:
    # Two fp32 forwards that add the same update in another order (B·A on the input vs a merged/structured
    # update) differ by summation rounding: a few hundred ulps of the largest logit through two blocks.
    return 256 * EPS * max(reference.abs().max().item(), 1.0)


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_full_rank_reproduces_the_original_adapter(name, base, tmp_path, one_torch_thread):
    run, adapted = _run_dir(tmp_path, base, name)
    out = tmp_path / "lora"
    result = convert_to_lora(run, out, rank=FULL_RANK)
    for fit in result.layers:  # an SVD at full rank is exact up to rounding of the fp32 factors
        assert fit.relative_error < 16 * EPS * math.sqrt(max(fit.shape)), fit
        assert fit.kept_energy == pytest.approx(1.0)
    expected = logits(adapted, _ids())
    assert max_diff(logits(_ours(base, out), _ids()), expected) <= _logit_tolerance(expected)
    assert result.probe_relative <= 256 * EPS  # the CLI's probe says the same on real prompts
    assert result.effect_lost <= 1e-4  # of the adapter's effect: nothing lost but rounding
    assert result.reader.startswith("HF PEFT") and result.reload_max_abs <= result.reload_tolerance

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == FULL_RANK
    assert config["rank_pattern"] == {} and not config["use_dora"]
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["source_method"] == name.replace("dora", "lora") and len(report["layers"]) == len(result.layers) > 0


@pytest.mark.parametrize("name", ["oft", "ia3"])
def test_truncation_error_falls_with_rank(name, base, tmp_path, one_torch_thread):
    run, adapted = _run_dir(tmp_path, base, name)  # both have full-rank updates: every rank step matters
    errors, probes, lost = [], [], []
    for rank in (1, 4, 16, FULL_RANK):
        result = convert_to_lora(run, tmp_path / f"r{rank}", rank=rank, max_effect_loss=math.inf)
        errors.append({fit.module: fit.relative_error for fit in result.layers})
        probes.append(result.probe_max_abs)
        lost.append(result.effect_lost)
    for coarse, fine in zip(errors, errors[1:], strict=False):
        # Eckart-Young: the best rank-r approximation's error never grows with r
        assert all(fine[m] <= coarse[m] + 1e-6 for m in coarse)
        assert sum(fine.values()) < sum(coarse.values())
    assert probes[-1] < probes[0]
    assert lost[0] > 0.8 and lost[-1] < 1e-4  # rank 1 keeps next to nothing of a full-rank update (0.96, 0.89)


def test_factorize_fixed_rank_and_energy():
    u, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    v, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    s = torch.tensor([3.0, 2.0, 1.0, 0, 0, 0], dtype=torch.float64)
    delta = (u[:, :6] * s) @ v.T  # energies 9, 4, 1 of 14
    for energy, rank in ((0.5, 1), (9 / 14, 1), (0.9, 2), (13 / 14, 2), (0.95, 3), (1.0, 3)):
        b, a, r, kept = factorize(delta, energy=energy)  # exactly 9/14 and 13/14 count as reached (fp32 slack)
        assert r == rank and b.shape == (8, r) and a.shape == (r, 6) and kept >= energy - 1e-6
    b, a, r, kept = factorize(delta, rank=2)
    assert kept == pytest.approx(13 / 14)
    assert torch.linalg.matrix_norm(delta.float() - b @ a).item() == pytest.approx(1.0, rel=1e-5)  # the dropped S_3
    b, a, r, _ = factorize(delta, rank=10)  # more than the layer holds: zero-padded, so all layers share a rank
    assert r == 10 and b.shape == (8, 10) and a.shape == (10, 6)
    assert torch.allclose(b @ a, delta.float(), atol=1e-5)
    b, a, r, kept = factorize(torch.zeros(4, 3), energy=0.99)
    assert r == 1 and kept == 1.0 and not b.any()


def test_hf_peft_loads_per_layer_ranks_like_our_loader(base, tmp_path, one_torch_thread):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, adapted = _run_dir(tmp_path, base, "loha")
    out = tmp_path / "lora"
    result = convert_to_lora(run, out, energy=0.9)
    assert len(result.ranks) > 1 and any("rank_pattern" in note for note in result.notes)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"] == {k: v for k, v in config["rank_pattern"].items()}
    ours = logits(_ours(base, out), _ids())
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out).eval()
    assert max_diff(logits(hf, _ids()), ours) <= _logit_tolerance(ours)
    shapes = {n: tuple(p.shape) for n, p in hf.named_parameters() if "lora_A" in n}
    assert {shape[0] for shape in shapes.values()} == set(result.ranks)
    for fit in result.layers:
        assert fit.kept_energy >= 0.9 - 1e-9


def test_hf_peft_loads_a_fixed_rank_conversion(base, tmp_path, one_torch_thread):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, _ = _run_dir(tmp_path, base, "ia3")
    out = tmp_path / "lora"
    convert_to_lora(run, out, rank=8, max_effect_loss=1.0)  # about what HF PEFT reads, not how much is lost (0.46)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["rank_pattern"] == {}
    assert sorted(config["target_modules"]) == sorted(set(config["target_modules"]))
    ours = logits(_ours(base, out), _ids())
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out).eval()
    assert max_diff(logits(hf, _ids()), ours) <= _logit_tolerance(ours)


def test_a_norm_the_method_replaces_is_kept_whole_as_modules_to_save(base, tmp_path, one_torch_thread):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # LoRA with a trained final norm: the linear layers become LoRA, the norm a modules_to_save copy
    run, adapted = _run_dir(tmp_path, base, "lora", {"r": 4, "modules_to_save": ["model.norm"]})
    out = tmp_path / "lora"
    result = convert_to_lora(run, out, rank=FULL_RANK)
    assert result.modules_to_save == ["model.norm"]
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["model.norm"]
    expected = logits(adapted, _ids())
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out).eval()
    assert max_diff(logits(hf, _ids()), expected) <= _logit_tolerance(expected)


def test_ln_tuning_alone_is_refused(base, tmp_path):
    run, _ = _run_dir(tmp_path, base, "ln_tuning", {})
    with pytest.raises(AdapterError, match="changes no linear layer"):
        convert_to_lora(run, tmp_path / "lora", rank=4)
    assert not (tmp_path / "lora").exists()


def test_full_fine_tuning_of_the_embedding_is_refused(base, tmp_path):
    run, _ = _run_dir(tmp_path, base, "full", {})
    with pytest.raises(AdapterError, match="trains model.embed_tokens.weight on its own; LoRA has no form"):
        convert_to_lora(run, tmp_path / "lora", rank=4)
    assert not (tmp_path / "lora").exists()


def test_a_reload_that_differs_publishes_nothing(base, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    import peftcli.tuners.adapter as adapter_module

    real_save = adapter_module.save_adapter

    def damaged_save(model, out_dir, **kwargs):
        real_save(model, out_dir, **kwargs)
        path = Path(out_dir) / "adapter_model.safetensors"
        tensors = load_file(str(path))
        key = next(iter(tensors))
        tensors[key] = tensors[key] + 1e-3
        save_file(tensors, str(path))

    monkeypatch.setattr(adapter_module, "save_adapter", damaged_save)
    run, _ = _run_dir(tmp_path, base, "loha")
    with pytest.raises(VerificationError, match="differs from the computed one"):
        convert_to_lora(run, tmp_path / "lora", rank=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-loha"]


def test_a_config_hf_peft_reads_otherwise_than_computed_publishes_nothing(
    base, tmp_path, monkeypatch, one_torch_thread
):
    import peftcli.tuners.adapter as adapter_module

    real_save = adapter_module.save_adapter

    def misstated_alpha(model, out_dir, **kwargs):  # the tensors stay exact: only the read-back by HF PEFT sees it
        real_save(model, out_dir, **kwargs)
        path = Path(out_dir) / "adapter_config.json"
        config = json.loads(path.read_text())
        config["lora_alpha"] *= 1.05
        path.write_text(json.dumps(config))

    monkeypatch.setattr(adapter_module, "save_adapter", misstated_alpha)
    run, _ = _run_dir(tmp_path, base, "lora")  # a rank-4 LoRA at rank 4: the conversion itself loses nothing
    with pytest.raises(VerificationError, match=r"HF PEFT \S+ reads the written adapter differently .* nothing was"):
        convert_to_lora(run, tmp_path / "lora", rank=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-lora"]


def test_without_hf_peft_the_written_adapter_is_read_back_by_peftcli(base, tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setitem(sys.modules, "peft", None)  # what Python does for a package that cannot be imported
    run, _ = _run_dir(tmp_path, base, "lokr")
    result = convert_to_lora(run, tmp_path / "lora")
    assert result.reader == "peftcli's loader (HF PEFT is not installed)"
    assert result.reload_max_abs <= result.reload_tolerance and result.effect_lost <= DEFAULT_MAX_EFFECT_LOSS


@pytest.mark.parametrize(
    ("rank", "energy", "message"),
    [(4, 0.9, "exclude each other"), (0, None, "at least 1"), (None, 0.0, "must be in"), (None, 1.5, "must be in")],
)
def test_bad_settings_are_refused(rank, energy, message):
    with pytest.raises(PeftCliError, match=message):
        check_request(rank, energy)


def _peft(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`peft ARGS` in this process, through the console entry point: (exit code, stdout, stderr)."""
    from peftcli.cli.app import main

    monkeypatch.setattr(sys, "argv", ["peft", *args])
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_converts_and_refuses(base, tmp_path, monkeypatch, capsys, one_torch_thread):
    run, _ = _run_dir(tmp_path, base, "lokr")
    out = tmp_path / "out"
    code, stdout, stderr = _peft(monkeypatch, capsys, "export", str(run), "--format", "lora", "-o", str(out))
    assert code == 0, stderr  # the default rank keeps enough of a LoKr on the tiny model (44% lost)
    assert "converted lokr to LoRA (rank 16)" in stdout and "probe logits" in stdout
    assert "of the adapter's effect lost (bound 0.5)" in stdout and "read back: HF PEFT" in stdout
    assert "median" in stdout and (out / REPORT_NAME).is_file()
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["probe"]["max_effect_loss"] == 0.5 and report["read_back"]["reader"].startswith("HF PEFT")
    for args, message in [
        (["--rank", "4"], "already exists; pass --overwrite"),
        (["--rank", "4", "--energy", "0.9", "-o", str(tmp_path / "a")], "exclude each other"),
        (["--energy", "1.5", "-o", str(tmp_path / "b")], "must be in (0, 1]"),
        (["--rank", "0", "-o", str(tmp_path / "c")], "must be at least 1"),
        (["--max-effect-loss", "-0.1", "-o", str(tmp_path / "c")], "--max-effect-loss: -0.1 must be at least 0"),
    ]:
        more = [] if "-o" in args else ["-o", str(out)]
        code, _, stderr = _peft(monkeypatch, capsys, "export", str(run), "--format", "lora", *args, *more)
        assert code == 2, (args, stderr)
        assert message in stderr and len(stderr.strip().splitlines()) == 1
    for flag in ("--rank", "--max-effect-loss"):
        code, _, stderr = _peft(monkeypatch, capsys, "export", str(run), "--format", "peft", flag, "1")
        assert code == 2 and "apply to --format lora and gguf-lora only" in stderr
    prompt, _ = _run_dir(tmp_path, base, "prompt_tuning", {})
    code, _, stderr = _peft(monkeypatch, capsys, "export", str(prompt), "--format", "lora", "-o", str(tmp_path / "e"))
    assert code == 2 and "method prompt_tuning cannot be exported as LoRA" in stderr

    # OFT changes every direction of a weight a little: rank 1 keeps almost nothing of it
    oft, _ = _run_dir(tmp_path, base, "oft")
    lossy = ["export", str(oft), "--format", "lora", "--rank", "1", "-o", str(tmp_path / "oft-r1")]
    code, stdout, stderr = _peft(monkeypatch, capsys, *lossy)
    assert code == 1 and len(stderr.strip().splitlines()) == 1, stderr
    assert "the converted LoRA loses 96% of the adapter's effect" in stderr and "--max-effect-loss 0.5;" in stderr
    assert "raise --rank (now 1)" in stderr and "pass --max-effect-loss 0.97" in stderr
    assert not (tmp_path / "oft-r1").exists() and "converted" not in stdout
    code, stdout, stderr = _peft(monkeypatch, capsys, *lossy, "--max-effect-loss", "0.97")
    assert code == 0, stderr
    assert "96.4% of the adapter's effect lost (bound 0.97)" in stdout and (tmp_path / "oft-r1").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["oft-r1", "out", "run-lokr", "run-oft", "run-prompt_tuning"]


def test_the_cli_defaults_are_the_library_defaults():
    from peftcli.cli import export as cli
    from peftcli.export import as_lora

    assert (cli.DEFAULT_RANK, cli.DEFAULT_MAX_EFFECT_LOSS) == (as_lora.DEFAULT_RANK, as_lora.DEFAULT_MAX_EFFECT_LOSS)
