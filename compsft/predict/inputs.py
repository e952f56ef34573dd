"""What `compsft predict` reads: raw text, pre-tokenized text and CoNLL-U, streamed sentence by sentence.

Every reader yields :class:`InputSentence` records one at a time, so a long file never sits in memory.
Each record carries a CoNLL-U sentence (`tokenlist`) that the writers fill with predictions: for
CoNLL-U input the one read (comments, multi-word tokens and empty nodes kept), for text one made
here with `# sent_id` and `# text`.

The raw-text tokenizer is deliberately simple and the same for every language (no trained model):

* words are runs of letters, combining marks and digits (Unicode categories L*, M*, N*), joined across
  an apostrophe or hyphen between two such characters (`don't`, `l-allegat` stay one word) and across
  `.` `,` `:` between digits (`3.14`, `1,000`, `12:30`);
* every other visible character is a token of its own; runs of one character stay together (`...`, `!!`);
* a sentence ends after a token made of `. ! ? … 。 ！ ？ ؟ । ॥ ። ፧ ։` (and any closing quotes or
  brackets right after it) when whitespace follows and the next word does not start with a lower-case
  letter; a `.` after a single letter (an initial, `J. Smith`) does not end one;
* `SpaceAfter=No` goes into MISC where two tokens touch, as UDPipe writes it.

Scripts without spaces between words (Chinese, Japanese, Thai) need a real segmenter: segment the
text first and pass it with `--pretokenized`.
"""
from __future__ import annotations

import gzip
import io
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from compsft.errors import CompsftError

#: Input kinds `compsft predict` reads.
INPUT_FORMATS = ("raw", "pretokenized", "conllu")

_FINAL = set(".!?…。！？؟।॥።፧։")
_CLOSING = set("\"'”’»)]}›」』")
_JOINERS = set("'’-‐")  # inside a word, between two word characters
_NUMBER_JOINERS = set(".,:")  # inside a number, between two digits


@dataclass
class InputSentence:
    """One sentence to predict: its words, the CoNLL-U sentence the writers fill, where it came from.

    `offsets[i]` is (start, end) of word i in the sentence's `# text`, where known.
    """

    words: list[str]
    tokenlist: object
    source: str
    offsets: list[tuple[int, int]] | None = None

    @property
    def text(self) -> str:
        return self.tokenlist.metadata.get("text") or " ".join(self.words)


# -- the language-neutral tokenizer -----------------------------------------------------------------

def _is_word_char(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "LMN"


def tokenize(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the tokens of `text` (see the module docstring for the rules)."""
    spans: list[tuple[int, int]] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace() or unicodedata.category(ch)[0] in "CZ":
            i += 1
            continue
        start = i
        if _is_word_char(ch):
            i += 1
            while i < n:
                c = text[i]
                if _is_word_char(c):
                    i += 1
                elif i + 1 < n and _is_word_char(text[i + 1]) and (
                        c in _JOINERS or (c in _NUMBER_JOINERS and text[i - 1].isdigit() and text[i + 1].isdigit())):
                    i += 2
                else:
                    break
        else:
            i += 1
            while i < n and text[i] == ch:
                i += 1
        spans.append((start, i))
    return spans


def _ends_sentence(text: str, spans: list[tuple[int, int]], k: int) -> bool:
    """Whether a sentence ends after token k (a run of final punctuation plus closing marks)."""
    token = text[spans[k][0]:spans[k][1]]
    if not token or not set(token) <= _FINAL:
        return False
    if token == "." and k > 0:
        before = text[spans[k - 1][0]:spans[k - 1][1]]
        if len(before) == 1 and before.isalpha() and spans[k - 1][1] == spans[k][0]:
            return False  # an initial: "J. Smith"
    return True


def split_sentences(text: str) -> list[list[tuple[int, int]]]:
    """Tokens of `text` grouped into sentences (lists of (start, end) spans)."""
    spans = tokenize(text)
    sentences: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    k = 0
    while k < len(spans):
        current.append(spans[k])
        if _ends_sentence(text, spans, k):
            while k + 1 < len(spans) and set(text[spans[k + 1][0]:spans[k + 1][1]]) <= _CLOSING \
                    and spans[k + 1][0] == spans[k][1]:
                k += 1
                current.append(spans[k])
            following = spans[k + 1] if k + 1 < len(spans) else None
            if following is None or (following[0] > spans[k][1] and not text[following[0]].islower()):
                sentences.append(current)
                current = []
        k += 1
    if current:
        sentences.append(current)
    return sentences


def make_tokenlist(words: list[str], sent_id: str, text: str, space_after: list[bool] | None = None,
                   newpar: bool = False):
    """A CoNLL-U sentence of `words` with only ID and FORM (and SpaceAfter=No) filled."""
    from conllu.models import Token, TokenList

    tokens = []
    for i, word in enumerate(words):
        misc = {"SpaceAfter": "No"} if space_after is not None and not space_after[i] else None
        tokens.append(Token(id=i + 1, form=word, lemma=None, upos=None, xpos=None, feats=None, head=None,
                            deprel=None, deps=None, misc=misc))
    metadata = {"newpar": None} if newpar else {}
    metadata.update({"sent_id": sent_id, "text": text})
    return TokenList(tokens, metadata)


def text_sentences(text: str, source: str, first_id: int = 1, newpar: bool = False) -> list[InputSentence]:
    """`text` (one paragraph) split into sentences and words by the tokenizer above."""
    out = []
    for k, spans in enumerate(split_sentences(text)):
        begin = spans[0][0]
        words = [text[s:e] for s, e in spans]
        space_after = [spans[i + 1][0] > spans[i][1] for i in range(len(spans) - 1)] + [True]
        sentence_text = text[begin:spans[-1][1]]
        tokenlist = make_tokenlist(words, str(first_id + k), sentence_text, space_after, newpar=newpar and k == 0)
        out.append(InputSentence(words, tokenlist, source, [(s - begin, e - begin) for s, e in spans]))
    return out


# -- reading files and stdin ------------------------------------------------------------------------

def open_input(path: str | Path) -> tuple[BinaryIO, str]:
    """(binary stream, name for messages) of a file (`.gz` decompressed) or of stdin for `-`."""
    if str(path) == "-":
        return sys.stdin.buffer, "<stdin>"
    path = Path(path)
    if not path.is_file():
        raise CompsftError(f"{path}: no such file")
    if path.suffix == ".gz":
        return gzip.open(path, "rb"), str(path)
    return open(path, "rb"), str(path)


def detect_format(path: str | Path) -> str:
    """`conllu` for `.conllu` / `.conllu.gz` files, else `raw`."""
    name = Path(str(path)).name
    return "conllu" if name.removesuffix(".gz").endswith(".conllu") else "raw"


def decoded_lines(stream: BinaryIO, name: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without the line break), each line decoded as UTF-8 on its own so that
    undecodable bytes are reported with their line."""
    for number, raw in enumerate(stream, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise CompsftError(f"{name}:{number}: not UTF-8 text (byte {raw[err.start]:#04x} at column "
                               f"{err.start + 1}); convert the file to UTF-8 first, e.g. with iconv") from None
        except (OSError, EOFError) as err:  # a truncated .gz
            raise CompsftError(f"{name}:{number}: cannot be read ({err})") from None
        if number == 1:
            line = line.removeprefix("\ufeff")
        yield number, line.rstrip("\r\n")


def read_raw(stream: BinaryIO, name: str) -> Iterator[InputSentence]:
    """One paragraph per non-empty line, split into sentences and words."""
    count = 0
    for number, line in decoded_lines(stream, name):
        if line.strip():
            sentences = text_sentences(line, f"{name}:{number}", first_id=count + 1, newpar=True)
            count += len(sentences)
            yield from sentences


def read_pretokenized(stream: BinaryIO, name: str) -> Iterator[InputSentence]:
    """One sentence per non-empty line, words separated by whitespace."""
    count = 0
    for number, line in decoded_lines(stream, name):
        words = line.split()
        if words:
            count += 1
            text = " ".join(words)
            offsets, at = [], 0
            for w in words:
                offsets.append((at, at + len(w)))
                at += len(w) + 1
            yield InputSentence(words, make_tokenlist(words, str(count), text), f"{name}:{number}", offsets)


def read_conllu_stream(stream: BinaryIO, name: str) -> Iterator[InputSentence]:
    """CoNLL-U sentences; words are the FORMs of the integer IDs (not multi-word tokens or empty nodes)."""
    block: list[str] = []
    start = count = 0
    for number, line in decoded_lines(stream, name):
        if line.strip():
            if not block:
                start = number
            block.append(line)
        elif block:
            count += 1
            yield _conllu_sentence(block, name, start, count)
            block = []
    if block:
        yield _conllu_sentence(block, name, start, count + 1)


def _conllu_sentence(lines: list[str], name: str, start: int, count: int) -> InputSentence:
    import conllu
    from conllu.exceptions import ParseException

    for offset, line in enumerate(lines):
        if line.startswith("#"):
            continue
        columns = line.split("\t")
        if len(columns) != 10:
            raise CompsftError(f"{name}:{start + offset}: expected 10 tab-separated columns, found {len(columns)}")
    try:
        tokenlist = conllu.parse("\n".join(lines) + "\n\n")[0]
    except (ParseException, ValueError) as err:
        raise CompsftError(f"{name}:{start}: not a CoNLL-U sentence ({err})") from None
    numbers = [start + i for i, line in enumerate(lines) if not line.startswith("#")]
    words = []
    for token, number in zip(tokenlist, numbers):
        if isinstance(token["id"], int):
            if token["id"] != len(words) + 1:
                raise CompsftError(f"{name}:{number}: word ID {token['id']} out of sequence (expected {len(words) + 1})")
            if not token["form"]:
                raise CompsftError(f"{name}:{number}: empty FORM")
            words.append(token["form"])
    if not words:
        raise CompsftError(f"{name}:{start}: a sentence without words")
    tokenlist.metadata.setdefault("sent_id", str(count))
    if "text" not in tokenlist.metadata:
        tokenlist.metadata["text"] = _text_of(tokenlist)
    return InputSentence(words, tokenlist, f"{name}:{start}", align_offsets(tokenlist.metadata["text"], words))


def _text_of(tokenlist) -> str:
    """The sentence text from the surface tokens (multi-word tokens, not their words) and SpaceAfter."""
    parts, skip_to = [], 0
    for token in tokenlist:
        tid = token["id"]
        if isinstance(tid, tuple) and len(tid) == 3 and tid[1] == "-":
            skip_to = tid[2]
        elif not isinstance(tid, int) or tid <= skip_to:
            continue
        parts.append(token["form"])
        if (token["misc"] or {}).get("SpaceAfter") != "No":
            parts.append(" ")
    return "".join(parts).rstrip()


def align_offsets(text: str, words: list[str]) -> list[tuple[int, int]] | None:
    """Where each word sits in `text`, found left to right; None if a word is not found (e.g. the words
    of a multi-word token, which differ from its surface form)."""
    out, at = [], 0
    for w in words:
        i = text.find(w, at)
        if i < 0 or text[at:i].strip():
            return None
        out.append((i, i + len(w)))
        at = i + len(w)
    return out


def read_input(path: str | Path, input_format: str | None = None) -> Iterator[InputSentence]:
    """Sentences of `path` (`-` for stdin) in `input_format` (default: by extension; stdin is raw)."""
    input_format = input_format or detect_format(path)
    if input_format not in INPUT_FORMATS:
        raise CompsftError(f"unknown input format {input_format!r}; expected one of {', '.join(INPUT_FORMATS)}")
    reader = {"raw": read_raw, "pretokenized": read_pretokenized, "conllu": read_conllu_stream}[input_format]
    stream, name = open_input(path)
    try:
        yield from reader(stream, name)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def read_text(text: str, source: str = "<text>") -> list[InputSentence]:
    """The sentences of an in-memory text (one paragraph per line), as `read_raw` reads a file."""
    return list(read_raw(io.BytesIO(text.encode("utf-8")), source))
