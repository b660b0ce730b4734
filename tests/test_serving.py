"""The CPU expert server and the gateway, through the official openai client and plain HTTP."""

import json

import httpx
import openai
import pytest


@pytest.fixture(params=["direct", "gateway"])
def base_url(request, expert_servers, gateway):
    return expert_servers[0] if request.param == "direct" else gateway


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_models_lists_the_expert(base_url):
    assert [m.id for m in client(base_url).models.list().data] == ["expert"]


def test_chat_completion_with_logprobs(base_url):
    resp = client(base_url).chat.completions.create(
        model="expert",
        messages=[{"role": "user", "content": "2*3"}],
        max_tokens=12,
        temperature=1.0,
        seed=3,
        logprobs=True,
    )
    choice = resp.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert isinstance(choice.message.content, str)
    assert len(choice.logprobs.content) == resp.usage.completion_tokens
    assert all(t.logprob <= 0 for t in choice.logprobs.content)


def test_seeded_sampling_is_reproducible(base_url):
    kwargs = dict(model="expert", prompt="Q: 7+8\nA: ", max_tokens=10, temperature=1.0, seed=11)
    a = client(base_url).completions.create(**kwargs).choices[0].text
    b = client(base_url).completions.create(**kwargs).choices[0].text
    assert a == b


def test_stop_string_cuts_the_text(base_url):
    resp = client(base_url).completions.create(
        model="expert", prompt="Q: 2+2\nA: ", max_tokens=20, temperature=0.0, stop=["="]
    )
    assert "=" not in resp.choices[0].text


def test_stop_string_kept_in_the_text_on_request_and_named_as_the_stop_reason(base_url):
    """vLLM's extras, through the official client: the text ends with the stop string, stop_reason names it."""
    kwargs = dict(model="expert", prompt="Q: 2+2\nA: ", max_tokens=20, temperature=0.0, stop=["="])
    cut = client(base_url).completions.create(**kwargs).choices[0]
    kept = client(base_url).completions.create(**kwargs, extra_body={"include_stop_str_in_output": True}).choices[0]
    assert kept.finish_reason == "stop" and kept.stop_reason == "="
    assert kept.text == cut.text + "="


def test_streaming_chat(base_url):
    stream = client(base_url).chat.completions.create(
        model="expert",
        messages=[{"role": "user", "content": "4*4"}],
        max_tokens=12,
        temperature=0.0,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    full = client(base_url).chat.completions.create(
        model="expert", messages=[{"role": "user", "content": "4*4"}], max_tokens=12, temperature=0.0
    )
    assert text == full.choices[0].message.content


def test_unknown_model_is_404(base_url):
    with pytest.raises(openai.NotFoundError):
        client(base_url).chat.completions.create(model="nope", messages=[{"role": "user", "content": "1"}])


def test_invalid_request_is_400(base_url):
    r = httpx.post(f"{base_url}/v1/chat/completions", json={"model": "expert", "messages": []})
    assert r.status_code == 400 and "error" in r.json()


def test_gateway_consult_fans_out_and_reports_per_query(gateway):
    r = httpx.post(
        f"{gateway}/v1/consult",
        json={"model": "expert", "queries": ["2*3", "5+5", "9-1"], "max_tokens": 16},
        timeout=30,
    )
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["index"] for x in results] == [0, 1, 2]
    assert all(isinstance(x["answer"], str) and x["error"] is None for x in results)


def test_gateway_spreads_load_and_reports_backends(gateway, expert_servers):
    before = {b["url"]: b["requests"] for b in httpx.get(f"{gateway}/admin/backends").json()}
    r = httpx.post(
        f"{gateway}/v1/consult", json={"model": "expert", "queries": ["1+1"] * 4, "max_tokens": 8}, timeout=30
    )
    assert r.status_code == 200
    after = httpx.get(f"{gateway}/admin/backends").json()
    assert sorted(b["url"] for b in after) == sorted(expert_servers)
    served = {b["url"]: b["requests"] - before[b["url"]] for b in after}
    assert sum(served.values()) == 4
    assert all(n >= 1 for n in served.values())  # 4 concurrent queries, least-outstanding: both used
    assert all(b["in_flight"] == 0 for b in after)


@pytest.mark.parametrize(
    "body,status",
    [
        ({"model": "expert", "queries": ["a"] * 5}, 413),
        ({"model": "nope", "queries": ["a"]}, 404),
        ({"model": "expert", "queries": []}, 422),
        ({"model": "expert", "queries": [""]}, 422),
    ],
)
def test_gateway_consult_rejects_bad_requests_clearly(gateway, body, status):
    r = httpx.post(f"{gateway}/v1/consult", json=body, timeout=30)
    assert r.status_code == status
    assert "error" in r.json() or "detail" in r.json()


def test_gateway_rejects_non_json_body(gateway):
    r = httpx.post(f"{gateway}/v1/chat/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_gateway_metrics_are_prometheus_text(gateway):
    text = httpx.get(f"{gateway}/metrics").text
    assert "eapo_gateway_requests_total" in text
    json.dumps(httpx.get(f"{gateway}/readyz").json())
