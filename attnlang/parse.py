"""Text -> untyped AST, with errors that point at the column.

The Lark grammar (``grammar/attnlang.lark``) is the single source of truth for the syntax. The LALR parser runs
without recursion and the tree builder is Lark's non-recursive transformer, so long input never overflows Python's
stack; expressions nested deeper than MAX_DEPTH are refused before any later stage walks them.
"""

from __future__ import annotations

import functools
import math
import re
from importlib import resources

from lark import Lark, Token, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError
from lark.visitors import Transformer_NonRecursive

from . import ast
from .ast import Binary, Binding, Call, Const, DType, Index, Let, Op, Reduce, Span, Unary, Var, depth
from .errors import AttnLangError

__all__ = ["parse", "MAX_DEPTH", "MAX_LENGTH"]

MAX_DEPTH = 100        # deeper expressions are refused: every later stage walks the tree
MAX_LENGTH = 20_000    # characters

_TOKEN_NAMES = {
    "NAME": "a name", "INT": "an integer", "FLOAT": "a number", "COMPARE_OP": "a comparison",
    "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "COMMA": "','", "PLUS": "'+'",
    "MINUS": "'-'", "STAR": "'*'", "SLASH": "'/'", "PERCENT": "'%'", "VBAR": "'|'", "AMPERSAND": "'&'",
    "TILDE": "'~'", "CIRCUMFLEX": "'^'", "EQUAL": "'='", "SEMICOLON": "';'",
    "SHL": "'<<'", "SHR": "'>>'", "$END": "the end of the expression",
}

_COMPARE = {"<": Op.LT, "<=": Op.LE, ">": Op.GT, ">=": Op.GE, "==": Op.EQ, "!=": Op.NE}


def _span(meta) -> Span:
    return Span(meta.line, meta.column, meta.start_pos, meta.end_pos)


def _token_span(tok) -> Span:
    return Span(tok.line, tok.column, tok.start_pos, tok.end_pos)


def _binary(op):
    return lambda self, meta, children: Binary(op, children[0], children[1], _span(meta))


@v_args(meta=True)
class _Builder(Transformer_NonRecursive):
    """Builds AST nodes; one line per grammar alias."""

    def binding(self, meta, c):
        return Binding(str(c[0]), c[1], _token_span(c[0]), meta.end_pos)

    def let(self, meta, c):
        return Let(tuple(c[:-1]), c[-1], _span(meta))

    def generator(self, meta, c):
        func, body, var, count = c
        return Reduce(str(func), body, str(var), count, _span(meta), _token_span(var))

    def int_literal(self, meta, c):
        return Const(int(c[0]), DType.INT, _token_span(c[0]))

    def float_literal(self, meta, c):
        return Const(float(c[0]), DType.FLOAT, _token_span(c[0]))

    def inf_literal(self, meta, c):
        return Const(math.inf, DType.FLOAT, _span(meta))

    def true_literal(self, meta, c):
        return Const(True, DType.BOOL, _span(meta))

    def false_literal(self, meta, c):
        return Const(False, DType.BOOL, _span(meta))

    def name(self, meta, c):
        return Var(str(c[0]), _token_span(c[0]))

    def arguments(self, meta, c):
        return tuple(x for x in c if x is not None)

    def call(self, meta, c):
        return Call(str(c[0]), c[1] or (), _span(meta))

    def index(self, meta, c):
        return Index(str(c[0]), c[1], _span(meta))

    def neg(self, meta, c):
        # A minus sign on a numeric literal is part of the literal, so canonical printing of -3 round-trips.
        x = c[0]
        if isinstance(x, Const) and x.dtype in (DType.INT, DType.FLOAT) and not _is_negative(x.value):
            return Const(-x.value, x.dtype, _span(meta))
        return Unary(Op.NEG, x, _span(meta))

    def not_(self, meta, c):
        return Unary(Op.NOT, c[-1], _span(meta))

    def compare(self, meta, c):
        # a < b < c  ->  (a < b) & (b < c), as Python's chained comparisons
        operands, ops = c[0::2], c[1::2]
        pairs = [Binary(_COMPARE[str(op)], lhs, rhs, _pair_span(lhs, rhs))
                 for lhs, op, rhs in zip(operands, ops, operands[1:])]
        out = pairs[0]
        for p in pairs[1:]:
            out = Binary(Op.AND, out, p, _span(meta))
        return out

    add = _binary(Op.ADD)
    sub = _binary(Op.SUB)
    mul = _binary(Op.MUL)
    truediv = _binary(Op.TRUEDIV)
    floordiv = _binary(Op.FLOORDIV)
    mod = _binary(Op.MOD)
    pow = _binary(Op.POW)

    xor = _binary(Op.XOR)

    def lshift(self, meta, c):
        return Binary(Op.LSHIFT, c[0], c[-1], _span(meta))

    def rshift(self, meta, c):
        return Binary(Op.RSHIFT, c[0], c[-1], _span(meta))

    def and_(self, meta, c):
        return Binary(Op.AND, c[0], c[-1], _span(meta))

    def or_(self, meta, c):
        return Binary(Op.OR, c[0], c[-1], _span(meta))

    # the words `and` / `or` are logic on bools only (LANGUAGE.md); the checker refuses an int operand
    def and_word(self, meta, c):
        return Binary(Op.AND, c[0], c[-1], _span(meta), word=True)

    def or_word(self, meta, c):
        return Binary(Op.OR, c[0], c[-1], _span(meta), word=True)


class _Lines:
    """Post-lexer: a new line ends a binding (becomes ``;``) when it comes, outside brackets, after a token that can
    end the binding's expression; every other new line is white space, so expressions still span lines freely."""

    always_accept = ("_NL",)
    _ENDS = frozenset({"NAME", "INT", "FLOAT", "RPAR", "RSQB", "INF", "TRUE", "FALSE"})

    def process(self, stream):
        depth, in_binding, last = 0, False, None
        for tok in stream:
            if tok.type == "_NL":
                if in_binding and depth == 0 and last in self._ENDS:
                    in_binding, last = False, "SEMICOLON"
                    yield Token.new_borrow_pos("SEMICOLON", ";", tok)
                continue
            if tok.type in ("LPAR", "LSQB"):
                depth += 1
            elif tok.type in ("RPAR", "RSQB"):
                depth -= 1
            elif tok.type == "EQUAL" and depth == 0:
                in_binding = True
            elif tok.type == "SEMICOLON" and depth == 0:
                in_binding = False
            last = tok.type
            yield tok


def _is_negative(x) -> bool:
    return x < 0 or (x == 0 and math.copysign(1.0, x) < 0)


def _pair_span(lhs, rhs) -> Span | None:
    if lhs.span is None or rhs.span is None:
        return None
    return Span(lhs.span.line, lhs.span.column, lhs.span.start, rhs.span.end)


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    grammar = resources.files("attnlang.grammar").joinpath("attnlang.lark").read_text()
    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True, postlex=_Lines())


def _expected(tokens) -> str:
    names = set()
    for t in tokens:
        if t in _TOKEN_NAMES:
            names.add(_TOKEN_NAMES[t])
            continue
        try:
            pattern = _parser().get_terminal(t).pattern
        except KeyError:
            names.add(t)
            continue
        names.add(repr(pattern.value) if pattern.type == "str" else t.lower())
    names = sorted(names)
    return ", ".join(names[:10]) + (" or more" if len(names) > 10 else "")


def parse(text: str, where: str | None = None):
    """Parse one expression into an untyped AST.

    Args:
        text: the expression, e.g. ``"q_idx >= kv_idx"``.
        where: a word for error messages ("score" or "mask").
    Raises:
        AttnLangError: a syntax error, an over-long or over-deep expression, with line, column and a caret.
    """
    if not isinstance(text, str):
        raise AttnLangError(f"{where or 'an'} expression must be a string, got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise AttnLangError(f"expression is {len(text)} characters long; at most {MAX_LENGTH} are allowed",
                            text, 1, 1, where=where)
    if not text.strip():
        raise AttnLangError("empty expression", text, 1, 1, where=where)
    try:
        tree = _Builder().transform(_parser().parse(text))
    except UnexpectedCharacters as e:
        raise AttnLangError(f"unexpected character {text[e.pos_in_stream]!r}", text, e.line, e.column,
                            where=where) from None
    except UnexpectedEOF as e:
        lone = _lone_equals(text)
        if lone is not None:
            line, column = _position(text, lone)
            raise AttnLangError("'=' binds a name; a binding must be followed by ';' or a new line and then the "
                                "result (to compare, write '==')", text, line, column, where=where) from None
        line, column = _end_position(text)
        raise AttnLangError(f"unexpected end of expression; expected {_expected(e.expected)}", text, line, column,
                            where=where) from None
    except UnexpectedToken as e:
        tok = e.token
        if tok.type == "$END":
            lone = _lone_equals(text)
            if lone is not None:  # `a = b` alone: a binding with no result after it, or a comparison mistyped
                line, column = _position(text, lone)
                raise AttnLangError("'=' binds a name; a binding must be followed by ';' or a new line and then the "
                                    "result (to compare, write '==')", text, line, column, where=where) from None
            line, column = _end_position(text)
            accepts = e.accepts or e.expected
            if text.rstrip().endswith(";"):
                hint = " (the bindings must be followed by the result, the expression the variant computes)"
            elif "SEMICOLON" in accepts:  # `b = a +` NEWLINE `b > 0`: the new line after '+' went on with the binding
                hint = (" (the last binding runs to the end, so there is no result after it; a new line right "
                        "after an operator or inside brackets does not end a binding)")
            else:
                hint = ""
            raise AttnLangError(f"unexpected end of expression; expected {_expected(accepts)}{hint}",
                                text, line, column, where=where) from None
        # `accepts` also lists the keyword terminals (not, inf, True, ...) that `expected` leaves out
        hint = " (to compare, write '==')" if tok.type == "EQUAL" else ""
        line_start = text.rfind("\n", 0, tok.start_pos) + 1
        if line_start and not text[line_start:tok.start_pos].strip() and "=" in text[:line_start]:
            hint = " (a new line ends a binding: wrap a binding that goes on over lines in parentheses)"
        raise AttnLangError(f"unexpected {str(tok)!r}; expected {_expected(e.accepts or e.expected)}{hint}", text,
                            tok.line, tok.column, len(str(tok)), where=where) from None
    except UnexpectedInput as e:  # pragma: no cover - every subclass is handled above
        raise AttnLangError(f"syntax error: {e}", text, getattr(e, "line", 1), getattr(e, "column", 1),
                            where=where) from None
    except VisitError as e:
        raise AttnLangError(f"cannot read expression: {e.orig_exc}", text, 1, 1, where=where) from None
    except RecursionError:
        raise AttnLangError(f"expression nested too deeply; at most {MAX_DEPTH} levels", text, 1, 1,
                            where=where) from None
    d = depth(tree)
    if d > MAX_DEPTH:  # long written chains of | & ^ regrouped first; what is accepted as written stays as written
        tree = _regroup_chains(tree)
        d = depth(tree)
    if d > MAX_DEPTH:
        hint = ("; a chain of n operators nests n levels: group it with parentheses, or write a reduction "
                "(sum / any / all / max / min over range(K))") if _longest_chain(tree) > MAX_DEPTH // 2 else ""
        raise AttnLangError(f"expression nested too deeply ({d} levels; at most {MAX_DEPTH}){hint}", text, 1, 1,
                            len(text), where=where)
    return tree


_REGROUP = frozenset({Op.AND, Op.OR, Op.XOR})  # associative exactly, on bools and on ints alike


def _chain_operands(node) -> list:
    """The operands of the chain of ``node``'s operator under ``node`` (same op and spelling), left to right."""
    out, stack = [], [node]
    while stack:
        n = stack.pop()
        if isinstance(n, Binary) and n.op is node.op and n.word == node.word:
            stack += [n.right, n.left]
        else:
            out.append(n)
    return out


def _regroup_chains(tree):
    """Every chain of ``|``, ``&`` or ``^`` (``a | b | c | ...``, as written, or a chained comparison's pairs) as a
    balanced tree of the same operands in the same order: n operands nest log2(n) levels instead of n - 1, as the
    expansions of any() / all() do. Exact: the operators are associative on bools and on ints. No recursion."""
    done: dict[int, object] = {}
    stack = [(tree, False)]
    while stack:
        node, ready = stack.pop()
        if id(node) in done:
            continue
        chain = isinstance(node, Binary) and node.op in _REGROUP
        kids = _chain_operands(node) if chain else ast.children(node)
        if not ready:
            stack.append((node, True))
            stack += [(k, False) for k in kids if id(k) not in done]
            continue
        new = [done[id(k)] for k in kids]
        done[id(node)] = _balanced(node, new) if chain else ast.with_children(node, tuple(new))
    return done[id(tree)]


def _balanced(node, operands: list):
    if len(operands) == 1:
        return operands[0]
    mid = len(operands) // 2
    left, right = _balanced(node, operands[:mid]), _balanced(node, operands[mid:])
    span = node.span if left.span is None or right.span is None else Span(
        left.span.line, left.span.column, left.span.start, right.span.end)
    return Binary(node.op, left, right, span, word=node.word)


def _longest_chain(tree) -> int:
    """Operators in the longest left- or right-nested run of one binary operator."""
    best = 0
    for n in ast.walk(tree):
        if isinstance(n, Binary):
            run, m = 0, n
            while isinstance(m, Binary) and m.op is n.op:
                run, m = run + 1, m.left
            best = max(best, run)
    return best


def _lone_equals(text: str) -> int | None:
    """Offset of the last '=' that is neither part of a comparison nor followed by ';' / a new line."""
    found = [m.start() for m in re.finditer(r"(?<![=<>!])=(?!=)", text)]
    if not found or re.search(r"[;\n]", text[found[-1]:].rstrip()):
        return None
    return found[-1]


def _position(text: str, pos: int) -> tuple[int, int]:
    before = text[:pos].split("\n")
    return len(before), len(before[-1]) + 1


def _end_position(text: str) -> tuple[int, int]:
    lines = text.split("\n")
    return len(lines), len(lines[-1]) + 1
