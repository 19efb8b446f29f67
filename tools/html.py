"""A conversation as one standalone HTML page, laid out like the FROMAGe paper's figures: the
user's prompts (with their input images) in bubbles on the right, the model's answers on the left
with each retrieved image inline where its [RET] was emitted, captioned with its caption and score.

Images are embedded as data URIs (downscaled to at most 256 px), text is escaped, and the page
loads nothing from anywhere else, so the file can be mailed or opened offline.

`turns`: a list of {"role": "user" | "model", "parts": [...]}, optionally with "heading" (a section
title shown before the turn). User parts are text strings or {"type": "image", "path": ...}; model
parts are `Result.parts` dicts ({"type": "text", "text": ...} or {"type": "image", "path": ...,
"score": ..., "caption": ..., "ranked": [...]}, optionally "forced": true when the retrieval was
requested explicitly instead of the model emitting [RET]).
"""
from __future__ import annotations

import base64
import io
from html import escape
from pathlib import Path

from fromage.runtime.files import write_atomic

THUMB_PX = 256

_CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f4f5f7;color:#1f2328;font:15px/1.45 -apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:760px;margin:0 auto;padding:24px 16px 48px}
h1{font-size:22px;margin:0 0 4px}
.sub{color:#667085;font-size:13px;margin:0 0 12px;white-space:pre-wrap}
h2{font-size:13px;font-weight:600;color:#667085;text-transform:uppercase;letter-spacing:.04em;
   margin:28px 0 8px;padding-top:14px;border-top:1px solid #dde1e6}
.turn{display:flex;align-items:flex-end;gap:8px;margin:10px 0}
.turn.user{flex-direction:row-reverse}
.avatar{flex:none;width:32px;height:32px;border-radius:50%;display:flex;align-items:center;justify-content:center;
        font-size:12px;font-weight:700;color:#fff}
.user .avatar{background:#3b6fd8}
.model .avatar{background:#e0a526}
.bubble{max-width:72%;padding:10px 14px;border-radius:18px;overflow-wrap:anywhere}
.user .bubble{background:#3b82f6;color:#fff;border-bottom-right-radius:4px}
.model .bubble{background:#fff;border:1px solid #dde1e6;border-bottom-left-radius:4px}
.text{white-space:pre-wrap}
.empty{color:#98a2b3;font-style:italic}
figure{margin:6px 0;display:block}
figure img{display:block;max-width:100%;max-height:220px;min-width:96px;min-height:96px;object-fit:contain;
           image-rendering:auto;border-radius:10px;
           background:#fff repeating-conic-gradient(#eef0f3 0% 25%,#fff 0% 50%) 50%/16px 16px}
.user figure img{border:2px solid rgba(255,255,255,.6)}
.model figure img{border:1px solid #dde1e6}
figcaption{font-size:12px;color:#667085;margin-top:3px}
.score{font-variant-numeric:tabular-nums;color:#475467}
.badge{display:inline-block;font-size:11px;padding:0 6px;margin-left:4px;border-radius:8px;
       background:#fef3c7;color:#92400e;border:1px solid #fcd34d}
.ranked{display:flex;gap:4px;margin-top:4px}
.ranked img{width:40px;height:40px;min-width:0;min-height:0;max-height:none;border-radius:6px}
.note{color:#667085;font-size:12px;margin-top:28px;padding-top:10px;border-top:1px solid #dde1e6}
.missing{display:inline-block;padding:8px 10px;border:1px dashed #98a2b3;border-radius:8px;font-size:12px}
.path{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:11px}
"""


def image_data_uri(path, max_px: int = THUMB_PX) -> str | None:
    """A downscaled copy of the image as a data URI (PNG if it has transparency, else JPEG); None if unreadable.
    An SVG is rendered as the model sees it (`runtime.preprocess.load_rgb`: bounded, no fetches, on white)."""
    try:
        from fromage.runtime.preprocess import SVG_SUFFIXES, load_rgb
        if Path(str(path)).suffix.lower() in SVG_SUFFIXES:
            im = load_rgb(str(path))
        else:
            from PIL import Image
            with Image.open(path) as im:
                im.load()
                im = im.copy()
    except Exception:  # a missing or unreadable file is shown as a placeholder, never fails the page
        return None
    im.thumbnail((max_px, max_px))
    alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    buf = io.BytesIO()
    if alpha:
        im.convert("RGBA").save(buf, "PNG", optimize=True)
        mime = "image/png"
    else:
        im.convert("RGB").save(buf, "JPEG", quality=85)
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


class _Images:
    """Encodes each image once per page."""

    def __init__(self):
        self._cache: dict[str, str | None] = {}

    def uri(self, path) -> str | None:
        key = str(path)
        if key not in self._cache:
            self._cache[key] = image_data_uri(key)
        return self._cache[key]

    def img(self, path, alt: str = "") -> str:
        uri = self.uri(path)
        name = Path(str(path)).name
        if uri is None:
            return f'<span class="missing">image not readable<br><span class="path">{escape(str(path))}</span></span>'
        return f'<img src="{uri}" alt="{escape(alt or name)}" title="{escape(str(path))}">'


def _fmt_score(score) -> str:
    try:
        return f"{float(score):.3f}"
    except (TypeError, ValueError):
        return ""


def _text_html(text: str) -> str:
    return f'<span class="text">{escape(text)}</span>'


def _user_parts(parts, images: _Images) -> list[str]:
    out = []
    for part in parts:
        if isinstance(part, str):
            if part.strip():
                out.append(_text_html(part.strip()))
        elif isinstance(part, dict) and part.get("type") == "image":
            out.append(f"<figure>{images.img(part['path'])}</figure>")
        elif isinstance(part, dict) and part.get("type") == "text":
            if str(part.get("text", "")).strip():
                out.append(_text_html(str(part["text"]).strip()))
    return out


def _model_parts(parts, images: _Images) -> list[str]:
    out = []
    texts = [i for i, p in enumerate(parts) if isinstance(p, dict) and p.get("type") == "text"]
    for i, part in enumerate(parts):
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text":
            text = str(part.get("text", ""))
            if texts and i == texts[0]:
                text = text.lstrip()
            if texts and i == texts[-1]:
                text = text.rstrip()
            if text:
                out.append(_text_html(text))
        elif part.get("type") == "image":
            label = []
            if part.get("caption"):
                label.append(escape(str(part["caption"])))
            score = _fmt_score(part.get("score"))
            if score:
                label.append(f'<span class="score">score {score}</span>')
            badge = ('<span class="badge" title="the model did not emit [RET]; the retrieval was appended '
                     'at the end of its answer">forced [RET]</span>') if part.get("forced") else ""
            ranked = [r for r in (part.get("ranked") or [])[1:] if isinstance(r, dict) and r.get("path")]
            more = ""
            if ranked:
                more = '<div class="ranked">' + "".join(
                    images.img(r["path"], alt=f"{r.get('caption') or Path(str(r['path'])).name} "
                                              f"({_fmt_score(r.get('score'))})") for r in ranked) + "</div>"
            out.append(f"<figure>{images.img(part['path'], alt=str(part.get('caption') or ''))}"
                       f"<figcaption>{' · '.join(label)}{badge}</figcaption>{more}</figure>")
    return out


def render_conversation(turns, title: str, subtitle: str | None = None) -> str:
    """-> a complete, self-contained HTML document."""
    images = _Images()
    body = []
    for turn in turns:
        if turn.get("heading"):
            body.append(f"<h2>{escape(str(turn['heading']))}</h2>")
        role = "user" if turn.get("role") == "user" else "model"
        parts = turn.get("parts") or []
        inner = _user_parts(parts, images) if role == "user" else _model_parts(parts, images)
        if not inner:
            inner = ['<span class="empty">(no answer)</span>' if role == "model" else '<span class="empty">(empty)</span>']
        who, letter = ("You", "You") if role == "user" else ("FROMAGe", "F")
        body.append(f'<div class="turn {role}"><div class="avatar" title="{who}">{letter}</div>'
                    f'<div class="bubble">{"".join(inner)}</div></div>')
    sub = f'<p class="sub">{escape(subtitle)}</p>' if subtitle else ""
    if any(isinstance(p, dict) and p.get("forced") for t in turns for p in (t.get("parts") or [])):
        body.append('<p class="note"><span class="badge">forced [RET]</span> the model did not emit [RET] in '
                    'that answer; [RET] was appended at the end of the answer and the image it retrieves is '
                    'shown.</p>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(title)}</title><style>{_CSS}</style></head>\n<body><main>"
            f"<h1>{escape(title)}</h1>{sub}\n" + "\n".join(body) + "\n</main></body></html>\n")



def write_conversation(path, turns, title: str, subtitle: str | None = None) -> Path:
    return write_atomic(path, render_conversation(turns, title, subtitle))
