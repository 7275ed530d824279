"""AdaLoRA: recipe rules, the rank schedule and allocation (step by step against HF PEFT), trimmed saves, interop."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from peftcli.errors import AdapterError, PeftCliError
from peftcli.tuners.adalora import layers as adalora
from peftcli.tuners.adalora.spec import AdaLoraParams
from peftcli.tuners.adapter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_info,
    apply_adapter,
    hf_adapter_config,
    load_adapter,
    merge_adapter,
    save_adapter,
    unmerge_adapter,
)
from peftcli.tuners.protocol import AdapterContext

from support import logits, max_diff, perturb

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:The PEFT config.s .base_model_name_or_path. was renamed"),
    pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape"),
]
TOL = 1e-5
TARGETS = ["q_proj", "v_proj", "down_proj"]


def hf_name(name: str) -> str:
    """Our parameter name -> HF PEFT's (adapter name inserted, under base_model.model)."""
    for factor in ("lora_A", "lora_B", "lora_E"):
        name = name.replace(f".{factor}", f".{factor}.default")
    return "base_model.model." + name


# --- recipe rules ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(init_r=4, target_r=6), r"target_r \(6\) is larger than init_r \(4\)"),
        (dict(tinit=5, tfinal=5, total_step=10), r"tinit \(5\) and tfinal \(5\) leave no budgeting phase"),
        (dict(init_r=0), "greater than 0"),
        (dict(target_r=0), "greater than 0"),
        (dict(delta_t=0), "greater than or equal to 1"),
        (dict(beta1=1.0), "less than 1"),
        (dict(orth_reg_weight=-0.1), "greater than or equal to 0"),
        (dict(total_step=0), "greater than 0"),
        (dict(use_dora=True), "does not support DoRA"),
        (dict(loftq_config={"loftq_bits": 4}), "does not support LoftQ"),
        (dict(rank_pattern={"x.lora_E": [True, False]}), "has 2 flags, not init_r"),
    ],
)
def test_invalid_settings_fail_when_the_recipe_loads(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        AdaLoraParams(**kwargs)


def test_recipe_file_reports_the_schedule_problem(tmp_path, tiny_model_dir, copy_data):
    from peftcli.errors import RecipeError
    from peftcli.recipe.load import load_recipe

    from support import make_recipe, write_recipe

    recipe = make_recipe(tmp_path, tiny_model_dir, copy_data)
    recipe["method"] = {"name": "adalora", "tinit": 8, "tfinal": 4, "total_step": 10}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    with pytest.raises(RecipeError, match="method.*leave no budgeting phase"):
        load_recipe(path)


def test_total_step_comes_from_the_training_length(load_base):
    model = load_base()
    apply_adapter(model, AdaLoraParams(tinit=3, tfinal=2, target_modules=["q_proj"]), AdapterContext(total_steps=20))
    assert hf_adapter_config(model, "tiny")["total_step"] == 20
    with pytest.raises(PeftCliError, match=r"method.tinit/method.tfinal: .*training.max_steps"):
        apply_adapter(load_base(), AdaLoraParams(tinit=3, tfinal=2), AdapterContext(total_steps=5))
    explicit = load_base()  # an explicit total_step wins over the run's length
    apply_adapter(explicit, AdaLoraParams(total_step=50, target_modules=["q_proj"]), AdapterContext(total_steps=5))
    assert hf_adapter_config(explicit, "tiny")["total_step"] == 50


def test_without_any_training_length_the_schedule_refuses_to_run(load_base, tmp_path):
    model = load_base()
    apply_adapter(model, AdaLoraParams(target_modules=["q_proj"]))  # fine for inspection (peft targets)
    with pytest.raises(PeftCliError, match="method.total_step"):
        adalora.after_optimizer_step(model, adapter_info(model).params, 0)
    with pytest.raises(AdapterError, match="method.total_step"):
        save_adapter(model, tmp_path, base_model_name_or_path="tiny")


def test_every_option_is_described_and_defaults_apply_on_the_meta_device(tiny_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    assert all(field.description for field in AdaLoraParams.model_fields.values())
    with torch.device("meta"):  # as `peft targets` and `peft methods` build models: no weights
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    info = apply_adapter(model, AdaLoraParams(), AdapterContext(total_steps=100))
    assert len(info.targeted) == 14 and info.trainable_count(model) > 0


# --- layout --------------------------------------------------------------------------------------------------------


def test_layout_matches_hf_peft_and_starts_as_identity(load_base, input_ids):
    model = load_base()
    info = apply_adapter(model, AdaLoraParams(init_r=6, target_r=2, total_step=10, target_modules=["q_proj"]))
    named = dict(model.named_parameters())
    prefix = "model.layers.0.self_attn.q_proj."
    assert [n for n in info.param_names if n.startswith(prefix)] == [prefix + f for f in ("lora_A", "lora_B", "lora_E")]
    assert named[prefix + "lora_A"].shape == (6, 64)
    assert named[prefix + "lora_B"].shape == (64, 6)
    assert named[prefix + "lora_E"].shape == (6, 1)
    assert not any("ranknum" in n for n in named)  # a buffer, neither trained nor saved
    assert max_diff(logits(model, input_ids), logits(load_base(), input_ids)) == 0


def test_schedule_matches_hf_peft():
    from types import SimpleNamespace

    from peft import AdaLoraConfig
    from peft.tuners.adalora.layer import RankAllocator as HfRankAllocator

    settings = dict(init_r=6, target_r=2, tinit=3, tfinal=4, total_step=30)
    five_layers = {f"layer{i}": SimpleNamespace(lora_A=torch.zeros(6, 1)) for i in range(5)}
    ours = adalora.RankAllocator(AdaLoraParams(delta_t=3, **settings), 30, five_layers)
    theirs = HfRankAllocator.__new__(HfRankAllocator)  # only its schedule: no model needed
    theirs.peft_config = AdaLoraConfig(deltaT=3, target_modules=["x"], **settings)
    theirs.init_bgt, theirs.target_bgt = 6 * 5, 2 * 5
    assert (ours.init_budget, ours.target_budget) == (30, 10)
    for step in range(32):
        assert ours.schedule(step) == theirs.budget_schedule(step), step


# --- training: allocation step by step against HF PEFT -------------------------------------------------------------


def _pair(load_base, **settings):
    """Our model and HF PEFT's, with identical adapter weights."""
    from peft import AdaLoraConfig, get_peft_model

    ours = load_base()
    apply_adapter(ours, AdaLoraParams(target_modules=TARGETS, **settings))
    config = AdaLoraConfig(task_type="CAUSAL_LM", target_modules=TARGETS, **settings)
    theirs = get_peft_model(load_base(), config)
    their_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if param.requires_grad:
                their_params[hf_name(name)].copy_(param)
    return ours, theirs


def test_training_loop_matches_hf_update_and_allocate_and_prunes_to_target(load_base, input_ids, tmp_path):
    settings = dict(init_r=6, target_r=2, tinit=2, tfinal=3, total_step=12)
    ours, theirs = _pair(load_base, **settings)
    ours.train(), theirs.train()
    their_params = dict(theirs.named_parameters())
    trainable = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    opt_ours = torch.optim.AdamW([p for _, p in trainable], lr=5e-3)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=5e-3)
    patterns = []
    for step in range(settings["total_step"]):
        loss = ours(input_ids=input_ids, labels=input_ids).loss + adalora.extra_loss(ours, adapter_info(ours).params)
        their_loss = theirs(input_ids=input_ids, labels=input_ids).loss  # HF adds its penalty itself
        assert torch.isfinite(loss) and abs(loss.item() - their_loss.item()) < 1e-5
        loss.backward(), their_loss.backward()
        opt_ours.step(), opt_theirs.step()
        adalora.after_optimizer_step(ours, adapter_info(ours).params, step)
        theirs.base_model.update_and_allocate(step)
        opt_ours.zero_grad(), opt_theirs.zero_grad()

        pattern = adalora.config_updates(ours, adapter_info(ours).params)["rank_pattern"]
        their_pattern = theirs.peft_config["default"].rank_pattern
        if their_pattern is None:
            assert pattern is None, step
        else:
            assert pattern == {k.replace(".default", ""): v for k, v in their_pattern.items()}, step
            patterns.append(pattern)
        assert max(max_diff(p, their_params[hf_name(n)]) for n, p in trainable) < 1e-6, step

    assert patterns, "the budgeting phase pruned nothing"
    kept = {name: sum(flags) for name, flags in patterns[-1].items()}
    assert sum(kept.values()) == settings["target_r"] * len(kept)  # the final budget: target_r per layer
    assert sum(sum(p.values()) for p in [{k: sum(v) for k, v in patterns[0].items()}]) < 6 * len(kept)
    for name, layer in adalora._allocator(ours).layers.items():
        flags = torch.tensor(patterns[-1][f"{name}.lora_E"])
        assert not layer.lora_E[~flags].any()  # pruned singular values are exactly zero
        assert layer.lora_E[flags].all()

    # The saved adapter keeps only the surviving triplets, with HF PEFT's rank_pattern, both ways.
    ours.eval(), theirs.eval()
    expected = logits(ours, input_ids)
    save_adapter(ours, tmp_path / "ours", base_model_name_or_path="tiny")
    config = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    assert config["rank_pattern"] == patterns[-1] and config["total_step"] == 12
    saved = load_file(str(tmp_path / "ours" / WEIGHTS_NAME))
    theirs.save_pretrained(tmp_path / "theirs")
    their_saved = load_file(str(tmp_path / "theirs" / WEIGHTS_NAME))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in their_saved.items()}
    for name, count in kept.items():
        assert saved[f"base_model.model.{name.removesuffix('.lora_E')}.lora_A"].shape[0] == count

    from peft import PeftModel

    reloaded_by_hf = PeftModel.from_pretrained(load_base(), tmp_path / "ours").eval()
    assert max_diff(logits(reloaded_by_hf, input_ids), expected) < TOL
    for directory in ("ours", "theirs"):
        loaded = load_base()
        load_adapter(loaded, tmp_path / directory)
        assert max_diff(logits(loaded, input_ids), expected) < TOL
    save_adapter(loaded, tmp_path / "again", base_model_name_or_path="tiny")  # a loaded adapter saves the same
    again = load_file(str(tmp_path / "again" / WEIGHTS_NAME))
    assert all(torch.equal(again[k], their_saved[k]) for k in their_saved)


def test_orthogonality_penalty(load_base):
    model = load_base()
    apply_adapter(
        model, AdaLoraParams(init_r=4, target_r=2, total_step=10, orth_reg_weight=0.3, target_modules=["q_proj"])
    )
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    penalty = adalora.extra_loss(model, adapter_info(model).params)
    eye = torch.eye(4)
    terms = []
    for q_proj in (layer, model.get_submodule("model.layers.1.self_attn.q_proj")):
        terms += [torch.norm(q_proj.lora_A @ q_proj.lora_A.T - eye), torch.norm(q_proj.lora_B.T @ q_proj.lora_B - eye)]
    assert penalty.item() == pytest.approx(0.3 * sum(t.item() for t in terms) / 4, rel=1e-6)
    penalty.backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0
    off = load_base()
    apply_adapter(off, AdaLoraParams(total_step=10, orth_reg_weight=0, target_modules=["q_proj"]))
    assert adalora.extra_loss(off, adapter_info(off).params) is None


def test_resumed_final_phase_recovers_the_pattern_from_the_checkpoint_zeros(load_base):
    settings = dict(init_r=4, target_r=2, tinit=0, tfinal=2, total_step=6, target_modules=["q_proj"])
    model = load_base()
    apply_adapter(model, AdaLoraParams(**settings))  # a resumed run: weights from a checkpoint, no allocator state
    perturb(model, 0, scale=0.05)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    with torch.no_grad():
        layer.lora_E[1:3] = 0.0  # what the final phase left in the checkpoint
    adalora.extra_loss(model, adapter_info(model).params)  # the loop computes the loss before the optimizer step...
    with torch.no_grad():
        layer.lora_E.add_(0.5)  # ...which revives the pruned values
    adalora.after_optimizer_step(model, adapter_info(model).params, 5)
    name = "model.layers.0.self_attn.q_proj.lora_E"
    assert adalora.config_updates(model, adapter_info(model).params)["rank_pattern"][name] == [True, False, False, True]
    assert layer.lora_E[1:3].eq(0).all() and layer.lora_E[[0, 3]].ne(0).all()


# --- interop and merge without training ----------------------------------------------------------------------------


def test_hf_adapter_with_an_empty_layer_loads(load_base, input_ids, tmp_path):
    from peft import AdaLoraConfig, get_peft_model

    torch.manual_seed(0)
    theirs = get_peft_model(
        load_base(), AdaLoraConfig(init_r=4, target_r=1, total_step=5, target_modules=["q_proj", "v_proj"])
    )
    perturb(theirs, 1, scale=0.05)
    pattern = {
        "model.layers.0.self_attn.q_proj.lora_E.default": [True, False, True, False],
        "model.layers.0.self_attn.v_proj.lora_E.default": [False, False, False, False],
        "model.layers.1.self_attn.q_proj.lora_E.default": [True, True, True, True],
        "model.layers.1.self_attn.v_proj.lora_E.default": [False, True, False, False],
    }
    theirs.base_model.rankallocator.mask_using_rank_pattern(theirs.base_model.model, pattern)
    theirs.peft_config["default"].rank_pattern = pattern
    theirs.eval()
    expected = logits(theirs, input_ids)
    theirs.save_pretrained(tmp_path)
    assert (
        load_file(str(tmp_path / WEIGHTS_NAME))["base_model.model.model.layers.0.self_attn.v_proj.lora_A"].numel() == 0
    )
    ours = load_base()
    load_adapter(ours, tmp_path)
    assert max_diff(logits(ours, input_ids), expected) < TOL


def test_bert_sequence_classifier_interop(tiny_bert_dir, tmp_path):
    from peft import PeftConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification

    def bert():
        return AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, dtype=torch.float32).eval()

    ids = torch.randint(5, 390, (2, 10), generator=torch.Generator().manual_seed(3))
    model = bert()
    info = apply_adapter(model, AdaLoraParams(init_r=4, target_r=2, total_step=8), AdapterContext(task="seq_cls"))
    assert "classifier" in info.head_modules
    perturb(model, 4, scale=0.05)
    ours = logits(model, ids)
    save_adapter(model, tmp_path / "ours", base_model_name_or_path="tiny")
    assert max_diff(logits(PeftModel.from_pretrained(bert(), tmp_path / "ours").eval(), ids), ours) < TOL
    config = PeftConfig.from_pretrained(tmp_path / "ours")
    config.inference_mode = False
    theirs = get_peft_model(bert(), config).eval()
    perturb(theirs, 5, scale=0.05)
    expected = logits(theirs, ids)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = bert()
    load_adapter(loaded, tmp_path / "theirs")
    assert max_diff(logits(loaded, ids), expected) < TOL


@pytest.mark.parametrize(
    ("edit", "message"),
    [(dict(use_dora=True), "use_dora"), (dict(bias="all"), "bias"), (dict(loftq_config={"loftq_bits": 4}), "loftq")],
    ids=["dora", "bias", "loftq"],
)
def test_hf_options_we_cannot_reproduce_are_refused(load_base, tmp_path, edit, message):
    model = load_base()
    apply_adapter(model, AdaLoraParams(total_step=10, target_modules=["q_proj"]))
    save_adapter(model, tmp_path, base_model_name_or_path="tiny")
    path = tmp_path / CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(AdapterError, match=message):
        load_adapter(load_base(), tmp_path)


def test_merge_unmerge(load_base, input_ids):
    model = load_base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_adapter(model, AdaLoraParams(total_step=10))
    perturb(model, 6, scale=0.2)
    unmerged = logits(model, input_ids)
    merge_adapter(model)
    merge_adapter(model)
    assert max_diff(logits(model, input_ids), unmerged) < 1e-4
    unmerge_adapter(model)
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    assert max(max_diff(after[k], v) for k, v in before.items()) < 1e-5
