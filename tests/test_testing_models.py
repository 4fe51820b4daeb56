"""Checks that the tiny random-weight models of course_lib.testing behave like their real families."""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import transformers

from course_lib.testing import FAMILY_OF, SINGLE_TOKEN_WORDS, TINY_MODEL_NAMES, tiny_model

MASK_FILLERS = [name for name in TINY_MODEL_NAMES if FAMILY_OF[name] != "causal"]
CAUSAL = [name for name in TINY_MODEL_NAMES if FAMILY_OF[name] == "causal"]
SENTENCE = "Dante was born in Florence, Italy."


def leading_space(name: str) -> str:
    """BERT's pre-tokenizer drops spaces; every other tokenizer marks word starts with one."""
    return "" if name == "tiny-bert" else " "


def state_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if anything reaches for the Hugging Face hub."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tiny models must build without network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", TINY_MODEL_NAMES)
def test_builds_quickly_in_eval_mode(name: str) -> None:
    start = time.perf_counter()
    model, tokenizer = tiny_model(name)
    assert time.perf_counter() - start < 5.0
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"
    assert tokenizer.pad_token_id is not None
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.vocab_size == len(tokenizer)


@pytest.mark.parametrize("name", TINY_MODEL_NAMES)
def test_tokenizer_round_trips(name: str) -> None:
    _, tokenizer = tiny_model(name)
    ids = tokenizer(SENTENCE)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == SENTENCE


@pytest.mark.parametrize("name", TINY_MODEL_NAMES)
def test_corpus_words_are_single_tokens_and_rare_words_split(name: str) -> None:
    _, tokenizer = tiny_model(name)
    prefix = leading_space(name)

    def pieces(word: str) -> list[int]:
        return tokenizer(prefix + word, add_special_tokens=False)["input_ids"]

    assert [word for word in SINGLE_TOKEN_WORDS if len(pieces(word)) != 1] == []
    assert len(pieces("Kaliningrad")) > 2


@pytest.mark.parametrize(
    ("name", "first_token"),
    [
        ("tiny-bert", "[CLS]"),
        ("tiny-roberta", "<s>"),
        ("tiny-bart", "<s>"),
        ("tiny-gpt2", "Paris"),
        ("tiny-llama", "<s>"),
        ("tiny-gemma3", "<bos>"),
    ],
)
def test_special_tokens_match_the_real_families(name: str, first_token: str) -> None:
    _, tokenizer = tiny_model(name)
    ids = tokenizer("Paris is in France.")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids[0]) == first_token


@pytest.mark.parametrize("name", ["tiny-roberta", "tiny-bart"])
def test_roberta_mask_absorbs_the_preceding_space(name: str) -> None:
    _, tokenizer = tiny_model(name)
    ids = tokenizer(f"Dante was born in {tokenizer.mask_token}.")["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[-4:] == ["Ġin", "<mask>", ".", "</s>"]


def test_gemma_distinguishes_word_initial_space() -> None:
    _, tokenizer = tiny_model("tiny-gemma3")
    with_space = tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    without = tokenizer("Paris", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(with_space) == ["▁Paris"]
    assert with_space != without


@pytest.mark.parametrize("name", MASK_FILLERS)
def test_fill_mask_pipeline_runs(name: str) -> None:
    model, tokenizer = tiny_model(name)
    fill_mask = transformers.pipeline("fill-mask", model=model, tokenizer=tokenizer)
    predictions = fill_mask(f"Dante was born in {tokenizer.mask_token}.", top_k=3)
    assert len(predictions) == 3
    assert all(prediction["sequence"].startswith("Dante was born in") for prediction in predictions)
    assert sum(prediction["score"] for prediction in predictions) <= 1.0


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_forward_pass(name: str) -> None:
    model, tokenizer = tiny_model(name)
    batch = tokenizer(SENTENCE, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", TINY_MODEL_NAMES)
def test_right_padding_leaves_real_positions_unchanged(name: str) -> None:
    model, tokenizer = tiny_model(name)
    tokenizer.padding_side = "right"
    # The long sentence outruns Gemma's 4-token sliding window.
    sentences = [SENTENCE, "Paris is the capital of France and a city in Europe on the Seine."]
    batch = tokenizer(sentences, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        batched = model(**batch).logits
        for row, sentence in enumerate(sentences):
            alone = tokenizer(sentence, return_tensors="pt")
            length = alone["input_ids"].shape[1]
            torch.testing.assert_close(batched[row, :length], model(**alone).logits[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", [name for name in TINY_MODEL_NAMES if FAMILY_OF[name] != "seq2seq"])
def test_input_embeddings_reproduce_token_ids(name: str) -> None:
    """Soft prompts go through get_input_embeddings(); for Gemma that includes the sqrt(hidden) scale."""
    model, tokenizer = tiny_model(name)
    ids = tokenizer(SENTENCE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        from_ids = model(input_ids=ids).logits
        from_embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    torch.testing.assert_close(from_embeds, from_ids)


def test_gemma_scales_its_embeddings() -> None:
    model, tokenizer = tiny_model("tiny-gemma3")
    ids = tokenizer(SENTENCE, return_tensors="pt")["input_ids"]
    embedding = model.get_input_embeddings()
    torch.testing.assert_close(embedding(ids), embedding.weight[ids] * math.sqrt(model.config.hidden_size))


@pytest.mark.parametrize("name", TINY_MODEL_NAMES)
def test_seed_determines_weights(name: str) -> None:
    rng_before = torch.random.get_rng_state()
    first = state_digest(tiny_model(name, seed=0)[0])
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert state_digest(tiny_model(name, seed=0)[0]) == first
    assert state_digest(tiny_model(name, seed=1)[0]) != first


def test_tokenizer_copies_are_independent() -> None:
    _, tokenizer = tiny_model("tiny-gpt2")
    tokenizer.padding_side = "left"
    assert tiny_model("tiny-gpt2")[1].padding_side == "right"


def test_unknown_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="tiny-bert"):
        tiny_model("tiny-t5")


def fingerprints(seed: int) -> dict[str, str]:
    """Per tiny model, its serialized tokenizer and a digest of its weights."""
    built = {name: tiny_model(name, seed=seed) for name in TINY_MODEL_NAMES}
    return {
        name: tokenizer.backend_tokenizer.to_str() + state_digest(model)
        for name, (model, tokenizer) in built.items()
    }


def test_vocabularies_and_weights_are_identical_across_processes() -> None:
    """Hash-ordered containers (Python's or the tokenizers library's) would differ between processes."""
    script = (
        "import json, sys\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from test_testing_models import fingerprints\n"
        "print(json.dumps(fingerprints(seed=7)))\n"
    )
    other_process = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        # The repository root, so the child imports the same course_lib.
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert json.loads(other_process.stdout) == fingerprints(seed=7)
