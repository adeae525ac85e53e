"""I-JEPA: the multi-block masks, the latent loss and what it depends on, the EMA target, the evaluated encoder,
and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import methods.ijepa as ijepa
from core.backbones import create_backbone
from core.contract import StepInfo
from core.errors import ConfigError, RunFailed
from harness.cli import main
from harness.config.loading import build_config
from harness.data.datasets import load_dataset
from methods import create_method
from methods.ijepa import block_shape, block_shapes, ijepa_loss, linear_momentum, sample_masks
from tests.helpers.method_params import small_backbone_spec, small_params
from tests.helpers.runs import REPO

SMALL = small_params("ijepa")
"""I-JEPA's small predictor (tests/helpers/method_params.py)."""
PAPER = {"num_targets": 4, "target_scale": (0.15, 0.2), "target_aspect": (0.75, 1.5), "context_scale": (0.85, 1.0)}


def tiny_vit(img_size: int = 24, **kwargs) -> torch.nn.Module:
    """I-JEPA's small test ViT (``"_backbone"`` entry in tests/helpers/method_params.py, 4 px patches), ``kwargs`` overriding its settings."""
    spec = small_backbone_spec("ijepa")
    return create_backbone(spec.pop("name"), in_chans=3, img_size=img_size, **{**spec, **kwargs})


def tiny_ijepa(img_size: int = 24, **params) -> ijepa.IJEPA:
    torch.manual_seed(0)
    method = create_method("ijepa", tiny_vit(img_size), **{**SMALL, **params})
    assert isinstance(method, ijepa.IJEPA)
    return method


def admissible(h: int, w: int, n: int, scale: tuple[float, float], aspect: tuple[float, float]) -> bool:
    """Whether an h x w block is the rounding of some block of ``keep = int(n * s)`` patches, s in ``scale``, at an
    aspect (h/w) in ``aspect``: h = round(sqrt(keep * a)) and w = round(sqrt(keep / a)), i.e. a in
    [(h - 1/2)^2 / keep, (h + 1/2)^2 / keep] and in [keep / (w + 1/2)^2, keep / (w - 1/2)^2]."""
    for keep in range(int(n * scale[0]), int(n * scale[1]) + 1):
        if keep == 0:
            continue
        lo = max(aspect[0], (h - 0.5) ** 2 / keep, keep / (w + 0.5) ** 2)
        hi = min(aspect[1], (h + 0.5) ** 2 / keep, keep / (w - 0.5) ** 2)
        if lo <= hi:
            return True
    return False


def rectangle(ids: torch.Tensor, grid: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the patches ``ids``, asserting they are exactly that full rectangle, in raster order."""
    r, c = ids // grid, ids % grid
    top, left = int(r.min()), int(c.min())
    h, w = int(r.max()) - top + 1, int(c.max()) - left + 1
    expected = [(top + i) * grid + left + j for i in range(h) for j in range(w)]
    assert ids.tolist() == expected, "a target block must be a full rectangle of patches, in raster order"
    return top, left, h, w


# ----------------------------------------------------------------------------- masks


def test_block_shape_rounds_as_the_reference_and_block_shapes_lists_every_shape() -> None:
    assert block_shape(14, 0.2, 1.5) == (8, 5)  # keep int(39.2) = 39: round(sqrt(58.5)) = 8, round(sqrt(26)) = 5
    assert block_shape(6, 0.15, 0.75) == (2, 3)  # keep 5: round(1.94), round(2.58)
    assert block_shape(14, 0.85, 1.0) == (13, 13)  # keep 166
    for grid in (4, 6, 7, 14):
        listed = block_shapes(grid, (0.15, 0.2), (0.75, 1.5))
        brute = {block_shape(grid, 0.15 + 0.05 * i / 200, 0.75 + 0.75 * j / 400) for i in range(201) for j in range(401)}
        assert brute <= listed
        assert all(admissible(h, w, grid * grid, (0.15, 0.2), (0.75, 1.5)) for h, w in listed)


@pytest.mark.parametrize(
    "grid,params",
    [
        (6, PAPER),
        (8, PAPER),
        (14, PAPER),
        (10, {"num_targets": 3, "target_scale": (0.05, 0.3), "target_aspect": (1.3, 3.0), "context_scale": (0.6, 0.8)}),  # tall blocks only
    ],
)
def test_masks_have_the_configured_blocks_and_the_context_avoids_every_target(grid: int, params: dict) -> None:
    n, m = grid * grid, params["num_targets"]
    context_sides = {h for h, _ in block_shapes(grid, params["context_scale"], (1.0, 1.0))}
    seen: set[tuple[int, int]] = set()
    bottom = right = False
    for step in range(25):
        rows = torch.arange(12) + 100 * step
        masks = sample_masks(grid, step, rows, **params)
        b, m_, k = masks.targets.shape
        assert (b, m_) == (12, m) and masks.context.shape[0] == 12
        kc = masks.context.shape[1]
        assert kc == int(masks.context_available.min()) >= 1  # equal across the batch: the minimum over it
        assert kc > ijepa.MIN_KEEP  # context positions (and targets) redrawn until more than MIN_KEEP patches are left
        shapes = set()
        for i in range(b):
            context = masks.context[i]
            assert context.unique().numel() == kc and torch.equal(context, context.sort().values)
            rc, cc = context // grid, context % grid
            assert int(rc.max() - rc.min()) < max(context_sides) and int(cc.max() - cc.min()) < max(context_sides)  # inside one square block
            for block in masks.targets[i]:
                top, left, h, w = rectangle(block, grid)
                assert h * w == k and admissible(h, w, n, params["target_scale"], params["target_aspect"]), (h, w)
                shapes.add((h, w))
                bottom, right = bottom or top + h == grid, right or left + w == grid
                assert not set(block.tolist()) & set(context.tolist()), "a target patch in the context"
        assert len(shapes) == 1  # one target size per step, shared by the batch (so the targets stack)
        seen |= shapes
    assert any(h > w for h, w in seen) and any(h < w for h, w in seen) == (params["target_aspect"][0] < 1)  # tall and wide blocks, as the range says
    assert bottom and right  # blocks reach the last row and the last column (the reference's corner draw never does)


def test_masks_are_keyed_by_the_step_and_the_image_row() -> None:
    a = sample_masks(14, 5, torch.tensor([3, 7, 9]))
    again = sample_masks(14, 5, torch.tensor([3, 7, 9]))
    assert torch.equal(a.targets, again.targets) and torch.equal(a.context, again.context)
    other_batch = sample_masks(14, 5, torch.tensor([9, 1, 3]))
    torch.testing.assert_close(other_batch.targets[2], a.targets[0])  # image 3's blocks whichever batch it is in
    torch.testing.assert_close(other_batch.targets[0], a.targets[2])
    assert len({tuple(sample_masks(14, s, torch.tensor([3])).targets.reshape(-1).tolist()) for s in range(10)}) == 10


def test_crowded_targets_are_redrawn_until_the_context_keeps_more_than_min_keep(monkeypatch) -> None:
    def small_contexts() -> int:
        count = 0
        for step in range(20):
            masks = sample_masks(6, step, torch.arange(32) + 32 * step, num_targets=6)  # 6 targets of 4-9 patches on 36
            count += int((masks.context_available <= ijepa.MIN_KEEP).sum())
            for i in range(32):
                assert not set(masks.targets[i].reshape(-1).tolist()) & set(masks.context[i].tolist())
        return count

    assert small_contexts() == 0
    monkeypatch.setattr(ijepa, "ROUNDS", 1)  # the reference's redraw: context positions only
    assert small_contexts() > 0


def test_an_image_without_any_context_patch_is_a_run_failure_never_an_overlap() -> None:
    crowded = {"num_targets": 12, "target_scale": (0.25, 0.3), "target_aspect": (1.0, 1.0), "context_scale": (1.0, 1.0)}  # 2x2 blocks on 4x4
    with pytest.raises(RunFailed, match=r"^method.target_scale: image \d+ at step \d+ has no context patch left in 80 draws"):
        for step in range(50):
            masks = sample_masks(4, step, torch.arange(64), **crowded)
            for i in range(64):  # until then, never an overlap
                assert not set(masks.targets[i].reshape(-1).tolist()) & set(masks.context[i].tolist())


# ----------------------------------------------------------------------------- the loss


def test_loss_matches_a_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    b, m, k, d, length = 2, 3, 4, 5, 16
    features = 3 + 2 * torch.randn(b, length, d, generator=g)
    targets = torch.stack([torch.randperm(length, generator=g)[: m * k].view(m, k) for _ in range(b)])
    pred = torch.randn(b, m, k, d, generator=g)
    l2, huber = [], []
    for i in range(b):
        for j in range(m):
            for t in range(k):
                x = features[i, targets[i, j, t]]
                normed = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-5)  # layer norm, no affine
                diff = pred[i, j, t] - normed
                l2 += (diff**2).tolist()
                huber += torch.where(diff.abs() < 1, 0.5 * diff**2, diff.abs() - 0.5).tolist()
    assert ijepa_loss(pred, features, targets).item() == pytest.approx(sum(l2) / len(l2), rel=1e-5)
    assert ijepa_loss(pred, features, targets, "smooth_l1").item() == pytest.approx(sum(huber) / len(huber), rel=1e-5)
    normed = F.layer_norm(features, (d,))
    perfect = torch.stack([normed[i, targets[i]] for i in range(b)])
    assert ijepa_loss(perfect, features, targets).item() == pytest.approx(0.0, abs=1e-10)


def test_loss_ignores_the_target_features_outside_the_target_blocks() -> None:
    g = torch.Generator().manual_seed(1)
    masks = sample_masks(6, 0, torch.arange(4))
    b, m, k = masks.targets.shape
    features = torch.randn(b, 36, 8, generator=g)
    pred = torch.randn(b, m, k, 8, generator=g)
    loss = ijepa_loss(pred, features, masks.targets)
    is_target = torch.zeros(b, 36, dtype=torch.bool)
    for i in range(b):
        is_target[i, masks.targets[i].reshape(-1)] = True
    assert not is_target.all(dim=1).any()  # there is something outside the targets to perturb
    elsewhere = features + 100 * torch.randn(features.shape, generator=g) * (~is_target)[..., None]
    assert ijepa_loss(pred, elsewhere, masks.targets).item() == loss.item()  # exactly
    rescaled = features * torch.where(is_target, 3.0, 1.0)[..., None] + 7  # per-token affine: the layer norm removes it
    assert ijepa_loss(pred, rescaled, masks.targets).item() == pytest.approx(loss.item(), rel=1e-4)
    one = features.clone()
    i, p = 1, int(masks.targets[1, 2, 0])
    one[i, p] = torch.randn(8, generator=g)
    assert abs(ijepa_loss(pred, one, masks.targets).item() - loss.item()) > 1e-4


def test_the_loss_sees_the_image_only_through_the_context_patches_and_the_targets_only_at_target_positions() -> None:
    method = tiny_ijepa(24)
    grid, patch = 6, 4
    step = StepInfo(0, 3, 10, indices=torch.arange(4))
    masks = method.sample_masks(4, step)
    fixed = torch.randn(4, 36, 32, generator=torch.Generator().manual_seed(2))
    method.target_features = lambda images: fixed  # the target encoder's output, held fixed
    predictions: list[torch.Tensor] = []
    method.predictor.register_forward_hook(lambda module, args, out: predictions.append(out))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 24, 24, generator=g)

    def patch_of(pid: int) -> tuple[slice, slice]:
        r, c = divmod(pid, grid)
        return slice(r * patch, (r + 1) * patch), slice(c * patch, (c + 1) * patch)

    with torch.no_grad():
        loss = method.training_step([x], step).loss.item()
        outside = x.clone()
        for i in range(4):
            for pid in set(range(36)) - set(masks.context[i].tolist()):  # every patch but the context, targets included
                outside[i, :, patch_of(pid)[0], patch_of(pid)[1]] = 50 * torch.randn(3, patch, patch, generator=g)
        assert method.training_step([outside], step).loss.item() == loss
        torch.testing.assert_close(predictions[1], predictions[0], rtol=0, atol=0)
        inside = x.clone()
        rows, cols = patch_of(int(masks.context[0, -1]))
        inside[0, :, rows, cols] += 5
        method.training_step([inside], step)
        assert not torch.equal(predictions[2][0], predictions[0][0])  # image 0's predictions move with its context (a little: the reference's small init)
        torch.testing.assert_close(predictions[2][1:], predictions[0][1:], rtol=0, atol=0)
        is_target = torch.zeros(4, 36, dtype=torch.bool)
        for i in range(4):
            is_target[i, masks.targets[i].reshape(-1)] = True
        perturbed = fixed + 10 * torch.randn(fixed.shape, generator=g) * (~is_target)[..., None]
        method.target_features = lambda images: perturbed
        assert method.training_step([x], step).loss.item() == loss
        one = fixed.clone()
        one[2, int(masks.targets[2, 0, 0])] += 10 * torch.randn(32, generator=g)
        method.target_features = lambda images: one
        assert abs(method.training_step([x], step).loss.item() - loss) > 1e-5  # one of 96 target tokens


def test_predictor_predicts_each_block_of_each_image_from_that_image_alone() -> None:
    predictor = tiny_ijepa(24).predictor
    masks = sample_masks(6, 0, torch.arange(3))
    context = torch.randn(3, masks.context.shape[1], 32)
    with torch.no_grad():
        out = predictor(context, masks.context, masks.targets)
        assert out.shape == (*masks.targets.shape, 32)
        moved = masks.targets.clone()
        moved[:, 1] = masks.targets[:, 1].flip(0)  # other images' block 1
        other = predictor(context, masks.context, moved)
        torch.testing.assert_close(other[:, [0, 2, 3]], out[:, [0, 2, 3]])  # the blocks are predicted separately
        changed = context.clone()
        changed[1] += 1
        again = predictor(changed, masks.context, masks.targets)
        torch.testing.assert_close(again[[0, 2]], out[[0, 2]])
        assert not torch.allclose(again[1], out[1])


# ----------------------------------------------------------------------------- networks


def test_context_encoder_sees_the_context_only_and_the_target_encoder_the_full_image() -> None:
    method = tiny_ijepa(24)
    online, target = [], []
    method.backbone.blocks[0].register_forward_pre_hook(lambda module, args: online.append(args[0].shape[1]))
    method.target.blocks[0].register_forward_pre_hook(lambda module, args: target.append(args[0].shape[1]))
    step = StepInfo(0, 0, 1, indices=torch.arange(4))
    out = method.training_step([torch.randn(4, 3, 24, 24)], step)
    kc = method.sample_masks(4, step).context.shape[1]
    assert online == [1 + kc] and target == [1 + 36]  # the class token plus the patches
    assert out.logs["context_patches"] == kc and out.logs["target_patches"] == method.sample_masks(4, step).targets.shape[2]
    assert torch.isfinite(out.loss)


def test_target_gets_no_gradient_and_follows_the_linear_ema() -> None:
    method = tiny_ijepa(24)
    online_params = dict(method.backbone.named_parameters())
    for name, p in method.target.named_parameters():
        assert not p.requires_grad
        torch.testing.assert_close(p, online_params[name])  # a copy of the online encoder to start with
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(8, 3, 24, 24)
    out = method.training_step([x], StepInfo(0, 250, 1000, indices=torch.arange(8)))
    assert out.logs["momentum"] == pytest.approx(0.997)
    out.loss.backward()
    assert all(p.grad is None for p in method.target.parameters())
    assert all(p.grad is not None for p in method.predictor.parameters())
    assert method.backbone.patch_embed.proj.weight.grad is not None
    optimizer.step()
    before = {name: p.clone() for name, p in method.target.named_parameters()}
    method.after_step(StepInfo(0, 250, 1000))  # tau = 0.996 + 0.004 * 250 / 1000 = 0.997
    moved = 0
    for name, p in method.target.named_parameters():
        torch.testing.assert_close(p, 0.997 * before[name] + 0.003 * online_params[name], rtol=0, atol=1e-7)
        moved += int(not torch.equal(p, before[name]))
    assert moved > 0
    assert linear_momentum(0, 1000, 0.996) == pytest.approx(0.996)
    assert linear_momentum(500, 1000, 0.996) == pytest.approx(0.998)
    assert linear_momentum(1000, 1000, 0.996) == 1.0 and linear_momentum(1200, 1000, 0.996) == 1.0


def test_embed_is_the_mean_pooled_target_encoder_and_fine_tuning_copies_it() -> None:
    method = tiny_ijepa(24)
    with torch.no_grad():
        for p in method.target.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the target now differs from the context encoder
    method.eval()
    x = torch.randn(3, 3, 24, 24)
    rep = method.embed(x)
    torch.testing.assert_close(rep, method.target.forward_features(x)[:, 1:].mean(1))
    assert not torch.allclose(rep, method.backbone.forward_features(x)[:, 1:].mean(1))
    trunk, dim = method.trunk(0)
    assert dim == method.backbone.num_features == rep.shape[1]
    torch.testing.assert_close(trunk(x), rep)
    assert all(p.requires_grad for p in trunk.parameters())
    next(iter(trunk.parameters())).data.add_(1.0)
    torch.testing.assert_close(method.embed(x), rep)  # a copy: fine-tuning leaves the target encoder alone
    with pytest.raises(Exception, match="from_projector_layer"):
        method.trunk(1)


# ----------------------------------------------------------------------------- bad input


def test_ijepa_refuses_a_non_vit_backbone_and_an_image_size_not_divisible_by_the_patch_size() -> None:
    with pytest.raises(ConfigError, match=r"^backbone.name: method ijepa needs a timm ViT \(vit_\*\), got 'test_resnet'$"):
        create_method("ijepa", create_backbone("test_resnet", in_chans=3, img_size=16))
    with pytest.raises(ConfigError, match=r"^data.image_size: 30 px images do not split into 4 px ViT patches \(backbone.kwargs.patch_size\)"):
        create_method("ijepa", tiny_vit(30), **SMALL)
    method = create_method("ijepa", tiny_vit(16), **SMALL)
    with pytest.raises(ConfigError, match=r"^backbone.kwargs.img_size: the ViT is built for 16 px images, the data has 24 px"):
        method.setup(load_dataset("shapes", image_size=24, num_train=8, num_test=4, seed=0))


@pytest.mark.parametrize(
    "img_size,params,message",
    [
        (  # keep int(16 * 0.5) = 8 at aspect 4: 6 rows on a 4-row grid
            16, {"target_scale": (0.5, 0.6), "target_aspect": (3.0, 4.0)},
            r"^method.target_scale: target blocks of scale up to 0.6 and aspect \(h/w\) \[3.0, 4.0\] reach \d+x\d+ patches, larger than the 4x4 patch grid "
            r"\(data.image_size 16 / backbone.kwargs.patch_size 4\); use ",
        ),
        (16, {"target_scale": (0.01, 0.02)}, r"^method.target_scale: a block of scale 0.01 on the 4x4 patch grid .* keeps int\(16 \* 0.01\) = 0 patches; use "),
        (16, {"context_scale": (0.05, 0.1)}, r"^method.context_scale: a block of scale 0.05 on the 4x4 patch grid .* keeps int\(16 \* 0.05\) = 0 patches; use "),
        (  # 2x2 targets on a 4x4 grid: 4 of them fill it
            16, {"target_scale": (0.25, 0.3)},
            r"^method.target_scale: 4 target blocks of at least 4 patches fill the context block of at most 16 patches on the 4x4 patch grid .*; use ",
        ),
        (24, {"num_targets": 9}, r"^method.target_scale: 9 target blocks of at least 4 patches fill the context block of at most 36 patches on the 6x6 patch grid"),
    ],
)  # fmt: skip
def test_blocks_the_grid_cannot_hold_are_config_errors(img_size: int, params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        create_method("ijepa", tiny_vit(img_size), **{**SMALL, **params})
    assert "\n" not in str(err.value)
    create_method("ijepa", tiny_vit(img_size), **SMALL)  # the paper's blocks fit both grids


@pytest.mark.parametrize(
    "params,key",
    [
        ({"target_aspect": [1.5, 0.75]}, "target_aspect"),
        ({"target_scale": [0.2, 1.5]}, "target_scale"),
        ({"context_scale": [0.0, 1.0]}, "context_scale"),
        ({"pred_dim": 18}, "pred_dim"),
        ({"pred_dim": 16, "pred_heads": 3}, "pred_heads"),
        ({"base_momentum": 1.5}, "base_momentum"),
        ({"loss": "huber"}, "loss"),
        ({"num_targets": 0}, "num_targets"),
    ],
)
def test_bad_parameters_are_config_errors_naming_the_key(params: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^method.{key}: "):
        build_config({"method": {"name": "ijepa", **params}})


@pytest.mark.parametrize(
    "overrides,line",
    [
        (["backbone.name=test_resnet"], "error: backbone.name: method ijepa needs a timm ViT (vit_*), got 'test_resnet'"),
        (
            ["backbone.name=vit_tiny_patch16_224", "backbone.kwargs.patch_size=4", "backbone.kwargs.embed_dim=32", "backbone.kwargs.depth=1", "backbone.kwargs.num_heads=2",
             "method.target_scale=[0.25, 0.3]"],
            "error: method.target_scale: 4 target blocks of at least 4 patches fill the context block of at most 16 patches on the 4x4 patch grid "
            "(data.image_size 16 / backbone.kwargs.patch_size 4), leaving no room for a context; use a smaller method.target_scale, fewer method.num_targets "
            "or a smaller patch size",
        ),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(overrides: list[str], line: str, tracking_uri, capsys) -> None:
    config = str(REPO / "configs" / "simclr_shapes.yaml")
    small = ["data.num_train=128", "data.num_test=32", "data.image_size=16", "eval.semi.enabled=false", "device=cpu"]  # the error comes before training
    code = main(["-q", "run", config, "method=ijepa", *overrides, *small])
    _, err = capsys.readouterr()
    assert code == 2
    assert err.strip().splitlines() == [line], err


def test_the_paper_blocks_fit_the_paper_grids() -> None:
    ijepa.check_blocks(14, 16, **PAPER)  # ViT-*/16 at 224 px
    ijepa.check_blocks(16, 14, **PAPER)  # ViT-H/14 at 224 px
