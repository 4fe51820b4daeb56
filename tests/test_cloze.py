"""course_lib.cloze: the blank's scores agree with the stock transformers computation, family by family.

The reference for masked LMs and BART is transformers' own fill-mask pipeline on the filled-in
sentence; for causal LMs it is a plain, unpadded forward pass over the sentence cut before [Y].
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers

from course_lib.cloze import ClozeLM, Family
from course_lib.data import Fact
from course_lib.evaluation import DropReason, score_facts
from course_lib.models import load_model
from course_lib.templates import Template
from course_lib.testing import FAMILY_OF, TINY_MODEL_NAMES

MASK_FILLERS = [n for n in TINY_MODEL_NAMES if FAMILY_OF[n] != "causal"]  # tiny-bert, tiny-roberta, tiny-bart
CAUSAL = [n for n in TINY_MODEL_NAMES if FAMILY_OF[n] == "causal"]  # tiny-gpt2, tiny-llama, tiny-gemma3

BORN = Template("[X] was born in [Y] .")
CAPITAL_FIRST = Template("[Y] is the capital of [X] .")

# Different templates and subjects of different lengths, so that one batch needs padding.
MASKED_PAIRS = [
    ("[X] was born in [Y] .", "Dante"),
    ("The native language of [X] is [Y] .", "Victor Hugo"),
    ("[Y] is the capital of [X] .", "Italy"),
    ("[X] works in the field of [Y].", "Marie Curie"),
    ("[X] was born in [Y] .", "Kaliningrad Oblast of the Russian Federation"),
]
CAUSAL_PAIRS = [
    ("[X] was born in [Y] .", "Dante"),
    ("The native language of [X] is [Y] .", "Victor Hugo"),
    ("The capital of [X] is [Y] .", "Italy"),
    ("[X] works in the field of [Y].", "Marie Curie"),
    ("[X] was born in [Y] .", "Kaliningrad Oblast of the Russian Federation"),
]

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def lm_for(name: str) -> ClozeLM:
    return load_model(name, device="cpu")


def batch_of(lm: ClozeLM, pairs: list[tuple[str, str]]):
    templates = list(dict.fromkeys(Template(t) for t, _ in pairs))
    prompts = [lm.encode_prompt(t) for t in templates]
    index = [templates.index(Template(t)) for t, _ in pairs]
    return lm.build_batch(prompts, [s for _, s in pairs], index)


def prompt_tokens_read(lm: ClozeLM, prompt) -> int:
    """How many of the prompt's own tokens the model reads: a causal LM stops at the blank."""
    kinds = [kind for kind, _ in prompt.pieces]
    read = prompt.pieces[: kinds.index("blank")] if lm.family is Family.CAUSAL else prompt.pieces
    return sum(len(toks) for kind, toks in read if kind == "text")


def unpadded(batch, b: int) -> list[int]:
    return batch.input_ids[b, batch.attention_mask[b].bool()].tolist()


# --------------------------------------------------------------------------------------------
# parity with transformers


@pytest.mark.parametrize("name", MASK_FILLERS)
def test_masked_and_seq2seq_match_the_fill_mask_pipeline(name):
    lm = lm_for(name)
    tok = lm.tokenizer
    batch = batch_of(lm, MASKED_PAIRS)
    assert batch.attention_mask.sum(1).unique().numel() > 2  # really padded
    got = lm.blank_log_probs(batch)
    assert got.shape == (len(MASKED_PAIRS), lm.vocab_size)
    fill_mask = transformers.pipeline("fill-mask", model=lm.model, tokenizer=tok, device="cpu")
    for b, (template, subject) in enumerate(MASKED_PAIRS):
        # RoBERTa's and BART's <mask> absorbs the space before it (lstrip), as the adapter expects
        text = Template(template).fill(subject).replace("[Y]", tok.mask_token)
        assert unpadded(batch, b) == tok(text)["input_ids"], text
        assert batch.input_ids[b, batch.read_index[b]] == tok.mask_token_id
        out = fill_mask(text, top_k=lm.vocab_size)
        assert len(out) == lm.vocab_size
        ref = torch.full((lm.vocab_size,), float("nan"))
        for d in out:
            ref[d["token"]] = torch.tensor(d["score"], dtype=torch.float64).log().float()
        assert not ref.isnan().any()
        torch.testing.assert_close(got[b], ref, atol=1e-5, rtol=0, msg=lambda m: f"{name} {text!r}: {m}")


@pytest.mark.parametrize("name", MASK_FILLERS)
def test_masked_matches_pipeline_targets(name):
    """The same agreement read through the pipeline's `targets`, for answers spelled as the adapter spells them."""
    lm = lm_for(name)
    fill_mask = transformers.pipeline("fill-mask", model=lm.model, tokenizer=lm.tokenizer, device="cpu")
    batch = lm.build_batch([lm.encode_prompt(BORN)], ["Dante"])
    logp = lm.blank_log_probs(batch)[0]
    words = ["Florence", "Paris", "Italy"]
    ids = [lm.answer_id(w, BORN) for w in words]
    assert None not in ids
    targets = [lm.tokenizer.convert_ids_to_tokens(i) for i in ids]
    out = fill_mask(BORN.fill("Dante").replace("[Y]", lm.tokenizer.mask_token), targets=targets)
    for d in out:
        assert logp[d["token"]].item() == pytest.approx(torch.tensor(d["score"]).log().item(), abs=1e-5)
    assert {d["token"] for d in out} == set(ids)


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_matches_an_unpadded_forward_pass(name):
    lm = lm_for(name)
    tok = lm.tokenizer
    batch = batch_of(lm, CAUSAL_PAIRS)
    lengths = batch.attention_mask.sum(1)
    assert lengths.unique().numel() > 2  # really padded
    got = lm.blank_log_probs(batch)
    for b, (template, subject) in enumerate(CAUSAL_PAIRS):
        t = Template(template)
        # the adapter's tokens: special prefix, then each piece up to the blank
        p = lm.encode_prompt(t)
        ids = list(lm._special_prefix)
        for kind, toks in p.pieces:
            if kind == "blank":
                break
            ids += lm.subject_ids(subject, p) if kind == "subject" else list(toks)
        assert unpadded(batch, b) == ids
        # ... which for these templates is also how the tokenizer spells the whole prefix
        sentence = t.fill(subject).split("[Y]")[0].rstrip()
        assert ids == tok(sentence)["input_ids"], sentence
        assert batch.read_index[b] == lengths[b] - 1
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
        ref = torch.log_softmax(logits.float(), dim=-1)
        torch.testing.assert_close(got[b], ref, atol=1e-5, rtol=0, msg=lambda m: f"{name} {sentence!r}: {m}")


@pytest.mark.parametrize("name", TINY_MODEL_NAMES)
def test_text_after_the_blank_matters_only_to_bidirectional_models(name):
    lm = lm_for(name)
    a, b = Template("[X] was born in [Y] ."), Template("[X] was born in [Y] , Italy .")
    logp = lm.blank_log_probs(lm.build_batch([lm.encode_prompt(a), lm.encode_prompt(b)], ["Dante"] * 2, [0, 1]))
    same = torch.allclose(logp[0], logp[1], atol=1e-5)
    assert same == (lm.family is Family.CAUSAL)


# --------------------------------------------------------------------------------------------
# mechanics


@pytest.mark.parametrize("name", TINY_MODEL_NAMES)
def test_only_the_blank_is_projected_onto_the_vocabulary(name):
    lm = lm_for(name)
    seen = []
    head = lm.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, args, out: seen.append((tuple(args[0].shape), tuple(out.shape))))
    try:
        batch = batch_of(lm, CAUSAL_PAIRS if lm.family is Family.CAUSAL else MASKED_PAIRS)
        logits = lm.blank_logits(batch)
    finally:
        handle.remove()
    B = len(batch)
    assert seen == [((B, 1, lm.hidden_size), (B, 1, lm.vocab_size))]
    assert logits.shape == (B, lm.vocab_size)
    # and nothing is left switched on: an ordinary forward pass afterwards projects every position
    with torch.no_grad():
        kwargs = {"decoder_input_ids": batch.decoder_input_ids} if lm.family is Family.SEQ2SEQ else {}
        full = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs).logits
    assert full.shape == (B, batch.input_ids.shape[1], lm.vocab_size)
    torch.testing.assert_close(full[torch.arange(B), batch.read_index].float(), logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-bart", "tiny-gemma3"])
def test_scoring_runs_without_autograd(name):
    lm = lm_for(name)
    grad_enabled = []
    handle = lm.model.register_forward_hook(lambda m, a, o: grad_enabled.append(torch.is_grad_enabled()))
    facts = [Fact("Dante", "Florence"), Fact("Victor Hugo", "Paris"), Fact("Goethe", "Germany")]
    try:
        assert torch.is_grad_enabled()
        scored = score_facts(lm, [BORN], facts, batch_size=2)
    finally:
        handle.remove()
    assert grad_enabled and not any(grad_enabled)
    assert torch.is_grad_enabled()  # restored afterwards
    assert scored.kept == 3
    assert not scored.ranks.requires_grad and scored.ranks.grad_fn is None
    assert not any(p.requires_grad for p in lm.model.parameters())


@pytest.mark.parametrize("name", TINY_MODEL_NAMES)
def test_covers(name):
    lm = lm_for(name)
    assert lm.covers(BORN)
    assert lm.covers(CAPITAL_FIRST) == (FAMILY_OF[name] != "causal")


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_lm_drops_every_fact_of_an_uncovered_template(name):
    lm = lm_for(name)
    facts = [Fact("Italy", "Rome"), Fact("France", "Paris"), Fact("Japan", "Tokyo")]
    scored = score_facts(lm, [CAPITAL_FIRST], facts)
    assert scored.kept == 0
    assert dict(scored.dropped) == {DropReason.UNCOVERED.value: 3}
    assert all(v != v for v in scored.metrics().values())  # NaN, not 0
    # in a mixture, the uncovered template is left out and the covered one decides alone
    covered = Template("The capital of [X] is [Y] .")
    both = score_facts(lm, [CAPITAL_FIRST, covered], facts)
    alone = score_facts(lm, [covered], facts)
    assert both.kept == alone.kept == 3 and not both.dropped
    assert torch.equal(both.ranks, alone.ranks)


@pytest.mark.parametrize("name", MASK_FILLERS)
def test_masked_lm_scores_a_blank_first_template(name):
    lm = lm_for(name)
    scored = score_facts(lm, [CAPITAL_FIRST], [Fact("Italy", "Rome"), Fact("France", "Paris")])
    assert scored.kept == 2 and not scored.dropped


@pytest.mark.parametrize("name", TINY_MODEL_NAMES)
def test_answer_id(name):
    lm = lm_for(name)
    tok = lm.tokenizer
    for word in ("Paris", "Florence", "English"):
        tid = lm.answer_id(word, BORN)
        assert tid is not None
        assert tok.decode([tid]).strip() == word
        assert lm.answer_ids(word, BORN) == (tid,)
    assert lm.answer_id("Kaliningrad", BORN) is None
    assert len(lm.answer_ids("Kaliningrad", BORN)) > 1
    # the answer is spelled as it fills the blank: after a space, or at the very start
    space = tok(" Paris", add_special_tokens=False)["input_ids"]
    start = tok("Paris", add_special_tokens=False)["input_ids"]
    assert [lm.answer_id("Paris", BORN)] == (start if name == "tiny-bert" else space)
    if lm.covers(CAPITAL_FIRST):
        assert [lm.answer_id("Paris", CAPITAL_FIRST)] == start


def test_answer_id_refuses_the_unknown_token():
    lm = lm_for("tiny-bert")
    assert lm.answer_ids("\u03a9", BORN) == (lm.tokenizer.unk_token_id,)
    assert lm.answer_id("\u03a9", BORN) is None


@pytest.mark.parametrize("name", TINY_MODEL_NAMES)
def test_overlong_subject_is_truncated_and_flagged(name):
    lm = lm_for(name)
    template = Template("The native language of [X] is [Y] .")
    prompt = lm.encode_prompt(template)
    long_subject = " ".join(["Victor", "Hugo"] + ["Dante"] * 700 + ["Marie", "Curie"])  # past the 512-token context
    batch = lm.build_batch([prompt], [long_subject, "Goethe"])
    assert batch.extras["truncated"].tolist() == [True, False]
    assert batch.input_ids.shape[1] <= 512
    logits = lm.blank_logits(batch)  # no index error from the position table
    assert torch.isfinite(logits).all()
    # the end of the subject is kept, and the prompt stays whole around it
    row = unpadded(batch, 0)
    subject = batch.input_ids[0, batch.subject_mask[0]].tolist()
    full = list(lm.subject_ids(long_subject, prompt))
    assert 400 < len(subject) < len(full) and subject == full[-len(subject):]
    assert row[: len(lm._special_prefix)] == list(lm._special_prefix)
    text = [toks for kind, toks in prompt.pieces if kind == "text"]
    assert row[len(lm._special_prefix): len(lm._special_prefix) + len(text[0])] == list(text[0])
    assert int((batch.prompt_slot[0] >= 0).sum()) == prompt_tokens_read(lm, prompt)


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2"])
def test_max_length_truncates_the_subject_only(name):
    lm = lm_for(name)
    prompt = lm.encode_prompt(BORN)
    batch = lm.build_batch([prompt], ["Victor Hugo", "Dante"], max_length=len(prompt.prompt_token_ids) + 5)
    assert batch.extras["truncated"].tolist() == [False, False]
    tight = lm.build_batch([prompt], ["Dante Victor Hugo Marie Curie Goethe", "Dante"],
                           max_length=len(prompt.prompt_token_ids) + 5)
    assert tight.extras["truncated"].tolist() == [True, False]
    assert int(tight.attention_mask[0].sum()) <= len(prompt.prompt_token_ids) + 5
    assert int((tight.prompt_slot[0] >= 0).sum()) == prompt_tokens_read(lm, prompt)


def test_several_prompts_need_an_index():
    lm = lm_for("tiny-bert")
    with pytest.raises(ValueError, match="prompt_index"):
        lm.build_batch([lm.encode_prompt(BORN), lm.encode_prompt(CAPITAL_FIRST)], ["Dante"])


def test_batch_bookkeeping():
    lm = lm_for("tiny-roberta")
    prompts = [lm.encode_prompt(BORN), lm.encode_prompt(CAPITAL_FIRST)]
    batch = lm.build_batch(prompts, ["Dante", "Italy"], [0, 1])
    T = batch.max_prompt_tokens
    assert T == max(p.n_prompt_tokens for p in prompts)
    assert batch.prompt_index.tolist() == [0, 1]
    for b, k in enumerate([0, 1]):
        slots = batch.prompt_slot[b]
        own = slots[slots >= 0]
        assert own.tolist() == [k * T + p for p in range(prompts[k].n_prompt_tokens)]
        assert batch.input_ids[b, slots >= 0].tolist() == list(prompts[k].prompt_token_ids)
        assert batch.input_ids[b, batch.subject_mask[b]].tolist() == list(lm.subject_ids(["Dante", "Italy"][b], prompts[k]))


# --------------------------------------------------------------------------------------------
# bfloat16 autocast

@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-bert"])
def test_bfloat16_autocast_runs_the_matmuls_in_bf16_and_keeps_scores_and_gradients(name):
    from course_lib.soft_prompts import SoftPrompt

    lm = lm_for(name)
    assert lm.autocast_dtype() is None  # automatic: GPUs only
    pairs = CAUSAL_PAIRS if lm.family is Family.CAUSAL else MASKED_PAIRS
    batch = batch_of(lm, pairs)
    full = lm.blank_log_probs(batch)
    seen: list[torch.dtype] = []
    linear = next(m for m in lm.model.modules() if isinstance(m, torch.nn.Linear))
    handle = linear.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    lm.autocast = True
    try:
        half = lm.blank_log_probs(batch)
        soft = SoftPrompt(lm, list(dict.fromkeys(Template(t) for t, _ in pairs)))
        with torch.no_grad():
            soft.offsets.normal_(0, 0.01)
        loss = -lm.blank_log_probs(soft.batch(lm, [s for _, s in pairs], batch.prompt_index.tolist()), soft.perturbation)[:, 0].sum()
        loss.backward()
    finally:
        lm.autocast = None
        handle.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert half.dtype == torch.float32
    # bf16 keeps about 3 significant digits: close to the fp32 scores, not equal to them.
    assert not torch.equal(half, full)
    torch.testing.assert_close(half, full, atol=0.15, rtol=0.05)
    assert soft.offsets.grad is not None and soft.offsets.grad.dtype == torch.float32
    assert torch.isfinite(soft.offsets.grad).all() and soft.offsets.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# unpadding

@pytest.mark.parametrize("name", TINY_MODEL_NAMES)
@pytest.mark.parametrize("depth", [0, "all"])
def test_unpadding_gives_the_padded_scores_likelihoods_and_gradients(name, depth):
    """The layers' linear maps skip padded positions: same numbers as the padded batch, less work."""
    from course_lib.soft_prompts import SoftPrompt

    lm = lm_for(name)
    pairs = CAUSAL_PAIRS if lm.family is Family.CAUSAL else MASKED_PAIRS
    templates = list(dict.fromkeys(Template(t) for t, _ in pairs))
    index = [templates.index(Template(t)) for t, _ in pairs]
    soft = SoftPrompt(lm, templates, depth)
    with torch.no_grad():
        soft.offsets.normal_(0, 0.05)
    batch = soft.batch(lm, [s for _, s in pairs], index)
    padding = 1 - batch.attention_mask.float().mean().item()
    assert padding >= lm.unpad_min_padding  # the case under test: enough padding to unpad
    lm._plain_head()  # its one-time probe sentence is not the batch under test
    rows: list[int] = []
    linear = lm._position_wise_modules()[0]
    handle = linear.register_forward_pre_hook(lambda mod, args: rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))

    def run(unpad: bool):
        lm.unpad, lm.reuse_prefix = unpad, False  # one pass per call: the rows it sees are the batch's
        soft.offsets.grad = None
        rows.clear()
        try:
            logp = lm.blank_log_probs(batch, soft.perturbation)
            subject_ll = lm.subject_log_likelihood(batch, soft.perturbation)
            (-logp.gather(1, torch.arange(len(pairs))[:, None]).sum() - subject_ll.sum()).backward()
        finally:
            lm.unpad, lm.reuse_prefix = True, True
        return logp.detach(), subject_ll.detach(), soft.offsets.grad.clone(), list(rows)

    try:  # the counting hook was registered after ClozeLM's: it sees what the linear map multiplies
        padded, unpadded = run(False), run(True)
    finally:
        handle.remove()
    torch.testing.assert_close(unpadded[0], padded[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(unpadded[1], padded[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(unpadded[2], padded[2], atol=1e-5, rtol=1e-3)
    assert padded[2].abs().sum() > 0
    real = int(batch.attention_mask.sum())
    assert set(padded[3]) == {batch.attention_mask.numel()}
    assert set(unpadded[3]) == {real}  # every pass through the layer saw the real positions only


def test_unpadding_stays_off_for_a_batch_with_little_padding():
    lm = lm_for("tiny-gpt2")
    batch = batch_of(lm, [("[X] was born in [Y] .", "Dante")] * 3)
    seen: list[int] = []
    linear = lm._position_wise_modules()[0]
    handle = linear.register_forward_hook(lambda mod, args, out: seen.append(args[0].dim()))
    try:
        lm.blank_logits(batch)
    finally:
        handle.remove()
    assert seen == [3]


# --------------------------------------------------------------------------------------------
# token_log_probs: one token's log-probability, without the [B, V] logits

@pytest.mark.parametrize("name", TINY_MODEL_NAMES)
def test_token_log_probs_match_blank_log_probs_values_and_gradients(name):
    from course_lib.soft_prompts import SoftPrompt

    lm = lm_for(name)
    assert lm._plain_head()  # stock tiny models: logits are the output layer's
    pairs = CAUSAL_PAIRS if lm.family is Family.CAUSAL else MASKED_PAIRS
    templates = list(dict.fromkeys(Template(t) for t, _ in pairs))
    soft = SoftPrompt(lm, templates, "all")
    with torch.no_grad():
        soft.offsets.normal_(0, 0.05)
    batch = soft.batch(lm, [s for _, s in pairs], [templates.index(Template(t)) for t, _ in pairs])
    targets = torch.arange(len(pairs)) * 7 + 3
    fast = lm.token_log_probs(batch, batch.read_index, targets, soft.perturbation)
    fast.sum().backward()
    fast_grad, soft.offsets.grad = soft.offsets.grad.clone(), None
    full = lm.blank_log_probs(batch, soft.perturbation).gather(1, targets[:, None]).squeeze(1)
    full.sum().backward()
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_grad, soft.offsets.grad, atol=1e-6, rtol=1e-4)
    assert fast_grad.abs().sum() > 0
    lm.vocab_one_pass = False  # the switch: logits and log_softmax, the same numbers
    try:
        torch.testing.assert_close(lm.token_log_probs(batch, batch.read_index, targets, soft.perturbation), full, atol=1e-5, rtol=1e-5)
    finally:
        lm.vocab_one_pass = True


def test_token_log_probs_take_the_models_logits_when_it_changes_them_after_the_output_layer():
    lm = load_model("tiny-bart", device="cpu")  # its own copy: the bias below must not leak
    with torch.no_grad():
        lm.model.final_logits_bias.normal_(0, 1)  # BART adds this after lm_head
    assert not lm._plain_head()
    batch = batch_of(lm, MASKED_PAIRS)
    targets = torch.arange(len(MASKED_PAIRS)) + 5
    want = lm.blank_log_probs(batch).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(lm.token_log_probs(batch, batch.read_index, targets), want)


# --------------------------------------------------------------------------------------------
# causal LMs: the part before the first prompt token runs once, without autograd

@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("depth", [0, "all"])
def test_reusing_the_prefix_gives_the_same_log_probs_and_gradients(name, depth):
    from course_lib.soft_prompts import SoftPrompt

    lm = lm_for(name)
    # subject-first and prompt-first templates, subjects of different lengths, each subject under
    # every template (a mixture's batch: K rows share one subject's prefix)
    templates = [Template("[X] was born in [Y] ."), Template("The capital of [X] is [Y] ."), Template("[X] works in the field of [Y].")]
    subjects = ["Dante", "Kaliningrad Oblast of the Russian Federation", "Marie Curie"]
    soft = SoftPrompt(lm, templates, depth)
    with torch.no_grad():
        soft.offsets.normal_(0, 0.05)
    batch = soft.batch(lm, [s for s in subjects for _ in templates], [k for _ in subjects for k in range(len(templates))])
    targets = torch.arange(len(batch)) * 5 + 2
    calls: list[int] = []
    handle = lm.model.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True)

    def run(reuse: bool):
        lm.reuse_prefix = reuse
        soft.offsets.grad = None
        calls.clear()
        try:
            logp = lm.token_log_probs(batch, batch.read_index, targets, soft.perturbation)
            logp.sum().backward()
        finally:
            lm.reuse_prefix = True
        return logp.detach(), soft.offsets.grad.clone(), list(calls)

    lm._plain_head()
    try:
        whole, split = run(False), run(True)
    finally:
        handle.remove()
    torch.testing.assert_close(split[0], whole[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split[1], whole[1], atol=1e-6, rtol=1e-4)
    assert whole[1].abs().sum() > 0
    assert whole[2] == [len(batch)]
    # one pass over the distinct prefixes (the 3 subjects after BOS, plus BOS alone for the
    # prompt-first template), then one over the rest of every row
    assert split[2] == [len(subjects) + 1, len(batch)]


def test_the_prefix_is_not_split_without_gradients_or_for_other_families():
    calls: list[int] = []
    for name in ("tiny-gpt2", "tiny-bert"):
        lm = lm_for(name)
        pairs = CAUSAL_PAIRS if lm.family is Family.CAUSAL else MASKED_PAIRS
        batch = batch_of(lm, pairs)
        lm._plain_head()
        handle = lm.model.register_forward_pre_hook(lambda mod, args: calls.append(1))
        try:
            with torch.no_grad():
                lm.token_log_probs(batch, batch.read_index, torch.zeros(len(pairs), dtype=torch.long))
        finally:
            handle.remove()
    assert calls == [1, 1]


@pytest.mark.parametrize("name", CAUSAL)
def test_scoring_k_prompts_runs_each_subjects_prefix_once(name):
    lm = lm_for(name)
    templates = [Template("[X] was born in [Y] ."), Template("[X] is a citizen of [Y] ."), Template("[X] works in the field of [Y].")]
    subjects = ["Kaliningrad Oblast of the Russian Federation", "Marie Curie"]
    prompts = [lm.encode_prompt(t) for t in templates]
    batch = lm.build_batch(prompts, [s for s in subjects for _ in templates], [k for _ in subjects for k in range(len(templates))])
    calls: list[int] = []
    handle = lm.model.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        with torch.no_grad():
            shared = lm.blank_logits(batch)
            lm.reuse_prefix = False
            whole = lm.blank_logits(batch)
    finally:
        lm.reuse_prefix = True
        handle.remove()
    torch.testing.assert_close(shared, whole, atol=1e-4, rtol=1e-4)
    assert calls == [len(subjects), len(batch), len(batch)]


# --------------------------------------------------------------------------------------------
# torch.compile (optional)

@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")  # raised inside torch.compile
def test_compiled_forward_passes_give_the_eager_scores():
    from course_lib.soft_prompts import SoftPrompt

    lm = load_model("tiny-gpt2", device="cpu")  # its own copy: compiling must not leak into other tests
    templates = [Template("[X] was born in [Y] ."), Template("The capital of [X] is [Y] .")]
    soft = SoftPrompt(lm, templates)
    with torch.no_grad():
        soft.offsets.normal_(0, 0.05)
    batches = [soft.batch(lm, ["Dante", "Marie Curie", "Kaliningrad Oblast"], [0, 1, 0]), soft.batch(lm, ["Paris", "Victor Hugo"], [1, 1])]
    with torch.no_grad():
        eager = [lm.blank_logits(b, soft.perturbation) for b in batches]
        lm.compile()
        compiled = [lm.blank_logits(b, soft.perturbation) for b in batches]  # two lengths: dynamic shapes
    assert lm.compiled is not None
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", TINY_MODEL_NAMES)
def test_model_inputs_give_the_stock_models_blank_logits(name):
    """What the chapters do by hand: the stock model on ``model_inputs(batch)``, read at ``read_index``."""
    lm = lm_for(name)
    batch = batch_of(lm, CAUSAL_PAIRS if FAMILY_OF[name] == "causal" else MASKED_PAIRS)
    with torch.no_grad():
        logits = lm.model(**lm.model_inputs(batch)).logits
        by_hand = logits[torch.arange(len(batch)), batch.read_index]
        library = lm.blank_logits(batch)
    torch.testing.assert_close(by_hand.float(), library, atol=1e-4, rtol=1e-4)
    assert ("decoder_input_ids" in lm.model_inputs(batch)) == (FAMILY_OF[name] == "seq2seq")


@pytest.mark.parametrize("name", TINY_MODEL_NAMES)
def test_row_modules_are_the_embedding_then_every_layer_in_order(name):
    lm = lm_for(name)
    assert all(isinstance(m, torch.nn.Embedding) for m, _ in lm.row_modules(0))
    layers = [m for row in range(1, lm.n_layers + 1) for m, _ in lm.row_modules(row)]
    assert len(layers) == lm.n_layers == len(set(map(id, layers)))
    # each row's module is called once per forward pass, in row order
    calls = []
    handles = [m.register_forward_hook(lambda mod, a, o, row=row: calls.append(row))
               for row in range(1, lm.n_layers + 1) for m, _ in lm.row_modules(row)]
    try:
        with torch.no_grad():
            lm.blank_logits(batch_of(lm, CAUSAL_PAIRS[:1]))
    finally:
        for h in handles:
            h.remove()
    assert calls == list(range(1, lm.n_layers + 1))


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-bart", "tiny-gemma3"])
def test_by_hand_under_autocast_context_agrees_within_the_chapters_tolerance(name):
    """The chapters' by-hand checks under bf16 autocast (what a GPU runs): notebook.tolerance covers them."""
    from course_lib.notebook import tolerance

    lm = load_model(name, device="cpu")
    lm.autocast = True  # forced on the CPU: the same casts as on a GPU
    batch = batch_of(lm, CAUSAL_PAIRS if FAMILY_OF[name] == "causal" else MASKED_PAIRS)
    with torch.no_grad(), lm.autocast_context():
        by_hand = lm.model(**lm.model_inputs(batch)).logits[torch.arange(len(batch)), batch.read_index].float()
    with torch.no_grad():
        library = lm.blank_logits(batch)
    assert tolerance(lm)["atol"] > 1e-2  # the loose rule applies
    torch.testing.assert_close(by_hand, library, **tolerance(lm))
    lm.autocast = False
    assert tolerance(lm)["atol"] < 1e-2
