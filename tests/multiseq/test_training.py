"""The MyoPS training loop on real slices (tiny budget): a cancelled run resumes to exactly the weights of an
uninterrupted one, the pack records its sequences and classes, and a further schedule records where it
started. Skips without ../shared/data/myops."""

from __future__ import annotations

import pytest
import torch

from medseg.engine import CancelToken, run_sync
from medseg.errors import Cancelled, UsageError
from medseg.train.multiseq import MYOPS_CLASSES, MultiseqConfig, train_iter
from medseg.train.packs import load_pack
from tests.conftest import data_dir


def config(tmp_path, run, **kw) -> MultiseqConfig:
    return MultiseqConfig(data_root=str(data_dir("myops")), steps=2, batch_size=2, size=64, spacing_mm=3.0, train_limit=1,
                          evaluate=False, workdir=str(tmp_path), run=run, ckpt_every=1, **kw)


def test_resume_equals_an_uninterrupted_run_and_the_pack_records_its_inputs(tmp_path):
    straight = run_sync(train_iter(config(tmp_path, "a")))
    cancel_token = CancelToken()
    job = train_iter(config(tmp_path, "b"), cancel=cancel_token)
    next(job)  # preparing is silent: the first event comes after step 1
    cancel_token.cancel()
    with pytest.raises(Cancelled, match="resume"):
        next(job)
    resumed = run_sync(train_iter(config(tmp_path, "b", resume=True)))
    a, b = load_pack(straight.pack_path), load_pack(resumed.pack_path)
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key
    assert a.manifest["sequences"] == ["C0", "LGE", "T2"] and [c.value for c in a.classes] == [c.value for c in MYOPS_CLASSES]
    assert a.manifest["training"]["validation_subjects"] == [105, 107, 110, 116, 124]
    assert not set(a.manifest["training"]["train_subjects"]) & {105, 107, 110, 116, 124}
    assert a.manifest["training"]["device"] == ("cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(0))

    further = run_sync(train_iter(config(tmp_path, "c", init_from=str(straight.pack_path), seed=5)))
    assert load_pack(further.pack_path).manifest["training"]["init_from"]["sha256"] == a.sha256


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_asking_for_a_gpu_that_is_not_there_is_one_sentence(tmp_path, capsys):
    with pytest.raises(UsageError, match="no CUDA GPU is available"):
        run_sync(train_iter(config(tmp_path, "gpu", device="cuda")))
    from medseg.train.multiseq import main

    assert main(["--data-root", str(data_dir("myops")), "--device", "cuda", "--steps", "1", "--workdir", str(tmp_path), "--run", "gpu-cli"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU is available" in err and len(err.strip().splitlines()) == 1
