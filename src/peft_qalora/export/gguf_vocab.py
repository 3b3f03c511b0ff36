# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""The tokenizer of a checkpoint folder as the vocabulary metadata of a llama.cpp GGUF file (``tokenizer.ggml.*``).

:func:`_read_vocabulary` reads it as llama.cpp's ``convert_hf_to_gguf.py`` does, through gguf-py's vocabulary
classes: a SentencePiece vocabulary where there is one, else byte-level BPE with its merges, token types and
llama.cpp's name for the pre-tokenizer. It is separate from :mod:`.gguf`, which writes the weights, because it reads
only the tokenizer files and knows nothing of GPTQ or the adapter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Optional, Union

import gguf

# llama.cpp identifies a BPE pre-tokenizer by hashing the token ids of this text (convert_hf_to_gguf.py,
# get_vocab_base_pre); the hashes below are the ones its converter lists for the Llama-family tokenizers.
_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ "
    "(multiple emojis concatenated) ✅ 🦙🦙 3 33 333 "
    "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)
# Split regexes of the pre-tokenizers above, as tokenizer.json writes them, for tokenizers with other vocabularies.
_SPLIT_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+": "qwen2",
}
_KNOWN_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / Qwen2.5
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2
}


@dataclass
class _Vocabulary:
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: Optional[str]
    tokens: list[Union[str, bytes]]
    token_types: list[int]
    scores: Optional[list[float]]
    special: gguf.SpecialVocab
    add_space_prefix: Optional[bool]
    add_bos: Optional[bool]

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.token_types)
        self.special.add_to_gguf(writer, quiet=True)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.add_bos is not None:
            writer.add_add_bos_token(self.add_bos)


def _read_vocabulary(base_dir: str, config: dict, arch: gguf.MODEL_ARCH) -> _Vocabulary:
    """The tokenizer as llama.cpp's converter writes it: SentencePiece where there is one, else byte-level BPE."""
    path = Path(base_dir)
    vocab_size = int(config["vocab_size"])
    vocab = None
    if (path / "tokenizer.model").is_file():
        try:
            vocab = gguf.SentencePieceVocab(path)
        except RuntimeError as exc:  # gguf-py's way of saying that sentencepiece is missing
            raise ValueError(f"Reading {path / 'tokenizer.model'} needs the sentencepiece package ({exc}).") from exc
    elif (path / "tokenizer.json").is_file():
        try:
            vocab = gguf.LlamaHfVocab(path)
        except (FileNotFoundError, TypeError, KeyError):
            vocab = None  # not a SentencePiece-style tokenizer.json: byte-level BPE below
    else:
        raise ValueError(
            f"{base_dir} has no tokenizer (tokenizer.json or tokenizer.model); a GGUF file carries its tokenizer, so "
            "save the tokenizer into the checkpoint folder (tokenizer.save_pretrained) first."
        )
    add_space_prefix = _tokenizer_config(path).get("add_prefix_space")
    add_space_prefix = add_space_prefix if isinstance(add_space_prefix, bool) else None
    if vocab is not None:
        tokens, scores, types = [], [], []
        for text, score, token_type in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(int(token_type))
        for i in range(len(tokens), vocab_size):  # the embedding matrix may be padded past the tokenizer
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(int(gguf.TokenType.UNUSED))
        special = gguf.SpecialVocab(path, n_vocab=len(tokens))
        return _Vocabulary("llama", "default", tokens, types, scores, special, add_space_prefix, None)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if max(tokenizer.vocab.values()) >= vocab_size:
        raise ValueError(
            f"The tokenizer of {base_dir} has token ids up to {max(tokenizer.vocab.values())}, beyond the model's "
            f"vocab_size {vocab_size}."
        )
    pre = _pre_tokenizer(tokenizer, base_dir)
    tokens, types = _bpe_tokens(tokenizer, vocab_size)
    special = gguf.SpecialVocab(path, load_merges=True)
    if not special.merges:
        raise ValueError(
            f"The byte-level BPE tokenizer of {base_dir} has no merges; llama.cpp refuses such a vocabulary "
            '("cannot find tokenizer merges in model file") and GGUF cannot store an empty merge list. Save a '
            "tokenizer with its merges (tokenizer.json) into the checkpoint folder."
        )
    add_bos = None
    if arch == gguf.MODEL_ARCH.LLAMA and vocab_size == 49152 and "bos" not in special.add_special_token:
        add_bos = False  # llama.cpp's converter does this for SmolLM/Granite-sized Llama vocabularies
    return _Vocabulary("gpt2", pre, tokens, types, None, special, add_space_prefix, add_bos)


def _tokenizer_config(path: Path) -> dict:
    file = path / "tokenizer_config.json"
    if not file.is_file():
        return {}
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def _pre_tokenizer(tokenizer, base_dir: str) -> str:
    """llama.cpp's name for the BPE pre-tokenizer (``tokenizer.ggml.pre``).

    First as llama.cpp's converter recognises it (a hash of the token ids of a test text), then, for tokenizers it
    does not list (a fine-tune with its own vocabulary, a test tokenizer), from the pre-tokenizer's definition.
    """
    digest = sha256(str(tokenizer.encode(_CHECK_TEXT)).encode()).hexdigest()
    if digest in _KNOWN_PRE_TOKENIZERS:
        return _KNOWN_PRE_TOKENIZERS[digest]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = json.loads(backend.to_str()).get("pre_tokenizer") if backend is not None else None
    name = _pre_tokenizer_from_definition(definition or {})
    if name is not None:
        return name
    raise ValueError(
        f"The BPE pre-tokenizer of {base_dir} is not one llama.cpp recognises (hash {digest}); the GGUF export "
        f"knows {', '.join(sorted(set(_KNOWN_PRE_TOKENIZERS.values())))}. llama.cpp's convert_hf_to_gguf.py "
        "lists the others."
    )


def _pre_tokenizer_from_definition(definition: dict) -> Optional[str]:
    """The llama.cpp pre-tokenizer whose split rules are those of a tokenizers ``pre_tokenizer`` definition."""
    steps = definition.get("pretokenizers", [definition]) if definition.get("type") == "Sequence" else [definition]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"  # ByteLevel's own regex is GPT-2's
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # single digits, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        split = steps[0]
        if split.get("behavior") == "Isolated" and not split.get("invert"):
            return _SPLIT_REGEXES.get((split.get("pattern") or {}).get("Regex"))
    return None


def _bpe_tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token texts and types of a byte-level BPE tokenizer, padded to ``vocab_size`` (convert_hf_to_gguf.py rules)."""
    reverse = {token_id: token for token, token_id in tokenizer.vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
            continue
        token = reverse[i]
        if token in added:
            # llama.cpp expects CONTROL and USER_DEFINED tokens pre-normalized
            if i in decoder and not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if (i in decoder and decoder[i].special) or _looks_special(token):
                types.append(int(gguf.TokenType.CONTROL))
            else:
                token = token.replace("\u2581", " ")
                types.append(int(gguf.TokenType.USER_DEFINED))
        else:
            types.append(int(gguf.TokenType.NORMAL))
        tokens.append(token)
    return tokens, types


def _looks_special(token: str) -> bool:
    return (
        token in ("<pad>", "<mask>")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
    )
