"""Tokenizer files for a Hub folder that load the same on transformers 4.57 and 5.x.

The official Honeybee uses Vicuna's sentencepiece `tokenizer.model` through the slow, legacy `LlamaTokenizer`. The
fast `tokenizer.json` is built here from the sentencepiece model directly: transformers 4 and 5 convert it with
different merge orders (different ids for some words). The files are written as `HoneybeeProcessor.save_pretrained`
writes them (`transformers_compat.tokenizer_files`), so both versions load them.
"""

import re
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from ..processing_honeybee import AI, HUMAN, IMAGE_TOKEN, write_text_atomic
from ..transformers_compat import tokenizer_files

SPECIALS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>"}


def _merges(vocab, scores):
    """BPE merges of a sentencepiece BPE model: every split of a piece into two pieces, best-scored first."""
    merges = []
    for piece, score in scores.items():
        local = [
            (piece[:i], piece[i:], score) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab
        ]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def tokenizer_from_sentencepiece(model_path):
    """A `tokenizers.Tokenizer` equal to sentencepiece's legacy Llama tokenisation of `model_path`."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    for name, token in SPECIALS.items():
        if vocab.get(token) != getattr(sp, f"{name}_id")():
            raise ValueError(f"{model_path} is not a Llama sentencepiece model: {token} is not its {name} token")
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    bpe = models.BPE(vocab=vocab, merges=_merges(vocab, scores), unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer(bpe)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS.values()])
    return tokenizer


def sentencepiece_front_end():
    """sentencepiece's legacy Llama front end as a `tokenizers` normalizer: a `▁` before each piece of text between
    special tokens, every space as `▁`. The official code tokenises with it."""
    return normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])


def role_marker_pieces():
    """A pre-tokenizer that makes each official role marker, as the chat template writes it, a piece of its own.

    The official code tokenises "\nHuman: " and "\nAI: " apart from the text around them, each with its dummy
    prefix; the chat template writes those prefixes as spaces, so a marker reads `▁\nHuman:▁` followed by the next
    piece's `▁` or by the end of the text before a special token. Splitting there keeps BPE from merging across
    the boundary (a vocabulary with `▁▁`, as Llama's, would). Plain text almost never has that shape, and where it
    does, the official processor split it the same way.
    """
    markers = "|".join(re.escape(m.replace(" ", "▁")) for m in (HUMAN, AI))
    return pre_tokenizers.Split(Regex(f"▁(?:{markers})(?=▁|\\z)"), behavior="isolated")


def load_backend(source):
    """`source`: a sentencepiece `tokenizer.model`, or a folder holding one or a `tokenizer.json`."""
    source = Path(source)
    if source.is_dir():
        if (source / "tokenizer.model").exists():
            return tokenizer_from_sentencepiece(source / "tokenizer.model")
        if (source / "tokenizer.json").exists():
            return Tokenizer.from_file(str(source / "tokenizer.json"))
        raise FileNotFoundError(f"{source} holds neither tokenizer.model nor tokenizer.json")
    if not source.exists():
        raise FileNotFoundError(f"tokenizer {source} does not exist")
    return tokenizer_from_sentencepiece(source)


def save_tokenizer_files(backend, out_dir, model_max_length=4096):
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; returns the `<image>` id.

    `backend` is a `tokenizers.Tokenizer` (`load_backend`). It gets sentencepiece's legacy front end, the role-marker
    pieces and `<image>` as a special token unless present (id = the base vocabulary size); pad is `<unk>`, as the
    official code pads; padding is on the left, for batched generation.
    """
    backend = Tokenizer.from_str(backend.to_str())  # a copy: the front end is reset below
    backend.normalizer = sentencepiece_front_end()
    backend.pre_tokenizer = role_marker_pieces()
    backend.add_special_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{f"{name}_token": token for name, token in SPECIALS.items()},
        pad_token=SPECIALS["unk"],
        padding_side="left",
        model_max_length=model_max_length,
    )
    for name, text in tokenizer_files(tokenizer).items():
        write_text_atomic(Path(out_dir) / name, text)
    return backend.token_to_id(IMAGE_TOKEN)
