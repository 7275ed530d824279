"""Run by test_distributed.py in a fresh process: apply each method to the tiny model built partitioned by
DeepSpeed ZeRO-3 (zero.Init, one gloo process) and to the same model built whole; print what each trains."""

from __future__ import annotations

import json
import os
import sys

import torch

os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
os.environ.setdefault("MASTER_PORT", "29611")

import deepspeed  # noqa: E402
from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config  # noqa: E402

from peftcli.models.load import load_base_model, load_tokenizer  # noqa: E402
from peftcli.recipe.schema import ModelSection  # noqa: E402
from peftcli.tuners.adapter import apply_adapter  # noqa: E402
from peftcli.tuners.protocol import AdapterContext  # noqa: E402
from peftcli.tuners.registry import get_tuner  # noqa: E402

model_dir, cases = sys.argv[1], json.loads(sys.argv[2])
deepspeed.init_distributed(dist_backend="gloo")
section = ModelSection(name_or_path=model_dir, dtype="fp32")
tokenizer = load_tokenizer(section)


def trained(partitioned: bool, name: str, params: dict) -> dict:
    keep = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
    if not partitioned:
        unset_hf_deepspeed_config()
    torch.manual_seed(0)
    model = load_base_model(section)
    base_partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters())
    try:
        apply_adapter(model, get_tuner(name).params(**params), AdapterContext(tokenizer=tokenizer, total_steps=10))
    except Exception as error:  # reported, compared by the test
        return {"error": f"{type(error).__name__}: {error}"}
    finally:
        unset_hf_deepspeed_config()
        del keep
    shapes = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters() if p.requires_grad}
    return {"base_partitioned": base_partitioned, "trainable": shapes}


print(
    json.dumps(
        {label: {"whole": trained(False, n, p), "partitioned": trained(True, n, p)} for label, (n, p) in cases.items()}
    )
)
