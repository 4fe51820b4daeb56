"""course_lib.soft_prompts: zero offsets are the hard prompt, offsets touch only prompt tokens, only they learn.

Every tiny family is checked (masked, BART, causal), at every depth the library offers.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from course_lib.cloze import ClozeLM, Family, Stream
from course_lib.data import Fact
from course_lib.models import load_model
from course_lib.soft_prompts import (
    Read,
    SoftPrompt,
    calibrate_row_scale,
    embedding_stats,
    init_random,
    nearest_tokens,
    prompt_hidden_scale,
    resolve_depth,
)
from course_lib.templates import Template
from course_lib.testing import TINY_MODEL_NAMES
from course_lib.training import TuneConfig, tune

DEPTHS = (0, 1, "all")

# Subjects of different lengths and two templates per batch, so batches need padding and mix prompts.
MASKED_TEMPLATES = (Template("[X] was born in [Y] ."), Template("[Y] is the capital of [X] ."))
CAUSAL_TEMPLATES = (Template("[X] was born in [Y] ."), Template("The native language of [X] is [Y] ."))
SUBJECTS = ("Dante", "Victor Hugo", "Marie Curie of Kaliningrad")


@functools.cache
def lm_for(name: str) -> ClozeLM:
    return load_model(name, device="cpu")


def templates_for(lm: ClozeLM) -> tuple[Template, ...]:
    return CAUSAL_TEMPLATES if lm.family is Family.CAUSAL else MASKED_TEMPLATES


def mixed_batch(lm: ClozeLM, soft: SoftPrompt):
    """Every subject with every prompt of ``soft``: 2 prompts x 3 subjects, padded."""
    K = len(soft.prompts)
    return soft.batch(lm, [s for s in SUBJECTS for _ in range(K)], [k for _ in SUBJECTS for k in range(K)])


def stock_blank_logits(lm: ClozeLM, batch, b: int) -> torch.Tensor:
    """The blank's logits from the stock transformers forward pass on example b alone, unpadded."""
    ids = batch.input_ids[b, batch.attention_mask[b].bool()][None]
    with torch.no_grad():
        # No decoder_input_ids for BART: the model shifts its input right itself, as in pretraining.
        logits = lm.model(input_ids=ids).logits[0]
    return logits[-1] if lm.family is Family.CAUSAL else logits[int(batch.read_index[b])]


def fill_(soft: SoftPrompt, rows, scale: float = 1.0, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in rows:
            soft.offsets[:, r] = scale * torch.randn(soft.offsets[:, r].shape, generator=g)


# ---------------------------------------------------------------------------------------- structure
def test_bart_rows_cover_encoder_and_decoder() -> None:
    lm = lm_for("tiny-bart")
    cfg = lm.model.config
    assert lm.n_layers == cfg.encoder_layers + cfg.decoder_layers
    streams = [[s for _, s in row] for row in lm.hooked_rows]
    assert streams[0] == [Stream.INPUT, Stream.DECODER]
    assert streams[1 : 1 + cfg.encoder_layers] == [[Stream.INPUT]] * cfg.encoder_layers
    assert streams[1 + cfg.encoder_layers :] == [[Stream.DECODER]] * cfg.decoder_layers
    assert [m for m, _ in lm.hooked_rows[1 + cfg.encoder_layers]][0] is lm.model.get_decoder().layers[0]


@pytest.mark.parametrize("name", TINY_MODEL_NAMES)
def test_resolve_depth(name: str) -> None:
    lm = lm_for(name)
    assert resolve_depth("all", lm) == lm.n_layers
    assert resolve_depth(1, lm) == 1
    assert SoftPrompt(lm, templates_for(lm), "all").offsets.shape[1] == lm.n_layers + 1
    for bad in (-1, lm.n_layers + 1):
        with pytest.raises(ValueError, match="depth"):
            resolve_depth(bad, lm)


# ---------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", TINY_MODEL_NAMES)
def test_zero_offsets_are_the_hard_prompt(name: str) -> None:
    lm = lm_for(name)
    templates = templates_for(lm)
    for depth in DEPTHS:
        soft = SoftPrompt(lm, templates, depth)
        assert soft.offsets.shape[:2] == (2, resolve_depth(depth, lm) + 1)
        batch = mixed_batch(lm, soft)
        with torch.no_grad():
            plain = lm.blank_logits(batch)
            perturbed = lm.blank_logits(batch, soft.perturbation)
        torch.testing.assert_close(perturbed, plain, atol=1e-6, rtol=0)
    # And both agree with the stock model's own forward pass, one example, nothing of ours active.
    one = soft.batch(lm, [SUBJECTS[1]], [1])
    with torch.no_grad():
        mine = lm.blank_logits(one, soft.perturbation)[0]
    torch.testing.assert_close(mine, stock_blank_logits(lm, one, 0), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------- what offsets touch
@pytest.mark.parametrize("name", TINY_MODEL_NAMES)
def test_row0_offset_changes_the_logits(name: str) -> None:
    lm = lm_for(name)
    soft = SoftPrompt(lm, templates_for(lm), 0)
    batch = mixed_batch(lm, soft)
    with torch.no_grad():
        plain = lm.blank_logits(batch)
        fill_(soft, [0], scale=3.0)
        moved = lm.blank_logits(batch, soft.perturbation)
    # Every example has prompt tokens before its read position, so every row of logits moves.
    assert ((moved - plain).abs().amax(dim=1) > 1e-4).all()


def capture_outputs(lm: ClozeLM):
    """Forward hooks after the library's own: each hooked module's (perturbed) output, by (row, stream)."""
    seen: dict[tuple[int, Stream], torch.Tensor] = {}
    handles = []
    for row, modules in enumerate(lm.hooked_rows):
        for module, stream in modules:
            def hook(module, args, output, key=(row, stream)):
                seen[key] = (output[0] if isinstance(output, tuple) else output).detach().clone()
            handles.append(module.register_forward_hook(hook))
    return seen, handles


@pytest.mark.parametrize("read", list(Read))
@pytest.mark.parametrize("name", TINY_MODEL_NAMES)
def test_offsets_land_on_prompt_tokens_only_and_at_their_own_row(name: str, read: Read) -> None:
    """Row r alone non-zero: rows before r see nothing, row r's output moves by exactly the offsets
    at prompt-token positions and not at all at subject, blank, special or padding positions; with
    ``Read.FROZEN`` not at the read position either, even where it holds a prompt token."""
    lm = lm_for(name)
    soft = SoftPrompt(lm, templates_for(lm), "all", read=read)
    batch = mixed_batch(lm, soft)
    K, R, T, H = soft.offsets.shape
    seen, handles = capture_outputs(lm)
    try:
        with torch.no_grad():
            lm.blank_logits(batch)
            plain = dict(seen)
            for r in range(R):
                soft.offsets.zero_()
                fill_(soft, [r], seed=r)
                lm.blank_logits(batch, soft.perturbation)
                for (row, stream), out in seen.items():
                    diff = out - plain[(row, stream)]
                    if row < r:
                        assert diff.abs().max() == 0, (r, row, stream)
                    elif row == r:
                        slots = batch.slots(stream).clone()
                        if read is Read.FROZEN:
                            slots[torch.arange(len(batch)), batch.read_index] = -1
                        outside = slots < 0
                        assert outside.any() and (~outside).any()
                        assert diff[outside].abs().max() == 0, (r, stream)
                        expected = soft.offsets[:, r].reshape(K * T, H)[slots[~outside]]
                        torch.testing.assert_close(diff[~outside], expected, atol=1e-5, rtol=1e-5)
                        # The subject's tokens are never prompt tokens.
                        if stream is Stream.INPUT:
                            assert (slots[batch.subject_mask] == -1).all()
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("name", ["tiny-bart", "tiny-gpt2", "tiny-gemma3"])
def test_deep_rows_act_only_up_to_the_depth(name: str) -> None:
    lm = lm_for(name)
    templates = templates_for(lm)
    batch = mixed_batch(lm, SoftPrompt(lm, templates, 0))
    with torch.no_grad():
        plain = lm.blank_logits(batch)
    for depth in range(lm.n_layers + 1):
        soft = SoftPrompt(lm, templates, depth)
        applied = []
        original = soft.perturbation.delta

        def spy(row, stream, b, original=original):
            d = original(row, stream, b)
            if d is not None:
                applied.append(row)
            return d

        soft.perturbation.delta = spy
        with torch.no_grad():
            lm.blank_logits(batch, soft.perturbation)
        assert sorted(set(applied)) == list(range(depth + 1))
        # The deepest row alone (all earlier rows zero) still changes the answer, except the last
        # layer's output: no layer reads it any more, and at the read position itself it is frozen.
        fill_(soft, [depth], scale=3.0)
        with torch.no_grad():
            moved = lm.blank_logits(batch, soft.perturbation)
        assert bool((moved - plain).abs().max() > 1e-4) is (depth < lm.n_layers), depth


def test_padding_slots_of_a_shorter_prompt_are_never_used() -> None:
    """K prompts share one [K, rows, T, H] tensor; a prompt shorter than T must not read past its end."""
    lm = lm_for("tiny-gpt2")
    soft = SoftPrompt(lm, CAUSAL_TEMPLATES, 0)
    n0 = soft.prompts[0].n_prompt_tokens
    assert n0 < soft.offsets.shape[2]
    batch = mixed_batch(lm, soft)
    with torch.no_grad():
        before = lm.blank_logits(batch, soft.perturbation)
        soft.offsets[0, :, n0:] = 100.0
        after = lm.blank_logits(batch, soft.perturbation)
    torch.testing.assert_close(after, before, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", ["tiny-bert", "tiny-bart", "tiny-gemma3"])
@pytest.mark.parametrize("read", list(Read))
def test_gradients_reach_the_offsets_and_nothing_else(name: str, read: Read) -> None:
    lm = lm_for(name)
    soft = SoftPrompt(lm, templates_for(lm), "all", read=read)
    batch = mixed_batch(lm, soft)
    logp = lm.blank_log_probs(batch, soft.perturbation)
    logp[:, 7].sum().neg().backward()
    grad = soft.offsets.grad
    assert grad is not None and grad.abs().sum() > 0
    assert grad[:, 0].abs().sum() > 0 and grad[:, -2].abs().sum() > 0
    if lm.family is Family.MASKED or read is Read.FROZEN:
        # After the last layer only the read position is read: a mask, never a prompt token, or a
        # prompt token left unperturbed.
        assert grad[:, -1].abs().sum() == 0
    else:
        # The read position (a causal LM's last token; BART's decoder input at the blank) is the
        # prompt token before [Y], so even the last row reaches the answer.
        assert grad[:, -1].abs().sum() > 0
    # Offsets past a prompt's own tokens never reach the model, so they get no gradient.
    for k, p in enumerate(soft.prompts):
        assert grad[k, :, p.n_prompt_tokens :].abs().sum() == 0
    for pname, param in lm.model.named_parameters():
        assert not param.requires_grad, pname
        assert param.grad is None, pname


def test_tuning_leaves_the_model_bit_identical() -> None:
    lm = lm_for("tiny-gpt2")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    facts = [Fact(s, o) for s, o in [("Dante", "Italy"), ("Goethe", "Germany"), ("Victor Hugo", "France"),
                                     ("Shakespeare", "England"), ("Einstein", "Germany"), ("Newton", "England")]]
    result = tune(lm, [Template("[X] was born in [Y] .")], facts, facts[:3],
                  TuneConfig(epochs=2, lr=0.1, batch_size=4, depth="all"), progress=False)
    assert result.soft.offsets.abs().sum() > 0  # something was trained
    after = lm.model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert all(p.grad is None and not p.requires_grad for p in lm.model.parameters())


# ---------------------------------------------------------------------------------------- random init
def many_token_templates(n: int) -> list[Template]:
    words = "the capital of city is a country in river born language native works field was".split()
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        picks = [words[int(j)] for j in torch.randint(len(words), (60,), generator=g)]
        out.append(Template(f"{' '.join(picks[:30])} [X] {' '.join(picks[30:])} [Y] ."))
    return out


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-gemma3"])
def test_random_init_matches_the_embedding_statistics(name: str) -> None:
    lm = lm_for(name)
    soft = SoftPrompt(lm, many_token_templates(40), 0)
    init_random(soft, lm, torch.Generator().manual_seed(0))
    vectors = torch.cat([soft.input_vectors(lm, k) for k in range(len(soft.prompts))]).double()
    n = vectors.shape[0]
    assert n >= 2000
    mean, std = (t.double() for t in embedding_stats(lm))
    # z-test style bounds, per dimension: a 5-sigma miss in any of the dimensions fails.
    z_mean = (vectors.mean(0) - mean) / (std / math.sqrt(n))
    assert z_mean.abs().max() < 5, z_mean.abs().max()
    ratio = vectors.std(0) / std
    assert (ratio - 1).abs().max() < 5 / math.sqrt(2 * n), ratio
    # The draws replace the template's words: the vectors are not the words' own embeddings.
    own = torch.cat([lm.embedding_output(torch.tensor(p.prompt_token_ids)) for p in soft.prompts]).double()
    assert not torch.allclose(vectors, own, atol=1e-3)
    # Only row 0 is touched, and a new generator with the same seed draws the same vectors.
    again = SoftPrompt(lm, soft.templates, 0)
    init_random(again, lm, torch.Generator().manual_seed(0))
    assert torch.equal(again.offsets, soft.offsets)


def test_embedding_stats_are_measured_after_gemma_scaling() -> None:
    lm = lm_for("tiny-gemma3")
    emb = lm.model.get_input_embeddings()
    H = lm.hidden_size
    with torch.no_grad():
        direct = emb(torch.arange(emb.num_embeddings)).double()
    mean, std = embedding_stats(lm, chunk=100)  # chunks that do not divide the vocabulary
    torch.testing.assert_close(mean.double(), direct.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std.double(), direct.std(0, unbiased=False), atol=1e-5, rtol=1e-5)
    raw = emb.weight.detach().double()
    torch.testing.assert_close(std.double(), raw.std(0, unbiased=False) * math.sqrt(H), atol=1e-4, rtol=1e-4)
    assert std.mean() > 2 * raw.std(0).mean()  # the sqrt(32) factor is really there


def test_embedding_stats_of_an_unscaled_model_are_the_table_stats() -> None:
    lm = lm_for("tiny-gpt2")
    raw = lm.model.get_input_embeddings().weight.detach().double()
    mean, std = embedding_stats(lm)
    torch.testing.assert_close(mean.double(), raw.mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(std.double(), raw.std(0, unbiased=False), atol=1e-6, rtol=1e-5)


def test_template_init_vectors_are_the_templates_own_words() -> None:
    lm = lm_for("tiny-gpt2")
    soft = SoftPrompt(lm, [CAUSAL_TEMPLATES[1]], 0)
    ids = soft.prompts[0].prompt_token_ids
    torch.testing.assert_close(soft.input_vectors(lm), lm.embedding_output(torch.tensor(ids)), atol=0, rtol=0)
    nearest = nearest_tokens(lm, soft.input_vectors(lm), k=1)
    assert [row[0] for row in nearest] == [lm.tokenizer.decode([i]) for i in ids]


def test_nearest_tokens_in_chunks_match_the_whole_table() -> None:
    lm = lm_for("tiny-gemma3")
    vectors = torch.randn(6, lm.hidden_size, generator=torch.Generator().manual_seed(0)) * 5
    n = lm.model.get_input_embeddings().num_embeddings
    table = torch.nn.functional.normalize(lm.embedding_output(torch.arange(n)), dim=-1)
    expected = (torch.nn.functional.normalize(vectors, dim=-1) @ table.T).topk(5, dim=-1).indices
    want = [[lm.tokenizer.decode([int(i)]) for i in row] for row in expected]
    assert nearest_tokens(lm, vectors, k=5, chunk=7) == want  # chunks that do not divide the vocabulary
    assert nearest_tokens(lm, vectors, k=5, chunk=n) == want


# ---------------------------------------------------------------------------------------- the read position
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-gemma3", "tiny-bart"])
def test_a_frozen_read_position_takes_away_the_offset_at_the_position_read(name: str) -> None:
    """Causal LMs read at the last prompt word, BART's decoder at a position holding the word before the
    blank: with Read.TUNED an offset there moves the logits, with Read.FROZEN nothing does."""
    lm = lm_for(name)
    template = Template("The native language of [X] is [Y] .")
    subjects = ["Victor Hugo", "Dante"]
    for read in Read:
        soft = SoftPrompt(lm, [template], "all", read=read)
        batch = soft.batch(lm, subjects, [0, 0])
        stream = Stream.DECODER if lm.family is Family.SEQ2SEQ else Stream.INPUT
        slot_at_read = batch.slots(stream)[torch.arange(2), batch.read_index]
        assert (slot_at_read >= 0).all(), "the read position holds a prompt token in this family"
        with torch.no_grad():
            plain = lm.blank_logits(batch)
            # an offset on the read position's token only, at the last row (its final hidden state);
            # random, since a final LayerNorm would remove a constant one
            soft.offsets[0, -1, int(slot_at_read[0])] = 5.0 * torch.randn(lm.hidden_size)
            moved = lm.blank_logits(batch, soft.perturbation)
        changed = bool((moved - plain).abs().max() > 1e-3)
        assert changed is (read is Read.TUNED), (read, changed)


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-roberta"])
def test_a_masked_lms_read_position_is_never_a_prompt_token(name: str) -> None:
    lm = lm_for(name)
    soft = SoftPrompt(lm, templates_for(lm), "all")
    batch = mixed_batch(lm, soft)
    assert (batch.prompt_slot[torch.arange(len(batch)), batch.read_index] == -1).all()


# ---------------------------------------------------------------------------------------- deep offsets' units
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-bert", "tiny-bart"])
def test_row_scale_is_the_prompts_typical_coordinate_per_row_relative_to_the_input(name: str) -> None:
    lm = lm_for(name)
    soft = SoftPrompt(lm, templates_for(lm)[:1], "all")
    subjects = ["Dante", "Victor Hugo", "Marie Curie"]
    # by hand: record every row's output at the prompt positions
    batch = soft.batch(lm, subjects, [0] * 3)
    seen, handles = capture_outputs(lm)
    try:
        with torch.no_grad():
            lm.blank_logits(batch)
    finally:
        for h in handles:
            h.remove()
    by_hand = []
    for row in range(soft.perturbation.n_rows):
        picked = torch.cat([seen[(row, stream)][batch.slots(stream) >= 0] for _, stream in lm.row_modules(row)])
        by_hand.append(float(picked.abs().flatten().median()))
    torch.testing.assert_close(prompt_hidden_scale(lm, soft, subjects), torch.tensor(by_hand), rtol=1e-5, atol=0)
    scale = calibrate_row_scale(lm, soft, subjects)
    assert float(scale[0]) == pytest.approx(1.0) and torch.equal(soft.perturbation.row_scale, scale)
    # an offset of 1 in row r's units moves that row's output by row_scale[r]
    r = soft.perturbation.n_rows - 1
    with torch.no_grad():
        soft.offsets.zero_()
        soft.offsets[0, r] = 1.0
        assert soft.perturbation.delta(r, lm.row_modules(r)[0][1], batch).abs().max() == pytest.approx(float(scale[r]))


def test_deep_tuning_calibrates_row_scale_and_shallow_tuning_does_not() -> None:
    lm = lm_for("tiny-gpt2")
    facts = [Fact("Dante", "Italian"), Fact("Victor Hugo", "French"), Fact("Goethe", "German")] * 3
    template = Template("The native language of [X] is [Y] .")
    deep = tune(lm, [template], facts, facts, TuneConfig(depth="all", epochs=1, lr=1e-3), progress=False)
    shallow = tune(lm, [template], facts, facts, TuneConfig(depth=0, epochs=1, lr=1e-3), progress=False)
    flat = tune(lm, [template], facts, facts, TuneConfig(depth="all", epochs=1, lr=1e-3, row_scaling=False), progress=False)
    assert not torch.equal(deep.soft.perturbation.row_scale, torch.ones_like(deep.soft.perturbation.row_scale))
    assert torch.equal(shallow.soft.perturbation.row_scale, torch.ones(1))
    assert torch.equal(flat.soft.perturbation.row_scale, torch.ones_like(flat.soft.perturbation.row_scale))
