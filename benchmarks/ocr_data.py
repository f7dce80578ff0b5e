"""PP-OCRv4 models from the `rapidocr-onnxruntime` wheel, rendered text to judge them, and their metrics.

Nothing here runs rapidocr's code or needs its runtime dependencies (OpenCV, pyclipper): the wheel is a
zip, read with `zipfile`; pre- and post-processing are re-implemented in numpy/Pillow after
``rapidocr_onnxruntime/ch_ppocr_{rec,det}`` of that wheel:

- recognizer ``x`` [N, 3, 48, W] (BGR, (x/255 − 0.5)/0.5, resized to height 48 keeping the aspect, padded
  with 0 on the right) → ``softmax`` [N, W/8, 6625]; CTC greedy decode (argmax, collapse repeats, drop
  blank 0) with the dictionary kept in the model's ``metadata_props["character"]`` (blank first, a space
  appended last, as rapidocr's ``CTCLabelDecode`` does);
- detector ``x`` [N, 3, H, W] (H, W multiples of 32, same normalization) → text probability [N, 1, H, W]
  (DB; rapidocr binarizes it at 0.3).

Data is rendered with Pillow from a seeded generator: words, numbers, dates and codes in the fonts found
on the machine (Pillow's built-in scalable font when there is none); CJK lines only when a font draws CJK.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from PIL import Image, ImageDraw, ImageFilter, ImageFont

__all__ = [
    "PACKAGE",
    "Fetched",
    "TextSet",
    "cer",
    "ctc_decode",
    "dictionary",
    "fetch",
    "find_fonts",
    "line_coverage",
    "mask_iou",
    "render_lines",
    "render_pages",
]

PACKAGE = "rapidocr-onnxruntime==1.4.4"
DET = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
REC = "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"
REC_HEIGHT = 48
FONT_DIRS = (
    "/usr/share/fonts",
    "/usr/local/share/fonts",
    "~/.fonts",
    "~/.local/share/fonts",
    "/Library/Fonts",
)
_WORD_TEXT = """
the of and to in is for on that with as by at from this be are or it was an not have which you all can
new more one will about page home search free information time site may other what services price order
data number name state business report world year day research email message contact review city account
customer quality delivery invoice total amount payment bank street road north south river station office
market model camera phone table water paper light power system energy garden school hotel Monday March
April London Paris Berlin Tokyo Boston Chicago Oxford Street Avenue Road Lane Center Park
"""
WORDS = _WORD_TEXT.split()


@dataclass(frozen=True)
class Fetched:
    det: Path
    rec: Path
    wheel: Path
    wheel_sha256: str
    licence: str


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(wheel: Path | None, cache: Path) -> Fetched:
    """Extract the two models from ``wheel``, or from the wheel ``pip download`` puts into ``cache``.

    The download is ``python -m pip download --no-deps rapidocr-onnxruntime==1.4.4 -d CACHE`` (PyPI, 15 MB).
    """
    cache.mkdir(parents=True, exist_ok=True)
    if wheel is None:
        found = sorted(cache.glob("rapidocr_onnxruntime-1.4.4-*.whl"))
        if not found:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(cache)]
            print("downloading:", " ".join(command), file=sys.stderr)
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            found = sorted(cache.glob("rapidocr_onnxruntime-1.4.4-*.whl"))
        if not found:
            raise SystemExit(f"pip download left no rapidocr_onnxruntime-1.4.4 wheel in {cache}")
        wheel = found[0]
    paths = {}
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        meta = next((n for n in names if n.endswith(".dist-info/METADATA")), None)
        text = archive.read(meta).decode() if meta else ""
        licence = next(
            (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("License:")), "?"
        )
        for key, member in (("det", DET), ("rec", REC)):
            if member not in names:
                raise SystemExit(f"{wheel} holds no {member}: pass the rapidocr-onnxruntime 1.4.4 wheel")
            target = cache / Path(member).name
            if not target.exists() or target.stat().st_size != archive.getinfo(member).file_size:
                tmp = target.with_suffix(".part")
                tmp.write_bytes(archive.read(member))
                tmp.replace(target)
            paths[key] = target
    return Fetched(paths["det"], paths["rec"], wheel, _sha256(wheel), licence)


def dictionary(model: onnx.ModelProto) -> list[str]:
    """Class index → character: blank, the ``character`` metadata lines, then a space (rapidocr's order)."""
    meta = {p.key: p.value for p in model.metadata_props}
    if "character" not in meta:
        raise SystemExit("the recognizer carries no 'character' metadata: not the PP-OCRv4 model of rapidocr")
    return ["", *meta["character"].splitlines(), " "]


def ctc_decode(probs: np.ndarray, chars: list[str]) -> list[str]:
    """Greedy CTC: argmax per timestep, collapse repeats, drop blank (0)."""
    best = probs.argmax(axis=-1)
    texts = []
    for row in best:
        keep = np.ones(len(row), dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != 0
        texts.append("".join(chars[i] for i in row[keep]))
    return texts


def _edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def cer(hypotheses: list[str], references: list[str], ignore_spaces: bool = False) -> float:
    """Character error rate: Σ edit distance / Σ reference length."""
    if ignore_spaces:
        hypotheses = [h.replace(" ", "") for h in hypotheses]
        references = [r.replace(" ", "") for r in references]
    total = sum(len(r) for r in references)
    return sum(_edit_distance(h, r) for h, r in zip(hypotheses, references, strict=True)) / max(total, 1)


def mask_iou(a: np.ndarray, b: np.ndarray, threshold: float = 0.3) -> float:
    """IoU of the binarized maps, pooled over the whole batch (1.0 when both are empty)."""
    ma, mb = a > threshold, b > threshold
    union = np.logical_or(ma, mb).sum()
    return float(np.logical_and(ma, mb).sum() / union) if union else 1.0


def line_coverage(probs: np.ndarray, boxes: list[list[tuple[int, int, int, int]]]) -> tuple[float, float]:
    """(share of rendered lines with ≥ 20% of their box above 0.3, share of the mask inside some box)."""
    hits, lines, inside, total = 0, 0, 0, 0
    for page, page_boxes in zip(probs[:, 0] > 0.3, boxes, strict=True):
        covered = np.zeros_like(page)
        for x0, y0, x1, y1 in page_boxes:
            lines += 1
            hits += page[y0:y1, x0:x1].mean() >= 0.2
            covered[y0:y1, x0:x1] = True
        inside += np.logical_and(page, covered).sum()
        total += page.sum()
    return hits / max(lines, 1), float(inside / max(total, 1))


def _draws(font: ImageFont.FreeTypeFont, text: str) -> bool:
    """Whether ``font`` has glyphs for ``text`` (its masks differ from the missing-glyph box's)."""
    missing = bytes(font.getmask("\U0010fffd"))
    return all(bytes(font.getmask(ch)) != missing for ch in text)


def find_fonts(limit: int = 12) -> tuple[list[Path], list[Path]]:
    """(Latin fonts, CJK fonts) found on this machine, sorted, at most ``limit`` each."""
    latin, cjk = [], []
    for root in FONT_DIRS:
        base = Path(root).expanduser()
        if not base.is_dir():
            continue
        for path in sorted(p for p in base.rglob("*") if p.suffix.lower() in (".ttf", ".otf", ".ttc")):
            try:
                font = ImageFont.truetype(str(path), 24)
            except OSError:
                continue
            if "Light" in path.stem or not _draws(font, "Ag5$"):
                continue
            if len(cjk) < limit and _draws(font, "中文字"):
                cjk.append(path)
            elif len(latin) < limit:
                latin.append(path)
    return latin, cjk


def _font(path: Path | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.truetype(str(path), size) if path else ImageFont.load_default(size=size)


def _phrase(rng: np.random.Generator, cjk_chars: list[str]) -> str:
    if cjk_chars and rng.random() < 0.3:
        return "".join(rng.choice(cjk_chars, size=int(rng.integers(3, 11))))
    tokens = []
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.random()
        if kind < 0.55:
            word = str(rng.choice(WORDS))
            style = rng.random()
            tokens.append(word.upper() if style < 0.2 else word.title() if style < 0.5 else word)
        elif kind < 0.7:
            tokens.append(f"{rng.integers(0, 10000)}.{rng.integers(0, 100):02d}")
        elif kind < 0.8:
            tokens.append(f"{rng.integers(1990, 2031)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}")
        elif kind < 0.9:
            letters = "".join(rng.choice(list("ABCDEFGHJKLMNPRSTUVWXYZ"), size=2))
            tokens.append(f"{letters}-{rng.integers(100, 100000)}")
        else:
            tokens.append(str(rng.choice(["No.", "Tel:", "(+1)", "$", "#", "Total:", "ID:", "@", "&"])))
    return " ".join(tokens)


@dataclass
class TextSet:
    """Rendered text lines: ``x`` is the recognizer's input, ``texts`` the ground truth."""

    x: np.ndarray
    texts: list[str]


def _normalize(rgb: np.ndarray) -> np.ndarray:
    """HWC RGB uint8 → CHW BGR float32 in [-1, 1] (rapidocr feeds OpenCV's BGR images)."""
    return (rgb[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) / 255.0 - 0.5) / 0.5


def _line_image(rng: np.random.Generator, text: str, font_path: Path | None) -> Image.Image:
    font = _font(font_path, int(rng.integers(22, 41)))
    left, top, right, bottom = font.getbbox(text)
    pad_x, pad_y = int(rng.integers(3, 12)), int(rng.integers(3, 10))
    background = tuple(int(v) for v in rng.integers(190, 256, size=3))
    ink = tuple(int(v) for v in rng.integers(0, 90, size=3))
    image = Image.new("RGB", (right - left + 2 * pad_x, bottom - top + 2 * pad_y), background)
    ImageDraw.Draw(image).text((pad_x - left, pad_y - top), text, font=font, fill=ink)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.9))))
    return image


def render_lines(
    count: int,
    seed: int,
    fonts: list[Path | None],
    cjk_fonts: list[Path],
    chars: list[str],
    width: int,
    exclude: frozenset[str] = frozenset(),
) -> TextSet:
    """``count`` distinct lines none of which is in ``exclude``, each fitting ``width`` at height 48."""
    rng = np.random.default_rng(seed)
    cjk_chars = [c for c in chars if len(c) == 1 and "\u4e00" <= c <= "\u9fff"][:3500] if cjk_fonts else []
    x = np.zeros((count, 3, REC_HEIGHT, width), dtype=np.float32)
    texts: list[str] = []
    while len(texts) < count:
        text = _phrase(rng, cjk_chars)
        cjk = any("\u4e00" <= c <= "\u9fff" for c in text)
        font = cjk_fonts[int(rng.integers(len(cjk_fonts)))] if cjk else fonts[int(rng.integers(len(fonts)))]
        if text in exclude or text in texts:
            continue
        image = _line_image(rng, text, font)
        resized_w = int(np.ceil(REC_HEIGHT * image.width / image.height))
        if resized_w > width:
            continue
        image = image.resize((resized_w, REC_HEIGHT), Image.BILINEAR)
        x[len(texts), :, :, :resized_w] = _normalize(np.asarray(image))
        texts.append(text)
    return TextSet(x, texts)


def render_pages(
    count: int, seed: int, fonts: list[Path | None], size: int = 640
) -> tuple[np.ndarray, list[list[tuple[int, int, int, int]]]]:
    """``count`` pages of up to 14 text lines on a light background: the detector's input, the line boxes."""
    rng = np.random.default_rng(seed)
    pages = np.zeros((count, 3, size, size), dtype=np.float32)
    boxes: list[list[tuple[int, int, int, int]]] = []
    for k in range(count):
        background = tuple(int(v) for v in rng.integers(180, 256, size=3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        y, page_boxes = int(rng.integers(10, 40)), []
        for _ in range(int(rng.integers(6, 15))):
            font = _font(fonts[int(rng.integers(len(fonts)))], int(rng.integers(16, 42)))
            text = _phrase(rng, [])
            left, top, right, bottom = font.getbbox(text)
            x0 = int(rng.integers(10, max(11, size // 3)))
            if y + bottom - top > size - 10 or x0 + right - left > size - 10:
                continue
            ink = tuple(int(v) for v in rng.integers(0, 90, size=3))
            draw.text((x0 - left, y - top), text, font=font, fill=ink)
            page_boxes.append((x0, y, x0 + right - left, y + bottom - top))
            y += bottom - top + int(rng.integers(8, 36))
        pages[k] = _normalize(np.asarray(image))
        boxes.append(page_boxes)
    return pages, boxes
