"""The runtime never loads torch, transformers, the training or export code or the tools; imports run
one way (engines <- runtime <- the rest); native libraries load in any order."""
import json
import subprocess
import sys

import pytest


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


FORBIDDEN = "('torch', 'transformers', 'optimum', 'fromage.training', 'fromage.export', 'fromage.tools')"


@pytest.mark.parametrize("engine", ["native", "onnxruntime"])
def test_generation_loads_only_the_runtime(exported, assets, tmp_path, engine):
    e = exported["llama"]
    code = f"""
import json, sys
import fromage.runtime
from fromage.runtime.bundle_reader import load_bundle
from fromage.runtime.generate import Fromage
from fromage.runtime.index_build import index_images
from fromage.runtime.prompt import ImagePart
from fromage.runtime.sampling import SamplingParams
rt = Fromage({str(e['bundle'])!r}, index={str(e['index'])!r}, engine={engine!r})
r = rt.generate([ImagePart({assets['images'][0]!r}), "a cat"], SamplingParams(max_new_tokens=4, ret_scale_factor=9))
index_images(load_bundle({str(e['bundle'])!r}), {str(assets['root'] / 'images')!r}, {str(tmp_path / 'idx')!r}).close()
print(json.dumps(sorted(m for m in sys.modules if m.startswith({FORBIDDEN}))))
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_cli_commands_of_the_runtime_never_load_torch(exported, assets, tmp_path):
    e = exported["llama"]
    code = f"""
import json, sys
from fromage.tools.cli import main
main(["index", "build", {str(assets['root'] / 'images')!r}, "--bundle", {str(e['bundle'])!r}, "--out", {str(tmp_path / 'idx')!r}])
main(["generate", "--bundle", {str(e['bundle'])!r}, "--max-new-tokens", "3", "a cat"])
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'optimum'))))
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_imports_run_one_way():
    """Every import in engines/ and runtime/ (inside functions too) points down or sideways, never up."""
    from fromage.tools.import_graph import graph
    assert graph()["violations"] == []


def test_usearch_then_onnxruntime_import_order():
    """usearch 2.26 segfaulted when imported before onnxruntime; the pinned version must not."""
    proc = _python("import usearch.index, onnxruntime; print('ok')")
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_the_cli_runs_without_the_optional_extras():
    """httpx and matplotlib come with the [bench] extra: without them every command still parses, and the
    benchmark that needs one says so."""
    r = _python("""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('httpx', 'matplotlib'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from fromage.tools.cli import build_parser, main
build_parser()
sys.exit(main(['bench', 'serve', '--bundle', 'nowhere']))
""")
    assert r.returncode == 2, r.stderr
    assert "needs httpx" in r.stderr


def test_the_import_graph_resolves_relative_imports(tmp_path):
    from fromage.tools.import_graph import module_imports
    f = tmp_path / "m.py"
    f.write_text("from .scheduler import Scheduler\nfrom ..training import data\nfrom fromage.engines import native\n")
    assert module_imports(f, "runtime") == [("runtime", 1), ("training", 2), ("engines", 3)]
