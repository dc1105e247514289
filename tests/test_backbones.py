import math

import pytest
import torch
from torch import nn

from fedplatform.errors import UserError
from fedplatform.models.backbones import MODELS, create_model


@pytest.mark.parametrize("num_classes, expected", [(10, 1_361_738), (100, 1_407_908)])
def test_resnet8_parameter_count_matches_reference(num_classes, expected):
    model = create_model("resnet8", num_classes)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize(
    "name, in_channels, size", [("resnet8", 3, 32), ("resnet8", 3, 64), ("resnet8_creff", 3, 32), ("small_cnn", 1, 8),
                                ("small_cnn", 3, 32), ("mlp", 1, 8), ("mlp", 3, 32)]
)
def test_every_model_gives_logits_features_and_a_linear_head(name, in_channels, size):
    model = create_model(name, num_classes=7, in_channels=in_channels, image_size=size).eval()
    x = torch.randn(4, in_channels, size, size)
    z = model.features(x)
    assert z.shape == (4, model.feature_dim)
    assert isinstance(model.classifier, nn.Linear)
    assert (model.classifier.in_features, model.classifier.out_features) == (model.feature_dim, 7)
    assert torch.equal(model(x), model.classifier(z))


def test_resnet8_feature_is_the_512_wide_add_mlp_output_without_activation():
    model = create_model("resnet8", 10).eval()
    assert model.feature_dim == 512
    assert (model.add_mlp.in_features, model.add_mlp.out_features) == (256, 512)
    assert model.add_mlp.bias is not None
    z = model.features(torch.randn(8, 3, 32, 32))
    assert (z < 0).any()  # no ReLU after add_mlp


def test_resnet8_creff_is_the_original_creff_network_with_the_256_wide_pooled_feature():
    creff, clip2fl = create_model("resnet8_creff", 10).eval(), create_model("resnet8", 10).eval()
    assert creff.feature_dim == 256 and (creff.classifier.in_features, creff.classifier.out_features) == (256, 10)
    assert sum(p.numel() for p in creff.parameters()) == 1_227_594  # resnet8 less add_mlp, head 256 -> 10
    assert not any(k.startswith("add_mlp") for k in creff.state_dict())
    # Same backbone: with CLIP2FL's body weights, z is the pooled layer3 output itself (post-ReLU).
    body = {k: v for k, v in clip2fl.state_dict().items() if not k.startswith(("add_mlp", "classifier"))}
    creff.load_state_dict(body, strict=False)
    x = torch.randn(4, 3, 32, 32)
    pooled = clip2fl.avgpool(clip2fl.layer3(clip2fl.layer2(clip2fl.layer1(clip2fl.relu(clip2fl.bn1(clip2fl.conv1(x)))))))
    z = creff.features(x)
    assert torch.allclose(z, pooled.flatten(1)) and (z >= 0).all()


def test_resnet8_stages_and_pool_follow_the_reference_layout():
    model = create_model("resnet8", 10)
    assert model.conv1.in_channels == 3 and model.conv1.out_channels == 64 and model.conv1.bias is None
    widths = [(b[0].conv1.in_channels, b[0].conv2.out_channels, b[0].conv1.stride[0]) for b in
              (model.layer1, model.layer2, model.layer3)]
    assert widths == [(64, 64, 1), (64, 128, 2), (128, 256, 2)]
    assert model.layer1[0].downsample is None
    for layer in (model.layer2, model.layer3):
        conv, bn = layer[0].downsample
        assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and conv.bias is None
        assert isinstance(bn, nn.BatchNorm2d)
    assert isinstance(model.avgpool, nn.AvgPool2d) and model.avgpool.kernel_size == 8


def test_resnet8_init_is_he_normal_on_fan_out_with_unit_batchnorm():
    torch.manual_seed(0)
    model = create_model("resnet8", 10)
    conv = model.layer3[0].conv2  # 256*256*9 weights: the sample std is tight
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 256)), rel=0.01)
    assert conv.weight.mean().abs().item() < 1e-3
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_resnet8_rejects_an_input_of_another_size_than_it_was_built_for():
    model = create_model("resnet8", 10, image_size=32)
    with pytest.raises(ValueError, match="image size"):
        model(torch.randn(2, 3, 64, 64))


def test_unknown_model_name_is_a_user_error_listing_registered_models():
    with pytest.raises(UserError) as err:
        create_model("resnet9000", 10)
    for name in MODELS:
        assert name in str(err.value)
    assert {"resnet8", "small_cnn"} <= set(MODELS)


def test_mlp_is_64_64_10_with_relu_and_the_torch_init_of_the_same_layers_for_the_same_seed():
    torch.manual_seed(0)
    model = create_model("mlp", 10, in_channels=1, image_size=8)
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))  # the Flower digits benchmark's MLP
    assert model.feature_dim == 64 and sum(p.numel() for p in model.parameters()) == 64 * 64 + 64 + 64 * 10 + 10
    assert [p.shape for p in model.parameters()] == [p.shape for p in reference.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    x = torch.randn(5, 1, 8, 8)
    assert model(x).shape == (5, 10)
    assert torch.equal(model(x), reference(x.flatten(1)))
    assert (model.features(x) >= 0).all()  # the feature is the ReLU output
