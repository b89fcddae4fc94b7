"""The demo data set: real Fashion-MNIST items pasted on real photos, written in COCO 2014 layout.

Fashion-MNIST (Debian's ``dataset-fashion-mnist``, standard idx ``.gz`` files) provides the objects: 10
classes, 28 px grayscale. Each image is a random crop of one of scikit-image's bundled photos (shipped in
the wheel, no download) with 1–4 items scaled to 30–50 % of the side, tinted and alpha-pasted; a few images
have none (COCO has unannotated images too). A sampled scene type biases which classes appear together, so
labels co-occur as in COCO. Train images use Fashion-MNIST's train items, val images its test items.
Everything is drawn from ``numpy`` generators seeded by (seed, split, image id): the same seed gives the
same bytes whatever the number of processes.
"""

from __future__ import annotations

import colorsys
import functools
import gzip
import json
import multiprocessing as mp
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from q2l.data.loaders import local_cores

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CATEGORY_IDS = [1, 2, 4, 5, 7, 8, 11, 13, 14, 17]  # gaps on purpose, like COCO's 1..90 for 80 classes
# scene type → classes it favours (indices into CLASS_NAMES); 80 % of the items come from the scene's list
SCENES = [
    [0, 1, 7, 8],  # street: T-shirt, trouser, sneaker, bag
    [6, 1, 4, 8],  # office: shirt, trouser, coat, bag
    [2, 4, 9, 1],  # winter: pullover, coat, ankle boot, trouser
    [0, 3, 5, 8],  # beach: T-shirt, dress, sandal, bag
    [3, 5, 6, 9],  # evening: dress, sandal, shirt, ankle boot
]
ITEM_COUNT_P = [0.35, 0.30, 0.20, 0.15]  # 1, 2, 3, 4 items
EMPTY_P = 0.03
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"]
GRAY_PHOTOS = ["camera", "coins", "grass", "gravel", "brick", "moon"]


class DemoSourceError(RuntimeError):
    """Fashion-MNIST or the scikit-image photos are not available on this machine."""


@dataclass
class DemoSummary:
    """What ``make_demo_dataset`` wrote."""

    out: Path
    num_train: int
    num_val: int
    size: int
    num_objects: int
    bytes_on_disk: int
    seconds: float

    def __str__(self) -> str:
        return (
            f"demo set: {self.num_train} train + {self.num_val} val images at {self.size} px, "
            f"{len(CLASS_NAMES)} classes, {self.num_objects} objects, {self.bytes_on_disk / 1e6:.1f} MB "
            f"in {self.out} ({self.seconds:.1f} s)"
        )


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


@functools.lru_cache(maxsize=4)
def load_fashion_mnist(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N,28,28], labels uint8 [N])`` of ``train`` or ``t10k`` (idx ``.gz``; cached)."""
    images = source / f"{split}-images-idx3-ubyte.gz"
    labels = source / f"{split}-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        raise DemoSourceError(
            f"Fashion-MNIST not found ({images}); install it with `apt-get install dataset-fashion-mnist`"
        )
    x = _read_idx(images, 16).reshape(-1, 28, 28)
    y = _read_idx(labels, 8)
    if len(x) != len(y):
        raise DemoSourceError(f"{images} and {labels} disagree on the number of items")
    return x, y


@functools.lru_cache(maxsize=2)
def load_photos(min_side: int) -> list[np.ndarray]:
    """scikit-image's bundled photos as RGB uint8, downscaled so the short side is ``min_side`` (cached)."""
    try:
        import skimage.data as skd
    except ImportError as e:
        raise DemoSourceError(f"scikit-image is needed for the demo backgrounds ({e})") from None
    photos = []
    for name in PHOTOS + GRAY_PHOTOS:
        arr = np.asarray(getattr(skd, name)())
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        im = Image.fromarray(arr[..., :3].astype(np.uint8))
        scale = min_side / min(im.size)
        if scale < 1:
            im = im.resize(
                (round(im.width * scale), round(im.height * scale)), Image.BILINEAR, reducing_gap=2.0
            )
        photos.append(np.asarray(im))
    return photos


_STATE: dict = {}


def _init_worker(photos, items, labels, size, out_dir, prefix, split_code, seed) -> None:
    by_class = [np.flatnonzero(labels == k) for k in range(len(CLASS_NAMES))]
    _STATE.update(
        photos=photos,
        items=items,
        by_class=by_class,
        size=size,
        out=out_dir,
        prefix=prefix,
        code=split_code,
        seed=seed,
    )


def _tint(rng: np.random.Generator) -> np.ndarray:
    h, s, v = rng.random(), rng.uniform(0.45, 1.0), rng.uniform(0.65, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255


def _overlap(box, boxes) -> float:
    x, y, s = box
    worst = 0.0
    for bx, by, bs in boxes:
        iw = max(0, min(x + s, bx + bs) - max(x, bx))
        ih = max(0, min(y + s, by + bs) - max(y, by))
        worst = max(worst, iw * ih / float(min(s, bs) ** 2))
    return worst


def _make_image(image_id: int) -> tuple[dict, list[dict]]:
    st = _STATE
    size = st["size"]
    rng = np.random.default_rng([st["seed"], st["code"], image_id])
    photo = st["photos"][rng.integers(len(st["photos"]))]
    ph, pw = photo.shape[:2]
    crop = int(rng.uniform(0.35, 1.0) * min(ph, pw))
    y0, x0 = rng.integers(ph - crop + 1), rng.integers(pw - crop + 1)
    bg = Image.fromarray(photo[y0 : y0 + crop, x0 : x0 + crop]).resize((size, size), Image.BILINEAR)
    canvas = np.asarray(bg, dtype=np.float32).copy()
    if rng.random() < 0.5:
        canvas = canvas[:, ::-1].copy()

    objects = []
    if rng.random() >= EMPTY_P:
        scene = SCENES[rng.integers(len(SCENES))]
        n_items = rng.choice(4, p=ITEM_COUNT_P) + 1
        boxes: list[tuple[int, int, int]] = []
        for _ in range(n_items):
            cls = (
                scene[rng.integers(len(scene))] if rng.random() < 0.8 else int(rng.integers(len(CLASS_NAMES)))
            )
            pool = st["by_class"][cls]
            item = st["items"][pool[rng.integers(len(pool))]]
            side = max(8, int(rng.uniform(0.30, 0.50) * size))
            # a few placement tries: keep the item mostly visible (least overlap with earlier ones)
            tries = [
                (int(rng.integers(size - side + 1)), int(rng.integers(size - side + 1))) for _ in range(6)
            ]
            x, y = min(tries, key=lambda t: _overlap((t[0], t[1], side), boxes))
            boxes.append((x, y, side))
            v = (
                np.asarray(Image.fromarray(item).resize((side, side), Image.BILINEAR), dtype=np.float32)
                / 255.0
            )
            alpha = np.clip(v * 3.0, 0.0, 1.0)[..., None]
            colour = _tint(rng) * (0.3 + 0.7 * v[..., None])
            region = canvas[y : y + side, x : x + side]
            canvas[y : y + side, x : x + side] = region * (1.0 - alpha) + colour * alpha
            mask = alpha[..., 0] > 0.1
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            bx, by = x + int(cols[0]), y + int(rows[0])
            bw, bh = int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)
            objects.append(
                {
                    "category_id": CATEGORY_IDS[cls],
                    "bbox": [bx, by, bw, bh],
                    "area": int(mask.sum()),
                    "iscrowd": 0,
                    "segmentation": [[bx, by, bx + bw, by, bx + bw, by + bh, bx, by + bh]],
                }
            )
    file_name = f"{st['prefix']}_{image_id:012d}.jpg"
    Image.fromarray(canvas.clip(0, 255).astype(np.uint8)).save(st["out"] / file_name, quality=90)
    image = {"id": image_id, "file_name": file_name, "width": size, "height": size}
    for obj in objects:
        obj["image_id"] = image_id
    return image, objects


def _make_chunk(ids: list[int]) -> list[tuple[dict, list[dict]]]:
    return [_make_image(i) for i in ids]


def _write_split(out, name, split_code, n, photos, items, labels, size, seed, workers) -> tuple[int, int]:
    img_dir = out / f"{name}2014"
    img_dir.mkdir(parents=True, exist_ok=True)
    args = (photos, items, labels, size, img_dir, f"COCO_{name}2014", split_code, seed)
    ids = list(range(1, n + 1))
    chunks = [ids[i : i + 64] for i in range(0, n, 64)]
    results = []
    with tqdm(total=n, desc=f"demo {name}2014", unit="img") as bar:
        if workers > 1 and len(chunks) > 1:
            with mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=args) as pool:
                for res in pool.imap(_make_chunk, chunks):
                    results.extend(res)
                    bar.update(len(res))
        else:
            _init_worker(*args)
            for chunk in chunks:
                results.extend(_make_chunk(chunk))
                bar.update(len(chunk))
    images, annotations = [], []
    for image, objects in results:
        images.append(image)
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, **obj})
    categories = [
        {"id": cid, "name": name_, "supercategory": "fashion"}
        for cid, name_ in zip(CATEGORY_IDS, CLASS_NAMES, strict=True)
    ]
    doc = {
        "info": {"description": "q2l demo set: Fashion-MNIST items on scikit-image photos", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    ann_dir = out / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    (ann_dir / f"instances_{name}2014.json").write_text(json.dumps(doc))
    size_bytes = (
        sum(f.stat().st_size for f in img_dir.iterdir())
        + (ann_dir / f"instances_{name}2014.json").stat().st_size
    )
    return len(annotations), size_bytes


def make_demo_dataset(
    out: str | Path,
    num_train: int = 8000,
    num_val: int = 2000,
    size: int = 96,
    seed: int = 0,
    *,
    workers: int | None = None,
    source: str | Path = FASHION_MNIST_DIR,
) -> DemoSummary:
    """Write the demo set under ``out`` (COCO 2014 layout) and return what was written.

    ``workers``: processes for generation (default: all usable cores, at most 8). Raises ``DemoSourceError``
    when Fashion-MNIST is missing.
    """
    if num_train < 1 or num_val < 1 or size < 32:
        raise ValueError(f"need num_train, num_val >= 1 and size >= 32 (got {num_train}, {num_val}, {size})")
    start = time.perf_counter()
    source = Path(source)
    train_x, train_y = load_fashion_mnist(source, "train")
    test_x, test_y = load_fashion_mnist(source, "t10k")
    photos = load_photos(min_side=2 * size)
    if workers is None:
        workers = min(8, local_cores())
    out = Path(out)
    n_tr, b_tr = _write_split(out, "train", 0, num_train, photos, train_x, train_y, size, seed, workers)
    n_va, b_va = _write_split(out, "val", 1, num_val, photos, test_x, test_y, size, seed, workers)
    return DemoSummary(out, num_train, num_val, size, n_tr + n_va, b_tr + b_va, time.perf_counter() - start)
