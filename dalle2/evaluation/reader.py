"""The attribute reader: which objects does a small shapes image show? (evaluation, not a model stage)

"Does the picture show what the caption says?" On the shapes data (data/SHAPES_SPEC.md) this has
an exact answer once the objects of an image are read back: colour, shape, size word, position
word. The reader does that for 32x32 (or 64x64) images, the resolution the models work at.

Design, and why:
- Colour and geometry are analytic. Every object pixel of a rendered 128-px image is exactly a
  palette colour and the background is gray, and Pillow's LANCZOS resize is linear (up to uint8
  rounding and clipping), so a downsampled pixel is gray + alpha * (colour - gray) with alpha its
  coverage, or a mix of two objects where they nearly touch. Fitting every palette line to every
  pixel gives the colour (robust to edge blending, which only moves a pixel along its line) and
  the coverage map alpha, whose moments (mass, centroid, covariance) locate and size the object
  to sub-pixel accuracy. Connected components come from a data-parallel union-find on the pixel
  graph (vectorised over the batch; no scipy); a blob is split where it holds sizeable parts of
  different colours, so two objects of different colours that blur into each other stay two.
- Shape is learned: a small CNN reads each object's coverage map (colour-free, centred and scale-normalised:
  six silhouettes to learn) and six rotation-invariant moments. It trains on CPU in ~20 s on fresh renders.
- The 128-px bounding box (hence the size and position words) comes from per-shape least-squares
  fits from the moments to the true box, calibrated on the same rendered scenes.

Inherent limits (measured by `reader_accuracy`): a rectangle whose sides differ by a pixel or two
at 128 px is a square at 32 px (likewise ellipse / circle); small triangles are ~5 px wide; a box
near a size threshold or the canvas midline can get the neighbouring word; two same-coloured
objects that nearly touch read as one.

Usage:
    reader = AttributeReader.default(image_size=32)      # trains once (~seconds), then cached
    objects = reader.read(images)                         # images: (N, 3, 32, 32) uint8 or [-1, 1]
    reader_accuracy(reader, n=2000, seed=123)             # its ceiling on fresh rendered scenes
"""
from __future__ import annotations

import itertools
import math
import os
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dalle2.core.checkpoint import atomic_torch_save
from data.captions import COLOURS, SHAPES
from data.decode import square_resize
from data.shapes import BACKGROUND, CANVAS, position_word, render, sample_scene, size_word

VERSION = 1  # bump when reading or training changes, so cached readers are rebuilt
COLOUR_NAMES = tuple(COLOURS)
_PALETTE = torch.tensor([COLOURS[c] for c in COLOUR_NAMES], dtype=torch.float32)  # (17, 3)
_DIRS = _PALETTE - torch.tensor(BACKGROUND, dtype=torch.float32)  # (17, 3): each colour's line from gray
# silver = gray + 0.5 * (white - gray): the same line, so a white object's half-covered rim pixels
# ARE silver. Both share one group for connectivity; the component's peak coverage decides.
_WHITE, _SILVER = COLOUR_NAMES.index("white"), COLOUR_NAMES.index("silver")
_GROUP = torch.tensor([_WHITE if i == _SILVER else i for i in range(len(COLOUR_NAMES))])

FG_THRESHOLD = 20.0   # RGB distance from gray above which a pixel belongs to an object
ALPHA_RANGE = (-0.2, 1.2)  # coverage clamp in colour fits: LANCZOS ringing over/undershoots a bit
WHITE_PEAK = 0.75     # peak white coverage above which a white/silver component is white
MIN_MASS_32 = 5.0     # smallest object, in fully covered pixels at 32 px (the smallest triangle is ~8.4)
MIN_SD_32 = 0.5       # smallest object's narrower standard deviation at 32 px (measured >= 0.8)
MIN_PART_32 = 5       # pixels at 32 px of one colour that make a separate object within a blob
CROP = 16             # side of the scale-normalised coverage crop the shape CNN sees
CROP_SIGMAS = 3.0     # crop half-side in standard deviations (a triangle's vertex is at 2.8 sigma)


# ---------------------------------------------------------------------------------------------
# Analytic stage: colour lines, connected components, coverage moments.

def to_255(images: torch.Tensor) -> torch.Tensor:
    """Images -> float (N, 3, H, W) in [0, 255], rounded as if saved to PNG.

    uint8 input is taken as is; floating input is taken to be in the models' range [-1, 1]
    (the project convention) and clipped.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float()
    if not images.dtype.is_floating_point:
        raise ValueError(f"images must be uint8 or float in [-1, 1], got {images.dtype}")
    return ((images.float() + 1) * 127.5).clamp(0, 255).round()


def colour_fit(d: torch.Tensor):
    """Fit each palette line gray + a * (colour - gray) to pixels.

    d: (P, 3) pixel minus gray, in [0, 255] units. Returns alpha (P, 17), the coverage along each
    line, and resid2 (P, 17), the squared RGB distance to the line with alpha clamped to
    ALPHA_RANGE (so white cannot explain black, nor silver a fully white pixel).
    """
    norm2 = (_DIRS ** 2).sum(1)  # (17,)
    proj = d @ _DIRS.T  # (P, 17)
    alpha = proj / norm2
    a = alpha.clamp(*ALPHA_RANGE)
    resid2 = (d * d).sum(1, keepdim=True) - 2 * a * proj + a * a * norm2
    return alpha, resid2.clamp_min(0)


def label_components(fg: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Connected components of foreground pixels, 8-connected, joining only pixels of one group.

    fg: (N, H, W) bool; group: (P,) long, the group of each foreground pixel in `fg.nonzero()`
    order. Returns (P,) long: a component id per foreground pixel (the largest pixel number in
    the component; unique across the batch). Union-find done data-parallel on the pixel graph
    (Shiloach-Vishkin style): every edge hooks the smaller root under the larger, then pointer
    jumping flattens the trees; O(log P) rounds, no Python loop over pixels.
    """
    n, h, w = fg.shape
    num = fg.sum().item()
    node = torch.full((n, h, w), -1, dtype=torch.long)
    node[fg] = torch.arange(num)
    gmap = torch.full((n, h, w), -1, dtype=torch.long)
    gmap[fg] = group
    us, vs = [], []
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):  # the other four neighbours are symmetric
        ys, ye = (0, h - dy)
        xs, xe = (0, w - dx) if dx >= 0 else (1, w)
        a = node[:, ys:ye, xs:xe]
        b = node[:, ys + dy:ye + dy, xs + dx:xe + dx]
        ok = (a >= 0) & (b >= 0) & (gmap[:, ys:ye, xs:xe] == gmap[:, ys + dy:ye + dy, xs + dx:xe + dx])
        us.append(a[ok])
        vs.append(b[ok])
    u, v = torch.cat(us), torch.cat(vs)
    parent = torch.arange(num)
    while True:
        pu, pv = parent[u], parent[v]
        differ = pu != pv
        if not differ.any():
            return parent
        # invariant parent[i] >= i: roots only ever hook under larger roots, so no cycles
        parent.scatter_reduce_(0, torch.minimum(pu, pv)[differ], torch.maximum(pu, pv)[differ], "amax")
        while True:  # pointer jumping until every node points at its root
            jumped = parent[parent]
            if torch.equal(jumped, parent):
                break
            parent = jumped


def split_by_colour(fg: torch.Tensor, group: torch.Tensor, min_part: float) -> torch.Tensor:
    """Objects = connected foreground blobs, split where they hold sizeable parts of different colours.

    fg: (N, H, W) bool; group: (P,) colour group per foreground pixel. Two objects of different
    colours that blur together are two same-colour parts of one blob; pixels mixing two objects,
    or a generated image's off-colour specks, are small parts and go to the largest part of their
    blob, so they neither count as objects nor break one up. Returns (P,) compact object ids.
    """
    _, blob = torch.unique(label_components(fg, torch.zeros_like(group)), return_inverse=True)  # (P,)
    _, part = torch.unique(label_components(fg, group), return_inverse=True)  # (P,) finer than blob
    if part.numel() == 0:
        return part
    k = int(part.max()) + 1
    size = torch.bincount(part, minlength=k)  # (k,) pixels per part
    blob_of = torch.zeros(k, dtype=torch.long).index_put_((part,), blob)
    # largest part of every blob, size and id packed in one integer for a single scatter-max
    key = size * k + torch.arange(k)
    largest = torch.zeros(int(blob.max()) + 1, dtype=torch.long).scatter_reduce(0, blob_of, key, "amax") % k
    final = torch.where(size >= min_part, torch.arange(k), largest[blob_of])
    return torch.unique(final[part], return_inverse=True)[1]


def find_objects(images: torch.Tensor, batch_size: int = 1024) -> dict:
    """Segment images into objects with a colour and coverage moments (no shape yet).

    images: (N, 3, H, W), see `to_255`; read batch_size at a time (the pixel graph of a huge batch
    needs more union-find rounds). Returns a dict of tensors over the K objects found:
      image (K,) long: which image; colour (K,) long: index into COLOUR_NAMES;
      mass (K,): summed coverage in pixels; centre (K, 2): coverage centroid (x, y) in pixel
      indices; cov (K, 3): coverage covariance (xx, yy, xy); alpha (K, H, W): each object's
      coverage map (zero outside the object), for the shape CNN.
    """
    images = images.cpu()
    if images.shape[0] > batch_size:
        parts = [find_objects(images[i:i + batch_size], batch_size) for i in range(0, images.shape[0], batch_size)]
        for i, part in zip(range(0, images.shape[0], batch_size), parts):
            part["image"] += i
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    x = to_255(images)
    n, _, h, w = x.shape
    d = x - torch.tensor(BACKGROUND, dtype=x.dtype).view(1, 3, 1, 1)
    d = d.permute(0, 2, 3, 1)  # (N, H, W, 3)
    # Which pixels belong to objects, and of which colour, is decided on a 3x3-smoothed copy:
    # generated images are not exactly gray + palette, and averaging nine pixels divides their
    # noise by three. The fits and moments below use the raw pixels (smoothing would blur them).
    smooth = F.avg_pool2d(d.permute(0, 3, 1, 2), 3, 1, 1, count_include_pad=False).permute(0, 2, 3, 1)
    fg = (smooth.pow(2).sum(-1) > FG_THRESHOLD ** 2) & (d.pow(2).sum(-1) > FG_THRESHOLD ** 2)  # (N, H, W)
    alpha, resid2 = colour_fit(d[fg])  # (P, 17) each, foreground pixels only
    group = _GROUP[resid2.argmin(1)]  # (P,)
    comp = split_by_colour(fg, group, MIN_PART_32 * (h * w) / (32 * 32))
    k = int(comp.max()) + 1 if comp.numel() else 0

    # Each object's colour is the line that fits all its pixels best.
    fit = torch.zeros(k, len(COLOUR_NAMES)).index_add_(0, comp, resid2)
    colour = fit.argmin(1)
    white_peak = torch.full((k,), -1e9).scatter_reduce(0, comp, alpha[:, _WHITE], "amax")
    is_white_group = _GROUP[colour] == _WHITE
    colour = torch.where(is_white_group & (white_peak >= WHITE_PEAK), _WHITE,
                         torch.where(is_white_group, _SILVER, colour))

    # The object = its pixels plus the background ring around it (coverage below the threshold),
    # so its coverage mass is complete whatever its colour's contrast with gray.
    comp_map = torch.zeros(n, h, w)
    comp_map[fg] = comp.float() + 1
    ring = F.max_pool2d(comp_map.unsqueeze(1), 3, 1, 1).squeeze(1)  # (N, H, W)
    obj_map = torch.where(fg, comp_map, ring).long() - 1
    member = obj_map >= 0
    img_of, yy, xx = member.nonzero(as_tuple=True)
    oid = obj_map[member]  # (Q,)
    dirs = _DIRS[colour[oid]]  # (Q, 3)
    a = ((d[member] * dirs).sum(1) / (dirs * dirs).sum(1)).clamp(0, ALPHA_RANGE[1])  # (Q,) coverage

    def total(v):
        return torch.zeros(k).index_add_(0, oid, v)

    mass = total(a).clamp_min(1e-6)
    cx, cy = total(a * xx) / mass, total(a * yy) / mass
    dx, dy = xx - cx[oid], yy - cy[oid]
    cov = torch.stack([total(a * dx * dx), total(a * dy * dy), total(a * dx * dy)], 1) / mass[:, None]
    img = torch.zeros(k, dtype=torch.long).index_put_((oid,), img_of)  # (K,) which image
    maps = torch.zeros(k, h, w).index_put_((oid, yy, xx), a)

    # Drop specks: pixels mixing two nearly touching objects (a thin line along the gap), noise in
    # generated images. On 9,000 rendered objects the smallest real one has mass 8.4 and narrower
    # standard deviation 0.8 px at 32 px; specks have mass < 3 or are one pixel thin.
    vx, vy, vxy = cov.unbind(1)
    sd_min = ((vx + vy) / 2 - (((vx - vy) / 2) ** 2 + vxy ** 2).sqrt()).clamp_min(0).sqrt()  # (K,)
    keep = (mass >= MIN_MASS_32 * (h * w) / (32 * 32)) & (sd_min >= MIN_SD_32 * w / 32)
    return {"image": img[keep], "colour": colour[keep], "mass": mass[keep],
            "centre": torch.stack([cx, cy], 1)[keep], "cov": cov[keep], "alpha": maps[keep]}


def shape_features(obj: dict, scale: float) -> torch.Tensor:
    """Moment features of each object that a rotation or flip leaves unchanged -> (K, 6).

    log mass; compactness log(mass / sqrt(l1 l2)) from the covariance eigenvalues l1 >= l2 (12 for
    a box, 4 pi for an ellipse, 10.4 for a triangle); |correlation| of x and y (0 for axis-aligned
    boxes and ellipses); and the elongation three ways: 0.5 log(l1 / l2), its log, and the log of
    the difference of the standard deviations in 128-px units. Squares and circles have exactly
    equal sides and rectangles and ellipses can differ by a pixel or two, so the decision lies at
    tiny elongations: the log features spread that region out for the classifier.
    """
    vx, vy, vxy = obj["cov"].unbind(1)
    mean, diff = (vx + vy) / 2, torch.sqrt(((vx - vy) / 2) ** 2 + vxy ** 2)
    l1, l2 = (mean + diff).clamp_min(1e-4), (mean - diff).clamp_min(1e-4)
    corr = vxy.abs() / torch.sqrt(vx * vy).clamp_min(1e-4)
    elong = 0.5 * (l1 / l2).log()
    sd_diff = (l1.sqrt() - l2.sqrt()) * scale
    return torch.stack([obj["mass"].log(), (obj["mass"] / (l1 * l2).sqrt()).log(), corr,
                        elong, (elong + 1e-3).log(), (sd_diff + 0.05).log()], 1)


def shape_crops(obj: dict, size: int = CROP) -> torch.Tensor:
    """Each object's coverage map, centred on its centroid and scaled to a common size.

    Returns (K, 1, size, size): a square window of half-side CROP_SIGMAS * the larger standard
    deviation (+1 px), so aspect ratio is kept (square vs rectangle) but absolute scale is not
    (that is in the features), and the CNN learns six silhouettes instead of six x all scales.
    """
    k, h, w = obj["alpha"].shape
    if k == 0:
        return torch.zeros(0, 1, size, size)
    half = CROP_SIGMAS * obj["cov"][:, :2].max(1).values.sqrt() + 1  # (K,) pixels
    theta = torch.zeros(k, 2, 3)
    theta[:, 0, 0] = half * 2 / w  # align_corners=False: pixel i sits at (2i + 1) / W - 1
    theta[:, 1, 1] = half * 2 / h
    theta[:, 0, 2] = (2 * obj["centre"][:, 0] + 1) / w - 1
    theta[:, 1, 2] = (2 * obj["centre"][:, 1] + 1) / h - 1
    grid = F.affine_grid(theta, (k, 1, size, size), align_corners=False)
    return F.grid_sample(obj["alpha"].unsqueeze(1), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)


class ShapeNet(nn.Module):
    """A small CNN: coverage crop (K, 1, CROP, CROP) + moment features (K, F) -> shape logits (K, 6).

    The features are standardised with statistics of the training set kept as buffers, so the
    state dict alone rebuilds the classifier.
    """

    def __init__(self, num_features: int = 6, width: int = 16, hidden: int = 128):
        super().__init__()
        self.config = {"num_features": num_features, "width": width, "hidden": hidden}
        # strided convolutions instead of max pooling: half the CPU training time, same accuracy
        self.conv = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, stride=2), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, stride=2), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Linear(2 * width * (CROP // 4) ** 2 + num_features, hidden), nn.ReLU(),
                                  nn.Linear(hidden, len(SHAPES)))
        self.register_buffer("feat_mean", torch.zeros(num_features))
        self.register_buffer("feat_std", torch.ones(num_features))

    def forward(self, crops: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        z = self.conv(crops).flatten(1)  # (K, 2 * width * (CROP / 4) ** 2)
        return self.head(torch.cat([z, (feats - self.feat_mean) / self.feat_std], 1))


# ---------------------------------------------------------------------------------------------
# Boxes: per-shape least squares from coverage moments to the 128-px bounding box.

def box_design(obj: dict, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Regressors for the box: centre (K, 2, 2) = [1, centroid in 128-px units] per axis, and
    extent (K, 4) = [1, log mass, log sd_x, log sd_y] (the half-extent is exp of a linear fit)."""
    c128 = (obj["centre"] + 0.5) * scale - 0.5  # pixel centres: index i at 32 px spans 4i .. 4i + 3
    centre = torch.stack([torch.ones_like(c128), c128], 2)  # (K, 2, 2)
    sd = obj["cov"][:, :2].clamp_min(1e-4).sqrt().log()
    extent = torch.cat([torch.ones_like(obj["mass"])[:, None], obj["mass"].log()[:, None], sd], 1)
    return centre, extent


def _lstsq(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Coefficients c minimising |x c - y|^2; x: (K, D), y: (K,) -> (D,). In float64 for accuracy."""
    return torch.linalg.lstsq(x.double(), y.double()[:, None]).solution[:, 0].float()


def fit_boxes(obj: dict, shape: torch.Tensor, boxes: torch.Tensor, scale: float):
    """Least-squares box coefficients per shape. shape: (K,) true shape ids; boxes: (K, 4) true
    boxes [x1, y1, x2, y2]. Returns centre_coef (6, 2, 2) and extent_coef (6, 2, 4) (x and y)."""
    centre_x, extent_x = box_design(obj, scale)
    mid = (boxes[:, :2] + boxes[:, 2:]) / 2  # (K, 2)
    half = ((boxes[:, 2:] - boxes[:, :2]) / 2).clamp_min(0.5).log()  # (K, 2)
    centre_coef = torch.zeros(len(SHAPES), 2, 2)
    extent_coef = torch.zeros(len(SHAPES), 2, 4)
    for s in range(len(SHAPES)):
        sel = shape == s
        if sel.sum() < 8:
            raise ValueError(f"too few training objects of shape {SHAPES[s]!r} to fit boxes; render more scenes")
        for axis in range(2):
            centre_coef[s, axis] = _lstsq(centre_x[sel, axis], mid[sel, axis])
            extent_coef[s, axis] = _lstsq(extent_x[sel], half[sel, axis])
    return centre_coef, extent_coef


def predict_boxes(obj: dict, shape: torch.Tensor, centre_coef, extent_coef, scale: float) -> torch.Tensor:
    """(K, 4) boxes [x1, y1, x2, y2] in 128-px coordinates from the moments and the shape ids."""
    centre_x, extent_x = box_design(obj, scale)
    mid = (centre_x * centre_coef[shape]).sum(-1)  # (K, 2)
    half = (extent_x[:, None, :] * extent_coef[shape]).sum(-1).exp()  # (K, 2)
    # squares, circles and regular polygons have equal sides by construction
    equal = torch.tensor([s in ("square", "circle", "triangle", "pentagon") for s in SHAPES])[shape]
    half = torch.where(equal[:, None], (half[:, :1] * half[:, 1:]).sqrt().expand(-1, 2), half)
    return torch.cat([mid - half, mid + half], 1)


# ---------------------------------------------------------------------------------------------
# Rendered scenes: training data for the reader and the test of its ceiling.

def render_scenes(n: int, rng: random.Random, image_size: int = 32):
    """n scenes of the default "objects" variant (hold-out pairs allowed), rendered at 128 px and
    resized exactly as the datasets do. Returns (images (n, 3, S, S) uint8, list of object lists)."""
    scenes = [sample_scene(rng, "objects", allow_holdout=True)["objects"] for _ in range(n)]
    images = np.stack([square_resize(render(objs), image_size) for objs in scenes]) if n else \
        np.zeros((0, image_size, image_size, 3), np.uint8)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), scenes  # (n, 3, S, S)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes a (A, 4) and b (B, 4), [x1, y1, x2, y2] -> (A, B)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area_a, area_b = ((x[:, 2:] - x[:, :2]).clamp_min(0).prod(-1) for x in (a, b))
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp_min(1e-9)


def match_boxes(pred: list, truth: list) -> list:
    """Best one-to-one matching of predicted to true boxes by total IoU (brute force: scenes hold
    one or two objects). Returns [(i_pred, i_true), ...] for pairs that overlap at all."""
    if not pred or not truth:
        return []
    iou = box_iou(torch.tensor(pred, dtype=torch.float32), torch.tensor(truth, dtype=torch.float32))
    small, large = (pred, truth) if len(pred) <= len(truth) else (truth, pred)
    best, best_pairs = -1.0, []
    for perm in itertools.permutations(range(len(large)), len(small)):
        pairs = [(i, j) if small is pred else (j, i) for i, j in enumerate(perm)]
        total = sum(iou[p, t].item() for p, t in pairs)
        if total > best:
            best, best_pairs = total, pairs
    return [(p, t) for p, t in best_pairs if iou[p, t] > 0]


# ---------------------------------------------------------------------------------------------
# The reader.

class AttributeReader:
    """Reads the objects of shapes images: colour, shape, size word, position word, 128-px box.

    Built by `AttributeReader.train` (or `.default`, which caches it); one reader per resolution.
    """

    def __init__(self, image_size: int, net: ShapeNet, centre_coef: torch.Tensor, extent_coef: torch.Tensor):
        self.image_size = int(image_size)
        self.net = net.eval()
        self.centre_coef, self.extent_coef = centre_coef, extent_coef
        self.scale = CANVAS / self.image_size

    @torch.no_grad()
    def detect(self, images: torch.Tensor, batch_size: int = 1024) -> dict:
        """Tensors for all objects of all images: find_objects' dict (without the coverage maps)
        plus shape (K,) long, index into SHAPES, and box (K, 4), 128-px [x1, y1, x2, y2]."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"this reader reads {self.image_size}x{self.image_size} images, got "
                             f"{tuple(images.shape[-2:])}; train one with image_size={images.shape[-1]}")
        parts = []
        for start in range(0, max(images.shape[0], 1), batch_size):
            obj = find_objects(images[start:start + batch_size])
            obj["image"] += start
            obj["shape"] = self.net(shape_crops(obj), shape_features(obj, self.scale)).argmax(1)
            obj["box"] = predict_boxes(obj, obj["shape"], self.centre_coef, self.extent_coef, self.scale)
            del obj["alpha"]  # (K, H, W): the bulk of the memory, no longer needed
            parts.append(obj)
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}

    def read(self, images: torch.Tensor) -> list:
        """The objects of each image, largest first.

        images: (N, 3, S, S), S = self.image_size; uint8 in [0, 255], or float in the models'
        range [-1, 1] (values outside are clipped); any device (reading runs on the CPU).
        Returns N lists of dicts {"colour", "shape", "size", "position", "bbox"}: bbox
        [x1, y1, x2, y2], whole (inclusive)
        pixels of the 128-px canvas like the metadata's; the size and position words are computed
        from it with data.shapes' own rules.
        """
        obj = self.detect(images)
        out = [[] for _ in range(images.shape[0])]
        for j in torch.argsort(obj["mass"], descending=True).tolist():
            # boxes are whole pixels (spec), so the nearest whole box is the likeliest, and the
            # words then apply the spec's thresholds exactly as the generator did
            box = [int(v) for v in obj["box"][j].round().clamp(0, CANVAS - 1).tolist()]
            out[obj["image"][j]].append({"colour": COLOUR_NAMES[obj["colour"][j]], "shape": SHAPES[obj["shape"][j]],
                                         "size": size_word(box), "position": position_word(box), "bbox": box})
        return out

    # -- training ------------------------------------------------------------------------------

    @classmethod
    def train(cls, n_scenes: int = 12000, seed: int = 0, image_size: int = 32, epochs: int = 12, batch_size: int = 128,
              lr: float = 2e-3, noise: float = 12.0, progress: bool = True) -> "AttributeReader":
        """Render n_scenes scenes, calibrate the boxes and train the shape CNN. Deterministic under
        `seed` (on one machine and thread count); the caller's global RNG state is left untouched.

        noise: half the training images get Gaussian pixel noise of a std drawn from [0, noise]
        (0-255 units), so the reader keeps working on imperfect generated images; on clean
        renders it costs nothing measurable. ~20 s on one CPU core with the defaults.
        """
        t0 = time.time()
        images, scenes = render_scenes(n_scenes, random.Random(f"reader-train/{seed}"), image_size)
        if noise > 0:  # generated images are never exactly clean: train on some noisy ones too
            g = torch.Generator().manual_seed(seed)
            sigma = noise * torch.rand(n_scenes, 1, 1, 1, generator=g)
            sigma = sigma * (torch.rand(n_scenes, 1, 1, 1, generator=g) < 0.5)  # (N, 1, 1, 1)
            images = (images + sigma * torch.randn(images.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)
        obj = find_objects(images)
        scale = CANVAS / image_size
        # training pairs: an object whose centroid lies in exactly one true box, which no other
        # object claims (same-colour objects that merged are left out)
        idx, shape, boxes = [], [], []
        claims = {}
        for k, (i, c) in enumerate(zip(obj["image"].tolist(), ((obj["centre"] + 0.5) * scale - 0.5).tolist())):
            hits = [t for t, o in enumerate(scenes[i]) if o["bbox"][0] - 1 <= c[0] <= o["bbox"][2] + 1
                    and o["bbox"][1] - 1 <= c[1] <= o["bbox"][3] + 1]
            if len(hits) == 1:
                claims.setdefault((i, hits[0]), []).append(k)
        for (i, t), ks in claims.items():
            if len(ks) == 1:
                idx.append(ks[0])
                shape.append(SHAPES.index(scenes[i][t]["shape"]))
                boxes.append(scenes[i][t]["bbox"])
        idx = torch.tensor(idx, dtype=torch.long)
        shape = torch.tensor(shape, dtype=torch.long)
        sub = {key: v[idx] for key, v in obj.items()}
        centre_coef, extent_coef = fit_boxes(sub, shape, torch.tensor(boxes, dtype=torch.float32), scale)

        crops, feats = shape_crops(sub), shape_features(sub, scale)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = ShapeNet(num_features=feats.shape[1])
            net.feat_mean.copy_(feats.mean(0))
            net.feat_std.copy_(feats.std(0).clamp_min(1e-6))
            opt = torch.optim.Adam(net.parameters(), lr=lr)
            steps = epochs * math.ceil(len(idx) / batch_size)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
            net.train()
            for epoch in range(epochs):
                perm = torch.randperm(len(idx))
                total = 0.0
                for b in range(0, len(idx), batch_size):
                    j = perm[b:b + batch_size]
                    x = crops[j]
                    # the six shapes are closed under the symmetries of the square: rotate / flip
                    x = torch.rot90(x, int(torch.randint(4, ())), (2, 3))
                    if torch.rand(()) < 0.5:
                        x = x.flip(3)
                    loss = F.cross_entropy(net(x, feats[j]), shape[j])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    total += loss.item() * len(j)
                if progress:
                    print(f"reader {image_size}px epoch {epoch + 1}/{epochs}: loss {total / len(idx):.4f} "
                          f"({len(idx)} objects, {time.time() - t0:.1f}s)", flush=True)
        return cls(image_size, net, centre_coef, extent_coef)

    # -- files ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"version": VERSION, "image_size": self.image_size, "net_config": self.net.config,
                "net": self.net.state_dict(),
                "centre_coef": self.centre_coef, "extent_coef": self.extent_coef}

    def save(self, path) -> Path:
        atomic_torch_save(self.state_dict(), path)
        return Path(path)

    @classmethod
    def load(cls, path) -> "AttributeReader":
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("version") != VERSION:
            raise ValueError(f"{path}: reader format {state.get('version')}, this code reads {VERSION}")
        net = ShapeNet(**state["net_config"])
        net.load_state_dict(state["net"])
        return cls(state["image_size"], net, state["centre_coef"], state["extent_coef"])

    @classmethod
    def default(cls, image_size: int = 32, cache_dir=None, progress: bool = False) -> "AttributeReader":
        """The standard reader for a resolution: trained once (seed 0, default settings), then
        loaded from cache_dir (default $XDG_CACHE_HOME/open-dalle2 or ~/.cache/open-dalle2)."""
        if cache_dir is None:
            cache_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "open-dalle2"
        path = Path(cache_dir) / f"reader_v{VERSION}_{image_size}.pt"
        if path.exists():
            try:
                return cls.load(path)
            except Exception as e:  # corrupt or foreign file: rebuild it
                print(f"reader cache {path} unusable ({e}); retraining")
        reader = cls.train(image_size=image_size, progress=progress)
        reader.save(path)
        return reader


# ---------------------------------------------------------------------------------------------
# The reader's ceiling.

ATTRIBUTES = ("colour", "shape", "size", "position")


def reader_accuracy(reader: AttributeReader, n: int = 2000, seed: int = 123, image_size: Optional[int] = None) -> dict:
    """Accuracy of the reader on n freshly rendered scenes (never its training scenes): the
    ceiling of any faithfulness number measured with it. image_size: default the reader's.

    Detected objects are matched to true ones by box IoU (best one-to-one assignment); a true
    object without a match counts as wrong on every attribute. Returns
      {"n_images", "n_objects", "seconds" (reading time), "count" (images with the right number
       of objects), "all" / "small" / "medium" / "large": {"n", "detected", "colour", "shape",
       "size", "position", "box_iou"}} with the size groups by the TRUE size word.
    """
    image_size = image_size or reader.image_size
    images, scenes = render_scenes(n, random.Random(f"reader-test/{seed}"), image_size)
    t0 = time.time()
    found = reader.read(images)
    seconds = time.time() - t0
    groups = {g: {"n": 0, "detected": 0, "box_iou": 0.0, **{a: 0 for a in ATTRIBUTES}}
              for g in ("all", "small", "medium", "large")}
    count = 0
    for objs, truth in zip(found, scenes):
        count += len(objs) == len(truth)
        matched = {t: p for p, t in match_boxes([o["bbox"] for o in objs], [o["bbox"] for o in truth])}
        for t, true in enumerate(truth):
            for g in ("all", true["size"]):
                row = groups[g]
                row["n"] += 1
                if t in matched:
                    got = objs[matched[t]]
                    row["detected"] += 1
                    pair = torch.tensor([got["bbox"], true["bbox"]], dtype=torch.float32)
                    row["box_iou"] += box_iou(pair[:1], pair[1:]).item()
                    for a in ATTRIBUTES:
                        row[a] += got[a] == true[a]
    for row in groups.values():
        for key in ("detected", "box_iou", *ATTRIBUTES):
            row[key] = row[key] / max(row["n"], 1)
    return {"n_images": n, "n_objects": groups["all"]["n"], "seconds": seconds, "count": count / max(n, 1), **groups}


def format_accuracy(acc: dict) -> str:
    """A small text table of reader_accuracy's result."""
    lines = [f"reader accuracy on {acc['n_images']} images / {acc['n_objects']} objects "
             f"(count {acc['count']:.4f}, read in {acc['seconds']:.2f}s)",
             f"{'group':<8}{'n':>6}" + "".join(f"{k:>10}" for k in ("detected", *ATTRIBUTES, "box_iou"))]
    for g in ("all", "small", "medium", "large"):
        r = acc[g]
        lines.append(f"{g:<8}{r['n']:>6}" + "".join(f"{r[k]:>10.4f}" for k in ("detected", *ATTRIBUTES, "box_iou")))
    return "\n".join(lines)
