"""`python -m peftcli.examples [gsm8k-pairs]`: prepare the example model and data in the cache.

Without arguments: every asset the quickstart and the tests use (a minute or two). `gsm8k-pairs` also builds
the GSM8K preference pairs of recipes/dpo-smollm2.yaml by sampling the model's own solutions (minutes on a
GPU, about a quarter of an hour on a 2-core CPU; once).
"""

import os
import sys

# One line per asset is the progress here. Saving a model makes transformers import DeepSpeed (when
# installed), which warns "Setting accelerator to CPU" on machines without a GPU; this process only writes
# files, on the CPU. transformers converts GGUF files under a progress bar of its own (tqdm reads
# TQDM_DISABLE when it is imported, so both are set first).
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TQDM_DISABLE", "1")

from transformers.utils import logging as hf_logging  # noqa: E402

from peftcli.examples.assets import prepare_all  # noqa: E402

hf_logging.disable_progress_bar()
unknown = [arg for arg in sys.argv[1:] if arg != "gsm8k-pairs"]
if unknown:
    sys.exit(f"error: unknown asset {unknown[0]!r}; the one asset built on request is gsm8k-pairs")
cache = prepare_all()
if "gsm8k-pairs" in sys.argv[1:]:
    from peftcli.examples.pairs import prepare_gsm8k_pairs

    print(f"GSM8K preference pairs ready in {prepare_gsm8k_pairs(cache)}")
