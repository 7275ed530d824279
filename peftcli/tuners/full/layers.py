"""Full fine-tuning: unfreeze every base parameter except those of excluded modules.

The adapter is the whole trained model, saved as `base_model.model.<parameter name>`. A tied weight (LM head
sharing the embedding matrix) is one parameter: it is saved once, under its first name, and loading copies
into it in place, so the tie survives.
"""

from __future__ import annotations

from torch import nn

from peftcli.errors import PeftCliError
from peftcli.models.heads import task_head_names
from peftcli.tuners.full.spec import FullParams
from peftcli.tuners.protocol import AdapterContext, AppliedMethod, MethodImplementation
from peftcli.tuners.targets import name_matches, short_names, unmatched_entries


def apply_method(model: nn.Module, params: FullParams, context: AdapterContext) -> AppliedMethod:
    """Make every parameter trainable except those reachable from an excluded module."""
    exclude = params.exclude_modules
    names = [name for name, _ in model.named_modules() if name]
    frozen: set[int] = set()
    if exclude is not None:
        missing = unmatched_entries(names, exclude)
        if missing:
            raise PeftCliError(
                f"method.exclude_modules: {', '.join(missing)} matched no module of this model; "
                f"modules: {', '.join(short_names(names))}"
            )
        for name in names:
            if name_matches(name, exclude):
                frozen.update(id(param) for param in model.get_submodule(name).parameters())
    for param in model.parameters():
        if id(param) not in frozen:
            param.requires_grad_(True)
    heads = task_head_names(model)
    targeted = [
        name
        for name, module in model.named_modules()
        if name
        and not any(name == h or name.startswith(h + ".") for h in heads)
        and any(param.requires_grad for param in module.parameters(recurse=False))
    ]
    if not targeted and not heads:
        raise PeftCliError("method.exclude_modules: every parameter is excluded; nothing would be trained")
    return AppliedMethod(targeted)


METHOD = MethodImplementation(apply_method=apply_method)
