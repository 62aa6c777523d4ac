"""Similar-case retrieval: an index of an archive, the k nearest cases for an image or a region."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from medseg.engine.progress import run_sync
from medseg.errors import InputError, UsageError
from medseg.pretrain.data import read_pairs
from medseg.pretrain.model import CMCGNS, ModelSpec
from medseg.pretrain.pack import save_encoder_pack
from medseg.pretrain.retrieval import build_index_iter, load_index, nearest, query_embedding, similar_iter
from medseg.pretrain.text import Vocabulary
from tests.pretrain.synthetic import write_archive


def tiny_encoder(folder, texts) -> object:
    torch.manual_seed(0)
    vocab = Vocabulary.build(texts)
    model = CMCGNS(ModelSpec(image_size=32, dim=32, heads=4, text_width=32, text_layers=1, text_heads=2, vocab_size=len(vocab), clusters=2)).eval()
    return save_encoder_pack(model, vocab, folder, "tiny")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    csv = write_archive(root / "archive")
    records = read_pairs(csv)
    encoder = tiny_encoder(root / "encoder", [r.text for r in records])
    index = run_sync(build_index_iter(encoder, records, root / "index"))
    return records, index


def test_an_archived_image_gets_its_own_features_and_the_top_k_by_cosine(archive):
    records, folder = archive
    index = load_index(folder)
    assert len(index) == len(records) and index.thumbnails.shape == (len(records), 96, 96)
    assert np.allclose(np.linalg.norm(index.image_embeddings, axis=1), 1, atol=1e-5)
    image = iio.imread(records[5].image)
    query = query_embedding(index, image, rgb=False)
    assert np.allclose(query, index.image_embeddings[5], atol=1e-5)  # the same image, the same features as when it was indexed
    found = run_sync(similar_iter(index, image, k=4))
    scores = index.image_embeddings @ query
    assert [c.rank for c in found] == [1, 2, 3, 4]
    assert [c.index for c in found] == list(np.argsort(-scores, kind="stable")[:4])
    assert [c.score for c in found] == pytest.approx(sorted(scores, reverse=True)[:4], abs=1e-6)
    top = found[0]
    assert top.finding == records[top.index].fields["finding"] and top.text == records[top.index].text
    assert top.thumbnail.shape == (96, 96) and top.image == str(records[top.index].image.resolve())
    by_report = run_sync(similar_iter(folder, image, k=3, by="report"))
    assert [c.index for c in by_report] == list(np.argsort(-(index.report_embeddings @ query), kind="stable")[:3])


def test_a_region_is_searched_on_its_own(archive):
    records, folder = archive
    index = load_index(folder)
    image = iio.imread(records[0].image)
    region = (10, 10, 40, 44)
    crop_query = run_sync(similar_iter(index, image[10:40, 10:44], k=3))
    region_query = run_sync(similar_iter(index, image, k=3, region=region))
    assert [c.index for c in crop_query] == [c.index for c in region_query]
    assert [c.score for c in crop_query] == pytest.approx([c.score for c in region_query])
    with pytest.raises(InputError, match="region"):
        run_sync(similar_iter(index, image, region=(0, 0, 2, 2)))


def test_k_larger_than_the_archive_and_bad_requests(archive, tmp_path):
    records, folder = archive
    index = load_index(folder)
    assert len(nearest(index, index.image_embeddings[0], k=100)) == len(records)
    assert [c.index for c in nearest(index, index.image_embeddings[0], k=2, exclude=[0])][0] != 0
    with pytest.raises(UsageError, match="k must be"):
        nearest(index, index.image_embeddings[0], k=0)
    with pytest.raises(UsageError, match="not a similar-case index"):
        load_index(tmp_path)
    with pytest.raises(InputError, match="stack"):
        run_sync(similar_iter(index, np.zeros((3, 20, 20), np.uint8)))
