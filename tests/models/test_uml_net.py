"""The network's shapes, gradients and, above all, its wiring: the navigator must be steered by U
and the classifier by eta, and the ablation flags must remove exactly that wiring."""

import numpy as np
import pytest
import torch

from uml.config import LossParams
from uml.errors import ConfigError
from uml.evidential import dirichlet
from uml.losses import uml_loss
from uml.models import build_model, count_parameters, load_model, save_model
from uml.models.encoders import TimmEncoder

TINY = dict(image_size=64)


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return build_model("small", **TINY)


def _relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


def _features(model, x):
    f_c, f_s = model.cls_encoder(x), model.seg_encoder(x)
    f_m = [mix(c, s) for mix, c, s in zip(model.mixers, f_c, f_s)]
    return f_c, f_s, f_m


@pytest.mark.parametrize("size", [128, 192, 256])
def test_small_output_shapes(size):
    model = build_model("small", image_size=size, num_classes=3, num_mask_classes=4).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, size, size))
        inf = model.infer(torch.rand(2, 3, size, size))
    assert out["class_evidence"].shape == (2, 3)
    assert out["seg_evidence"].shape == out["mutual_evidence"].shape == (2, 4, size, size)
    assert out["uncertainty_map"].shape == (2, 1, size, size)
    assert [tuple(s.shape[-2:]) for s in out["side_logits"]] == [(size // d, size // d) for d in (16, 8, 4, 2)]
    assert {k: tuple(v.shape) for k, v in inf.items()} == {
        "class_prob": (2, 3), "class_uncertainty": (2, 1), "seg_prob": (2, 4, size, size), "seg_uncertainty": (2, 1, size, size)}
    assert bool((out["seg_evidence"] >= 0).all()) and torch.allclose(inf["class_prob"].sum(1), torch.ones(2))


@pytest.fixture(scope="module")
def paper():
    return build_model("paper").eval()


def test_paper_preset_is_the_published_configuration(paper):
    assert paper.cls_encoder.name == "res2net50_26w_4s" and paper.seg_encoder.name == "vgg16_bn"
    assert paper.cls_encoder.channels == [64, 256, 512, 1024]  # stride-1 stem, layer4 unused
    assert paper.seg_encoder.channels == [64, 128, 256, 512]  # conv1_2 .. conv4_3
    assert paper.cls_encoder.strides == paper.seg_encoder.strides == [1, 2, 4, 8]
    assert 20e6 < count_parameters(paper) < 100e6


@pytest.mark.parametrize("size", [128, 192, 256])
def test_paper_output_shapes(paper, size):
    with torch.no_grad():
        out = paper(torch.rand(1, 3, size, size))
    assert out["class_evidence"].shape == (1, 2)
    assert out["seg_evidence"].shape == (1, 3, size, size) and out["uncertainty_map"].shape == (1, 1, size, size)
    assert [tuple(s.shape[-2:]) for s in out["side_logits"]] == [(size // d, size // d) for d in (8, 4, 2, 1)]


def test_every_parameter_gets_a_gradient():
    model = build_model("small", **TINY).train()
    x = torch.rand(4, 3, 64, 64)
    mask, label = torch.randint(0, 3, (4, 64, 64)), torch.tensor([0, 1, 0, 1])
    # timm zero-initialises each residual block's last BN gamma, which blocks gradients into
    # that block until the first update: take one step, then check.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        optimizer.zero_grad()
        loss, _ = uml_loss(model(x), mask, label, LossParams(), epoch=3, evidential=True)
        loss.backward()
        if step == 0:
            optimizer.step()
    dead = [n for n, p in model.named_parameters() if p.grad is None or float(p.grad.abs().sum()) == 0.0]
    assert not dead, f"parameters without gradient: {dead}"
    for part in ("cls_encoder", "seg_encoder", "mixers", "mutual_decoder", "navigator", "instructor"):
        assert any(n.startswith(part) for n, _ in model.named_parameters())


def test_navigator_is_steered_by_the_uncertainty_map(small):
    model = small.eval()
    with torch.no_grad():
        x = torch.rand(2, 3, 64, 64)
        _, f_s, f_m = _features(model, x)
        evidence = torch.rand(2, 3, 32, 32) * 5
        u = dirichlet(evidence)[2]
        s0_a, sides_a, eta_a = model.navigate(f_s, f_m, evidence, u)
        # Same evidence, different U: only the exp(-U) gating differs.
        s0_b, sides_b, eta_b = model.navigate(f_s, f_m, evidence, torch.rand_like(u))
        s0_c, *_ = model.navigate(f_s, f_m, evidence, u)
    assert torch.equal(s0_a, s0_c)  # deterministic in eval mode
    assert _relative_change(s0_a, s0_b) > 0.01
    assert _relative_change(sides_a[0], sides_b[0]) > 0.01  # the bottom is gated too
    assert _relative_change(eta_a, eta_b) > 0.01


def test_navigator_uses_the_mutual_evidence_through_reliable_masks(small):
    model = small.eval()
    with torch.no_grad():
        _, f_s, f_m = _features(model, torch.rand(2, 3, 64, 64))
        u = torch.full((2, 1, 32, 32), 0.5)
        a, *_ = model.navigate(f_s, f_m, torch.zeros(2, 3, 32, 32), u)
        b, *_ = model.navigate(f_s, f_m, torch.rand(2, 3, 32, 32) * 5, u)
    assert _relative_change(a, b) > 0.01


def test_classifier_is_steered_by_eta(small):
    model = small.eval()
    with torch.no_grad():
        f_c, _, f_m = _features(model, torch.rand(2, 3, 64, 64))
        eta = torch.rand(2, model.navigator.out_channels, 4, 4)
        a = model.instructor(f_c[3], f_m[3], eta)
        b = model.instructor(f_c[3], f_m[3], eta * 3 + 1)
    assert a.shape == (2, 2) and _relative_change(a, b) > 0.01


def _names(model):
    return {n for n, _ in model.named_parameters()}


def test_uncertainty_false_removes_exactly_gating_and_instructor():
    evidential = build_model("small", **TINY)
    softmax = build_model("small", uncertainty=False, **TINY)
    # Same modules except the instructor's eta branch.
    assert _names(softmax) < _names(evidential)
    assert {n.split(".")[1] for n in _names(evidential) - _names(softmax)} == {"eta_conv"}
    with torch.no_grad():
        out = softmax.eval()(torch.rand(2, 3, 64, 64))
        assert "class_evidence" not in out and "uncertainty_map" not in out
        # No instructor: the navigator cannot influence the class output...
        before = softmax(torch.ones(1, 3, 64, 64))["class_logits"]
        for p in softmax.navigator.parameters():
            p.add_(torch.randn_like(p))
        after = softmax(torch.ones(1, 3, 64, 64))["class_logits"]
        assert torch.allclose(before, after)
        # ...while in the full model it does, through eta.
        evidential.eval()
        before = evidential(torch.ones(1, 3, 64, 64))["class_logits"]
        for p in evidential.navigator.parameters():
            p.add_(torch.randn_like(p))
        after = evidential(torch.ones(1, 3, 64, 64))["class_logits"]
        assert _relative_change(before, after) > 0.01


def test_seg_only_and_cls_only_baselines():
    seg = build_model("small", tasks=["seg"], **TINY).eval()
    cls = build_model("small", tasks=["cls"], **TINY).eval()
    seg_modules = {n.split(".")[0] for n in _names(seg)}
    cls_modules = {n.split(".")[0] for n in _names(cls)}
    assert seg_modules == {"seg_encoder", "navigator"}
    assert cls_modules == {"cls_encoder", "instructor"}
    assert not any("embeds" in n for n in _names(seg))  # no reliable masks without a mutual branch
    assert not any("eta_conv" in n for n in _names(cls))  # no instructor input
    with torch.no_grad():
        seg_out, cls_out = seg(torch.rand(1, 3, 64, 64)), cls(torch.rand(1, 3, 64, 64))
    assert "class_logits" not in seg_out and "seg_evidence" in seg_out and "uncertainty_map" not in seg_out
    assert set(cls_out) == {"class_logits", "class_evidence"}
    assert set(seg.infer(torch.rand(1, 3, 64, 64))) == {"seg_prob", "seg_uncertainty"}


def test_save_and_load_round_trip(tmp_path, small):
    model = small.eval()
    path = save_model(model, tmp_path / "model.pt", extra={"class_names": ["a", "b"]})
    payload = torch.load(path, weights_only=True)  # the safe loader accepts the file
    assert payload["config"]["cls_encoder"] == "resnet18"
    loaded = load_model(path)
    assert not loaded.training and loaded.extra["class_names"] == ["a", "b"]
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, b = model.infer(x), loaded.infer(x)
    for key in a:
        assert torch.equal(a[key], b[key])


def test_local_pretrained_weights_are_loaded(tmp_path):
    from uml._compat import import_timm

    reference = import_timm().create_model("resnet18", pretrained=False)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    encoder = TimmEncoder("resnet18", [2, 4, 8, 16], weights=str(tmp_path / "resnet18.pth"))
    assert torch.equal(encoder.body.conv1.weight, reference.conv1.weight)
    assert torch.equal(encoder.body.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    with pytest.raises(ConfigError, match="not found"):
        TimmEncoder("resnet18", [2, 4, 8, 16], weights=str(tmp_path / "missing.pth"))


def test_levels_are_aligned_by_stride():
    # VGG starts at stride 1; ResNet needs a stride-1 stem to reach it.
    vgg = TimmEncoder("vgg11_bn", [2, 4, 8, 16])
    resnet = TimmEncoder("resnet18", [1, 2, 4, 8])
    assert vgg.channels == [128, 256, 512, 512]
    assert resnet.channels == [64, 64, 128, 256]
    with torch.no_grad():
        sizes = [f.shape[-1] for f in resnet(torch.rand(1, 3, 64, 64))]
    assert sizes == [64, 32, 16, 8]


@pytest.mark.parametrize("overrides, message", [
    (dict(cls_encoder="not_a_model"), "not a timm model"),
    (dict(feature_strides=[3, 6, 12, 24]), "powers of two"),
    (dict(image_size=100), "divisible"),
    (dict(colour="blue"), "unknown model override"),
])
def test_bad_configuration_is_a_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_model("small", **overrides)


def _toy_fundus(n: int, size: int, seed: int = 0):
    """Bright disc with a brighter cup on a noisy background; the label follows the cup size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = np.zeros((n, 3, size, size), np.float32)
    masks = np.zeros((n, size, size), np.int64)
    labels = np.zeros(n, np.int64)
    for i in range(n):
        cy, cx = rng.uniform(0.35, 0.65, 2) * size
        disc_r = rng.uniform(0.18, 0.25) * size
        ratio = rng.uniform(0.3, 0.8)
        r = np.hypot(yy - cy, xx - cx)
        masks[i][r < disc_r] = 1
        masks[i][r < disc_r * ratio] = 2
        labels[i] = int(ratio > 0.55)
        base = np.stack([0.6, 0.25, 0.1])[:, None, None] + rng.normal(0, 0.05, (3, size, size))
        images[i] = np.clip(base + 0.25 * (masks[i] >= 1) + 0.15 * (masks[i] == 2), 0, 1)
    return torch.from_numpy(images), torch.from_numpy(masks), torch.from_numpy(labels)


def test_small_preset_overfits_eight_images():
    torch.manual_seed(0)
    images, masks, labels = _toy_fundus(8, 64)
    model = build_model("small", image_size=64, dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    weights = LossParams(kl_annealing_epochs=1)
    losses = []
    for step in range(150):
        model.train()
        loss, _ = uml_loss(model(images), masks, labels, weights, epoch=1, evidential=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    with torch.no_grad():
        pred = model.infer(images)
    seg = pred["seg_prob"].argmax(1)
    dices = []
    for cls in (1, 2):
        p, g = seg == cls, masks == cls
        dices.append(float(2 * (p & g).sum() / (p.sum() + g.sum())))
    assert losses[-1] <= 0.2 * losses[0], f"loss fell only from {losses[0]:.3f} to {losses[-1]:.3f}"
    assert min(dices) >= 0.85, f"Dice per class {dices}"
    assert float((pred["class_prob"].argmax(1) == labels).float().mean()) == 1.0
