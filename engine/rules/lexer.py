"""Tokenizer of the condition language. Every token carries its offsets into the condition text."""

from __future__ import annotations

from dataclasses import dataclass

from engine.rules.errors import ConditionError

KEYWORDS = {"and", "or", "not", "in", "true", "false"}
# Python that a condition may look like it could reach: refused as syntax errors, never looked up.
PYTHON_WORDS = {"lambda", "import", "def", "class", "exec", "eval"}
# Longest first, so "<=" wins over "<".
OPERATORS = ("==", "!=", "<=", ">=", "<", ">", "+", "-", "*", "/", "(", ")", "[", "]", ",", ".")
# Things people type from other languages, with what to write instead.
MISTAKES = {
    "&&": ("and", 'use "and" to combine conditions'),
    "||": ("or", 'use "or" for alternatives'),
    "<>": ("!=", 'use "!=" for "not equal"'),
    "=>": (">=", 'write ">=" for "at least"'),
    "=<": ("<=", 'write "<=" for "at most"'),
    "=": ("==", 'use "==" to compare'),
    "!": ("not", 'use "not" to negate a condition'),
}


@dataclass(frozen=True)
class Token:
    kind: str  # "num", "str", "name", "kw", "op", "eof"
    text: str  # source text (for "str": the decoded value)
    pos: int
    end: int
    value: float | None = None


def _is_name_start(ch: str) -> bool:
    return ch.isascii() and (ch.isalpha() or ch == "_")


def _is_name_char(ch: str) -> bool:
    return ch.isascii() and (ch.isalnum() or ch == "_")


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in " \t\r\n":
            i += 1
            continue
        start = i
        if ch.isdigit() or (ch == "." and i + 1 < n and text[i + 1].isdigit()):
            tokens.append(_number(text, i))
            i = tokens[-1].end
            continue
        if ch in "\"'":
            tok = _string(text, i)
            tokens.append(tok)
            i = tok.end
            continue
        if _is_name_start(ch):
            while i < n and _is_name_char(text[i]):
                i += 1
            word = text[start:i]
            low = word.lower()
            if word.startswith("_"):
                raise ConditionError(start, i, f'syntax error: "{word}": names start with a letter',
                                     "conditions use feature names, situations and holds/consent/trigger, nothing else")
            if word in PYTHON_WORDS:
                raise ConditionError(start, i, f'syntax error: "{word}" is not part of the condition language',
                                     "conditions are not Python: compare features, e.g. tenure_months >= 12")
            if low in KEYWORDS and word != low:
                raise ConditionError(start, i, f'"{word}" must be written in lower case', f'write "{low}"')
            tokens.append(Token("kw" if word in KEYWORDS else "name", word, start, i))
            continue
        two = text[i : i + 2]
        if two in ("&&", "||", "<>", "=>", "=<"):
            good, hint = MISTAKES[two]
            raise ConditionError(i, i + 2, f'unexpected "{two}"', hint)
        for op in OPERATORS:
            if text.startswith(op, i):
                tokens.append(Token("op", op, i, i + len(op)))
                i += len(op)
                break
        else:
            if ch in MISTAKES:
                good, hint = MISTAKES[ch]
                raise ConditionError(i, i + 1, f'unexpected "{ch}"', hint)
            if ch in "\u201c\u201d\u2018\u2019":
                raise ConditionError(i, i + 1, f'unexpected typographic quote "{ch}"', 'use plain quotes " or \'')
            raise ConditionError(i, i + 1, f'unexpected character "{ch}"', "")
    tokens.append(Token("eof", "", n, n))
    return tokens


def _number(text: str, i: int) -> Token:
    start, n = i, len(text)
    while i < n and text[i].isdigit():
        i += 1
    if i < n and text[i] == ".":
        i += 1
        while i < n and text[i].isdigit():
            i += 1
    if i < n and text[i] in "eE":
        j = i + 1
        if j < n and text[j] in "+-":
            j += 1
        if j < n and text[j].isdigit():
            i = j
            while i < n and text[i].isdigit():
                i += 1
    if i < n and (_is_name_char(text[i]) or text[i] == "."):
        j = i
        while j < n and (_is_name_char(text[j]) or text[j] == "."):
            j += 1
        raise ConditionError(start, j, f'"{text[start:j]}" is not a number', "")
    value = float(text[start:i])
    if value != value or value in (float("inf"), float("-inf")):
        raise ConditionError(start, i, f'number "{text[start:i]}" is too large', "")
    return Token("num", text[start:i], start, i, value)


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", '"': '"', "'": "'"}


def _string(text: str, i: int) -> Token:
    quote, start, n = text[i], i, len(text)
    i += 1
    out: list[str] = []
    while i < n:
        ch = text[i]
        if ch == quote:
            return Token("str", "".join(out), start, i + 1)
        if ch == "\\" and i + 1 < n:
            esc = text[i + 1]
            if esc not in _ESCAPES:
                raise ConditionError(i, i + 2, f'unknown escape "\\{esc}" in text', 'write "\\\\" for a backslash')
            out.append(_ESCAPES[esc])
            i += 2
            continue
        if ch == "\n":
            break
        out.append(ch)
        i += 1
    raise ConditionError(start, min(i, n), "text is not closed", f"add the closing {quote}")
