"""Small image utilities shared by the project: tensor -> PIL, captioned grids, atomic saves.

Used for dataset previews (data/shapes.py --preview) and for sample grids of the trained models.
Pillow only: torch is never imported here, tensors are handled by duck typing so that importing
this module stays cheap and side-effect free.
"""

import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from dalle2.core.files import atomic_write, atomic_write_text


def to_pil(x) -> Image.Image:
    """Convert one image tensor to a PIL RGB image.

    x: (3, H, W) (or (1, H, W)) tensor, either float in [0, 1] (values outside are clipped) or uint8.
    A PIL image is returned unchanged (converted to RGB), so callers can pass either.
    Models work in [-1, 1]: map with `(x + 1) / 2` before calling.
    """
    if isinstance(x, Image.Image):
        return x.convert("RGB")
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"to_pil expects a (3, H, W) or (1, H, W) tensor, got shape {tuple(x.shape)}")
    x = x.detach().cpu()
    if x.dtype.is_floating_point:
        x = (x.clamp(0, 1) * 255).round()
    x = x.byte()  # uint8, without importing torch here
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    hwc = x.permute(1, 2, 0).contiguous()  # (H, W, 3)
    h, w = hwc.shape[0], hwc.shape[1]
    return Image.frombytes("RGB", (w, h), hwc.numpy().tobytes())


def _font():
    return ImageFont.load_default()


def _space(font) -> float:
    """The gap drawn between words: Pillow's default font (Aileron at 10 px) has a 2-px space, which
    reads as no space at all ("a photoof an"), so at least 4 px."""
    return max(font.getlength(" "), 4.0)


def text_width(line: str, font) -> float:
    """Rendered width of one line as draw_text draws it."""
    words = line.split(" ")
    return sum(font.getlength(w) for w in words) + _space(font) * (len(words) - 1)


def _wrap(text: str, font, max_px: int) -> list[str]:
    """Greedy word wrap at a rendered pixel width (measured with the gap draw_text draws)."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if line and text_width(candidate, font) > max_px:
            lines.append(line)
            line = word
        else:
            line = candidate
    lines.append(line)
    return lines


def draw_text(draw, xy, line: str, font, fill) -> None:
    """One line of text, word by word with a visible gap between words (see _space)."""
    x, y = xy
    for word in line.split(" "):
        draw.text((x, y), word, fill=fill, font=font)
        x += font.getlength(word) + _space(font)


def captioned_grid(images: list, captions: list[str], cols: int = 8, scale: int = 4) -> Image.Image:
    """Lay images out in a grid with each caption wrapped underneath, on a white background.

    images: PIL images (or (3, H, W) tensors, see to_pil), each upscaled by `scale` with NEAREST so
    32 px samples stay crisp and readable. captions: one string per image ("" for none).
    Captions wrap at the tile's pixel width.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        raise ValueError("captioned_grid needs at least one image")
    scale = max(1, int(scale))
    tiles = [to_pil(im) for im in images]
    tiles = [t.resize((t.width * scale, t.height * scale), Image.NEAREST) for t in tiles]
    tile_w = max(t.width for t in tiles)
    tile_h = max(t.height for t in tiles)

    font = _font()
    left, top, right, bottom = font.getbbox("Ag")
    line_h = bottom + 2  # glyph height plus a little leading
    wrapped = [_wrap(c, font, tile_w) for c in captions]
    text_h = max(len(w) for w in wrapped) * line_h + 4

    pad = 4
    cols = max(1, min(cols, len(tiles)))
    rows = (len(tiles) + cols - 1) // cols
    cell_w, cell_h = tile_w + pad, tile_h + text_h + pad
    grid = Image.new("RGB", (cols * cell_w + pad, rows * cell_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (tile, lines) in enumerate(zip(tiles, wrapped)):
        x0 = pad + (i % cols) * cell_w
        y0 = pad + (i // cols) * cell_h
        grid.paste(tile, (x0, y0))
        for j, line in enumerate(lines):
            draw_text(draw, (x0, y0 + tile_h + 2 + j * line_h), line, font, (0, 0, 0))
    return grid


def save_image_atomic(img: Image.Image, path, text: dict | None = None) -> Path:
    """Save `img` to `path` so that readers never see a half-written file.

    Writes to a temporary file in the same folder (same filesystem, so the final os.replace is
    atomic), keeping the suffix so Pillow picks the format from it. Creates the folder if needed.
    `text` ({keyword: str}) goes into a PNG as iTXt chunks (UTF-8; read back with Image.open(p).text).
    """
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: Pillow does not know the image format of {path.suffix!r}")
    extra = {}
    if text:
        if fmt != "PNG":
            raise ValueError(f"{path}: text chunks need a .png file")
        info = PngInfo()
        for key, value in text.items():
            info.add_itxt(key, value)
        extra["pnginfo"] = info
    return atomic_write(path, lambda f: img.save(f, format=fmt, **extra))


SETTINGS_KEY = "dalle2"  # the PNG text chunk holding an image's settings as JSON


def sample_names(n_captions: int, n_per_text: int = 1, start: int = 0) -> list[str]:
    """File names of captions start .. start + n_captions - 1: 0000.png, ... (0000_0.png, 0000_1.png, ...
    when n_per_text > 1)."""
    return [f"{i:04d}.png" if n_per_text == 1 else f"{i:04d}_{k}.png"
            for i in range(start, start + n_captions) for k in range(n_per_text)]


def save_sample(image, path: Path, record: dict | None = None) -> Path:
    """One generated PNG; with `record`, its settings as JSON in the text chunk "dalle2" and its caption
    as "Description"."""
    text = None if record is None else {SETTINGS_KEY: json.dumps(record), "Description": str(record.get("caption", ""))}
    return save_image_atomic(image, path, text)


def write_sample_records(out: Path, names: list[str], records: list[dict]) -> Path:
    """OUT/samples.jsonl: one line per image, {"file": ..., **record}."""
    return atomic_write_text(Path(out) / "samples.jsonl",
                             "".join(json.dumps({"file": name, **r}) + "\n" for name, r in zip(names, records)))


def write_samples(images: list, captions: list[str], out, n_per_text: int = 1,
                  records: list[dict] | None = None) -> list[Path]:
    """Save generated images as OUT/0000.png, 0001.png, ... in caption order (OUT/0000_0.png,
    0000_1.png, ... when n_per_text > 1), plus OUT/grid.png with the captions under the images.
    `images` are PIL images, n_per_text consecutive ones per caption. With `records` (one dict of
    settings per image), each PNG carries its record as JSON in the text chunk "dalle2" (and its
    caption as "Description"), and OUT/samples.jsonl gets one line per image, {"file": ..., **record}.
    Returns the written paths."""
    out = Path(out)
    names = sample_names(len(captions), n_per_text)
    if records is not None and len(records) != len(names):
        raise ValueError(f"{len(names)} images but {len(records)} records")
    paths = [save_sample(img, out / name, r) for name, img, r in
             zip(names, images, records if records is not None else [None] * len(names))]
    if records is not None:
        paths.append(write_sample_records(out, names, records))
    grid_captions = [c for c in captions for _ in range(n_per_text)]
    cols = max(n_per_text, min(8, len(images)))
    paths.append(save_image_atomic(captioned_grid(images, grid_captions, cols=cols), out / "grid.png"))
    return paths
