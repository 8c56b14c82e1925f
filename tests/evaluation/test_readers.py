"""Task readers: each task's published fields, from JSON lines, parquet and Arrow dataset folders."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dlm.evaluation.readers import read_records
from dlm.evaluation.tasks import Completion, MultipleChoice, parse_records

FIXTURES = {
    "hellaswag": [
        {
            "ind": 4,
            "activity_label": "Removing ice from car",
            "ctx_a": "Then, the man writes over the snow covering the window of a car.",
            "ctx_b": "a woman",
            "ctx": "Then, the man writes over the snow covering the window of a car. A woman",
            "endings": [", the man adds wax.", "is then shown.", "drives a car [title] away.", "walks."],
            "label": "3",
            "split": "val",
        },
        {"ctx": "A cat sits", "endings": ["a", "b", "c", "d"], "label": 0},
    ],
    "piqa": [
        {"goal": "Keep bread fresh", "sol1": "Put it in a bag.", "sol2": "Put it in water.", "label": 0},
        {"goal": "Open a jar", "sol1": "Bite it.", "sol2": "Twist the lid.", "label": 1},
    ],
    "siqa": [
        {
            "context": "Tracy went shopping.",
            "question": "What will Tracy want next?",
            "answerA": "sleep",
            "answerB": "go home",
            "answerC": "eat glass",
            "label": "2",
        }
    ],
    "winogrande": [
        {
            "sentence": "The trophy does not fit in the case because the _ is too big.",
            "option1": "trophy",
            "option2": "case",
            "answer": "1",
        }
    ],
    "lambada": [{"text": "He opened the door and saw his old friend John"}],
    "gsm8k": [{"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7\n#### 7"}],
    "infill": [
        {"prefix": "Ann woke up.", "middle": "She made tea.", "suffix": "Then she left."},
        {
            "storyid": "x",
            "storytitle": "t",
            "sentence1": "A.",
            "sentence2": "B.",
            "sentence3": "C.",
            "sentence4": "D.",
            "sentence5": "E.",
        },
    ],
}


def _write(fmt: str, rows: list[dict], tmp_path):
    if fmt == "jsonl":
        path = tmp_path / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path
    # the same rows through Arrow: pad missing fields so every row has the same columns
    keys = sorted({k for r in rows for k in r})
    table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])
    if fmt == "parquet":
        path = tmp_path / "data.parquet"
        pq.write_table(table, path)
        return path
    folder = tmp_path / "arrow_ds"  # what datasets.Dataset.save_to_disk writes
    folder.mkdir()
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (folder / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": "validation"})
    )
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return folder


def _uniform_types(rows):
    """Arrow needs one type per column: labels as strings where the fixture mixes them."""
    out = []
    for r in rows:
        r = dict(r)
        if "label" in r:
            r["label"] = str(r["label"])
        out.append(r)
    return out


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "arrow"])
@pytest.mark.parametrize("task", sorted(FIXTURES))
def test_reader_parses_published_format(task, fmt, tmp_path):
    rows = FIXTURES[task] if fmt == "jsonl" else _uniform_types(FIXTURES[task])
    records = read_records(_write(fmt, rows, tmp_path))
    assert len(records) == len(rows)
    items = parse_records(task, records)
    first = items[0]
    if task == "hellaswag":
        assert isinstance(first, MultipleChoice) and first.label == 3 and len(first.continuations) == 4
        assert first.contexts[0].startswith("Removing ice from car: Then, the man") and first.contexts[0].endswith(
            "A woman"
        )
        assert first.continuations[2] == " drives a car. away."
        assert items[1].label == 0 and items[1].contexts[0] == "A cat sits"
    elif task == "piqa":
        assert first.label == 0 and items[1].label == 1
        assert first.contexts[0] == "Question: Keep bread fresh\nAnswer:" and first.continuations == [
            " Put it in a bag.",
            " Put it in water.",
        ]
    elif task == "siqa":
        assert first.label == 1 and first.continuations[1] == " go home"
        assert first.contexts[0] == "Q: Tracy went shopping. What will Tracy want next?\nA:"
    elif task == "winogrande":
        assert first.label == 0
        assert first.contexts == [
            "The trophy does not fit in the case because the trophy",
            "The trophy does not fit in the case because the case",
        ]
        assert first.continuations == [" is too big.", " is too big."]
    elif task == "lambada":
        assert (
            isinstance(first, Completion)
            and first.prompt == "He opened the door and saw his old friend"
            and first.target == " John"
        )
    elif task == "gsm8k":
        assert first.answer == "7" and first.prompt.startswith("Tom has")
    elif task == "infill":
        assert (first.prompt, first.target, first.suffix) == ("Ann woke up.", " She made tea.", " Then she left.")
        assert (items[1].prompt, items[1].target, items[1].suffix) == ("A. B.", " C.", " D. E.")
    assert records[0][0].startswith(str(tmp_path))  # records say where they come from


def test_bad_records_are_named(tmp_path):
    path = tmp_path / "piqa.jsonl"
    path.write_text(json.dumps(FIXTURES["piqa"][0]) + "\n" + json.dumps({"goal": "x", "sol1": "a", "label": 0}) + "\n")
    with pytest.raises(ValueError, match=r"piqa.jsonl:2: PIQA record has no 'sol2'"):
        parse_records("piqa", read_records(path))
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"piqa.jsonl:1: not valid JSON"):
        read_records(path)
    unlabeled = tmp_path / "hs.jsonl"
    unlabeled.write_text(json.dumps({"ctx": "a", "endings": ["b", "c", "d", "e"], "label": ""}) + "\n")
    with pytest.raises(ValueError, match=r"hs.jsonl:1: HellaSwag field 'label' = '' is not a choice"):
        parse_records("hellaswag", read_records(unlabeled))
    with pytest.raises(ValueError, match="unknown task file type"):
        (tmp_path / "x.csv").write_text("a")
        read_records(tmp_path / "x.csv")
    dsdict = tmp_path / "dd"
    dsdict.mkdir()
    (dsdict / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    with pytest.raises(ValueError, match="DatasetDict; pass one split"):
        read_records(dsdict)
