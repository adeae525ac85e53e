"""CLIP and SimCSE: losses against closed forms and hand loops, the logit scale, the tokenizer, the captions,
dropout positives, the image-text evaluations, the text path of the run, and bad input."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.backbones import create_backbone
from core.contract import StepInfo
from core.errors import ConfigError
from evaluations.zero_shot import class_embeddings, cross_modal_recall, zero_shot_top1
from harness.config.loading import build_config
from harness.data.datasets import DataSplits, Split, load_dataset
from methods import create_method
from methods.captions import SHAPE_TEMPLATES, captions_for, item_captions, zero_shot_prompts
from methods.clip import clip_loss
from methods.simcse import simcse_loss
from methods.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, bag_of_words
from tests.helpers.method_params import small_params


@pytest.fixture(scope="module")
def tiny_shapes() -> DataSplits:
    return load_dataset("shapes", image_size=16, num_train=32, num_test=16, seed=0)


def _method(name: str, data: DataSplits, **params) -> torch.nn.Module:
    method = create_method(name, create_backbone("test_resnet", in_chans=3, img_size=16), **small_params(name, **params))
    method.setup(data)
    return method


# ----------------------------------------------------------------------------- losses


def _hand_clip(image: torch.Tensor, text: torch.Tensor, scale: float) -> float:
    image, text = F.normalize(image, dim=1), F.normalize(text, dim=1)
    n, total = image.shape[0], 0.0
    for i in range(n):
        row = torch.stack([scale * image[i] @ text[j] for j in range(n)])
        col = torch.stack([scale * text[i] @ image[j] for j in range(n)])
        total += -torch.log_softmax(row, 0)[i].item() - torch.log_softmax(col, 0)[i].item()
    return total / (2 * n)


def test_clip_loss_closed_forms() -> None:
    eye = torch.eye(6)
    assert clip_loss(eye, eye, 100.0).item() == pytest.approx(0.0, abs=1e-6)  # log(1 + 5 e^-100)
    assert clip_loss(eye, eye, 1.0).item() == pytest.approx(math.log(1 + 5 * math.exp(-1)), rel=1e-6)
    collapsed = torch.randn(1, 8).repeat(10, 1)
    assert clip_loss(collapsed, collapsed, 14.3).item() == pytest.approx(math.log(10), rel=1e-6)


def test_clip_loss_is_symmetric_when_the_similarity_matrix_is() -> None:
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(7, 5, generator=g), dim=1)
    v = torch.randn(5, 1, generator=g)
    reflection = torch.eye(5) - 2 * v @ v.T / (v.T @ v)  # orthogonal and symmetric: I Q I^T is symmetric
    text = image @ reflection
    sims = image @ text.T
    torch.testing.assert_close(sims, sims.T)
    assert clip_loss(image, text, 10.0).item() == pytest.approx(clip_loss(text, image, 10.0).item(), rel=1e-6)


def test_clip_loss_against_a_hand_loop() -> None:
    g = torch.Generator().manual_seed(1)
    image, text = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    assert clip_loss(image, text, 3.0).item() == pytest.approx(_hand_clip(image, text, 3.0), rel=1e-5)
    assert clip_loss(image, text, torch.tensor(3.0)).item() == pytest.approx(_hand_clip(image, text, 3.0), rel=1e-5)
    with pytest.raises(ValueError, match="both be"):
        clip_loss(image, text[:4], 1.0)


def test_simcse_loss_against_a_hand_loop_and_collapse() -> None:
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    expected = 0.0
    for i in range(6):
        logits = torch.stack([F.cosine_similarity(z1[i], z2[j], dim=0) for j in range(6)]) / 0.05
        expected += -torch.log_softmax(logits, 0)[i].item() / 6
    assert simcse_loss(z1, z2).item() == pytest.approx(expected, rel=1e-5)
    same = torch.ones(6, 4)
    assert simcse_loss(same, same).item() == pytest.approx(math.log(6), rel=1e-6)  # N candidates, not 2N - 1
    with pytest.raises(ValueError, match="temperature"):
        simcse_loss(z1, z2, 0.0)


# ----------------------------------------------------------------------------- CLIP's logit scale, SimCSE's dropout


def test_logit_scale_starts_at_1_over_0_07_and_is_clamped_at_100(tiny_shapes) -> None:
    clip = _method("clip", tiny_shapes, embed_dim=8)
    assert clip.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert clip.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        clip.logit_scale.fill_(10.0)
    assert clip.scale().item() == pytest.approx(100.0, rel=1e-5)
    clip.after_step(StepInfo(0, 0, 1))
    assert clip.logit_scale.item() == pytest.approx(math.log(100), rel=1e-6)


def test_clip_step_uses_the_captions_of_the_batch_rows(tiny_shapes) -> None:
    clip = _method("clip", tiny_shapes, embed_dim=8)
    torch.manual_seed(0)
    idx = torch.tensor([3, 5, 7])
    tokens = clip.captions.sample(idx)
    captions = captions_for(tiny_shapes.train, tiny_shapes.classes)
    for i, text in zip(idx.tolist(), clip.tokenizer.decode(tokens), strict=True):
        assert text in captions[i]
    assert clip.tokenizer.decode(clip.captions.caption(idx)) == [captions[i][0] for i in idx.tolist()]
    out = clip.training_step([torch.randn(3, 3, 16, 16)], StepInfo(0, 0, 1, indices=idx))
    assert torch.isfinite(out.loss) and out.logs["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_simcse_positives_are_identical_without_dropout_and_differ_with_it(tiny_shapes) -> None:
    tokens = _method("simcse", tiny_shapes).tokenize(item_captions(tiny_shapes.train, tiny_shapes.classes)[:8])
    for dropout, identical in ((0.0, True), (0.3, False)):
        simcse = _method("simcse", tiny_shapes, dropout=dropout).train()
        z1, z2 = simcse.two_passes(tokens)
        assert torch.equal(z1, z2) is identical, dropout
        assert simcse.backbone.num_features == 32 and z1.shape == (8, 32)


# ----------------------------------------------------------------------------- tokenizer and captions


def test_tokenizer_round_trip_unknown_words_and_deterministic_vocabulary() -> None:
    texts = ["a small red triangle", "A photo of a circle.", "the Star, in the centre"]
    tokenizer = Tokenizer.from_texts(texts)
    assert tokenizer.words == tuple(sorted({"a", "small", "red", "triangle", "photo", "of", "circle", "the", "star", "in", "centre"}))
    assert Tokenizer.from_texts(reversed(texts)).ids == tokenizer.ids
    ids, padding = tokenizer.encode(["A red circle!", "a purple circle"], context_length=8)
    assert ids.shape == padding.shape == (2, 8) and ids.dtype == torch.int64
    assert ids[0, 0] == BOS_ID and ids[0, 4] == EOS_ID and (ids[0, 5:] == PAD_ID).all()
    assert padding[0].tolist() == [False] * 5 + [True] * 3
    assert ids[1, 2] == UNK_ID
    assert tokenizer.decode(ids) == ["a red circle", "a <unk> circle"]


def test_long_captions_are_truncated_with_a_logged_count(caplog) -> None:
    tokenizer = Tokenizer.from_texts(["one two three four five six"])
    with caplog.at_level(logging.WARNING, logger="methods.tokenizer"):
        ids, _ = tokenizer.encode(["one two three four five six", "one two", "six five four three"], context_length=5)
    assert tokenizer.decode(ids) == ["one two three", "one two", "six five four"]
    assert ids[0, -1] == EOS_ID and ids[2, -1] == EOS_ID
    (record,) = [r for r in caplog.records if r.name == "methods.tokenizer"]
    assert record.levelno == logging.WARNING and record.getMessage().startswith("2 of 3 captions")


def test_bag_of_words_counts_words_only() -> None:
    tokenizer = Tokenizer.from_texts(["a red red circle"])
    counts = bag_of_words(tokenizer.encode(["a red red circle"], 8)[0], len(tokenizer))
    assert counts[0, tokenizer.ids["red"]] == 2 and counts[0, tokenizer.ids["a"]] == 1 and counts.sum() == 4


def test_shapes_captions_name_the_shape_and_follow_the_templates(tiny_shapes) -> None:
    captions = captions_for(tiny_shapes.train, tiny_shapes.classes)
    assert len(captions) == len(tiny_shapes.train)
    for attributes, texts in zip(tiny_shapes.train.attributes, captions, strict=True):
        assert len(texts) == len(SHAPE_TEMPLATES)
        assert all(attributes["shape"] in text.split() for text in texts)
        assert texts[0].startswith(("a ", "an ")) and f"{attributes['size']} {attributes['colour']} {attributes['shape']}" in texts[0]
    # zero-shot prompts name the class alone: no training caption is one of them
    prompts = zero_shot_prompts(tiny_shapes.test, tiny_shapes.classes)
    assert prompts[tiny_shapes.classes.index("star")] == ["a star", "a picture of a star", "there is a star"]
    assert not {p for c in prompts for p in c} & {t for texts in captions for t in texts}
    from methods.captions import describe

    centre = describe({"shape": "star", "colour": "orange", "size": "large", "position": "centre"})
    assert centre[0] == "a large orange star in the centre" and centre[1] == "an orange star"
    assert describe({"shape": "ring", "colour": "red", "size": "small", "position": "top centre"})[0] == "a small red ring at the top"


def test_labelled_datasets_use_class_templates_and_no_text_is_a_config_error() -> None:
    split = Split(torch.zeros(3, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 2, 1]))
    assert item_captions(split, ["cat", "sea_lion", "ant"]) == ["a photo of a cat", "a photo of an ant", "a photo of a sea lion"]
    bare = DataSplits("bare", split, split, (), (0.5,), (0.25,))
    for name in ("clip", "simcse"):
        method = create_method(name, create_backbone("test_resnet", in_chans=1, img_size=8), **small_params(name))
        with pytest.raises(ConfigError, match=f"data.name: dataset 'bare' has no captions .* {name} needs text"):
            method.setup(bare)


def test_no_text_exits_2_from_the_cli(tmp_path, tracking_uri, capsys, monkeypatch) -> None:
    from harness.cli import main
    from harness.data import datasets

    def bare(request):
        images, labels = torch.zeros(8, 3, 16, 16, dtype=torch.uint8), torch.arange(8) % 2
        return DataSplits("bare", Split(images, labels), Split(images, labels), (), (0.5,) * 3, (0.25,) * 3)

    monkeypatch.setitem(datasets._REGISTRY, "bare", bare)
    config = tmp_path / "clip.yaml"
    config.write_text("data: {name: bare}\nmethod: {name: clip}\nbackbone: {name: test_resnet}\npretrain: {batch_size: 4}\neval: {semi: {enabled: false}}\ndevice: cpu\n")
    assert main(["-q", "run", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data.name: dataset 'bare' has no captions")


# ----------------------------------------------------------------------------- image-text evaluations


def test_zero_shot_top1_against_numpy() -> None:
    rng = np.random.default_rng(0)
    image, classes, labels = rng.normal(size=(50, 6)), rng.normal(size=(4, 6)), rng.integers(0, 4, 50)
    sims = (image / np.linalg.norm(image, axis=1, keepdims=True)) @ (classes / np.linalg.norm(classes, axis=1, keepdims=True)).T
    assert zero_shot_top1(image, classes, labels) == pytest.approx(np.mean(sims.argmax(1) == labels))
    assert zero_shot_top1(classes[labels] * 3, classes, labels) == 1.0
    prompts = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [-1.0, 0.0]])  # class 0: mean of two prompts; class 1: one direction
    np.testing.assert_allclose(class_embeddings(prompts, 2), [[np.sqrt(0.5), np.sqrt(0.5)], [-1.0, 0.0]], atol=1e-6)


def test_cross_modal_recall_against_numpy() -> None:
    rng = np.random.default_rng(1)
    query, gallery = rng.normal(size=(40, 8)), rng.normal(size=(40, 8))
    gallery[:20] = query[:20] + 0.1 * rng.normal(size=(20, 8))  # half of the pairs are close
    qn, gn = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (query, gallery))
    order = np.argsort(-(qn @ gn.T), axis=1)
    rank = np.argmax(order == np.arange(40)[:, None], axis=1)
    expected = {k: float(np.mean(rank < k)) for k in (1, 5, 10)}
    assert cross_modal_recall(query, gallery, (1, 5, 10)) == pytest.approx(expected)
    assert expected[1] >= 0.5
    # items of one group match each other: the second copy of a caption is as good as the first
    text = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    image = np.array([[1.0, 0.5], [1.0, 0.0], [0.0, 1.0]])
    assert cross_modal_recall(text, image, (1,))[1] == pytest.approx(2 / 3)
    assert cross_modal_recall(text, image, (1,), groups=[0, 0, 1])[1] == 1.0
    assert cross_modal_recall(np.ones((5, 3)), np.ones((5, 3)), (1, 4, 5)) == {1: 0.0, 4: 0.0, 5: 1.0}  # collapse: ties count against


# ----------------------------------------------------------------------------- the run's text and image-text paths


def _tiny_config(method: dict, **eval_overrides):
    raw = {
        "data": {"name": "shapes", "image_size": 16, "num_train": 64, "num_test": 32},
        "backbone": {"name": "test_resnet"},
        "method": method,
        "pretrain": {"epochs": 1, "batch_size": 16, "warmup_epochs": 0, "progress": False},
        "eval": {"knn": {"k": 5}, "linear": {"epochs": 2}, "semi": {"enabled": False}, **eval_overrides},
        "device": "cpu",
    }
    return build_config(raw)


def test_simcse_refuses_semi_supervised_fine_tuning_before_training() -> None:
    from harness.trial.prepare import prepare

    with pytest.raises(ConfigError, match="eval.semi.enabled: method 'simcse' learns text"):
        prepare(_tiny_config({"name": "simcse", **small_params("simcse")}, semi={"enabled": True, "fractions": [0.25], "epochs": [1]}))


def test_evaluate_runs_the_battery_on_captions_and_the_image_text_evaluations() -> None:
    from harness.trial.evaluate import baselines, evaluate
    from harness.trial.prepare import prepare

    trial = prepare(_tiny_config({"name": "simcse", **small_params("simcse")}))
    metrics = {**baselines(trial), **evaluate(trial)}
    for key in ("baseline/bag_of_words/knn_top1", "baseline/random_init/knn_top1", "eval/knn/top1", "eval/linear/top1", "eval/retrieval/recall_at_1", "eval/rank/alignment"):
        assert np.isfinite(metrics[key]), key
    assert "baseline/raw_pixels/knn_top1" not in metrics and "eval/zero_shot/top1" not in metrics

    trial = prepare(_tiny_config({"name": "clip", **small_params("clip")}))
    metrics = {**baselines(trial), **evaluate(trial)}
    for key in ("baseline/raw_pixels/knn_top1", "eval/knn/top1", "eval/zero_shot/top1", "eval/retrieval_i2t/recall_at_1", "eval/retrieval_t2i/recall_at_5"):
        assert 0 <= metrics[key] <= 1, key
    assert metrics["eval/retrieval_i2t/recall_at_1"] <= metrics["eval/retrieval_i2t/recall_at_5"]
