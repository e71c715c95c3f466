"""Pictures people read: rounded plot ticks, nothing clipped at the right edge, sweep points joined in
guidance order, training curves, and captions whose words stay apart when they wrap."""
import numpy as np
import pytest
from PIL import Image, ImageDraw

from dalle2.core.images import _font, _wrap, captioned_grid, draw_text
from dalle2.core.plots import line_plot, nice_ticks, scatter_plot
from dalle2.evaluation.sweep import guidance_lines


@pytest.mark.parametrize("lo,hi,ticks", [
    (0.103, 0.352, [0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4]),
    (0.419, 0.756, [0.4, 0.5, 0.6, 0.7, 0.8]),
    (10.0, 1000.0, [0, 200, 400, 600, 800, 1000]),
    (2e-4, 1e-3, [2e-4, 4e-4, 6e-4, 8e-4, 1e-3]),
    (1.5, 1.5, [1.3, 1.4, 1.5, 1.6, 1.7]),
])
def test_nice_ticks_are_round_and_cover_the_range(lo, hi, ticks):
    got, _ = nice_ticks(lo, hi)
    assert got == pytest.approx(ticks)
    assert got[0] <= lo and got[-1] >= hi


def _ink_columns(img: Image.Image, rows=None) -> np.ndarray:
    a = np.asarray(img.convert("L"))
    if rows is not None:
        a = a[rows]
    return (a < 200).any(axis=0)


def test_scatter_labels_stay_inside_and_points_join_in_guidance_order(tmp_path):
    pts = [(1.0, 0.2, "g5/p1/s50"), (0.1, 0.5, "g1/p1/s50"), (0.99, 0.9, "a long label at the right edge")]
    path = scatter_plot([{"title": "exact match vs diversity", "xlabel": "x", "ylabel": "exact match",
                          "points": pts, "highlight": 2, "lines": [[1, 0, 2]]}], tmp_path / "s.png", size=(300, 240))
    img = Image.open(path)
    assert img.size == (300, 240)
    assert not _ink_columns(img)[-2:].any()  # nothing drawn into the last columns: no clipped text
    settings = [{"guidance_scale": g, "prior_guidance_scale": pg, "steps": 50} for g in (3, 1, 2) for pg in (1, 2)]
    assert guidance_lines(settings) == [[2, 4, 0], [3, 5, 1]]
    # points of another sampler or prior step count are another line, never joined with these
    mixed = [{"guidance_scale": g, "prior_guidance_scale": 1, "steps": 15, "prior_steps": 15, "sampler": s}
             for s in ("ddim", "dpmpp2m") for g in (3, 1)]
    assert guidance_lines(mixed) == [[1, 0], [3, 2]]


def test_line_plot_draws_every_series(tmp_path):
    path = line_plot([{"title": "loss", "xlabel": "step", "ylabel": "loss",
                       "series": [{"label": "train", "points": [(s, 1 / s) for s in range(1, 50)]},
                                  {"label": "eval", "points": [(10, 0.2), (40, float("nan")), (49, 0.05)]}]}],
                     tmp_path / "l.png")
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    navy = ((a[..., 0] < 40) & (a[..., 1] < 40) & (a[..., 2] > 90)).sum()
    orange = ((a[..., 0] > 200) & (a[..., 1] > 100) & (a[..., 1] < 170) & (a[..., 2] < 60)).sum()
    assert navy > 100 and orange > 20


def test_wrapped_captions_keep_every_word_and_space():
    font = _font()
    caption = "a handwritten digit seven"
    for width in (40, 60, 90, 128, 400):
        assert " ".join(_wrap(caption, font, width)) == caption
    # the gap between words is visible: Pillow's default font draws a 2-px space ("photoof")
    img = Image.new("L", (200, 20), 255)
    draw_text(ImageDraw.Draw(img), (2, 2), "photo of an", font, 0)
    ink = _ink_columns(img)
    cols = np.flatnonzero(ink)
    gaps = np.diff(cols) - 1
    assert (gaps >= 3).sum() == 2  # exactly the two spaces, never inside a word


def test_captioned_grid_wraps_inside_the_tile():
    tiles = [Image.new("RGB", (24, 24), (200, 50, 50)) for _ in range(2)]
    grid = captioned_grid(tiles, ["a handwritten digit seven", "a photo of an automobile truck"], cols=2, scale=4)
    # the captions wrap under their own 96-px tile: the 4-px gutter between the tiles stays white
    a = np.asarray(grid.convert("L"))
    assert (a[96 + 4:, 96 + 4:96 + 8] > 200).all()


def test_training_draws_loss_png_at_evaluations_and_the_end(tmp_path):
    import torch

    from dalle2.core.config import load_config
    from dalle2.core.training import Trainer

    class Regression(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(3, 1)

        def loss(self, x):
            return ((self.net(x) - x.sum(1, keepdim=True)) ** 2).mean()

    cfg = load_config(preset="tiny", overrides=[f"prior.train.{k}" for k in (
        "steps=8", "warmup_steps=2", "log_every=1", "eval_every=4", "save_every=4", "batch_size=8")])
    torch.manual_seed(0)
    trainer = Trainer("prior", cfg, cfg.prior.train, Regression(), tmp_path)
    png = tmp_path / "prior" / "loss.png"
    seen = []

    def evaluate(model, step):
        seen.append((step, png.is_file()))
        return {"ok": 1.0}
    trainer.fit(lambda step: {"x": torch.randn(8, 3)}, evaluate=evaluate)
    assert seen == [(4, False), (8, True)]  # drawn after the step-4 evaluation, redrawn at the end
    img = Image.open(png)
    assert img.size == (920, 300)
    assert (np.asarray(img.convert("L")) < 128).mean() > 0.01  # axes, text and two curves


def test_loss_curve_survives_a_torn_metrics_line(tmp_path):
    from dalle2.core.plots import training_curves
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 10, "loss": 1.0, "lr": 0.1}\n{"step": 20, "loss": 0.5, "lr": 0.1}\n{"step": 30, "lo')
    assert training_curves(metrics, tmp_path / "loss.png", "clip").is_file()
