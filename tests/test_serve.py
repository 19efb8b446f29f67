"""`fromage serve` over a tiny model: the OpenAI schema (official client, streamed and not; chat and legacy
completions), usage,
parallel requests equal to their sequential outputs, cancellation, limits (429, 413), auth (401),
errors in OpenAI's shape, images by key only, health and metrics."""
import base64
import json
import threading
import time

import httpx
import pytest

from conftest import LiveServer

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(served_model):
    s = LiveServer(served_model, max_batch=4, max_queue=8)
    yield s
    s.close()


def _client(server, key="none"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def _png(assets, i=0) -> str:
    with open(assets["images"][i], "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def test_chat_completion_with_the_official_client(server, assets):
    client = _client(server)
    assert [m.id for m in client.models.list()] == [server.app.state.fromage.model_name]
    r = client.chat.completions.create(model="x", max_tokens=8, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                     {"type": "image_url", "image_url": {"url": _png(assets)}}]}])
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 2
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    parts = choice.message.model_extra["parts"]
    assert choice.message.content == "".join(p["text"] for p in parts if p["type"] == "text")


def test_streaming_matches_the_whole_answer_and_reports_usage(server):
    client = _client(server)
    messages = [{"role": "user", "content": "a red cat on the boat"}]
    whole = client.chat.completions.create(model="x", max_tokens=12, temperature=0, messages=messages)
    chunks = list(client.chat.completions.create(model="x", max_tokens=12, temperature=0, messages=messages,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    images = [p for c in chunks if c.choices for p in (c.choices[0].delta.model_extra or {}).get("parts", [])]
    whole_images = [p for p in whole.choices[0].message.model_extra["parts"] if p["type"] == "image_url"]
    assert text == whole.choices[0].message.content
    assert [p["key"] for p in images] == [p["key"] for p in whole_images]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # the same prompt again: all but its last position come from the prefix cache (OpenAI's cached_tokens)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_legacy_completions_continue_the_raw_prompt(server):
    """/v1/completions (vLLM's and llama-server's benchmark clients speak it): the prompt continued as it is,
    the same text as the runtime's own generation of it, streamed or not, echo, usage; refusals name the field."""
    client, prompt = _client(server), "the red cat on the boat"
    whole = client.completions.create(model="x", prompt=prompt, max_tokens=10, temperature=0,
                                      extra_body={"ignore_eos": True})
    choice = whole.choices[0]
    model = server.app.state.fromage.model
    from fromage.runtime.sampling import SamplingParams
    expected = model.generate([prompt], SamplingParams(max_new_tokens=10, stop_ids=[], min_word_tokens=2, max_rets=1))
    assert choice.text == "".join(p["text"] for p in expected.parts if p["type"] == "text")
    assert choice.finish_reason == "length"
    assert whole.usage.completion_tokens == 10 and whole.usage.total_tokens == whole.usage.prompt_tokens + 10
    chunks = list(client.completions.create(model="x", prompt=[prompt], max_tokens=10, temperature=0, stream=True,
                                            echo=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == prompt + choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices
    assert client.completions.create(model="x", prompt=prompt, temperature=0).usage.completion_tokens <= 16
    post = lambda body: httpx.post(server.url + "/v1/completions", json=body)  # noqa: E731
    for body, param in (({"prompt": [1, 2, 3]}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"), ({}, "prompt"),
                        ({"prompt": "hi", "logprobs": 2}, "logprobs"), ({"prompt": "hi", "best_of": 3}, "best_of"),
                        ({"prompt": "hi", "echo": "yes"}, "echo"), ({"prompt": "hi", "messages": []}, "messages"),
                        ({"prompt": "hi", "temperature": -1}, "temperature"), ({"prompt": "hi", "n": 2}, "n")):
        r = post(body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


def test_parallel_requests_equal_their_sequential_outputs(server):
    client = _client(server)
    prompts = [f"the {w} cat on the {v}" for w in ("red", "blue", "big", "small") for v in ("boat", "house")]
    ask = lambda p: client.chat.completions.create(  # noqa: E731
        model="x", max_tokens=10, temperature=0, messages=[{"role": "user", "content": p}]).choices[0].message.content
    sequential = {p: ask(p) for p in prompts}
    parallel = {}
    threads = [threading.Thread(target=lambda p=p: parallel.__setitem__(p, ask(p))) for p in prompts]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert parallel == sequential


def test_seeded_top_k_sampling_repeats_alone_and_in_parallel(server):
    """top_k (vLLM's and llama-server's extension) with a seed: the same answer every time, alone or among
    parallel requests (a row alone reads the head's 8-bit copy, in a batch the whole head: the same draw)."""
    post = lambda: httpx.post(server.url + "/v1/chat/completions", json={  # noqa: E731
        "messages": [{"role": "user", "content": "the red cat"}], "max_tokens": 12, "temperature": 1.2,
        "top_k": 5, "seed": 7, "ignore_eos": True}, timeout=60).json()["choices"][0]["message"]["content"]
    alone = post()
    together = {}
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, post())) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert alone and set(together.values()) == {alone}


def test_retrieved_images_are_served_by_key_only(server, assets):
    state = server.app.state.fromage
    r = httpx.get(server.url + "/v1/images/0")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:4] == b"\x89PNG"
    for bad in ("/v1/images/99999", "/v1/images/..%2F..%2Fetc%2Fpasswd", "/v1/images/-1"):
        assert httpx.get(server.url + bad).status_code == 404
    # an assistant turn that shows a retrieved image goes back in by key
    client = _client(server)
    r = client.chat.completions.create(model="x", max_tokens=4, messages=[
        {"role": "user", "content": "show me a cat"},
        {"role": "assistant", "content": [{"type": "text", "text": "here"},
                                          {"type": "image_url", "image_url": {"url": "/v1/images/0"}}]},
        {"role": "user", "content": "and another"}])
    assert r.choices[0].finish_reason in ("stop", "length")
    assert state.model is not None


def test_errors_have_openai_shape(server, assets, tmp_path):
    post = lambda body, **kw: httpx.post(server.url + "/v1/chat/completions", **({"json": body} | kw))  # noqa: E731
    cases = [
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_p": 2}, 400, "top_p"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -3}, 400, "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "seed": -1}, 400, "seed"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_k": -2}, 400, "top_k"),
        ({"messages": [{"role": "user", "content": "hi"}], "bogus": 1}, 400, "bogus"),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 7}, 400, "stop"),  # 6 + the chat's own 2
        ({"messages": [{"role": "user", "content": "hi"}], "retrieval": "no"}, 400, "retrieval"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
         "max_tokens": 2}, 400, None),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]},
         400, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/x.png"}}]}]},
         400, "messages"),
        ({"messages": [{"role": "user", "content": "hi " * 500}]}, 400, None),  # longer than the context
    ]
    for body, status, param in cases:
        r = post(body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["message"] and err["code"] == status and err["type"] == "invalid_request_error"
        if param:
            assert err["param"] == param
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    from test_input_hardening import png_header
    bomb = "data:image/png;base64," + base64.b64encode(png_header(20000, 20000)).decode()
    r = post({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": bomb}}]}]})
    assert r.status_code == 413 and "too large" in r.json()["error"]["message"]  # over the pixel limit
    huge = "data:image/png;base64," + "A" * (90 * 1024 * 1024)
    r = post({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": huge}}]}]})
    assert r.status_code == 413


def test_file_urls_only_below_the_allowed_directory(served_model, assets, tmp_path):
    import shutil
    allowed = tmp_path / "media"
    allowed.mkdir()
    shutil.copy(assets["images"][0], allowed / "cat.png")
    s = LiveServer(served_model, allowed_media_dir=str(allowed))
    try:
        def ask(url):
            return httpx.post(s.url + "/v1/chat/completions", json={"max_tokens": 2, "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})
        assert ask(f"file://{allowed}/cat.png").status_code == 200
        assert ask(f"file://{allowed}/../{allowed.name}/cat.png").status_code == 200
        assert ask(f"file://{allowed}/../outside.png").status_code == 400
        assert ask(f"file://{assets['images'][1]}").status_code == 400
        (allowed / "link.png").symlink_to(assets["images"][1])  # a link out of the folder
        assert ask(f"file://{allowed}/link.png").status_code == 400
    finally:
        s.close()


def test_api_key_guards_v1_but_not_health(served_model):
    s = LiveServer(served_model, api_key="sekrit")
    try:
        assert httpx.get(s.url + "/health").status_code == 200
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            _client(s, "wrong").models.list()
        assert [m.id for m in _client(s, "sekrit").models.list()]
    finally:
        s.close()


def test_the_loaded_model_is_kept_out_of_full_collections(served_model):
    """What is loaded lives as long as the server: it is frozen, so a full collection (holding the GIL while
    every stream waits) does not walk it."""
    import gc
    gc.unfreeze()
    s = LiveServer(served_model)
    try:
        assert gc.get_freeze_count() > 0
    finally:
        s.close()


def test_full_queue_answers_429_and_a_disconnect_frees_the_slot(served_model, monkeypatch):
    step = served_model.advance_rows
    monkeypatch.setattr(served_model, "advance_rows", lambda *a: time.sleep(0.02) or step(*a))  # slow steps
    s = LiveServer(served_model, max_batch=1, max_queue=0)
    sched = lambda: s.app.state.fromage.scheduler  # noqa: E731
    body = {"max_tokens": 80, "stream": True, "ignore_eos": True, "messages": [{"role": "user", "content": "a"}]}
    try:
        with httpx.Client(timeout=30) as c:
            with c.stream("POST", s.url + "/v1/chat/completions", json=body) as stream:
                lines = stream.iter_lines()  # kept: a dropped iterator closes the stream
                next(lines)  # the first chunk: it is running
                busy = httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "b"}]})
                assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
            # the stream is closed mid-answer: its request is cancelled within a step or so
        deadline = time.time() + 10
        while sched().counts != (0, 0):
            assert time.time() < deadline, "the disconnected request still holds its slot"
            time.sleep(0.02)
        metrics = httpx.get(s.url + "/metrics").text
        assert "fromage_num_requests_running 0.0" in metrics
        assert 'fromage_request_total{finish_reason="abort"}' in metrics
        # a whole (not streamed) answer's client that goes away frees the slot too, long before 80 steps
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/chat/completions", json=dict(body, stream=False), timeout=0.3)
        started = time.time()
        while sched().counts != (0, 0):
            assert time.time() < started + 1.0, "the disconnected request still holds its slot"
            time.sleep(0.02)
    finally:
        s.close()


def test_health_and_metrics(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    model = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert model["max_model_len"] > 0 and model["fromage"]["engine"] in ("native", "onnxruntime")
    assert model["fromage"]["kv_cache"] == "f32" and model["fromage"]["precision"] == "fp32"
    _client(server).chat.completions.create(model="x", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    text = httpx.get(server.url + "/metrics").text
    for name in ("fromage_time_to_first_token_seconds_bucket", "fromage_inter_token_latency_seconds_bucket",
                 "fromage_e2e_request_latency_seconds_count", "fromage_num_requests_running",
                 "fromage_num_requests_waiting", "fromage_prompt_tokens_total", "fromage_generation_tokens_total",
                 'fromage_kv_cache_bytes{kind="running"}', 'fromage_kv_cache_bytes{kind="prefix"}'):
        assert name in text, name


def test_an_f16_kv_cache_server(exported):
    """`fromage serve --kv-cache f16`: the server loads the model with an fp16 cache, says so in /v1/models, and
    answers as that model alone does."""
    from fromage.runtime.generate import Fromage
    from fromage.runtime.sampling import SamplingParams
    from fromage.serve.app import ServerConfig, create_app
    from starlette.testclient import TestClient
    model = Fromage(exported["llama"]["bundle"], kv_cache="f16")
    app = create_app(ServerConfig(bundle=str(exported["llama"]["bundle"]), kv_cache="f16"), model)
    with TestClient(app) as client:
        deadline = time.time() + 30
        while client.get("/health").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.05)
        assert client.get("/v1/models").json()["data"][0]["fromage"]["kv_cache"] == "f16"
        answer = client.post("/v1/completions", json={"prompt": "a red", "max_tokens": 6, "temperature": 0,
                                                      "retrieval": False, "ignore_eos": True}).json()
    alone = model.generate(["a red"], SamplingParams(max_new_tokens=6, temperature=0, retrieval=False, stop_ids=[]))
    assert answer["choices"][0]["text"] == "".join(p["text"] for p in alone.parts if p["type"] == "text")
    assert answer["usage"]["completion_tokens"] == 6


def test_health_is_503_while_loading(exported):
    from fromage.serve.app import ServerConfig, create_app
    from starlette.testclient import TestClient
    app = create_app(ServerConfig(bundle=str(exported["llama"]["bundle"])))
    with TestClient(app) as client:  # the first answer comes before the model has loaded
        first = client.get("/health")
        assert first.status_code in (200, 503)
        if first.status_code == 503:
            assert first.json() == {"status": "loading"}
            assert client.get("/v1/models").status_code == 503
        deadline = time.time() + 30
        while client.get("/health").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.05)
    json.dumps(first.json())


def test_per_request_caps(served_model):
    s = LiveServer(served_model, max_tokens=5, max_prompt_tokens=12)
    try:
        post = lambda body: httpx.post(s.url + "/v1/chat/completions", json=body)  # noqa: E731
        r = post({"max_tokens": 6, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        r = post({"max_tokens": 5, "messages": [{"role": "user", "content": "the cat " * 10}]})
        assert r.status_code == 400 and "at most 12" in r.json()["error"]["message"]
        assert post({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
        r = post({"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True})  # the default, capped
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    finally:
        s.close()


def test_retrieval_can_be_turned_off_per_request(server):
    def images(**extra):
        body = {"messages": [{"role": "user", "content": "show me a cat"}], "max_tokens": 6, "temperature": 0,
                "ret_scale_factor": 9, "min_word_tokens": 0, **extra}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return [p for p in r.json()["choices"][0]["message"]["parts"] if p["type"] == "image_url"]
    assert images(), "[RET] favoured this much, the tiny model retrieves"
    assert not images(retrieval=False)
