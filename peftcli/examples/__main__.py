"""`python -m peftcli.examples`: prepare the example model and data in the cache."""

import os

# One line per asset is the progress here. Saving a model makes transformers import DeepSpeed (when
# installed), which warns "Setting accelerator to CPU" on machines without a GPU; this process only writes
# files, on the CPU. transformers converts GGUF files under a progress bar of its own (tqdm reads
# TQDM_DISABLE when it is imported, so both are set first).
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TQDM_DISABLE", "1")

from transformers.utils import logging as hf_logging  # noqa: E402

from peftcli.examples.assets import prepare_all  # noqa: E402

hf_logging.disable_progress_bar()
prepare_all()
