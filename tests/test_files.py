"""dalle2/core/files.py: every artifact is written through one atomic helper."""
import pytest

from dalle2.core.files import atomic_write, atomic_write_text
from dalle2.core.images import save_image_atomic


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = atomic_write_text(tmp_path / "sub" / "report.md", "old")  # the folder is created
    assert path.read_text() == "old"

    def half_then_crash(f):
        f.write(b"new, half wri")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, half_then_crash)
    assert path.read_text() == "old"
    assert [p.name for p in path.parent.iterdir()] == ["report.md"]


def test_images_keep_their_format_from_the_suffix(tmp_path):
    from PIL import Image
    img = Image.new("RGB", (4, 3), (255, 0, 0))
    for name, fmt in (("a.png", "PNG"), ("b.JPG", "JPEG")):
        with Image.open(save_image_atomic(img, tmp_path / name)) as back:
            assert back.format == fmt and back.size == (4, 3)
    with pytest.raises(ValueError, match="format"):
        save_image_atomic(img, tmp_path / "c.unknown")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.JPG"]
