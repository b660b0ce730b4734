"""Parsing the policy's consult block, with one documented rule per kind of malformation.

Rules (each counted by ``ParsedConsult.issues``, never an exception):
- the block is read up to the turn's first ``</consult>``: a turn ends at the token that completes the
  tag, and under a BPE tokenizer that token may carry text past it (``></``, ``>\n``), which is not
  part of any query;
- the block is the text after the last ``<consult>`` before that (a repeated or nested open tag
  starts the block over: ``nested``); no open tag at all → no queries (``unopened``);
- queries are split on ``;``, stripped; empty ones are dropped (``empty_query``);
- duplicates are kept — asking the same question of several experts is direct consultation;
- more than K queries: the first K are sent (``over_limit``);
- a query longer than ``max_query_chars`` is cut to that length (``oversized``);
- a block left with no query is rejected (``no_query``): the policy is told the experts are unavailable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proto import episode_format as fmt


@dataclass
class ParsedConsult:
    queries: list[str]
    issues: list[str] = field(default_factory=list)


def parse_consult(turn_text: str, max_queries: int, max_query_chars: int = 512) -> ParsedConsult:
    """Queries of the consult block that ends ``turn_text`` (the policy's text of one turn)."""
    issues: list[str] = []
    body = turn_text.split(fmt.CONSULT_CLOSE, 1)[0]
    if fmt.CONSULT_OPEN not in body:
        return ParsedConsult([], ["unopened"])
    if body.count(fmt.CONSULT_OPEN) > 1:
        issues.append("nested")
    body = body.rsplit(fmt.CONSULT_OPEN, 1)[1]
    parts = [q.strip() for q in body.split(fmt.QUERY_SEP)]
    queries = [q for q in parts if q]
    if len(queries) < len(parts):
        issues.append("empty_query")
    if len(queries) > max_queries:
        issues.append("over_limit")
        queries = queries[:max_queries]
    if any(len(q) > max_query_chars for q in queries):
        issues.append("oversized")
        queries = [q[:max_query_chars].rstrip() for q in queries]
    if not queries:
        issues.append("no_query")
    return ParsedConsult(queries, issues)
