"""What every registered network promises: any input size, 1 or 3 channels, any class count, batches."""

from __future__ import annotations

import pytest
import torch

from medseg import models
from medseg.errors import UsageError

NETWORKS = models.names()


def test_the_paper_networks_are_registered():
    assert {"dcaunet", "tcsaformer", "medformer", "mslaunet", "unet"} <= set(NETWORKS)
    for name in NETWORKS:
        card = models.card(name)
        assert card.title and card.paper and set(card.configs) == {"small", "full"}


@pytest.mark.parametrize("name", NETWORKS)
def test_odd_sizes_grey_input_and_batches(name):
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rgb = models.build(name, in_channels=3, num_classes=2, config="small").eval()
        grey = models.build(name, in_channels=1, num_classes=5, config="small").eval()
        with torch.no_grad():
            assert rgb(torch.randn(1, 3, 300, 260)).shape == (1, 2, 300, 260)
            assert grey(torch.randn(2, 1, 45, 33)).shape == (2, 5, 45, 33)
            batch = torch.randn(3, 3, 64, 96)
            out = rgb(batch)
            assert out.shape == (3, 2, 64, 96)
            torch.testing.assert_close(out[1:2], rgb(batch[1:2]), atol=1e-4, rtol=1e-4)  # batch mates do not interact
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kwargs, message", [({"config": "huge"}, "no config"), ({"in_channels": 2}, "input channels"), ({"num_classes": 0}, "at least 1")])
def test_bad_build_arguments_are_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        models.build("mslaunet", **kwargs)


def test_unknown_architecture_names_the_choices():
    with pytest.raises(UsageError, match="mslaunet"):
        models.build("resnet")
