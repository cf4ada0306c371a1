"""One choice's calls and content as its text grows, for a stream and for the finished
response alike, and the point where generating more would only repeat calls.

Each push re-reads the whole text (tool outputs are short) and hands out what is new: the
next piece of content, the calls completed since, and whether to stop. A choice stops once it
has made as many calls as it may (one without parallel calls; the Responses API's
max_tool_calls) or starts to repeat itself: a call equal to an earlier one (same function,
same arguments) ends it and is dropped, as small models otherwise repeat a call until
max_tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from server.protocol.tools import ToolCallOut
from server.serving.tool_calls.parser import ParsedCall, Scan
from server.serving.tool_calls.plan import ToolPlan


@dataclass
class Progress:
    content: str = ""  # new content since the last push
    calls: list[ToolCallOut] = field(default_factory=list)  # calls completed since
    stop: bool = False  # the choice has called enough: end it now


class ToolCallStream:
    def __init__(self, plan: ToolPlan) -> None:
        self._plan = plan
        self._names = plan.names()
        self._seen: set[tuple[str, str]] = set()
        self.calls: list[ToolCallOut] = []
        self.content = ""  # released so far
        self.stopped = False

    def push(self, text: str, final: bool) -> Progress:
        """What `text` (the choice's whole text so far) adds; final: the text is whole."""
        progress = Progress()
        if self.stopped:
            return progress
        scan = self._plan.parser.scan(text, self._names, final)
        for call in scan.calls[len(self.calls):]:
            if self._at_limit or call.key in self._seen:
                self.stopped = True  # and this call is dropped
                break
            self._seen.add(call.key)
            out = self._out(call)
            self.calls.append(out)
            progress.calls.append(out)
        self.stopped = progress.stop = self.stopped or self._at_limit
        if self.stopped:  # the text after the last kept call is the choice's last
            kept = len(self.calls)
            scan = Scan(pieces=scan.pieces[:kept + 1], calls=scan.calls[:kept])
        content = scan.content(final or self.stopped)
        if len(content) > len(self.content) and content.startswith(self.content):
            progress.content = content[len(self.content):]
            self.content = content
        return progress

    @property
    def _at_limit(self) -> bool:
        limit = self._plan.call_limit
        return limit is not None and len(self.calls) >= limit

    def _out(self, call: ParsedCall) -> ToolCallOut:
        return ToolCallOut(id=self._plan.parser.call_id(),
                           function={"name": call.name,
                                     "arguments": json.dumps(call.arguments)})

    def result(self) -> tuple[str | None, list[ToolCallOut]]:
        """(the message's content, or None beside calls; the calls)."""
        if not self.calls:
            return self.content, []
        return self.content or None, self.calls
