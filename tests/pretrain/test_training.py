"""The CM-CGNS network and its two-stage training: real pairs, a resumable run, the encoder pack and
``--encoder-init`` into the U-Net."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medseg.engine.progress import CancelToken, run_sync
from medseg.errors import Cancelled, ModelError, UsageError
from medseg.pretrain.data import centre_crop, load_images, load_size, read_pairs, to_tensor
from medseg.pretrain.model import CMCGNS, ModelSpec
from medseg.pretrain.pack import init_segmentation_encoder, load_encoder_pack, save_encoder_pack
from medseg.pretrain.text import Vocabulary, encode_reports
from medseg.pretrain.train import PretrainConfig, batch_losses, pretrain_iter
from tests.conftest import data_dir
from tests.pretrain.synthetic import write_archive

TINY = dict(image_size=32, dim=32, text_width=32, text_layers=1)


def tiny_model(vocab: Vocabulary, clusters: int = 4) -> CMCGNS:
    torch.manual_seed(0)
    return CMCGNS(ModelSpec(**TINY, heads=4, text_heads=2, vocab_size=len(vocab), clusters=clusters))


@pytest.fixture(scope="module")
def real_batch():
    folder = data_dir("cxr_notes")
    records, seen = [], set()
    for r in read_pairs(folder / "pairs.csv"):
        if r.text not in seen and len(r.text.split()) > 20:
            records.append(r)
            seen.add(r.text)
        if len(records) == 8:
            break
    squares = run_sync(load_images(records, load_size(32)))
    vocab = Vocabulary.build(r.text for r in records)
    return to_tensor(centre_crop(squares, 32)), [r.text for r in records], vocab


def test_two_training_steps_on_real_pairs_lower_the_total_loss(real_batch):
    images, texts, vocab = real_batch
    model = tiny_model(vocab).train()
    reports = encode_reports(texts, vocab)
    cfg = PretrainConfig(cluster_start_cos=2.0)  # start the centroids on the first batch
    with torch.no_grad():
        batch_losses(model, images, reports, 2, cfg, True, torch.Generator().manual_seed(0))
    assert model.clusters.active
    model.clusters.momentum = 0.0  # the same centroids before and after: the loss terms stay comparable

    def total() -> torch.Tensor:
        torch.manual_seed(1)  # the same dropout masks
        return batch_losses(model, images, reports, 2, cfg, True, torch.Generator().manual_seed(2))

    with torch.no_grad():
        before = total()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        losses = total()
        assert set(losses) >= {"global", "local_image", "local_report", "reconstruction", "total"}
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
    with torch.no_grad():
        after = total()
    assert float(after["total"]) < float(before["total"])


def test_clusters_start_once_the_mean_cosine_is_low_enough():
    vocab = Vocabulary.build(["left pleural effusion is small. right lung is clear.", "heart size normal. no focal opacity seen."])
    model = tiny_model(vocab, clusters=2).train()
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    reports = encode_reports(["left pleural effusion is small. right lung is clear.", "heart size normal. no focal opacity seen."], vocab)
    g = torch.Generator().manual_seed(0)
    batch_losses(model, images, reports, 1, PretrainConfig(cluster_start_cos=-2.0), True, g)
    assert not model.clusters.active  # a cosine is never below -2
    first = batch_losses(model, images, reports, 1, PretrainConfig(cluster_start_cos=2.0), True, g)
    assert model.clusters.active and float(first["false_negative"]) == 0.0  # active from the next step on
    moved = model.clusters.centroids.clone()
    batch_losses(model, images, reports, 1, PretrainConfig(), False, g)
    assert torch.equal(model.clusters.centroids, moved)  # never updated outside training


def test_cross_attention_of_a_padded_batch_equals_each_sample_alone():
    vocab = Vocabulary.build(["a b"])
    model = tiny_model(vocab)
    torch.manual_seed(3)
    image = torch.randn(2, 4, 32)
    sentences = torch.randn(2, 3, 32)
    valid = torch.tensor([[True, True, True], [True, False, False]])
    t2i, i2t = model.cross(image, sentences, valid)
    alone_t2i, alone_i2t = model.cross(image[1:], sentences[1:, :1], valid[1:, :1])
    assert torch.allclose(t2i[1:], alone_t2i, atol=1e-6) and torch.allclose(i2t[1:, :1], alone_i2t, atol=1e-6)
    assert torch.all(i2t[1, 1:] == 0)


def test_reconstruction_is_an_image_in_minus_one_to_one():
    vocab = Vocabulary.build(["a b"])
    model = tiny_model(vocab)
    with torch.no_grad():
        feats = model.encode_image(torch.rand(3, 1, 32, 32) * 2 - 1)
        mask = torch.zeros(3, *feats.grid, dtype=torch.bool)
        mask[:, 0, 0] = True
        out = model.reconstruct(feats.tokens, torch.randn_like(feats.tokens) * 10, mask, feats.grid)
    assert out.shape == (3, 3, 32, 32) and float(out.min()) >= -1 and float(out.max()) <= 1


def test_pretraining_writes_an_encoder_pack_and_resumes(tmp_path):
    csv = write_archive(tmp_path / "archive")
    cfg = dict(pairs=str(csv), **TINY, batch_size=4, stage1_epochs=1, stage2_epochs=2, workdir=str(tmp_path / "work"), run="tiny", device="cpu", val_fraction=0.3)
    token = CancelToken()
    seen = []

    def stop_in_stage_two(event):
        seen.append(event)
        if event.message.startswith("stage II epoch 2"):
            token.cancel()

    with pytest.raises(Cancelled, match="--resume"):
        run_sync(pretrain_iter(PretrainConfig(**cfg, out=str(tmp_path / "enc")), cancel=token), stop_in_stage_two)
    with pytest.raises(UsageError, match="--resume"):
        run_sync(pretrain_iter(PretrainConfig(**cfg)))
    resumed = run_sync(pretrain_iter(PretrainConfig(**cfg, resume=True, out=str(tmp_path / "enc"))))
    whole = run_sync(pretrain_iter(PretrainConfig(**{**cfg, "run": "whole"}, out=str(tmp_path / "enc-whole"))))
    assert [h["stage"] for h in resumed.history] == [1, 2, 2] and "reconstruction" in resumed.history[-1]
    assert resumed.steps == whole.steps == seen[-1].total
    for (k, a), b in zip(resumed.model.state_dict().items(), whole.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), k
    manifest = json.loads((tmp_path / "enc" / "manifest.json").read_text())
    assert manifest["kind"] == "cmcgns-encoder" and manifest["image_encoder"]["architecture"] == "unet"
    assert manifest["training"]["val_pairs"] > 0 and manifest["spec"]["clusters"] >= 2 and len(manifest["vocab"]) > 4
    pack = load_encoder_pack(tmp_path / "enc")
    assert pack.image_size == 32 and not pack.model.training


def test_encoder_init_loads_the_unet_encoder_exactly(tmp_path):
    from medseg import models

    vocab = Vocabulary.build(["a b c"])
    source = tiny_model(vocab)
    folder = save_encoder_pack(source, vocab, tmp_path / "enc", "tiny")
    unet = models.build("unet", in_channels=1, num_classes=3, config="small")
    before_head = unet.head.weight.detach().clone()
    info = init_segmentation_encoder(unet, folder, "unet", "small")
    encoder = {k: v for k, v in source.state_dict().items() if k.startswith("image_encoder.downs.")}
    assert info["loaded_tensors"] == len(encoder) > 0
    for key, value in encoder.items():
        assert torch.equal(unet.state_dict()[key[len("image_encoder."):]], value.half().float()), key
    assert torch.equal(unet.head.weight, before_head)  # the decoder and head are left alone
    with pytest.raises(UsageError, match="unet/small encoder, not unet/full"):
        init_segmentation_encoder(models.build("unet", 1, 3, "full"), folder, "unet", "full")
    weights = folder / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ModelError, match="integrity"):
        init_segmentation_encoder(unet, folder, "unet", "small")


def test_pairs_file_errors_are_one_sentence(tmp_path):
    from medseg.errors import InputError

    csv = write_archive(tmp_path / "archive")
    with pytest.raises(UsageError, match="no column 'report'.*--text-col"):
        read_pairs(csv, text_col="report")
    text = csv.read_text().replace("images/normal-0.png", "images/missing.png")
    csv.write_text(text)
    with pytest.raises(InputError, match="1 image.*missing.png"):
        read_pairs(csv)
    np.testing.assert_equal(len(read_pairs(csv, require_images=False)), 12)
