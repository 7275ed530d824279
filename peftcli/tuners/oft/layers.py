"""OFT on nn.Linear: y = W (R x), R block-diagonal and orthogonal, built from trainable skew-symmetric blocks.

Numerics follow HF PEFT 0.21: the input is split into `r` blocks of `block_size` features, each block is
multiplied by the Cayley transform (I - Q)(I + Q)^-1 of a skew-symmetric Q (or its truncated Neumann series),
and the rotated input goes through the frozen layer. Parameters are kept in fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from peftcli.errors import PeftCliError
from peftcli.tuners.inject import WrappedLinear, find_targets, replace_module
from peftcli.tuners.oft.spec import SPEC, OftParams
from peftcli.tuners.protocol import AdapterContext, AppliedMethod, MethodImplementation


def cayley_neumann(skew: torch.Tensor, terms: int) -> torch.Tensor:
    """HF PEFT's truncated series for (I - Q)(I + Q)^-1: I + 2Q + 2Q^2 + ... + 2Q^(m-1) + Q^m.

    With m = max(3, terms - 1) once terms > 2 (so 3 and 4 terms give the same series, as in HF PEFT);
    terms == 2 gives I + 2Q and terms == 1 the identity.
    """
    size = skew.shape[-1]
    result = torch.eye(size, device=skew.device, dtype=skew.dtype).repeat(skew.shape[0], 1, 1)
    if terms <= 1:
        return result
    result.add_(skew, alpha=2.0)
    if terms <= 2:
        return result
    power = torch.bmm(skew, skew)
    result.add_(power, alpha=2.0)
    for _ in range(3, terms - 1):
        power = torch.bmm(power, skew)
        result.add_(power, alpha=2.0)
    power = torch.bmm(power, skew)
    result.add_(power)
    return result


class OftRotation(nn.Module):
    """The trainable blocks of one layer: `weight` holds the strict upper triangle of each skew-symmetric Q.

    Its name and shape (blocks x block_size*(block_size-1)/2, one row when blocks are shared) are HF PEFT's
    `oft_R.weight`. The rotation is computed inside this module's forward, so ZeRO-3 gathers `weight` there.
    """

    def __init__(self, blocks: int, block_size: int, params: OftParams, device: torch.device):
        super().__init__()
        self.blocks = blocks
        self.block_size = block_size
        self.block_share = params.block_share
        self.use_cayley_neumann = params.use_cayley_neumann
        self.num_terms = params.num_cayley_neumann_terms
        self.coft = params.coft
        self.eps = params.eps
        self.module_dropout = params.module_dropout
        stored = 1 if params.block_share else blocks
        entries = block_size * (block_size - 1) // 2
        self.weight = nn.Parameter(torch.zeros(stored, entries, device=device, dtype=torch.float32))
        rows, cols = torch.triu_indices(block_size, block_size, 1)
        self.register_buffer("rows", rows.to(device), persistent=False)
        self.register_buffer("cols", cols.to(device), persistent=False)

    def skew(self, entries: torch.Tensor) -> torch.Tensor:
        """The skew-symmetric matrices Q (stored x block_size x block_size) from their upper triangles."""
        size = self.block_size
        upper = torch.zeros(entries.shape[0], size, size, device=entries.device, dtype=entries.dtype)
        upper[:, self.rows, self.cols] = entries
        return upper - upper.transpose(-2, -1)

    @torch.no_grad()
    def constrain_(self) -> None:
        """COFT: pull each block's Q back onto the ball of radius eps / sqrt(blocks), in place (HF PEFT's rule)."""
        skew = self.skew(self.weight)
        radius = self.eps / torch.sqrt(torch.tensor(float(skew.shape[0])))
        norm = torch.norm(skew, dim=(1, 2), keepdim=True)
        projected = torch.where(norm <= radius, skew, radius * (skew / norm))
        self.weight.copy_(projected[:, self.rows, self.cols])

    def rotations(self) -> torch.Tensor:
        """The orthogonal blocks R (stored x block_size x block_size), fp32."""
        if self.coft:
            self.constrain_()
        skew = self.skew(self.weight)
        if self.use_cayley_neumann:
            return cayley_neumann(skew, self.num_terms)
        eye = torch.eye(self.block_size, device=skew.device, dtype=skew.dtype).expand_as(skew)
        return torch.linalg.solve(eye + skew, eye - skew, left=False)

    def full_rotations(self) -> torch.Tensor:
        """One block per input slice (blocks x block_size x block_size), shared blocks repeated."""
        rotations = self.rotations()
        return rotations.repeat(self.blocks, 1, 1) if self.block_share else rotations

    def _drop_blocks(self, rotations: torch.Tensor) -> torch.Tensor:
        # Multiplicative dropout: a random int(p * blocks) of the blocks become the identity for this step.
        # (HF PEFT 0.21 builds this layer but never calls it, so its training ignores module_dropout.)
        count = rotations.shape[0]
        if count == 1:
            return rotations
        dropped = torch.zeros(count, device=rotations.device, dtype=rotations.dtype)
        dropped[: int(self.module_dropout * count)] = 1.0
        dropped = dropped[torch.randperm(count, device=rotations.device)].view(count, 1, 1)
        eye = torch.eye(self.block_size, device=rotations.device, dtype=rotations.dtype)
        return (1 - dropped) * rotations + dropped * eye

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rotations = self.full_rotations()
        if self.training and self.module_dropout > 0:
            rotations = self._drop_blocks(rotations)
        shape = x.shape
        blocks = x.reshape(*shape[:-1], self.blocks, self.block_size)
        return torch.einsum("...rk,rkc->...rc", blocks, rotations).reshape(shape)


class OftLinear(WrappedLinear):
    """A frozen linear layer whose input is first rotated by a trainable block-diagonal orthogonal matrix."""

    def __init__(self, base_layer: nn.Linear, blocks: int, block_size: int, params: OftParams):
        super().__init__(base_layer)
        self.oft_R = OftRotation(blocks, block_size, params, base_layer.weight.device)

    def _apply_blocks(self, blocks: torch.Tensor) -> None:
        # W' = W R^T blockwise, i.e. each slice of W's columns times its block's transpose, in fp32.
        weight = self.base_layer.weight
        out_features = weight.shape[0]
        sliced = weight.data.float().reshape(out_features, self.oft_R.blocks, self.oft_R.block_size)
        updated = torch.einsum("ork,rck->orc", sliced, blocks.to(sliced.device))
        weight.data = updated.reshape(weight.shape).to(weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the rotation into the base weight (once; merging twice is a no-op)."""
        if self.merged:
            return
        self._apply_blocks(self.oft_R.full_rotations())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo the merge with each block's inverse (its transpose when exactly orthogonal; the Neumann series
        is only nearly so), computed in float64."""
        if not self.merged:
            return
        inverses = torch.linalg.inv(self.oft_R.full_rotations().double()).float()
        self._apply_blocks(inverses)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        rotated = self.oft_R(x.to(self.oft_R.weight.dtype))
        return self.base_layer(rotated.to(x.dtype))

    def extra_repr(self) -> str:
        return f"blocks={self.oft_R.blocks}, block_size={self.oft_R.block_size}"


def block_layout(name: str, in_features: int, params: OftParams) -> tuple[int, int]:
    """(blocks, block_size) for a layer; an error naming the layer and the valid values when it does not fit."""
    wanted = params.block_size or params.r
    if in_features % wanted == 0 and in_features // (params.r or 1) >= 2:
        other = in_features // wanted
        return (other, wanted) if params.block_size else (wanted, other)
    # Valid block sizes divide in_features and are at least 2 (a 1x1 skew-symmetric block is always 0).
    sizes = [d for d in range(2, in_features + 1) if in_features % d == 0]
    valid = sizes if params.block_size else [in_features // d for d in sizes]
    shown = ", ".join(str(v) for v in sorted(valid)[:16]) + (", ..." if len(valid) > 16 else "")
    key = "method.block_size" if params.block_size else "method.r"
    raise PeftCliError(
        f"{key}: {wanted} does not fit {name} (in_features {in_features}); r x block_size must equal in_features "
        f"with blocks of at least 2: valid {key.rsplit('.', 1)[-1]} values there are {shown} "
        f"(or leave the layer out with method.exclude_modules)"
    )


def apply_method(model: nn.Module, params: OftParams, context: AdapterContext) -> AppliedMethod:
    """Wrap every targeted linear layer of `model` in an OftLinear."""
    targets = find_targets(model, params.target_modules, params.exclude_modules, SPEC.capabilities.layer_types, "oft")
    layouts = {name: block_layout(name, model.get_submodule(name).in_features, params) for name in targets}
    for name in targets:
        blocks, block_size = layouts[name]
        replace_module(model, name, OftLinear(model.get_submodule(name), blocks, block_size, params))
    return AppliedMethod(targets)


METHOD = MethodImplementation(apply_method=apply_method)
