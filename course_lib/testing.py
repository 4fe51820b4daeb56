"""Tiny random-weight models for unit tests.

Every model here is built from a config and every tokenizer is trained offline on
:data:`CORPUS`, so tests never touch the Hugging Face hub.  The weights are random:
these models exercise *mechanics* (tokenization, masking, batching, scoring), never
knowledge.  ``tiny_model(name, seed)`` is deterministic given ``seed``.

Tokenization contract: every word of :data:`SINGLE_TOKEN_WORDS` is one token in
the form a cloze prompt uses it ("Paris" for BERT, " Paris" with its leading space
for the BPE and metaspace tokenizers), while a word absent from :data:`CORPUS`,
such as "Kaliningrad", splits into several pieces.
"""

from __future__ import annotations

import copy
import functools
import json
import string
from typing import Literal

import torch
import transformers
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers

Family = Literal["masked", "seq2seq", "causal"]

FAMILY_OF: dict[str, Family] = {
    "tiny-bert": "masked",
    "tiny-roberta": "masked",
    "tiny-bart": "seq2seq",
    "tiny-gpt2": "causal",
    "tiny-llama": "causal",
    "tiny-gemma3": "causal",
}
TINY_MODEL_NAMES: tuple[str, ...] = tuple(FAMILY_OF)

# Fact-like sentences in the style of LAMA templates, repeated enough that their
# words win BPE merges, plus lowercase variants and filler so that common
# function words and punctuation are also learned.
CORPUS: tuple[str, ...] = (
    "Dante was born in Florence.",
    "Dante was born in Florence, a city in Italy.",
    "Florence is a city in Italy.",
    "The poet Dante lived in Florence.",
    "The capital of Italy is Rome.",
    "The capital of France is Paris.",
    "The capital of Germany is Berlin.",
    "The capital of Japan is Tokyo.",
    "The capital of England is London.",
    "The capital of Spain is Madrid.",
    "Paris is the capital of France.",
    "Rome is the capital of Italy.",
    "Berlin is the capital of Germany.",
    "Tokyo is the capital of Japan.",
    "London is the capital of England.",
    "Madrid is the capital of Spain.",
    "Paris is a city in France.",
    "Rome is a city in Italy.",
    "Berlin is a city in Germany.",
    "Tokyo is a city in Japan.",
    "London is a city in England.",
    "The native language of Dante is Italian.",
    "The native language of Victor Hugo is French.",
    "The native language of Goethe is German.",
    "The native language of Shakespeare is English.",
    "The official language of France is French.",
    "The official language of Germany is German.",
    "The official language of Japan is Japanese.",
    "The official language of Spain is Spanish.",
    "People in London speak English.",
    "People in Paris speak French.",
    "People in Tokyo speak Japanese.",
    "Victor Hugo was born in France.",
    "Goethe was born in Germany.",
    "Shakespeare was born in England.",
    "Einstein was born in Germany.",
    "Marie Curie was born in Poland.",
    "Einstein works in the field of physics.",
    "Marie Curie works in the field of chemistry.",
    "Newton works in the field of physics.",
    "Gauss works in the field of mathematics.",
    "Newton was born in England.",
    "The works of Dante are written in Italian.",
    "The Tiber is a river in Rome.",
    "The Seine is a river in Paris.",
    "The Thames is a river in London.",
    "Microsoft was founded in the United States.",
    "Google was founded by Larry Page.",
    "Windows was developed by Microsoft.",
    "Android was developed by Google.",
    "Miles Davis plays the trumpet.",
    "Glenn Gould plays the piano.",
    "Jimi Hendrix plays the guitar.",
    "Italy is a country in Europe.",
    "France is a country in Europe.",
    "Japan is a country in Asia.",
    "He is a citizen of Italy.",
    "She is a member of the party.",
    "dante was born in florence, italy.",
    "paris is the capital of france.",
    "rome, berlin, tokyo and london are cities.",
    "english, french, german and italian are languages.",
    "the city of paris is in france.",
    "physics is a field of science.",
    "It was a cold day and the city was quiet.",
    "The book is on the table in the old house.",
    "A man and a woman walk to the market.",
    "We like to read about history and art.",
    "They said that the new road is long.",
    "There is a small cat in the garden.",
    "The weather in the north is cold.",
    "1 2 3 4 5 6 7 8 9 10 100 1000 2021",
    "Who? What? Where: here; (there) - 'yes' \"no\" !",
)

SINGLE_TOKEN_WORDS: tuple[str, ...] = tuple(
    (
        "Dante Florence Italy Paris France Rome Berlin Germany Tokyo Japan London "
        "English French capital born language native was in is the of works field physics city"
    ).split()
)

# Seeding the non-byte-level trainers with every printable ASCII character lets
# any English word be spelled out instead of becoming [UNK].
_ASCII_ALPHABET = list(string.ascii_letters + string.digits + string.punctuation)
# Llama and Gemma spell characters outside their vocabulary as these byte tokens
# (SentencePiece byte fallback) rather than emitting <unk>.
_BYTE_FALLBACK_TOKENS = [f"<0x{b:02X}>" for b in range(256)]

# Round BPE sizes large enough that every SINGLE_TOKEN_WORDS entry is one token
# (byte-level BPE spends 256 of its ids on the byte alphabet, hence the larger size).
_WORDPIECE_BPE_SIZE = 400
_BYTE_LEVEL_SIZE = 600
_METASPACE_SIZE = 500

_MAX_POSITIONS = 512
# All six architectures give padding-invariant logits under SDPA (checked in
# tests/test_testing_models.py), and SDPA is what real checkpoints load with.
_ATTN_IMPLEMENTATION = "sdpa"


def _train_bpe(
    pre_tokenizer: pre_tokenizers.PreTokenizer,
    special_tokens: list[str],
    vocab_size: int,
    initial_alphabet: list[str],
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=initial_alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    # The trained model is read back through its JSON form because that is the
    # only public view of the merge list.
    model = json.loads(tokenizer.to_str())["model"]
    return model["vocab"], [tuple(pair) for pair in model["merges"]]


def _bert_tokenizer() -> transformers.PreTrainedTokenizerBase:
    # tokenizers' WordPiece trainer numbers its "##" pieces in hash order, so its
    # vocabulary changes from process to process.  A BPE trained on words marked
    # with a leading "▁" is deterministic and carries the same information:
    # "▁piece" starts a word and "piece" continues one ("##piece").
    bpe_vocab, _ = _train_bpe(
        pre_tokenizers.Sequence(
            [pre_tokenizers.BertPreTokenizer(), pre_tokenizers.Metaspace(prepend_scheme="always")]
        ),
        [],
        vocab_size=_WORDPIECE_BPE_SIZE,
        initial_alphabet=_ASCII_ALPHABET,
    )
    learned = [
        token.removeprefix("▁") if token.startswith("▁") else "##" + token
        for token in sorted(bpe_vocab, key=bpe_vocab.__getitem__)
        if token != "▁"
    ]
    pieces = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        # Every character both starts and continues a word, so no ASCII word is [UNK].
        *_ASCII_ALPHABET,
        *(f"##{char}" for char in _ASCII_ALPHABET),
        *learned,
    ]
    vocab = {piece: index for index, piece in enumerate(dict.fromkeys(pieces))}
    return transformers.BertTokenizer(vocab=vocab, do_lower_case=False)


def _roberta_tokenizer() -> transformers.PreTrainedTokenizerBase:
    # RoBERTa and BART share this tokenizer, and the special tokens take
    # RoBERTa's ids (<s>=0, <pad>=1, </s>=2, <unk>=3).
    vocab, merges = _train_bpe(
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        vocab_size=_BYTE_LEVEL_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    return transformers.RobertaTokenizer(
        vocab=vocab,
        merges=merges,
        # lstrip makes "in <mask>" absorb the space before the mask, as the
        # hub's roberta-base and bart-base tokenizers do.
        mask_token=AddedToken("<mask>", lstrip=True, rstrip=False, normalized=False, special=True),
    )


def _gpt2_tokenizer() -> transformers.PreTrainedTokenizerBase:
    vocab, merges = _train_bpe(
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        ["<|endoftext|>"],
        vocab_size=_BYTE_LEVEL_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # GPT-2 has no pad token; reusing end-of-text is the usual convention.
    return transformers.GPT2Tokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>")


def _metaspace_vocab(special_tokens: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    # Training never prepends "▁", so a sentence-initial word is learned in its
    # bare form and every other word in its "▁word" form.  Isolating punctuation
    # and digits mimics SentencePiece's script splitting: without it "▁France."
    # becomes one token and a cloze answer would tokenize differently before ".".
    vocab, merges = _train_bpe(
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Metaspace(prepend_scheme="never"),
                pre_tokenizers.Punctuation(behavior="isolated"),
                pre_tokenizers.Digits(individual_digits=True),
            ]
        ),
        special_tokens,
        vocab_size=_METASPACE_SIZE,
        initial_alphabet=_ASCII_ALPHABET,
    )
    for token in _BYTE_FALLBACK_TOKENS:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def _llama_tokenizer() -> transformers.PreTrainedTokenizerBase:
    vocab, merges = _metaspace_vocab(["<unk>", "<s>", "</s>", "<pad>"])
    # Llama ships without a pad token; a dedicated one keeps padding distinct
    # from end-of-sequence (GPT-2 covers the pad == eos case).
    return transformers.LlamaTokenizer(vocab=vocab, merges=merges, pad_token="<pad>", add_bos_token=True)


def _gemma_tokenizer() -> transformers.PreTrainedTokenizerBase:
    vocab, merges = _metaspace_vocab(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])
    # Built from a vocab rather than loaded, the v5 tokenizer classes default to
    # add_bos_token=False; the hub's Llama and Gemma configs turn it on.
    return transformers.GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


@functools.lru_cache(maxsize=None)
def _tokenizer(name: str) -> transformers.PreTrainedTokenizerBase:
    builders = {
        "tiny-bert": _bert_tokenizer,
        "tiny-roberta": _roberta_tokenizer,
        "tiny-bart": _roberta_tokenizer,
        "tiny-gpt2": _gpt2_tokenizer,
        "tiny-llama": _llama_tokenizer,
        "tiny-gemma3": _gemma_tokenizer,
    }
    return builders[name]()


def _config(name: str, tokenizer: transformers.PreTrainedTokenizerBase) -> transformers.PreTrainedConfig:
    # len() rather than vocab_size: it also counts tokens added on top of the vocab.
    vocab_size = len(tokenizer)
    special_ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    common = {"vocab_size": vocab_size, "attn_implementation": _ATTN_IMPLEMENTATION, "dtype": torch.float32}
    if name == "tiny-bert":
        return transformers.BertConfig(
            **common,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            # Deliberately not a multiple of the hidden size, to surface shape bugs.
            intermediate_size=37,
            max_position_embeddings=_MAX_POSITIONS,
            pad_token_id=tokenizer.pad_token_id,
        )
    if name == "tiny-roberta":
        return transformers.RobertaConfig(
            **common,
            **special_ids,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            # RoBERTa numbers positions from pad_token_id + 1.
            max_position_embeddings=_MAX_POSITIONS + tokenizer.pad_token_id + 1,
        )
    if name == "tiny-bart":
        return transformers.BartConfig(
            **common,
            **special_ids,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=37,
            decoder_ffn_dim=37,
            max_position_embeddings=_MAX_POSITIONS,
            # As in facebook/bart-base, the decoder starts from </s>, so
            # shift_tokens_right(input_ids) lines the logits up with the input.
            decoder_start_token_id=tokenizer.eos_token_id,
            forced_eos_token_id=tokenizer.eos_token_id,
        )
    if name == "tiny-gpt2":
        return transformers.GPT2Config(
            **common,
            **special_ids,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_inner=37,
            n_positions=_MAX_POSITIONS,
        )
    if name == "tiny-llama":
        return transformers.LlamaConfig(
            **common,
            **special_ids,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            # Grouped-query attention, as in SmolLM and Llama 3.
            num_key_value_heads=1,
            max_position_embeddings=_MAX_POSITIONS,
        )
    if name == "tiny-gemma3":
        return transformers.Gemma3TextConfig(
            **common,
            **special_ids,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            query_pre_attn_scalar=16,
            # A window shorter than typical test prompts, so the sliding-window
            # mask is actually exercised.
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            max_position_embeddings=_MAX_POSITIONS,
        )
    raise KeyError(name)


_MODEL_CLASS: dict[str, type[transformers.PreTrainedModel]] = {
    "tiny-bert": transformers.BertForMaskedLM,
    "tiny-roberta": transformers.RobertaForMaskedLM,
    "tiny-bart": transformers.BartForConditionalGeneration,
    "tiny-gpt2": transformers.GPT2LMHeadModel,
    "tiny-llama": transformers.LlamaForCausalLM,
    # Gemma3ForCausalLM multiplies token embeddings by sqrt(hidden_size) inside
    # its embedding module: code that builds inputs_embeds must go through
    # model.get_input_embeddings() to get the scaling.
    "tiny-gemma3": transformers.Gemma3ForCausalLM,
}


def tiny_model(
    name: str, seed: int = 0
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """Return a fresh random-weight float32 model in eval mode and its tokenizer.

    ``name`` is one of :data:`TINY_MODEL_NAMES`; the same ``seed`` gives identical weights.
    """
    if name not in FAMILY_OF:
        raise ValueError(f"unknown tiny model {name!r}; choose from {TINY_MODEL_NAMES}")
    # Training is cached but each caller gets its own copy, so a test that sets
    # e.g. padding_side cannot leak into the next one.
    tokenizer = copy.deepcopy(_tokenizer(name))
    config = _config(name, tokenizer)
    # fork_rng keeps seeding from disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _MODEL_CLASS[name](config)
    return model.eval(), tokenizer
