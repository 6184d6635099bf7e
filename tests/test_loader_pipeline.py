"""Issue 20: the CPU half of the input pipeline (uint8 crops, TrivialAugmentWide without torch seeding) and the
device half (normalisation, random erasing, the prefetching DeviceLoader), checked on CPU.

TrivialAugmentWide is checked against torchvision's own transform: the op parameters it draws (op, magnitude, sign)
follow the same distribution, and each op's pixels equal torchvision's for the same parameters.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.config import TrainParams
from pipeline.data import trivial_augment
from pipeline.data.batch_augment import BatchAugment
from pipeline.data.dataset import EpochSampler, ImageRng, ManifestDataset
from pipeline.data.prefetch import DeviceLoader
from pipeline.data.synthetic import write_jpeg_shards
from pipeline.data.transforms import (
    batch_augment,
    eval_batch_augment,
    eval_resize,
    eval_transform,
    train_transform,
)
from pipeline.data.trivial_augment_batch import apply_batch

DCFG = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bicubic"}
MED = {
    "method": "vit",
    "model": "vit_tiny_patch16_224",
    "weights": "none",
    "img_size": 32,
    "patch_size": 8,
    "augment": "med",
    "hflip": 0.5,
}


def torchvision_draws(n: int) -> list[tuple[str, float]]:
    """(op, magnitude) of `n` calls of torchvision's TrivialAugmentWide(31 bins), recorded where it applies them."""
    import torchvision.transforms.autoaugment as aa

    seen = []

    def record(img, op_name, magnitude, interpolation, fill):
        seen.append((op_name, magnitude))
        return img

    original, aa._apply_op = aa._apply_op, record
    try:
        torch.manual_seed(0)
        t, img = aa.TrivialAugmentWide(num_magnitude_bins=31), torch.zeros(3, 4, 4, dtype=torch.uint8)
        for _ in range(n):
            t(img)
    finally:
        aa._apply_op = original
    return seen


def test_op_set_and_magnitudes_are_torchvisions():
    """The 14 ops in torchvision's order, their 31 "wide" magnitudes to the last bit, and which are signed:
    translate at most 32 px at any size, sharpness signed (factor 0.01 .. 1.99: it also blurs), posterize 2 .. 8."""
    from torchvision.transforms import TrivialAugmentWide as TorchTA

    theirs = TorchTA()._augmentation_space(31)
    assert list(trivial_augment.SPACE) == list(theirs)
    for op, (mags, signed) in theirs.items():
        assert trivial_augment.SPACE[op] == (tuple(mags.reshape(-1).tolist()), signed), op
    span = {op: (min(mags), max(mags), signed) for op, (mags, signed) in trivial_augment.SPACE.items()}
    assert span["TranslateX"] == (0.0, 32.0, True)
    assert span["Sharpness"] == (0.0, pytest.approx(0.99), True)
    assert span["Posterize"] == (2.0, 8.0, False)


def test_drawn_parameters_follow_torchvisions_distribution():
    n = 14_000
    ours = [trivial_augment.draw(rng) for rng in [np.random.default_rng(1)] for _ in range(n)]
    theirs = torchvision_draws(n)
    for draws in (ours, theirs):
        ops = collections.Counter(op for op, _ in draws)
        assert set(ops) == set(trivial_augment.SPACE) and max(abs(c / n - 1 / 14) for c in ops.values()) < 0.012
    for op, (mags, signed) in trivial_augment.SPACE.items():
        mine = [m for o, m in ours if o == op]
        ref = [m for o, m in theirs if o == op]
        assert set(np.abs(mine)) <= set(mags) and set(np.abs(ref)) <= set(mags)
        assert set(np.abs(mine)) == set(np.abs(ref)) == set(mags)  # every magnitude reached on both sides
        negative = np.mean(np.array(mine) < 0), np.mean(np.array(ref) < 0)
        if signed:  # a fair sign on both sides (bin 0 is 0.0, never negative)
            assert 0.4 < negative[0] < 0.55 and 0.4 < negative[1] < 0.55
        else:
            assert negative == (0.0, 0.0)
        # the same spread over the bins: mean magnitude within 10 % of the range (about 1000 draws per op)
        assert abs(np.mean(np.abs(mine)) - np.mean(np.abs(ref))) <= 0.1 * (max(mags) - min(mags))


def test_each_op_gives_torchvisions_pixels():
    """Same (op, magnitude): the same pixels as torchvision's op on a PIL image (what the GLSim code runs)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.autoaugment import _apply_op

    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (37, 52, 3), dtype=np.uint8),
        np.linspace(30, 200, 37 * 52 * 3).reshape(37, 52, 3).astype(np.uint8),  # narrow histogram
        rng.integers(100, 140, (40, 40, 3), dtype=np.uint8),
    ]
    for op, (mags, signed) in trivial_augment.SPACE.items():
        for m in [*mags[::6], *([-v for v in mags[::6]] if signed else [])]:
            for img in images:
                ref = np.asarray(_apply_op(Image.fromarray(img), op, m, InterpolationMode.NEAREST, None))
                assert np.array_equal(trivial_augment.apply(img, op, m), ref), (op, m)


def test_the_batched_ops_give_the_cpu_references_pixels():
    """Each image of a batch its own op: the device implementation equals `trivial_augment.apply` (torchvision's
    pixels, above) for every op and bin, but for PIL's fixed-point rotation, off by one source pixel at a few edges."""
    rng = np.random.default_rng(0)
    images = np.stack(
        [
            rng.integers(0, 256, (37, 52, 3), dtype=np.uint8),
            np.linspace(30, 200, 37 * 52 * 3).reshape(37, 52, 3).astype(np.uint8),
            rng.integers(100, 140, (37, 52, 3), dtype=np.uint8),
        ]
    )
    rows, refs = [], []
    for op, (mags, signed) in trivial_augment.SPACE.items():
        for m in [*mags[::5], *([-v for v in mags[::5]] if signed else [])]:
            for k, img in enumerate(images):
                rows.append((k, [trivial_augment.OPS.index(op), m, *trivial_augment.inverse_affine(op, m, 37, 52)]))
                refs.append((op, trivial_augment.apply(img, op, m)))
    order = rng.permutation(len(rows))  # ops interleaved in the batch, as drawn
    x = torch.from_numpy(images[[rows[i][0] for i in order]])
    out = apply_batch(x, torch.tensor([rows[i][1] for i in order], dtype=torch.float64)).numpy()
    assert out.dtype == np.uint8 and out.shape == x.shape
    for got, i in zip(out, order):
        op, ref = refs[i]
        differ = (got != ref).any(-1).mean()
        assert differ == 0 or (op == "Rotate" and differ < 0.005), (op, differ)
    rotated = [(got != refs[i][1]).any() for got, i in zip(out, order) if refs[i][0] == "Rotate"]
    assert sum(rotated) <= len(rotated) // 4
    assert torch.equal(x, torch.from_numpy(images[[rows[i][0] for i in order]])), "the input batch is left as it was"


def test_medaugs_draws_its_op_in_the_worker_and_the_device_applies_it(shards):
    """The worker hands over the weak crop; the TrivialAugment op it drew for the key is applied on the device."""
    df, root = shards
    cfg = TrainParams.model_validate(MED)
    aug = batch_augment(cfg, DCFG)
    ds = ManifestDataset(df, root, train_transform(cfg, DCFG, seed=5), seed=5, device_params=aug)
    weak = ManifestDataset(
        df, root, train_transform(TrainParams.model_validate({**MED, "augment": "weak"}), DCFG, seed=5), seed=5
    )
    items = [ds[(i, 1)] for i in range(12)]
    assert all(torch.equal(x, weak[(i, 1)][0]) for i, (x, _, _) in enumerate(items))  # same CPU half as weakaugs
    params = torch.stack([p for _, _, p in items])
    assert params.shape == (12, 12) and params.dtype == torch.float64
    assert len(set(params[:, 4].tolist())) > 3  # ops vary over images
    x = torch.stack([x for x, _, _ in items])
    for k in range(12):
        op = trivial_augment.OPS[int(params[k, 4])]
        expected = trivial_augment.apply(x[k].numpy(), op, float(params[k, 5]))
        got = apply_batch(x[k : k + 1], params[k : k + 1, 4:])[0].numpy()
        assert (got != expected).any(-1).mean() < (0.005 if op == "Rotate" else 1e-9), op


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return write_jpeg_shards(root, 12, classes=3, short_side=48, shard_size=5), root


def test_same_seed_epoch_index_gives_the_same_pixels_and_leaves_torch_alone(shards):
    df, root = shards
    cfg = TrainParams.model_validate(MED)

    def dataset():
        return ManifestDataset(
            df, root, train_transform(cfg, DCFG, seed=3), seed=3, device_params=batch_augment(cfg, DCFG)
        )

    a, b = dataset(), dataset()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = [a[(i, 2)] for i in range(12)]
    assert torch.equal(torch.get_rng_state(), before)  # no global torch seeding per image any more
    for i in reversed(range(12)):  # another dataset object, another order: the key alone decides
        x, y, params = b[(i, 2)]
        assert torch.equal(x, first[i][0]) and y == first[i][1] and torch.equal(params, first[i][2])
    assert first[0][0].dtype == torch.uint8 and first[0][0].shape == (32, 32, 3)
    other_epoch = [a[(i, 3)][0] for i in range(12)]
    assert sum(torch.equal(x, o) for (x, _, _), o in zip(first, other_epoch)) <= 2


def test_image_generators_are_uniform_and_unrelated_between_neighbouring_keys():
    """The reused generator's state comes from a hash of the key: neighbouring images and epochs draw unrelated
    numbers, and a key gives the same draws whatever was drawn before."""
    rng = ImageRng()
    u = np.array([[rng.at(5, epoch, i).random() for i in range(4000)] for epoch in (1, 2)])
    counts = np.histogram(u[0], bins=10, range=(0, 1))[0]
    assert counts.min() > 320 and counts.max() < 480  # 400 expected per bin, 5 sigma is 95
    assert abs(np.corrcoef(u[0, :-1], u[0, 1:])[0, 1]) < 0.06  # index i vs i + 1 (sigma 0.016)
    assert abs(np.corrcoef(u[0], u[1])[0, 1]) < 0.06  # epoch 1 vs 2
    assert ImageRng().at(5, 2, 17).random(3).tolist() == rng.at(5, 2, 17).random(3).tolist()
    assert rng.at(5, 1, 0).random() == u[0, 0] and rng.at(6, 1, 0).random() != u[0, 0]


def test_erasing_draws_torchvisions_rectangles_and_the_device_zeroes_exactly_them():
    aug = BatchAugment(mean=(0.5,) * 3, std=(0.5,) * 3, erase_prob=0.3)
    rng = np.random.default_rng(0)
    params = np.stack([aug.draw(rng, 40, 50) for _ in range(2000)])
    erased = params[params[:, 2] > 0]
    assert 0.26 < len(erased) / len(params) < 0.34
    area = erased[:, 2] * erased[:, 3] / (40 * 50)
    assert area.min() >= 0.02 * 0.8 and area.max() <= 0.4 * 1.2  # (0.02, 0.4), up to rounding of h and w
    assert (erased[:, 0] + erased[:, 2] <= 40).all() and (erased[:, 1] + erased[:, 3] <= 50).all()
    img = torch.from_numpy(np.random.default_rng(1).integers(1, 256, (6, 40, 50, 3), dtype=np.uint8))
    p = torch.from_numpy(np.concatenate([erased[:5], np.zeros((1, 12))]))
    out = aug(img, p)
    assert out.shape == (6, 3, 40, 50) and out.dtype == torch.float32
    for k, (top, left, h, w) in enumerate(p[:, :4].int().tolist()):
        zero = (out[k] == 0).all(0)
        assert zero.sum() == h * w and (h == 0 or zero[top : top + h, left : left + w].all())


def test_device_normalisation_gives_the_cpu_eval_transforms_tensor():
    """Evaluate/predict keep the normalised CPU transform; training's val on the device gets the same inputs."""
    img = np.random.default_rng(2).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    cfg = TrainParams.model_validate({**MED, "img_size": 48})
    dcfg = {**DCFG, **eval_resize(cfg)}
    cpu = eval_transform(48, dcfg)(image=img)["image"]
    crop = eval_transform(48, dcfg, normalize=False)(image=img)["image"]
    dev = eval_batch_augment(dcfg)(torch.from_numpy(crop)[None])[0]
    assert cpu.shape == dev.shape == (3, 48, 48)
    assert torch.allclose(cpu, dev, atol=1e-5)


def test_device_loader_hands_out_normalised_batches_and_start_keeps_the_pass(shards):
    df, root = shards
    cfg = TrainParams.model_validate(MED)
    aug = batch_augment(cfg, DCFG)
    ds = ManifestDataset(df, root, train_transform(cfg, DCFG, seed=0), seed=0, device_params=aug)
    loader = DeviceLoader(
        DataLoader(ds, batch_size=4, sampler=EpochSampler(len(ds), True, 0)),
        torch.device("cpu"),
        aug,
        channels_last=True,
    )
    assert len(loader) == 3 and loader.sampler.n == 12
    loader.sampler.set_epoch(1)
    plain = list(loader)
    loader.start()  # started ahead (workers would spawn now), then iterated: the same pass
    started = list(loader)
    assert len(plain) == 3 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(plain, started))
    x, _ = plain[0]
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    assert -2.2 < x.min() < -1.0 and 1.5 < x.max() < 2.7  # ImageNet-normalised range, not 0..255
    with pytest.raises(ValueError, match="uint8"):
        aug(x)
