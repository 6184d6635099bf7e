"""Issue 20, point 2: `train.decode: device` (workers read bytes, the device decodes and crops), checked on CPU.

The same (seed, epoch, index) must give the same op parameters as the CPU path (the augmentation distribution is
the same by construction, not by resemblance), and the decoded, resized crops must match the CPU path's pixels up
to the two decoders' and resizers' rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from torch.utils.data import DataLoader

from pipeline.config import TrainParams
from pipeline.data.dataset import EpochSampler, ImageRng, ManifestDataset
from pipeline.data.device_decode import DeviceDecoder, EncodedDataset, collate
from pipeline.data.prefetch import DeviceLoader
from pipeline.data.synthetic import write_jpeg_shards
from pipeline.data.transforms import batch_augment, train_transform

DCFG = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}
MED = {
    "method": "vit",
    "model": "vit_tiny_patch16_224",
    "weights": "none",
    "img_size": 32,
    "patch_size": 8,
    "augment": "med",
    "hflip": 0.5,
    "decode": "device",
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    df = write_jpeg_shards(root, 10, classes=3, short_side=48, shard_size=4)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / "odd.png")
    return df.vstack(df.head(1).with_columns(path=df.head(1)["path"].str.replace(r".*", "odd.png"))), root


def _paths(cfg: TrainParams, df, root, seed: int = 7):
    aug = batch_augment(cfg, DCFG)
    cpu = ManifestDataset(df, root, train_transform(cfg, DCFG, seed), seed=seed, device_params=aug)
    dev = EncodedDataset(df, root, train_transform(cfg, DCFG, seed), aug, seed=seed)
    return cpu, dev, aug


def test_the_device_path_draws_the_cpu_paths_parameters_for_every_key(shards):
    df, root = shards
    cfg = TrainParams.model_validate(MED)
    cpu, dev, _ = _paths(cfg, df, root)
    reference = train_transform(cfg, DCFG, 7)
    flips = set()
    for epoch in (1, 2):
        for i in range(len(df)):
            data, label, crop, params = dev[(i, epoch)]
            _, cpu_label, cpu_params = cpu[(i, epoch)]
            assert label == cpu_label and torch.equal(params, cpu_params)  # TrivialAugment op, bin, erasing
            reference.set_rng(ImageRng().at(7, epoch, i))
            assert tuple(crop.tolist()) == tuple(map(int, reference.draw()))  # the crop the CPU path cut
            assert data.dtype == torch.uint8 and bytes(data[:2].tolist()) in (b"\xff\xd8", b"\x89P")
            flips.add(int(crop[2]))
    assert flips == {0, 1}


def test_decoded_crops_match_the_cpu_paths_pixels(shards):
    df, root = shards
    cfg = TrainParams.model_validate({**MED, "augment": "weak"})  # no device ops: the crops themselves
    cpu, dev, _ = _paths(cfg, df, root)
    data, _, crops, _ = collate([dev[(i, 3)] for i in range(len(df))])
    decoder = DeviceDecoder(cpu.transform.size, cpu.transform.big, DCFG["interpolation"])
    got = decoder(data, crops, torch.device("cpu"))
    want = torch.stack([cpu[(i, 3)][0] for i in range(len(df))])
    assert got.shape == want.shape == (len(df), 32, 32, 3) and got.dtype == torch.uint8
    diff = (got.int() - want.int()).abs()
    # Identical on this machine (both libjpeg-turbo; torch's bicubic is cv2's kernel): the bound leaves room for
    # other SIMD paths' rounding, and nvJPEG's IDCT on CUDA.
    assert (diff > 0).float().mean() < 0.01 and diff.max() <= 3, ((diff > 0).float().mean(), diff.max())


def test_a_device_decoding_loader_hands_out_augmented_normalised_batches(shards):
    df, root = shards
    cfg = TrainParams.model_validate(MED)
    _, dev, aug = _paths(cfg, df, root)
    crop = dev.crop
    loader = DataLoader(dev, batch_size=4, sampler=EpochSampler(len(dev), True, 7), collate_fn=collate, num_workers=1)
    batches = DeviceLoader(loader, torch.device("cpu"), aug, decoder=DeviceDecoder(crop.size, crop.big, "bicubic"))
    batches.sampler.set_epoch(1)
    first = list(batches)
    batches.sampler.set_epoch(1)
    again = list(batches)
    assert [x.shape for x, _ in first] == [(4, 3, 32, 32), (4, 3, 32, 32), (3, 3, 32, 32)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again)), "same epoch, same pixels"
    assert all(x.dtype == torch.float32 and -1.01 <= x.min() and x.max() <= 1.01 for x, _ in first)


def test_device_decoding_needs_a_recipe_whose_crop_is_known_before_decoding():
    with pytest.raises(ValidationError, match="decode 'device'.*augment is 'rrc'"):
        TrainParams.model_validate({**MED, "augment": "rrc"})
    assert (
        TrainParams.model_validate(
            {"recipe": "glsim", "method": "glsim", "model": "vit_tiny_patch16_224", "decode": "device"}
        ).decode
        == "device"
    )
