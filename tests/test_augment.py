import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision import transforms

from fedplatform.errors import UserError
from fedplatform.models.augment import augment, normalize

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def crop_flip(img, i, j, flip, pad=4):
    h, w = img.shape[-2:]
    out = F.pad(img, (pad, pad, pad, pad))[..., i : i + h, j : j + w]
    return out.flip(-1) if flip else out


def draws_explaining(x, y):
    """Every (row offset, column offset, flip) that turns image x into y."""
    candidates = [(i, j, f) for i in range(9) for j in range(9) for f in (False, True)]
    return {c for c in candidates if torch.equal(crop_flip(x, *c), y)}


def test_normalize_equals_totensor_then_normalize():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    tv = transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])
    expected = torch.stack([tv(img) for img in images])
    out = normalize(torch.from_numpy(images), CIFAR_MEAN, CIFAR_STD)
    assert out.dtype == torch.float32 and out.shape == (3, 3, 32, 32)
    assert torch.equal(out, expected)


def test_normalize_rejects_a_channel_count_that_does_not_match_the_statistics():
    with pytest.raises(ValueError, match="C = len"):
        normalize(torch.zeros(2, 8, 8, 1, dtype=torch.uint8), CIFAR_MEAN, CIFAR_STD)


def test_reference_shares_one_crop_offset_and_flip_across_the_batch():
    x = torch.randn(16, 3, 32, 32)
    for seed in range(5):
        y = augment(x, "reference", torch.Generator().manual_seed(seed))
        shared = set.intersection(*(draws_explaining(x[k], y[k]) for k in range(len(x))))
        assert len(shared) == 1


def test_reference_reproduces_torchvision_randomcrop_flip_on_the_batch_tensor():
    # torchvision applied to a batch tensor draws once per call from the global RNG; the same
    # seed in an explicit generator gives the same crop and flip.
    x = torch.randn(8, 3, 32, 32)
    tv = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()])
    for seed in range(10):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            expected = tv(x)
        assert torch.equal(augment(x, "reference", torch.Generator().manual_seed(seed)), expected)


def test_per_sample_draws_an_offset_and_flip_for_each_image():
    x = torch.randn(32, 3, 32, 32)
    y = augment(x, "per_sample", torch.Generator().manual_seed(0))
    per_image = [draws_explaining(x[k], y[k]) for k in range(len(x))]
    assert all(len(d) == 1 for d in per_image)
    draws = [d.pop() for d in per_image]
    assert len(set(draws)) > 10
    assert {f for _, _, f in draws} == {False, True}


@pytest.mark.parametrize("mode", ["reference", "per_sample"])
def test_padding_is_zero_in_normalised_space(mode):
    x = torch.full((4, 1, 8, 8), 3.0)
    zeros_seen = False
    for seed in range(20):
        y = augment(x, mode, torch.Generator().manual_seed(seed))
        assert set(y.unique().tolist()) <= {0.0, 3.0}
        zeros_seen |= bool((y == 0).any())
    assert zeros_seen


@pytest.mark.parametrize("mode", ["reference", "per_sample"])
@pytest.mark.parametrize("shape", [(5, 1, 8, 8), (5, 3, 12, 20)])
def test_augmentation_keeps_any_image_shape(mode, shape):
    assert augment(torch.randn(shape), mode, torch.Generator().manual_seed(0)).shape == shape


@pytest.mark.parametrize("mode", ["reference", "per_sample"])
def test_augmentation_is_a_function_of_the_generator_alone(mode):
    x = torch.randn(16, 3, 32, 32)
    global_state = torch.get_rng_state()
    first = augment(x, mode, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), global_state)
    torch.manual_seed(12345)  # the global RNG plays no part
    assert torch.equal(augment(x, mode, torch.Generator().manual_seed(3)), first)
    others = [augment(x, mode, torch.Generator().manual_seed(s)) for s in range(4, 10)]
    assert any(not torch.equal(o, first) for o in others)


def test_none_returns_the_batch_unchanged():
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(augment(x, "none", torch.Generator().manual_seed(0)), x)


def test_unknown_augmentation_is_a_user_error():
    with pytest.raises(UserError, match="reference, per_sample, none"):
        augment(torch.randn(1, 1, 8, 8), "mixup", torch.Generator())
