"""`fromage demo`: the first run on the embedded default model.

Builds what is missing (the default bundle via `fromage export --default`, an index of the
TuxPaint stamps via `fromage index build`), then runs a short scripted interleaved session with the
runtime API and writes it as a page like the FROMAGe paper's figures (DIR/demo.html) and as JSON
(DIR/demo.json). A second run reuses the bundle and the index.

The session (greedy; each answer stops at a newline, at the model's own next "Q:", or at its end of sequence):
 1. a request answered with a retrieved image: "Show me a picture of a kangaroo." If the model does
    not emit [RET] in its answer, [RET] is appended at the end of the answer (its embedding computed
    as `runtime.scoring` does) and the image is marked as forced;
 2. an image given as input and continued: [image] "This is a picture of";
 3. a two-turn dialogue about the image; the second turn ("Show me a picture of one.") only makes
    sense with the first, carried by concatenating the earlier parts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fromage.runtime.errors import FromageError
from fromage.runtime.sources import TUXPAINT_ROOT

STAMPS = TUXPAINT_ROOT
DEFAULT_IMAGE = "animals/marsupials/kangaroo.png"  # under the stamps folder


def add_arguments(p) -> None:
    p.add_argument("--out", default="out", help="folder for demo.html and demo.json (default out/)")
    p.add_argument("--bundle", help="bundle (default OUT/default-bundle; exported from the default model if missing)")
    p.add_argument("--index", help="image index (default OUT/tuxpaint-index; built from --stamps if missing)")
    p.add_argument("--stamps", default=STAMPS, help=f"images indexed when the index is missing (default {STAMPS})")
    p.add_argument("--image", help=f"the input image of the session (default STAMPS/{DEFAULT_IMAGE}, "
                   "else the first indexed image)")
    p.add_argument("--subject", help="what the first request asks a picture of (default: the input image's file name)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--min-word-tokens", type=int, default=2, help="[RET] is banned for the first N tokens")
    p.add_argument("--ret-scale-factor", type=float, default=1.0)
    p.add_argument("--max-rets", type=int, default=1, help="[RET]s allowed per answer (0 = no limit)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or tensorrt (ONNX Runtime execution provider)")
    from .options import add_engine_argument
    add_engine_argument(p)
    p.add_argument("--threads", type=int)
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle files")
    p.add_argument("--open-html", action="store_true", help="open the page in a web browser at the end")


# ---- the scripted session ----------------------------------------------------------------
@dataclass
class Turn:
    parts: list                 # user parts: text and ImagePart, in order
    qa: bool = True             # prompt as "Q: ...\nA:" (else the text is continued as is)
    force_ret: bool = False     # always show a retrieved image (appending [RET] if the model did not)


@dataclass
class Conversation:
    heading: str
    turns: list = field(default_factory=list)


def _a(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def default_session(image: str, subject: str) -> list[Conversation]:
    from fromage.runtime.prompt import ImagePart
    return [
        Conversation("1 · Text in, text and a retrieved image out",
                     [Turn([f"Show me a picture of {_a(subject)}."], force_ret=True)]),
        Conversation("2 · An image in, text out", [Turn([ImagePart(image), "This is a picture of"], qa=False)]),
        Conversation("3 · Dialogue: the second turn refers back to the first",
                     [Turn([ImagePart(image), "What is this?"]),
                      Turn(["Show me a picture of one."], force_ret=True)]),
    ]


class _Printer:
    def __init__(self):
        self.col0 = True

    def write(self, text: str) -> None:
        if text:
            print(text, end="", flush=True)
            self.col0 = text.endswith("\n")

    def line(self, text: str) -> None:
        if not self.col0:
            print()
        print(text, flush=True)
        self.col0 = True


def _answer(model, prompt: list, params, force_ret: bool, out: _Printer) -> list[dict]:
    """Runs one model turn (it ends at the chat format's stops); streams it to stdout; -> the answer's
    parts (Result.parts dicts, from its first non-blank character, trailing blanks cut)."""
    from fromage.runtime.chat import AnswerStart, answer_parts
    from fromage.runtime.generate import ImageEvent, Result, TextEvent
    result, shown = Result(), AnswerStart()
    out.write("model: ")
    for event in model.stream(prompt, params, result):
        if isinstance(event, ImageEvent):
            part = result.parts[-1]
            out.line(f"[image: {part['path']} ({part['score']:.3f})]")
        elif isinstance(event, TextEvent):
            out.write(shown(event.text))
    parts = answer_parts(result.parts)
    if parts and parts[-1]["type"] == "text":
        parts[-1]["text"] = parts[-1]["text"].rstrip()
        if not parts[-1]["text"]:
            parts.pop()
    if force_ret and not any(p["type"] == "image" for p in parts):
        part = _forced_retrieval(model, prompt, parts, params)
        if part is not None:
            parts.append(part)
            out.line(f"[image: {part['path']} ({part['score']:.3f})] (forced: the model did not emit [RET]; "
                     "[RET] was appended at the end of its answer)")
    if not parts:
        out.write("(no answer)")
    out.line("")
    return parts


def _forced_retrieval(model, prompt: list, answer: list[dict], params) -> dict | None:
    """[RET] appended after the prompt and the answer so far: the query the model would have made
    had it emitted [RET] there (the layout of `runtime.scoring.ret_embeddings`)."""
    from fromage.runtime.scoring import ret_embedding_of_parts
    context = list(prompt) + _as_context(answer, newline=False)
    try:
        query = ret_embedding_of_parts(model, context)
    except FromageError as e:  # e.g. the context is full
        print(f"(no forced retrieval: {e})", flush=True)
        return None
    from fromage.runtime.generate import image_part
    return image_part(model.index.search(query, top_k=max(1, params.top_images)), forced=True)


def _as_context(answer: list[dict], newline: bool = True) -> list:
    """An answer's parts as prompt parts (retrieved images become image inputs)."""
    from fromage.runtime.chat import answer_turn
    from fromage.runtime.prompt import ImagePart
    parts = [p["text"] if p["type"] == "text" else ImagePart(p["path"]) for p in answer]
    return answer_turn(parts) if newline else parts


def _user_json(parts: list) -> list:
    from fromage.runtime.prompt import ImagePart
    return [{"type": "image", "path": str(p.source)} if isinstance(p, ImagePart) else p for p in parts]


def run_session(model, session: list[Conversation], params) -> list[dict]:
    """Runs the conversations; -> the turns (see `tools/html.py`), streaming a transcript to stdout."""
    from fromage.runtime.chat import user_turn
    from fromage.runtime.prompt import ImagePart
    out, turns = _Printer(), []
    for conv in session:
        out.line(f"== {conv.heading}")
        context: list = []
        for i, turn in enumerate(conv.turns):
            shown = " ".join(f"[image: {p.source}]" if isinstance(p, ImagePart) else p for p in turn.parts)
            out.line(f"user: {shown}")
            entry = {"role": "user", "parts": _user_json(turn.parts)}
            if i == 0:
                entry["heading"] = conv.heading
            turns.append(entry)
            prompt = context + (user_turn(turn.parts) if turn.qa else list(turn.parts))
            answer = _answer(model, prompt, params, turn.force_ret, out)
            turns.append({"role": "model", "parts": answer})
            context = prompt + _as_context(answer)
    return turns


# ---- setup: bundle, index, input image -----------------------------------------------------
SHIPPED_CHECKPOINT = Path(__file__).resolve().parents[1] / "training" / "default" / "learned.safetensors"


def ensure_bundle(bundle: Path, managed: bool) -> None:
    """Exports the default model if there is no bundle; re-exports the demo's own bundle (`managed`)
    when it was built from another checkpoint than the shipped one (e.g. after an update)."""
    cmd = [sys.executable, "-m", "fromage.tools.cli", "export", "--default", "--out", str(bundle)]
    manifest = bundle / "manifest.json"
    if manifest.is_file():
        if not managed or not SHIPPED_CHECKPOINT.is_file():
            return
        from fromage.runtime.files import sha256_file
        try:
            built_from = json.loads(manifest.read_text())["model"].get("checkpoint_sha256")
        except (ValueError, KeyError, AttributeError):
            built_from = None  # unreadable: re-exported like a stale one
        if built_from == sha256_file(SHIPPED_CHECKPOINT):
            return
        print(f"== the bundle at {bundle} was built from another checkpoint than the shipped default: "
              "re-exporting it with `fromage export --default` (about a minute)", flush=True)
        cmd.append("--overwrite")
    else:
        print(f"== no bundle at {bundle}: exporting the embedded default model (SmolLM2-135M-Instruct + "
              "EfficientNet-Lite0) with `fromage export --default`; this needs the training stack and takes "
              "about a minute, once", flush=True)
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    code = subprocess.call(cmd, env=env)
    if code != 0 or not (bundle / "manifest.json").is_file():
        raise FromageError(f"`fromage export --default --out {bundle}` failed (exit {code}); see its messages "
                           "above (it needs the training stack: pip install 'fromage[train]')")


def ensure_index(index: Path, bundle, stamps: str, managed: bool, threads: int | None):
    """Builds the index if it is missing or unfinished (resuming); rebuilds the demo's own index
    (`managed`) when it belongs to another bundle, e.g. after the default bundle was replaced."""
    from fromage.runtime.retrieval import META
    meta = None
    try:
        meta = json.loads((index / META).read_text())
    except (OSError, ValueError):
        pass
    overwrite = False
    if isinstance(meta, dict) and meta.get("complete") is True:
        if meta.get("embedder") == bundle.vision_fingerprint:
            return
        if not managed:
            return  # opening it reports the mismatch with its fix
        print(f"== the index at {index} was built with another bundle's image encoder: rebuilding it", flush=True)
        overwrite = True
    if not Path(stamps).exists():
        raise FromageError(f"no index at {index}, and nothing to build it from at {stamps}: install the TuxPaint "
                           "stamps (apt-get install tuxpaint-stamps-default), or give --stamps DIR or --index")
    print(f"== indexing the images under {stamps} into {index} (`fromage index build`; once)", flush=True)
    from fromage.runtime.index_build import index_images
    built = index_images(bundle, stamps, index, overwrite=overwrite, threads=threads)
    print(f"index of {built.count} images written to {index}", flush=True)
    built.close()


def pick_image(args, model) -> str:
    if args.image:
        if not Path(args.image).is_file():
            raise FromageError(f"--image {args.image}: no such file")
        return str(Path(args.image).resolve())
    default = Path(args.stamps) / DEFAULT_IMAGE
    if default.is_file():
        return str(default.resolve())
    first = model.index.first_path()
    if first is None:
        raise FromageError("the index holds no images; give --image PATH")
    return first


def cmd_demo(args) -> None:
    from fromage.runtime.bundle_reader import load_bundle
    from fromage.runtime.generate import Fromage
    from fromage.runtime.files import write_atomic
    from .html import write_conversation
    from fromage.runtime.chat import ANSWER_STOPS
    from fromage.runtime.sampling import SamplingParams
    out = Path(args.out)
    bundle = Path(args.bundle) if args.bundle else out / "default-bundle"
    index = Path(args.index) if args.index else out / "tuxpaint-index"
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0,  # checked before any work
                            min_word_tokens=args.min_word_tokens, ret_scale_factor=args.ret_scale_factor,
                            max_rets=args.max_rets, stop=ANSWER_STOPS)
    ensure_bundle(bundle, managed=args.bundle is None)
    loaded = load_bundle(bundle, verify=not args.no_verify)  # checked once, used for the index and the model
    ensure_index(index, loaded, args.stamps, managed=args.index is None, threads=args.threads)
    model = Fromage(loaded, index=index, device=args.device, threads=args.threads, engine=args.engine)
    image = pick_image(args, model)
    subject = args.subject or Path(image).stem.replace("_", " ").replace("-", " ")
    turns = run_session(model, default_session(image, subject), params)

    m = model.bundle.model
    title = "FROMAGe demo"
    subtitle = (f"bundle {bundle.resolve()} ({m.get('lm')} LM, {m.get('encoder', {}).get('type')} encoder, "
                f"k={m.get('k')}) · index {index.resolve()} ({model.index.count} images) · greedy, "
                f"≤{args.max_new_tokens} new tokens")
    html_path = write_conversation(out / "demo.html", turns, title, subtitle)
    doc = {"title": title, "bundle": str(bundle.resolve()), "index": str(index.resolve()),
           "sampling": {"max_new_tokens": params.max_new_tokens, "temperature": 0.0,
                        "min_word_tokens": params.min_word_tokens, "ret_scale_factor": params.ret_scale_factor,
                        "max_rets": params.max_rets},
           "turns": turns}
    write_atomic(out / "demo.json", json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
    print(f"JSON: {(out / 'demo.json').resolve()}")
    page = str(html_path.resolve())
    if args.open_html:
        import webbrowser
        webbrowser.open(Path(page).as_uri())
    print(page, flush=True)
