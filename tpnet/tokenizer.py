"""Text to token ids and back, for GGUF files and MLX (Hugging Face) folders.

A `Tokenizer` wraps a `tokenizers.Tokenizer` (the Rust library, never
`transformers`, whose import alone takes seconds) and adds what a chat server
needs from the model's own configuration: the chat template, the BOS rule and
the set of ids that end a turn.

Promises:

- `encode` adds no special tokens except a BOS where the model's
  configuration asks for one (GGUF `tokenizer.ggml.add_bos_token`, folder
  `add_bos_token` or a post-processor that adds it). Special token strings
  written in the text, such as `<|im_start|>`, become their single ids.
- `decode` inverts `encode` for byte-level BPE models: any text round-trips.
- `apply_chat_template` renders the model's jinja2 template in a sandbox with
  the variables and helpers Hugging Face templates expect, and encodes the
  result without adding a BOS (templates write their own).
- A GGUF tokenizer is rebuilt from `tokenizer.ggml.*` metadata: byte-level
  BPE (`gpt2`) with the pre-tokenizer named by `tokenizer.ggml.pre`, and
  SentencePiece-style BPE (`llama`) with byte fallback. Anything else raises
  `TokenizerError` naming what was found.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

logger = logging.getLogger("tpnet.tokenizer")


class TokenizerError(ValueError):
    """The model's tokenizer is missing, broken or of an unsupported kind."""


class ChatTemplateError(TokenizerError):
    """The chat template refused the messages (its `raise_exception` ran) or
    failed while rendering them: usually the client's messages are at fault."""


# GGUF `tokenizer.ggml.token_type` values, as llama.cpp writes them.
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

# Tokens that close a chat turn in common template families. Generation must
# stop on them even where the configuration names another EOS, since an
# instruct model ends its answer with the turn marker, not the document end.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|endoftext|>",
    "<|end|>",
    "<end_of_turn>",
)

# Pre-tokenizer regexes keyed by GGUF `tokenizer.ggml.pre`, as llama.cpp
# documents them in llama-vocab.cpp (case-insensitive contractions spelled
# out, as there).
_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
LLAMA3_SPLIT_REGEX = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    + r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT_REGEX = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    + r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_PRE_NAMES = frozenset({"default", "gpt-2", "gpt2", "mpt", "olmo", "jais"})
DIGITS_THEN_GPT2_PRE_NAMES = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"}
)
LLAMA3_PRE_NAMES = frozenset({"llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe"})
QWEN2_PRE_NAMES = frozenset({"qwen2", "stablelm2"})

SPIECE_SPACE = "\u2581"  # SentencePiece writes a space as "▁"


class Tokenizer:
    """A model's tokenizer plus its chat template and end-of-turn ids."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        eos_token_ids: Iterable[int] = (),
        add_bos_token: bool = False,
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_bos_token = add_bos_token
        self.bos_token_id = _id_of(backend, bos_token)
        if add_bos_token and self.bos_token_id is None:
            raise TokenizerError(
                f"the tokenizer asks for a BOS token but its bos_token "
                f"{bos_token!r} is not in the vocabulary"
            )
        eos_ids = set(eos_token_ids)
        eos_id = _id_of(backend, eos_token)
        if eos_id is not None:
            eos_ids.add(eos_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos_ids)
        if not self.eos_token_ids:
            logger.warning("tokenizer has no end-of-turn token; turns never end")
        self._compiled_template: jinja2.Template | None = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, token_id: int) -> str:
        token = self.backend.id_to_token(token_id)
        if token is None:
            raise ValueError(
                f"token id {token_id} is not in the vocabulary "
                f"(ids run from 0 to {self.vocab_size - 1})"
            )
        return token

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; a BOS leads when `add_bos` (by default, the
        model's configuration) asks for one."""
        try:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        except TypeError:
            # `tokenizers` takes only valid Unicode; JSON may still carry lone
            # surrogates ("\ud800"), which become U+FFFD here.
            if not isinstance(text, str):
                raise TypeError(
                    f"encode takes a str, not {type(text).__name__}"
                ) from None
            valid = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
            ids = self.backend.encode(valid, add_special_tokens=False).ids
        if self.add_bos_token if add_bos is None else add_bos:
            if self.bos_token_id is None:
                raise TokenizerError("a BOS token was asked for but the model has none")
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def render_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **template_variables: Any,
    ) -> str:
        """The prompt text the model's chat template makes of `messages`.

        `template_variables` reach the template as is (`tools`, for one)."""
        template = self._template()
        try:
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **template_variables,
            )
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, TypeError, KeyError, IndexError) as error:
            raise ChatTemplateError(
                f"the chat template could not render the messages: "
                f"{type(error).__name__}: {error}"
            ) from error

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **template_variables: Any,
    ) -> list[int]:
        """Token ids of the rendered chat template; no BOS is added, since a
        template that wants one writes `bos_token` itself."""
        prompt = self.render_chat_template(
            messages, add_generation_prompt, **template_variables
        )
        return self.encode(prompt, add_bos=False)

    def save_folder_files(self, path: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json into the folder
        `path`, which `from_folder` (and Hugging Face tools) read back."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos_token,
            "add_eos_token": False,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        with open(folder / "tokenizer_config.json", "w", encoding="utf-8") as file:
            json.dump(config, file, ensure_ascii=False, indent=2)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Rebuild the tokenizer stored in a GGUF file's metadata, as
        `mx.load(path, return_metadata=True)` returns it."""
        model_kind = meta.get("tokenizer.ggml.model")
        tokens = _meta_list(meta, "tokenizer.ggml.tokens")
        if not model_kind or not tokens:
            raise TokenizerError(
                "GGUF metadata has no tokenizer: expected tokenizer.ggml.model "
                f"and tokenizer.ggml.tokens, found model={model_kind!r} and "
                f"{len(tokens or [])} tokens"
            )
        token_types = _meta_list(meta, "tokenizer.ggml.token_type")
        if token_types is None:
            token_types = [TOKEN_TYPE_NORMAL] * len(tokens)
        if len(token_types) != len(tokens):
            raise TokenizerError(
                f"GGUF tokenizer.ggml.token_type has {len(token_types)} entries "
                f"but tokenizer.ggml.tokens has {len(tokens)}"
            )

        # 1. The model and its text pipeline.
        if model_kind == "gpt2":
            backend = _byte_level_bpe(meta, tokens)
        elif model_kind == "llama":
            backend = _sentencepiece_bpe(meta, tokens, token_types)
        else:
            raise TokenizerError(
                f"GGUF tokenizer model {model_kind!r} is not supported; "
                "expected 'gpt2' (byte-level BPE) or 'llama' (SentencePiece)"
            )

        # 2. Control and user-defined tokens must match whole in text.
        special, user_defined = [], []
        for content, token_type in zip(tokens, token_types):
            if not content:
                continue
            if token_type == TOKEN_TYPE_CONTROL:
                special.append(_added(content, special=True))
            elif token_type == TOKEN_TYPE_USER_DEFINED:
                user_defined.append(_added(content, special=False))
        backend.add_special_tokens(special)
        backend.add_tokens(user_defined)

        # 3. BOS, EOS and the other ids that end a turn.
        bos_id = _meta_int(meta, "tokenizer.ggml.bos_token_id")
        eos_id = _meta_int(meta, "tokenizer.ggml.eos_token_id")
        eos_ids = {eos_id} if eos_id is not None else set()
        for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            extra_id = _meta_int(meta, key)
            if extra_id is not None:
                eos_ids.add(extra_id)
        for token_id, (content, token_type) in enumerate(zip(tokens, token_types)):
            if token_type == TOKEN_TYPE_CONTROL and content in END_OF_TURN_TOKENS:
                eos_ids.add(token_id)
        return cls(
            backend,
            chat_template=meta.get("tokenizer.chat_template"),
            bos_token=_token_at(tokens, bos_id, "bos"),
            eos_token=_token_at(tokens, eos_id, "eos"),
            eos_token_ids=eos_ids,
            add_bos_token=bool(_meta_scalar(meta, "tokenizer.ggml.add_bos_token")),
        )

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json and the EOS ids of
        config.json and generation_config.json from a model folder."""
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
            raise TokenizerError(
                f"expected a tokenizer.json in {folder}, found {found or 'nothing'}"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as error:
            raise TokenizerError(f"{tokenizer_file} cannot be read: {error}") from error
        config = _read_json(folder / "tokenizer_config.json")
        bos_token = _token_content(config.get("bos_token"))
        eos_token = _token_content(config.get("eos_token"))

        # 1. EOS ids from the model and generation configs, then turn markers.
        eos_ids: set[int] = set()
        for name in ("config.json", "generation_config.json"):
            eos_ids.update(_int_list(_read_json(folder / name).get("eos_token_id")))
        for token_id, added in backend.get_added_tokens_decoder().items():
            if added.special and added.content in END_OF_TURN_TOKENS:
                eos_ids.add(token_id)

        # 2. BOS: said outright, or added by the tokenizer's post-processor.
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            bos_id = _id_of(backend, bos_token)
            with_specials = backend.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and with_specials[:1] == [bos_id]

        return cls(
            backend,
            chat_template=_folder_chat_template(folder, config),
            bos_token=bos_token,
            eos_token=eos_token,
            eos_token_ids=eos_ids,
            add_bos_token=bool(add_bos),
        )

    def _template(self) -> jinja2.Template:
        if self._compiled_template is None:
            if not self.chat_template:
                raise TokenizerError(
                    "the model has no chat template (expected "
                    "tokenizer.chat_template in GGUF metadata or chat_template "
                    "in tokenizer_config.json)"
                )
            try:
                self._compiled_template = _template_environment().from_string(
                    self.chat_template
                )
            except jinja2.TemplateSyntaxError as error:
                raise TokenizerError(
                    f"the model's chat template does not parse: line "
                    f"{error.lineno}: {error.message}"
                ) from error
        return self._compiled_template


def _template_environment() -> jinja2.Environment:
    """A sandbox set up like the one Hugging Face renders templates in, so
    that templates written for it behave the same here."""
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols],
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"the chat template refused the messages: {message}")


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value,
        ensure_ascii=ensure_ascii,
        indent=indent,
        separators=separators,
        sort_keys=sort_keys,
    )


def _byte_level_bpe(meta: Mapping[str, Any], tokens: list[str]) -> tokenizers.Tokenizer:
    """GPT-2 style BPE over bytes mapped to printable characters."""
    pre_name = meta.get("tokenizer.ggml.pre") or "default"
    merge_strings = _meta_list(meta, "tokenizer.ggml.merges")
    if not merge_strings:
        raise TokenizerError(
            "a GGUF 'gpt2' tokenizer needs tokenizer.ggml.merges, found none"
        )
    merges = [_split_merge(merge) for merge in merge_strings]
    backend = tokenizers.Tokenizer(
        models.BPE(
            _vocab(tokens),
            merges,
            ignore_merges=pre_name in LLAMA3_PRE_NAMES,
        )
    )
    byte_level_split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    byte_level_only = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre_name in GPT2_PRE_NAMES:
        backend.pre_tokenizer = byte_level_split
    elif pre_name in DIGITS_THEN_GPT2_PRE_NAMES:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level_split]
        )
    elif pre_name in LLAMA3_PRE_NAMES or pre_name in QWEN2_PRE_NAMES:
        regex = (
            LLAMA3_SPLIT_REGEX if pre_name in LLAMA3_PRE_NAMES else QWEN2_SPLIT_REGEX
        )
        split = pre_tokenizers.Split(tokenizers.Regex(regex), behavior="isolated")
        backend.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level_only])
    else:
        logger.warning(
            "GGUF tokenizer.ggml.pre %r is not known; splitting words with the "
            "GPT-2 regex, so some texts may tokenize differently from llama.cpp",
            pre_name,
        )
        backend.pre_tokenizer = byte_level_split
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(
    meta: Mapping[str, Any], tokens: list[str], token_types: list[int]
) -> tokenizers.Tokenizer:
    """SentencePiece BPE (GGUF model 'llama'): pieces with scores, spaces
    written as "▁" and `<0xNN>` byte pieces for characters not in the vocab.

    SentencePiece merges the adjacent pair whose joined piece scores highest,
    so the merges list is every split of a normal piece into two normal
    pieces, ranked by the joined piece's score."""
    scores = _meta_list(meta, "tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise TokenizerError(
            "a GGUF 'llama' tokenizer needs one tokenizer.ggml.scores entry per "
            f"token: found {len(scores or [])} scores for {len(tokens)} tokens"
        )
    vocab = _vocab(tokens)
    normal_pieces = {
        piece
        for piece, token_type in zip(tokens, token_types)
        if token_type == TOKEN_TYPE_NORMAL
    }
    ranked_merges = []
    for piece in normal_pieces:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal_pieces and right in normal_pieces:
                rank = (-scores[vocab[piece]], vocab[left], vocab[right])
                ranked_merges.append((rank, (left, right)))
    ranked_merges.sort()

    unknown_id = _meta_int(meta, "tokenizer.ggml.unknown_token_id")
    if unknown_id is None and TOKEN_TYPE_UNKNOWN in token_types:
        unknown_id = token_types.index(TOKEN_TYPE_UNKNOWN)
    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab,
            [merge for _, merge in ranked_merges],
            unk_token=_token_at(tokens, unknown_id, "unknown"),
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    add_space_prefix = _meta_scalar(meta, "tokenizer.ggml.add_space_prefix")
    add_space_prefix = True if add_space_prefix is None else bool(add_space_prefix)
    to_pieces: list[normalizers.Normalizer] = [normalizers.Replace(" ", SPIECE_SPACE)]
    from_pieces: list[decoders.Decoder] = [
        decoders.Replace(SPIECE_SPACE, " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
    ]
    if add_space_prefix:
        to_pieces.insert(0, normalizers.Prepend(SPIECE_SPACE))
        from_pieces.append(decoders.Strip(" ", 1, 0))
    backend.normalizer = normalizers.Sequence(to_pieces)
    backend.decoder = decoders.Sequence(from_pieces)
    return backend


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        if vocab.setdefault(token, token_id) != token_id:
            logger.warning(
                "GGUF token %d repeats token %d (%r); only the first is used",
                token_id,
                vocab[token],
                token,
            )
    return vocab


def _split_merge(merge: str) -> tuple[str, str]:
    parts = merge.split(" ")
    if len(parts) != 2 or not all(parts):
        raise TokenizerError(
            f"a GGUF merge must be two tokens separated by one space, found {merge!r}"
        )
    return parts[0], parts[1]


def _added(content: str, *, special: bool) -> tokenizers.AddedToken:
    return tokenizers.AddedToken(content, special=special, normalized=False)


def _id_of(backend: tokenizers.Tokenizer, token: str | None) -> int | None:
    return None if token is None else backend.token_to_id(token)


def _token_at(tokens: list[str], token_id: int | None, role: str) -> str | None:
    if token_id is None:
        return None
    if not 0 <= token_id < len(tokens):
        raise TokenizerError(
            f"GGUF {role} token id {token_id} is outside the vocabulary "
            f"of {len(tokens)} tokens"
        )
    return tokens[token_id]


def _meta_scalar(meta: Mapping[str, Any], key: str) -> Any:
    """A GGUF scalar as a Python value; MLX hands them over as 0-d arrays."""
    value: Any = meta.get(key)
    return value.item() if hasattr(value, "item") else value


def _meta_int(meta: Mapping[str, Any], key: str) -> int | None:
    value = _meta_scalar(meta, key)
    return None if value is None else int(value)


def _meta_list(meta: Mapping[str, Any], key: str) -> list[Any] | None:
    value = meta.get(key)
    if value is None:
        return None
    return value.tolist() if hasattr(value, "tolist") else list(value)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as file:
            content = json.load(file)
    except (OSError, json.JSONDecodeError) as error:
        raise TokenizerError(f"{path} is not readable JSON: {error}") from error
    if not isinstance(content, dict):
        raise TokenizerError(
            f"{path} must hold a JSON object, found {type(content).__name__}"
        )
    return content


def _token_content(token: Any) -> str | None:
    """tokenizer_config.json writes a token as a string or as an object with
    its `content`."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _int_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, int)]
    return []


def _folder_chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    """The template from tokenizer_config.json, or from the separate files
    newer Hugging Face exports write (chat_template.jinja, .json)."""
    template = config.get("chat_template")
    if isinstance(template, list):
        # A list of named templates; the server renders the default one.
        named = {item.get("name"): item.get("template") for item in template}
        template = named.get("default")
    if isinstance(template, str):
        return template
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template")
    return template if isinstance(template, str) else None
