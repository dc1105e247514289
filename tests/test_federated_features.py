import math

import pytest
import torch
import torch.nn.functional as F

from fedplatform.algorithms import federated_features as ff


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- DSA


@pytest.mark.parametrize("family", sorted(ff.DSA_FAMILIES))
def test_dsa_family_is_shared_by_the_batch_and_keeps_the_shape(family):
    one = torch.randn(1, 3, 32, 32, generator=gen(1))
    batch = one.repeat(4, 1, 1, 1)
    out = ff.DSA_FAMILIES[family](batch, gen(2))
    assert out.shape == batch.shape
    assert torch.allclose(out, out[:1].expand_as(out), atol=1e-6)  # Siamese: one draw for all images


def test_dsa_is_a_function_of_the_generator():
    x = torch.randn(5, 3, 32, 32, generator=gen(1))
    assert torch.equal(ff.dsa(x, gen(9)), ff.dsa(x, gen(9)))
    outs = {ff.dsa(x, gen(s)).sum().item() for s in range(20)}
    assert len(outs) > 3


def test_dsa_crop_shifts_with_zero_fill_and_cutout_zeroes_a_square():
    x = torch.ones(1, 1, 32, 32)
    crop = ff._dsa_crop(x, gen(3))
    zero_rows = int((crop[0, 0].sum(1) == 0).sum())
    zero_cols = int((crop[0, 0].sum(0) == 0).sum())
    assert zero_rows <= 4 and zero_cols <= 4
    cut = ff._dsa_cutout(x, gen(4))
    zeros = int((cut == 0).sum())
    assert 0 < zeros <= 16 * 16


# ---------------------------------------------------------------------------- gradients


def autograd_classifier_grad(z, label, w, b):
    w = w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    loss = F.cross_entropy(z @ w.t() + b, torch.full((len(z),), label))
    gw, gb = torch.autograd.grad(loss, [w, b])
    return gw, gb


def test_analytic_classifier_gradient_equals_autograd():
    z = torch.randn(7, 6, generator=gen(1))
    w, b = torch.randn(4, 6, generator=gen(2)), torch.randn(4, generator=gen(3))
    gw, gb = ff.classifier_gradient(z, 2, w, b)
    aw, ab = autograd_classifier_grad(z, 2, w, b)
    assert torch.allclose(gw, aw, atol=1e-6) and torch.allclose(gb, ab, atol=1e-6)


def test_batched_synthetic_gradients_equal_autograd_and_are_differentiable_in_v():
    c, m, d = 5, 4, 6
    v = torch.randn(c, m, d, generator=gen(1), requires_grad=True)
    w, b = torch.randn(c, d, generator=gen(2)), torch.randn(c, generator=gen(3))
    classes = torch.tensor([0, 2, 4])
    sw, sb = ff.synthetic_class_gradients(v[classes], classes, w, b)
    for j, cls in enumerate(classes.tolist()):
        wl, bl = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        loss = F.cross_entropy(v[cls] @ wl.t() + bl, torch.full((m,), cls))
        aw, ab = torch.autograd.grad(loss, [wl, bl], create_graph=True)
        assert torch.allclose(sw[j], aw, atol=1e-6) and torch.allclose(sb[j], ab, atol=1e-6)
        # second-order: the matching loss's gradient w.r.t. V agrees too
        g1 = torch.autograd.grad((sw[j] ** 2).sum() + (sb[j] ** 2).sum(), v, retain_graph=True)[0]
        g2 = torch.autograd.grad((aw ** 2).sum() + (ab ** 2).sum(), v, retain_graph=True)[0]
        assert torch.allclose(g1, g2, atol=1e-5)


def test_real_class_gradients_cover_only_present_classes():
    images = torch.randn(20, 3, 8, 8, generator=gen(1))
    labels = torch.tensor([1] * 12 + [3] * 8)
    proj = torch.randn(3 * 8 * 8, 5, generator=gen(2))
    features = lambda x: x.flatten(1) @ proj
    w, b = torch.randn(6, 5, generator=gen(3)), torch.zeros(6)
    grads = ff.real_class_gradients(features, images, labels, w, b, gen(4), batch_real=4)
    assert sorted(grads) == [1, 3]
    assert grads[1][0].shape == (6, 5) and grads[1][1].shape == (6,)
    again = ff.real_class_gradients(features, images, labels, w, b, gen(4), batch_real=4)
    assert all(torch.equal(grads[c][0], again[c][0]) for c in grads)


def test_paper_real_gradient_is_the_mean_ce_gradient_over_all_class_samples():
    images = torch.randn(20, 3, 8, 8, generator=gen(1))
    labels = torch.tensor([1] * 12 + [3] * 8)
    proj = torch.randn(3 * 8 * 8, 5, generator=gen(2))
    features = lambda x: x.flatten(1) @ proj
    w, b = torch.randn(6, 5, generator=gen(3)), torch.zeros(6)
    grads = ff.real_class_gradients(features, images, labels, w, b, gen(4), form="paper")
    aw, ab = autograd_classifier_grad(features(images[:12]), 1, w, b)
    assert torch.allclose(grads[1][0], aw, atol=1e-5) and torch.allclose(grads[1][1], ab, atol=1e-6)


def test_class_gradients_are_averaged_over_the_clients_holding_the_class():
    g = lambda x: (torch.full((2, 3), float(x)), torch.full((2,), float(x)))
    clients = [{0: g(1), 1: g(2)}, {1: g(4)}, {0: g(3)}]
    out = ff.aggregate_class_gradients(clients)
    assert sorted(out) == [0, 1]
    assert out[0][0][0, 0] == 2.0 and out[1][1][0] == 3.0  # unweighted mean of the holders only
    weighted = ff.aggregate_class_gradients(clients, counts=[{0: 1, 1: 1}, {1: 3}, {0: 3}])
    assert weighted[0][0][0, 0] == pytest.approx((1 + 9) / 4) and weighted[1][0][0, 0] == pytest.approx((2 + 12) / 4)


# ---------------------------------------------------------------------------- losses


def test_gml_reference_form_is_per_row_cosine_plus_bias_term_hand_values():
    syn_w = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    real_w = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    syn_b, real_b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    # rows: cos 1 -> 1 - 1/(1 + 1e-6); cos 0 -> 1; bias row: cos 0 -> 1
    expected = (1 - 1 / (1 + 1e-6)) + 1 + 1
    assert ff.gradient_matching_loss(syn_w, syn_b, real_w, real_b).item() == pytest.approx(expected, rel=1e-6)
    # paper: mean over weight rows only
    assert ff.gradient_matching_loss(syn_w, syn_b, real_w, real_b, form="paper").item() == pytest.approx(
        ((1 - 1 / (1 + 1e-6)) + 1) / 2, rel=1e-6)
    assert ff.gradient_matching_loss(syn_w, syn_b, real_w, real_b, "mse").item() == pytest.approx(4.0)
    # concatenated [W, b]: s = (1,0,0,1,1,0), r = (1,0,1,0,0,1): dot 1, norms sqrt(3) each
    assert ff.gradient_matching_loss(syn_w, syn_b, real_w, real_b, "cos").item() == pytest.approx(
        1 - 1 / (3 + 1e-6), rel=1e-6)


def test_gml_sums_over_classes():
    a = torch.randn(3, 4, 5, generator=gen(1)), torch.randn(3, 4, generator=gen(2))
    r = torch.randn(3, 4, 5, generator=gen(3)), torch.randn(3, 4, generator=gen(4))
    whole = ff.gradient_matching_loss(a[0], a[1], r[0], r[1])
    parts = sum(ff.gradient_matching_loss(a[0][i : i + 1], a[1][i : i + 1], r[0][i : i + 1], r[1][i : i + 1])
                for i in range(3))
    assert whole.item() == pytest.approx(parts.item(), rel=1e-6)


def pcl_inputs(c=4, m=3, d=5, seed=0):
    v = torch.randn(c * m, d, generator=gen(seed), requires_grad=True)
    text = F.normalize(torch.randn(c, d, generator=gen(seed + 1)), dim=1)
    return v, ff.feature_labels(c, m), text


def test_pcl_closed_form_equals_the_literal_reference_form_value_and_gradient():
    v, y, text = pcl_inputs()
    closed = ff.prototype_contrastive_loss(v, y, text, 0.1, per_class=3)
    literal = ff.prototype_contrastive_loss_literal(v, y, text, 0.1)
    assert closed.item() == pytest.approx(literal.item(), rel=1e-5)
    g1 = torch.autograd.grad(closed, v)[0]
    g2 = torch.autograd.grad(literal, v)[0]
    assert torch.allclose(g1, g2, atol=1e-5)


def test_pcl_is_cross_entropy_against_text_prototypes_plus_log_m():
    c, m, tau = 4, 100, 0.1
    v, y, text = pcl_inputs(c, m, 5, seed=3)
    s = v @ text.t() / tau
    ce = F.cross_entropy(s, y, reduction="none")
    p_own = torch.softmax(s, 1).gather(1, y[:, None]).squeeze(1)
    pcl = ff.prototype_contrastive_loss(v, y, text, tau, m)
    # exact: L_i = CE_i + log m + log(1 - p_iy / m)
    assert pcl.item() == pytest.approx((ce + math.log(m) + torch.log1p(-p_own / m)).mean().item(), rel=1e-5)
    # so CE + log m up to at most -log(1 - 1/m)
    assert abs(pcl.item() - (ce.mean().item() + math.log(m))) <= -math.log(1 - 1 / m) + 1e-5


def test_pcl_with_one_feature_per_class_drops_every_anchor():
    v, y, text = pcl_inputs(c=3, m=1)
    assert ff.prototype_contrastive_loss(v, y, text, 0.1, per_class=1).item() == 0.0


def test_pcl_paper_form_against_a_literal_computation():
    v, y, text = pcl_inputs()
    n = len(y)
    sim = v @ v.t() / 0.1
    sim = sim.masked_fill(torch.eye(n, dtype=torch.bool), -math.inf)
    own = (v * text[y]).sum(1) / 0.1
    expected = (torch.logsumexp(sim, 1) - own).mean()
    got = ff.prototype_contrastive_loss_paper(v, y, text, 0.1, chunk=5)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------------------- server loops


def matching_setup(c=5, m=4, d=6):
    v = ff.init_features(c, m, d, gen(1))
    w, b = torch.randn(c, d, generator=gen(2)) * 0.1, torch.randn(c, generator=gen(3)) * 0.1
    real = {k: (torch.randn(c, d, generator=gen(10 + k)), torch.randn(c, generator=gen(20 + k))) for k in (0, 2, 3)}
    return v, w, b, real


def test_feature_update_equals_autograd_with_create_graph_and_does_not_depend_on_chunking(monkeypatch):
    v, w, b, real = matching_setup()
    c, m, d = 5, 4, 6
    text = F.normalize(torch.randn(c, d, generator=gen(5)), dim=1)
    labels = ff.feature_labels(c, m)
    pcl = lambda x: ff.prototype_contrastive_loss(x, labels, text, 0.1, m)
    new, stats = ff.update_features(v, w, b, real, steps=3, lr=0.1, contrast=pcl, contrast_weight=0.5)
    # the reference: autograd synthetic gradients with create_graph, per class, then one SGD step
    ref = v.clone()
    for _ in range(3):
        ref.requires_grad_(True)
        loss = 0.0
        for cls, (rw, rb) in real.items():
            wl, bl = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
            ce = F.cross_entropy(ref[cls * m : (cls + 1) * m] @ wl.t() + bl, torch.full((m,), cls))
            sw, sb = torch.autograd.grad(ce, [wl, bl], create_graph=True)
            loss = loss + ff.gradient_matching_loss(sw[None], sb[None], rw[None], rb[None])
        loss = loss + 0.5 * pcl(ref)
        grad = torch.autograd.grad(loss, ref)[0]
        ref = (ref - 0.1 * grad).detach()
    assert torch.allclose(new, ref, atol=1e-5)
    assert not torch.equal(new, v) and math.isfinite(stats["gml"]) and math.isfinite(stats["pcl"])
    monkeypatch.setattr(ff, "CHUNK_ELEMENTS", 1)  # one class per chunk
    chunked, _ = ff.update_features(v, w, b, real, steps=3, lr=0.1, contrast=pcl, contrast_weight=0.5)
    assert torch.allclose(chunked, new, atol=1e-6)


def test_feature_update_touches_only_matched_classes_without_contrast():
    v, w, b, real = matching_setup()
    new, _ = ff.update_features(v, w, b, real, steps=2, lr=0.1)
    moved = (new - v).abs().view(5, 4, 6).sum((1, 2)) > 0
    assert moved.tolist() == [True, False, True, True, False]


def test_retraining_is_deterministic_and_equals_autograd_sgd():
    c, m, d = 3, 5, 4
    v = ff.init_features(c, m, d, gen(1))
    y = ff.feature_labels(c, m)
    w0, b0 = ff.fresh_classifier(d, c, seed=11)
    w1, b1 = ff.retrain_classifier(v, y, w0, b0, epochs=3, lr=0.05, batch_size=4, generator=gen(7))
    w2, b2 = ff.retrain_classifier(v, y, w0, b0, epochs=3, lr=0.05, batch_size=4, generator=gen(7))
    assert torch.equal(w1, w2) and torch.equal(b1, b2)
    layer = torch.nn.Linear(d, c)
    with torch.no_grad():
        layer.weight.copy_(w0)
        layer.bias.copy_(b0)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    g = gen(7)
    for _ in range(3):
        order = torch.randperm(len(v), generator=g)
        for s in range(0, len(v), 4):  # 15 rows: the last batch of 3 is kept
            idx = order[s : s + 4]
            loss = F.cross_entropy(layer(v[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert torch.allclose(w1, layer.weight, atol=1e-6) and torch.allclose(b1, layer.bias, atol=1e-6)


def test_fresh_classifier_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a = ff.fresh_classifier(8, 3, 5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a[0], ff.fresh_classifier(8, 3, 5)[0])
    assert not torch.equal(a[0], ff.fresh_classifier(8, 3, 6)[0])


def test_server_losses_scale_to_1000_classes_without_n_by_n_matrices():
    c, m, d = 1000, 100, 512
    v = ff.init_features(c, m, d, gen(0))
    y = ff.feature_labels(c, m)
    text = F.normalize(torch.randn(c, d, generator=gen(1)), dim=1)
    w, b = torch.randn(c, d, generator=gen(2)) * 0.01, torch.zeros(c)
    real = {k: (torch.randn(c, d, generator=gen(3)), torch.randn(c, generator=gen(4))) for k in range(0, 1000, 50)}
    pcl = lambda x: ff.prototype_contrastive_loss(x, y, text, 0.1, m)
    new, stats = ff.update_features(v, w, b, real, steps=1, lr=0.1, contrast=pcl, contrast_weight=0.001)
    assert new.shape == (c * m, d) and math.isfinite(stats["pcl"]) and math.isfinite(stats["gml"])
