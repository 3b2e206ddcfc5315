"""The common streamed OpenAI chunk rewritten as text: no parse, no re-encode.

Nearly every chunk of a stream is one token of one choice, with nothing to finish and no usage.
`Normaliser.chunk` would parse it, rewrite its header (`id`, `object`, `created`, `model`),
drop the repeated `role` and encode it again; `Splicer.event` gives the same bytes by cutting
the engine's fields out of the text and placing them in the request's own frame. Anything else
(a finishing chunk, usage, tool calls, logprobs, an error, another key order inside a choice,
text that is not valid JSON) is not matched and takes the full path, so the client sees byte for
byte what the full path sends. A string is passed as the engine wrote it only when it is already
in the form the router's encoder writes (printable ASCII, no escapes); otherwise it is decoded
and encoded once, as the full path would.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

_STR = r'"(?:[^"\\]|\\.)*"'
_CHAT_CHOICE = (
    r'\{"index":0,"delta":\{(?P<role>"role":"assistant",)?"content":(?P<text>' + _STR
    + r')\},"logprobs":null,"finish_reason":null\}'
)  # fmt: skip
_TEXT_CHOICE = (
    r'\{"index":0,"text":(?P<text>' + _STR + r'),"logprobs":null,"finish_reason":(?:null|"")\}'
)


def _chunk(choice: str) -> re.Pattern[str]:
    """A chunk whose members are those the full path reads or drops, in any order, `choices`
    holding one plain choice. Each member is followed by a comma and the next, or the end."""
    member = (
        r'"id":' + _STR + r'|"object":' + _STR + r'|"created":\d+|"model":' + _STR
        + r'|"system_fingerprint":(?P<fp>' + _STR + r'|null)|"usage":null'
        + r'|"choices":\[(?P<choice>' + choice + r")\]"
    )  # fmt: skip
    return re.compile(r"\{(?:(?:" + member + r')(?:,(?="[a-z])|(?=\})))+\}')


_CHAT = _chunk(_CHAT_CHOICE)
_TEXT = _chunk(_TEXT_CHOICE)


def canonical(raw: str) -> str:
    """A JSON string as the router's encoder writes it (`json.dumps`, ASCII only); raises
    ValueError for one that is not valid JSON."""
    if raw.isascii() and raw.isprintable() and "\\" not in raw:
        return raw
    return json.dumps(json.loads(raw))


class Splicer:
    """One request's frame around its engine's plain chunks. `header`: the `id`, `object`,
    `created` and `model` members as the full path encodes them, without the closing brace;
    `started`/`start`: whether the stream's first delta went out (it alone keeps `role`)."""

    def __init__(
        self, header: str, chat: bool, started: Callable[[], bool], start: Callable[[], None]
    ) -> None:
        self._head = "data: " + header + ',"system_fingerprint":'
        self._pattern = _CHAT if chat else _TEXT
        self._chat = chat
        self._started = started
        self._start = start
        self._fp_raw = self._fp = "null"

    def event(self, data: str) -> tuple[bytes, int] | None:
        """The SSE event and the tokens it carries (0 or 1), or None: not a plain chunk."""
        match = self._pattern.fullmatch(data)
        if match is None or match["choice"] is None:
            return None
        raw = match["text"]
        try:
            text = canonical(raw)
            fp = match["fp"] or "null"
            if fp != self._fp_raw:
                self._fp = canonical(fp) if fp != "null" else fp
                self._fp_raw = fp
        except ValueError:
            return None
        if self._chat:
            role = '"role":"assistant",' if match["role"] and not self._started() else ""
            self._start()
            body = '{"index":0,"delta":{' + role + '"content":' + text + "}"
        else:
            body = '{"index":0,"text":' + text
        tail = ',"logprobs":null,"finish_reason":null}]}\n\n'
        return (self._head + self._fp + ',"choices":[' + body + tail).encode(), int(raw != '""')
