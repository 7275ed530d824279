"""Load a recipe data source into a `datasets.Dataset`: local files, a directory of them, or a hub dataset."""

from __future__ import annotations

import os
from pathlib import Path

from peftcli.errors import DataError
from peftcli.recipe.schema import DATA_FILE_SUFFIXES, DataSource


def load_source(source: DataSource, key: str):
    """The rows of one source; `key` is its recipe path (data.train) for error messages."""
    import datasets

    datasets.disable_progress_bars()
    path = source.path
    try:
        if os.path.isfile(path):
            builder = DATA_FILE_SUFFIXES.get(Path(path).suffix.lower())
            if builder is None:
                raise DataError(
                    f"{key}.path: {path}: unsupported file type; use one of {', '.join(DATA_FILE_SUFFIXES)}"
                )
            if os.path.getsize(path) == 0:
                raise DataError(f"{key}.path: {path} is empty")
            dataset = datasets.load_dataset(builder, data_files={source.split: path}, split=source.split)
        elif os.path.isdir(path):
            dataset = datasets.load_dataset(path, source.subset, split=source.split)
        else:
            dataset = datasets.load_dataset(path, source.subset, split=source.split)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types for unreadable or unreachable data
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{key}.path: cannot read {path}: {text}") from None
    if len(dataset) == 0:
        raise DataError(f"{key}.path: {path} has no examples")
    if source.max_samples is not None and source.max_samples < len(dataset):
        dataset = dataset.select(range(source.max_samples))
    return dataset
