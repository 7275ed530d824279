"""The reference policy's log-probabilities, computed once before the first step (`objective.reference:
precomputed`), instead of swapping the starting tensors in for a second forward each step.

Every preference example has two rows (a pair's chosen and rejected sides; an unpaired example's own row and
its mismatched row). Before the first step, while the weights are still the starting policy, one no-grad
eval-mode pass sums each row's completion log-probability; the table keeps the two sums per example, found
again through the `row` column the data carries (train examples first, then validation ones).

The pass is shared out over the processes, every process running the same number of batches, so it works
under ZeRO-3 and FSDP2, where a forward needs every process. The table is written into the run directory
with the fingerprints of the tokenized data it was computed on; a resumed run reads it back instead of
computing it again, and data that changed since is computed afresh.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REFERENCE_FILE = "reference_logps.safetensors"
ROWS = ("input_ids", "attention_mask", "labels")


@dataclass
class ReferenceTable:
    """Per example (by `row`): the starting policy's summed completion log-probabilities of its two rows."""

    values: torch.Tensor  # (examples, 2) float64

    def logps(self, model, batch: dict, tokens) -> torch.Tensor:
        """The batch's reference log-probabilities in its row order: every first row, then every second."""
        found = self.values[batch["row"].cpu()]
        return torch.cat([found[:, 0], found[:, 1]]).to(batch["input_ids"].device, torch.float32)


def fingerprint(splits) -> str:
    """A hash of the tokenized values of the splits, independent of how Arrow happens to chunk them (datasets'
    own fingerprints, and the bytes of a table, differ between a fresh tokenization and a cached one)."""
    import hashlib

    import numpy as np
    import pyarrow as pa

    digest = hashlib.sha256()
    for split in splits:
        if split is None:
            continue
        table = split.flatten_indices().data.table if split._indices is not None else split.data.table
        for name in sorted(table.column_names):
            column = table.column(name).combine_chunks()
            digest.update(name.encode())
            if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
                digest.update(np.asarray(column.value_lengths().to_numpy(zero_copy_only=False), np.int64).tobytes())
                column = column.flatten()
            digest.update(np.asarray(column.to_numpy(zero_copy_only=False), np.float64).tobytes())
    return digest.hexdigest()


def _process_share(count: int, rank: int, world: int, batch: int) -> list[list[int]]:
    """This process's batches of example indices: a strided share, padded (by repeating its last index) to the
    same number of batches on every process."""
    share = list(range(rank, count, world)) or [0]
    batches = math.ceil(math.ceil(count / world) / batch)
    share += [share[-1]] * (batches * batch - len(share))
    return [share[i : i + batch] for i in range(0, len(share), batch)]


@torch.no_grad()
def compute_table(model, dataset, collator, tokens, accelerator, batch_size: int, log) -> torch.Tensor:
    """(examples, 2) reference sums of one split, every process taking part; all processes get the whole."""
    rank, world = accelerator.process_index, accelerator.num_processes
    batches = _process_share(len(dataset), rank, world, batch_size)
    mine = []
    was_training = model.training
    model.eval()
    started, reported = time.perf_counter(), time.perf_counter()
    try:
        for number, indices in enumerate(batches, start=1):
            batch = collator([dataset[i] for i in indices])
            rows = {key: batch[key].to(accelerator.device) for key in ROWS if key in batch}
            sums = -tokens.loss_sums(model, rows)[0].double()
            first, second = sums.chunk(2)
            mine.append(torch.stack([torch.tensor(indices, device=sums.device, dtype=torch.float64), first, second], 1))
            if time.perf_counter() - reported > 10 or number == len(batches):
                took = time.perf_counter() - started
                log(f"  reference log-probabilities: {number}/{len(batches)} batches ({took:.0f} s)")
                reported = time.perf_counter()
    finally:
        model.train(was_training)
    local = torch.cat(mine)  # (index, first, second) rows; every process has as many
    found = (accelerator.gather(local) if world > 1 else local).cpu()
    table = torch.full((len(dataset), 2), float("nan"), dtype=torch.float64)
    table[found[:, 0].long()] = found[:, 1:]
    return table


def load_table(out_dir: Path, expected: str, rows: int) -> torch.Tensor | None:
    """The run's saved table, when it was computed on the same tokenized data."""
    from safetensors import safe_open

    path = out_dir / REFERENCE_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as handle:
            if (handle.metadata() or {}).get("data") != expected:
                return None
            table = handle.get_tensor("logps")
    except Exception:  # a torn file: computed again
        return None
    return table if table.shape == (rows, 2) else None


def save_table(out_dir: Path, table: torch.Tensor, data_fingerprint: str) -> None:
    from safetensors.torch import save_file

    from peftcli.train.safe_write import staged_file

    with staged_file(out_dir / REFERENCE_FILE, overwrite=True) as tmp:
        save_file({"logps": table.contiguous()}, str(tmp), metadata={"data": data_fingerprint})
