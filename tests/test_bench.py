"""`fromage bench`: smoke tests on the tiny bundles (shapes of the output, never timings)."""
import importlib.util
import json

import pytest

from fromage.tools.cli import main

METRICS = ("decode_tok_s", "tpot_ms", "ttft_ms", "ttft_image_ms", "e2e_ms", "image_encode_ms", "retrieval_ms",
           "peak_rss_mb")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FROMAGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _bench(tmp_path, *argv) -> dict:
    out = tmp_path / "bench.json"
    assert main(["bench", *argv, "--runs", "1", "--warmup", "0", "--new-tokens", "4", "--prompt-tokens", "8",
                 "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_bench_fromage_json_and_plot(exported, tmp_path, cache, capsys):
    plot = tmp_path / "bench.png"
    bundle = str(exported["llama"]["bundle"])
    if importlib.util.find_spec("matplotlib") is None:  # the [bench] extra is not installed
        assert main(["bench", "--bundle", bundle, "--plot", str(plot)]) == 2
        assert "needs matplotlib" in capsys.readouterr().err
        plot = None
    r = _bench(tmp_path, "--bundle", bundle, "--images", "1", *(["--plot", str(plot)] if plot else []))
    assert r["roofline_tok_s"] > 0 and r["bandwidth_gb_s"] > 0
    assert r["bandwidth"]["method"] in r["bandwidth"]["methods_gb_s"] and r["bandwidth"]["how"]
    assert len(r["bandwidth"]["per_probe_gb_s"]) == 1  # measured after each timed run (and once before them)
    assert "native read, 8 streams per thread" in r["bandwidth"]["methods_gb_s"]
    assert len(r["bandwidth"]["per_probe_fma_gflop_s"]) == 1 and r["bandwidth"]["fma_gflop_s"] > 0  # the cores' rate too
    s = r["settings"]
    trips = r["bandwidth"]["per_probe_round_trip_ns"]  # and the first two threads' cache-line round trip
    assert len(trips) == (s["threads"] > 1) and all(t > 0 for t in trips)
    assert (s["prompt_tokens"], s["new_tokens"], s["images"], s["batch"], s["runs"]) == (8, 4, 1, 1, 1)
    assert len(s["prompt_token_ids"]) == 8
    assert list(r["systems"]) == ["fromage"]
    f = r["systems"]["fromage"]
    for key in METRICS:  # fromage measures everything, with and without an image
        assert f[key] > 0, key
        if key != "peak_rss_mb":
            assert set(f["percentiles"][key]) >= {"median", "p50", "p90", "p99"}
    assert len(f["tokens"]) == 4 and 0 < f["roofline_fraction"]
    # the run against the mean of the bandwidth measured before and after it; the headline: the runs' median
    (bw,), (frac,) = f["bandwidth_runs_gb_s"], f["roofline_fraction_runs"]
    assert bw > 0 and frac == f["roofline_fraction"]
    (trip,) = f["round_trip_runs_ns"]
    assert trip > 0 if trips else trip is None
    assert frac == pytest.approx(f["decode_tok_s"] * r["weights_bytes_per_token"] / (bw * 1e9))
    assert plot is None or plot.read_bytes()[:4] == b"\x89PNG"
    assert "fromage" in capsys.readouterr().out


def test_bench_compare_hf_and_reference(exported, tmp_path, cache, capsys):
    r = _bench(tmp_path, "--bundle", str(exported["llama"]["bundle"]), "--compare", "hf,reference")
    systems = r["systems"]
    assert list(systems) == ["fromage", "hf", "reference"], systems
    for name in ("hf", "reference"):
        s = systems[name]
        assert "error" not in s, s
        assert s["decode_tok_s"] > 0 and s["ttft_ms"] > 0 and s["vs_fromage"]["decode_tok_s"] > 0
        # same model, same prompt ids, greedy: the same tokens (the parity tests pin this down)
        assert s["agrees_with_fromage_tokens"] == 4, (name, s["tokens"], systems["fromage"]["tokens"])
    assert systems["hf"]["ttft_image_ms"] is None  # a text-only LM
    assert systems["reference"]["ttft_image_ms"] > 0
    out = capsys.readouterr().out
    assert "hf" in out and "reference" in out


def test_bench_retrieval(tmp_path, cache, capsys, monkeypatch):
    import fromage.runtime.retrieval as retrieval
    monkeypatch.setattr(retrieval, "EXACT_SEARCH_MAX", 1000)  # 2000 vectors: the HNSW path (exact up to 10k)
    out = tmp_path / "retrieval.json"
    assert main(["bench", "--retrieval", "2000", "--json", str(out)]) == 0
    r = json.loads(out.read_text())["retrieval"]
    assert (r["vectors"], r["dim"], r["k"]) == (2000, 256, 10)
    m = r["methods"]
    assert set(m) == {"numpy_exact", "usearch_exact", "usearch_hnsw", "fromage_index"}
    for name, v in m.items():
        assert v["qps"] > 0 and 0 <= v["recall_at_10"] <= 1, name
    assert m["usearch_exact"]["recall_at_10"] > 0.99 and m["fromage_index"]["mode"] == "hnsw"  # above the crossover
    assert "usearch_hnsw" in capsys.readouterr().out
    # a second run loads the index from the cache
    assert main(["bench", "--retrieval", "2000", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["retrieval"]["loaded_from_cache"] is True


def test_bench_context(exported, tmp_path, monkeypatch, capsys):
    import fromage.tools.bench_worker as bench_worker
    probe = bench_worker.MachineProbe
    monkeypatch.setattr(bench_worker, "MachineProbe", lambda threads, **kw: probe(threads, gib=1 / 64, **kw))
    out = tmp_path / "context.json"
    assert main(["bench", "--bundle", str(exported["llama"]["bundle"]), "--context", "40,64", "--runs", "1", "--ops",
                 "--kv-cache", "f32,f16", "--json", str(out)]) == 0
    r = json.loads(out.read_text())["context"]
    assert [(row["kv_cache"], row["positions"]) for row in r["lengths"]] == [("f32", 40), ("f32", 64), ("f16", 40),
                                                                             ("f16", 64)] and r["bandwidth_gb_s"] > 0
    assert r["lengths"][2]["kv_mb"] * 2 == pytest.approx(r["lengths"][0]["kv_mb"])  # an f16 cache: half the bytes
    assert all(row["bound_ms"] > 0 and row["step_ms"] > 0 for row in r["lengths"])
    assert all(len(row["x_bound_runs"]) == 1 == len(r["bandwidth_runs_gb_s"]) for row in r["lengths"])
    assert len(r["round_trip_runs_ns"]) == 1  # the cores' round trip beside each run's bandwidth (None: one thread)
    assert len(r["bandwidth_probes_gb_s"]) == 2 and r["bandwidth_runs_gb_s"][0] == pytest.approx(
        sum(r["bandwidth_probes_gb_s"]) / 2)  # measured before and after the run, held against their mean
    steady = r["steady_runs"][0]
    assert all((row["x_bound_steady"] == row["x_bound"]) if steady else row["x_bound_steady"] is None
               for row in r["lengths"])
    assert all(row["attention_op_ms"] > 0 and row["x_bound_op"] > 0 for row in r["lengths"])  # --ops
    printed = capsys.readouterr().out
    assert "x that bound" in printed and "attention op ms" in printed
    assert main(["bench", "--bundle", str(exported["llama"]["bundle"]), "--context", "8"]) == 2
    assert "must be at least 17" in capsys.readouterr().err
    assert main(["bench", "--bundle", str(exported["llama"]["bundle"]), "--context", "40", "--plot", "x.png"]) == 2
    assert "without --plot" in capsys.readouterr().err


def test_bench_batch(exported, tmp_path, capsys):
    """The batched decode step (what the server runs) at several batch sizes on the tiny model."""
    out = tmp_path / "batch.json"
    assert main(["bench", "--bundle", str(exported["llama"]["bundle"]), "--batch", "1,3,8", "--runs", "1", "--ops",
                 "--kv-cache", "f16,f32", "--json", str(out)]) == 0
    r = json.loads(out.read_text())["batch"]
    assert [(row["kv_cache"], row["batch"]) for row in r["batches"]] == [(kv, b) for kv in ("f16", "f32") for b in (1, 3, 8)]
    assert r["batches"][0]["x_batch_1"] == 1 == r["batches"][3]["x_batch_1"]  # each against its own batch of 1
    assert all(row["step_ms"] > 0 and row["tok_s"] > 0 and row["gflop_s"] > 0 for row in r["batches"])
    assert len(r["fma_runs_gflop_s"]) == 1 == len(r["round_trip_runs_ns"]) and all(0 < row["of_fma_loop"] for row in r["batches"])
    # --ops: every operation timed (a tiny model's steps take microseconds: no comparison with the step times)
    from fromage.engines.native import OPS
    for row in r["batches"]:
        assert list(row["ops_ms"]) == list(OPS) and all(ms >= 0 for ms in row["ops_ms"].values())
        assert sum(row["ops_ms"].values()) > 0
    printed = capsys.readouterr().out
    assert "matrix GFLOP/s" in printed and "where a step goes" in printed


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "between 1 and 256"),
    (["--batch", "two"], "numbers like 1,8,16"),
    (["--batch", "4", "--context", "64"], "two separate benches"),
    (["--batch", "4", "--plot", "x.png"], "without --plot"),
    (["--ops"], "give one of them"),
    (["--kv-cache", "f8"], "give f32 or f16"),
    (["--kv-cache", "f32,f16"], "takes one type"),  # the decode bench runs one
    (["--kv-cache", "f16", "--also-engine", "onnxruntime"], "needs the native engine"),
    (["--compare", "vllm"], "unknown peer"),
    (["--also-engine", "native"], "main run's engine"),  # --engine auto runs native already
])
def test_bench_rejects(exported, argv, message, capsys):
    assert main(["bench", "--bundle", str(exported["llama"]["bundle"]), *argv]) == 2
    assert message in capsys.readouterr().err


def test_bench_reports_a_failing_peer(exported, tmp_path, cache):
    """A peer that cannot run is in the output with its error, never dropped."""
    import shutil
    bundle = tmp_path / "bundle"
    shutil.copytree(exported["llama"]["bundle"], bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["model"]["lm"] = str(tmp_path / "missing-lm")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    r = _bench(tmp_path, "--bundle", str(bundle), "--compare", "hf")
    assert r["systems"]["fromage"]["decode_tok_s"] > 0
    assert "missing-lm" in r["systems"]["hf"]["error"]


def test_bench_also_runs_a_quantized_bundle(exported, tmp_path, cache):
    from fromage.export.bundle_writer import write_bundle
    e = exported["llama"]
    write_bundle(e["model"], tmp_path / "int4", quantize="int4", activations="fp32", log=lambda *_: None)
    r = _bench(tmp_path, "--bundle", str(e["bundle"]), "--also", str(tmp_path / "int4"), "--also-engine", "onnxruntime")
    assert list(r["systems"]) == ["fromage", "fromage_int4_fp32act", "fromage_onnxruntime"]
    assert [r["systems"][n]["engine"] for n in r["systems"]] == ["native", "native", "onnxruntime"]
    assert r["systems"]["fromage_onnxruntime"]["agrees_with_fromage_tokens"] == 4  # both engines, same tokens
    q = r["systems"]["fromage_int4_fp32act"]
    assert q["decode_tok_s"] > 0 and q["vs_fromage"]["decode_tok_s"] > 0
    assert 0 < q["weights_bytes"] < r["weights_bytes_per_token"]  # its own, smaller weights
    assert main(["bench", "--bundle", str(e["bundle"]), "--also", str(e["bundle"])]) == 2  # fp32 twice


def test_bench_serve_smoke(exported, tmp_path, monkeypatch, capsys):
    """`fromage bench serve` against a started server on the tiny model: the sweep, the long-prompt window
    and a small mixed load test (shapes of the output, never timings)."""
    import fromage.tools.bench_serve as bench_serve
    load_test = bench_serve.load_test
    monkeypatch.setattr(bench_serve, "load_test", lambda server, clients, per_client, *a, **k:
                        load_test(server, 4, 30, *a, **k))  # 120 requests: the memory window 100..600 has two samples
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--bundle", str(exported["llama"]["bundle"]), "--concurrency", "1,2", "--rounds", "2",
                 "--requests", "1", "--max-tokens", "4", "--peer", "none", "--bench-image", "", "--long-prompt", "30", "--chat-turns", "2", "--load-test",
                 "--threads", "2", "--cache", str(tmp_path / "cache"), "--json", str(out)]) == 0
    r = json.loads(out.read_text())["systems"]["fromage"]
    assert [row["concurrency"] for row in r["text"]] == [1, 2] and all(row["errors"] == 0 for row in r["text"])
    assert all(len(row["rounds"]) == 2 for row in r["text"])  # each level twice, its median round reported
    assert r["text"][0]["output_tok_s"] > 0 and r["long_prompt"]["with"]["itl_ms"]["p99"] > 0
    assert r["long_prompt"]["with"]["streams_tok_s"] > 0 and r["long_prompt"]["without"]["streams_tok_s"] > 0
    first, second = r["chat"]["turns"]  # the second turn re-sends the first: found in the prefix cache
    assert first["cached_tokens"] == 0 and 8 <= second["cached_tokens"] < second["prompt_tokens"]
    lt = r["load_test"]
    assert lt["requests"] == 120 and lt["5xx"] == 0 and lt["4xx"] == lt["malformed_sent"] and lt["running_after"] == 0
    assert "fromage" in capsys.readouterr().out


def test_bench_serve_times_an_empty_answers_first_token_at_its_end():
    """A streamed answer with no text (the model ended at once) has its time to first token at its first chunk:
    the chat test's turn must not fail on it."""
    import httpx
    from fromage.tools.bench_serve import send_once
    usage = {"usage": {"completion_tokens": 0, "prompt_tokens": 5}, "choices": []}
    stream = f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode()
    client = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(200, content=stream)))
    rec = send_once(client, "http://bench", {"stream": True}, None, 0.0)
    assert rec["ok"] and rec["token_times"] == [] and 0 < rec["ttft_s"] <= rec["e2e_s"]


def test_bench_serve_counts_the_window_where_every_client_runs():
    """The rate while all clients have a request in flight leaves out the ramp-down (clients already done)."""
    from fromage.tools.bench_serve import all_running_rate
    rec = lambda client, t0, times, e2e: {"client": client, "ok": True, "t0": t0, "token_times": times, "e2e_s": e2e}  # noqa: E731
    records = [rec(0, 0.0, [0.5, 1.5, 2.5, 3.5], 4.0),  # client 0 runs 0..4 s
               rec(1, 1.0, [0.2, 1.2], 1.5), rec(1, 2.5, [0.1, 0.4], 0.5)]  # client 1 runs 1..3 s
    assert all_running_rate(records) == pytest.approx(6 / 2.0)  # tokens at 1.2 1.5 2.2 2.5 2.6 2.9 in [1, 3)
    assert all_running_rate([rec(0, 0.0, [0.1], 0.5)]) is None  # a window under MIN_WINDOW_S


def test_bench_serve_scaling_is_the_median_of_each_rounds_own_ratio():
    """16 streams against 1 pairs each round with itself: a slow minute in one round does not pair with a fast one."""
    from fromage.tools.bench_serve import targets_met
    rounds = lambda *rates: [{"output_tok_s": x, "all_running_tok_s": 2 * x, "itl_p99_ms": 3 * x, "tpot_p50_ms": x}  # noqa: E731
                             for x in rates]
    text = [{"concurrency": 1, "output_tok_s": 50.0, "rounds": rounds(40.0, 50.0, 60.0)},
            {"concurrency": 16, "output_tok_s": 400.0, "rounds": rounds(360.0, 380.0, 400.0)}]
    t = targets_met({"systems": {"fromage": {"text": text}}})
    assert t["scaling_16_vs_1_rounds"] == pytest.approx([9.0, 7.6, 400 / 60]) and t["scaling_16_vs_1"] == pytest.approx(7.6)
    assert t["itl_p99_16_vs_tpot_1"] == pytest.approx(380 * 3 / 50)
    assert t["scaling_16_vs_1_all_running"] == pytest.approx(7.6)  # the same pairing for the rate while all run


def test_bench_serve_drives_a_running_server_with_its_api_key(served_model, tmp_path, capsys):
    """--url waits for the server's health check and sends --api-key; a refused warm-up is an error, not a
    table of zeros."""
    from conftest import LiveServer
    server = LiveServer(served_model, api_key="sekrit")
    try:
        argv = ["bench", "serve", "--url", server.url, "--concurrency", "1", "--requests", "1", "--max-tokens", "3",
                "--bench-image", "", "--cache", str(tmp_path / "cache")]
        out = tmp_path / "serve.json"
        assert main([*argv, "--api-key", "sekrit", "--json", str(out)]) == 0
        row = json.loads(out.read_text())["systems"]["fromage"]["text"][0]
        assert row["errors"] == 0 and row["output_tok_s"] > 0
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "warm-up request" in err and "401" in err
    finally:
        server.close()


def test_bench_serve_url_that_never_answers(tmp_path, monkeypatch, capsys):
    import fromage.tools.bench_serve as bench_serve
    from fromage.tools.server_process import free_port
    monkeypatch.setattr(bench_serve, "URL_WAIT_S", 0.5)
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["bench", "serve", "--url", url, "--bench-image", "", "--cache", str(tmp_path / "cache")]) == 2
    assert f"the server at {url} did not answer 200 on /health" in capsys.readouterr().err
    assert main(["bench", "serve", "--bundle", "b", "--peer", "none", "--api-key", "k", "--cache", str(tmp_path)]) == 2
    assert "--api-key goes with --url" in capsys.readouterr().err
    assert main(["bench", "serve", "--url", url, "--load-test", "--cache", str(tmp_path)]) == 2
    assert "--load-test reads the server's memory" in capsys.readouterr().err


def test_bench_serve_sends_again_on_a_connection_the_server_closed():
    """A kept-alive connection that the server closed (llama-server does) fails the next request before any
    response: that request is sent once more, timed from its first send, and counted as retried."""
    import socket
    import threading
    from fromage.tools.bench_serve import http_client, send, summarize
    listener = socket.create_server(("127.0.0.1", 0))
    answer = (b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 55\r\n\r\n'
              b'{"usage": {"completion_tokens": 3, "prompt_tokens": 5}}')

    def serve():
        for reply in (False, True):  # the first connection closes without a response
            conn, _ = listener.accept()
            conn.recv(65536)
            if reply:
                conn.sendall(answer)
            conn.close()
    threading.Thread(target=serve, daemon=True).start()
    with http_client() as http:
        rec = send(http, f"http://127.0.0.1:{listener.getsockname()[1]}", {"stream": False})
    listener.close()
    assert rec["ok"] and rec["tokens"] == 3 and rec["retried"]
    assert summarize([{**rec, "client": 0}], 1.0)["retried"] == 1
