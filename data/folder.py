"""Your own images as a dataset (`data.dataset: folder`): a folder of images (any size and format Pillow
reads) with their captions in a CSV or JSONL captions file, a Hugging Face ImageFolder metadata.jsonl, or a
caption .txt beside each image. Loaded through `data.datasets.load_dataset`."""
import csv
import hashlib
from pathlib import Path

import torch

from data.captioned import SPLITS, CaptionedImages, DatasetError, build_caption_table
from data.decode import cached_images, decode_images, inside_folder, jsonl_objects


def read_captions_file(path: Path) -> list:
    """-> [(line number, image, caption, split or None)] from a CSV (header with image,caption[,split])
    or a JSONL file (keys "image" or "file", "caption", optional "split")."""
    if not path.is_file():
        raise DatasetError(f"captions file not found: {path} (set data.captions_file, a CSV with "
                           f"columns image,caption or a JSONL with keys image,caption)")
    rows = []
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                fields = [c.strip() for c in (reader.fieldnames or [])]
                if "image" not in fields or "caption" not in fields:
                    raise DatasetError(f"{path}, line 1: the CSV header must contain the columns "
                                       f"image and caption, got {fields}")
                reader.fieldnames = fields
                for row in reader:
                    rows.append((reader.line_num, row.get("image"), row.get("caption"), row.get("split")))
        else:
            for lineno, rec in jsonl_objects(path):
                rows.append((lineno, rec.get("image", rec.get("file")), rec.get("caption"), rec.get("split")))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"cannot read captions file {path}: {e}") from e
    if not rows:
        raise DatasetError(f"{path}, line 1: the captions file has no rows")
    for lineno, image, caption, _ in rows:
        if not isinstance(image, str) or not image.strip():
            raise DatasetError(f"{path}, line {lineno}: missing image path")
        if not isinstance(caption, str) or not caption.strip():
            raise DatasetError(f"{path}, line {lineno}: empty caption for {image}")
    return rows


def folder_split(rows: list, captions_path: Path, seed: int) -> dict:
    """-> {image: (split, [captions])}, images in order of first appearance. Uses the split
    column where it exists; otherwise a seeded 5% of the images (at least 1) become the test set."""
    images: dict = {}
    has_split = any(s is not None and str(s).strip() for _, _, _, s in rows)
    for lineno, image, caption, split in rows:
        image = image.strip()
        if has_split:
            split = str(split or "").strip().lower()
            if split not in SPLITS:
                raise DatasetError(f"{captions_path}, line {lineno}: split must be train or test, got {split!r}")
        entry = images.setdefault(image, [split, []])
        if has_split and entry[0] != split:
            raise DatasetError(f"{captions_path}, line {lineno}: {image} is in both {entry[0]} and {split}")
        entry[1].append(caption.strip())
    if not has_split:
        n = len(images)
        if n < 2:
            raise DatasetError(f"{captions_path}: needs at least 2 images to hold one out for test "
                               f"(or add a split column)")
        g = torch.Generator().manual_seed(seed)
        test = set(torch.randperm(n, generator=g)[:max(1, round(0.05 * n))].tolist())
        for i, entry in enumerate(images.values()):
            entry[0] = "test" if i in test else "train"
    return images


# The conventions people bring besides a captions file: Hugging Face's ImageFolder (a metadata.jsonl
# with "file_name" and "text", in the root or in train/ and test/) and a caption .txt beside each image.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def read_hf_metadata(path: Path, prefix: str = "", split: str | None = None) -> list:
    """Rows [(line number, image, caption, split)] of a Hugging Face ImageFolder metadata.jsonl:
    "file_name" relative to the file's folder (written here relative to root via `prefix`) and the
    caption in "text" (or "caption"). A list of captions gives alternative captions."""
    rows = []
    for lineno, rec in jsonl_objects(path):
        name, text = rec.get("file_name"), rec.get("text", rec.get("caption"))
        if not isinstance(name, str) or not name.strip():
            raise DatasetError(f"{path}, line {lineno}: missing \"file_name\" (Hugging Face ImageFolder format)")
        texts = text if isinstance(text, list) else [text]
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise DatasetError(f"{path}, line {lineno}: expected a non-empty \"text\" caption for {name}")
            rows.append((lineno, prefix + name.strip(), t, split))
    if not rows:
        raise DatasetError(f"{path}, line 1: the metadata file has no rows")
    return rows


def read_caption_txt_files(root: Path) -> list:
    """Rows for images with a caption file beside them (photo.png + photo.txt; each non-empty line
    is an alternative caption). Images under root/train/ and root/test/ take that split; images
    without a .txt are left out."""
    rows, uncaptioned = [], 0
    for img in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        rel = img.relative_to(root)
        if rel.parts[0].startswith("."):  # .cache/ and other hidden folders
            continue
        txt = img.with_suffix(".txt")
        if not txt.is_file():
            uncaptioned += 1
            continue
        try:
            lines = [l.strip() for l in txt.read_text(encoding="utf-8-sig").splitlines() if l.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetError(f"cannot read caption file {txt}: {e}") from e
        if not lines:
            raise DatasetError(f"{txt}, line 1: the caption file is empty")
        split = rel.parts[0] if len(rel.parts) > 1 and rel.parts[0] in SPLITS else None
        rows += [(i, rel.as_posix(), line, split) for i, line in enumerate(lines, 1)]
    if rows and uncaptioned:
        print(f"note: {root}: {uncaptioned} images have no caption .txt beside them and are left out")
    if rows and any(r[3] is None for r in rows) and any(r[3] is not None for r in rows):
        raise DatasetError(f"{root}: some captioned images are in train/ or test/ and some are not; "
                           f"put all of them in the two folders, or none")
    return rows


def folder_rows(root: Path, captions_file: str) -> tuple[list, Path]:
    """The caption rows of a folder dataset and the file they came from (for messages): the captions
    file (CSV/JSONL) when it exists, else a Hugging Face metadata.jsonl (root/, or root/train/ and
    root/test/), else caption .txt files beside the images."""
    cap_path = root / captions_file
    if cap_path.is_file():
        if cap_path.name == "metadata.jsonl":
            return read_hf_metadata(cap_path), cap_path
        return read_captions_file(cap_path), cap_path
    if (root / "metadata.jsonl").is_file():
        return read_hf_metadata(root / "metadata.jsonl"), root / "metadata.jsonl"
    split_files = [(sp, root / sp / "metadata.jsonl") for sp in SPLITS if (root / sp / "metadata.jsonl").is_file()]
    if split_files:
        return [r for sp, f in split_files for r in read_hf_metadata(f, f"{sp}/", sp)], split_files[0][1]
    rows = read_caption_txt_files(root) if root.is_dir() else []
    if rows:
        return rows, root
    raise DatasetError(f"captions file not found: {cap_path} (set data.captions_file, a CSV with columns "
                       f"image,caption or a JSONL with keys image,caption; or give the folder a Hugging Face "
                       f"metadata.jsonl with file_name,text, or a caption .txt beside each image)")


def load_folder(root, split: str, image_size: int = 32, captions_file: str = "captions.jsonl",
                seed: int = 0, progress: bool = True) -> CaptionedImages:
    """Load a folder of images (any Pillow-readable format and size) with a captions file.

    Several rows for the same image become its caption variants. Image paths are relative to root.
    """
    root = Path(root)
    rows, cap_path = folder_rows(root, captions_file)
    images = folder_split(rows, cap_path, seed)
    chosen = [(img, caps) for img, (s, caps) in images.items() if s == split]
    if not chosen:
        raise DatasetError(f"{cap_path}: no images in the {split} split")
    paths = [inside_folder(root, img, cap_path) for img, _ in chosen]  # also names a missing image
    digest = hashlib.sha1()
    for p in paths:
        st = p.stat()
        digest.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    key = {"files": digest.hexdigest(), "n": len(paths), "image_size": image_size}
    arr = cached_images(root / ".cache" / f"{split}_{image_size}.npy", key,
                        (len(paths), 3, image_size, image_size),
                        lambda: decode_images(paths, image_size, f"decoding {root} ({split})", progress))
    captions, caption_ids, num_captions, flip_ids = build_caption_table([caps for _, caps in chosen])
    return CaptionedImages(torch.from_numpy(arr), captions, caption_ids, num_captions, flip_ids,
                           name=f"folder/{root.name}/{split}")


