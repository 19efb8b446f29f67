"""The runtime never loads torch or transformers; native libraries load in any order."""
import json
import subprocess
import sys


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_generation_never_loads_torch(exported, assets):
    e = exported["llama"]
    code = f"""
import json, sys
import fromage.runtime
from fromage.runtime.generate import Fromage
from fromage.runtime.prompt import ImagePart
from fromage.runtime.sampling import SamplingParams
from fromage.runtime.cli import main
rt = Fromage({str(e['bundle'])!r}, index={str(e['index'])!r})
r = rt.generate([ImagePart({assets['images'][0]!r}), "a cat"], SamplingParams(max_new_tokens=4, ret_scale_factor=9))
main(["index", "build", {str(assets['root'] / 'images')!r}, "--bundle", {str(e['bundle'])!r}, "--out", {str(e['index'])!r}])
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'optimum'))))
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_usearch_then_onnxruntime_import_order():
    """usearch 2.26 segfaulted when imported before onnxruntime; the pinned version must not."""
    proc = _python("import usearch.index, onnxruntime; print('ok')")
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr
