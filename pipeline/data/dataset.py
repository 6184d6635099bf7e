"""A torch Dataset over a manifest: (image tensor, class id) pairs, with epoch-keyed randomness.

Images are read through pipeline.data.images, so plain files and tar shards (DAF:re scale) both work.

With `device_params` (a BatchAugment whose device-side ops need per-image parameters, random erasing) an item is
(image, class id, parameters): the parameters are drawn here, in the worker, from the image's own generator.

Why `EpochSampler`: the order and the augmentation of epoch e are pure functions of (seed, e, index). The sampler
yields (index, epoch) keys; the dataset seeds the albumentations pipeline from them per sample. So a run resumed at
an epoch boundary replays exactly what the killed run would have done, whatever the number of DataLoader workers
(albumentations 2 would otherwise give every worker a copy of the same generator, i.e. identical augmentations).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch.utils.data import Dataset, Sampler

from pipeline.data import images
from pipeline.data.batch_augment import BatchAugment

STREAM_AUGMENT, STREAM_ORDER, STREAM_TORCH = 0, 1, 2  # independent random streams of one seed


def _as_tensor(x: np.ndarray) -> torch.Tensor:
    """A tensor over the array's memory where torch can use it (a crop window: the batch's stack copies it anyway);
    a copy only for read-only or reversed arrays."""
    if not x.flags.writeable or any(s < 0 for s in x.strides):
        x = np.array(x)
    return torch.from_numpy(x)


def sample_seed(seed: int, epoch: int, index: int = 0, stream: int = STREAM_AUGMENT) -> int:
    """A well-mixed 32-bit seed for one (run seed, stream, epoch, image); NumPy's SeedSequence does the mixing."""
    return int(np.random.SeedSequence([seed, stream, epoch, index]).generate_state(1)[0])


class ImageRng:
    """Per-image random draws, a pure function of (run seed, epoch, index), from one reused NumPy generator.

    Every draw a worker makes for an image (the CPU crop's, then the device-side parameters') comes from the generator
    `at(seed, epoch, index)` returns: NumPy's PCG64 with its 128-bit state and stream set from a BLAKE2b hash of the
    key. Setting the state of one generator costs a worker ~25 us per image where building a new one (SeedSequence +
    PCG64 + Generator) costs ~65 us, measured between JPEG decodes (the numbers alone are 3x smaller: the
    construction also evicts the decoder's caches), on a ~0.8 ms decode + resize (`bench loader`).
    """

    def __init__(self) -> None:
        self._bits = np.random.PCG64(0)
        self._generator = np.random.Generator(self._bits)

    def at(self, seed: int, epoch: int, index: int) -> np.random.Generator:
        key = f"{seed},{STREAM_AUGMENT},{epoch},{index}".encode()
        digest = hashlib.blake2b(key, digest_size=32).digest()
        state = {"state": int.from_bytes(digest[:16], "little"), "inc": int.from_bytes(digest[16:], "little") | 1}
        self._bits.state = {"bit_generator": "PCG64", "state": state, "has_uint32": 0, "uinteger": 0}
        return self._generator


class EpochSampler(Sampler):
    """Yields (index, epoch) keys: a seeded permutation per epoch (or in order), optionally one rank's shard.

    Sharding follows torch's DistributedSampler so that data-parallel ranks step in lock-step: each rank gets the
    same number of keys, interleaved slices of the one permutation. Training (pad=False) drops the last n % world
    keys of the permutation (different images every epoch); evaluation (pad=True) repeats the first keys instead, and
    the gathered duplicates are cut again (distributed.gather_rows). With one process both are the whole permutation.
    """

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1, pad: bool = False):
        self.n, self.shuffle, self.seed, self.rank, self.world, self.pad = n, shuffle, seed, rank, world_size, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, stream=STREAM_ORDER))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = len(self) * self.world
        if total > self.n:  # pad: repeat the permutation as often as needed (n may be smaller than world)
            order = (order * -(-total // self.n))[:total]
        return iter((i, self.epoch) for i in order[self.rank : total : self.world])

    def __len__(self) -> int:
        return -(-self.n // self.world) if self.pad else self.n // self.world


class ManifestDataset(Dataset):
    def __init__(
        self,
        df: pl.DataFrame,
        image_root: str | Path,
        transform,
        cache: bool = False,
        seed: int = 0,
        device_params: BatchAugment | None = None,
    ):
        self.root = Path(image_root)
        self.device_params = device_params if device_params is not None and device_params.needs_params else None
        self.paths = df["path"].to_list()
        self.labels = df["class_id"].to_list()
        self.transform, self.seed = transform, seed
        self._rng = ImageRng()
        # Small sets (the embedded default) are decoded once; big ones are read from disk every time.
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> np.ndarray:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        with images.open_image(self.root, self.paths[i]) as im:
            arr = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))  # RGB JPEGs: no converted copy
        if self._cache is not None:
            self._cache[i] = arr
        return arr

    def __getitem__(self, key: int | tuple[int, int]) -> tuple:
        i, epoch = key if isinstance(key, tuple) else (key, None)
        rng = None
        if epoch is not None and hasattr(self.transform, "set_rng"):  # PaperAugment draws from the image's generator
            rng = self._rng.at(self.seed, epoch, i)
            self.transform.set_rng(rng)
        elif epoch is not None and hasattr(self.transform, "set_random_seed"):  # an albumentations Compose: a seed
            self.transform.set_random_seed(sample_seed(self.seed, epoch, i))
        x = self.transform(image=self.load(i))["image"]
        if isinstance(x, np.ndarray):  # a uint8 HWC crop for the device to normalise
            x = _as_tensor(x)
        if self.device_params is None:
            return x, self.labels[i]
        if rng is None:
            rng = self._rng.at(self.seed, epoch or 0, i)
        return x, self.labels[i], torch.from_numpy(self.device_params.draw(rng, x.shape[0], x.shape[1]))
