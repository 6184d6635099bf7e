"""`train.decode: device`: the DataLoader workers read the encoded bytes and draw every random parameter; the device
decodes, resizes, crops and flips, then `BatchAugment` does the rest. For nodes whose cores cannot keep the GPU fed.

Worker, per image (`EncodedDataset`): the file's bytes (plain file or tar member), the weak crop's (top, left, flip)
from the same generator the CPU path's `PaperAugment` uses, and `BatchAugment.draw`'s parameters from theirs, so
the same (seed, epoch, index) gives the same op parameters on either path (tests/test_device_decode.py).
Device, per batch (`DeviceDecoder`): JPEGs through `torchvision.io.decode_jpeg` on the device (nvJPEG on CUDA, one
batched call; other formats decode on the CPU), each image resized to the recipe's square (the interpolation of
the model's data config, as cv2 does on the CPU path: same kernel, no antialias), cropped, flipped.

Only the weak/med recipes (GLSim/ILA) can: their crop is known before the image is decoded. Validation keeps the
CPU path (the eval resize + centre crop).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import torch
from torch.utils.data import Dataset

from pipeline.data import images
from pipeline.data.batch_augment import BatchAugment
from pipeline.data.dataset import ImageRng
from pipeline.data.transforms import PaperAugment

JPEG_MAGIC = b"\xff\xd8"


class EncodedDataset(Dataset):
    """(bytes as uint8 tensor, class id, crop (top, left, flip) int64, BatchAugment params) per (index, epoch)."""

    def __init__(
        self, df: pl.DataFrame, image_root: str | Path, crop: PaperAugment, augment: BatchAugment, seed: int = 0
    ):
        self.root, self.crop, self.augment, self.seed = Path(image_root), crop, augment, seed
        self.paths, self.labels = df["path"].to_list(), df["class_id"].to_list()
        self._rng = ImageRng()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple:
        i, epoch = key
        rng = self._rng.at(self.seed, epoch, i)  # the draws of the CPU path's worker, in its order: crop, then device
        self.crop.set_rng(rng)
        top, left, flip = self.crop.draw()
        data = torch.frombuffer(bytearray(images.read_bytes(self.root, self.paths[i])), dtype=torch.uint8)
        size = self.crop.size
        params = torch.from_numpy(self.augment.draw(rng, size, size)) if self.augment.needs_params else None
        return data, self.labels[i], torch.tensor([top, left, int(flip)]), params


def collate(items: list[tuple]) -> tuple:
    """Encoded images stay a list (their lengths differ); the rest is stacked."""
    data, labels, crops, params = zip(*items)
    stacked = torch.stack(params) if params[0] is not None else None
    return list(data), torch.tensor(labels), torch.stack(crops), stacked


class DeviceDecoder:
    """Encoded images + crops -> the uint8 (B, size, size, C) batch the CPU path's workers would have made."""

    def __init__(self, size: int, big: int, interpolation: str):
        self.size, self.big = size, big
        self.mode = interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"

    def decode(self, data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """uint8 (C, H, W) RGB images on `device`: JPEGs in one batched call there, other formats on the CPU."""
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        jpeg = [k for k, d in enumerate(data) if bytes(d[:2].tolist()) == JPEG_MAGIC]
        out: list[torch.Tensor | None] = [None] * len(data)
        if jpeg:
            decoded = decode_jpeg([data[k] for k in jpeg], mode=ImageReadMode.RGB, device=device)
            for k, img in zip(jpeg, decoded):
                out[k] = img
        for k, d in enumerate(data):
            if out[k] is None:
                out[k] = decode_image(d, mode=ImageReadMode.RGB).to(device)
        return out

    def __call__(self, data: list[torch.Tensor], crops: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Images of one source size are resized in one call, and all crops and flips are one gather."""
        decoded = self.decode(data, device)
        batch = torch.empty(len(data), self.size, self.size, 3, dtype=torch.uint8, device=device)
        groups: dict[tuple[int, ...], list[int]] = {}
        for k, img in enumerate(decoded):
            groups.setdefault(tuple(img.shape), []).append(k)
        for ks in groups.values():
            square = torch.nn.functional.interpolate(
                torch.stack([decoded[k] for k in ks]).float(),
                size=(self.big, self.big),
                mode=self.mode,
                align_corners=False if self.mode != "nearest" else None,
            )
            crop = self._crop(square.permute(0, 2, 3, 1), crops[ks], device)
            batch[torch.tensor(ks, device=device)] = crop.round_().clamp_(0, 255).to(torch.uint8)  # as cv2 rounds
        return batch

    def _crop(self, square: torch.Tensor, crops: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(m, big, big, C) -> (m, size, size, C): each image's window at (top, left), mirrored where flip is set."""
        span = torch.arange(self.size)
        rows = crops[:, :1] + span
        cols = crops[:, 1:2] + span
        cols = torch.where(crops[:, 2:3].bool(), cols.flip(1), cols)
        image = torch.arange(len(crops)).view(-1, 1, 1)
        index = (image, rows[:, :, None], cols[:, None, :])
        return square[tuple(t.to(device, non_blocking=True) for t in index)]
