"""`python -m pipeline bench loader`: one DataLoader worker's img/s per recipe against a bare decode + resize loop.

What a worker does per image is timed in this process: `ManifestDataset.__getitem__` for each (index, epoch) key
(read from a tar shard, decode, the recipe's CPU augmentation to a uint8 tensor, the device-side ops' parameters).
`med_decode_device` is a `train.decode: device` worker (read the bytes, draw medaugs' parameters; the device
decodes). The batching (`default_collate`, the same for every pipeline: a bare decode + resize loader pays it too)
is timed on its own and reported as `collate` img/s. The reference loop reads and decodes the same images the same
way and only resizes them (cv2, the recipe's interpolation) to the recipe's resize size: the work no pipeline can
skip. Rounds alternate the reference and the recipes (each one goes first in turn), and each side's median round
is reported, so that the machine's noise hits all alike; the ratio recipe / reference is what the README quotes.
Times are the process's CPU seconds (`time.process_time`, one thread: cv2 and torch are set to one as in a worker),
i.e. what one worker with a core to itself delivers, which wall time on a shared machine (other jobs) does not show.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

RECIPES = {"rrc": None, "weak": "ila", "med": "glsim"}  # augment -> the paper recipe that uses it (rrc: default)
DCFG = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}  # the papers' ViT-B/16 data config


def _config(augment: str, img_size: int):
    from pipeline.config import TrainParams

    recipe = RECIPES[augment]
    method = "ila" if recipe == "ila" else "vit"
    return TrainParams.model_validate(
        {
            "method": method,
            "model": "vit_base_patch16_224",
            "img_size": img_size,
            **({"recipe": recipe} if recipe else {"augment": augment, "hflip": 0.5}),
        }
    )


def _recipe_pass(augment: str, df, root: Path, img_size: int, batch: int, epoch: int):
    """A closure: one worker's per-image work over `df` with the recipe's dataset (`ManifestDataset.__getitem__`)."""
    from pipeline.data.dataset import ManifestDataset
    from pipeline.data.transforms import batch_augment, train_transform

    cfg = _config(augment, img_size)
    ds = ManifestDataset(
        df, root, train_transform(cfg, DCFG, seed=0), cache=False, seed=0, device_params=batch_augment(cfg, DCFG)
    )

    def run() -> int:
        for i in range(len(ds)):
            ds[(i, epoch)]
        return len(ds)

    return run


def _encoded_pass(df, root: Path, img_size: int, epoch: int):
    """A closure: a `train.decode: device` worker's per-image work (read the bytes, draw medaugs' parameters)."""
    from pipeline.data.device_decode import EncodedDataset
    from pipeline.data.transforms import batch_augment, train_transform

    cfg = _config("med", img_size)
    ds = EncodedDataset(df, root, train_transform(cfg, DCFG, seed=0), batch_augment(cfg, DCFG), seed=0)

    def run() -> int:
        for i in range(len(ds)):
            ds[(i, epoch)]
        return len(ds)

    return run


def _collate_pass(augment: str, df, root: Path, img_size: int, batch: int):
    """A closure: the batching a worker adds (default_collate of `batch` items), per batch of the recipe's items."""
    from torch.utils.data import default_collate

    from pipeline.data.dataset import ManifestDataset
    from pipeline.data.transforms import batch_augment, train_transform

    cfg = _config(augment, img_size)
    ds = ManifestDataset(
        df, root, train_transform(cfg, DCFG, seed=0), cache=False, seed=0, device_params=batch_augment(cfg, DCFG)
    )
    items = [ds[(i, 1)] for i in range(min(batch, len(ds)))]

    def run() -> int:
        for _ in range(0, len(df), batch):
            default_collate(items)
        return len(df)

    return run


def _reference_pass(df, root: Path, size: int):
    """A closure: read + decode (as the dataset does) + one cv2 resize to size x size, nothing else."""
    import cv2

    from pipeline.data.dataset import ManifestDataset

    ds = ManifestDataset(df, root, transform=None, cache=False)

    def run() -> int:
        for i in range(len(ds)):
            cv2.resize(ds.load(i), (size, size), interpolation=cv2.INTER_CUBIC)
        return len(ds)

    return run


def run(
    images: int = 96,
    img_size: int = 224,
    rounds: int = 5,
    batch: int = 32,
    augments=tuple(RECIPES),
    image_root: Path | None = None,
) -> dict:
    """img/s of one worker per recipe and of the reference loop at that recipe's resize size, with their ratio."""
    import cv2
    import torch

    from pipeline.data.synthetic import write_jpeg_shards

    cv2.setNumThreads(1)  # as in a DataLoader worker (engine's worker init; torch sets its own threads to 1 there)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        root = Path(image_root or tmp)
        df = write_jpeg_shards(root, images, shard_size=max(1, images // 2))
        sides = {f"decode_resize_{img_size}": _reference_pass(df, root, img_size)}
        for augment in augments:
            cfg = _config(augment, img_size)
            size = img_size if augment == "rrc" else int(img_size * cfg.resize_ratio)
            sides[augment] = _recipe_pass(augment, df, root, img_size, batch, epoch=1)
            sides.setdefault(f"decode_resize_{size}", _reference_pass(df, root, size))
        sides["med_decode_device"] = _encoded_pass(df, root, img_size, epoch=1)
        sides["collate"] = _collate_pass(augments[-1], df, root, img_size, batch)
        for fn in sides.values():
            fn()  # warm: shard indexes, imports, the page cache
        times: dict[str, list[float]] = {k: [] for k in sides}
        names = list(sides)
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]  # each side goes first in turn
            for name in order:
                t = time.process_time()  # this process's CPU seconds: other jobs on a shared machine do not count
                n = sides[name]()
                times[name].append(time.process_time() - t)
    ips = {k: n / statistics.median(v) for k, v in times.items()}
    out = {
        "images": images,
        "img_size": img_size,
        "rounds": rounds,
        "batch": batch,
        "source": "JPEG 256x320, tar",
        "img_per_s_per_worker": {k: round(v, 1) for k, v in ips.items()},
        "ratio": {},
    }
    for augment in augments:
        size = img_size if augment == "rrc" else int(img_size * _config(augment, img_size).resize_ratio)
        out["ratio"][augment] = round(ips[augment] / ips[f"decode_resize_{size}"], 3)
    out[f"ratio_to_decode_resize_{img_size}"] = {
        a: round(ips[a] / ips[f"decode_resize_{img_size}"], 3) for a in augments
    }
    return out
