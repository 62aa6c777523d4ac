"""Reports as sentences, the batches of an epoch and patient-level folds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.pretrain.data import PairRecord, epoch_batches, holdout_groups, patient_folds, square_image
from medseg.pretrain.text import Vocabulary, encode_reports, has_sentences, split_sentences


def test_sentences_split_on_bullets_and_periods_keeping_decimals():
    text = "1. Fever of 38.5 C. 2. Bilateral ground-glass opacities.  A. \nRight effusion?"
    assert split_sentences(text) == [["fever", "of", "38", "5", "c"], ["bilateral", "ground", "glass", "opacities"], ["right", "effusion"]]
    assert not has_sentences("Ok.") and has_sentences("Small left effusion.")


def test_words_carry_their_sentence_index():
    vocab = Vocabulary.build(["left effusion. right lung clear."])
    enc = encode_reports(["left effusion. right lung clear.", "unknown words here"], vocab)
    lookup = vocab.index()
    assert enc.ids[0, :7].tolist() == [lookup["[CLS]"], lookup["left"], lookup["effusion"], lookup["right"], lookup["lung"], lookup["clear"], lookup["[SEP]"]]
    assert enc.sentence[0, :7].tolist() == [0, 1, 1, 2, 2, 2, 0]
    assert enc.n_sentences.tolist() == [2, 1] and set(enc.ids[1, 1:4].tolist()) == {lookup["[UNK]"]}


def test_an_epoch_takes_one_image_per_report_and_is_reproducible():
    texts = ["a"] * 5 + ["b"] * 3 + [f"t{i}" for i in range(9)]
    batches = epoch_batches(texts, 4, seed=1, epoch=3)
    picked = np.concatenate(batches)
    assert len(picked) == 11 and len({texts[i] for i in picked}) == 11  # 11 distinct reports, each once
    assert all(len(b) >= 2 for b in batches)
    assert [b.tolist() for b in batches] == [b.tolist() for b in epoch_batches(texts, 4, seed=1, epoch=3)]
    assert [b.tolist() for b in batches] != [b.tolist() for b in epoch_batches(texts, 4, seed=1, epoch=4)]


def test_patient_folds_keep_each_patient_in_one_fold():
    records = [PairRecord(Path(f"{i}.png"), "x", f"p{i % 7}") for i in range(40)]
    folds = patient_folds(records, 5)
    assert sorted(np.concatenate(folds).tolist()) == list(range(40))
    owner = {}
    for f, idx in enumerate(folds):
        for i in idx:
            assert owner.setdefault(records[i].group, f) == f
    held = holdout_groups(records, 0.3)
    assert held and len(held) < 7


def test_square_image_pads_and_crops_regions():
    image = np.zeros((20, 40), np.uint8)
    image[:, 20:] = 200
    square = square_image(image, False, 16)
    assert square.shape == (16, 16) and square[:4].max() == 0 and square[4:12, 12:].min() > 150  # centred, zero padding above and below
    region = square_image(image, False, 16, region=(0, 20, 20, 40))
    assert region[region > 0].min() > 150 and (region > 0).sum() == 16 * 16  # the bright half fills the square
