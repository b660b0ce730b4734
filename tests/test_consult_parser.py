import pytest

from rollout_service.consult import parse_consult


@pytest.mark.parametrize(
    "text,queries,issues",
    [
        ("<consult>2*3</consult>", ["2*3"], []),
        ("7+1 <consult>2*3; 4+4</consult>", ["2*3", "4+4"], []),
        ("<consult>2*3;  ;4</consult>", ["2*3", "4"], ["empty_query"]),
        ("<consult>a;b;c;d;e</consult>", ["a", "b", "c"], ["over_limit"]),
        ("<consult>x<consult>y; z</consult>", ["y", "z"], ["nested"]),
        ("no open tag</consult>", [], ["unopened"]),
        ("<consult> ; </consult>", [], ["empty_query", "no_query"]),
        ("<consult></consult>", [], ["empty_query", "no_query"]),
        ("<consult>q; q</consult>", ["q", "q"], []),  # same question to two experts: direct consultation
    ],
)
def test_parsing_rules(text, queries, issues):
    parsed = parse_consult(text, max_queries=3)
    assert parsed.queries == queries
    assert parsed.issues == issues


def test_huge_query_is_cut():
    parsed = parse_consult("<consult>" + "9" * 5000 + "</consult>", max_queries=3, max_query_chars=100)
    assert parsed.queries == ["9" * 100] and parsed.issues == ["oversized"]


@pytest.mark.parametrize(
    "queries,expected",
    [
        ([], "self_resolution"),
        (["2+3*4"], "direct_consultation"),
        (["2 + 3*4", "2+3*4"], "direct_consultation"),
        (["3*4"], "decomposition"),
        (["2+3*4", "3*4"], "decomposition"),
    ],
)
def test_paradigm_rule(queries, expected):
    from proto.episode_format import paradigm

    assert paradigm(queries, "2+3*4") == expected


@pytest.mark.parametrize(
    ("block", "answer"),
    [
        ("<expert>7*8=56 \\boxed{56}</expert>", "7*8=56 \\boxed{56}"),
        ("<expert>unavailable</expert>", "unavailable"),
        ("<expert><expert>x</expert></expert>", "<expert>x</expert>"),  # only the block's own tags go
    ],
)
def test_block_answer_reads_back_what_an_expert_block_showed(block, answer):
    from proto.episode_format import block_answer, expert_block

    assert block_answer(block) == answer
    assert expert_block(answer) == block
