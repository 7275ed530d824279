"""AdaLoRA on nn.Linear: y = W x + (alpha / init_r) * B ((A * E) dropout(x)), plus its rank allocator.

lora_A (r x in, right singular vectors), lora_E (r x 1, singular values) and lora_B (out x r, left singular
vectors) are HF PEFT's names and shapes. Pruning zeroes entries of lora_E; the layers keep their full
init_r size in memory, and only saving trims them to the kept triplets (loading pads them back), so the
on-disk tensors and `rank_pattern` are exactly HF PEFT's.

Training hooks (called by the loop): `extra_loss` (orthogonality penalty) and `after_optimizer_step` (the
allocation, HF PEFT's update_and_allocate); `config_updates` records the final ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from peftcli.errors import AdapterError, PeftCliError
from peftcli.tuners.adalora.spec import SPEC, AdaLoraParams
from peftcli.tuners.hf_format import HF_KEY_PREFIX
from peftcli.tuners.inject import AdditiveLinear, find_targets, replace_module
from peftcli.tuners.protocol import AdapterContext, AppliedMethod, MethodImplementation

STATE_ATTR = "peftcli_adalora"
_FACTORS = ("lora_A", "lora_B", "lora_E")


class AdaLoraLinear(AdditiveLinear):
    """A frozen linear layer plus a trainable SVD-form update P diag(E) Q of rank init_r."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__(base_layer)
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base_layer.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.empty(base_layer.out_features, r, device=device, dtype=torch.float32))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=device, dtype=torch.float32))
        # E = 0 makes the layer start as the identity; P and Q start small and random (HF PEFT's init).
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
        # The divisor of the scale: init_r, and it stays init_r while triplets are pruned (HF PEFT's ranknum).
        self.register_buffer("ranknum", torch.full((1,), float(r), device=device), persistent=False)
        self.scaling = alpha
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """The update this adapter adds to the base weight, scaled, in fp32."""
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / (self.ranknum + 1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        hidden = self.lora_dropout(x.to(self.lora_A.dtype))
        delta = (hidden @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.scaling / (self.ranknum + 1e-5)
        return result + delta.to(result.dtype)

    def extra_repr(self) -> str:
        return f"init_r={self.lora_A.shape[0]}, scaling={self.scaling:g}"


@dataclass
class RankAllocator:
    """The budget schedule and importance estimates of one model's AdaLoRA layers (HF PEFT's RankAllocator)."""

    params: AdaLoraParams
    total_step: int | None
    layers: dict[str, AdaLoraLinear]  # targeted module name -> layer, in model order
    rank_pattern: dict[str, list[bool]] | None = None  # '<module>.lora_E' -> kept triplets
    sensitivity: dict[str, torch.Tensor] = field(default_factory=dict)  # '<module>.<factor>' -> EMA of |p * g|
    uncertainty: dict[str, torch.Tensor] = field(default_factory=dict)
    zeros_seen: dict[str, torch.Tensor] | None = None  # zero singular values before the current step
    pruned_masks: dict[str, torch.Tensor] | None = None  # the final pattern's pruned entries, per layer

    @property
    def init_budget(self) -> int:
        return sum(layer.lora_A.shape[0] for layer in self.layers.values())

    @property
    def target_budget(self) -> int:
        return self.params.target_r * len(self.layers)

    def schedule(self, step: int) -> tuple[int, bool]:
        """(total rank budget, whether to prune now) at `step`: flat, then cubic decay, then the target."""
        p, total = self.params, self.total_step
        if step <= p.tinit:
            return self.init_budget, False
        if step > total - p.tfinal:
            return self.target_budget, True
        remaining = 1 - (step - p.tinit) / (total - p.tfinal - p.tinit)
        budget = int((self.init_budget - self.target_budget) * (remaining**3) + self.target_budget)
        return budget, step % p.delta_t == 0

    @torch.no_grad()
    def update_importance(self) -> None:
        """Smooth |param x grad| (sensitivity) and its deviation (uncertainty) with EMAs, per entry."""
        beta1, beta2 = self.params.beta1, self.params.beta2
        for name, layer in self.layers.items():
            for factor in _FACTORS:
                param = getattr(layer, factor)
                key = f"{name}.{factor}"
                grad = param.grad if param.grad is not None else torch.zeros_like(param)
                score = (param * grad).abs()
                if key not in self.sensitivity:
                    self.sensitivity[key] = torch.zeros_like(param)
                    self.uncertainty[key] = torch.zeros_like(param)
                smoothed = beta1 * self.sensitivity[key] + (1 - beta1) * score
                self.uncertainty[key] = beta2 * self.uncertainty[key] + (1 - beta2) * (score - smoothed).abs()
                self.sensitivity[key] = smoothed

    def _triplet_scores(self, name: str) -> torch.Tensor:
        def element(factor: str) -> torch.Tensor:
            key = f"{name}.{factor}"
            return self.sensitivity[key] * self.uncertainty[key]

        # A triplet's score: its singular value's, plus the mean over its row of A and its column of B.
        vectors = element("lora_A").mean(dim=1).view(-1) + element("lora_B").mean(dim=0).view(-1)
        return element("lora_E").view(-1) + vectors

    @torch.no_grad()
    def prune_to(self, budget: int) -> dict[str, list[bool]]:
        """Zero the singular values of the least important triplets so that `budget` remain (ties go too)."""
        scores = {name: self._triplet_scores(name) for name in self.layers}
        drop = self.init_budget - budget
        if drop <= 0:
            keep = {name: torch.ones_like(score, dtype=torch.bool) for name, score in scores.items()}
        else:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k=drop)[0].item()
            keep = {name: ~(score <= threshold) for name, score in scores.items()}
        pattern = {}
        for name, layer in self.layers.items():
            layer.lora_E.masked_fill_(~keep[name].view(-1, 1), 0.0)
            pattern[f"{name}.lora_E"] = keep[name].tolist()
        return pattern

    @torch.no_grad()
    def apply_pattern(self) -> None:
        """Zero again the singular values the final pattern pruned (training would otherwise revive them)."""
        if self.pruned_masks is None:  # built once per pattern: this runs every step of the final phase
            self.pruned_masks = {
                name: ~torch.tensor(self.rank_pattern[f"{name}.lora_E"], device=layer.lora_E.device).view(-1, 1)
                for name, layer in self.layers.items()
            }
        for name, layer in self.layers.items():
            layer.lora_E.masked_fill_(self.pruned_masks[name], 0.0)

    def remember_zeros(self) -> None:
        """Note which singular values are zero now, before the optimizer step can revive them.

        A resumed run has lost the allocator's pattern; in its final phase the checkpoint's zeros are the pattern.
        """
        if self.rank_pattern is None:
            self.zeros_seen = {name: layer.lora_E.detach().view(-1) == 0 for name, layer in self.layers.items()}

    def recovered_pattern(self) -> dict[str, list[bool]]:
        """The kept triplets as the non-zero singular values seen before this step (or now, if none were seen)."""
        seen = self.zeros_seen or {name: layer.lora_E.view(-1) == 0 for name, layer in self.layers.items()}
        return {f"{name}.lora_E": (~zero).tolist() for name, zero in seen.items()}

    def step(self, step: int) -> None:
        """HF PEFT's update_and_allocate at optimizer step `step`."""
        end = self.total_step - self.params.tfinal
        if step < end:
            self.update_importance()
            budget, prune = self.schedule(step)
            if prune:
                self.rank_pattern, self.pruned_masks = self.prune_to(budget), None
        elif step == end:
            budget, _ = self.schedule(step)
            if self.sensitivity:
                self.rank_pattern = self.prune_to(budget)
            else:  # resumed exactly here, without importance estimates: keep what the checkpoint kept
                self.rank_pattern = self.recovered_pattern()
                self.apply_pattern()
            self.sensitivity, self.uncertainty, self.pruned_masks = {}, {}, None
        else:
            if self.rank_pattern is None:
                self.rank_pattern = self.recovered_pattern()
            self.apply_pattern()
        self.zeros_seen = None


def _allocator(model: nn.Module) -> RankAllocator:
    allocator = getattr(model, STATE_ATTR, None)
    if allocator is None:
        raise AdapterError("the model has no AdaLoRA adapter")
    return allocator


def _resolve_total_step(params: AdaLoraParams, context: AdapterContext) -> int | None:
    if params.total_step is not None:
        return params.total_step
    total = context.total_steps
    if total is not None and params.tinit >= total - params.tfinal:
        raise PeftCliError(
            f"method.tinit/method.tfinal: tinit ({params.tinit}) and tfinal ({params.tfinal}) leave no budgeting "
            f"phase in the run's {total} steps (training.max_steps, or what the epochs amount to): lower "
            "method.tinit or method.tfinal, train longer, or set method.total_step"
        )
    return total


def apply_method(model: nn.Module, params: AdaLoraParams, context: AdapterContext) -> AppliedMethod:
    """Wrap every targeted linear layer in an AdaLoraLinear and attach the rank allocator to the model."""
    total_step = _resolve_total_step(params, context)
    targets = find_targets(
        model, params.target_modules, params.exclude_modules, SPEC.capabilities.layer_types, "adalora"
    )
    layers = {}
    for name in targets:
        layer = AdaLoraLinear(model.get_submodule(name), params.init_r, params.alpha, params.dropout)
        replace_module(model, name, layer)
        layers[name] = layer
    pattern = None
    if params.rank_pattern is not None:
        expected = {f"{name}.lora_E" for name in targets}
        if set(params.rank_pattern) != expected:
            odd = sorted(set(params.rank_pattern) ^ expected)
            raise AdapterError(
                f"method.rank_pattern: does not match the adapted layers (e.g. {odd[0]}); wrong base model?"
            )
        pattern = {key: list(params.rank_pattern[key]) for key in sorted(expected)}
    # A plain attribute, not a submodule: the allocator holds references to the layers and its own estimates.
    object.__setattr__(model, STATE_ATTR, RankAllocator(params, total_step, layers, pattern))
    return AppliedMethod(targets)


def extra_loss(model: nn.Module, params: AdaLoraParams) -> torch.Tensor | None:
    """orth_reg_weight x the mean over A and B of ||A A^T - I||_F and ||B^T B - I||_F; None when the weight is 0."""
    allocator = _allocator(model)
    allocator.remember_zeros()  # called before the optimizer step: see RankAllocator.remember_zeros
    weight = allocator.params.orth_reg_weight
    if weight == 0 or not allocator.layers:
        return None
    penalty, count = None, 0
    for layer in allocator.layers.values():
        for gram in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):
            eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
            term = torch.norm(gram - eye, p="fro")
            penalty = term if penalty is None else penalty + term
            count += 1
    return weight * (penalty / count)


def after_optimizer_step(model: nn.Module, params: AdaLoraParams, step: int) -> None:
    """Update importance and prune to the scheduled budget; `step` is the 0-based index of the step just taken.

    Call it after optimizer.step() and before the gradients are cleared (it reads them).
    """
    allocator = _allocator(model)
    if allocator.total_step is None:
        raise PeftCliError(
            "method.total_step: AdaLoRA's rank schedule needs the training length; set method.total_step "
            "(or train through peft train, which fills it from training.max_steps)"
        )
    allocator.step(step)


def training_state(model: nn.Module, params: AdaLoraParams) -> dict[str, torch.Tensor]:
    """The allocator's importance estimates and current pattern, so a resumed run prunes as an unbroken one."""
    allocator = _allocator(model)
    state = {f"sensitivity.{k}": v.detach().cpu() for k, v in allocator.sensitivity.items()}
    state.update({f"uncertainty.{k}": v.detach().cpu() for k, v in allocator.uncertainty.items()})
    for key, kept in (allocator.rank_pattern or {}).items():
        state[f"pattern.{key}"] = torch.tensor(kept, dtype=torch.bool)
    return state


def load_training_state(model: nn.Module, params: AdaLoraParams, tensors: dict[str, torch.Tensor]) -> None:
    """Restore `training_state` into the model's allocator."""
    allocator = _allocator(model)
    device = next(iter(allocator.layers.values())).lora_E.device
    allocator.sensitivity, allocator.uncertainty, pattern = {}, {}, {}
    for key, tensor in tensors.items():
        kind, _, name = key.partition(".")
        if kind == "sensitivity":
            allocator.sensitivity[name] = tensor.to(device)
        elif kind == "uncertainty":
            allocator.uncertainty[name] = tensor.to(device)
        elif kind == "pattern":
            pattern[name] = tensor.tolist()
    allocator.rank_pattern = pattern or None
    allocator.pruned_masks = None


def config_updates(model: nn.Module, params: AdaLoraParams) -> dict:
    """The schedule length and the kept triplets (rank_pattern) as HF PEFT records them."""
    allocator = _allocator(model)
    if allocator.total_step is None:
        raise AdapterError(
            "method.total_step: unknown, and HF PEFT cannot read an AdaLoRA adapter without it; set "
            "method.total_step (or give the training length when applying the method)"
        )
    pattern = allocator.rank_pattern
    return {"total_step": allocator.total_step, "rank_pattern": dict(pattern) if pattern is not None else None}


def _kept(pattern: dict[str, list[bool]], name: str) -> torch.Tensor:
    return torch.tensor(pattern[f"{name}.lora_E"], dtype=torch.bool)


def adapter_tensors(model: nn.Module, params: AdaLoraParams, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep only the pattern's triplets of each layer (HF PEFT's saved shapes); the rest as usual."""
    allocator = _allocator(model)
    tensors = {HF_KEY_PREFIX + name: tensor for name, tensor in named.items()}
    if allocator.rank_pattern is None:
        return tensors
    for name in allocator.layers:
        kept = _kept(allocator.rank_pattern, name)
        for factor in _FACTORS:
            key = f"{HF_KEY_PREFIX}{name}.{factor}"
            tensor = tensors[key]
            tensors[key] = (tensor[:, kept] if factor == "lora_B" else tensor[kept]).contiguous()
    return tensors


def load_tensors(model: nn.Module, params: AdaLoraParams, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Put trimmed triplets back at their places in the full init_r tensors (zeros elsewhere)."""
    allocator = _allocator(model)
    named = {key.removeprefix(HF_KEY_PREFIX): value for key, value in tensors.items()}
    if allocator.rank_pattern is None:
        return named
    for name, layer in allocator.layers.items():
        kept = _kept(allocator.rank_pattern, name)
        for factor in _FACTORS:
            key = f"{name}.{factor}"
            if key not in named:
                continue  # reported as missing by the caller
            saved, full = named[key], torch.zeros_like(getattr(layer, factor), device="cpu")
            axis = 1 if factor == "lora_B" else 0
            if saved.shape[axis] != int(kept.sum()) or saved.dim() != 2:
                raise AdapterError(
                    f"adapter does not fit: {HF_KEY_PREFIX}{key} has shape {tuple(saved.shape)} but its rank_pattern "
                    f"keeps {int(kept.sum())} of {kept.numel()} triplets"
                )
            if axis == 1:
                full[:, kept] = saved.to(full.dtype)
            else:
                full[kept] = saved.to(full.dtype)
            named[key] = full
    return named


METHOD = MethodImplementation(
    apply_method=apply_method,
    adapter_tensors=adapter_tensors,
    load_tensors=load_tensors,
    extra_loss=extra_loss,
    after_optimizer_step=after_optimizer_step,
    training_state=training_state,
    load_training_state=load_training_state,
    config_updates=config_updates,
)
