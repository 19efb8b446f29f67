import os
import re

import pytest

from fromage.runtime.errors import FromageError
from fromage.runtime.sources import Example
from fromage.training.openclipart import read_openclipart

REAL_ROOT = "/usr/share/openclipart/png"

# Names in the package's style: "<title>_<artist>" cut to 24 characters, then "_NN".
# "zorbulax quintavalle" is a made-up artist that no hand-made list knows: it must be found by
# document frequency (it ends names in several unrelated top-level folders).
FAKE_FILES = {
    "animals/birds/heron_zorbulax_quintaval_01.png": "heron, from the birds category",
    "animals/bugs/ant_zorbulax_quintavalle_01.png": "ant, from the bugs category",
    "food/fig_zorbulax_quintavalle_02.png": "fig, from the food category",
    "food/beverages/teapot_zorbulax_quintav_01.png": "teapot, from the beverages category",
    "office/cup_zorbulax_quintavalle_01.png": "cup, from the office category",
    "office/watering_can_zorbulax_qu_01.png": "watering can, from the office category",
    "office/old_wooden_table_zorbula_01.png": "old wooden table, from the office category",
    # a known artist, Italian titles, truncated signatures ("architetto_frances", "archi")
    "animals/birds/cigno_architetto_frances_01.png": "swan, from the birds category",
    "animals/birds/acquila_architetto_franc_02.png": "eagle, from the birds category",
    "animals/lucertola_arrotolata_arc_01.png": "lizard curled up, from the animals category",
    "office/lamp_sergio_luiz_araujo__01.png": "lamp, from the office category",
    "office/pinzatrice_rollandin_arc_01.png": "stapler, from the office category",
    # only a signature left: fall back to the folder
    "animals/birds/architetto_francesco_ro_01.png": "birds",
    "people/stickmen/sm_005.png": "stick figures",
    # the category is not repeated when the title already says it
    "animals/birds/blue_bird_01.png": "blue bird",
    # generated families
    "shapes/stars/star_12pt05step.png": "a star with 12 points",
    "recreation/games/cards/simple/simple_h_10.png": "the ten of hearts playing card",
    "signs_and_symbols/flags/europe/albania.png": "the flag of albania",
}
SKIPPED = ["unsorted/ms_01.png", "unsorted/0123_45.png"]  # junk title, nothing in the folder name


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n")  # the reader never decodes the images
    return path


@pytest.fixture
def fake_root(tmp_path):
    root = tmp_path / "png"
    for rel in [*FAKE_FILES, *SKIPPED]:
        touch(root / rel)
    (root / "animals" / "notes.txt").write_text("not an image")
    return root


def test_fake_tree_captions(fake_root):
    examples = read_openclipart(fake_root)
    got = {os.path.relpath(e.image, fake_root): e.caption for e in examples}
    want = {rel: f"A clip-art drawing of {title}." for rel, title in FAKE_FILES.items()}
    assert got == want
    assert all(os.path.isabs(e.image) and os.path.isfile(e.image) for e in examples)
    assert [e.image for e in examples] == sorted(e.image for e in examples)
    assert read_openclipart(str(fake_root)) == examples  # deterministic, str root works


def test_symlinked_duplicates_read_once(fake_root):
    target = fake_root / "animals" / "birds" / "cigno_architetto_frances_01.png"
    (fake_root / "science").mkdir()
    os.symlink(os.path.relpath(target, fake_root / "science"),
               fake_root / "science" / "cigno_architetto_frances_01.png")
    os.symlink("does_not_exist.png", fake_root / "science" / "broken_01.png")
    examples = read_openclipart(fake_root)
    assert len(examples) == len(FAKE_FILES)
    assert Example(str(target), "A clip-art drawing of swan, from the birds category.") in examples


def test_missing_root_tells_how_to_install(tmp_path):
    with pytest.raises(FromageError, match="apt-get install openclipart-png"):
        read_openclipart(tmp_path / "nope")


@pytest.mark.skipif(not os.path.isdir(REAL_ROOT),
                    reason=f"{REAL_ROOT} not found (apt-get install openclipart-png)")
def test_real_openclipart():
    examples = read_openclipart(REAL_ROOT)
    assert len(examples) > 6000
    assert len({e.image for e in examples}) == len(examples)
    assert [e.image for e in examples] == sorted(e.image for e in examples)
    for e in examples:
        assert e.caption.startswith("A clip-art drawing of ") and e.caption.endswith(".")
        title = e.caption[len("A clip-art drawing of "):-1]
        assert title.strip() and not re.fullmatch(r"[\d\s]*", title), e
        for artist in ("architetto", "rollandin", "buculei", "ganson", "vasamaa", "juliane"):
            assert artist not in e.caption, e
    captions = {os.path.relpath(e.image, REAL_ROOT): e.caption for e in examples}
    assert captions["animals/birds/acquila_architetto_franc_01.png"] == \
        "A clip-art drawing of eagle, from the birds category."
    assert captions["office/lamp_sergio_luiz_araujo__01.png"] == \
        "A clip-art drawing of lamp, from the office category."
