"""A DataLoader wrapper that hands out batches already on the device, normalised and augmented there.

timm's PrefetchLoader is the reference design: the workers' uint8 batches come in pinned memory, are copied with
`non_blocking=True` on a side CUDA stream and augmented there (`BatchAugment`), and the next batch is prepared while
the caller's step for the current one runs. The caller's stream waits for the side stream only when it takes the
batch, and each tensor is marked as used by the caller's stream, so the caching allocator never hands its memory to
the next copy while the step may still read it. On CPU the same wrapper simply applies the augmentation in line.

`start()` begins an epoch ahead of time: the workers spawn and fill their queues while the caller builds the model,
compiles, opens its MLflow run, ... (the first epoch otherwise waits for all of that and for the workers in turn).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader

from pipeline.data.batch_augment import BatchAugment

if TYPE_CHECKING:
    from pipeline.data.device_decode import DeviceDecoder


class DeviceLoader:
    """With a `decoder` (train.decode: device) the workers' batches are encoded images and crops, decoded here."""

    def __init__(
        self,
        loader: DataLoader,
        device: torch.device,
        augment: BatchAugment,
        channels_last: bool = False,
        decoder: DeviceDecoder | None = None,
    ):
        self.loader, self.device, self.augment, self.decoder = loader, device, augment, decoder
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._started: Iterator | None = None

    @property
    def sampler(self):
        return self.loader.sampler

    @property
    def dataset(self):
        return self.loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def start(self) -> None:
        """Start the workers of the next pass now (call after sampler.set_epoch); __iter__ continues it."""
        if self._started is None:
            self._started = iter(self.loader)

    def _to_device(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, *rest = batch
        if self.decoder is not None:
            crops, params = rest
            x = self.decoder(x, crops, self.device)
        else:
            x = x.to(self.device, non_blocking=True)
            params = rest[0] if rest else None  # BatchAugment copies what it needs: its op grouping reads them here
        x = self.augment(x, params).contiguous(memory_format=self.memory_format)
        return x, y.to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        it = self._started if self._started is not None else iter(self.loader)
        self._started = None
        if self.device.type != "cuda":
            for batch in it:
                yield self._to_device(batch)
            return
        stream = torch.cuda.Stream(self.device)
        pending = None
        for batch in it:
            with torch.cuda.stream(stream):
                ready = self._to_device(batch)
            if pending is not None:
                yield pending
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for t in ready:
                t.record_stream(torch.cuda.current_stream(self.device))
            pending = ready
        if pending is not None:
            yield pending
