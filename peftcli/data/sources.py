"""Load a recipe data source into a `datasets.Dataset`: local files, a directory of them, or a hub dataset.

A mistake in the user's files is one DataError line that names the file, the line where there is one, and
what is wrong. Checks run before loading: empty files, text that is not UTF-8 (datasets' JSON reader takes
such bytes silently and fails only when the rows are read), and for a directory: no data files, mixed formats,
different columns. When datasets fails on a file anyway, the file is read again here to find the first bad
JSON line or CSV row, so data that loads pays nothing for that search.
"""

from __future__ import annotations

import codecs
import csv
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

from peftcli.errors import DataError
from peftcli.recipe.schema import DATA_FILE_SUFFIXES, DataSource

CHUNK = 1 << 20  # bytes read at a time when scanning a file
# A folder written by `save_to_disk`, or one with a hub config file: datasets reads these by its own layout.
DATASET_DIR_FILES = ("state.json", "dataset_dict.json", ".huggingface.yaml")


def load_source(source: DataSource, key: str):
    """The rows of one source; `key` is its recipe path (data.train) for error messages."""
    import datasets

    datasets.disable_progress_bars()
    path, where = source.path, f"{key}.path"
    builder, files = None, None  # the local files loaded, and their datasets builder
    try:
        if os.path.isfile(path):
            builder = DATA_FILE_SUFFIXES.get(Path(path).suffix.lower())
            if builder is None:
                raise DataError(f"{where}: {path}: unsupported file type; use one of {', '.join(DATA_FILE_SUFFIXES)}")
            files = [path]
        elif os.path.isdir(path) and not _has_own_layout(path):
            builder, files = _directory_files(path, source.split, key)
        if files is None:  # a hub dataset, or a saved or hub-style folder
            dataset = datasets.load_dataset(path, source.subset, split=source.split)
        else:
            for file in files:
                _check_file(file, builder, where)
            with _datasets_errors_hidden():
                dataset = datasets.load_dataset(builder, data_files={source.split: files}, split=source.split)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types for unreadable or unreachable data
        for file in files or []:
            problem = _find_problem(file)
            if problem:
                raise DataError(f"{where}: {problem}") from None
        while isinstance(exc, datasets.exceptions.DatasetGenerationError) and exc.__cause__:
            exc = exc.__cause__  # its own message only says that generating failed
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{where}: cannot read {path}: {text}") from None
    if len(dataset) == 0:
        raise DataError(f"{where}: {path} has no examples")
    if source.max_samples is not None and source.max_samples < len(dataset):
        dataset = dataset.select(range(source.max_samples))
    return dataset


@contextmanager
def _datasets_errors_hidden():
    """datasets logs a file it fails on before raising; the DataError raised instead says it, in one line."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


# --- directories ------------------------------------------------------------------------------------------------


def _has_own_layout(path: str) -> bool:
    """True for a folder datasets reads by its own rules: saved by `save_to_disk`, or a hub-style repo whose
    README has a YAML header (which may name its files and splits)."""
    if any(os.path.exists(os.path.join(path, name)) for name in DATASET_DIR_FILES):
        return True
    readme = os.path.join(path, "README.md")
    if not os.path.isfile(readme):
        return False
    with open(readme, "rb") as f:
        return f.read(3) == b"---"


def _directory_files(path: str, split: str, key: str) -> tuple[str, list[str]]:
    """The builder and sorted files of `split` in a directory of data files, checked before loading.

    Which files make which split is datasets' own rule, as before: train/validation/test (or dev, eval...)
    in a file or folder name, else every file is train. Like datasets, subfolders are searched and hidden
    files and folders skipped. The files found are then loaded by name, so what loads is what was checked.
    """
    from datasets.data_files import DataFilesDict, get_data_patterns

    where = f"{key}.path"
    try:
        found = DataFilesDict.from_patterns(get_data_patterns(path), base_path=path)
    except FileNotFoundError:  # nothing in it but hidden files
        found = {}
    every = sorted({file for files in found.values() for file in files})
    data = [file for file in every if _suffix(file) in DATA_FILE_SUFFIXES]
    if not data:
        if every:
            held = f"it holds only {_names(every, path)}"
        else:
            held = "hidden files are not read" if os.listdir(path) else "it is empty"
        raise DataError(
            f"{where}: {path} has no data files ({held}); "
            f"put {', '.join(DATA_FILE_SUFFIXES)} files in it, or point {where} at a file"
        )
    if len({DATA_FILE_SUFFIXES[_suffix(file)] for file in data}) > 1:
        kinds = sorted({_suffix(file) for file in data})
        listed = "; ".join(f"{kind}: {_names([f for f in data if _suffix(f) == kind], path)}" for kind in kinds)
        raise DataError(
            f"{where}: {path} mixes data formats ({listed}); keep one format per directory, "
            f"or point {where} at one file"
        )
    splits = {str(name): sorted(f for f in files if f in data) for name, files in found.items()}
    splits = {name: files for name, files in splits.items() if files}
    if split not in splits:
        raise DataError(
            f"{where}: {path} has no data files for split {split!r} (its files make split(s) {', '.join(splits)}); "
            f"set {key}.split to one of those"
        )
    files = splits[split]
    _check_same_columns(files, path, where)
    return DATA_FILE_SUFFIXES[_suffix(files[0])], files


def _check_same_columns(files: list[str], path: str, where: str) -> None:
    """Refuse files with different columns, read from the first record or header of each (datasets would
    fail with a cast error, or fill the missing columns with nulls, depending on which file comes first)."""
    first, first_columns = None, None
    for file in files:
        columns = _first_columns(file)
        if columns is None:
            continue
        if first_columns is None:
            first, first_columns = file, columns
        elif columns != first_columns:
            raise DataError(
                f"{where}: {path}: {_rel(first, path)} has columns {', '.join(sorted(first_columns))} but "
                f"{_rel(file, path)} has {', '.join(sorted(columns))}; every file in a directory needs the same "
                "columns"
            )


def _first_columns(file: str) -> set[str] | None:
    """The column names of a file's first record (a CSV header, a parquet schema), or None where that cannot
    be read cheaply (a pretty-printed .json, a line that is not JSON: loading reports those)."""
    suffix = _suffix(file)
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return set(pq.read_schema(file).names)
        if suffix == ".csv":
            with open(file, newline="", encoding="utf-8-sig", errors="replace") as f:
                header = next(csv.reader(f), None)
            return None if header is None else set(header)
        if suffix in (".jsonl", ".json"):
            with open(file, "rb") as f:
                line = f.readline(CHUNK)
                while line and not line.strip():
                    line = f.readline(CHUNK)
            record = json.loads(line)
            return set(record) if isinstance(record, dict) else None
    except (ValueError, OSError, csv.Error):
        return None
    return None  # text files have one column, "text"


# --- files ------------------------------------------------------------------------------------------------------


def _check_file(file: str, builder: str, where: str) -> None:
    """Refuse an empty file, and a text file that is not UTF-8 (parquet is binary)."""
    if os.path.getsize(file) == 0:
        raise DataError(f"{where}: {file} is empty (no examples)")
    if builder == "parquet":
        return
    if _only_blank_lines(file):
        raise DataError(f"{where}: {file} is empty: it has only blank lines (no examples)")
    bad = _first_bad_byte(file)
    if bad is not None:
        offset, value = bad
        raise DataError(
            f"{where}: {file} is not UTF-8 (byte 0x{value:02x} at offset {offset}, line {_line_at(file, offset)}); "
            "re-save it as UTF-8"
        )


def _only_blank_lines(file: str) -> bool:
    """True when a text file holds only whitespace; stops at the first other byte, so data costs one read."""
    with open(file, "rb") as f:
        chunk = f.read(CHUNK).removeprefix(codecs.BOM_UTF8)
        while chunk:
            if chunk.strip():
                return False
            chunk = f.read(CHUNK)
    return True


def _find_problem(file: str) -> str | None:
    """What is wrong in a file datasets failed to load, naming its first bad line or row; None when nothing is
    found here (the caller then passes on datasets' own message)."""
    check = {".jsonl": _json_lines_problem, ".json": _json_document_problem, ".csv": _csv_problem}.get(_suffix(file))
    problem = check(file) if check else None
    return f"cannot read {file}: {problem}" if problem else None


def _first_bad_byte(file: str) -> tuple[int, int] | None:
    """(offset, value) of the first byte that is not UTF-8, decoding in chunks at about disk speed."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes given to the decoder so far
    with open(file, "rb") as f:
        while True:
            chunk = f.read(CHUNK)
            held = len(decoder.getstate()[0])  # the start of a character split across chunks
            if chunk and not held and chunk.isascii():  # most data: checked far faster than decoding
                offset += len(chunk)
                continue
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:  # exc.object is the held bytes followed by this chunk
                return offset - held + exc.start, exc.object[exc.start]
            if not chunk:
                return None
            offset += len(chunk)


def _line_at(file: str, offset: int) -> int:
    """The 1-based line holding byte `offset`."""
    newlines = 0
    with open(file, "rb") as f:
        while offset > 0:
            chunk = f.read(min(CHUNK, offset))
            if not chunk:
                break
            newlines += chunk.count(b"\n")
            offset -= len(chunk)
    return newlines + 1


def _json_lines_problem(file: str) -> str | None:
    """The first line that is not a JSON object (blank lines are skipped, as datasets does)."""
    with open(file, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip())  # without the newline, an error points into this line
            except json.JSONDecodeError as exc:
                return f"line {number} is not valid JSON ({_json_error(exc)}); fix or remove that line"
            if not isinstance(record, dict):
                kind = {list: "an array", str: "a string"}.get(type(record), "a single value")
                return f"line {number} is {kind}, not a JSON object of fields; fix or remove that line"
    return None


def _json_document_problem(file: str) -> str | None:
    """Where a .json file stops being JSON; a .json file may also hold JSON lines, checked line by line."""
    with open(file, encoding="utf-8-sig") as f:
        text = f.read()
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # a whole first value, then more: JSON lines
            return _json_lines_problem(file)
        return f"not valid JSON at line {exc.lineno} ({_json_error(exc)})"
    return None


def _json_error(exc: json.JSONDecodeError) -> str:
    return f"{exc.msg.removesuffix(' at')} at column {exc.colno}"  # some messages end in "at"


def _csv_problem(file: str) -> str | None:
    """The first row with more fields than the header (a row with fewer is read with empty values)."""
    with open(file, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                return None
            start = reader.line_num + 1  # the line a row starts on (a quoted value may span lines)
            for row in reader:
                if len(row) > len(header):
                    return (
                        f"line {start} has {len(row)} fields, expected {len(header)} like the header; "
                        "quote values that contain a comma"
                    )
                start = reader.line_num + 1
        except csv.Error as exc:
            return f"line {reader.line_num}: {exc}"
    return None


def _suffix(file: str) -> str:
    return Path(file).suffix.lower()


def _rel(file: str, path: str) -> str:
    return os.path.relpath(file, path)


def _names(files: list[str], path: str, most: int = 3) -> str:
    """A few of `files`, relative to `path`, with how many more there are."""
    names = [_rel(file, path) for file in files[:most]]
    more = f" and {len(files) - most} more" if len(files) > most else ""
    return ", ".join(names) + more
