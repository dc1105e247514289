import numpy as np
import pytest
import ray
import torch

from fedclip_helpers import domain_config, make_domain_folders
from fedplatform.config import ExperimentConfig
from fedplatform.data import prepare
from fedplatform.models.clip import create_clip
from fedplatform.models.feature_cache import (
    FEATURES,
    META,
    FeatureCacheError,
    build_feature_cache,
    cache_path,
    encode_samples,
    load_feature_cache,
    pil_images,
)


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    root = make_domain_folders(tmp_path_factory.mktemp("fc") / "pacs_like", per_class=4)
    cfg = domain_config(root)
    return cfg, prepare(cfg)


@pytest.fixture(scope="module")
def ray_local():
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    if started:
        ray.shutdown()


def reference_features(cfg, ds):
    clip, preprocess, _, _ = create_clip(cfg.clip.model, cfg.clip.pretrained)
    return encode_samples(clip, preprocess, ds, np.arange(len(ds)))


def test_built_on_ray_equals_encoding_every_sample_directly(domains, ray_local):
    cfg, ds = domains
    path = build_feature_cache(cfg, ds, batch_size=16)
    feats = load_feature_cache(cfg, ds)
    assert path == cache_path(cfg, ds) and path.parent.parent == ds.path.parent
    assert feats.shape == (len(ds), 512) and feats.dtype == np.float32 and not feats.flags.writeable
    np.testing.assert_allclose(feats, reference_features(cfg, ds), atol=1e-5)


def test_threaded_preprocessing_equals_one_image_at_a_time(domains):
    cfg, ds = domains
    clip, preprocess, _, _ = create_clip(cfg.clip.model, cfg.clip.pretrained)
    ids, batch = np.arange(len(ds)), 5  # the last batch is partial
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # 3 preprocessing threads; the same for both encodings
    try:
        got = encode_samples(clip, preprocess, ds, ids, batch_size=batch)
        with torch.no_grad():
            want = [clip.encode_image(torch.stack([preprocess(im) for im in pil_images(ds, ids[s : s + batch])]))
                    for s in range(0, len(ids), batch)]
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(got, torch.cat(want).numpy())


def test_build_is_idempotent(domains):
    cfg, ds = domains
    path = build_feature_cache(cfg, ds, use_ray=False)
    stamp = (path / META).stat().st_mtime_ns
    assert build_feature_cache(cfg, ds, use_ray=False) == path
    assert (path / META).stat().st_mtime_ns == stamp


def test_corrupted_cache_is_detected_and_rebuilt(domains):
    cfg, ds = domains
    path = build_feature_cache(cfg, ds, use_ray=False)
    good = np.array(load_feature_cache(cfg, ds))
    data = bytearray((path / FEATURES).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content: only the sha256 sees it
    (path / FEATURES).write_bytes(bytes(data))
    with pytest.raises(FeatureCacheError, match="sha256"):
        load_feature_cache(cfg, ds, verify=True)
    build_feature_cache(cfg, ds, use_ray=False)
    np.testing.assert_array_equal(load_feature_cache(cfg, ds, verify=True), good)
    # a partial cache (no meta.json, as after a crash) is rebuilt too
    (path / META).unlink()
    with pytest.raises(FeatureCacheError, match="incomplete"):
        load_feature_cache(cfg, ds)
    build_feature_cache(cfg, ds, use_ray=False)
    np.testing.assert_array_equal(load_feature_cache(cfg, ds), good)
    # a truncated file fails the size check even without hashing
    with open(path / FEATURES, "r+b") as f:
        f.truncate(100)
    with pytest.raises(FeatureCacheError, match="bytes, expected"):
        load_feature_cache(cfg, ds)
    build_feature_cache(cfg, ds, use_ray=False)


def test_key_depends_on_weights(domains, tmp_path):
    import torch

    cfg, ds = domains
    clip, *_ = create_clip("fedplatform-tiny", None)
    torch.save(clip.state_dict(), tmp_path / "w.pt")
    other = cfg.model_copy(deep=True)
    other.clip.pretrained = str(tmp_path / "w.pt")
    assert cache_path(other, ds) != cache_path(cfg, ds)


def test_fixed_size_gray_digits_become_rgb_clip_inputs():
    cfg = ExperimentConfig.model_validate({"data": {"dataset": "digits"}, "partition": {"num_clients": 3},
                                           "clients_per_round": 3,
                                           "clip": {"model": "fedplatform-tiny", "pretrained": None}})
    ds = prepare(cfg)
    build_feature_cache(cfg, ds, use_ray=False)
    feats = load_feature_cache(cfg, ds)
    assert feats.shape == (len(ds), 512) and np.isfinite(feats).all()
