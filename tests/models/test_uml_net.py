"""The network's shapes, gradients and, above all, its wiring as the authors' 2023 code wires it:
softmax navigator outputs, reliable masks at exactly two levels with S_0 before the top one, the
navigator steered by U, the classifier by eta, frozen encoder BatchNorm, the published
initialisation, and ablation flags that remove exactly their wiring."""

import numpy as np
import pytest
import torch

from uml.config import LossParams
from uml.errors import ConfigError
from uml.evidential import dirichlet
from uml.losses import uml_loss
from uml.models import build_model, count_parameters, load_model, save_model
from uml.models.blocks import PolarizedSelfAttention, ReliableMask, SeparableConvBNReLU, channel_shuffle
from uml.models.encoders import TimmEncoder
from uml._compat import import_timm

FrozenBatchNorm2d = __import__("torchvision.ops.misc", fromlist=["FrozenBatchNorm2d"]).FrozenBatchNorm2d

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
    assert out["seg_logits"].shape == out["mutual_evidence"].shape == (2, 4, size, size)
    assert out["uncertainty_map"].shape == (2, 1, size, size)
    # S_3, S_2, S_1 at levels 3..1 (strides 16, 8, 4); S_0 is produced at level 0 (stride 2).
    assert [tuple(s.shape[-2:]) for s in out["side_logits"]] == [(size // d, size // d) for d in (16, 8, 4)]
    assert "seg_evidence" not in out  # the navigator's outputs are softmax logits, not evidence
    assert {k: tuple(v.shape) for k, v in inf.items()} == {
        "class_prob": (2, 3), "class_uncertainty": (2, 1), "class_prob_raw": (2, 3), "class_uncertainty_raw": (2, 1),
        "seg_prob": (2, 4, size, size), "seg_uncertainty": (2, 1, size, size), "seg_uncertainty_raw": (2, 1, size, size)}
    assert bool((out["mutual_evidence"] >= 0).all()) and torch.allclose(inf["class_prob"].sum(1), torch.ones(2))


@pytest.fixture(scope="module")
def paper():
    return build_model("paper").eval()


def test_paper_preset_is_the_published_configuration(paper):
    # Res2Net-50 v1b 26w x 4s: deep 3x3 stem (32, 32, 64 channels) and average-pool downsampling.
    assert paper.cls_encoder.name == "res2net50d" and paper.seg_encoder.name == "vgg16_bn"
    stem = paper.cls_encoder.body.conv1
    assert [m.out_channels for m in stem if isinstance(m, torch.nn.Conv2d)] == [32, 32, 64]
    assert all(m.stride == (1, 1) for m in stem if isinstance(m, torch.nn.Conv2d))  # kept at stride 1
    assert isinstance(paper.cls_encoder.body.layer2[0].downsample[0], torch.nn.AvgPool2d)
    assert paper.cls_encoder.channels == [64, 256, 512, 1024]  # stride-1 stem, layer4 unused
    assert paper.seg_encoder.channels == [64, 128, 256, 512]  # conv1_2 .. conv4_3
    assert paper.cls_encoder.strides == paper.seg_encoder.strides == [1, 2, 4, 8]
    # Every BatchNorm of both encoders is frozen; none elsewhere.
    for encoder in (paper.cls_encoder, paper.seg_encoder):
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules())
        assert sum(isinstance(m, FrozenBatchNorm2d) for m in encoder.modules()) >= 10  # VGG16-BN to conv4_3: 10
    # Published widths (authors' modules.py): f_m 64/128/256/512 from 2 x 256 mixed channels,
    # the navigator's top feature 128 = 64 + f_s[0]'s 64.
    assert [m.cls_proj.out_channels for m in paper.mixers] == [256] * 4
    assert [m.attention.ch_norm.normalized_shape[0] for m in paper.mixers] == [512] * 4
    assert isinstance(paper.mixers[3].out, torch.nn.Identity)
    assert paper.navigator.out_channels == 128
    # 39.4M here; the authors' model instantiates the unused Res2Net layer4 and VGG conv5 too.
    assert 39.0e6 < count_parameters(paper) < 39.8e6


@pytest.mark.parametrize("size", [128, 192, 256])
def test_paper_output_shapes(paper, size):
    with torch.no_grad():
        out = paper(torch.rand(1, 3, size, size))
    assert out["class_evidence"].shape == (1, 2)
    assert out["seg_logits"].shape == (1, 3, size, size) and out["uncertainty_map"].shape == (1, 1, size, size)
    assert [tuple(s.shape[-2:]) for s in out["side_logits"]] == [(size // d, size // d) for d in (8, 4, 2)]


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
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
    # The channel branch's query bias adds one constant to every position before a softmax over
    # positions, which the softmax cancels: its gradient is zero up to rounding (exactly zero on
    # some inputs, which made this test fail on CI). It is in the published layer, so it stays;
    # the check is that its gradient is rounding noise, far below the query weights'.
    shift_invariant = {n for n, _ in model.named_parameters() if n.endswith("attention.ch_query.bias")}
    assert len(shift_invariant) == len(model.mixers)
    grads = dict(model.named_parameters())
    for name in shift_invariant:
        weight_grad = float(grads[name.replace(".bias", ".weight")].grad.abs().max())
        assert float(grads[name].grad.abs().max()) < 1e-4 * max(weight_grad, 1e-12), name
    dead = [n for n, p in model.named_parameters()
            if n not in shift_invariant and (p.grad is None or float(p.grad.abs().sum()) == 0.0)]
    assert not dead, f"parameters without gradient: {dead}"
    for part in ("cls_encoder", "seg_encoder", "mixers", "mutual_decoder", "navigator", "instructor"):
        assert any(n.startswith(part) for n, _ in model.named_parameters())


def _replace_output(module: torch.nn.Module, value: torch.Tensor):
    """Make ``module`` return ``value`` (a forward hook); returns the hook handle."""
    return module.register_forward_hook(lambda _m, _i, _o: value)


def test_segmentation_probability_is_the_softmax_of_s0(small):
    model = small.eval()
    logits = torch.randn(2, 3, 32, 32) * 3  # S_0 at level 0 (stride 2 for a 64 px input)
    handle = _replace_output(model.navigator.sides[0], logits)
    try:
        with torch.no_grad():
            seg_prob = model.infer(torch.rand(2, 3, 64, 64))["seg_prob"]
    finally:
        handle.remove()
    # Independent reference: numpy softmax of the (bilinearly, corner-aligned) upsampled logits.
    z = torch.nn.functional.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=True).numpy()
    expected = np.exp(z - z.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(seg_prob.numpy(), expected, atol=1e-6)
    # ... which is not what the Dirichlet mean of softplus evidence would give.
    evidence = np.log1p(np.exp(z))
    assert np.abs((evidence + 1) / (evidence + 1).sum(axis=1, keepdims=True) - expected).max() > 0.1


def test_reliable_masks_exist_at_exactly_two_levels_and_s0_comes_first(small):
    model = small.eval()
    masks = [m for m in model.modules() if isinstance(m, ReliableMask)]
    assert masks == [model.navigator.bottom_mask, model.navigator.top_mask]
    with torch.no_grad():
        x = torch.rand(2, 3, 64, 64)
        _, f_s, f_m = _features(model, x)
        evidence = torch.rand(2, 3, 32, 32) * 5
        u = dirichlet(evidence)[2]
        a = model.navigate(f_s, f_m, evidence, u)
        # The top mask only feeds eta: perturbing it changes eta, never S_0 or the side outputs.
        saved = {k: v.clone() for k, v in model.navigator.top_mask.state_dict().items()}
        for p in model.navigator.top_mask.parameters():
            p.add_(torch.randn_like(p))
        b = model.navigate(f_s, f_m, evidence, u)
        model.navigator.top_mask.load_state_dict(saved)
        # The bottom mask feeds the decoder: perturbing it changes S_0.
        saved = {k: v.clone() for k, v in model.navigator.bottom_mask.state_dict().items()}
        for p in model.navigator.bottom_mask.parameters():
            p.add_(torch.randn_like(p))
        c = model.navigate(f_s, f_m, evidence, u)
        model.navigator.bottom_mask.load_state_dict(saved)
    assert torch.equal(a["s0"], b["s0"]) and all(torch.equal(p, q) for p, q in zip(a["sides"], b["sides"]))
    assert _relative_change(a["eta"], b["eta"]) > 0.01
    assert _relative_change(a["s0"], c["s0"]) > 0.01
    # R = (S + e_m) * exp(-U) at both levels (hand-computed from the returned side output).
    expected_top = (a["s0"] + evidence) * torch.exp(-u)
    assert torch.allclose(a["top_mask"], expected_top, atol=1e-5)
    assert a["bottom_mask"].shape[-2:] == f_s[3].shape[-2:]


def test_navigator_is_steered_by_the_uncertainty_map(small):
    model = small.eval()
    with torch.no_grad():
        x = torch.rand(2, 3, 64, 64)
        _, f_s, f_m = _features(model, x)
        evidence = torch.rand(2, 3, 32, 32) * 5
        u = dirichlet(evidence)[2]
        a = model.navigate(f_s, f_m, evidence, u)
        # Same evidence, different U: only the exp(-U) gating differs.
        b = model.navigate(f_s, f_m, evidence, torch.rand_like(u))
        c = model.navigate(f_s, f_m, evidence, u)
    assert torch.equal(a["s0"], c["s0"])  # deterministic in eval mode
    assert _relative_change(a["s0"], b["s0"]) > 0.01
    assert _relative_change(a["sides"][0], b["sides"][0]) > 0.01  # the bottom is gated too
    assert _relative_change(a["eta"], b["eta"]) > 0.01


def test_navigator_uses_the_mutual_evidence_through_reliable_masks(small):
    model = small.eval()
    with torch.no_grad():
        _, f_s, f_m = _features(model, torch.rand(2, 3, 64, 64))
        u = torch.full((2, 1, 32, 32), 0.5)
        a = model.navigate(f_s, f_m, torch.zeros(2, 3, 32, 32), u)
        b = model.navigate(f_s, f_m, torch.rand(2, 3, 32, 32) * 5, u)
    assert _relative_change(a["s0"], b["s0"]) > 0.01
    assert torch.equal(a["sides"][0], b["sides"][0])  # S_3 comes before the bottom mask


def test_classifier_is_steered_by_eta(small):
    model = small.eval()
    with torch.no_grad():
        f_c, _, f_m = _features(model, torch.rand(2, 3, 64, 64))
        eta = torch.rand(2, model.navigator.out_channels, 4, 4)
        a = model.instructor(f_c[3], f_m[3], eta)
        b = model.instructor(f_c[3], f_m[3], eta * 3 + 1)
    assert a.shape == (2, 2) and _relative_change(a, b) > 0.01


def test_instructor_head_is_four_separable_dilated_convs(paper):
    layers = list(paper.instructor.head)
    assert len(layers) == 4 and all(isinstance(layer, SeparableConvBNReLU) for layer in layers)
    depthwise = [layer[0] for layer in layers]
    assert [conv.dilation for conv in depthwise] == [(2, 2)] * 4
    assert [conv.groups for conv in depthwise] == [conv.in_channels for conv in depthwise]
    assert [layer[1].out_channels for layer in layers] == [1024, 512, 512, 1024]
    assert depthwise[0].in_channels == 1024 + 512  # [f_c[3]; f_m[3]]
    # eta' = doubleconv(eta) brought to the head's 1024 channels; a bias-free linear classifier.
    assert paper.instructor.eta_conv[0][0].in_channels == 128 and paper.instructor.eta_conv[1][0].out_channels == 1024
    assert paper.instructor.classifier.bias is None


def test_polarized_self_attention_matches_the_published_formula():
    torch.manual_seed(0)
    psa = PolarizedSelfAttention(8).eval()
    x = torch.randn(2, 8, 5, 6)
    with torch.no_grad():
        got = psa(x).numpy()
        w = {k: v.numpy() for k, v in psa.state_dict().items()}
    xn = x.numpy()

    def conv(name, t):  # a 1x1 conv on (B, C, H, W) in numpy
        return np.einsum("oc,bchw->bohw", w[f"{name}.weight"][:, :, 0, 0], t) + w[f"{name}.bias"][None, :, None, None]

    def sigmoid(t):
        return 1 / (1 + np.exp(-t))

    b, c, h, wd = xn.shape
    q = conv("ch_query", xn).reshape(b, h * wd)
    q = np.exp(q - q.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)  # softmax over positions
    pooled = np.einsum("bvp,bp->bv", conv("ch_value", xn).reshape(b, c // 2, h * wd), q)
    z = np.einsum("oc,bc->bo", w["ch_out.weight"][:, :, 0, 0], pooled) + w["ch_out.bias"]
    z = (z - z.mean(1, keepdims=True)) / np.sqrt(z.var(1, keepdims=True) + 1e-5)  # LayerNorm (weight 1, bias 0)
    x_c = sigmoid(z)[:, :, None, None] * xn
    sq = conv("sp_query", x_c).mean(axis=(2, 3))  # average-pooled query, no softmax
    s = np.einsum("bv,bvp->bp", sq, conv("sp_value", x_c).reshape(b, c // 2, h * wd)).reshape(b, 1, h, wd)
    expected = x_c + sigmoid(s) * x_c
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_channel_shuffle_groups_of_four_as_published():
    x = torch.arange(8.0).reshape(1, 8, 1, 1)
    # The authors' shuffle views 8 channels as 2 x 4 and transposes: out[4k + a]... written out by hand.
    assert channel_shuffle(x, 8 // 4).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_channel_shuffle_keeps_channels_last_with_the_published_order():
    x = torch.arange(2 * 8 * 3 * 5, dtype=torch.float32).reshape(2, 8, 3, 5)
    shuffled = channel_shuffle(x.contiguous(memory_format=torch.channels_last), 8 // 4)
    assert shuffled.is_contiguous(memory_format=torch.channels_last) and not shuffled.is_contiguous()
    assert torch.equal(shuffled, x[:, [0, 4, 1, 5, 2, 6, 3, 7]])


def _contiguous_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """The shuffle written for the (B, C, H, W) view alone: a contiguous result whatever the input."""
    b, c, h, w = x.shape
    return x.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def _channels_last_step(model, monkeypatch=None, shuffle=None):
    """Forward and backward of a channels-last copy of ``model`` under bf16 autocast, as a training
    step runs it; the outputs, the gradients and whether every convolution got channels-last input."""
    import copy

    import uml.models.blocks as blocks

    if shuffle is not None:
        monkeypatch.setattr(blocks, "channel_shuffle", shuffle)
    net = copy.deepcopy(model).to(memory_format=torch.channels_last).train()
    layouts = []
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_pre_hook(
                lambda _, inputs: layouts.append(inputs[0].is_contiguous(memory_format=torch.channels_last)))
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 64, 64, generator=generator).contiguous(memory_format=torch.channels_last)
    masks, labels = torch.randint(0, 3, (2, 64, 64), generator=generator), torch.tensor([0, 1])
    torch.manual_seed(2)  # the same dropout masks in every call
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    loss, _ = uml_loss(out, masks, labels, LossParams(), 3, net.evidential)
    loss.backward()
    tensors = {k: v.detach().float() for k, v in out.items() if torch.is_tensor(v)}
    grads = {name: p.grad for name, p in net.named_parameters() if p.grad is not None}
    return tensors, grads, layouts


def test_channels_last_model_convolutions_get_channels_last_input_bit_for_bit(small, monkeypatch):
    out, grads, layouts = _channels_last_step(small)
    assert len(layouts) > 50 and all(layouts)  # no convolution copies its input back to channels-last
    ref_out, ref_grads, ref_layouts = _channels_last_step(small, monkeypatch, _contiguous_shuffle)
    assert not all(ref_layouts)  # the contiguous shuffle did make copies: the check above can fail
    assert out.keys() == ref_out.keys() and all(torch.equal(out[k], ref_out[k]) for k in out)
    assert len(grads) > 100 and grads.keys() == ref_grads.keys() and all(torch.equal(grads[k], ref_grads[k]) for k in grads)


def test_initialisation_is_kaiming_fan_out_outside_the_encoders():
    torch.manual_seed(0)
    model = build_model("small", **TINY)
    decoder_convs = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and not name.startswith(("cls_encoder", "seg_encoder"))]
    big = [m for m in decoder_convs if m.weight.numel() >= 4096]
    assert len(big) >= 10
    for conv in big:
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1] // conv.groups
        std = float(conv.weight.detach().std())
        assert std == pytest.approx(np.sqrt(2.0 / fan_out), rel=0.15), conv
    bns = [m for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d) and not name.startswith(("cls_encoder", "seg_encoder"))]
    assert bns and all(bool((m.weight == 1).all()) and bool((m.bias == 0).all()) for m in bns)
    # The encoders keep timm's own initialisation (zero-initialised last BN of each residual block).
    assert float(model.cls_encoder.body.layer1[0].bn2.weight.abs().sum()) == 0.0
    # Measured effect (train mode, batch of 4 at 64 px, seeds 0-4): the mutual logits' std at init is
    # 7-13 with this initialisation and 0.15-0.23 with PyTorch's default conv initialisation, so the
    # mutual branch starts with evidence to spend instead of U close to 1 everywhere.
    stds = []
    for seed in range(3):
        torch.manual_seed(seed)
        net = build_model("small", **TINY).train()
        with torch.no_grad():
            stds.append(float(net(torch.rand(4, 3, 64, 64))["mutual_logits"].std()))
    assert all(3.0 < s < 30.0 for s in stds), stds


def test_navigator_head_initialisation_published_and_fan_in():
    torch.manual_seed(0)
    published = build_model("small", navigator_head_init="kaiming_fan_out", **TINY)
    fan_in = build_model("small", navigator_head_init="fan_in", **TINY)
    assert build_model("small", **TINY).cfg.navigator_head_init == "fan_in"  # the CPU preset's choice
    weights_pub = torch.cat([h.weight.detach().flatten() for h in published.navigator.sides])
    weights_fan_in = torch.cat([h.weight.detach().flatten() for h in fan_in.navigator.sides])
    # Kaiming normal, fan_out = 3 classes x 1 x 1: std sqrt(2 / 3) = 0.816.
    assert float(weights_pub.std()) == pytest.approx(np.sqrt(2 / 3), rel=0.1)
    # PyTorch's default: uniform in +-1/sqrt(fan_in) (std 1/sqrt(3 fan_in)), per head.
    for head in fan_in.navigator.sides:
        bound = 1 / np.sqrt(head.in_channels)
        assert float(head.weight.abs().max()) <= bound
        assert float(head.weight.std()) == pytest.approx(bound / np.sqrt(3), rel=0.25)
    assert float(weights_fan_in.abs().max()) < 0.5 < float(weights_pub.abs().max())
    with pytest.raises(ConfigError, match="navigator_head_init"):
        build_model("small", navigator_head_init="zeros", **TINY)


def test_published_recipe_file_matches_the_paper():
    """configs/paper-gpu.yaml is the published recipe: every deviation of the CPU default is
    switched back to its published value there."""
    from pathlib import Path

    from uml.config import load_params
    from uml.train.trainer import model_config

    params = load_params(Path(__file__).resolve().parents[2] / "configs" / "paper-gpu.yaml")
    cfg = model_config(params, ["non-glaucoma", "glaucoma"], ["background", "disc", "cup"], params.data.image_size)
    assert (cfg.cls_encoder, cfg.seg_encoder, cfg.feature_strides) == ("res2net50d", "vgg16_bn", [1, 2, 4, 8])
    assert cfg.pretrained and cfg.frozen_encoder_bn and cfg.navigator_head_init == "kaiming_fan_out"
    assert cfg.image_size == params.data.image_size == 256 and not params.data.augment.enabled
    loss, train = params.loss, params.train
    assert (loss.cls_weight, loss.seg_weight, loss.mut_weight, loss.kl_annealing_epochs) == (0.5, 0.4, 0.1, 50)
    assert (train.epochs, train.lr, train.weight_decay, train.batch_size, train.constant_epochs) == (100, 1e-4, 1e-5, 8, 30)
    assert (train.poly_power, train.min_lr, train.precision) == (0.9, 1e-5, "fp32")
    assert train.steps_per_epoch is None  # an epoch is one pass over the training split


def test_frozen_encoder_batchnorm_keeps_statistics_and_affine():
    torch.manual_seed(0)
    model = build_model("small", frozen_encoder_bn=True, **TINY).train()
    encoder_state = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("cls_encoder", "seg_encoder")) and ".bn" in k}
    assert any(k.endswith("running_mean") for k in encoder_state) and any(k.endswith(".weight") for k in encoder_state)
    decoder_bn = model.navigator.ups[0].conv[0][1]
    before = decoder_bn.running_mean.clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss, _ = uml_loss(model(torch.rand(4, 3, 64, 64)), torch.randint(0, 3, (4, 64, 64)), torch.tensor([0, 1, 0, 1]),
                       LossParams(), epoch=1, evidential=True)
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = [k for k, v in encoder_state.items() if not torch.equal(v, after[k])]
    assert not changed, changed
    assert not torch.equal(before, decoder_bn.running_mean)  # the decoder's BN still learns
    # Without the flag, the same encoder statistics move (the check above can fail).
    torch.manual_seed(0)
    learnable = build_model("small", frozen_encoder_bn=False, **TINY).train()
    stats = learnable.cls_encoder.body.bn1.running_mean.clone()
    learnable(torch.rand(4, 3, 64, 64))
    assert not torch.equal(stats, learnable.cls_encoder.body.bn1.running_mean)


def _names(model):
    return {n for n, _ in model.named_parameters()}


def test_uncertainty_false_removes_exactly_gating_and_instructor():
    evidential = build_model("small", **TINY)
    softmax = build_model("small", uncertainty=False, **TINY)
    # Same modules except the instructor's eta branch and the top reliable mask that makes eta.
    assert _names(softmax) < _names(evidential)
    assert {".".join(n.split(".")[:2]) for n in _names(evidential) - _names(softmax)} == {"instructor.eta_conv", "navigator.top_mask"}
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
    assert not any("_mask" in n for n in _names(seg))  # no reliable masks without a mutual branch
    assert not any("eta_conv" in n for n in _names(cls))  # no instructor input
    with torch.no_grad():
        seg_out, cls_out = seg(torch.rand(1, 3, 64, 64)), cls(torch.rand(1, 3, 64, 64))
    assert "class_logits" not in seg_out and "seg_logits" in seg_out and "uncertainty_map" not in seg_out
    assert set(cls_out) == {"class_logits", "class_evidence"}
    assert set(seg.infer(torch.rand(1, 3, 64, 64))) == {"seg_prob", "seg_uncertainty", "seg_uncertainty_raw"}
    assert set(cls.infer(torch.rand(1, 3, 64, 64))) == {"class_prob", "class_uncertainty", "class_prob_raw",
                                                        "class_uncertainty_raw"}


def test_save_and_load_round_trip(tmp_path, small):
    model = small.eval()
    path = save_model(model, tmp_path / "model.pt", extra={"class_names": ["a", "b"]})
    payload = torch.load(path, weights_only=True)  # the safe loader accepts the file
    assert payload["config"]["cls_encoder"] == "resnet18" and payload["config"]["pretrained"] is False
    loaded = load_model(path)
    assert not loaded.training and loaded.extra["class_names"] == ["a", "b"]
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, b = model.infer(x), loaded.infer(x)
    for key in a:
        assert torch.equal(a[key], b[key])


def test_local_pretrained_weights_are_loaded_for_both_encoders(tmp_path):
    timm = import_timm()
    torch.manual_seed(1)
    cls_reference = timm.create_model("resnet18", pretrained=False)
    torch.manual_seed(2)
    seg_reference = timm.create_model("resnet18", pretrained=False)
    torch.save(cls_reference.state_dict(), tmp_path / "cls.pth")
    torch.save(seg_reference.state_dict(), tmp_path / "seg.pth")
    model = build_model("small", cls_weights=str(tmp_path / "cls.pth"), seg_weights=str(tmp_path / "seg.pth"), **TINY)
    for encoder, reference in ((model.cls_encoder, cls_reference), (model.seg_encoder, seg_reference)):
        assert torch.equal(encoder.body.conv1.weight, reference.conv1.weight)
        assert torch.equal(encoder.body.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
        assert torch.equal(encoder.body.layer2[1].bn2.running_var, reference.layer2[1].bn2.running_var)
    # Frozen BN keeps the loaded statistics and affine.
    frozen = build_model("small", frozen_encoder_bn=True, cls_weights=str(tmp_path / "cls.pth"), **TINY)
    assert isinstance(frozen.cls_encoder.body.bn1, FrozenBatchNorm2d)
    assert torch.equal(frozen.cls_encoder.body.bn1.running_mean, cls_reference.bn1.running_mean)
    assert torch.equal(frozen.cls_encoder.body.bn1.weight, cls_reference.bn1.weight)
    with pytest.raises(ConfigError, match="model.seg_weights.*not found"):
        build_model("small", seg_weights=str(tmp_path / "missing.pth"), **TINY)


def test_pretrained_offline_is_a_clear_error(tmp_path):
    """``model.pretrained: true`` without network or cache names the backbone and the local-file
    alternative. Runs in a fresh process with an empty, offline Hugging Face cache: nothing is
    downloaded."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    code = "from uml.models import build_model; build_model('small', image_size=64, pretrained=True)"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "resnet18" in result.stderr and "model.cls_weights" in result.stderr and "model.pretrained" in result.stderr
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.safetensors"))


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
    for step in range(100):  # measured on this CPU: every threshold below holds at steps 80, 100, 120 and 150
        model.train()
        loss, parts = uml_loss(model(images), masks, labels, weights, epoch=1, evidential=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append({k: float(v) for k, v in parts.items()})
    model.eval()
    with torch.no_grad():
        pred = model.infer(images)
    seg = pred["seg_prob"].argmax(1)
    dices = []
    for cls in (1, 2):
        p, g = seg == cls, masks == cls
        dices.append(float(2 * (p & g).sum() / (p.sum() + g.sum())))
    # L_seg keeps a floor here: its coarsest side output is 4 x 4 pixels at 64 px input.
    for part in ("cls", "mut"):
        assert losses[-1][part] <= 0.2 * losses[0][part], f"L_{part} fell only from {losses[0][part]:.3f} to {losses[-1][part]:.3f}"
    assert losses[-1]["seg"] <= 0.6 * losses[0]["seg"]
    assert min(dices) >= 0.85, f"Dice per class {dices}"
    assert float((pred["class_prob"].argmax(1) == labels).float().mean()) == 1.0


@pytest.mark.parametrize("sigma", [0.5, 1.5, 3.0])
def test_gaussian_blur_is_scipys_gaussian_filter(sigma):
    from scipy import ndimage

    from uml.models.uml_net import gaussian_blur

    maps = torch.rand(2, 1, 24, 31, dtype=torch.float64)
    expected = np.stack([ndimage.gaussian_filter(m[0].numpy(), sigma, mode="mirror", truncate=3.0) for m in maps])
    np.testing.assert_allclose(gaussian_blur(maps, sigma)[:, 0].numpy(), expected, atol=1e-12)
    assert gaussian_blur(maps, 0.0) is maps
