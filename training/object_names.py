""""Names the object": whether a generated caption names the object of an image, judged from the image's
reference caption. Torch-free (used by `fromage eval` and by training's validation).

The object's word is the head noun of the caption's first phrase: the text before the first sentence
mark, dash, comma or colon, cut at the first word that ends a noun phrase (a preposition or a verb:
"A spider dancing with a fly" -> "spider"), its last word ("A blue fedora" -> "fedora"); after a
partitive ("A quarter of pizza") the word after "of". A caption can name its object explicitly instead
("objects"). A generated caption names the object when it contains that word or one of its synonyms
(whole words, case-insensitive, a plural "s"/"es" allowed). The word lists are data:
object_words.json."""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

DATA = Path(__file__).with_name("object_words.json")
CAPTION_TOKENS = 24  # the greedy caption judged: at most this many tokens (fromage eval and training's validation)


@lru_cache(maxsize=1)
def _data() -> dict:
    d = json.loads(DATA.read_text(encoding="utf-8"))
    return {"ends": frozenset(d["phrase_ends"]), "partitives": frozenset(d["partitives"]),
            "skip": frozenset(d["skip"]), "objects": d["objects"],
            "synonyms": {k: list(v) for k, v in d["synonyms"].items()}}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:['’-][a-z0-9]+)*", text.lower())


def object_word(caption: str) -> str:
    """The word that names a caption's object (see the module docstring)."""
    d = _data()
    if caption.strip() in d["objects"]:
        return d["objects"][caption.strip()]
    first = re.split(r"[.!?;:,—–]|\s-\s", caption.replace("“", "").replace("”", "").strip(), maxsplit=1)[0]
    words = _words(first) or _words(caption)
    phrase = []
    for i, w in enumerate(words):
        if i > 0 and w in d["ends"]:
            if w == "of" and phrase and phrase[-1] in d["partitives"]:
                rest = []
                for x in words[i + 1:]:
                    if x in d["ends"]:
                        break
                    if x not in d["skip"]:
                        rest.append(x)
                if rest:
                    return rest[-1]
            break
        phrase.append(w)
    phrase = [w for w in phrase if w not in d["skip"]] or words
    return phrase[-1] if phrase else ""


def accepted_words(caption: str) -> list[str]:
    word = object_word(caption)
    return [word] + _data()["synonyms"].get(word, [])


def names_object(caption: str, generated: str, synonyms: bool = True) -> bool:
    """Whether `generated` names the object of the image whose reference caption is `caption`."""
    text = " ".join(_words(generated))
    for w in (accepted_words(caption) if synonyms else [object_word(caption)]):
        if w and re.search(rf"(?<![a-z0-9]){re.escape(w.lower())}(?:s|es)?(?![a-z0-9])", text):
            return True
    return False


def names_share(pairs, synonyms: bool = True) -> float:
    """Percent of (reference caption, generated caption) pairs whose generated caption names the object."""
    pairs = list(pairs)
    return 100.0 * sum(names_object(c, g, synonyms) for c, g in pairs) / max(1, len(pairs))
