"""Freeze tuning: unfreeze the chosen transformer blocks (or named parts of them) and extra modules.

Nothing is added to the model; the adapter is the unfrozen base tensors, saved as
`base_model.model.<parameter name>`.
"""

from __future__ import annotations

from torch import nn

from peftcli.errors import PeftCliError
from peftcli.models.heads import task_head_names
from peftcli.tuners.freeze.spec import FreezeParams
from peftcli.tuners.protocol import AdapterContext, AppliedMethod, MethodImplementation
from peftcli.tuners.targets import name_matches, short_names

# Last name component of the ModuleList that holds the transformer blocks, across common architectures
# (Llama model.layers, BERT encoder.layer, GPT-2 transformer.h, T5 encoder.block / decoder.block).
BLOCK_LIST_NAMES = ("layers", "layer", "h", "block", "blocks")


def find_block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The model's stacks of transformer blocks: outermost non-empty ModuleLists with a block-list name."""
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and name.rsplit(".", 1)[-1] in BLOCK_LIST_NAMES
    ]
    # A T5 block holds its own `layer` list: only the outer stacks count.
    return [(name, m) for name, m in found if not any(name.startswith(other + ".") for other, _ in found)]


def _block_names(model: nn.Module, params: FreezeParams) -> list[str]:
    stacks = find_block_lists(model)
    if not stacks:
        raise PeftCliError(
            f"method.layers: found no list of transformer blocks in {type(model).__name__} (looked for a module "
            f"list named {', '.join(BLOCK_LIST_NAMES)}); set layers: [] and name what to train in extra_modules"
        )
    blocks = []
    for stack_name, stack in stacks:
        count = len(stack)
        indices = params.layers if params.layers is not None else range(count)
        for index in indices:
            if not -count <= index < count:
                raise PeftCliError(
                    f"method.layers: block {index} is out of range: the model has {count} layers in {stack_name} "
                    f"(use 0..{count - 1}, or -{count}..-1 from the end)"
                )
            name = f"{stack_name}.{index % count}"
            if name not in blocks:
                blocks.append(name)
    return blocks


def _parts_of_blocks(model: nn.Module, blocks: list[str], parts: list[str]) -> list[str]:
    """Full names of the modules inside `blocks` whose block-relative name ends with one of `parts`."""
    chosen, used = [], set()
    for block in blocks:
        for rel, _ in model.get_submodule(block).named_modules():
            matched = [entry for entry in parts if rel and name_matches(rel, [entry])]
            if matched:
                chosen.append(f"{block}.{rel}")
                used.update(matched)
    unused = [entry for entry in parts if entry not in used]
    if unused:
        inside = [rel for rel, _ in model.get_submodule(blocks[0]).named_modules() if rel]
        raise PeftCliError(
            f"method.modules: {', '.join(unused)} matched nothing inside the chosen blocks; "
            f"block parts: {', '.join(short_names(inside))}"
        )
    return chosen


def _extra(model: nn.Module, names: list[str]) -> list[str]:
    everything = [name for name, _ in model.named_modules() if name]
    chosen = [name for name in everything if name_matches(name, names)]
    unused = [entry for entry in names if not any(name_matches(name, [entry]) for name in chosen)]
    if unused:
        top = [name for name, _ in model.named_modules() if name and name.count(".") <= 1]
        raise PeftCliError(
            f"method.extra_modules: {', '.join(unused)} matched no module of this model; "
            f"top-level modules: {', '.join(top)}"
        )
    return chosen


def freeze_targets(model: nn.Module, params: FreezeParams) -> list[str]:
    """Names of the modules whose parameters freeze tuning trains (task heads left out: trained anyway)."""
    chosen: list[str] = []
    if params.layers != []:
        blocks = _block_names(model, params)
        chosen += blocks if params.modules is None else _parts_of_blocks(model, blocks, params.modules)
    chosen += _extra(model, params.extra_modules)
    heads = task_head_names(model)
    unique = []
    for name in chosen:
        if name not in unique and not any(name == h or name.startswith(h + ".") for h in heads):
            unique.append(name)
    return unique


def apply_method(model: nn.Module, params: FreezeParams, context: AdapterContext) -> AppliedMethod:
    """Unfreeze every parameter of the chosen modules."""
    targets = freeze_targets(model, params)
    for name in targets:
        model.get_submodule(name).requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()) and not task_head_names(model):
        raise PeftCliError(
            f"method: the chosen modules ({', '.join(targets) or 'none'}) have no parameters; nothing would be trained"
        )
    return AppliedMethod(targets)


METHOD = MethodImplementation(apply_method=apply_method)
