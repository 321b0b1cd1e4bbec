"""Tuning datasets: read a JSONL, CSV or JSON file into `Example`s and validate every row first.

All bad rows are reported together, in one `InvalidArgument` naming each row, before anything
trains: "line 12: output has 5,231 characters; the limit is 5,000".
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from tunery.engine.specs import MAX_INPUT_CHARS, MAX_OUTPUT_CHARS, Example
from tunery.errors import InvalidArgument

INPUT_KEYS = ("text_input", "textInput", "input")
OUTPUT_KEY = "output"
SUFFIXES = (".jsonl", ".json", ".csv")
MAX_REPORTED = 10

# One parsed row: where it is ("line 3") and the object found there, or why none could be read.
_Row = tuple[str, object]


class _Unreadable(str):
    """A row that could not be parsed at all; the string says why."""


def load_examples(path: str | Path) -> list[Example]:
    """Read and validate a dataset file; raise one `InvalidArgument` listing every bad row."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InvalidArgument(
            f"{path}: unknown dataset format {repr(suffix) if suffix else '(no extension)'}; "
            "use .jsonl, .json or .csv"
        )
    text = _read_text(path)
    if not text.strip():
        raise InvalidArgument(f"{path} is empty; it needs at least one example")
    if suffix == ".jsonl":
        rows = list(_jsonl_rows(text))
    elif suffix == ".csv":
        rows = list(_csv_rows(path, text))
    else:
        rows = list(_json_rows(path, text))
    if not rows:
        raise InvalidArgument(f"{path} has no examples; it needs at least one")

    examples: list[Example] = []
    problems: list[str] = []
    for where, obj in rows:
        example, errors = _to_example(obj)
        if errors:
            problems.append(f"{where}: {'; '.join(errors)}")
        elif example is not None:
            examples.append(example)
    _raise_if_any(problems, f"{path}: {len(problems)} of {len(rows)} examples are invalid")
    return examples


def validate_examples(
    examples: Sequence[Example], label: str = "example", input_name: str = "input"
) -> None:
    """Check inline examples against the dataset limits; messages say "{label} N" (1-based) and
    call the input field `input_name` (the REST API says textInput)."""
    if not examples:
        raise InvalidArgument("the training data needs at least one example")
    problems: list[str] = []
    for i, ex in enumerate(examples, start=1):
        errors = _check_text(input_name, ex.text_input, MAX_INPUT_CHARS)
        errors += _check_text("output", ex.output, MAX_OUTPUT_CHARS)
        if errors:
            problems.append(f"{label} {i}: {'; '.join(errors)}")
    _raise_if_any(problems, f"{len(problems)} of {len(examples)} examples are invalid")


# --- reading -------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    """The file as text (UTF-8, BOM tolerated), or one clear line saying why not."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InvalidArgument(f"dataset file not found: {path}") from None
    except IsADirectoryError:
        raise InvalidArgument(f"{path} is a directory, not a dataset file") from None
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise InvalidArgument(f"cannot read dataset file {path}: {e.strerror or e}") from None


def _jsonl_rows(text: str) -> Iterator[_Row]:
    """One JSON object per line; blank lines are skipped but still counted."""
    # split on "\n" only: str.splitlines would also break on U+2028 inside a JSON string
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {n}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"line {n}", _Unreadable(f"invalid JSON ({e.msg} at column {e.colno})")


def _csv_rows(path: Path, text: str) -> Iterator[_Row]:
    """A header row naming the columns, then one example per row ("row 1" is the first after it)."""
    reader = csv.DictReader(io.StringIO(text))
    try:
        header = reader.fieldnames or []
        if not any(k in header for k in INPUT_KEYS) or OUTPUT_KEY not in header:
            raise InvalidArgument(
                f"{path}: the header row needs an input column ({', '.join(INPUT_KEYS)}) "
                f"and an {OUTPUT_KEY!r} column; it has {', '.join(map(repr, header)) or 'none'}"
            )
        for n, record in enumerate(reader, start=1):
            record.pop(None, None)  # cells beyond the header's columns
            yield f"row {n}", {k: v for k, v in record.items() if v is not None}
    except csv.Error as e:
        raise InvalidArgument(f"{path}: invalid CSV at line {reader.line_num}: {e}") from None


def _json_rows(path: Path, text: str) -> Iterator[_Row]:
    """A list of objects, or {"examples": [...]} (also Gemini's {"examples": {"examples": ...}})."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidArgument(
            f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    for _ in range(2):
        if isinstance(data, Mapping) and "examples" in data:
            data = data["examples"]
    if not isinstance(data, list):
        raise InvalidArgument(
            f'{path} must hold a list of examples or {{"examples": [...]}}, not {_kind(data)}'
        )
    for n, obj in enumerate(data, start=1):
        yield f"example {n}", obj


# --- validation ----------------------------------------------------------------------------


def _to_example(obj: object) -> tuple[Example | None, list[str]]:
    """An `Example` from one parsed row, or the reasons it is not one."""
    if isinstance(obj, _Unreadable):
        return None, [str(obj)]
    if not isinstance(obj, Mapping):
        return None, [f"expected an object with input and output, not {_kind(obj)}"]
    errors: list[str] = []
    input_key = next((k for k in INPUT_KEYS if k in obj), None)
    if input_key is None:
        errors.append(f"missing input (one of {', '.join(INPUT_KEYS)})")
    else:
        errors += _check_text(input_key, obj[input_key], MAX_INPUT_CHARS)
    if OUTPUT_KEY not in obj:
        errors.append(f"missing {OUTPUT_KEY}")
    else:
        errors += _check_text(OUTPUT_KEY, obj[OUTPUT_KEY], MAX_OUTPUT_CHARS)
    if errors or input_key is None:
        return None, errors
    return Example(text_input=obj[input_key], output=obj[OUTPUT_KEY]), []


def _check_text(field: str, value: object, limit: int) -> list[str]:
    """What is wrong with one text field, if anything (at most one reason)."""
    if not isinstance(value, str):
        return [f"{field} is not text (got {_kind(value)})"]
    if not value.strip():
        return [f"{field} is empty"]
    if len(value) > limit:
        return [f"{field} has {len(value):,} characters; the limit is {limit:,}"]
    return []


def _kind(value: object) -> str:
    """A user's word for a JSON value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _raise_if_any(problems: list[str], headline: str) -> None:
    """One error for all problems: the headline, the first few, and how many more."""
    if not problems:
        return
    shown = problems[:MAX_REPORTED]
    if len(problems) > MAX_REPORTED:
        shown.append(f"and {len(problems) - MAX_REPORTED} more")
    # One line: it is a CLI error line and a Gemini error message alike.
    raise InvalidArgument(f"{headline}: " + "; ".join(shown))
