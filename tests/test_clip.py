import time

import pytest
import torch

import fedplatform.models.clip as clipmod
from fedplatform.errors import UserError
from fedplatform.models.clip import FEDCLIP_TEMPLATE, create_clip, text_prototypes


@pytest.fixture(scope="module")
def tiny():
    return create_clip("fedplatform-tiny", None)


def test_tiny_model_is_registered_frozen_and_in_eval_mode(tiny):
    clip, preprocess, tokenizer, info = tiny
    assert not clip.training
    assert not any(p.requires_grad for p in clip.parameters())
    assert info.pretrained is False and info.weights == "untrained:seed0" and info.embed_dim == 512
    x = preprocess(__import__("PIL.Image").Image.new("RGB", (40, 30)))
    assert tuple(x.shape) == (3, 32, 32)
    assert clip.encode_image(x[None]).shape == (1, 512)


def test_untrained_clip_is_the_same_in_every_process(tiny):
    again, *_ = create_clip("fedplatform-tiny", None)
    for (k, a), b in zip(tiny[0].state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_text_prototypes_are_l2_normalised_and_clean_names_is_an_option(tiny):
    clip, _, tokenizer, _ = tiny
    t = text_prototypes(clip, tokenizer, ["dog", "Alarm_Clock"], FEDCLIP_TEMPLATE)
    assert t.shape == (2, 512) and t.dtype == torch.float32
    assert torch.allclose(t.norm(dim=1), torch.ones(2), atol=1e-5)
    cleaned = text_prototypes(clip, tokenizer, ["dog", "Alarm_Clock"], FEDCLIP_TEMPLATE, clean_names=True)
    assert torch.allclose(t[0], cleaned[0]) and not torch.allclose(t[1], cleaned[1])


def test_unknown_tag_lists_the_known_ones():
    with pytest.raises(UserError, match="not a known open_clip tag for ViT-B-32; known tags: openai, laion400m_e31"):
        create_clip("ViT-B-32", "no_such_tag")


def test_unknown_model_is_a_user_error():
    with pytest.raises(UserError, match="not an open_clip model"):
        create_clip("ViT-Q-99", None)


def test_offline_pretrained_tag_fails_fast_and_says_how_to_pass_a_local_checkpoint(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(clipmod, "_reachable", lambda host, timeout=0: False)  # no network
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # and nothing cached
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"cannot be reached \(no network\).*pass the checkpoint file as a local path: "
                                        r"clip.pretrained=/path/to/ViT-B-32-openai.pt"):
        create_clip("ViT-B-32", "openai")
    assert time.perf_counter() - start < 5


def test_local_checkpoint_path_loads(tiny, tmp_path):
    sd = {k: v.clone() for k, v in tiny[0].state_dict().items()}
    sd["logit_scale"].fill_(4.0)
    path = tmp_path / "tiny.pt"
    torch.save(sd, path)
    clip, _, _, info = create_clip("fedplatform-tiny", str(path))
    assert info.pretrained and info.weights.startswith("sha256:") and info.source == str(path.resolve())
    assert float(clip.logit_scale) == 4.0 and not clip.training
    # a training checkpoint wrapping the state dict (DDP "module." prefixes) loads too
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "wrapped.pt")
    wrapped, *_ = create_clip("fedplatform-tiny", str(tmp_path / "wrapped.pt"))
    assert float(wrapped.logit_scale) == 4.0


def test_checkpoint_that_is_not_a_clip_state_dict_is_a_clear_error(tmp_path):
    bad = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(3)}, bad)
    with pytest.raises(UserError, match=r"resnet.pt'? is not a CLIP state dict for fedplatform-tiny: .*missing keys"):
        create_clip("fedplatform-tiny", str(bad))
    junk = tmp_path / "notes.pt"
    junk.write_text("hello")
    with pytest.raises(UserError, match="notes.pt.*cannot be read as a PyTorch checkpoint"):
        create_clip("fedplatform-tiny", str(junk))
    with pytest.raises(UserError, match="no such file"):
        create_clip("fedplatform-tiny", str(tmp_path / "missing.pt"))
