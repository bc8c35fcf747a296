"""The context-manager shape every lab resource shares."""

from __future__ import annotations

from typing import Self


class Resource:
    """`with X(...) as x:` runs `start()`; a failed start is undone by `close()`, and
    `close()` runs again at exit. Subclasses make `close()` safe to call twice."""

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
