"""course_lib.models: model copies the chapters use as controls."""

from __future__ import annotations

import pytest
import torch

from course_lib.models import load_model, with_random_weights
from course_lib.testing import FAMILY_OF

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-bart", "tiny-gpt2"])
def test_with_random_weights_keeps_the_architecture_and_redraws_every_weight(name):
    lm = load_model(name, device="cpu", seed=0)
    rnd = with_random_weights(lm, seed=1)
    assert type(rnd.model) is type(lm.model) and rnd.family is lm.family and rnd.tokenizer is lm.tokenizer
    assert rnd.name == f"{name}-random" and "seed 1" in rnd.revision
    mine, theirs = dict(lm.model.named_parameters()), dict(rnd.model.named_parameters())
    assert mine.keys() == theirs.keys()
    # every weight matrix differs (norm layers may start at the same constants in both)
    matrices = [k for k, v in mine.items() if v.dim() == 2]
    assert matrices and all(not torch.equal(mine[k], theirs[k]) for k in matrices)
    assert all(not p.requires_grad for p in rnd.model.parameters())
    again = with_random_weights(lm, seed=1)
    assert all(torch.equal(theirs[k], v) for k, v in again.model.named_parameters())
    assert FAMILY_OF[name] == rnd.family.value
