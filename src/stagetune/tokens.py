"""The CTC token table: ``SYMBOL ID`` files (``tokens.txt``) with ``<blank> 0``.

:class:`TokenTable` maps symbols to ids and back, is read from and written to
``tokens.txt``, or built from transcripts. Every problem is a
:class:`~stagetune.errors.DataError` naming the file and line.
This module does not import torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from stagetune.errors import DataError
from stagetune.kaldi_io import read_table

__all__ = ["BLANK", "TokenTable"]

BLANK = "<blank>"
"""The CTC blank symbol; it always has id 0."""


class TokenTable:
    """Bidirectional symbol <-> id map for CTC targets; ``<blank>`` is id 0.

    Args:
        symbols: Symbols in id order; ``symbols[0]`` must be ``<blank>``.
        path: File the table was read from, used in error messages.
    """

    def __init__(self, symbols: Sequence[str], *, path: Path | None = None) -> None:
        self.symbols: list[str] = list(symbols)
        self.path = path
        if not self.symbols or self.symbols[0] != BLANK:
            raise DataError(f"token id 0 must be {BLANK!r}, got {self.symbols[:1]}")
        self._ids = {sym: i for i, sym in enumerate(self.symbols)}
        if len(self._ids) != len(self.symbols):
            dup = next(s for s in self.symbols if self.symbols.count(s) > 1)
            raise DataError(f"token {dup!r} appears more than once; symbols must be unique")

    @classmethod
    def read(cls, path: str | Path) -> TokenTable:
        """Read a ``SYMBOL ID`` file whose ids are exactly ``0..N-1`` and ``<blank> 0``."""
        path = Path(path)
        by_id: dict[int, tuple[str, int]] = {}
        seen: dict[str, int] = {}
        for lineno, fields in read_table(path):
            if len(fields) != 2 or not fields[1].isdigit():
                raise DataError(
                    f"{path} line {lineno}: expected `SYMBOL ID` with a non-negative "
                    f"integer id, got {' '.join(fields)!r}"
                )
            sym, idx = fields[0], int(fields[1])
            if sym in seen:
                raise DataError(
                    f"{path} line {lineno}: symbol {sym!r} already defined on line {seen[sym]}"
                )
            if idx in by_id:
                raise DataError(
                    f"{path} line {lineno}: id {idx} already used by {by_id[idx][0]!r} "
                    f"on line {by_id[idx][1]}; ids must be unique"
                )
            if (idx == 0) != (sym == BLANK):
                raise DataError(
                    f"{path} line {lineno}: got `{sym} {idx}`, but the blank must be "
                    f"`{BLANK} 0` and no other symbol may use id 0"
                )
            seen[sym] = lineno
            by_id[idx] = (sym, lineno)
        if not by_id:
            raise DataError(f"{path} is empty; it needs `{BLANK} 0` and one `SYMBOL ID` per token")
        missing = sorted(set(range(len(by_id))) - set(by_id))
        if missing:
            raise DataError(
                f"{path}: ids must be contiguous 0..{len(by_id) - 1}, but id {missing[0]} is "
                f"missing (largest id {max(by_id)}); renumber the tokens"
            )
        return cls([by_id[i][0] for i in range(len(by_id))], path=path)

    @classmethod
    def from_transcripts(cls, texts: Iterable[Sequence[str]]) -> TokenTable:
        """Build a table of the sorted unique tokens of ``texts``, after ``<blank>``."""
        vocab = {tok for tokens in texts for tok in tokens}
        if BLANK in vocab:
            raise DataError(f"transcripts must not contain the reserved blank symbol {BLANK!r}")
        return cls([BLANK, *sorted(vocab)])

    def write(self, path: str | Path) -> None:
        """Write ``SYMBOL ID`` lines, readable by :meth:`read`."""
        Path(path).write_text("".join(f"{s} {i}\n" for i, s in enumerate(self.symbols)))

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Map symbols to ids; raises :class:`DataError` naming an unknown symbol."""
        try:
            return [self._ids[tok] for tok in tokens]
        except KeyError as e:
            raise DataError(f"token {e.args[0]!r} is not in {self._source()}") from None

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Map ids back to symbols."""
        return [self.symbols[i] for i in ids]

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._ids

    def __len__(self) -> int:
        return len(self.symbols)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TokenTable) and self.symbols == other.symbols

    def __repr__(self) -> str:
        return f"TokenTable({len(self)} symbols, path={self.path})"

    def _source(self) -> str:
        return str(self.path) if self.path is not None else "the token table"

