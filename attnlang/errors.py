"""AttnLangError: every error attnlang raises about a user's expression, inputs or configuration."""

from __future__ import annotations

__all__ = ["AttnLangError"]


class AttnLangError(ValueError):
    """A bad expression, parameter, tensor or configuration.

    Attributes:
        message: what is wrong and, where possible, what was expected.
        source: the expression text the error points into, or None when it is not about a position.
        line, column: 1-based position of the offending token in ``source`` (None without a source).
        length: how many characters the caret underlines.
        where: which expression the source is ("score", "mask"), or another context word.

    ``str(err)`` gives "line L, column C: message" followed by the source line and a caret under the token.
    """

    def __init__(self, message: str, source: str | None = None, line: int | None = None,
                 column: int | None = None, length: int = 1, where: str | None = None):
        self.message = message
        self.source = source
        self.line = line
        self.column = column
        self.length = max(1, length)
        self.where = where
        super().__init__(self._render())

    @classmethod
    def at(cls, message: str, source: str, span, where: str | None = None) -> "AttnLangError":
        """An error under the token at ``span`` (an attnlang.ast.Span) of ``source``."""
        if span is None:
            return cls(message, source=source, where=where)
        return cls(message, source, span.line, span.column, span.end - span.start, where)

    def _render(self) -> str:
        head = f"{self.where} expression, " if self.where and self.line is not None else ""
        if self.source is None or self.line is None:
            return self.message
        lines = self.source.split("\n")
        text = lines[self.line - 1] if 0 < self.line <= len(lines) else ""
        text = text.removesuffix("\r")  # a CRLF source: the shown line ends before its '\r'
        start = self.column - 1
        length = min(self.length, max(1, len(text) - start))
        if len(text) > _WIDTH:  # show a window of a long line around the fault
            lo = max(0, min(start - _WIDTH // 2, len(text) - _WIDTH))
            shown = ("..." if lo else "") + text[lo:lo + _WIDTH] + ("..." if lo + _WIDTH < len(text) else "")
            start = start - lo + (3 if lo else 0)
            text, length = shown, min(length, _WIDTH - (start - (3 if lo else 0)))
        # keep the source's tabs in the indent, so the caret lines up however a terminal renders a tab
        caret = "".join("\t" if c == "\t" else " " for c in text[:start]).ljust(start) + "^" * max(1, length)
        return f"{head}line {self.line}, column {self.column}: {self.message}\n    {text}\n    {caret}"


_WIDTH = 100  # characters of a source line shown in a message
