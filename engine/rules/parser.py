"""Recursive-descent parser of the condition language (no eval, no Python grammar).

Grammar, loosest binding first::

    condition  := or
    or         := and ("or" and)*
    and        := not ("and" not)*
    not        := "not" not | comparison
    comparison := sum [ ("=="|"!="|"<"|"<="|">"|">=") sum | ["not"] "in" list ]
    sum        := product (("+"|"-") product)*
    product    := unary (("*"|"/") unary)*
    unary      := "-" unary | primary
    primary    := number | "text" | true | false | "(" or ")"
                | name | name "(" [arg ("," arg)*] ")" | "context" "." name
    list       := "[" [value ("," value)*] "]"
"""

from __future__ import annotations

from dataclasses import replace
from typing import cast

from engine.rules.errors import ConditionError
from engine.rules.lexer import Token, tokenize
from engine.rules.nodes import (
    COMPARE_OPS,
    And,
    Arith,
    Bad,
    Bool,
    Call,
    Compare,
    ContextRef,
    In,
    ListLit,
    Name,
    Neg,
    Node,
    Not,
    Num,
    Or,
    Str,
)


def parse(text: str) -> Node:
    """Parse one condition; raises its first ``ConditionError`` (offsets into ``text``)."""
    tree, errors = parse_all(text)
    if errors:
        raise errors[0]
    assert tree is not None
    return tree


def parse_all(text: str) -> tuple[Node | None, list[ConditionError]]:
    """Parse one condition, going on after each syntax error: (the tree, with a ``Bad`` node where a part
    did not parse; every error, the tokenizer's first). The tree is None when nothing could be parsed."""
    lexed: list[ConditionError] = []
    parser = _Parser(text, lexed)
    tree = parser.parse()
    return tree, lexed + [e for e in parser.errors if all(e.pos != seen.pos for seen in lexed)]


def _describe(tok: Token) -> str:
    if tok.kind == "eof":
        return "the end of the condition"
    if tok.kind == "str":
        return "text"
    return f'"{tok.text}"'


class _Parser:
    def __init__(self, text: str, lexed: list[ConditionError]):
        self.text = text
        self.tokens = tokenize(text, lexed)
        self.i = 0
        self.errors: list[ConditionError] = []
        # nesting in ( ) and [ ] of each token (a closer counts as outside): where recovery stops
        self.levels: list[int] = []
        depth = 0
        for tok in self.tokens:
            if tok.kind == "op" and tok.text in (")", "]"):
                depth = max(depth - 1, 0)
            self.levels.append(depth)
            if tok.kind == "op" and tok.text in ("(", "["):
                depth += 1

    # --- helpers ----------------------------------------------------------------------------------
    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def _next(self) -> Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def _is(self, kind: str, text: str | None = None) -> bool:
        tok = self.tok
        return tok.kind == kind and (text is None or tok.text == text)

    def _fail(self, expected: str, hint: str = "") -> ConditionError:
        tok = self.tok
        end = max(tok.end, tok.pos + 1) if tok.kind != "eof" else tok.pos
        return ConditionError(tok.pos, end, f"expected {expected} but found {_describe(tok)}", hint)

    def _expect_op(self, op: str, what: str, hint: str = "") -> Token:
        if not self._is("op", op):
            raise self._fail(what, hint)
        return self._next()

    def _skip(self, level: int) -> None:
        """Skip to the next "and" / "or" at nesting ``level``, the end of an enclosing group, or the end."""
        while not self._is("eof") and self.levels[self.i] >= level:
            if self.levels[self.i] == level and self.tok.kind == "kw" and self.tok.text in ("and", "or"):
                return
            self.i += 1

    # --- grammar ----------------------------------------------------------------------------------
    def parse(self) -> Node | None:
        if self._is("eof"):
            self.errors.append(ConditionError(0, 0, "the condition is empty", 'write for example: tenure_months >= 12'))
            return None
        parts = [self._or()]
        while not self._is("eof"):
            tok = self.tok
            hint = ""
            if tok.kind in ("name", "num", "str") or self._is("op", "("):
                hint = 'combine conditions with "and" / "or"'
            elif self._is("op", ")"):
                hint = 'this ")" has no matching "("'
            self.errors.append(self._fail('"and", "or" or the end of the condition', hint))
            self._skip(0)
            if not self._is("eof"):
                self._next()  # the "and" / "or": the rest is checked too
                parts.append(self._or())
        return parts[0] if len(parts) == 1 else Bad(tuple(parts), pos=parts[0].pos, end=parts[-1].end)

    def _operand(self) -> Node:
        """One operand of "and" / "or". After a syntax error in it, the error is kept and the rest of the
        operand skipped, so that the other operands are still parsed and checked."""
        start, level = self.tok, self.levels[self.i]
        try:
            return self._not()
        except ConditionError as err:
            self.errors.append(err)
            self._skip(level)
            return Bad(pos=start.pos, end=max(start.end, err.end))

    def _or(self) -> Node:
        first = self._and()
        items = [first]
        while self._is("kw", "or"):
            self._next()
            items.append(self._and())
        if len(items) == 1:
            return first
        return Or(tuple(items), pos=first.pos, end=items[-1].end)

    def _and(self) -> Node:
        first = self._operand()
        items = [first]
        while self._is("kw", "and"):
            self._next()
            items.append(self._operand())
        if len(items) == 1:
            return first
        return And(tuple(items), pos=first.pos, end=items[-1].end)

    def _not(self) -> Node:
        if self._is("kw", "not"):
            tok = self._next()
            if self._is("kw", "in"):
                raise ConditionError(tok.pos, self.tok.end, '"not in" needs a value on its left',
                                     'e.g. segment not in ["student"]')
            operand = self._not()
            return Not(operand, pos=tok.pos, end=operand.end)
        return self._comparison()

    def _comparison(self) -> Node:
        left = self._sum()
        tok = self.tok
        if tok.kind == "op" and tok.text in COMPARE_OPS:
            self._next()
            right = self._sum()
            compare = Compare(tok.text, left, right, pos=left.pos, end=right.end)
            nxt = self.tok
            if nxt.kind == "op" and nxt.text in COMPARE_OPS:
                self.errors.append(ConditionError(
                    nxt.pos, nxt.end, "comparisons cannot be chained",
                    f"write two comparisons joined by and, e.g. a {tok.text} b and b {nxt.text} c",
                ))
                parts: list[Node] = [compare]
                while self.tok.kind == "op" and self.tok.text in COMPARE_OPS:
                    self._next()
                    parts.append(self._sum())
                return Bad(tuple(parts), pos=left.pos, end=parts[-1].end)
            return compare
        negated = False
        if self._is("kw", "not") and self.tokens[self.i + 1].kind == "kw" and self.tokens[self.i + 1].text == "in":
            self._next()
            negated = True
        if self._is("kw", "in"):
            self._next()
            lst = self._list()
            return In(left, lst.items, negated, pos=left.pos, end=lst.end)
        return left

    def _list(self) -> ListLit:
        if not self._is("op", "["):
            raise self._fail('a list such as ["a", "b"] after "in"')
        start = self._next()
        items: list[Node] = []
        if not self._is("op", "]"):
            while True:
                items.append(self._list_item())
                if self._is("op", ","):
                    self._next()
                    continue
                break
        end = self._expect_op("]", '"," or "]" in the list')
        if not items:
            self.errors.append(ConditionError(start.pos, end.end, "the list is empty",
                                              "put at least one value between [ and ]"))
        return ListLit(tuple(items), pos=start.pos, end=end.end)

    def _list_item(self) -> Node:
        tok = self.tok
        if tok.kind == "str":
            self._next()
            return Str(tok.text, pos=tok.pos, end=tok.end)
        if tok.kind == "num":
            self._next()
            return Num(cast(float, tok.value), pos=tok.pos, end=tok.end)
        if self._is("op", "-") and self.tokens[self.i + 1].kind == "num":
            self._next()
            num = self._next()
            return Num(-cast(float, num.value), pos=tok.pos, end=num.end)
        if tok.kind == "name":
            self.errors.append(ConditionError(tok.pos, tok.end, "a list holds fixed values only",
                                              f'put text in quotes: "{tok.text}"'))
            self._next()
            return Bad(pos=tok.pos, end=tok.end)
        raise self._fail('a value ("text" or a number) in the list')

    def _sum(self) -> Node:
        left = self._product()
        while self.tok.kind == "op" and self.tok.text in ("+", "-"):
            op = self._next().text
            right = self._product()
            left = Arith(op, left, right, pos=left.pos, end=right.end)
        return left

    def _product(self) -> Node:
        left = self._unary()
        while self.tok.kind == "op" and self.tok.text in ("*", "/"):
            op = self._next().text
            right = self._unary()
            left = Arith(op, left, right, pos=left.pos, end=right.end)
        return left

    def _unary(self) -> Node:
        if self._is("op", "-"):
            tok = self._next()
            operand = self._unary()
            if isinstance(operand, Num):
                return Num(-operand.value, pos=tok.pos, end=operand.end)
            return Neg(operand, pos=tok.pos, end=operand.end)
        return self._primary()

    def _primary(self) -> Node:
        tok = self.tok
        if tok.kind == "num":
            self._next()
            return Num(cast(float, tok.value), pos=tok.pos, end=tok.end)
        if tok.kind == "str":
            self._next()
            return Str(tok.text, pos=tok.pos, end=tok.end)
        if tok.kind == "kw" and tok.text in ("true", "false"):
            self._next()
            return Bool(tok.text == "true", pos=tok.pos, end=tok.end)
        if tok.kind == "bad":  # reported by the tokenizer
            self._next()
            return Bad(pos=tok.pos, end=tok.end)
        if self._is("op", "("):
            self._next()
            inner = self._or()
            if self._is("eof"):  # only the ")" is missing: what is inside is still checked
                self.errors.append(self._fail('")"', f'to close the "(" at position {tok.pos + 1} of the condition'))
                return inner
            if not self._is("op", ")"):
                raise self._fail('")"', f'to close the "(" at position {tok.pos + 1} of the condition')
            close = self._next()
            # Keep the parenthesised span so errors point at the whole group.
            return _with_span(inner, tok.pos, close.end)
        if self._is("op", "["):
            raise ConditionError(tok.pos, tok.end + 1, 'a list [...] can only follow "in" or "not in"', "")
        if tok.kind == "name":
            self._next()
            if tok.text == "context" and self._is("op", "."):
                self._next()
                key = self.tok
                if key.kind not in ("name", "kw"):
                    raise self._fail("a context key after \"context.\"", "e.g. context.intent")
                self._next()
                return ContextRef(key.text, pos=tok.pos, end=key.end)
            if self._is("op", "("):
                return self._call(tok)
            if self._is("op", "."):
                raise ConditionError(self.tok.pos, self.tok.end, 'syntax error: unexpected "."',
                                     "only context.KEY uses a dot: conditions have no attributes or methods")
            return Name(tok.text, pos=tok.pos, end=tok.end)
        if tok.kind == "kw":
            raise self._fail("a value (number, \"text\", feature name or function)")
        raise self._fail("a value (number, \"text\", feature name or function)")

    def _call(self, name: Token) -> Node:
        self._next()  # "("
        args: list[Node] = []
        if not self._is("op", ")"):
            while True:
                args.append(self._or())
                if self._is("op", ","):
                    self._next()
                    continue
                break
        close = self._expect_op(")", '"," or ")" after the function argument')
        return Call(name.text, tuple(args), pos=name.pos, end=close.end)


def _with_span(node: Node, pos: int, end: int) -> Node:
    return replace(node, pos=pos, end=end)
