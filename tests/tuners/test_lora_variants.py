"""LoRA's options: DoRA, PiSSA/OLoRA (and their conversion on save), LoRA+, rank/alpha patterns, layer
selection, embedding and conv layers, bf16 bases. HF PEFT 0.21 is the oracle wherever it has the feature."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn

from peftcli.errors import PeftCliError
from peftcli.examples.tiny import build_llama
from peftcli.tuners.adapter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    apply_adapter,
    load_adapter,
    merge_adapter,
    save_adapter,
    unmerge_adapter,
)
from peftcli.tuners.lora.layers import (
    LoraConv,
    LoraEmbedding,
    LoraLayer,
    LoraLinear,
    lora_layers,
    optimizer_groups,
)
from peftcli.tuners.lora.patterns import in_selected_layers, layer_index, pattern_key, pattern_value
from peftcli.tuners.lora.spec import LoraParams

from support import logits, max_diff, perturb

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def train_steps(model: nn.Module, ids: torch.Tensor, steps: int = 3) -> None:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


class ConvNet(nn.Module):
    """A small custom model with an embedding, Conv1d, a strided Conv2d, a 1x1 Conv2d and a linear head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.conv1d = nn.Conv1d(8, 6, 3, padding=1)
        self.conv2d = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.pointwise = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 5)

    def forward(self, input_ids):
        h = torch.relu(self.conv1d(self.embed(input_ids).transpose(1, 2)))  # (N, 6, L)
        h = self.pointwise(torch.relu(self.conv2d(h.unsqueeze(1))))  # (N, 4, 3, L/2)
        return self.head(h.sum(dim=(2, 3)))


CONV_IDS = torch.randint(0, 30, (2, 9), generator=torch.Generator().manual_seed(3))
CONV_TARGETS = ["embed", "conv1d", "conv2d", "pointwise"]


@pytest.fixture
def conv_base():
    torch.manual_seed(0)
    state = ConvNet().state_dict()

    def load():
        model = ConvNet()
        model.load_state_dict(state)
        return model.eval()

    return load


# --- rank_pattern / alpha_pattern and layers_to_transform: same matching as HF PEFT -------------------------------

DOC_NAMES = ["foo", "module.foo", "module.module.foo", "module.foobar", "module.module.barfoo"]


@pytest.mark.parametrize(
    ("key", "matched"),
    [
        ("foo", ["foo", "module.foo", "module.module.foo"]),
        ("^foo", ["foo"]),
        ("module.foo", ["module.foo", "module.module.foo"]),
        ("bar", []),
        ("barfoo", ["module.module.barfoo"]),
    ],
)
def test_pattern_matching_follows_the_hf_docs_example(key, matched):
    from peft.utils.other import get_pattern_key

    assert [n for n in DOC_NAMES if pattern_key([key], n) == key] == matched
    for name in DOC_NAMES:  # and agrees with HF PEFT's own function on every name
        assert (pattern_key([key], name) == key) == (get_pattern_key([key], name) == key)


def test_first_matching_pattern_wins():
    patterns = {"^model.layers.0.self_attn.q_proj": 2, "q_proj": 16}
    assert pattern_value(patterns, "model.layers.0.self_attn.q_proj", 8) == 2
    assert pattern_value(patterns, "model.layers.1.self_attn.q_proj", 8) == 16
    assert pattern_value(patterns, "model.layers.1.self_attn.v_proj", 8) == 8


LAYER_NAMES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.mlp.up_proj",
    "model.layers.12.mlp.experts.3.up_proj",
    "transformer.h.1.attn.c_attn",
    "encoder.block.1.layer.0.SelfAttention.q",
    "layers.1.q_proj",
    "lm_head",
]


@pytest.mark.parametrize("layers", [0, 1, [1, 12], [3]])
@pytest.mark.parametrize("pattern", [None, "layers", "h", ["block", "layers"], "layer"])
def test_layers_to_transform_agrees_with_hf_peft(layers, pattern):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    target = ["q_proj", "up_proj", "c_attn", "q", "lm_head"]
    config = LoraConfig(target_modules=target, layers_to_transform=layers, layers_pattern=pattern)
    for name in LAYER_NAMES:
        expected = bool(check_target_module_exists(config, name))
        assert in_selected_layers(name, target, layers, pattern) == expected, name


def test_layer_index_takes_the_block_number_not_the_expert_number():
    assert layer_index("model.layers.12.mlp.experts.3.up_proj", None) == 12
    assert layer_index("model.layers.12.mlp.experts.3.up_proj", "experts") == 3
    assert layer_index("lm_head", None) is None
    # a module named in full in a target list is kept whatever its layer (reloaded adapters list full names)
    assert in_selected_layers("model.layers.0.self_attn.q_proj", ["model.layers.0.self_attn.q_proj"], 1, None)


def test_patterns_and_layers_reach_the_layers(load_base):
    model = load_base()
    params = LoraParams(
        r=4,
        alpha=8,
        target_modules=["q_proj", "v_proj", "up_proj"],
        rank_pattern={"^model.layers.1.self_attn.q_proj": 2, "up_proj": 6},
        alpha_pattern={"v_proj": 3},
        layers_to_transform=[1],
    )
    info = apply_adapter(model, params)
    layers = lora_layers(model)
    assert sorted(info.targeted) == [
        f"model.layers.1.{m}" for m in ("mlp.up_proj", "self_attn.q_proj", "self_attn.v_proj")
    ]
    assert layers["model.layers.1.self_attn.q_proj"].lora_A.weight.shape == (2, 64)
    assert layers["model.layers.1.self_attn.q_proj"].scaling == pytest.approx(8 / 2)
    assert layers["model.layers.1.mlp.up_proj"].lora_B.weight.shape == (128, 6)
    assert layers["model.layers.1.self_attn.v_proj"].scaling == pytest.approx(3 / 4)


def test_all_linear_with_layers_to_transform_keeps_one_block(load_base):
    model = load_base()
    info = apply_adapter(model, LoraParams(target_modules="all-linear", layers_to_transform=0))
    assert len(info.targeted) == 7 and all(n.startswith("model.layers.0.") for n in info.targeted)


# --- recipe-level validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "word"),
    [
        (dict(r=0), "greater than 0"),
        (dict(alpha=0), "greater than 0"),
        (dict(rank_pattern={"q_proj": 0}), "greater than 0"),
        (dict(alpha_pattern={"q_proj": -1.0}), "greater than 0"),
        (dict(rank_pattern={"q_proj(": 4}), "not a valid regex"),
        (dict(loraplus_lr_ratio=0), "greater than 0"),
        (dict(loraplus_lr_ratio=4, loraplus_lr_embedding=0), "greater than 0"),
        (dict(loraplus_lr_embedding=1e-3), "needs loraplus_lr_ratio"),
        (dict(layers_to_transform=-1), "greater than or equal to 0"),
        (dict(layers_to_transform=[0, -2]), "greater than or equal to 0"),
        (dict(layers_to_transform=[]), "at least one layer"),
        (dict(layers_pattern="layers"), "needs layers_to_transform"),
        (dict(target_modules=r".*\.q_proj", layers_to_transform=0), "not with a regex"),
        (dict(init="pissa_niter_"), "unknown init"),
        (dict(init="loftq"), "unknown init"),
        (dict(layers_to_transform=0, layers_pattern=""), "must not be empty"),
    ],
)
def test_bad_params_are_refused_when_the_recipe_loads(fields, word):
    with pytest.raises(ValidationError, match=word):
        LoraParams(**fields)


def test_combinations_hf_allows_are_accepted():
    LoraParams(dora=True, init="pissa")
    LoraParams(dora=True, init="olora", rslora=True, rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 2})
    LoraParams(init="pissa_niter_4", loraplus_lr_ratio=16, loraplus_lr_embedding=0.01)
    LoraParams(target_modules=["q_proj"], layers_to_transform=[0, 1], layers_pattern=["layers", "h"])


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        (dict(target_modules=["q_proj"], rank_pattern={"q_prj": 2}), "method.rank_pattern"),
        (dict(target_modules=["q_proj"], alpha_pattern={"^q_proj": 2}), "method.alpha_pattern"),
        (dict(target_modules=["q_proj"], layers_to_transform=5), "method.layers_to_transform"),
        (dict(target_modules=["q_proj"], layers_to_transform=0, layers_pattern="h"), "method.layers_to_transform"),
        (dict(target_modules=["k_proj"], r=40, init="pissa"), "method.r"),
        (dict(target_modules=["k_proj"], rank_pattern={"k_proj": 40}, init="olora"), "method.rank_pattern"),
    ],
)
def test_model_dependent_problems_name_the_recipe_key(load_base, fields, key):
    with pytest.raises(PeftCliError, match=key):
        apply_adapter(load_base(), LoraParams(**fields))


def test_pattern_keys_for_unadapted_modules_are_accepted(load_base):
    # HF PEFT only warns about these, and its adapters may carry them.
    model = load_base()
    apply_adapter(model, LoraParams(target_modules=["q_proj"], rank_pattern={"k_proj": 2, "q_proj": 3}))
    assert {m.r for m in lora_layers(model).values()} == {3}


def test_dora_is_refused_under_zero3(load_base, monkeypatch):
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(PeftCliError, match="method.dora"):
        apply_adapter(load_base(), LoraParams(target_modules=["q_proj"], dora=True))
    apply_adapter(load_base(), LoraParams(target_modules=["q_proj"]))  # plain LoRA is fine


def test_tied_weights_refuse_pissa_and_merging():
    def tied():
        return build_llama(64, tie_word_embeddings=True).eval()

    with pytest.raises(PeftCliError, match="tied to model.embed_tokens"):
        apply_adapter(tied(), LoraParams(target_modules=["lm_head"], init="olora"))
    model = tied()
    apply_adapter(model, LoraParams(target_modules=["embed_tokens"]))
    with pytest.raises(PeftCliError, match="shared with lm_head"):
        merge_adapter(model)


def test_all_linear_leaves_embeddings_and_convs_alone(load_base, conv_base):
    model = load_base()
    apply_adapter(model, LoraParams(target_modules="all-linear"))
    assert {type(m) for m in lora_layers(model).values()} == {LoraLinear}
    net = conv_base()
    info = apply_adapter(net, LoraParams(target_modules="all-linear", modules_to_save=[]))
    assert info.targeted == ["head"]


# --- DoRA --------------------------------------------------------------------------------------------------------


def _dora_linear(seed: int = 0) -> LoraLinear:
    torch.manual_seed(seed)
    layer = LoraLinear(nn.Linear(6, 5), r=2, alpha=4, dropout=0.0, rslora=False, init="default", dora=True)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.lora_magnitude_vector.mul_(torch.rand(5) + 0.5)
    return layer


def test_dora_magnitude_starts_as_the_row_norms(load_base, input_ids):
    model = load_base()
    expected = logits(model, input_ids)
    info = apply_adapter(model, LoraParams(r=4, alpha=8, target_modules=["q_proj", "down_proj"], dora=True))
    assert torch.equal(logits(model, input_ids), expected)  # identity at init, exactly
    for name in info.targeted:
        layer = model.get_submodule(name)
        assert f"{name}.lora_magnitude_vector" in info.param_names
        torch.testing.assert_close(layer.lora_magnitude_vector, layer.base_layer.weight.norm(dim=1))


@pytest.mark.parametrize("detached", [True, False])
def test_dora_forward_and_gradients_treat_the_norm_as_a_constant(detached):
    layer = _dora_linear()
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    layer(x).pow(2).sum().backward()

    # Reference: W' = m · V / ||V||, V = W + s·B·A, the norm per output row (detached as in the paper, 4.3).
    a = layer.lora_A.weight.detach().clone().requires_grad_(True)
    b = layer.lora_B.weight.detach().clone().requires_grad_(True)
    m = layer.lora_magnitude_vector.detach().clone().requires_grad_(True)
    v = layer.base_layer.weight + layer.scaling * b @ a
    norm = v.norm(dim=1).detach() if detached else v.norm(dim=1)
    reference = F.linear(x, (m / norm)[:, None] * v, layer.base_layer.bias)
    reference.pow(2).sum().backward()

    torch.testing.assert_close(layer(x), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_magnitude_vector.grad, m.grad)
    if detached:
        torch.testing.assert_close(layer.lora_A.weight.grad, a.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.lora_B.weight.grad, b.grad, atol=1e-5, rtol=1e-5)
    else:  # the test can tell the two apart
        assert max_diff(layer.lora_A.weight.grad, a.grad) > 1e-4


def test_dora_embedding_and_conv_follow_the_formula():
    torch.manual_seed(0)
    emb = LoraEmbedding(nn.Embedding(11, 6), r=2, alpha=2, dropout=0.0, rslora=False, init="default", dora=True)
    conv = LoraConv(nn.Conv2d(3, 4, 3, padding=1), r=2, alpha=2, dropout=0.0, rslora=False, init="default", dora=True)
    assert emb.lora_magnitude_vector.shape == (6,)  # per embedding dimension, as HF PEFT
    assert conv.lora_magnitude_vector.shape == (1, 4, 1, 1)
    for layer in (emb, conv):
        with torch.no_grad():
            for p in layer.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape) * 0.3)
    ids = torch.randint(0, 11, (2, 5))
    weight = emb.base_layer.weight + emb.delta_weight()
    expected = F.embedding(ids, weight * (emb.lora_magnitude_vector / weight.norm(dim=0)))
    torch.testing.assert_close(emb(ids), expected, atol=1e-5, rtol=1e-5)

    x = torch.randn(2, 3, 5, 5)
    weight = conv.base_layer.weight + conv.delta_weight()
    factor = conv.lora_magnitude_vector.view(-1) / weight.flatten(1).norm(dim=1)
    expected = F.conv2d(x, weight * factor.view(-1, 1, 1, 1), conv.base_layer.bias, padding=1)
    torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("target", [["q_proj", "up_proj"], ["embed_tokens", "v_proj"]])
def test_dora_merge_unmerge(load_base, input_ids, target):
    model = load_base()
    apply_adapter(model, LoraParams(r=4, alpha=8, target_modules=target, dora=True))
    perturb(model)
    layers = lora_layers(model)
    before = {n: m.base_layer.weight.detach().clone() for n, m in layers.items()}
    unmerged = logits(model, input_ids)
    assert max_diff(unmerged, logits(load_base(), input_ids)) > 1e-2
    merge_adapter(model)
    merged_weights = {n: m.base_layer.weight.detach().clone() for n, m in layers.items()}
    assert max_diff(logits(model, input_ids), unmerged) < 1e-4
    merge_adapter(model)
    assert all(torch.equal(m.base_layer.weight, merged_weights[n]) for n, m in layers.items())
    unmerge_adapter(model)
    for name, layer in layers.items():
        assert max_diff(layer.base_layer.weight, before[name]) < 1e-5
    assert max_diff(logits(model, input_ids), unmerged) < 1e-5


def test_dora_dropout_in_training_matches_hf_peft(load_base, input_ids, tmp_path):
    # With dropout active DoRA recomputes the base product on the dropped input; HF PEFT draws its masks in
    # the same order, so the same seed gives the same training-mode output.
    from peft import PeftModel

    model = load_base()
    apply_adapter(model, LoraParams(r=4, alpha=8, dropout=0.3, target_modules=["q_proj", "o_proj"], dora=True))
    perturb(model)
    save_adapter(model, tmp_path, None)
    hf = PeftModel.from_pretrained(load_base(), str(tmp_path), is_trainable=True)
    outputs = []
    for m in (model, hf):
        m.train()
        torch.manual_seed(7)
        outputs.append(logits(m, input_ids))
    model.eval()
    assert max_diff(outputs[0], logits(model, input_ids)) > 1e-3  # dropout did something
    assert max_diff(outputs[0], outputs[1]) < 1e-5


# --- PiSSA / OLoRA -----------------------------------------------------------------------------------------------


def test_pissa_and_olora_decompose_the_weight():
    torch.manual_seed(0)
    base = nn.Linear(10, 12)
    weight = base.weight.detach().clone()
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    pissa = LoraLinear(base, r=3, alpha=6, dropout=0.0, rslora=False, init="pissa")
    top = (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close(pissa.delta_weight(), top, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pissa.base_layer.weight + pissa.delta_weight(), weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.linalg.svdvals(pissa.base_layer.weight)[:7], s[3:], atol=1e-5, rtol=1e-5)

    base = nn.Linear(10, 12)
    weight = base.weight.detach().clone()
    q, upper = torch.linalg.qr(weight)
    olora = LoraLinear(base, r=3, alpha=6, dropout=0.0, rslora=False, init="olora")
    torch.testing.assert_close(olora.lora_B.weight, q[:, :3])
    torch.testing.assert_close(olora.lora_A.weight, upper[:3])
    torch.testing.assert_close(olora.base_layer.weight + olora.delta_weight(), weight, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_base_changing_inits_start_at_identity_and_keep_their_start(load_base, input_ids, init):
    expected = logits(load_base(), input_ids)
    runs = []
    for _ in range(2):  # a resumed run rebuilds the model: the same seed must give the same start
        torch.manual_seed(11)
        model = load_base()
        info = apply_adapter(model, LoraParams(r=4, alpha=8, target_modules="all-linear", init=init))
        runs.append(model)
        assert max_diff(logits(model, input_ids), expected) < 1e-4
        names = {n for n, _ in model.named_parameters()}
        assert not any("initial" in n for n in names) and set(info.param_names) <= names
        assert not any("initial" in k for k in model.state_dict())
        for layer in lora_layers(model).values():
            assert (
                torch.equal(layer.lora_initial_A, layer.lora_A.weight) and layer.lora_initial_A.dtype == torch.float32
            )
    first, second = (dict(m.named_parameters()) for m in runs)
    assert all(torch.equal(first[n], second[n]) for n in first)


SAVE_CASES = {
    "pissa": dict(init="pissa", target_modules=["q_proj", "v_proj", "up_proj"]),
    "pissa_niter-rslora-patterns": dict(
        init="pissa_niter_3",
        rslora=True,
        target_modules=["q_proj", "k_proj", "down_proj"],
        rank_pattern={"k_proj": 2},
        alpha_pattern={"down_proj": 5, "^model.layers.0.self_attn.q_proj": 3},
    ),
    "olora-dora-embedding": dict(init="olora", dora=True, target_modules=["embed_tokens", "q_proj", "o_proj"]),
}


@pytest.mark.parametrize("fields", list(SAVE_CASES.values()), ids=list(SAVE_CASES))
def test_pissa_olora_save_as_plain_lora_for_the_original_base(load_base, input_ids, tiny_model_dir, tmp_path, fields):
    from peft import LoraConfig, PeftConfig, PeftModel

    torch.manual_seed(0)
    model = load_base()
    params = LoraParams(r=4, alpha=8, **fields)
    info = apply_adapter(model, params)
    train_steps(model, input_ids)
    trained = logits(model, input_ids)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert max_diff(trained, logits(load_base(), input_ids)) > 1e-2

    save_adapter(model, tmp_path, str(tiny_model_dir))
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == shapes  # saving changed nothing
    assert max_diff(logits(model, input_ids), trained) == 0

    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    factor = math.sqrt(2) if params.rslora else 2
    assert config["r"] == 8 and config["init_lora_weights"] is True
    assert config["lora_alpha"] == pytest.approx(8 * factor)
    assert config["rank_pattern"] == {k: 2 * v for k, v in params.rank_pattern.items()}
    assert config["alpha_pattern"] == pytest.approx({k: v * factor for k, v in params.alpha_pattern.items()})
    assert config["use_dora"] is params.dora
    hf_config = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(hf_config, LoraConfig) and hf_config.init_lora_weights is True

    saved = load_file(str(tmp_path / WEIGHTS_NAME))
    for name in info.targeted:
        layer = model.get_submodule(name)
        key_a, key_b = (f"base_model.model.{name}.{part}" for part in layer.factor_names)
        assert saved[key_a].shape[0] == saved[key_b].shape[1] == 2 * layer.r
    if params.dora:
        assert any(k.endswith("lora_magnitude_vector") for k in saved)

    # Both libraries, on the ORIGINAL base, give the trained model.
    hf = PeftModel.from_pretrained(load_base(), str(tmp_path)).eval()
    assert max_diff(logits(hf, input_ids), trained) < 5e-5
    ours = load_base()
    load_adapter(ours, tmp_path)
    assert max_diff(logits(ours, input_ids), trained) < 5e-5


def test_hf_peft_converted_pissa_adapter_loads(load_base, input_ids, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=["q_proj", "v_proj"])
    hf = get_peft_model(load_base(), config)
    hf.save_pretrained(str(tmp_path / "initial"))
    perturb(hf)
    hf.eval()
    expected = logits(hf, input_ids)
    hf.save_pretrained(str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    model = load_base()
    load_adapter(model, tmp_path / "converted")
    assert max_diff(logits(model, input_ids), expected) < 5e-5


def test_pissa_on_a_conv_layer_is_refused(conv_base):
    with pytest.raises(PeftCliError, match="method.init"):
        apply_adapter(conv_base(), LoraParams(target_modules=["conv1d"], init="pissa"))


# --- LoRA+ --------------------------------------------------------------------------------------------------------


def test_loraplus_groups_match_hf_create_loraplus_optimizer(load_base):
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    lr, ratio, embedding_scale = 1e-3, 8.0, 0.25
    target = ["embed_tokens", "q_proj", "v_proj"]
    params = LoraParams(
        r=4, target_modules=target, dora=True, loraplus_lr_ratio=ratio, loraplus_lr_embedding=embedding_scale
    )
    model = load_base()
    apply_adapter(model, params)
    groups = optimizer_groups(model, params)
    ours = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        assert group["name"] and group["params"]
        ours.update({names[id(p)]: lr * group["lr_scale"] for p in group["params"]})
    assert set(ours) == {n for n, p in model.named_parameters() if p.requires_grad}

    hf_model = get_peft_model(load_base(), LoraConfig(r=4, target_modules=target, use_dora=True))
    optimizer = create_loraplus_optimizer(
        hf_model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio, loraplus_lr_embedding=lr * embedding_scale
    )
    hf_names = {id(p): n for n, p in hf_model.named_parameters()}
    theirs = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = hf_names[id(p)].removeprefix("base_model.model.").replace(".default", "")
            theirs[name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")] = group["lr"]
    assert ours == pytest.approx(theirs)
    assert ours["model.layers.0.self_attn.q_proj.lora_B.weight"] == pytest.approx(lr * ratio)
    assert ours["model.layers.0.self_attn.q_proj.lora_A.weight"] == pytest.approx(lr)


def test_loraplus_feeds_the_optimizer(load_base):
    from peftcli.recipe.schema import TrainingSection
    from peftcli.train.optim import build_optimizer

    params = LoraParams(r=4, target_modules=["q_proj"], loraplus_lr_ratio=16)
    model = load_base()
    apply_adapter(model, params)
    groups = optimizer_groups(model, params)
    assert [(g["name"], g["lr_scale"]) for g in groups] == [("lora_plus_A", 1.0), ("lora_plus_B", 16.0)]
    training = TrainingSection(learning_rate=1e-4, max_steps=1)
    optimizer = build_optimizer(model, training, groups)
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    b = model.model.layers[0].self_attn.q_proj.lora_B.weight
    a = model.model.layers[0].self_attn.q_proj.lora_A.weight
    assert lrs[id(b)] == pytest.approx(1.6e-3) and lrs[id(a)] == pytest.approx(1e-4)
    assert optimizer_groups(model, LoraParams(r=4, target_modules=["q_proj"])) == []


# --- embeddings and convs -----------------------------------------------------------------------------------------


def test_embedding_layer_init_keys_and_merge(load_base, input_ids, tmp_path):
    model = load_base()
    expected = logits(model, input_ids)
    info = apply_adapter(model, LoraParams(r=4, alpha=8, target_modules=["embed_tokens"], init="gaussian"))
    layer = model.model.embed_tokens
    assert isinstance(layer, LoraEmbedding) and info.targeted == ["model.embed_tokens"]
    assert sorted(info.param_names) == ["model.embed_tokens.lora_embedding_A", "model.embed_tokens.lora_embedding_B"]
    assert torch.count_nonzero(layer.lora_embedding_A) == 0  # A zero, B normal, as HF PEFT (gaussian or not)
    assert layer.lora_embedding_B.std().item() == pytest.approx(1.0, rel=0.3)
    assert layer.weight is layer.base_layer.weight and layer.num_embeddings == 400
    assert torch.equal(logits(model, input_ids), expected)
    perturb(model)
    unmerged = logits(model, input_ids)
    assert max_diff(unmerged, expected) > 1e-2
    merge_adapter(model)
    assert max_diff(logits(model, input_ids), unmerged) < 1e-5
    unmerge_adapter(model)
    assert max_diff(logits(model, input_ids), unmerged) < 1e-5


def test_hf_adapter_with_saved_embedding_base_weights_loads(load_base, input_ids, tmp_path):
    # HF PEFT saves the whole base embedding of a short-named embedding target; loading puts it back.
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    hf = get_peft_model(
        load_base(), LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    )
    hf.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(str(tmp_path))
    saved = load_file(str(tmp_path / WEIGHTS_NAME))
    assert "base_model.model.model.embed_tokens.base_layer.weight" in saved
    model = load_base()
    load_adapter(model, tmp_path)
    assert max_diff(logits(model, input_ids), logits(hf, input_ids)) < 1e-5


@pytest.mark.parametrize("dora", [False, True])
def test_conv_layers_merge_and_interop_with_hf_peft(conv_base, tmp_path, dora):
    from peft import PeftConfig, PeftModel, get_peft_model

    model = conv_base()
    expected = logits(model, CONV_IDS)
    info = apply_adapter(model, LoraParams(r=2, alpha=4, target_modules=CONV_TARGETS, dora=dora, dropout=0.1))
    assert sorted(type(m).__name__ for m in lora_layers(model).values()) == [
        "LoraConv",
        "LoraConv",
        "LoraConv",
        "LoraEmbedding",
    ]
    assert model.conv2d.lora_A.weight.shape == (2, 1, 3, 3) and model.conv2d.lora_A.stride == (2, 2)
    assert model.conv2d.lora_B.weight.shape == (4, 2, 1, 1) and model.conv1d.lora_B.weight.shape == (6, 2, 1)
    assert torch.equal(logits(model, CONV_IDS), expected)
    perturb(model, scale=0.5)
    ours = logits(model, CONV_IDS)
    assert max_diff(ours, expected) > 1e-2
    merge_adapter(model)
    assert max_diff(logits(model, CONV_IDS), ours) < 1e-5
    unmerge_adapter(model)
    assert max_diff(logits(model, CONV_IDS), ours) < 1e-5

    save_adapter(model, tmp_path / "ours", None)
    config_path = tmp_path / "ours" / CONFIG_NAME
    config = json.loads(config_path.read_text())
    config["task_type"] = None  # a custom nn.Module has no HF task (see report: adapter.py writes CAUSAL_LM)
    config_path.write_text(json.dumps(config))
    hf = PeftModel.from_pretrained(conv_base(), str(tmp_path / "ours")).eval()
    assert max_diff(logits(hf, CONV_IDS), ours) < 1e-5

    hf = get_peft_model(conv_base(), PeftConfig.from_pretrained(str(tmp_path / "ours")))
    perturb(hf, seed=1, scale=0.5)
    hf.eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    again = conv_base()
    loaded = load_adapter(again, tmp_path / "hf")
    assert sorted(loaded.targeted) == sorted(info.targeted)
    assert max_diff(logits(again, CONV_IDS), logits(hf, CONV_IDS)) < 1e-5


def test_unsupported_conv_layers_are_refused():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, dilation=2))
    for index, word in (("0", "groups=2"), ("1", "dilation")):
        with pytest.raises(PeftCliError, match=word):
            apply_adapter(net, LoraParams(target_modules=[index]))


# --- a bf16 base ---------------------------------------------------------------------------------------------------

BF16_CASES = {
    "plain": dict(target_modules="all-linear"),
    "dora": dict(target_modules=["q_proj", "down_proj"], dora=True, dropout=0.1),
    "pissa": dict(target_modules=["q_proj", "up_proj"], init="pissa_niter_2"),
    "olora-dora": dict(target_modules=["v_proj"], init="olora", dora=True),
    "embedding-dora": dict(target_modules=["embed_tokens"], dora=True),
}


@pytest.mark.parametrize("fields", list(BF16_CASES.values()), ids=list(BF16_CASES))
def test_bf16_base(tiny_model_dir, input_ids, fields):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    base_out = logits(model, input_ids)
    params = LoraParams(r=4, alpha=8, **fields)
    apply_adapter(model, params)
    # PiSSA/OLoRA keep the residual W - s·B0·A0 in bf16 and add the fp32 branch back, rounded separately
    # (as in HF PEFT), so their start is the base only up to a few bf16 roundings per layer.
    tolerance = 0.1 * base_out.abs().max().item() if params.init != "default" else 0.0
    assert max_diff(logits(model, input_ids), base_out) <= tolerance
    adapter = [p for p in model.parameters() if p.requires_grad]
    assert adapter and all(p.dtype == torch.float32 for p in adapter)
    model.train()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all() for p in adapter)
    model.eval()
    perturb(model)
    unmerged = logits(model, input_ids)
    assert unmerged.dtype == torch.bfloat16 and max_diff(unmerged, base_out) > 0.1
    merge_adapter(model)
    for layer in lora_layers(model).values():
        assert layer.base_layer.weight.dtype == torch.bfloat16
    assert max_diff(logits(model, input_ids), unmerged) < 0.25 * unmerged.abs().max().item()
    unmerge_adapter(model)


def test_bf16_conv(conv_base):
    model = conv_base().to(torch.bfloat16)
    apply_adapter(model, LoraParams(r=2, target_modules=CONV_TARGETS, dora=True))
    perturb(model)
    out = logits(model, CONV_IDS)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    merge_adapter(model)
    assert all(m.base_layer.weight.dtype == torch.bfloat16 for m in lora_layers(model).values())
    assert max_diff(logits(model, CONV_IDS), out) < 0.05 * out.abs().max().item() + 0.05


def test_meta_device_model_is_matched_without_computing(tiny_model_dir):
    # `peft targets` applies the method to a model on the meta device.
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    info = apply_adapter(model, LoraParams(r=4, target_modules="all-linear", init="pissa", dora=True))
    assert len(info.targeted) == 14
    assert all(isinstance(m, LoraLayer) and m.lora_magnitude_vector.is_meta for m in lora_layers(model).values())
