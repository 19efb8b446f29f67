"""Options checked in one place (SamplingParams, the engines' thread check) and named by the CLI; text
that is not UTF-8; the context's token budget said; a closed pipe; one model shared by threads."""
import subprocess
import sys
import threading

import numpy as np
import pytest

from fromage.runtime.errors import ParameterError
from fromage.runtime.generate import Fromage
from fromage.runtime.sampling import SamplingParams
from fromage.tools.cli import main

BAD_OPTIONS = [("--max-new-tokens", "-1"), ("--max-new-tokens", "0"), ("--temperature", "-1"), ("--temperature", "inf"),
               ("--temperature", "nan"), ("--top-p", "0"), ("--top-p", "2"), ("--top-p", "nan"), ("--top-k", "-5"),
               ("--threads", "0"), ("--threads", "-3"), ("--threads", "1000"), ("--seed", "-1"), ("--stop-id", "-1"),
               ("--stop-id", "99999999"), ("--ret-scale-factor", "nan"), ("--ret-scale-factor", "-1"),
               ("--top-images", "0"), ("--min-word-tokens", "-1"), ("--max-rets", "-2")]


@pytest.mark.parametrize("option,value", BAD_OPTIONS)
def test_out_of_range_options_are_one_line_errors_naming_the_option(exported, capsys, option, value):
    rc = main(["generate", "--bundle", str(exported["llama"]["bundle"]), "--index", str(exported["llama"]["index"]),
               option, value, "a cat"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"fromage: error: {option}: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_the_api_names_the_parameter():
    with pytest.raises(ParameterError) as e:
        SamplingParams(top_p=float("nan"))
    assert e.value.param == "top_p"
    assert SamplingParams(seed=np.int64(3), temperature=1).seed == 3  # numpy integers are whole numbers too


def test_text_that_is_not_utf8(exported, capsys, tmp_path):
    bundle = str(exported["llama"]["bundle"])
    assert main(["generate", "--bundle", bundle, "a \udcff cat"]) == 2
    assert "not valid UTF-8" in capsys.readouterr().err
    queries = tmp_path / "q.txt"
    queries.write_bytes(b"a cat\n\xff\xfe dog\n")
    assert main(["retrieve", "--bundle", bundle, "--index", str(exported["llama"]["index"]), "--queries", str(queries)]) == 2
    assert "not UTF-8" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--max-batch", "--prefill-rows", "--max-tokens", "--max-prompt-tokens"])
def test_serve_refuses_zero_rows(exported, capsys, option):
    assert main(["serve", "--bundle", str(exported["llama"]["bundle"]), option, "0"]) == 2
    assert f"{option}" in capsys.readouterr().err.split("must be >= 1")[0]


def test_serve_refuses_an_f16_cache_on_onnxruntime_at_once(exported, capsys):
    assert main(["serve", "--bundle", str(exported["llama"]["bundle"]), "--kv-cache", "f16",
                 "--engine", "onnxruntime"]) == 2
    assert "needs the native engine" in capsys.readouterr().err


def test_the_context_budget_is_said_at_start(exported, capsys):
    assert main(["generate", "--bundle", str(exported["llama"]["bundle"]), "--max-new-tokens", "1000000000",
                 "--no-retrieval", "--stop-id", "0", "a cat"]) == 0
    assert "the context leaves room for" in capsys.readouterr().err


def test_a_closed_pipe_ends_quietly(exported, tmp_path):
    queries = tmp_path / "q.txt"
    queries.write_text("a red cat on the big boat\n" * 3000)
    cmd = (f"{sys.executable} -m fromage.tools.cli retrieve --json --bundle {exported['llama']['bundle']} "
           f"--index {exported['llama']['index']} --queries {queries} | head -n 1")
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert proc.stdout.count("\n") == 1 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("engine", ["native", "onnxruntime"])
def test_one_model_shared_by_threads_gives_the_sequential_results(exported, engine):
    model = Fromage(exported["llama"]["bundle"], engine=engine)
    prompts = [f"the {a} {b}" for a in ("red", "blue", "big", "small") for b in ("cat", "boat")]
    params = SamplingParams(max_new_tokens=12, retrieval=False, stop_ids=[])
    sequential = {p: model.generate([p], params).token_ids for p in prompts}
    for _ in range(2):
        out, errors = {}, []

        def run(ps):
            try:
                for p in ps:
                    out[p] = model.generate([p], params).token_ids
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=run, args=(prompts[i::4],)) for i in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert not errors and out == sequential
