"""Dataset files → Examples, and the validation that runs before anything trains."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tunery.datasets import load_examples, validate_examples
from tunery.engine.specs import MAX_INPUT_CHARS, MAX_OUTPUT_CHARS, Example
from tunery.errors import InvalidArgument

SEED = [("1", "2"), ("twenty two", "twenty three"), ("10,100,000", "10,100,001")]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(rows: list[object]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def error_of(path: Path) -> str:
    with pytest.raises(InvalidArgument) as info:
        load_examples(path)
    return info.value.message


# --- formats -------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["text_input", "textInput", "input"])
def test_jsonl_accepts_each_input_column_name(tmp_path: Path, key: str) -> None:
    path = write(tmp_path, "d.jsonl", jsonl([{key: i, "output": o} for i, o in SEED]))
    assert load_examples(path) == [Example(i, o) for i, o in SEED]


def test_jsonl_skips_blank_lines_and_keeps_unicode_line_separators(tmp_path: Path) -> None:
    text = '{"input": "a\u2028b", "output": "c"}\n\n   \n{"input": "d", "output": "e"}\n'
    assert load_examples(write(tmp_path, "d.jsonl", text)) == [
        Example("a\u2028b", "c"),
        Example("d", "e"),
    ]


def test_csv_with_header_and_quoted_commas_and_newlines(tmp_path: Path) -> None:
    text = 'text_input,output,note\n1,2,x\n"10,100,000","10,100,001",y\n"two\nlines",ok,z\n'
    assert load_examples(write(tmp_path, "d.csv", text)) == [
        Example("1", "2"),
        Example("10,100,000", "10,100,001"),
        Example("two\nlines", "ok"),
    ]


def test_csv_with_byte_order_mark_from_spreadsheets(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes("\ufeffinput,output\nthree,four\n".encode())
    assert load_examples(path) == [Example("three", "four")]


def test_json_list_and_examples_wrappers(tmp_path: Path) -> None:
    rows = [{"textInput": i, "output": o} for i, o in SEED]
    expected = [Example(i, o) for i, o in SEED]
    for name, data in [
        ("list.json", rows),
        ("wrapped.json", {"examples": rows}),
        ("gemini.json", {"examples": {"examples": rows}}),
    ]:
        assert load_examples(write(tmp_path, name, json.dumps(data))) == expected


def test_extension_is_case_insensitive(tmp_path: Path) -> None:
    path = write(tmp_path, "D.JSONL", jsonl([{"input": "1", "output": "2"}]))
    assert load_examples(path) == [Example("1", "2")]


# --- row validation ------------------------------------------------------------------------


def test_every_bad_jsonl_row_is_reported_together_with_line_numbers(tmp_path: Path) -> None:
    lines = [
        json.dumps({"input": "ok", "output": "ok"}),
        json.dumps({"output": "x"}),
        json.dumps({"input": "x"}),
        json.dumps({"input": "", "output": "x"}),
        json.dumps({"input": "x", "output": "   "}),
        json.dumps({"input": 7, "output": "x"}),
        json.dumps({"input": ["a"], "output": {"b": 1}}),
        json.dumps({"input": "x" * (MAX_INPUT_CHARS + 1), "output": "x"}),
        json.dumps({"input": "x", "output": "y" * 5_231}),
        '{"input": "x", "output": ',
        json.dumps(["not", "an", "object"]),
    ]
    message = error_of(write(tmp_path, "d.jsonl", "\n".join(lines)))
    assert "\n" not in message
    assert "10 of 11 examples are invalid: line 2:" in message
    assert "line 1:" not in message
    assert "line 2: missing input (one of text_input, textInput, input)" in message
    assert "line 3: missing output" in message
    assert "line 4: input is empty" in message
    assert "line 5: output is empty" in message
    assert "line 6: input is not text (got a number)" in message
    assert "line 7: input is not text (got a list); output is not text (got an object)" in message
    assert f"line 8: input has {MAX_INPUT_CHARS + 1:,} characters; the limit is 40,000" in message
    assert "line 9: output has 5,231 characters; the limit is 5,000" in message
    assert "line 10: invalid JSON" in message
    assert "line 11: expected an object with input and output, not a list" in message


def test_only_the_first_ten_bad_rows_are_listed_with_a_count_of_the_rest(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl([{"input": "", "output": "x"}] * 25))
    message = error_of(path)
    assert "25 of 25 examples are invalid" in message
    assert "line 10: input is empty" in message
    assert "line 11:" not in message
    assert message.endswith("; and 15 more")


def test_csv_rows_count_data_rows_after_the_header(tmp_path: Path) -> None:
    text = "input,output\nok,ok\n,missing input\nshort\n"
    message = error_of(write(tmp_path, "d.csv", text))
    assert "row 2: input is empty" in message
    assert "row 3: missing output" in message
    assert "row 1:" not in message


def test_csv_without_the_needed_columns_names_what_it_has(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "d.csv", "question,answer\na,b\n"))
    assert "header row needs an input column" in message
    assert "'question', 'answer'" in message


def test_json_rows_are_numbered_as_examples(tmp_path: Path) -> None:
    data = [{"input": "a", "output": "b"}, {"input": "a", "output": None}]
    message = error_of(write(tmp_path, "d.json", json.dumps(data)))
    assert "example 2: output is not text (got null)" in message


# --- whole-file problems -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("d.jsonl", "", "is empty"),
        ("d.jsonl", "\n  \n", "is empty"),
        ("d.csv", "input,output\n", "has no examples"),
        ("d.json", "[]", "has no examples"),
        ("d.json", '{"examples": []}', "has no examples"),
        ("d.json", '{"rows": []}', "must hold a list of examples"),
        ("d.json", "[{", "is not valid JSON"),
        ("d.txt", "1,2", "unknown dataset format '.txt'"),
        ("data", "1,2", "unknown dataset format (no extension)"),
    ],
)
def test_whole_file_problems_are_one_clear_line(
    tmp_path: Path, name: str, text: str, expected: str
) -> None:
    message = error_of(write(tmp_path, name, text))
    assert expected in message
    assert "\n" not in message


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert error_of(tmp_path / "nope.jsonl") == f"dataset file not found: {tmp_path / 'nope.jsonl'}"
    (tmp_path / "dir.jsonl").mkdir()
    assert "is a directory" in error_of(tmp_path / "dir.jsonl")


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(b"input,output\n\xff\xfe,x\n")
    assert "is not UTF-8 text" in error_of(path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads anything")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", jsonl([{"input": "1", "output": "2"}]))
    path.chmod(0)
    assert "cannot read dataset file" in error_of(path)


# --- inline examples -----------------------------------------------------------------------


def test_validate_examples_accepts_the_seed_and_limits_exactly() -> None:
    validate_examples([Example(i, o) for i, o in SEED])
    validate_examples([Example("x" * MAX_INPUT_CHARS, "y" * MAX_OUTPUT_CHARS)])


def test_validate_examples_reports_every_bad_example_by_label() -> None:
    examples = [
        Example("ok", "ok"),
        Example("", "x"),
        Example("x", "y" * 5_231),
        Example(3, "x"),  # type: ignore[arg-type]  # as a sloppy caller might pass
    ]
    with pytest.raises(InvalidArgument) as info:
        validate_examples(examples, label="example")
    message = info.value.message
    assert message.startswith("3 of 4 examples are invalid:")
    assert "example 2: input is empty" in message
    assert "example 3: output has 5,231 characters; the limit is 5,000" in message
    assert "example 4: input is not text (got a number)" in message


def test_validate_examples_rejects_an_empty_list() -> None:
    with pytest.raises(InvalidArgument, match="at least one example"):
        validate_examples([])
