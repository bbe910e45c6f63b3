"""Request limits that never reach Python's recursion or torch's integer range, JSON
only, and no origin allowed to read answers: deep JSON and a seed outside 0..2**64-1
are 400s, another content type is a 415, and no CORS header lets a page elsewhere in."""

from __future__ import annotations

import json

import pytest

httpx = pytest.importorskip("httpx")

URL = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hello"}]


def _post(server, body: bytes, content_type="application/json", **headers):
    return httpx.post(server.url + URL, content=body, headers={"content-type": content_type, **headers}, timeout=60)


# ---- JSON nesting, found without recursion


def test_the_depth_scan_counts_brackets_outside_strings_only():
    from medcap.serve._request import APIError, check_json_depth

    def depth_ok(text: str, limit: int) -> bool:
        try:
            check_json_depth(text.encode(), limit)
            return True
        except APIError as e:
            assert e.status == 400 and f"deeper than {limit} levels" in e.message
            return False

    assert depth_ok("[[[]]]", 3) and not depth_ok("[[[[]]]]", 3)
    assert depth_ok('{"a": [{"b": 1}]}', 3) and not depth_ok('{"a": [{"b": [1]}]}', 3)
    assert depth_ok('["[[[[[[", "{{{{{{"]', 1)  # brackets inside strings are text
    assert depth_ok(r'["\"[[[[[[", "\\", [1]]', 2)  # escaped quotes and backslashes end no string early
    assert not depth_ok(r'["\"[[[[[[", "\\", [[[1]]]]', 2)
    assert depth_ok("[]" * 10_000, 1)  # many brackets, all shallow


@pytest.mark.parametrize("body", [
    b"[" * 100_000,
    json.dumps({"model": "medcap", "messages": [{"role": "user", "content": "x"}]}).encode()
    .replace(b'"x"', b"[" * 50_000 + b"]" * 50_000),
    b'{"messages": [{"role": "user", "content": "hi"}], "extra": ' + b"{\"a\": " * 50_000 + b"1" + b"}" * 50_000 + b"}",
])
def test_deeply_nested_json_is_a_400_not_a_recursion_error(served, body):
    server, _ = served
    r = _post(server, body)
    assert r.status_code == 400, r.text
    assert "nests JSON deeper than 64 levels" in r.json()["error"]["message"]


# ---- the seed's range


@pytest.mark.parametrize("seed", [2**80, 2**64, -1, 10**400])
def test_a_seed_outside_0_to_2_64_is_a_400_naming_the_range(served, seed):
    server, _ = served
    r = _post(server, json.dumps({"messages": HELLO, "seed": seed, "temperature": 0.7}).encode())
    assert r.status_code == 400, r.text
    if seed != 10**400:  # over Python's 4300-digit limit: not valid JSON here
        assert "seed must be an integer from 0 to 2**64-1 (18446744073709551615)" in r.json()["error"]["message"]


def test_the_largest_seed_samples_and_repeats(served):
    server, _ = served
    body = json.dumps({"messages": HELLO, "seed": 2**64 - 1, "temperature": 0.9, "max_tokens": 6}).encode()
    first, again = _post(server, body), _post(server, body)
    assert first.status_code == 200 and again.status_code == 200, first.text
    assert first.json()["choices"][0]["message"]["content"] == again.json()["choices"][0]["message"]["content"]


# ---- JSON only, and no cross-origin reading


@pytest.mark.parametrize("content_type", [
    "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
    "application/json; charset=latin-1", "application/jsonx", None,
])
def test_a_body_that_is_not_declared_json_is_a_415(served, content_type):
    server, _ = served
    headers = {} if content_type is None else {"content-type": content_type}
    r = httpx.post(server.url + URL, content=json.dumps({"messages": HELLO}).encode(), headers=headers, timeout=60)
    assert r.status_code == 415, r.text
    err = r.json()["error"]
    assert err["code"] == "unsupported_media_type" and "Content-Type: application/json" in err["message"]


@pytest.mark.parametrize("content_type", ["application/json", "Application/JSON", "application/json; charset=utf-8",
                                          'application/json;charset="UTF-8"'])
def test_json_with_or_without_a_utf8_charset_is_read(served, content_type):
    server, _ = served
    r = _post(server, json.dumps({"messages": HELLO, "max_tokens": 2}).encode(), content_type)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("origin", ["https://evil.example", "http://localhost:9999", "null"])
@pytest.mark.parametrize("path", [URL, "/v1/models", "/health", "/"])
def test_no_origin_is_allowed_to_read_answers(served, origin, path):
    server, _ = served
    preflight = httpx.options(server.url + path, headers={
        "origin": origin, "access-control-request-method": "POST", "access-control-request-headers": "content-type"})
    simple = (httpx.post(server.url + path, content=json.dumps({"messages": HELLO, "max_tokens": 2}).encode(),
                         headers={"origin": origin, "content-type": "application/json"}, timeout=60)
              if path == URL else httpx.get(server.url + path, headers={"origin": origin}))
    assert not preflight.is_success
    for r in (preflight, simple):
        assert "access-control-allow-origin" not in r.headers, dict(r.headers)
        assert "access-control-allow-credentials" not in r.headers, dict(r.headers)
    assert simple.status_code == 200
