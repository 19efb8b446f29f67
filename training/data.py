"""Caption/image datasets for training: FROMAGe-style TSVs, the TuxPaint stamps, a deterministic
train/held-out split, SVG rendering, and an on-disk cache of frozen image-encoder features.

Torch-free on purpose: `fromage index build` (runtime side) reads TSVs with it."""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fromage.runtime.sources import TUXPAINT_ROOT

from fromage.runtime.errors import FromageError

OPENCLIPART_ROOT = "/usr/share/openclipart/png"


@dataclass(frozen=True)
class Example:
    image: str  # absolute path
    caption: str


def read_tsv(path, image_dir=None, skip_missing: bool = False) -> list[Example]:
    """Read a FROMAGe-style TSV: a header naming the `caption` and `image` columns (any order),
    then one example per line. Relative image paths are resolved against `image_dir`
    (default: the TSV's folder). Missing images raise, or are skipped with a warning."""
    path = Path(path)
    if not path.is_file():
        raise FromageError(f"TSV file not found: {path}")
    base = Path(image_dir) if image_dir is not None else path.parent
    with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a BOM written by spreadsheet tools
        lines = f.read().splitlines()
    if not lines:
        raise FromageError(f"{path} is empty; expected a header line 'caption<TAB>image'")
    header = [h.strip() for h in lines[0].split("\t")]
    for col in ("caption", "image"):
        if col not in header:
            raise FromageError(f"{path}: header has no '{col}' column (found {header}); "
                               "expected a tab-separated header 'caption<TAB>image'")
    ci, ii = header.index("caption"), header.index("image")
    examples, missing = [], []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue  # blank lines (e.g. a trailing one) carry no example
        fields = line.split("\t")
        if len(fields) != len(header):
            raise FromageError(f"{path}:{lineno}: expected {len(header)} tab-separated fields, "
                               f"found {len(fields)}")
        caption, image = fields[ci].strip(), fields[ii].strip()
        if not caption or not image:
            raise FromageError(f"{path}:{lineno}: empty caption or image field")
        full = os.path.abspath(os.path.join(base, image))  # join keeps absolute paths as they are
        if not os.path.isfile(full):
            missing.append(full)
            continue
        examples.append(Example(full, caption))
    if missing:
        msg = (f"{path}: {len(missing)} image file(s) not found (looked under {base}), e.g. "
               + ", ".join(missing[:5]))
        if not skip_missing:
            raise FromageError(msg + "; pass skip_missing=True to drop them")
        warnings.warn(msg + "; skipping them", stacklevel=2)
    return examples


def read_tuxpaint(root=TUXPAINT_ROOT) -> list[Example]:
    """Stamps from the tuxpaint-stamps-default package: each X.png or X.svg with an X.txt whose
    first line is the English caption (later lines are `lang.utf8=...` translations).
    The symbols/ folder (letters, digits, coins) is skipped; PNG wins over SVG."""
    root = Path(root)
    if not root.is_dir():
        raise FromageError(f"TuxPaint stamps not found at {root}; install them with "
                           "`apt-get install tuxpaint-stamps-default` or pass another root")
    examples = []
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root and "symbols" in dirnames:
            dirnames.remove("symbols")
        names = set(filenames)
        for name in filenames:
            stem, ext = os.path.splitext(name)
            if ext != ".txt":
                continue
            image = next((stem + e for e in (".png", ".svg") if stem + e in names), None)
            if image is None:
                continue  # a caption without a stamp image (happens in the real package)
            with open(os.path.join(dirpath, name), encoding="utf-8-sig", errors="replace") as f:
                first = f.readline()
            caption = " ".join(first.split())  # collapses odd/repeated whitespace, strips \r
            if caption:
                examples.append(Example(os.path.abspath(os.path.join(dirpath, image)), caption))
    return sorted(examples, key=lambda e: e.image)


def split_examples(examples, root, heldout_percent: int = 15):
    """Deterministic train/held-out split that needs no stored state.

    An example is held out iff int(md5(rel).hexdigest(), 16) % 100 < heldout_percent, where rel is
    its image path relative to `root` with '/' separators. So the split is the same on every
    machine and run, and an example stays on its side when others are added or removed.
    Returns (train, heldout), each in input order."""
    if not 0 <= heldout_percent <= 100:
        raise FromageError(f"heldout_percent must be between 0 and 100, got {heldout_percent}")
    train, heldout = [], []
    for ex in examples:
        rel = Path(os.path.relpath(ex.image, root)).as_posix()
        bucket = int(hashlib.md5(rel.encode("utf-8")).hexdigest(), 16) % 100
        (heldout if bucket < heldout_percent else train).append(ex)
    return train, heldout


def render_svg(path, size: int = 256):
    """Render an SVG to an RGBA PIL image whose longer side is `size` (aspect ratio kept)."""
    import cairosvg  # training-only dependency
    from PIL import Image

    def render(**kw):
        return Image.open(io.BytesIO(cairosvg.svg2png(url=str(path), **kw))).convert("RGBA")

    try:
        img = render(output_width=size)  # cairosvg scales the height to keep the aspect ratio
        if img.height > size:
            img = render(output_height=size)
    except Exception as e:  # cairosvg raises many types (XML, entities forbidden, cairo errors)
        raise FromageError(f"cannot render SVG {path}: {type(e).__name__}: {e}") from e
    return img


_HASHES: dict[tuple, str] = {}  # (abspath, mtime_ns, size) -> sha256; files are hashed once per process


def file_sha256(path) -> str:
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise FromageError(f"image file not found: {path}") from e
    key = (path, st.st_mtime_ns, st.st_size)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


class FeatureCache:
    """Frozen-encoder image features cached on disk, so only the first epoch runs the encoder.

    Layout: cache_dir/<sha256(encoder_id)[:16]>/<sha[:2]>/<sha>.npy, where sha is the sha256 of the
    image file's bytes: renamed or duplicate files share an entry, and a changed encoder gets a
    fresh folder. Each file is written under a temporary name and moved into place with
    os.replace, so a killed run never leaves a half-written entry."""

    def __init__(self, cache_dir, encoder_id: str):
        self.encoder_id = encoder_id
        self.dir = Path(cache_dir) / hashlib.sha256(encoder_id.encode("utf-8")).hexdigest()[:16]
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "encoder_id.txt").write_text(encoder_id + "\n", encoding="utf-8")  # for humans

    def _file(self, sha: str) -> Path:
        return self.dir / sha[:2] / f"{sha}.npy"

    def _load(self, sha: str):
        try:
            return np.load(self._file(sha))
        except (OSError, ValueError, EOFError):
            return None  # absent or unreadable: recompute it

    def _store(self, sha: str, feat: np.ndarray) -> None:
        final = self._file(sha)
        final.parent.mkdir(exist_ok=True)
        tmp = final.with_name(f"{final.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:  # a file object, because np.save(str) would append ".npy"
            np.save(f, feat)
        os.replace(tmp, final)

    def get_many(self, paths: list[str], compute: Callable[[list[str]], np.ndarray],
                 batch_size: int = 64, progress: bool = True) -> np.ndarray:
        """Features for `paths` as an (n, D) float32 array, calling `compute(batch_paths)` -> (b, D)
        only on images whose content is not cached yet (each distinct content once)."""
        from tqdm import tqdm

        shas = [file_sha256(p) for p in paths]
        found = {}
        todo = {}  # sha -> one path with that content
        for p, sha in zip(paths, shas):
            if sha in found or sha in todo:
                continue
            feat = self._load(sha)
            if feat is None:
                todo[sha] = p
            else:
                found[sha] = feat
        items = list(todo.items())
        with tqdm(total=len(items), desc="caching image features", unit="img",
                  disable=not progress or not items) as bar:
            for i in range(0, len(items), batch_size):
                batch = items[i:i + batch_size]
                feats = np.asarray(compute([p for _, p in batch]), dtype=np.float32)
                if feats.ndim != 2 or feats.shape[0] != len(batch):
                    raise ValueError(f"compute returned shape {feats.shape} for {len(batch)} images")
                for (sha, _), feat in zip(batch, feats):
                    self._store(sha, feat)
                    found[sha] = feat
                bar.update(len(batch))
        if not paths:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([found[sha] for sha in shas]).astype(np.float32, copy=False)


# --- Open Clip Art Library PNGs (Debian package openclipart-png) --------------------------------

# Artist signatures, as they appear in file names (several word orders of the same person).
# read_openclipart also detects artist names statistically (_oc_detect_artists); this list covers
# people with too few files for that, and names made of common words ("benji park", "mo").
_OC_KNOWN_ARTISTS = (
    "architetto francesco rollandin", "rollandin francesco architetto", "francesco rollandin",
    "rollandin architetto", "rollandin francesco", "nicu buculei", "benji park", "susan park",
    "juliane krug", "jarno vasamaa", "gerald g", "jon phillips", "jean victor balin", "linda kim",
    "sergio luiz araujo", "s rgio luiz ara j", "dan gerhards", "enrique meza c", "ganson", "zazou",
    "peterm", "mo", "mimooh", "mateya", "lumen design studio", "patricia fidi", "kurt cagle",
    "orlando karam", "mitchell johnson", "gabrielle nowicki", "guillaume boitel", "etienne bersac",
    "leigh purdie", "massimo aiello", "matthew gates", "michael jahn", "ruairi hanna",
    "andy fitzsimon", "ruud steltenpool", "angelo gelmi", "dirk struve", "erich schubert",
    "felipe maciel", "martin schmidt lichtenberg", "josu alcalde", "nurbldoff", "nubldoff",
    "felipescu", "theerud law", "omar abo namous", "jeff walden", "daniel steele", "dennis bon",
    "jakob chao", "frank warttig", "mike honeychurch", "stepan kliuchnyk", "jonathan dietrich",
    "darkon", "toh yen cheng", "shandy brown", "joeseph teed", "karl bartel", "leif lodahl",
    "james kittredge", "romus", "sherrera", "abiclipart", "openclipart", "nicolas gagliani",
    "nicolas c", "sek", "utrescu", "rgolan", "durex", "yves guillou", "jonadab", "fudriot",
    "frouke", "marcelo", "mauro olivo", "anton", "tess brady", "rikva", "steve lambert", "vermin",
    "chris kempson", "michael breuer", "the structorr", "jarno", "pipo", "erwan",
    "snuatautisticido",
    "aj ashton", "a j ashton", "aj", "jakob chaosinfait", "nicolas clementz", "ingoenius",
    "teudimundo", "renardjb", "auban", "anonymous", "nurbldoff ksc", "hash", "felipe", "giuliano",
)
# Given names that start signatures ("sleeping_cat_ron_golan"): a name is cut at one of these
# when at most three more words follow it (surnames occur once, so statistics cannot find them).
_OC_GIVEN_NAMES = frozenset("""
alberto alejandro alex andrea andrei andy angelo anthony anton auban brice cedric charles chris
christoph christophe darek daniel dave david dennis dirk erich etienne fco federico fede felipe
frank frederic fredrik gabrielle gerald gino giuli giuliano glenn graig guillaume hans igor
ingo jakob james jasper jean jeff joel jon jonathan jure jurgen karl kimiko konstantin kurt
leif leigh loic luca magnus marcelo massimo matt matthew michael mike mitchell nathan nicola
nicolas nicu omar orlando pete petri philippe renante roman ron rory ruairi ruud stefan stepan
steve susan tanguy tess valessio vladimir wolfram yves lorenzo tristan seth william santiago
alexander jaime paul mirko dan rob
""".split())
# Words that can look like artist names to the statistics (they end many unrelated titles) but
# describe the picture; also common English words, so that another root's titles survive.
_OC_COMMON_WORDS = frozenset("""
a an and the of with in on for from to at by or no not new old big small little large simple
black white red green blue yellow orange purple pink brown grey gray gold silver dark light
left right top bottom up down upper lower front back side corner circle square round outline
sign symbol icon button room islands island states republic wales verde rosso nero bianco
important locked empty full open closed document text style design enter client terminal mount
unmount flag flags map star stars arrow line lines shape shapes frame border box template
""".split())
# Italian (and a few French/Spanish/Portuguese) title words -> English. Multi-word phrases first.
_OC_PHRASES = {
    "fuoco da campeggio": "campfire", "tenda da campeggio": "camping tent",
    "orologio da parete": "wall clock", "ferro da stiro": "clothes iron",
    "mantide religiosa": "praying mantis", "ruota dentata": "gear wheel",
    "macchina caffe": "coffee machine", "tazza di caffe": "cup of coffee",
    "pizza 4 stagioni": "four seasons pizza", "casa plurifamigliare": "apartment building",
    "unita disco rigido": "hard disk drive", "sedia in legno": "wooden chair",
    "tavolo in legno": "wooden table", "donna incinta": "pregnant woman",
    "pallone aerestatico": "hot air balloon", "analisi del sangue": "blood test",
    "orme sulla neve": "footprints in the snow", "sapone liquido": "liquid soap",
    "lattine di birra": "beer cans", "barattolo di pillole": "jar of pills",
    "mazzo di fiori": "bunch of flowers", "pacco regalo": "gift box",
    "stormo di uccelli": "flock of birds", "cigno di spalle": "swan from behind",
    "gallo di profilo": "rooster in profile", "toro al tramonto": "bull at sunset",
    "pinguino col piccolo": "penguin with its chick", "casa dei sogni": "dream house",
    "casa in campagna": "country house", "chalet di montagna": "mountain chalet",
    "paesaggio marino": "seascape", "paesaggio": "landscape", "pace e bene": "peace and good",
    "gufo civetta": "owl", "la prugna": "plum", "sortie issue de secours": "emergency exit",
    "cassa d 39 epoca": "vintage cash register", "vestito da donna": "woman's dress",
    "tacchino di natale": "christmas turkey", "asse da stiro": "ironing board",
    "carretta da cantiere": "wheelbarrow", "lampada da cantiere": "work lamp",
    "metro avvolgibile": "tape measure", "profilo della citta": "city skyline",
    "sacco a pelo": "sleeping bag", "scala doppia": "stepladder", "vestito rosa": "pink dress",
    "tavola esame ottico": "eye chart", "in piedi": "standing", "in corsa": "running",
    "set gatti": "set of cats", "b amp w": "black and white", "blocco ghiaccio": "ice block",
    "blocco notes": "notepad",
    "cassa negozio": "shop cash register", "asso carte": "ace of cards",
    "carte de france": "map of france", "chaussee glissante": "slippery road",
    "glace italienne": "italian ice cream", "ontologia del vino": "ontology of wine",
    "zielony kubek herbaty": "green cup of tea", "stara ksiega": "old book",
    "utensile sega": "saw", "io donna uomo": "woman and man", "io bambina": "little girl",
    "sub subacqueo": "scuba diver", "casco con microfono": "headset with microphone",
}
_OC_WORDS = {
    "aquila": "eagle", "acquila": "eagle", "cigno": "swan", "cigni": "swans", "bianchi": "white",
    "neri": "black", "nero": "black", "bianco": "white", "rosso": "red", "verde": "green",
    "giallo": "yellow", "grigio": "grey", "grigia": "grey", "arancione": "orange", "blu": "blue",
    "e": "and", "di": "of", "con": "with", "col": "with", "al": "at the", "del": "of the",
    "gabbiano": "seagull", "gallo": "rooster", "profilo": "profile", "frontale": "front view",
    "gufo": "owl", "civetta": "owl", "pollo": "chicken", "simbolo": "symbol", "egizio": "egyptian",
    "uccello": "bird", "uccelli": "birds", "tacchino": "turkey", "cavalletta": "grasshopper",
    "coccinella": "ladybug", "coccinellona": "big ladybug", "farfalla": "butterfly",
    "farfalle": "butterflies", "contorno": "outline", "semplice": "simple",
    "stilizzata": "stylized", "formichina": "little ant", "formicona": "big ant",
    "insetto": "insect", "libellula": "dragonfly", "lumaca": "snail", "moschito": "mosquito",
    "stecchito": "dead", "mostriciattolo": "little monster", "quattro": "four",
    "ragnetto": "little spider", "incazzato": "angry", "ragno": "spider", "figo": "cool",
    "zanzara": "mosquito", "cretina": "silly", "dinosauri": "dinosaurs", "dinosauro": "dinosaur",
    "pescetto": "little fish", "lucchetto": "padlock", "ottone": "brass", "lucertola": "lizard",
    "arrotolata": "curled up", "lucertolona": "big lizard", "lucertolone": "big lizard",
    "antilope": "antelope", "orso": "bear", "leone": "lion", "tigre": "tiger",
    "canguro": "kangaroo", "coniglio": "rabbit", "elefante": "elephant", "cavallo": "horse",
    "gattina": "kitten", "gatto": "cat", "pecora": "sheep", "stambecco": "ibex",
    "valdostano": "alpine", "topo": "mouse", "toro": "bull", "pinguino": "penguin",
    "ramarro": "green lizard", "rana": "frog", "poltrona": "armchair", "ufficio": "office",
    "sedia": "chair", "ombrelloni": "beach umbrellas", "tavolo": "table", "casa": "house",
    "cubo": "cube", "pulsante": "button", "tasto": "key", "finestra": "window",
    "estendi": "expand", "finestre": "windows", "sovrapposte": "overlapping",
    "schermo": "screen", "stampante": "printer", "foglio": "sheet", "mondo": "world",
    "salvagente": "lifebuoy", "borsa": "bag", "estiva": "summer", "cesto": "basket",
    "valigie": "suitcases", "decorazione": "decoration", "motivo": "pattern",
    "geometrico": "geometric", "bibliografia": "bibliography", "cassette": "cassettes",
    "cinepresa": "movie camera", "telecamera": "video camera", "teiera": "teapot",
    "tazza": "cup", "torta": "cake", "prugna": "plum", "pera": "pear", "pesca": "peach",
    "pomodori": "tomatoes", "aglio": "garlic", "peperoncino": "chili", "ravanello": "radish",
    "zucca": "pumpkin", "appunti": "notes", "calcolatrice": "calculator", "carta": "paper",
    "cestino": "wastebasket", "pieno": "full", "vuoto": "empty", "clessidra": "hourglass",
    "diagramma": "diagram", "fabbrica": "factory", "istogramma": "histogram", "lana": "wool",
    "lente": "lens", "lettera": "letter", "pinzatrice": "stapler", "puntine": "thumbtacks",
    "tabella": "table", "forbici": "scissors", "dente": "tooth", "camicia": "shirt",
    "seta": "silk", "pattino": "skate", "pattinatrice": "skater", "fata": "fairy",
    "fatina": "fairy", "nonno": "grandfather", "signore": "gentleman", "signorina": "young lady",
    "utente": "user", "singolo": "single", "utenti": "users", "albero": "tree",
    "palloncini": "balloons", "anelli": "rings", "esperimento": "experiment",
    "chimico": "chemical", "medicina": "medicine", "dottore": "doctor", "siringa": "syringe",
    "microscopio": "microscope", "attenzione": "warning", "rotondo": "round",
    "orologio": "clock", "portafoglio": "wallet", "nucleare": "nuclear",
    "giapponese": "japanese", "binocolo": "binoculars", "bn": "black and white",
    "bussola": "compass", "calamita": "magnet", "chiave": "key", "meno": "minus",
    "normale": "normal", "livella": "spirit level", "mattone": "brick", "ruota": "wheel",
    "scolapasta": "colander", "pentola": "pot", "secchio": "bucket", "spugna": "sponge",
    "viti": "screws", "trattore": "tractor", "formulario": "form", "griglia": "grid",
    "marchio": "logo", "gallina": "hen", "proiettore": "projector", "provette": "test tubes",
    "rilievo": "survey", "scodella": "bowl", "tavolozza": "palette", "bicicletta": "bicycle",
    "fiore": "flower", "fiori": "flowers", "cronometro": "stopwatch", "montagna": "mountain",
    "dino": "dinosaur", "bw": "black and white", "estrella": "star",
    "champignon": "mushroom", "glace": "ice cream", "rondelle": "slice", "disquete": "floppy disk",
    "aviso": "warning", "pastas": "folders", "pallone": "balloon",
    "cassa": "cash register", "bambina": "little girl", "donna": "woman",
    "uomo": "man", "sulla": "on the", "architetto": "architect", "libro": "book",
    "ricette": "recipes",
    "pannocchia": "corn cob", "demolizione": "demolition", "costruzione": "construction",
    "abitazione": "dwelling", "tatuaggio": "tattoo", "vacca": "cow", "pezzata": "spotted",
    "fattoria": "farm", "agnellini": "lambs", "ridimensiona": "resize", "tigri": "tigers",
    "anatra": "duck", "attaccapanni": "coat rack", "vestito": "dress", "colombo": "pigeon",
    "cornetto": "croissant", "martellare": "hammering", "montacarichi": "freight elevator",
    "simbol": "symbol", "traslocatore": "mover", "uovo": "egg", "sorridente": "smiling",
    "ambulanza": "ambulance", "ape": "bee", "miele": "honey", "betoniera": "cement mixer",
    "biberon": "baby bottle", "borsetta": "handbag", "calzettoni": "socks", "candela": "candle",
    "carpentiere": "carpenter", "ciuccio": "pacifier", "corridore": "runner",
    "casinista": "messy", "elefantone": "big elephant", "fiocco": "bow", "foglie": "leaves",
    "arancioni": "orange", "marroni": "brown", "rosse": "red", "verdi": "green",
    "piccolo": "little", "ghirlande": "garlands", "festa": "party", "giardinaggio": "gardening",
    "grattacieli": "skyscrapers", "grigi": "grey", "grondaia": "gutter", "guanti": "gloves",
    "pinze": "pliers", "motosega": "chainsaw", "mucca": "cow", "mucche": "cows",
    "papera": "duck", "pecorella": "little sheep", "pennuto": "bird", "pesistica": "weightlifting",
    "principessa": "princess", "provetta": "test tube", "ragazza": "girl", "bionda": "blonde",
    "bruna": "brunette", "rossa": "red", "seduta": "sitting", "ragazzo": "boy", "rosa": "rose",
    "per": "for", "campeggio": "camping", "scatolone": "big box", "sega": "saw", "legno": "wood",
    "serratura": "lock", "viola": "purple", "cappello": "hat", "foulard": "scarf",
    "spaventapasseri": "scarecrow", "stetoscopio": "stethoscope", "fonendoscopio": "stethoscope",
    "striscia": "strip of", "struzzo": "ostrich", "tramezzino": "sandwich", "zaino": "backpack",
    "cammello": "camel", "pittura": "painting", "pennello": "brush", "imbianchino": "house painter",
    "festoni": "festoons", "condominio": "apartment building",
    # set prefixes that say nothing about the picture
    "aiga": "", "gnome": "", "mime": "", "bb": "", "clipart": "", "svg": "", "fs": "",
}
# Folder names that say nothing about the picture, and nicer names for some others.
_OC_GENERIC_DIRS = frozenset("""
unsorted duplicates special examples misc other action actions apps applications device devices
emblems filesystems mimetypes stock generic etiquette-theme flat-theme lemon-theme bordered
ornamental simple white
""".split())
_OC_DIR_PHRASES = {
    "icons": "computer icons", "hardware": "computer hardware", "connectors": "computer connectors",
    "network": "computer network", "signs_and_symbols": "signs and symbols",
    "map_symbols": "map symbols", "aiga-symbols": "transportation symbols",
    "roadsigns": "road signs", "led": "LEDs", "big_cats": "big cats", "housecats": "house cats",
    "breads_and_carbs": "breads", "meats_and_eggs": "meats and eggs", "bodypart": "body parts",
    "CD_Player": "CD players", "cards": "playing cards", "cardbacks": "playing cards",
    "stickmen": "stick figures", "smilies": "smileys", "penguin": "penguins",
    "holiday": "holidays", "semaphore": "semaphore flags",
}
_OC_CONNECTORS = frozenset("a an and the of with in on for to at by from e di de da del".split())
_OC_SHORT_WORDS = frozenset("tv cd pc dj ox ax ok uk us eu go pi".split())
_OC_CARD_SUITS = {"c": "clubs", "d": "diamonds", "h": "hearts", "s": "spades"}
_OC_CARD_RANKS = {"a": "ace", "2": "two", "3": "three", "4": "four", "5": "five", "6": "six",
                  "7": "seven", "8": "eight", "9": "nine", "10": "ten", "j": "jack", "q": "queen",
                  "k": "king"}
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
