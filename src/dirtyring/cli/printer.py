"""Where a long-running command's events go: JSON lines for programs (``--json``), or text for
people, with a status line rewritten in place on a terminal (live view).

Every JSON line carries ``"v"``: the version of the event schema (``docs/operations/events.md``
documents every event and its fields). It goes up when a field changes meaning or goes away;
new events and new fields do not change it, so readers should ignore what they do not know."""
from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

Event = dict[str, Any]

#: The version of the JSON event schema, the ``"v"`` field of every JSON line.
EVENT_SCHEMA_VERSION = 1


class EventPrinter:
    """Call it with each event (from any thread). ``render(printer, event)`` prints the kinds
    a command knows, with :meth:`status` and :meth:`line`, and returns True; any other event is
    printed as ``kind: key=value ...``."""

    def __init__(self, as_json: bool, live: bool,
                 render: Callable[[EventPrinter, Event], bool] | None = None,
                 hide: tuple[str, ...] = ("event", "t"), file: TextIO | None = None) -> None:
        self.as_json = as_json
        #: Where it prints (stdout unless set; a Linux program's own output owns stdout).
        self.file = file
        self.live = live
        self.render = render
        self.hide = hide
        self._lock = threading.Lock()
        self._pending = False  # a status line waits for its newline

    def __call__(self, e: Event) -> None:
        with self._lock:
            if self.as_json:
                print(json.dumps({"v": EVENT_SCHEMA_VERSION, **e}), flush=True,
                      file=self.file or sys.stdout)
            elif self.render is None or not self.render(self, e):
                rest = " ".join(f"{k}={v}" for k, v in e.items() if k not in self.hide)
                self.line(f"{e['event']}: {rest}")

    def status(self, text: str) -> None:
        """A line that the next status replaces in place (live), else an ordinary line."""
        if self.live:
            print("\r" + text, end="", flush=True, file=self.file or sys.stdout)
            self._pending = True
        else:
            self.line(text)

    def line(self, text: str) -> None:
        out = self.file or sys.stdout
        if self._pending:
            print(file=out)
            self._pending = False
        print(text, flush=True, file=out)
