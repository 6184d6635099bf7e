"""A torch Dataset over a manifest: (image tensor, class id) pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch
from PIL import Image
from torch.utils.data import Dataset


class ManifestDataset(Dataset):
    def __init__(self, df: pl.DataFrame, image_root: str | Path, transform, cache: bool = False):
        self.paths = [Path(image_root) / p for p in df["path"].to_list()]
        self.labels = df["class_id"].to_list()
        self.transform = transform
        # Small sets (the embedded default) are decoded once; big ones are read from disk every time.
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> np.ndarray:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        with Image.open(self.paths[i]) as im:
            arr = np.asarray(im.convert("RGB"))
        if self._cache is not None:
            self._cache[i] = arr
        return arr

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(image=self.load(i))["image"], self.labels[i]
