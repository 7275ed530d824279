"""BitFit: unfreeze the `bias` parameter of each selected module; nothing is added to the model.

The adapter is those base biases, saved as `base_model.model.<module>.bias`.
"""

from __future__ import annotations

from torch import nn

from peftcli.errors import PeftCliError
from peftcli.models.heads import output_head_names, task_head_names
from peftcli.tuners.bitfit.spec import BitFitParams
from peftcli.tuners.protocol import AdapterContext, AppliedMethod, MethodImplementation
from peftcli.tuners.targets import ALL_LINEAR, name_matches, select_targets, short_names, unmatched_entries


def _own_bias(module: nn.Module) -> nn.Parameter | None:
    return dict(module.named_parameters(recurse=False)).get("bias")


def bias_modules(model: nn.Module) -> list[str]:
    """Names of the modules that hold a bias parameter of their own (task heads left out: trained in full)."""
    heads = task_head_names(model)
    return [
        name
        for name, module in model.named_modules()
        if name and _own_bias(module) is not None and not any(name == h or name.startswith(h + ".") for h in heads)
    ]


def find_bias_targets(model: nn.Module, params: BitFitParams) -> list[str]:
    """The modules whose biases BitFit trains; clear errors when the model has none or a name is wrong."""
    candidates = bias_modules(model)
    if not candidates:
        raise PeftCliError(
            f"method.name: bitfit trains biases, and this model ({type(model).__name__}) has none; "
            "choose another method (lora, ia3 or ln_tuning)"
        )
    shown = ", ".join(short_names(candidates))
    target, exclude = params.target_modules, params.exclude_modules
    if target is not None and target != ALL_LINEAR:
        missing = unmatched_entries(candidates, target)
        everything = [name for name, _ in model.named_modules() if name]
        no_bias = [entry for entry in missing if not unmatched_entries(everything, [entry])]
        if no_bias:
            raise PeftCliError(
                f"method.target_modules: {', '.join(no_bias)} has no bias in this model; modules with a bias: {shown}"
            )
        if missing:
            raise PeftCliError(
                f"method.target_modules: {', '.join(missing)} matched nothing; modules with a bias: {shown}"
            )
    if target is None:
        chosen = [name for name in candidates if exclude is None or not name_matches(name, exclude)]
    else:
        if target == ALL_LINEAR:
            candidates = [name for name in candidates if isinstance(model.get_submodule(name), nn.Linear)]
        chosen = select_targets(candidates, target, exclude, output_head_names(model))
    if not chosen:
        raise PeftCliError(
            f"method.target_modules: no bias left to train (after exclude_modules); modules with a bias: {shown}"
        )
    return chosen


def apply_method(model: nn.Module, params: BitFitParams, context: AdapterContext) -> AppliedMethod:
    """Make the selected biases trainable."""
    targets = find_bias_targets(model, params)
    for name in targets:
        _own_bias(model.get_submodule(name)).requires_grad_(True)
    return AppliedMethod(targets)


METHOD = MethodImplementation(apply_method=apply_method)
