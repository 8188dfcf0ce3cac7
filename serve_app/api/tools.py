"""Tool calling in the Hermes / Qwen format: `<tool_call>{"name": .., "arguments": ..}</tool_call>`.

- `tool_call_grammar`: for tool_choice "required" or a named function, a Lark grammar (with
  llguidance's `%json` rules) that only allows tool calls whose arguments validate against
  the tool's `parameters` schema (vLLM's `get_json_schema_from_tools` idea, kept in the
  model's own tool-call format so one parser serves every tool_choice).
- `ToolCallParser`: splits model text into content and tool calls, incrementally, as vLLM's
  `hermes` tool parser does: a call's index, id and name go out in its first delta, then
  argument fragments; the SDK concatenates them.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from serve_app.engine.request import JSON_OPTIONS, GrammarSpec

START, END = "<tool_call>", "</tool_call>"
# Calls the grammar allows in one turn when parallel_tool_calls is true.
MAX_PARALLEL_CALLS = 4
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def call_prefix(name: str) -> str:
    """What the grammar makes the model write before a call's arguments."""
    return START + "\n" + '{"name": ' + json.dumps(name) + ', "arguments": '


def tool_call_grammar(tools: list[tuple[str, dict]], parallel: bool) -> GrammarSpec:
    """tools: (name, parameters schema) of the functions the model may call (one when named)."""
    lines = ["%llguidance {}"]
    more = f' ("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
    lines.append("start: call" + more)
    lines.append("call: " + " | ".join(f"call_{i}" for i in range(len(tools))))
    for i, (name, schema) in enumerate(tools):
        schema = {**schema, "x-guidance": JSON_OPTIONS}
        lines.append(f'call_{i}: {json.dumps(call_prefix(name))} args_{i} "}}\\n{END}"')
        lines.append(f"args_{i}: %json {json.dumps(schema)}")
    return GrammarSpec("grammar", "\n".join(lines), "tool_choice")


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _first_delta(index: int, name: str, arguments: str) -> dict:
    return {
        "index": index,
        "id": _call_id(),
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def _args_delta(index: int, fragment: str) -> dict:
    return {"index": index, "function": {"arguments": fragment}}


def _longest_tag_prefix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag (held back)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


@dataclass
class ToolCallParser:
    """Feed model text in pieces; get (content delta, tool-call deltas) back."""

    buf: str = ""
    in_call: bool = False
    num_calls: int = 0
    name_sent: bool = False
    args_sent: int = 0  # characters of the current call's arguments already sent
    content_started: bool = False
    deltas: list[dict] = field(default_factory=list)

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.buf += text
        content, self.deltas = [], []
        while True:
            if not self.in_call:
                pos = self.buf.find(START)
                if pos < 0:
                    keep = _longest_tag_prefix(self.buf, START)
                    content.append(self.buf[: len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep :]
                    break
                content.append(self.buf[:pos])
                self.buf = self.buf[pos + len(START) :]
                self.in_call, self.name_sent, self.args_sent = True, False, 0
                continue
            end = self.buf.find(END)
            if end < 0:
                self._stream_arguments()
                break
            content.append(self._close_call(self.buf[:end]))
            self.buf = self.buf[end + len(END) :].lstrip("\n")
            self.in_call = False
        return self._content("".join(content)), self.deltas

    def finish(self) -> tuple[str, list[dict]]:
        """Flush at the end of the output (an unclosed call keeps its raw arguments)."""
        self.deltas = []
        text, self.buf = self.buf, ""
        if not self.in_call:
            return self._content(text), []
        self.in_call = False
        if self.name_sent:
            # Cut off (max_tokens) after the call's JSON but inside the closing tag: close the
            # call as usual instead of sending the wrapper's '}' and the partial tag as arguments.
            body = text[: len(text) - _longest_tag_prefix(text, END)].rstrip()
            if _is_json(body):
                self._close_call(body)
                return "", self.deltas
            m = _HEAD.match(text)
            rest = text[m.end() :] if m else text
            if len(rest) > self.args_sent:
                self.deltas.append(_args_delta(self.num_calls - 1, rest[self.args_sent :]))
            return "", self.deltas
        return self._content(START + text), []

    def _content(self, text: str) -> str:
        if self.num_calls and not text.strip():
            return ""  # whitespace between / after calls
        if not self.content_started:
            text = text.lstrip("\n") if self.num_calls else text
            self.content_started = bool(text)
        return text

    def _stream_arguments(self) -> None:
        """Send the arguments seen so far, up to (not incl.) the last '}', which may close
        the call's wrapper object rather than the arguments."""
        m = _HEAD.match(self.buf)
        if m is None:
            return
        if not self.name_sent:
            name = json.loads(f'"{m.group(1)}"')
            self.deltas.append(_first_delta(self.num_calls, name, ""))
            self.num_calls += 1
            self.name_sent = True
        body = self.buf[m.end() :]
        safe = body[: body.rfind("}")].rstrip() if "}" in body else ""
        if len(safe) > self.args_sent:
            self.deltas.append(_args_delta(self.num_calls - 1, safe[self.args_sent :]))
            self.args_sent = len(safe)

    def _close_call(self, body: str) -> str:
        """Ends the current call; returns the text to show as content if it was no call."""
        try:
            call = json.loads(body)
            name = call["name"]
            args = call.get("arguments", call.get("parameters", {}))
            args_text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        except (ValueError, KeyError, TypeError):
            call = None
        if call is None or not isinstance(name, str):
            return "" if self.name_sent else START + body + END  # no call after all
        m = _HEAD.match(body)
        if not self.name_sent:
            # Arguments as the model wrote them when "name" comes first, else re-serialised.
            self.deltas.append(_first_delta(self.num_calls, name, "" if m else args_text))
            self.num_calls += 1
            self.name_sent = m is not None
            if m is None:
                return ""
        raw = body[m.end() :].rstrip()
        raw = raw[:-1].rstrip() if raw.endswith("}") else raw
        if len(raw) > self.args_sent:
            self.deltas.append(_args_delta(self.num_calls - 1, raw[self.args_sent :]))
        return ""


def merge_tool_deltas(deltas: list[dict]) -> list[dict]:
    """Streamed deltas -> whole tool calls (for non-streamed responses)."""
    calls: list[dict] = []
    for d in deltas:
        if "id" in d:
            calls.append({"id": d["id"], "type": "function", "function": dict(d["function"])})
        else:
            calls[d["index"]]["function"]["arguments"] += d["function"]["arguments"]
    return calls
