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
    kind: str  # "num", "str", "name", "kw", "op", "eof"; "bad": a mistake already reported
    text: str  # source text (for "str": the decoded value)
    pos: int
    end: int
    value: float | None = None


def _is_name_start(ch: str) -> bool:
    return ch.isascii() and (ch.isalpha() or ch == "_")


def _is_name_char(ch: str) -> bool:
    return ch.isascii() and (ch.isalnum() or ch == "_")


def tokenize(text: str, errors: list[ConditionError] | None = None) -> list[Token]:
    """The tokens of ``text``. Raises the first mistake, or with ``errors`` adds every mistake to it and
    goes on: a typo with one meaning (``=``, ``&&``, ``AND``...) becomes what was meant, other mistakes
    "bad" tokens, so that the parser and the checker still see the rest of the condition."""

    def fail(err: ConditionError) -> None:
        if errors is None:
            raise err
        errors.append(err)

    tokens: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in " \t\r\n":
            i += 1
            continue
        start = i
        if ch.isdigit() or (ch == "." and i + 1 < n and text[i + 1].isdigit()):
            try:
                tokens.append(_number(text, i))
            except ConditionError as err:
                fail(err)
                tokens.append(Token("bad", text[err.pos:err.end], err.pos, err.end))
            i = tokens[-1].end
            continue
        if ch in "\"'":
            tok = _string(text, i, fail)
            tokens.append(tok)
            i = tok.end
            continue
        if _is_name_start(ch):
            while i < n and _is_name_char(text[i]):
                i += 1
            word = text[start:i]
            low = word.lower()
            if word.startswith("_"):
                fail(ConditionError(start, i, f'syntax error: "{word}": names start with a letter',
                                    "conditions use feature names, situations and holds/consent/trigger, nothing else"))
                tokens.append(Token("bad", word, start, i))
            elif word in PYTHON_WORDS:
                fail(ConditionError(start, i, f'syntax error: "{word}" is not part of the condition language',
                                    "conditions are not Python: compare features, e.g. tenure_months >= 12"))
                tokens.append(Token("bad", word, start, i))
            elif low in KEYWORDS and word != low:
                fail(ConditionError(start, i, f'"{word}" must be written in lower case', f'write "{low}"'))
                tokens.append(Token("kw", low, start, i))
            else:
                tokens.append(Token("kw" if word in KEYWORDS else "name", word, start, i))
            continue
        two = text[i : i + 2]
        if two in ("&&", "||", "<>", "=>", "=<"):
            good, hint = MISTAKES[two]
            fail(ConditionError(i, i + 2, f'unexpected "{two}"', hint))
            tokens.append(_meant(good, i, i + 2))
            i += 2
            continue
        for op in OPERATORS:
            if text.startswith(op, i):
                tokens.append(Token("op", op, i, i + len(op)))
                i += len(op)
                break
        else:
            if ch in MISTAKES:
                good, hint = MISTAKES[ch]
                fail(ConditionError(i, i + 1, f'unexpected "{ch}"', hint))
                tokens.append(_meant(good, i, i + 1))
            elif ch in TYPOGRAPHIC:
                fail(ConditionError(i, i + 1, f'unexpected typographic quote "{ch}"', 'use plain quotes " or \''))
                close = next((j for j in range(i + 1, n) if text[j] in TYPOGRAPHIC), -1)
                if close > 0:  # read as the text it quotes (at its first letter: the quote has its error)
                    tokens.append(Token("str", text[i + 1 : close], i + 1, close + 1))
                    i = close + 1
                    continue
            else:
                fail(ConditionError(i, i + 1, f'unexpected character "{ch}"', ""))
            i += 1
    tokens.append(Token("eof", "", n, n))
    return tokens


TYPOGRAPHIC = "\u201c\u201d\u2018\u2019"


def _meant(good: str, pos: int, end: int) -> Token:
    """The token a typo (``MISTAKES``) stands for."""
    return Token("kw" if good in KEYWORDS else "op", good, pos, end)


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


def _string(text: str, i: int, fail) -> Token:
    """A quoted text; ``fail`` gets each mistake (and may raise it)."""
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
                fail(ConditionError(i, i + 2, f'unknown escape "\\{esc}" in text', 'write "\\\\" for a backslash'))
            out.append(_ESCAPES.get(esc, esc))
            i += 2
            continue
        if ch == "\n":
            break
        out.append(ch)
        i += 1
    fail(ConditionError(start, min(i, n), "text is not closed", f"add the closing {quote}"))
    return Token("str", "".join(out), start, min(i, n))
