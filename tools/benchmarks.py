"""The paper's benchmarks: Visual Storytelling (VIST)
contextual image retrieval and Visual Dialog (VisDial v1.0) text->image retrieval and answer ranking.

VIST (story-in-sequence JSON, `annotations`: a list of one-element lists of
{story_id, worker_arranged_photo_order, photo_flickr_id, text, original_text}; images
`<photo_flickr_id>.jpg|jpeg|png` in one folder). For each 5-image story, retrieve its last image from
(a) the last caption, (b) the 5 captions, (c) the 5 captions interleaved with the first 4 images
(`c1 <img1> c2 <img2> c3 <img3> c4 <img4> c5 [RET]`, the reference's order), each followed by [RET].
Candidates: the distinct last images of all stories (or every story image); the story's own first
4 images are excluded from its candidates, as in the reference. Stories with a missing or unreadable
image are skipped (counted).

VisDial (`data.dialogs[]` {image_id, caption, dialog[] {question, answer, answer_options, gt_index}},
`data.questions[]`, `data.answers[]`; images `VisualDialog_<split>_<12-digit id>.jpg` or `<id>.jpg`;
dense annotations [{image_id, round_id (1-based), gt_relevance}]).
- t2i: `caption. Q: q1? A: a1. ... Q: q10? A: a10. [RET]` against all dialog images.
  (The reference's script scores image rows against text columns, i.e. image->text; this is text->image.)
- it2t: rank a round's answer options by log-likelihood of `" " + answer` given
  `<img> caption\\nQ: q1?\\nA: a1\\n...Q: qr?\\nA:`. Rounds: the last (default), the densely annotated
  one, or all (the reference's protocol, 10x the cost). NDCG (VisDial's: over the top-|relevant| ranks)
  on the scored rounds that have dense annotations; round_id is 1-based (the reference used it as 0-based).
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from fromage.runtime.errors import FromageError
from fromage.runtime.metrics import mean_reciprocal_rank, ndcg, random_mrr, random_recall, recall_at_k
from fromage.runtime.prompt import ImagePart

IMAGE_EXTS = (".jpg", ".jpeg", ".png")


# ---- shared helpers --------------------------------------------------------------------------
def _load_json(path, what: str):
    path = Path(path)
    if not path.is_file():
        raise FromageError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise FromageError(f"{path} is not valid JSON: {e}") from None


def _find_image(folder: Path, names: list[str]) -> str | None:
    for name in names:
        for ext in IMAGE_EXTS:
            p = folder / f"{name}{ext}"
            if p.is_file():
                return str(p)
    return None


def embed_images(model, paths: list[str], batch_size: int = 16) -> dict:
    """path -> (visual tokens (k, E), retrieval embedding (R,)) for the images that load; the rest
    are reported on stderr and left out."""
    out = {}
    paths = list(dict.fromkeys(paths))
    for i in range(0, len(paths), batch_size):
        batch = paths[i:i + batch_size]
        try:
            tokens, emb = model.encode_images(batch)
            out.update((p, (t, e)) for p, t, e in zip(batch, tokens, emb))
            continue
        except FromageError:
            pass
        for p in batch:  # one bad image spoils its batch: retry one by one
            try:
                tokens, emb = model.encode_images([p])
                out[p] = (tokens[0], emb[0])
            except FromageError as e:
                print(f"fromage: skipping image {p}: {e}", file=sys.stderr)
    return out


# ---- VIST ------------------------------------------------------------------------------------
def read_vist(sis_json, image_dir) -> tuple[list[dict], int]:
    """-> (stories [{story_id, captions (5), photos (5 ids), images (5 paths)}] in file order,
    number of 5-image stories skipped for a missing image)."""
    data = _load_json(sis_json, "VIST story-in-sequence")
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FromageError(f"VIST image folder not found: {image_dir}")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise FromageError(f"{sis_json}: not a VIST story-in-sequence file (no 'annotations' list)")
    stories = defaultdict(list)
    for i, ann in enumerate(data["annotations"]):
        ann = ann[0] if isinstance(ann, list) and len(ann) == 1 else ann
        try:
            text = ann.get("text") if ann.get("text") is not None else ann["original_text"]
            stories[str(ann["story_id"])].append(
                (int(ann["worker_arranged_photo_order"]), str(ann["photo_flickr_id"]), str(text)))
        except (AttributeError, KeyError, TypeError, ValueError):
            raise FromageError(f"{sis_json}: annotation {i} lacks story_id, worker_arranged_photo_order, "
                               "photo_flickr_id or text") from None
    out, skipped = [], 0
    for sid, items in stories.items():
        if len(items) != 5:
            continue  # VIST stories are 5 images long; anything else is not a story of the benchmark
        items.sort()
        images = [_find_image(image_dir, [photo]) for _, photo, _ in items]
        if None in images:
            skipped += 1
            continue
        out.append({"story_id": sid, "captions": [t for *_, t in items],
                    "photos": [p for _, p, _ in items], "images": images})
    if not out:
        raise FromageError(f"{sis_json}: no complete 5-image story with all images under {image_dir}")
    return out, skipped


VIST_SETTINGS = ("1_caption", "5_captions", "5_captions_4_images")


def vist_context(story: dict, setting: str) -> list:
    caps, imgs = story["captions"], story["images"]
    if setting == "1_caption":
        return [caps[-1]]
    if setting == "5_captions":
        return [" ".join(caps)]
    if setting == "5_captions_4_images":
        parts = []
        for c, img in zip(caps[:-1], imgs[:-1]):
            parts += [c, ImagePart(img)]
        return parts + [caps[-1]]
    raise FromageError(f"unknown VIST setting {setting!r}; choose from {VIST_SETTINGS}")


def eval_vist(model, stories: list[dict], candidates: str = "last", settings=VIST_SETTINGS, progress=True) -> dict:
    from tqdm import tqdm
    from fromage.runtime.scoring import ret_embedding_of_parts
    if candidates not in ("last", "all"):
        raise FromageError("candidates must be 'last' or 'all'")
    embedded = embed_images(model, [p for s in stories for p in s["images"]])
    stories = [s for s in stories if all(p in embedded for p in s["images"])]
    if not stories:
        raise FromageError("no VIST story has all its images readable")
    pool = [s["photos"][-1] for s in stories] if candidates == "last" else [p for s in stories for p in s["photos"]]
    photo_path = {ph: p for s in stories for ph, p in zip(s["photos"], s["images"])}
    cand_ids = list(dict.fromkeys(pool))
    col = {ph: j for j, ph in enumerate(cand_ids)}
    cand = np.stack([embedded[photo_path[ph]][1] for ph in cand_ids])
    gt = np.array([col[s["photos"][-1]] for s in stories])
    result = {"stories": len(stories), "candidates": len(cand_ids)}
    for setting in settings:
        visual = {p: v[0] for p, v in embedded.items()}
        queries = np.stack([ret_embedding_of_parts(model, vist_context(s, setting), visual)
                            for s in tqdm(stories, desc=f"VIST {setting}", disable=not progress)])
        scores = queries.astype(np.float64) @ cand.T.astype(np.float64)
        for i, s in enumerate(stories):  # never retrieve the story's own earlier images
            for ph in s["photos"][:-1]:
                if ph in col and col[ph] != gt[i]:
                    scores[i, col[ph]] = -np.inf
        result[setting] = recall_at_k(scores, gt)
    result["random"] = random_recall(len(cand_ids))
    return result


# ---- VisDial ---------------------------------------------------------------------------------
def read_visdial(dialogs_json, image_dir, dense_json=None) -> tuple[list[dict], int]:
    """-> (dialogs [{image_id, image, caption, rounds [{question, answer, options, gt}], dense}], skipped)."""
    data = _load_json(dialogs_json, "VisDial")
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FromageError(f"VisDial image folder not found: {image_dir}")
    try:
        body = data["data"]
        questions, answers, dialogs = body["questions"], body["answers"], body["dialogs"]
        split = str(data.get("split", "val2018"))
    except (KeyError, TypeError):
        raise FromageError(f"{dialogs_json}: not a VisDial v1.0 file (expected data.dialogs, "
                           "data.questions, data.answers)") from None
    dense = {}
    if dense_json is not None:
        rows = _load_json(dense_json, "VisDial dense annotations")
        try:
            dense = {int(r["image_id"]): (int(r["round_id"]), list(map(float, r["gt_relevance"]))) for r in rows}
        except (KeyError, TypeError, ValueError):
            raise FromageError(f"{dense_json}: expected a list of {{image_id, round_id, gt_relevance}}") from None
    out, skipped = [], 0
    for i, d in enumerate(dialogs):
        try:
            image_id = int(d["image_id"])
            rounds = []
            for r in d["dialog"]:
                options = [answers[j] for j in r.get("answer_options", [])]
                answer = answers[r["answer"]] if "answer" in r else None
                gt = r.get("gt_index")
                if gt is None and answer is not None and r.get("answer_options"):
                    gt = r["answer_options"].index(r["answer"]) if r["answer"] in r["answer_options"] else None
                rounds.append({"question": questions[r["question"]], "answer": answer, "options": options,
                               "gt": None if gt is None else int(gt)})
            caption = str(d["caption"])
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise FromageError(f"{dialogs_json}: dialog {i} is malformed ({type(e).__name__}: {e})") from None
        image = _find_image(image_dir, [f"VisualDialog_{split}_{image_id:012d}", f"VisualDialog_val2018_{image_id:012d}",
                                        f"{image_id:012d}", str(image_id)])
        if image is None:
            skipped += 1
            continue
        item = {"image_id": image_id, "image": image, "caption": caption, "rounds": rounds, "dense": None}
        if image_id in dense:
            round_id, rel = dense[image_id]
            if not 1 <= round_id <= len(rounds) or len(rel) != len(rounds[round_id - 1]["options"]):
                raise FromageError(f"{dense_json}: image {image_id}: round_id {round_id} or its "
                                   f"{len(rel)} relevances do not match the dialog")
            item["dense"] = (round_id, rel)
        out.append(item)
    if not out:
        raise FromageError(f"{dialogs_json}: no dialog has its image under {image_dir}")
    return out, skipped


def visdial_t2i_text(d: dict) -> str:
    qa = " ".join(f"Q: {r['question']}? A: {r['answer']}." for r in d["rounds"] if r["answer"] is not None)
    return f"{d['caption']}. {qa}".strip()


def visdial_it2t_context(d: dict, r: int) -> tuple[str, list[str]]:
    """-> (text after the image for round r (0-based), candidate continuations)."""
    lines = [d["caption"]] + [f"Q: {x['question']}?\nA: {x['answer']}" for x in d["rounds"][:r]]
    text = "\n".join(lines) + f"\nQ: {d['rounds'][r]['question']}?\nA:"
    return text, [" " + o for o in d["rounds"][r]["options"]]


def _rounds_to_score(d: dict, which: str) -> list[int]:
    if which == "last":
        return [len(d["rounds"]) - 1]
    if which == "dense":
        return [d["dense"][0] - 1] if d["dense"] else []
    if which == "all":
        return list(range(len(d["rounds"])))
    raise FromageError("rounds must be 'last', 'dense' or 'all'")


def eval_visdial(model, dialogs: list[dict], rounds: str = "last", t2i: bool = True, it2t: bool = True,
                 progress=True) -> dict:
    from tqdm import tqdm
    from fromage.runtime.scoring import log_likelihood, ret_embedding_of_parts
    embedded = embed_images(model, [d["image"] for d in dialogs])
    dialogs = [d for d in dialogs if d["image"] in embedded]
    if not dialogs:
        raise FromageError("no VisDial image could be read")
    result = {"dialogs": len(dialogs)}
    if t2i:
        q = np.stack([ret_embedding_of_parts(model, [visdial_t2i_text(d)])
                      for d in tqdm(dialogs, desc="VisDial t2i", disable=not progress)])
        cand = np.stack([embedded[d["image"]][1] for d in dialogs])
        result["t2i"] = {**recall_at_k(q.astype(np.float64) @ cand.T.astype(np.float64), np.arange(len(dialogs))),
                         "candidates": len(dialogs)}
        result["random_t2i"] = random_recall(len(dialogs))
    if it2t:
        if rounds == "dense" and not any(d["dense"] for d in dialogs):
            raise FromageError("--rounds dense needs the dense annotations file")
        rows, gts, ndcgs, n_options = [], [], [], set()
        visual = {p: v[0] for p, v in embedded.items()}
        for d in tqdm(dialogs, desc="VisDial it2t", disable=not progress):
            for r in _rounds_to_score(d, rounds):
                rd = d["rounds"][r]
                if rd["gt"] is None or not rd["options"]:
                    continue
                text, cands = visdial_it2t_context(d, r)
                ll = log_likelihood(model, [ImagePart(d["image"]), text], cands, visual=visual)
                rows.append(ll), gts.append(rd["gt"]), n_options.add(len(cands))
                if d["dense"] and d["dense"][0] - 1 == r:
                    ndcgs.append(ndcg(ll, d["dense"][1]))
        if not rows:
            raise FromageError("no VisDial round with answer options and a known right answer to score")
        if len(n_options) != 1:
            raise FromageError(f"rounds have different numbers of answer options: {sorted(n_options)}")
        scores, gt = np.asarray(rows), np.asarray(gts)
        result["it2t"] = {**recall_at_k(scores, gt), "MRR": 100 * mean_reciprocal_rank(scores, gt),
                          "NDCG": 100 * float(np.mean(ndcgs)) if ndcgs else None,
                          "rounds": len(rows), "ndcg_rounds": len(ndcgs), "options": n_options.pop()}
        n = result["it2t"]["options"]
        result["random_it2t"] = {**random_recall(n), "MRR": 100 * random_mrr(n)}
    return result
