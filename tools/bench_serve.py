"""`fromage bench serve`: a server under load, measured as `vllm bench serve` measures one.

C concurrent clients each send N chat requests one after another (streamed, so every token's arrival
is timed), for C = 1, 2, 4, ... Per level: request throughput, output tokens/s, time to first token,
time per output token, inter-token latency and end-to-end latency (p50/p90/p99), errors. The server is
one given with --url or one started here (`fromage serve`), and, with --peer, llama.cpp's llama-server
on the same weights (text only) with as many slots as fromage has batch rows, under the same load.
--long-prompt: 8 streams run while a 2,000-token prompt arrives; --chat-turns: one conversation, its
history re-sent every turn, with and without the prefix cache; --load-test: 32 clients x 20 mixed
requests (streamed or not, images, 10 % cancelled mid-stream, 5 % malformed), with the server's memory.
"""
from __future__ import annotations

import base64
import itertools
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

try:
    import httpx
except ImportError:  # the [bench] extra: the CLI's parser imports this module, every command must run without it
    httpx = None

from fromage.engines.base import default_threads
from fromage.runtime.errors import FromageError

from .bench import machine_info
from .bench_report import percentiles
from .options import add_kv_cache_argument, int_list
from .server_process import Server, free_port, wait_healthy

TOPICS = ("a red kangaroo", "an old lighthouse", "a blue whale", "a small boat", "a yellow sun over hills",
          "a painter at the market", "a green frog", "a snowy mountain")
DEFAULT_IMAGE = "/usr/share/tuxpaint/stamps/animals/marsupials/kangaroo.png"


# ---- one request ----------------------------------------------------------------------------------
# fromage's extension that keeps [RET] out of a timed answer, so that it is exactly max_tokens tokens long
# (after a [RET] an answer that re-says itself ends early)
NO_RETRIEVAL = {"retrieval": False}


_serial = itertools.count()


def request_body(i: int, max_tokens: int, image: str | None = None, stream: bool = True, words: int = 0,
                 extra: dict | None = None) -> dict:
    # numbered first: no two requests of a bench share more than the chat format's opening, so a server's
    # prefix cache saves nothing here that it would not save on distinct users' questions
    text = f"{next(_serial)}. Tell me a long story about {TOPICS[i % len(TOPICS)]}."
    if words:
        rng = random.Random(i)
        text = " ".join(rng.choice(TOPICS).split()[-1] for _ in range(words)) + " " + text
    content = text if image is None else [{"type": "image_url", "image_url": {"url": image}},
                                          {"type": "text", "text": text}]
    body = {"model": "bench", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return {**body, **(extra or {})}


def http_client(headers: dict | None = None) -> httpx.Client:
    """An HTTP client for a bench's requests (`headers`: the server's API key, if it needs one)."""
    return httpx.Client(timeout=600, headers=headers)


BROKEN_CONNECTION = ("RemoteProtocolError", "ReadError", "WriteError")  # httpx's names for a connection closed under a request


def send(client: httpx.Client, url: str, body, cancel_after: int | None = None) -> dict:
    """One chat request; -> {ok, status, t0, ttft_s, token_times, e2e_s, tokens, cancelled, retried}: t0 the
    send's perf_counter, times after it. A streamed answer is timed chunk by chunk; `cancel_after` closes the
    stream after that many chunks. A request that met a kept-alive connection the server had closed (no
    response at all: llama-server closes some) is sent once more on a new one, timed from the first send.
    Such a close shows as a disconnect, or as a reset when the request was not yet read whole."""
    t0 = time.perf_counter()
    rec = send_once(client, url, body, cancel_after, t0)
    if rec["status"] is None and rec.get("error", "").startswith(BROKEN_CONNECTION):
        rec = {**send_once(client, url, body, cancel_after, t0), "retried": True}
    return rec


def send_once(client: httpx.Client, url: str, body, cancel_after: int | None, t0: float) -> dict:
    rec = {"ok": False, "status": None, "t0": t0, "token_times": [], "tokens": 0, "cancelled": False, "text": ""}
    try:
        if not (isinstance(body, dict) and body.get("stream")):
            r = client.post(url + "/v1/chat/completions", **({"json": body} if isinstance(body, dict) else {"content": body}))
            rec.update(status=r.status_code, ok=r.status_code == 200, e2e_s=time.perf_counter() - t0)
            if rec["ok"]:
                rec["tokens"] = r.json()["usage"]["completion_tokens"]
            return rec
        with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            rec["status"] = r.status_code
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}: {r.read()[:200]!r}"
                return rec
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                rec.setdefault("first_chunk_s", time.perf_counter() - t0)
                msg = json.loads(line[6:])
                if msg.get("usage"):
                    rec["tokens"], rec["prompt_tokens"] = msg["usage"]["completion_tokens"], msg["usage"]["prompt_tokens"]
                    rec["cached_tokens"] = (msg["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
                delta = (msg.get("choices") or [{}])[0].get("delta") or {}
                rec["text"] += delta.get("content") or ""
                if delta.get("content") or delta.get("parts"):
                    rec["token_times"].append(time.perf_counter() - t0)
                    if cancel_after is not None and len(rec["token_times"]) >= cancel_after:
                        rec["cancelled"] = True
                        break
        rec["ok"] = True
        rec["tokens"] = rec["tokens"] or len(rec["token_times"])  # a server without usage: a chunk a token
    except httpx.HTTPError as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    rec["e2e_s"] = time.perf_counter() - t0
    if rec["token_times"]:
        rec["ttft_s"] = rec["token_times"][0]
    elif rec["ok"] and "first_chunk_s" in rec:  # an empty answer: its first chunk is its end
        rec["ttft_s"] = rec["first_chunk_s"]
    return rec


def run_clients(url: str, concurrency: int, per_client: int, make_body, headers=None) -> tuple:
    """-> (records, wall seconds): `concurrency` threads, each sending `per_client` requests in turn. The
    clients are made before the clock starts and all start together: an httpx client takes ~30 ms of CPU
    (its TLS context), which 16 of them made on their first send spent on the cores the server needs, and
    which spread the clients' first requests over half a second."""
    records, lock = [], threading.Lock()
    https = [http_client(headers) for _ in range(concurrency)]
    start = threading.Barrier(concurrency + 1)

    def client(c: int):
        with https[c] as http:
            start.wait()
            for j in range(per_client):
                rec = {**send(http, url, *make_body(c * per_client + j)), "client": c}
                with lock:
                    records.append(rec)
    threads = [threading.Thread(target=client, args=(c,)) for c in range(concurrency)]
    [t.start() for t in threads]
    start.wait()
    t0 = time.perf_counter()
    [t.join() for t in threads]
    return records, time.perf_counter() - t0


def ms(values) -> dict:
    """Percentiles of seconds, in milliseconds ({} for no values)."""
    return {k: x * 1000 for k, x in (percentiles(values) or {}).items() if k != "runs"}


def tokens_between(records: list, begin: float, end: float) -> int:
    """Streamed tokens the records received in [begin, end) (perf_counter times)."""
    return sum(begin <= r["t0"] + t < end for r in records for t in r["token_times"])


def all_running_rate(records: list) -> float | None:
    """Output tokens/s while every client had a request in flight: from the last client's first send to the
    first client's last answer. The whole run's rate also counts the ramp-down, when the clients that are
    done leave fewer streams running; None when that window is shorter than MIN_WINDOW_S or the answers
    were not streamed (their tokens are not timed)."""
    spans = {}
    for r in records:
        start, end = spans.get(r["client"], (r["t0"], r["t0"]))
        spans[r["client"]] = (min(start, r["t0"]), max(end, r["t0"] + r.get("e2e_s", 0.0)))
    begin, end = max(s for s, _ in spans.values()), min(e for _, e in spans.values())
    tokens = tokens_between(records, begin, end)
    return tokens / (end - begin) if end - begin >= MIN_WINDOW_S and tokens else None


def running_rate(row: dict) -> str:
    """The "while all C run" rate as printed: "-" where its window was too short to count."""
    rate = row.get("all_running_tok_s")
    return f"{rate:.1f}" if rate else "-"


def summarize(records: list, wall: float) -> dict:
    ok = [r for r in records if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    tpot = [(r["token_times"][-1] - r["token_times"][0]) / (len(r["token_times"]) - 1)
            for r in ok if len(r["token_times"]) > 1]
    itl = [b - a for r in ok for a, b in zip(r["token_times"], r["token_times"][1:])]
    failures = sorted({r.get("error") or f"HTTP {r['status']}" for r in records if not r["ok"]})
    return {"requests": len(records), "errors": len(records) - len(ok), "error_examples": failures[:3],
            "retried": sum(1 for r in records if r.get("retried")), "wall_s": wall,
            "request_throughput": len(ok) / wall, "output_tok_s": tokens / wall, "output_tokens": tokens,
            "all_running_tok_s": all_running_rate(records) if records else None,
            "ttft_ms": ms([r["ttft_s"] for r in ok if "ttft_s" in r]), "tpot_ms": ms(tpot), "itl_ms": ms(itl),
            "e2e_ms": ms([r["e2e_s"] for r in ok])}


# ---- servers ---------------------------------------------------------------------------------------
def start_fromage(args, log_dir: Path) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "fromage.tools.cli", "serve", "--bundle", args.bundle, "--port", port,
            "--max-batch", args.max_batch, "--max-queue", 1024, "--threads", args.threads, "--kv-cache", args.kv_cache]
    if args.prefill_rows is not None:
        argv += ["--prefill-rows", args.prefill_rows]
    if args.prefix_cache_mb is not None:
        argv += ["--prefix-cache-mb", args.prefix_cache_mb]
    if args.index:
        argv += ["--index", args.index]
    return Server("fromage", argv, port, log_dir / "fromage-serve.log")


def start_llama_server(args, log_dir: Path, gguf: Path) -> Server:
    from .llama_cpp import ensure_built
    port = free_port()
    argv = [ensure_built(Path(args.cache)) / "llama-server", "-m", gguf, "--host", "127.0.0.1", "--port", port,
            "-t", args.threads, "-tb", args.threads, "-np", args.max_batch, "-c", args.max_batch * 1024, "-cb",
            "--no-webui"]
    return Server(f"llama-server ({gguf.name})", argv, port, log_dir / "llama-server.log")


def data_url(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


# ---- scenarios -------------------------------------------------------------------------------------
def sweep(url: str, levels: list, per_client: int, max_tokens: int, image: str | None, log, extra=None,
          rounds: int = 1, headers=None) -> list:
    """Each level in turn, `rounds` times over (levels side by side in time in every round: the machine's
    memory speed drifts from minute to minute). Per level, the row of the round with the median output rate,
    and every round's figures under "rounds"."""
    runs = {c: [] for c in levels}
    with http_client(headers) as http:
        warm = send(http, url, request_body(0, 4, image, extra=extra))
    if not warm["ok"]:
        raise FromageError(f"the warm-up request to {url} failed: {warm.get('error') or warm['status']}")
    for k in range(rounds):
        for c in levels:
            recs, wall = run_clients(url, c, per_client, lambda i: (request_body(i, max_tokens, image, extra=extra),),
                                     headers)
            row = {"concurrency": c, **summarize(recs, wall)}
            log(f"  C={c:>2}{f' (round {k + 1})' if rounds > 1 else ''}: {row['output_tok_s']:7.1f} tok/s "
                f"({running_rate(row)} while all run), {row['request_throughput']:.2f} req/s, TTFT p50 "
                f"{row['ttft_ms'].get('p50', 0):.0f} ms, ITL p99 {row['itl_ms'].get('p99', 0):.0f} ms, errors {row['errors']}"
                + (f" ({row['retried']} sent again on a new connection)" if row["retried"] else ""))
            runs[c].append(row)
    rows = []
    for c in levels:
        by_rate = sorted(runs[c], key=lambda r: r["output_tok_s"])
        rows.append({**by_rate[(len(by_rate) - 1) // 2], "rounds": [
            {"output_tok_s": r["output_tok_s"], "all_running_tok_s": r["all_running_tok_s"],
             "itl_p99_ms": r["itl_ms"].get("p99"), "tpot_p50_ms": r["tpot_ms"].get("p50")} for r in runs[c]]})
    return rows


MIN_WINDOW_S = 1.0
URL_WAIT_S = 300  # a --url server still loading its model


def long_prompt(url: str, streams: int, max_tokens: int, prompt_words: int, log, extra=None, headers=None) -> dict:
    """ITL of `streams` running streams without, then with, one long prompt arriving mid-run: the intervals
    that overlap the long prompt's lifetime (at least MIN_WINDOW_S), against those of a 4-second window."""
    def run(with_long: bool) -> dict:
        out, stop = {}, threading.Event()
        recs = []

        def streaming(c):
            with http_client(headers) as http:
                while not stop.is_set():
                    recs.append(send(http, url, request_body(c, max_tokens, extra=extra)))
        threads = [threading.Thread(target=streaming, args=(c,)) for c in range(streams)]
        [t.start() for t in threads]
        time.sleep(2.0)
        t = time.perf_counter()
        if with_long:
            with http_client(headers) as http:
                long = send(http, url, request_body(99, 8, words=prompt_words, extra=extra))
            out["long_prompt_ttft_ms"] = long.get("ttft_s", 0) * 1000
            out["long_prompt_tokens"] = long.get("prompt_tokens")
            time.sleep(max(0.0, MIN_WINDOW_S - (time.perf_counter() - t)))  # a prompt done within a step or two
        else:
            time.sleep(4.0)
        end = time.perf_counter()
        out["window_s"] = end - t
        stop.set()
        [t.join() for t in threads]
        # the intervals that overlap the window only (not the ramp before it, nor the streams' tails)
        itl = [b - a for r in recs for a, b in zip(r["token_times"], r["token_times"][1:])
               if r["t0"] + a < end and r["t0"] + b > t]
        out["itl_ms"] = ms(itl)
        # the streams' own rate in the window: a scheduler that parked them behind the long prompt would
        # show few intervals (their next requests waiting) and a low rate, not a high ITL
        out["streams_tok_s"] = tokens_between(recs, t, end) / out["window_s"]
        return out
    base, loaded = run(False), run(True)
    if not (base["itl_ms"] and loaded["itl_ms"]):
        raise FromageError("the long-prompt test saw no streamed tokens in its window (did the streams fail? "
                           "see the server's log)")
    ratio = loaded["itl_ms"]["p99"] / base["itl_ms"]["p99"]
    log(f"  ITL p99 of {streams} streams: {base['itl_ms']['p99']:.0f} ms alone, {loaded['itl_ms']['p99']:.0f} ms while "
        f"a {loaded['long_prompt_tokens']}-token prompt arrives ({ratio:.2f}x; its TTFT {loaded['long_prompt_ttft_ms']:.0f} ms); "
        f"the streams' output {base['streams_tok_s']:.0f} tok/s alone, {loaded['streams_tok_s']:.0f} meanwhile")
    return {"streams": streams, "without": base, "with": loaded, "itl_p99_ratio": ratio}


CHAT_QUESTIONS = ("What is this?", "Where does it live?", "What does it eat?", "How big is it?", "Can it swim?",
                  "Tell me one more fact about it.")


def chat(url: str, turns: int, image: str | None, log, extra=None, headers=None) -> dict:
    """One conversation (the first question with the image), its whole history sent every turn as the
    chat page sends it. Each turn is sent twice, side by side: as it is, and behind a system line of its
    own (a history no prefix cache holds); -> per turn the time to first token of both and the
    positions the server found cached."""
    messages, rows = [], []
    with http_client(headers) as http:
        for k in range(turns):
            question = CHAT_QUESTIONS[k % len(CHAT_QUESTIONS)]
            content = question if k or image is None else [{"type": "image_url", "image_url": {"url": image}},
                                                           {"type": "text", "text": question}]
            messages.append({"role": "user", "content": content})
            body = {"model": "bench", "messages": messages, "max_tokens": 24, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}, **(extra or {})}
            own = send(http, url, {**body, "messages": [{"role": "system", "content": f"Chat {next(_serial)}."}]
                                   + messages})
            shared = send(http, url, body)
            if not (own["ok"] and shared["ok"]):
                raise FromageError(f"the chat's turn {k + 1} failed: {own.get('error') or shared.get('error')}")
            messages.append({"role": "assistant", "content": shared["text"].strip()})
            rows.append({"turn": k + 1, "prompt_tokens": shared.get("prompt_tokens"),
                         "cached_tokens": shared.get("cached_tokens"), "ttft_ms": shared["ttft_s"] * 1000,
                         "ttft_uncached_ms": own["ttft_s"] * 1000})
    log("  " + "; ".join(f"turn {r['turn']}: {r['ttft_ms']:.0f} ms ({r['cached_tokens']} of {r['prompt_tokens']} "
                         f"positions cached), {r['ttft_uncached_ms']:.0f} ms uncached" for r in rows))
    return {"turns": rows}


def load_test(server: Server, clients: int, per_client: int, max_tokens: int, image: str | None, log) -> dict:
    """Mixed traffic; every malformed request must get a 4xx, nothing a 5xx, every slot freed."""
    rng = random.Random(0)
    bad = [b'{"messages": [}', {"messages": []}, {"messages": [{"role": "user", "content": "x"}], "top_p": 7},
           {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}]
    kinds, rss = {}, []

    def plan(i):  # drawn in order before any client runs: the same mix every run
        r = rng.random()
        if r < 0.05:
            kinds[i] = "malformed"
            return (rng.choice(bad),)
        kinds[i] = "cancelled" if r < 0.15 else "ok"
        body = request_body(i, max_tokens, image if rng.random() < 0.3 else None, stream=(r < 0.15 or rng.random() < 0.5))
        return (body, rng.randint(1, max_tokens // 2) if kinds[i] == "cancelled" else None)
    requests, issued = [plan(i) for i in range(clients * per_client)], itertools.count()

    def make(i):
        n = next(issued)  # requests sent so far, in time order (the clients run their indices in parallel)
        if n % 25 == 0:
            rss.append((n, server.memory_mb()))
        return requests[i]
    recs, wall = run_clients(server.url, clients, per_client, make)
    statuses = [r["status"] for r in recs]
    malformed = [r for r in recs if r["status"] and 400 <= r["status"] < 500]
    time.sleep(1.0)
    metrics = httpx.get(server.url + "/metrics").text
    running = next((float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("fromage_num_requests_running")), None)
    window = [m for n, m in rss if 100 <= n <= 600 and m]
    out = {"requests": len(recs), "wall_s": wall, "5xx": sum(1 for s in statuses if s and s >= 500),
           "4xx": len(malformed), "malformed_sent": sum(1 for k in kinds.values() if k == "malformed"),
           "cancelled": sum(1 for r in recs if r["cancelled"]), "transport_errors": sum(1 for r in recs if "error" in r),
           "running_after": running, "rss_mb": rss,
           "rss_drift": (max(window) - min(window)) / min(window) if len(window) > 1 else None}
    log(f"  {out['requests']} requests in {wall:.0f} s: 5xx {out['5xx']}, 4xx {out['4xx']} of {out['malformed_sent']} "
        f"malformed, {out['cancelled']} cancelled, running afterwards {running}, RSS drift requests 100-600 "
        f"{(out['rss_drift'] or 0) * 100:.1f} %")
    return out


# ---- the command ----------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--bundle", help="bundle to serve (a `fromage serve` is started on it), unless --url")
    p.add_argument("--index", help="image index for the started server")
    p.add_argument("--threads", type=int, help="threads of each server (default: the cores this process may use)")
    p.add_argument("--cache", help="where llama.cpp is built and the logs go (default: fromage's cache)")
    p.add_argument("--json", metavar="FILE", help="write every number as JSON")
    p.add_argument("--plot", metavar="FILE", help="PNG: throughput and p99 latency against concurrency")
    p.add_argument("--url", help="a running server to drive (default: start `fromage serve` on --bundle); "
                                 "waited for until its /health answers 200")
    p.add_argument("--api-key", help="the --url server's API key (sent as Authorization: Bearer)")
    p.add_argument("--concurrency", default="1,2,4,8,16,32", help="client counts (default 1,2,4,8,16,32)")
    p.add_argument("--requests", type=int, default=4, help="requests per client per level (default 4)")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (default 64)")
    p.add_argument("--rounds", type=int, default=1,
                   help="sweeps over the levels, one after the other; each level reports its median round, and "
                        "16 streams against 1 is the median of the rounds' own ratios (default 1)")
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together; llama-server slots (default 16)")
    p.add_argument("--prefill-rows", type=int, help="the started server's --prefill-rows (default: its own)")
    add_kv_cache_argument(p, help="the started server's --kv-cache (default f32)")
    p.add_argument("--prefix-cache-mb", type=float, help="the started server's --prefix-cache-mb (default: its own)")
    p.add_argument("--bench-image", default=DEFAULT_IMAGE, help="image for the with-image rows ('' to skip them)")
    p.add_argument("--peer", choices=["auto", "none", "llama_cpp", "llama_cpp_f32"], default="auto",
                   help="llama-server on the same weights: Q4_1 GGUF (llama_cpp) or its F32 dequantization; "
                        "auto: the one matching the bundle's precision")
    p.add_argument("--long-prompt", type=int, default=0, metavar="WORDS", help="also the long-prompt test (e.g. 2000)")
    p.add_argument("--chat-turns", type=int, default=0, metavar="N",
                   help="also a chat of N turns, the history re-sent each turn: TTFT with and without the prefix cache")
    p.add_argument("--load-test", action="store_true", help="also the mixed load test (32 clients x 20 requests)")


def cmd_bench_serve(args, log=print) -> dict:
    from fromage.runtime.bundle_reader import load_bundle
    levels = int_list(args.concurrency, "--concurrency", "1,2,4,8", 1)
    if args.chat_turns < 0 or args.long_prompt < 0 or args.rounds < 1:
        raise FromageError("--chat-turns and --long-prompt must be >= 0, --rounds >= 1")
    log_dir = Path(args.cache) / "bench-serve"
    log_dir.mkdir(parents=True, exist_ok=True)
    result = {"settings": {"concurrency": levels, "rounds": args.rounds, "requests_per_client": args.requests,
                           "max_tokens": args.max_tokens,
                           "max_batch": args.max_batch, "prefill_rows": args.prefill_rows, "kv_cache": args.kv_cache,
                           "prefix_cache_mb": args.prefix_cache_mb, "threads": args.threads,
                           "ignore_eos": True},
              "machine": machine_info(), "systems": {}}
    image = data_url(args.bench_image) if args.bench_image and os.path.isfile(args.bench_image) else None
    targets = [("fromage", None)]
    peer = args.peer
    if peer == "auto":
        peer = "none" if args.url or not args.bundle else (
            "llama_cpp" if load_bundle(args.bundle, verify=False).manifest.get("quantization") else "llama_cpp_f32")
    if peer != "none":
        targets.append((peer, peer))
    if not args.url and not args.bundle:
        raise FromageError("give --bundle (a server is started on it) or --url")
    if args.api_key and not args.url:
        raise FromageError("--api-key goes with --url: a server started here needs none")
    if args.load_test and args.url:
        raise FromageError("--load-test reads the server's memory, so it starts its own: give --bundle, not --url")
    for name, kind in targets:  # one server at a time: an idle one's threads would take the other's cores
        server = None
        if kind is None and not args.url:
            server = start_fromage(args, log_dir)
        elif kind is not None:
            from fromage.training.backbones import default_gguf_path
            from .llama_cpp import f32_gguf
            server = start_llama_server(args, log_dir, default_gguf_path() if kind == "llama_cpp" else f32_gguf(Path(args.cache)))
        url = server.url if server else args.url.rstrip("/")
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
        try:
            if server is None:
                log(f"waiting for {url}/health ...")
                wait_healthy("the server", url, URL_WAIT_S)
            log(f"{name} ({url}), text only:")
            extra = NO_RETRIEVAL if name == "fromage" else None
            entry = result["systems"][name] = {"text": sweep(url, levels, args.requests, args.max_tokens, None, log, extra,
                                                             args.rounds, headers)}
            if name == "fromage" and image:
                log(f"{name}, with an image:")
                entry["image"] = sweep(url, levels, args.requests, args.max_tokens, image, log, extra, args.rounds,
                                       headers)
            if name == "fromage" and args.long_prompt:
                log(f"{name}, long prompt:")
                entry["long_prompt"] = long_prompt(url, 8, args.max_tokens, args.long_prompt, log, extra, headers)
            if name == "fromage" and args.chat_turns:
                log(f"{name}, a chat of {args.chat_turns} turns (time to first token):")
                entry["chat"] = chat(url, args.chat_turns, image, log, extra, headers)
            if name == "fromage" and args.load_test:
                log(f"{name}, load test:")
                entry["load_test"] = load_test(server, 32, 20, args.max_tokens, image, log)
            if server is not None:
                entry["rss_mb"] = server.memory_mb()
        finally:
            if server is not None:
                server.close()
    result["targets"] = targets_met(result)
    return result


def targets_met(result: dict) -> dict:
    text = {r["concurrency"]: r for r in result["systems"].get("fromage", {}).get("text", [])}
    out = {}
    if 1 in text and 16 in text:
        # each round's 16 streams against the same round's 1 stream, the median over the rounds
        pairs = list(zip(text[1]["rounds"], text[16]["rounds"]))
        for key, many, one in (("scaling_16_vs_1", "output_tok_s", "output_tok_s"),
                               ("scaling_16_vs_1_all_running", "all_running_tok_s", "all_running_tok_s"),
                               ("itl_p99_16_vs_tpot_1", "itl_p99_ms", "tpot_p50_ms")):
            ratios = [b[many] / a[one] for a, b in pairs if a[one] and b[many] is not None]  # a round with no tokens: none
            if ratios:
                out[key] = statistics.median(ratios)
                if len(pairs) > 1:
                    out[key + "_rounds"] = ratios
        for peer in ("llama_cpp", "llama_cpp_f32"):
            ptext = {r["concurrency"]: r for r in result["systems"].get(peer, {}).get("text", [])}
            if 16 in ptext:
                out[f"vs_{peer}_at_16"] = text[16]["output_tok_s"] / ptext[16]["output_tok_s"]
    return out


def format_table(result: dict) -> str:
    lines = ["| system | input | C | req/s | output tok/s | while all C run | TTFT p50/p90/p99 ms | TPOT p50 ms | "
             "ITL p50/p90/p99 ms | E2E p50/p99 ms | errors |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda d, ks: "/".join(f"{d.get(k, float('nan')):.0f}" for k in ks)  # noqa: E731
    for name, entry in result["systems"].items():
        for kind in ("text", "image"):
            for r in entry.get(kind, []):
                lines.append(f"| {name} | {kind} | {r['concurrency']} | {r['request_throughput']:.2f} | "
                             f"{r['output_tok_s']:.1f} | {running_rate(r)} | "
                             f"{f(r['ttft_ms'], ('p50', 'p90', 'p99'))} | "
                             f"{f(r['tpot_ms'], ('p50',))} | {f(r['itl_ms'], ('p50', 'p90', 'p99'))} | "
                             f"{f(r['e2e_ms'], ('p50', 'p99'))} | {r['errors']} |")
    if result.get("targets"):
        lines.append("")
        lines += [f"- {k}: {' / '.join(f'{x:.2f}' for x in v) if isinstance(v, list) else f'{v:.2f}'}"
                  for k, v in result["targets"].items()]
    return "\n".join(lines)


def plot(result: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, entry in result["systems"].items():
        for kind in ("text", "image"):
            rows = entry.get(kind, [])
            if rows:
                c = [r["concurrency"] for r in rows]
                a.plot(c, [r["output_tok_s"] for r in rows], marker="o", label=f"{name} ({kind})")
                b.plot(c, [r["e2e_ms"].get("p99", np.nan) for r in rows], marker="o", label=f"{name} ({kind})")
    for ax, title in ((a, "output tokens/s"), (b, "end-to-end latency p99 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def cmd(args) -> None:
    from fromage.training.backbones import cache_root
    if httpx is None:
        raise FromageError("fromage bench serve needs httpx: pip install 'fromage[bench]'")
    args.cache = args.cache or str(cache_root())
    args.threads = args.threads or default_threads()
    result = cmd_bench_serve(args, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot:
        try:
            plot(result, args.plot)
        except ModuleNotFoundError:
            raise FromageError("--plot needs matplotlib: pip install 'fromage[bench]'") from None
