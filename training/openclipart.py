"""Captions for the Open Clip Art Library PNGs (Debian package openclipart-png), cleaned from file
names: artist signatures cut, Italian (and some French/Spanish) words translated, folders as categories.
The word lists are data (openclipart_words.json); this module is the reader."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from fromage.runtime.errors import FromageError
from fromage.runtime.sources import Example

OPENCLIPART_ROOT = "/usr/share/openclipart/png"


def _load_words() -> dict:
    with open(Path(__file__).with_name("openclipart_words.json"), encoding="utf-8") as f:
        d = json.load(f)
    return {k: (v if k == "known_artists" else frozenset(v) if isinstance(v, list) else v)
            for k, v in d.items() if k != "about"}


_W = _load_words()
_OC_KNOWN_ARTISTS = tuple(_W["known_artists"])
_OC_GIVEN_NAMES = _W["given_names"]
_OC_COMMON_WORDS = _W["common_words"]
_OC_PHRASES = _W["phrases"]
_OC_WORDS = _W["words"]
_OC_GENERIC_DIRS = _W["generic_dirs"]
_OC_DIR_PHRASES = _W["dir_phrases"]
_OC_CONNECTORS = _W["connectors"]
_OC_SHORT_WORDS = _W["short_words"]
_OC_CARD_SUITS = _W["card_suits"]
_OC_CARD_RANKS = _W["card_ranks"]
_OC_TRUNCATED_LEN = 22  # names were cut to 24 characters before the _NN suffix


def _oc_base(stem: str) -> tuple[str, bool, bool]:
    """File stem -> (name without the _NN / _NNr / _r suffix, whether the name looks truncated,
    whether it looks signed: truncated or with such a suffix)."""
    s = re.sub(r"([a-z])([A-Z])", r"\1_\2", stem).lower()  # "MatieresToxiques"
    n = len(s)
    s = re.sub(r"_\d\d[a-z]?$", "", s)
    if len(s) >= 18:
        s = re.sub(r"_[rx]$", "", s)
    truncated = len(s) >= _OC_TRUNCATED_LEN or s.endswith("_")
    return s, truncated, truncated or len(s) < n


def _oc_tokens(base: str) -> list[str]:
    """Split on non-alphanumerics; digits glued to a word ("tigre03", "ganson1") are variant
    numbers and dropped, unless the word part is tiny ("mp3", "3d" stay)."""
    out = []
    for t in re.split(r"[^a-z0-9]+", base):
        m = re.fullmatch(r"([a-z]{3,})\d+", t)
        if m:
            t = m.group(1)
        if t and not re.fullmatch(r"0x[0-9a-f]+", t):  # "workstation_hash_0x89c79"
            out.append(t)
    return out


def _oc_detect_artists(names) -> frozenset[str]:
    """Document-frequency detection of artist-name tokens. `names` is a list of (top folder,
    tokens). A token is an artist token when it is alphabetic, >= 3 letters, not a common word,
    occurs in >= 3 files spread over >= 3 top-level folders, never starts a name, and sits in
    the last three tokens of >= 90% of the names that contain it (signatures end the names)."""
    files, tops, tail = {}, {}, {}
    for top, toks in names:
        n = len(toks)
        for t in dict.fromkeys(toks):  # each distinct token once, at its first position
            i = toks.index(t)
            files[t] = files.get(t, 0) + 1
            tops.setdefault(t, set()).add(top)
            if i == 0:
                tail[t] = -10 ** 9  # starts a name: a title word
            elif i >= n - 3:
                tail[t] = tail.get(t, 0) + 1
    return frozenset(t for t, nf in files.items()
                     if nf >= 3 and len(tops[t]) >= 3 and len(t) >= 3 and t.isalpha()
                     and t not in _OC_COMMON_WORDS and tail.get(t, 0) >= 0.9 * nf)


@dataclass(frozen=True)
class _OcArtists:
    phrases: dict  # prefix of a first word -> known signatures (token tuples) starting so
    tokens: frozenset  # detected artist tokens
    prefixes: frozenset  # strict prefixes (>= 2 letters) of all artist words

    @classmethod
    def build(cls, tokens):
        phrases = [tuple(a.split()) for a in _OC_KNOWN_ARTISTS]
        by_start: dict = {}
        for p in phrases:
            for k in range(1, len(p[0]) + 1):
                by_start.setdefault(p[0][:k], []).append(p)
        words = set(tokens).union(*phrases)
        return cls(by_start, frozenset(tokens),
                   frozenset(w[:k] for w in words for k in range(2, len(w))))


def _oc_strip_artist(toks: list[str], truncated: bool, artists: _OcArtists,
                     signed: bool = True) -> list[str]:
    """Drop the artist signature that ends a name: the shortest tail made of known artist
    phrases (whole, or cut off inside a word: "architetto_fr"), detected artist tokens, and,
    after one of those, leftover fragments (a prefix of an artist word, a single letter, a
    number: "rollandin_f_s"). A tail that is only a cut-off word ("..._archi") is dropped when
    the name was truncated and the fragment (>= 2 letters) starts an artist word. In a signed
    name, a given name (_OC_GIVEN_NAMES) followed by at most three words also starts the
    signature. "by <artist>" is removed anywhere ("clipart_by_nicu_buculei_-_baloon")."""
    phrases, artist_tokens = artists.phrases, artists.tokens

    def fragment(t, after_artist, last=False):
        if after_artist and (t.isdigit() or len(t) <= 2 or (last and truncated)):
            return True  # "linda_kim_aa", "josu_alcalde_go" (cut off)
        return t in artists.prefixes and (after_artist or truncated)  # "..._archi"

    def leftovers(seq):  # what may follow a signature
        return all(fragment(t, True, j == len(seq) - 1) for j, t in enumerate(seq))

    def artist_len(seq):
        """Length of the longest whole artist phrase/token starting seq (0 if none)."""
        best = 1 if seq and seq[0] in artist_tokens else 0
        for p in phrases.get(seq[0], ()) if seq else ():
            if len(p) > best and tuple(seq[:len(p)]) == p:
                best = len(p)
        return best

    def parses(seq, after_artist):
        if not seq:
            return after_artist
        if after_artist and leftovers(seq):
            return True
        for p in phrases.get(seq[0], ()):
            k = min(len(p), len(seq))
            head, last = seq[k - 1], p[k - 1]
            if tuple(seq[:k - 1]) != p[:k - 1] or not last.startswith(head):
                continue
            if head == last:
                if parses(seq[k:], True):
                    return True
            elif (k > 1 or after_artist or (truncated and len(head) >= 2)) and leftovers(
                    seq[k:]):
                return True  # a signature cut off inside a word, maybe with leftovers
        if seq[0] in artist_tokens and parses(seq[1:], True):
            return True
        return len(seq) == 1 and fragment(seq[0], after_artist)

    i = 0
    while i < len(toks) - 1:  # "by <artist>" anywhere
        n = artist_len(toks[i + 1:]) if toks[i] == "by" else 0
        toks = toks[:i] + toks[i + 1 + n:] if n else toks
        i += 0 if n else 1
    for i in range(len(toks)):
        if parses(toks[i:], False) or (signed and i >= 1 and len(toks) - i <= 4
                                       and toks[i] in _OC_GIVEN_NAMES):
            return toks[:i]
    return toks


_OC_PHRASE_RE = re.compile(r"\b(?:" + "|".join(
    re.escape(p) for p in sorted(_OC_PHRASES, key=len, reverse=True)) + r")\b")


def _oc_translate(toks: list[str]) -> list[str]:
    text = _OC_PHRASE_RE.sub(lambda m: _OC_PHRASES[m.group(0)], " ".join(toks))
    return " ".join(_OC_WORDS.get(t, t) for t in text.split()).split()


def _oc_title(toks: list[str]) -> str | None:
    """Title words -> English-ish text, or None when nothing meaningful is left."""
    toks = [t for t in toks if not (t.isdigit() and t.startswith("0"))
            and not (len(t) == 1 and t.isalpha() and t != "a")]  # "led_rectangular_h_black"
    while toks and toks[-1].isdigit():
        toks = toks[:-1]
    toks = _oc_translate(toks)
    out = [t for i, t in enumerate(toks) if i == 0 or t != toks[i - 1]]  # "gatto cat" -> "cat"
    while out and out[-1] in _OC_CONNECTORS:
        out.pop()
    while out and out[0] in _OC_CONNECTORS - {"a", "an", "the"}:
        out.pop(0)
    if not any(sum(c.isalpha() for c in t) >= 3 or t in _OC_SHORT_WORDS for t in out
               if t not in _OC_CONNECTORS):
        return None
    return " ".join(out)


def _oc_special(parts: list[str], base: str) -> str | None:
    """Captions for the two big generated families: star polygons and playing cards."""
    m = re.fullmatch(r"star_(\d+)pt\d+step", base)
    if m:
        return f"a star with {int(m.group(1))} points"
    if "cards" in parts:
        m = re.fullmatch(r"[a-z]+_([cdhs])_(a|[2-9]|10|j|q|k)", base)
        if m:
            return (f"the {_OC_CARD_RANKS[m.group(2)]} of {_OC_CARD_SUITS[m.group(1)]} "
                    "playing card")
        m = re.fullmatch(r"[a-z]+_jk_([br])", base)
        if m:
            return f"a {'black' if m.group(1) == 'b' else 'red'} joker playing card"
        if re.fullmatch(r"back\d*", base):
            return "the back of a playing card"
    return None


def _oc_category(parts: list[str]) -> str | None:
    """The most specific informative folder name, as words ("big_cats" -> "big cats")."""
    if "flags" in parts and "semaphore" not in parts:
        return "flags"
    for p in reversed(parts):
        if p.lower() in _OC_GENERIC_DIRS:
            continue
        return _OC_DIR_PHRASES.get(p, re.sub(r"[_\-]+", " ", p).lower())
    return None


def _oc_singular(w: str) -> str:
    return w[:-1] if w.endswith("s") and len(w) > 3 else w


def _oc_caption(parts, stem, artists: _OcArtists) -> str | None:
    base, truncated, signed = _oc_base(stem)
    category = _oc_category(parts)
    title = _oc_special(parts, stem.lower())  # the raw stem: "simple_h_10" ends in a rank
    if title is None:
        toks = _oc_tokens(base)
        kept = _oc_strip_artist(toks, truncated, artists, signed)
        title = _oc_title(kept)
        if title and category == "flags" and len(kept) == len(toks) and "flag" not in title:
            return f"A clip-art drawing of the flag of {title}."  # unsigned country flags
    if title is None:
        if category is None:
            return None
        return f"A clip-art drawing of {category}."
    if category and not ({_oc_singular(w) for w in category.lower().split()}
                         & {_oc_singular(w) for w in title.split()}):
        return f"A clip-art drawing of {title}, from the {category} category."
    return f"A clip-art drawing of {title}."


def read_openclipart(root=OPENCLIPART_ROOT) -> list[Example]:
    """Clip art from the openclipart-png package, captioned from the file and folder names.

    The package stores ~8,100 PNGs (6,900 distinct files, the rest symlinks) in category
    folders (animals/birds/...), named
    `<title>_<artist>` cut to 24 characters plus a `_NN` suffix, e.g.
    `acquila_architetto_franc_01.png`. Captions are built like this:

    - Symlinked duplicates (the package links one image into several folders) are read once,
      under the real file's path; broken links are ignored.
    - The `_NN`, `_NNr`, `_r`/`_x` suffixes and glued variant digits ("tigre03") are dropped.
    - Artist signatures are removed from the end of the name: known names (_OC_KNOWN_ARTISTS,
      in any truncated form: "architetto_fr", "sergio_luiz_ara") plus tokens detected by
      document frequency (_oc_detect_artists: words that end names across >= 3 unrelated
      top-level folders and never start one), with cut-off fragments of those ("archi", "fra").
    - Leading-zero and trailing numbers and dangling connectors ("of", "with") are dropped,
      frequent Italian title words are translated (_OC_PHRASES, _OC_WORDS), repeated words of
      bilingual titles ("gatto_cat") are merged, single letters other than "a" are dropped.
    - Star polygons (`star_95pt06step`) and playing cards (`simple_h_9`) get generated titles;
      unsigned names in flags/ become "the flag of X".
    - A title needs a word of >= 3 letters (or tv, cd, ...); otherwise the caption falls back to
      the most specific informative folder name ("A clip-art drawing of stick figures."), and
      the image is skipped when there is none (unsorted/).
    - The caption is "A clip-art drawing of <title>.", with ", from the <folder> category"
      added when no folder word (singular or plural) is already in the title.
    Returns examples sorted by image path."""
    root = Path(root)
    if not root.is_dir():
        raise FromageError(f"Open Clip Art images not found at {root}; install them with "
                           "`apt-get install openclipart-png` or pass another root")
    by_real: dict[str, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.lower().endswith(".png"):
                continue
            path = os.path.abspath(os.path.join(dirpath, name))
            if not os.path.isfile(path):
                continue  # broken symlink
            by_real.setdefault(os.path.realpath(path), []).append(path)

    # one path per image: the real file when it lies under root, else the first link to it
    chosen = sorted(next((p for p in paths if not os.path.islink(p)), paths[0])
                    for paths in by_real.values())
    rel_parts = [Path(os.path.relpath(path, root)).parts for path in chosen]
    names = []
    for parts in rel_parts:
        top = parts[0] if len(parts) > 1 else ""
        names.append((top, _oc_tokens(_oc_base(os.path.splitext(parts[-1])[0])[0])))
    artists = _OcArtists.build(_oc_detect_artists(names))
    examples = []
    for path, parts in zip(chosen, rel_parts):
        caption = _oc_caption(list(parts[:-1]), os.path.splitext(parts[-1])[0], artists)
        if caption:
            examples.append(Example(path, caption))
    return examples
