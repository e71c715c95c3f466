"""The shapes dataset: synthetic captioned images of coloured shapes (see data/SHAPES_SPEC.md).

The project's default data for every stage and every test. Everything here follows the spec to
the letter; where the spec is silent the choice is documented next to the code.

Usage:
    python data/shapes.py --variant objects --out datasets/shapes            # 20,000 / 2,000, seed 0
    python data/shapes.py --variant positions --out datasets/shapes_pos --n-train 5000 --n-test 500
    python data/shapes.py --variant both --out datasets/shapes_both      # half objects, half positions
    python data/shapes.py --out /tmp/s --n-train 200 --n-test 16 --preview /tmp/s/preview.png

Output: DIR/train/ and DIR/test/, each with 000000.png ... and metadata.jsonl, one record a line:
    {"file": "000123.png", "caption": "...", "objects": [{"colour", "shape", "size", "position",
     "bbox": [x1, y1, x2, y2], "rotation" (polygons only)}, ...]}
"""

import argparse
import json
import math
import os
import random
import shutil
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from dalle2.core.files import FolderLock, LockError, pid_alive
from dalle2.core.images import captioned_grid, save_image_atomic
from data.captioned import CaptionedImages, DatasetError, build_caption_table, flip_caption
from data.captions import COLOURS, HOLDOUT_ORDER, HOLDOUT_PAIRS, SHAPES, make_caption
from data.decode import cached_images, decode_images, file_stamp, files_digest, inside_folder, read_metadata

# ---------------------------------------------------------------------------------------------
# The vocabulary of the dataset (spec: Canvas, Colours, Shapes, Zero-shot hold-out).

CANVAS = 128
BACKGROUND = (128, 128, 128)  # gray is never a shape colour
MIN_LEN = 20

_COLOUR_NAMES = tuple(COLOURS)
POLYGON_SIDES = {"triangle": 3, "pentagon": 5}
SCENE_VARIANTS = ("objects", "positions")  # what one scene can be
VARIANTS = SCENE_VARIANTS + ("both",)  # "both": one dataset with both kinds of scene, alternating

PLACEMENT_RETRIES = 100  # tries for the second object's box before the whole scene is resampled

SPLITS = ("train", "test")


# ---------------------------------------------------------------------------------------------
# Words from the bounding box (spec: Sizes, Positions). bbox = [x1, y1, x2, y2], inclusive pixels.

def size_word(bbox) -> str:
    """'small' < 0.05 <= 'medium' < 0.15 <= 'large', from the bbox area over the canvas area."""
    x1, y1, x2, y2 = bbox
    area = (x2 - x1) * (y2 - y1) / (CANVAS * CANVAS)
    if area < 0.05:
        return "small"
    if area < 0.15:
        return "medium"
    return "large"


def position_word(bbox) -> str:
    """'top'/'bottom' and 'left'/'right' when the box lies wholly in one half, else 'center'."""
    x1, y1, x2, y2 = bbox
    half = CANVAS // 2
    vertical = "top" if y2 <= half else "bottom" if y1 > half else ""
    horizontal = "left" if x2 <= half else "right" if x1 > half else ""
    return " ".join(w for w in (vertical, horizontal) if w) or "center"


def mirror_bbox(bbox) -> list:
    """The box of the horizontally mirrored image: pixel column x becomes CANVAS - 1 - x."""
    x1, y1, x2, y2 = bbox
    return [CANVAS - 1 - x2, y1, CANVAS - 1 - x1, y2]


def mirrored_caption(caption: str, objects: list) -> str | None:
    """The caption that is true of the horizontally mirrored image, or None when the record does not
    say enough (no objects with boxes, or a caption that is not one phrase per object).

    Each object's position phrase is recomputed from its mirrored box: swapping "left" and "right" is
    not enough, because the halves are <= 64 / > 64 (spec: Positions), so a box whose right edge is at
    column 63 or 64 is "left" but its mirror (left edge 63 or 64) is neither left nor right, and a
    "center" box with its left edge there mirrors to "left". Everything else in the caption is kept.
    """
    parts = caption.split(" and ")  # make_caption joins one phrase per object, in object order
    if not isinstance(objects, list) or not objects or len(parts) != len(objects):
        return None
    out = []
    for part, obj in zip(parts, objects):
        head, at, _ = part.partition(" at the ")
        if at:
            bbox = obj.get("bbox") if isinstance(obj, dict) else None
            if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
                return None
            part = head + at + position_word(mirror_bbox(bbox))
        out.append(part)
    return " and ".join(out)


def boxes_overlap(a, b) -> bool:
    """Inclusive pixel boxes: touching (sharing a row or column) counts as overlap."""
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


# ---------------------------------------------------------------------------------------------
# Rendering.

def render(objects: list[dict], canvas: int = CANVAS) -> Image.Image:
    """Draw objects (metadata dicts: colour, shape, bbox, rotation for polygons) on the gray canvas.

    The recorded bbox is the drawn one, so re-rendering a metadata record is byte-identical.
    ImageDraw does not antialias: every shape pixel is exactly its palette colour.
    """
    img = Image.new("RGB", (canvas, canvas), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in objects:
        fill = COLOURS[obj["colour"]]
        shape = obj["shape"]
        x1, y1, x2, y2 = obj["bbox"]
        if shape in ("rectangle", "square"):
            draw.rectangle((x1, y1, x2, y2), fill=fill)
        elif shape in ("ellipse", "circle"):
            draw.ellipse((x1, y1, x2, y2), fill=fill)
        elif shape in POLYGON_SIDES:
            # recorded bbox = centre +/- r, so the centre and circumradius come back exactly
            cx, cy, r = (x1 + x2) // 2, (y1 + y2) // 2, (x2 - x1) // 2
            draw.regular_polygon((cx, cy, r), POLYGON_SIDES[shape], rotation=obj["rotation"], fill=fill)
        else:
            raise ValueError(f"unknown shape {shape!r}")
    return img


# ---------------------------------------------------------------------------------------------
# Sampling (spec: Shapes, Objects per image, Zero-shot hold-out).

def _sample_pair(rng: random.Random, allow_holdout: bool) -> tuple[str, str]:
    # Colour and shape uniform and independent; a held-out pair is rejected on its own (not the
    # whole scene), so the 1-or-2 object count stays uniform in the training split too.
    while True:
        pair = (rng.choice(_COLOUR_NAMES), rng.choice(SHAPES))
        if allow_holdout or pair not in HOLDOUT_PAIRS:
            return pair


def _sample_object(rng: random.Random, colour: str, shape: str) -> dict:
    """One object with its drawn bbox. Box: x1 in [0, 128 - min_len), x2 in [x1 + min_len, 128)."""
    x1 = rng.randint(0, CANVAS - MIN_LEN - 1)
    x2 = rng.randint(x1 + MIN_LEN, CANVAS - 1)
    y1 = rng.randint(0, CANVAS - MIN_LEN - 1)
    y2 = rng.randint(y1 + MIN_LEN, CANVAS - 1)
    w, h = x2 - x1, y2 - y1
    rotation = None
    if shape in ("square", "circle"):
        side = min(w, h)  # anchored at (x1, y1)
        bbox = [x1, y1, x1 + side, y1 + side]
    elif shape in POLYGON_SIDES:
        cx, cy, r = (x1 + x2) // 2, (y1 + y2) // 2, min(w, h) // 2
        bbox = [cx - r, cy - r, cx + r, cy + r]  # lies inside the sampled box
        rotation = rng.uniform(0, 360)
    else:
        bbox = [x1, y1, x2, y2]
    obj = {"colour": colour, "shape": shape, "size": size_word(bbox), "position": position_word(bbox),
           "bbox": bbox}
    if rotation is not None:
        obj["rotation"] = rotation
    return obj


def sample_scene(rng: random.Random, variant: str, allow_holdout: bool, first=None) -> dict:
    """A metadata record without "file": {"caption": str, "objects": [obj, ...]}.

    variant: "objects" (1 or 2 objects, uniform, no position phrase) or "positions" (exactly 1
    object, always a position phrase). first: optional (colour, shape) forced on the first object
    (used to guarantee every hold-out pair in the test split).
    """
    if variant not in SCENE_VARIANTS:
        raise ValueError(f"unknown scene variant {variant!r}, expected one of {SCENE_VARIANTS}")
    n = rng.choice((1, 2)) if variant == "objects" else 1
    while True:  # resample the whole scene (same count) if the second object finds no room
        objects = [_sample_object(rng, *(first or _sample_pair(rng, allow_holdout)))]
        for _ in range(n - 1):
            pair = _sample_pair(rng, allow_holdout)
            for _ in range(PLACEMENT_RETRIES):
                obj = _sample_object(rng, *pair)
                if not any(boxes_overlap(obj["bbox"], o["bbox"]) for o in objects):
                    objects.append(obj)
                    break
            else:
                break
        if len(objects) == n:
            break
    caption = make_caption(objects, rng, with_position=(variant == "positions"))
    return {"caption": caption, "objects": objects}


# ---------------------------------------------------------------------------------------------
# Writing a dataset (spec: On disk).

def split_rng(seed: int, split: str) -> random.Random:
    """One generator per split: train and test are independent, and each is reproducible.

    Seeded with a string, which Python hashes with SHA-512 (not PYTHONHASHSEED-dependent).
    """
    return random.Random(f"shapes/{seed}/{split}")


def scene_variant(variant: str, i: int) -> str:
    """The kind of scene i of a split: the variant itself, or for "both" objects (even i) and positions
    (odd i) in turn, so that either kind is half of every split and of every prefix of it."""
    return variant if variant != "both" else SCENE_VARIANTS[i % 2]


def forced_holdout(variant: str) -> tuple:
    """The forced first objects of the test split: every hold-out pair once, for "both" once per kind
    (scene 2k is objects, 2k + 1 positions, both with pair k)."""
    return HOLDOUT_ORDER if variant != "both" else tuple(p for p in HOLDOUT_ORDER for _ in SCENE_VARIANTS)


def _write_split(folder: Path, n: int, rng: random.Random, variant: str, allow_holdout: bool,
                 forced: tuple, progress: bool) -> None:
    """Write n images and metadata.jsonl into `folder` (a fresh, empty folder). In the "both" variant
    every record also says which kind of scene it is: {"file", "variant": "objects" | "positions", ...}."""
    lines = []
    for i in tqdm(range(n), desc=folder.name, unit="img", disable=not progress, mininterval=0.5):
        first = forced[i] if i < len(forced) else None
        kind = scene_variant(variant, i)
        scene = sample_scene(rng, kind, allow_holdout, first=first)
        name = f"{i:06d}.png"
        render(scene["objects"]).save(folder / name)
        record = {"file": name, "variant": kind, **scene} if variant == "both" else {"file": name, **scene}
        lines.append(json.dumps(record) + "\n")
    with open(folder / "metadata.jsonl", "w") as f:
        f.writelines(lines)


MARKER = ".shapes-dataset"  # written by generate(): this folder is the generator's own to replace


class NotOurFolder(ValueError):
    """The output folder holds files the generator did not write: they are never replaced."""


def check_output_folder(out) -> None:
    """Refuse to generate into a folder unless it does not exist, is empty, or was made by
    generate() (it holds MARKER): anything else may be someone's own data, and generating renames
    its train/ and test/ away."""
    out = Path(out)
    if not out.exists() or (out / MARKER).is_file():
        return
    if not out.is_dir():
        raise NotOurFolder(f"{out} exists and is not a folder: cannot generate the shapes dataset there")
    entries = sorted(e.name for e in os.scandir(out))
    if entries:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise NotOurFolder(
            f"{out} already holds files the shapes generator did not write ({shown}); nothing was changed. "
            f"If this is your own data, set data.dataset=folder (or cifar10); otherwise point data.root "
            f"(or --out) at a new folder, or delete {out} yourself to regenerate there")


def generate(out, variant: str = "objects", n_train: int = 20000, n_test: int = 2000, seed: int = 0,
             progress: bool = True) -> Path:
    """Generate DIR/train and DIR/test. Same arguments give byte-identical files. Returns DIR.

    Train never contains a hold-out pair; the first test scenes each carry one hold-out pair on
    their first object, so every pair appears in test whenever n_test >= len(HOLDOUT_PAIRS) (for
    "both": in either kind of scene whenever n_test >= 2 * len(HOLDOUT_PAIRS)).
    Both splits are written into temporary sibling folders and renamed into place only once both
    are complete, so a crash leaves any previous dataset untouched and no half-written split.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}, expected one of {VARIANTS}")
    if n_train < 0 or n_test < 0:
        raise ValueError("n_train and n_test must be >= 0")
    out = Path(out)
    check_output_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by data/shapes.py: generate() may replace train/ and test/ here\n")
    with FolderLock(out, "shapes generation"):
        _clean_split_orphans(out)
        return _generate_locked(out, variant, n_train, n_test, seed, progress)


def _clean_split_orphans(out: Path) -> None:
    """Remove temporary split folders left by a killed generation (their pid is dead)."""
    for path in out.glob(".*.*-*"):
        tail = path.name.rsplit("-", 1)[-1]
        if path.is_dir() and tail.isdigit() and not pid_alive(int(tail)):
            shutil.rmtree(path, ignore_errors=True)


def _generate_locked(out: Path, variant: str, n_train: int, n_test: int, seed: int, progress: bool) -> Path:
    """generate()'s work, with the folder checked and locked."""
    jobs = {  # split: (size, may contain hold-out pairs, forced first objects)
        "train": (n_train, False, ()),
        "test": (n_test, True, forced_holdout(variant)),
    }
    tmp = {split: out / f".{split}.tmp-{os.getpid()}" for split in SPLITS}
    old = {split: out / f".{split}.old-{os.getpid()}" for split in SPLITS}
    try:
        for split, (n, allow_holdout, forced) in jobs.items():
            shutil.rmtree(tmp[split], ignore_errors=True)
            tmp[split].mkdir()
            _write_split(tmp[split], n, split_rng(seed, split), variant, allow_holdout, forced, progress)
        for split in SPLITS:  # replace an existing split only now that the new ones are complete
            if (out / split).exists():
                (out / split).rename(old[split])
            tmp[split].rename(out / split)
    finally:
        for path in (*tmp.values(), *old.values()):
            shutil.rmtree(path, ignore_errors=True)
    return out


def preview(dataset_dir, out_png, n: int = 16, image_size=None) -> Path:
    """Write a captioned grid of the first n test images (resized to image_size if given, as the
    models see them: Pillow antialiased resize)."""
    # Imported here so that generating data never pulls in whatever the dalle2 package imports.

    split = Path(dataset_dir) / "test"
    with open(split / "metadata.jsonl") as f:
        records = [json.loads(line) for _, line in zip(range(n), f)]
    if not records:
        raise ValueError(f"{split / 'metadata.jsonl'} has no records")
    images = []
    for rec in records:
        with Image.open(split / rec["file"]) as im:
            im = im.convert("RGB")
        if image_size:
            im = im.resize((image_size, image_size), Image.LANCZOS)
        images.append(im)
    scale = max(1, round(CANVAS / images[0].width))  # tiles about 128 px whatever the resolution
    cols = math.ceil(math.sqrt(len(images)))
    grid = captioned_grid(images, [r["caption"] for r in records], cols=cols, scale=scale)
    return save_image_atomic(grid, out_png)


# ---------------------------------------------------------------------------------------------
# Command line.

# ---------------------------------------------------------------------------------------------
# Loading a split (through data/datasets.py `load_dataset`).

def load_shapes(root, split: str, image_size: int = 32, variant: str = "objects", n_train: int = 20000,
                n_test: int = 2000, seed: int = 0, generate_missing: bool = True,
                progress: bool = True) -> CaptionedImages:
    """Load root/<split> of the shapes dataset, generating the dataset first if it is missing.

    Files already on disk are used as they are (the generation arguments only matter when the
    dataset is generated); delete the folder to regenerate with other arguments.
    """
    root = Path(root)
    split_dir = root / split
    meta = split_dir / "metadata.jsonl"
    if not meta.exists():
        if not generate_missing:
            raise DatasetError(f"shapes dataset not found: {meta} does not exist (generate it with "
                               f"`python data/shapes.py --out {root}`)")
        try:
            check_output_folder(root)
        except NotOurFolder as e:
            raise DatasetError(f"shapes dataset not found: {meta} does not exist, and {e}") from None
        print(f"shapes dataset not found at {root}: generating it ({n_train} train / {n_test} test, "
              f"variant {variant}, seed {seed})")
        try:
            generate(root, variant=variant, n_train=n_train, n_test=n_test, seed=seed, progress=progress)
        except (NotOurFolder, LockError) as e:
            raise DatasetError(str(e)) from None
        if not meta.exists():
            raise DatasetError(f"generating the shapes dataset did not create {meta}")

    records = read_metadata(meta)
    if not records:
        raise DatasetError(f"{meta} has no records: the {split} split is empty")
    # One directory listing instead of 20k stat calls: it checks every listed PNG exists (naming a
    # missing one before any decoding starts) and counts the files for the cache key.
    present = {e.name: e for e in os.scandir(split_dir) if e.is_file(follow_symlinks=False)}
    for r in records:
        if r["file"] not in present:  # not a plain file in the folder: a path, a symlink, a FIFO, missing
            inside_folder(split_dir, r["file"], meta)
    n_png = sum(1 for name in present if name.endswith(".png"))
    paths = [split_dir / r["file"] for r in records]
    expected = n_train if split == "train" else n_test
    if progress and len(records) != expected:
        print(f"note: {split_dir} has {len(records)} images (config asks for {expected}); "
              f"using the files on disk")

    key = {"n_files": n_png, "n_records": len(records), "metadata": file_stamp(meta), "image_size": image_size,
           "files": files_digest(paths, present)}  # a PNG replaced in place changes its size or mtime
    images = cached_images(split_dir / ".cache" / f"images_{image_size}.npy", key,
                           (len(records), 3, image_size, image_size),
                           lambda: decode_images(paths, image_size, f"decoding {split_dir}", progress))
    captions, caption_ids, num_captions, flip_ids = build_caption_table([[r["caption"]] for r in records],
                                                                        shapes_flipped_captions(records))
    return CaptionedImages(torch.from_numpy(images), captions, caption_ids, num_captions, flip_ids,
                           metadata=records, name=f"shapes/{variant}/{split}")


def shapes_flipped_captions(records: list) -> list:
    """For each shapes record, [the caption true of its mirror image]: position words recomputed from
    the mirrored boxes (data/shapes.py `mirrored_caption`), flip_caption where a record lacks boxes."""
    return [[mirrored_caption(r["caption"], r.get("objects")) or flip_caption(r["caption"])] for r in records]


# ---------------------------------------------------------------------------------------------


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Generate the synthetic shapes dataset (data/SHAPES_SPEC.md).")
    parser.add_argument("--variant", choices=VARIANTS, default="objects",
                        help="objects: 1-2 objects per image; positions: 1 object, captions with position; "
                             "both: the two kinds in turn in one dataset")
    parser.add_argument("--out", required=True, help="output folder; gets train/ and test/")
    parser.add_argument("--n-train", type=_count, default=20000, help="training images")
    parser.add_argument("--n-test", type=_count, default=2000, help="test images")
    parser.add_argument("--seed", type=int, default=0, help="same seed and arguments give identical files")
    parser.add_argument("--preview", default=None, metavar="PATH.png",
                        help="also write a captioned grid of the first 16 test images")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.preview is not None and args.n_test == 0:
        parser.error("--preview needs --n-test > 0")

    try:
        out = generate(args.out, args.variant, args.n_train, args.n_test, args.seed,
                       progress=not args.no_progress)
    except OSError as e:
        raise SystemExit(f"error: cannot write the dataset to {args.out}: {e.strerror or e}")
    except (NotOurFolder, LockError) as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {args.n_train} train and {args.n_test} test images to {out}")
    if args.preview is not None:
        try:
            path = preview(out, args.preview)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot write the preview {args.preview}: {getattr(e, 'strerror', None) or e}")
        print(f"wrote preview {path}")


if __name__ == "__main__":
    main()
