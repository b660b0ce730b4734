from pathlib import Path

import pytest

from eapo.core.data import Layout, load_problems, read_jsonl
from rollout_service.reward import extract_answer

DATA = Path(__file__).parent / "data"


def test_aime_layout():
    problems = load_problems(DATA / "aime_sample.jsonl", "aime")
    assert [p.answer for p in problems] == ["204", "113"]
    assert problems[0].problem.startswith("Every morning Aya")
    assert problems[0].id == "aime_sample-1"


def test_dapo_layout_reads_the_chat_prompt_and_nested_answer():
    problems = load_problems(DATA / "dapo_sample.jsonl", "dapo")
    assert [(p.id, p.answer) for p in problems] == [("a1b2", "14"), ("c3d4", "9")]
    assert "divisors" in problems[1].problem
    said = "2+12 is 14.\nAnswer: 14"  # the answer format DAPO's prompts ask for
    assert extract_answer(said, problems[0].answer_pattern) == "14"
    assert extract_answer("\\boxed{15}\nAnswer: 14", problems[0].answer_pattern) == "15"


def test_parquet_with_custom_fields(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "set.parquet"
    pq.write_table(pa.table({"question": ["1+1", "2*3"], "meta": [{"gold": 2}, {"gold": 6}]}), path)
    problems = load_problems(path, Layout(problem_field="question", answer_field="meta.gold"))
    assert [(p.problem, p.answer) for p in problems] == [("1+1", "2"), ("2*3", "6")]


def test_missing_field_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "x", "answer": "1"}\n{"problem": "y"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing or unreadable field 'answer'"):
        load_problems(path)


def test_world_layout_keeps_ids_and_tiers(tiny_world):
    problems = load_problems(Path(tiny_world.dir) / "train.jsonl", "world")
    assert problems == read_jsonl(Path(tiny_world.dir) / "train.jsonl")


@pytest.mark.parametrize(
    ("name", "layout", "message"),
    [
        ("set.jsonl", "squad", "unknown data layout 'squad'"),
        ("absent.jsonl", "aime", "no such data file"),
        ("set.csv", "aime", r"expected a \.jsonl or \.parquet file"),
    ],
)
def test_bad_sources_are_refused_clearly(tmp_path, name, layout, message):
    (tmp_path / "set.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n')
    (tmp_path / "set.csv").write_text("problem,answer\n1+1,2\n")
    with pytest.raises(ValueError, match=message):
        load_problems(tmp_path / name, layout)
