"""The literature's backbones (V-Net, PDV-Net, SegNet) and the shared losses: shapes on odd sizes, gradients,
a few training steps, the published layouts and parameter counts, SegNet's index unpooling and 2D slice mode,
V-Net's Dice loss and median-frequency class weights against hand-computed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from atlasseg.losses import median_frequency_weights, median_frequency_weights_from_labels, vnet_dice_loss
from atlasseg.networks import BACKBONES, BackboneSpec, build_backbone
from atlasseg.networks.pdvnet import DenseBlock
from atlasseg.networks.vnet import VNet

NAMES = ["vnet", "pdvnet", "segnet"]
ODD = (1, 1, 13, 17, 11)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(name: str, preset: str = "cpu", in_channels: int = 1, out_channels: int = 3, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    if name == "vnet" and preset == "cpu":   # 16^3 inputs reach 1^3 at the bottom, where instance norm is undefined
        kwargs = {"norm": "none", **kwargs}
    return build_backbone(BackboneSpec(name, preset, kwargs), in_channels, out_channels)


def test_vnet_cpu_preset_trains_at_the_benchmark_patch_size():
    """The cpu preset's instance norm needs more than one voxel at the bottom: the hippocampus patch has 2x3x2."""
    net = build_backbone(BackboneSpec("vnet", "cpu"), 1, 3).train()
    assert BackboneSpec("vnet", "cpu").resolved_kwargs()["norm"] == "instance"
    image = torch.randn(1, 1, 32, 48, 32)
    F.cross_entropy(net(image), torch.randint(0, 3, (1, 32, 48, 32))).backward()
    assert all(p.grad is not None for p in net.output_layers()[0].parameters())


def _blob(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A noisy ball: image (1, 1, n, n, n) and its labels (1, n, n, n) in {0, 1}."""
    g = torch.Generator().manual_seed(1)
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float32)] * 3, indexing="ij")
    radius = sum((a - (n - 1) / 2) ** 2 for a in axes).sqrt()
    labels = (radius < n / 3).long()[None]
    image = labels.float()[:, None] + 0.3 * torch.randn(1, 1, n, n, n, generator=g)
    return image, labels


def _first_conv(net: nn.Module) -> nn.Module:
    return next(m for m in net.modules() if isinstance(m, (nn.Conv3d, nn.Conv2d)))


def _n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# --- registry and shapes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_registered_with_presets(name):
    info = BACKBONES[name]
    assert set(info.presets) == {"cpu", "paper"} and info.reference
    assert BackboneSpec(name, "paper").to_dict()["kwargs"] == info.presets["paper"]


@pytest.mark.parametrize("name,kwargs", [("vnet", {}), ("pdvnet", {}), ("segnet", {}), ("segnet", {"mode": "2d"}),
                                         ("vnet", {"norm": "instance"})])
def test_output_shape_on_odd_sizes(name, kwargs):
    net = _build(name, in_channels=2, **kwargs)
    x = torch.randn(1, 2, *ODD[2:])
    assert net(x).shape == (1, 3, *ODD[2:])
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (1, 3, *ODD[2:])
    assert net.output_layers()[0].out_channels == 3


def test_pdvnet_paper_forward_on_odd_size():
    net = _build("pdvnet", "paper").eval()
    with torch.no_grad():
        assert net(torch.randn(ODD)).shape == (1, 3, *ODD[2:])


def test_segnet_paper_is_vgg16_2d_and_runs():
    net = _build("segnet", "paper").eval()
    assert net.mode == "2d" and net.size_divisor == (1, 32, 32)
    encoder_convs = [sum(isinstance(m, nn.Conv2d) for m in s.modules()) for s in net.encoder]
    assert encoder_convs == [2, 2, 3, 3, 3]
    assert [s[-1][0].out_channels for s in net.encoder] == [64, 128, 256, 512, 512]
    # VGG16's 13 convolutions (no bias, BN after each): 14,710,464 weights
    vgg = [(1, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256), (256, 512), (512, 512),
           (512, 512), (512, 512), (512, 512), (512, 512)]
    assert sum(_n_params(s) for s in net.encoder) == sum(9 * a * b + 2 * b for a, b in vgg)
    with torch.no_grad():
        assert net(torch.randn(1, 1, 2, 13, 11)).shape == (1, 3, 2, 13, 11)


@pytest.mark.parametrize("name", NAMES)
def test_bad_arguments_raise(name):
    with pytest.raises(ValueError, match="deep supervision"):
        _build(name, deep_supervision=1)
    bad = {"vnet": {"convs_up": [1, 1]}, "pdvnet": {"growth_rates": [4, 8]}, "segnet": {"mode": "4d"}}[name]
    with pytest.raises(ValueError, match=name):
        _build(name, **bad)


# --- gradients and training ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_first_layer(name):
    net = _build(name)
    first = _first_conv(net)
    assert first.in_channels == 1
    image, labels = _blob(16)
    F.cross_entropy(net(image[..., :13, :15, :11]), labels[..., :13, :15, :11]).backward()
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.output_layers()[0].parameters())


@pytest.mark.parametrize("name,kwargs", [("vnet", {}), ("pdvnet", {}), ("segnet", {}), ("segnet", {"mode": "2d"})])
def test_adam_steps_lower_the_loss(name, kwargs):
    net = _build(name, out_channels=2, **kwargs)
    image, labels = _blob(16)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = F.cross_entropy(net(image), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_vnet_trains_with_its_dice_loss():
    net = _build("vnet", out_channels=2)
    image, labels = _blob(16)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = vnet_dice_loss(net(image), labels[:, None])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


# --- V-Net layout --------------------------------------------------------------------------------------------


def _convs_per_stage(stages: nn.ModuleList) -> list[int]:
    return [sum(isinstance(m, nn.Conv3d) for m in stage.modules()) for stage in stages]


@pytest.mark.parametrize("preset", ["cpu", "paper"])
def test_vnet_paper_layout(preset):
    with torch.device("meta"):
        net = _build("vnet", preset)
    assert _convs_per_stage(net.down_stages) == [1, 1, 2, 3, 3]
    assert _convs_per_stage(net.up_stages) == [3, 3, 2, 1]
    channels = BACKBONES["vnet"].presets[preset]["channels"]
    kernel = 5 if preset == "paper" else 3
    assert [s.convs[0][0].out_channels for s in net.down_stages] == channels
    assert all(s.convs[0][0].kernel_size == (kernel,) * 3 for s in net.down_stages)
    assert [d[0].out_channels for d in net.downs] == channels[1:]
    assert all(d[0].kernel_size == (2, 2, 2) and d[0].stride == (2, 2, 2) for d in net.downs)
    assert all(isinstance(u[0], nn.ConvTranspose3d) and u[0].stride == (2, 2, 2) for u in net.ups)
    # the right-hand stages work on [up-conv output, skip] concatenated: twice the level's channels
    assert [s.channels for s in net.up_stages] == [2 * c for c in reversed(channels[:-1])]
    assert net.size_divisor == (16, 16, 16)


def _vnet_param_count(c_in: int, c_out: int, channels: list[int], down: list[int], up: list[int], k: int) -> int:
    """Counted by hand from the paper's figure: conv (weights + bias) + PReLU slopes per channel."""
    def conv(a, b, kk):
        return kk ** 3 * a * b + b + b                          # + per-channel PReLU

    total = conv(c_in, channels[0], k) + (down[0] - 1) * conv(channels[0], channels[0], k)
    for lvl in range(1, len(channels)):
        total += conv(channels[lvl - 1], channels[lvl], 2) + down[lvl] * conv(channels[lvl], channels[lvl], k)
    width = channels[-1]
    for n, lvl in zip(up, range(len(channels) - 2, -1, -1)):
        total += conv(width, channels[lvl], 2)                  # transposed: same count
        width = 2 * channels[lvl]
        total += n * conv(width, width, k)
    return total + width * c_out + c_out


def test_vnet_paper_parameter_count():
    with torch.device("meta"):
        net = _build("vnet", "paper", 1, 3)
    expected = _vnet_param_count(1, 3, [16, 32, 64, 128, 256], [1, 1, 2, 3, 3], [3, 3, 2, 1], 5)
    assert _n_params(net) == expected == 64_535_155


def test_vnet_custom_layout_and_input_residual():
    net = VNet(3, 2, channels=(8, 16, 32), convs_down=(2, 1, 1), convs_up=(1, 2))
    assert _convs_per_stage(net.down_stages) == [2, 1, 1] and _convs_per_stage(net.up_stages) == [1, 2]
    assert net.size_divisor == (4, 4, 4)
    stage = net.down_stages[0]
    with torch.no_grad():
        for p in stage.parameters():
            p.zero_()
    x = torch.randn(1, 3, 4, 4, 4)
    # zero convolutions: the stage output is its residual, the input repeated to 8 channels (0, 1, 2, 0, 1, ...)
    assert torch.equal(stage(x), x[:, [0, 1, 2, 0, 1, 2, 0, 1]])


# --- SegNet --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["3d", "2d"])
def test_segnet_unpooling_restores_maxima_positions(mode):
    net = _build("segnet", mode=mode)
    shape = (2, 3, 4, 6, 8) if mode == "3d" else (2, 3, 6, 8)
    x = torch.randperm(math.prod(shape)).float().reshape(shape)         # distinct values: one maximum per window
    pooled, indices = net.pool(x)
    restored = net.unpool(pooled, indices, output_size=x.shape[2:])
    # the maximum of each 2x2(x2) window, broadcast back over the window
    window_max = F.interpolate(F.max_pool3d(x, 2) if mode == "3d" else F.max_pool2d(x, 2), scale_factor=2)
    is_max = x == window_max
    assert torch.equal(restored, torch.where(is_max, x, torch.zeros_like(x)))
    assert int(is_max.sum()) == pooled.numel() == int((restored != 0).sum())


def test_segnet_2d_mode_is_slice_by_slice():
    net = _build("segnet", mode="2d").eval()
    assert net.size_divisor == (1, 16, 16)
    volume = torch.randn(2, 1, 3, 17, 11)
    with torch.no_grad():
        out = net(volume)
        for z in range(volume.shape[2]):
            one_slice = net(volume[:, :, z:z + 1])[:, :, 0]
            assert torch.allclose(out[:, :, z], one_slice, atol=1e-5)
        padded = F.pad(volume[:, :, 1], (0, 5, 0, 15))                # the 2D network itself, on a 32x16 image
        assert torch.allclose(out[:, :, 1], net.forward_native(padded)[..., :17, :11], atol=1e-5)
    assert all(isinstance(m, nn.Conv2d) for m in net.modules() if isinstance(m, nn.modules.conv._ConvNd))


def test_segnet_decoder_mirrors_encoder():
    net = _build("segnet", channels=(4, 8, 12), convs=(1, 2, 3))
    assert [len(s) for s in net.encoder] == [1, 2, 3] and [len(s) for s in net.decoder] == [3, 2, 1]
    assert [s[-1][0].out_channels for s in net.decoder] == [8, 4, 4]
    assert net.size_divisor == (8, 8, 8)


# --- PDV-Net -------------------------------------------------------------------------------------------------


def test_dense_block_channels():
    block = DenseBlock(7, layers=3, growth=5)
    assert block.out_channels == 7 + 3 * 5
    assert [layer[-1].in_channels for layer in block.layers] == [7, 12, 17]
    x = torch.randn(2, 7, 4, 5, 3)
    out = block(x)
    assert out.shape == (2, 22, 4, 5, 3)
    assert torch.equal(out[:, :7], x)                                   # the block input is passed on


def test_pdvnet_published_sizes():
    net = _build("pdvnet", "paper", in_channels=1)
    assert net.init_conv.kernel_size == (5, 5, 5) and net.init_conv.stride == (2, 2, 2)
    assert [len(b.layers) for b in net.blocks] == [5, 10, 10]
    # 24 + 1 pooled input channel, then 24 after each stride-2 down-sampling conv
    assert [b.out_channels for b in net.blocks] == [25 + 5 * 4, 24 + 10 * 8, 24 + 10 * 16]
    assert all(d[-1].stride == (2, 2, 2) for d in net.downs) and len(net.downs) == 2
    assert net.size_divisor == (8, 8, 8)


# --- losses --------------------------------------------------------------------------------------------------


def _dice_case() -> tuple[torch.Tensor, torch.Tensor]:
    """4 voxels, 2 classes; softmax probabilities of class 1: 0.75, 0.5, 0.25, 0.75; labels 1, 1, 0, 0."""
    ln3 = math.log(3.0)
    logits = torch.tensor([[0.0, ln3], [0.0, 0.0], [ln3, 0.0], [0.0, ln3]]).T.reshape(1, 2, 4, 1, 1)
    return logits, torch.tensor([1, 1, 0, 0]).reshape(1, 1, 4, 1, 1)


def test_vnet_dice_loss_by_hand():
    logits, target = _dice_case()
    # class 1: sum pg = 1.25, sum p^2 = 1.4375, sum g^2 = 2 -> Dice 2.5 / 3.4375 = 8/11
    # class 0: p = 0.25, 0.5, 0.75, 0.25: sum pg = 1, sum p^2 = 0.9375, sum g^2 = 2 -> Dice 2 / 2.9375 = 32/47
    assert float(vnet_dice_loss(logits, target, eps=0)) == pytest.approx(3 / 11, rel=1e-6)
    both = vnet_dice_loss(logits, target, include_background=True, eps=0)
    assert float(both) == pytest.approx(1 - (8 / 11 + 32 / 47) / 2, rel=1e-6)
    assert float(vnet_dice_loss(logits, target[:, 0], eps=0)) == pytest.approx(3 / 11, rel=1e-6)


def test_vnet_dice_loss_perfect_limit_and_errors():
    labels = torch.randint(0, 3, (2, 1, 5, 6, 4))
    labels[:, :, 0, 0, :3] = torch.arange(3)                             # every class present in both samples
    logits = 50.0 * F.one_hot(labels[:, 0], 3).movedim(-1, 1).float()
    assert float(vnet_dice_loss(logits, labels)) < 1e-6
    assert float(vnet_dice_loss(logits, labels, include_background=True)) < 1e-6
    assert float(vnet_dice_loss(-logits, labels)) > 0.99
    with pytest.raises(ValueError):
        vnet_dice_loss(logits, labels + 1)
    with pytest.raises(ValueError):
        vnet_dice_loss(logits, labels[:, :, :4])


def test_median_frequency_weights_by_hand():
    # frequencies 0.6, 0.3, 0.1 -> median 0.3 -> 0.5, 1, 3
    assert torch.allclose(median_frequency_weights([600, 300, 100]), torch.tensor([0.5, 1.0, 3.0]))
    # an even number of classes: median (0.3 + 0.15) / 2 = 0.225; an absent class gets absent_weight
    w = median_frequency_weights(np.array([500, 300, 0, 150, 50]))
    assert torch.allclose(w, torch.tensor([0.45, 0.75, 0.0, 1.5, 4.5]))
    assert float(median_frequency_weights([500, 300, 0, 150, 50], absent_weight=1.0)[2]) == 1.0
    # per image (Eigen & Fergus): class 1 only in image A (10 of 100 voxels), class 2 only in B (40 of 100);
    # frequencies 150/200, 0.1, 0.4 -> median 0.4 -> 0.4/0.75, 4, 1
    per_image = torch.tensor([[90, 10, 0], [60, 0, 40]])
    assert torch.allclose(median_frequency_weights(per_image), torch.tensor([0.4 / 0.75, 4.0, 1.0]))


def test_median_frequency_weights_from_labels_and_cross_entropy():
    a = torch.zeros(1, 4, 5, 5, dtype=torch.long)
    a.view(-1)[:10] = 1
    b = torch.zeros(1, 4, 5, 5, dtype=torch.long)
    b.view(-1)[:40] = 2
    b.view(-1)[90:] = 3
    labels = torch.stack([a, b])                                        # (2, 1, 4, 5, 5): 100 voxels each
    w = median_frequency_weights_from_labels(labels, 5)
    expected = median_frequency_weights([[90, 10, 0, 0, 0], [50, 0, 40, 10, 0]])
    assert torch.allclose(w, expected) and float(w[4]) == 0.0
    assert torch.allclose(median_frequency_weights_from_labels([a.numpy(), b[0]], 5), expected)
    logits = torch.randn(2, 5, 4, 5, 5)
    per_voxel = F.cross_entropy(logits, labels[:, 0], reduction="none")
    manual = (w[labels[:, 0]] * per_voxel).sum() / w[labels[:, 0]].sum()
    assert torch.allclose(F.cross_entropy(logits, labels[:, 0], weight=w), manual)
    with pytest.raises(ValueError):
        median_frequency_weights_from_labels(labels, 3)
