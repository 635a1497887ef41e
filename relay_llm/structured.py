"""Structured generation: JSON Schema output and tool calls by grammar-constrained decoding (xgrammar).

Every face (LangChain, LlamaIndex, the server) goes through `RelayEngine.chat` / `stream` with
`response_format=`, `tools=`, `tool_choice=`, `parallel_tool_calls=`; this module turns those into

* a prompt: tools listed in a system preamble, assistant `tool_calls` rendered back as text
  (`template_messages`);
* a grammar: compiled once per tokenizer and cached by the hash of its spec (`GrammarCache`), applied
  to the logits as a token bitmask at every decode step (`Constraint`);
* a parse of the output: text content plus OpenAI-shaped `tool_calls`, incrementally while streaming
  (`ToolCallParser`, `tool_call_chunks`).

Tool-call format (documented; also the Hermes / Qwen 2.5 / Qwen 3 format), one block per call,
blocks separated by a newline:

    <tool_call>
    {"name": "<tool name>", "arguments": <arguments: a JSON object valid against the tool's parameters>}
    </tool_call>

The arguments are emitted in compact JSON with ", " and ": " separators (what `json.dumps` writes), so
a call rendered back into a later prompt is the same text the model generated, and relay reuse finds it.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .closing import Candidates

CALL_OPEN = "<tool_call>"
CALL_HEAD = '<tool_call>\n{"name": "'  # + name
ARGS_HEAD = '", "arguments": '  # + arguments JSON
CALL_CLOSE = "}\n</tool_call>"
CALL_SEPARATOR = "\n"

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_HEAD_RE = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"arguments"\s*:\s*')
_PARTIAL_HEAD_RE = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]*)(")?')  # a head cut off after the name began

# JSON Schema keywords xgrammar accepts but does not enforce: a grammar built from them could emit JSON
# that fails the schema, so they are refused (a truthy / non-empty value only).
UNSUPPORTED_KEYWORDS = ("not", "if", "contains", "minContains", "dependentRequired", "uniqueItems",
                        "allOf", "dependencies")
_SUBSCHEMA_DICTS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMA_ONE = ("additionalProperties", "items", "propertyNames", "unevaluatedProperties",
                  "unevaluatedItems", "additionalItems", "not", "if", "then", "else", "contains")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")


# ---- request -> plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolPlan:
    """What one request asks for, validated.

    mode: "none" (plain text, no tools), "auto" (text or calls), "required" (one or more calls of
    `allowed`), "named" (calls of the single tool in `allowed`). schema: the response_format schema
    (None: free text). tools: normalised OpenAI tool specs, in the caller's order.
    """

    mode: str = "none"
    tools: tuple[dict, ...] = ()
    allowed: tuple[str, ...] = ()
    parallel: bool = False
    schema: dict | None = None

    @property
    def calls_tools(self) -> bool:
        return self.mode != "none"

    def grammar_spec(self) -> dict | None:
        """The grammar as a JSON-able spec ({"json_schema": S} or {"structural_tag": T}); None = free text."""
        if not self.calls_tools:
            return None if self.schema is None else {"json_schema": self.schema}
        by_name = {t["function"]["name"]: t["function"] for t in self.tools}
        tags = [_call_tag(name, by_name[name]["parameters"]) for name in self.allowed]
        once = not self.parallel
        if self.mode in ("required", "named"):
            fmt: dict = {"type": "tags_with_separator", "tags": tags, "separator": CALL_SEPARATOR,
                         "at_least_one": True, "stop_after_first": once}
        elif self.schema is not None:  # auto + response_format: either calls or the JSON answer
            calls = {"type": "tags_with_separator", "tags": tags, "separator": CALL_SEPARATOR,
                     "at_least_one": True, "stop_after_first": once}
            fmt = {"type": "or", "elements": [calls, {"type": "json_schema", "json_schema": self.schema}]}
        else:
            fmt = {"type": "triggered_tags", "triggers": [CALL_OPEN], "tags": tags, "stop_after_first": once}
        return {"structural_tag": {"type": "structural_tag", "format": fmt}}


def _call_tag(name: str, parameters: dict) -> dict:
    return {"type": "tag", "begin": f"{CALL_HEAD}{name}{ARGS_HEAD}",
            "content": {"type": "json_schema", "json_schema": parameters}, "end": CALL_CLOSE}


def plan_request(response_format: dict | None = None, tools: list[dict] | None = None,
                 tool_choice: str | dict | None = None, parallel_tool_calls: bool = False) -> ToolPlan:
    """Validate the structured-output arguments of one call. Raises ValueError on bad input."""
    schema = response_schema(response_format)
    specs = normalize_tools(tools)
    if not isinstance(parallel_tool_calls, bool):
        raise ValueError(f"parallel_tool_calls must be a bool, got {parallel_tool_calls!r}")
    mode, named = normalize_tool_choice(tool_choice, [t["function"]["name"] for t in specs])
    if not specs:
        mode = "none"
    if mode == "none":
        return ToolPlan(schema=schema)
    allowed = (named,) if named else tuple(t["function"]["name"] for t in specs)
    return ToolPlan(mode=mode, tools=tuple(specs), allowed=allowed, parallel=parallel_tool_calls, schema=schema)


def response_schema(response_format: dict | None) -> dict | None:
    """The JSON schema a response_format asks for; None for free text.

    Accepts {"type": "text"}, {"type": "json_object"}, {"type": "json_schema", "json_schema": {"name",
    "schema", "strict"}} (OpenAI) and {"type": "json_schema", "schema": S} (short form).
    """
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or "type" not in response_format:
        raise ValueError("response_format must be a dict with a 'type': 'text', 'json_object' or 'json_schema'")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise ValueError(f"response_format type {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'")
    inner = response_format.get("json_schema")
    schema = inner.get("schema") if isinstance(inner, dict) else response_format.get("schema")
    if not isinstance(schema, dict):
        raise ValueError("response_format json_schema needs a 'schema' object (a JSON Schema dict)")
    check_schema(schema, "response_format schema")
    return schema


def normalize_tools(tools: list[dict] | None) -> list[dict]:
    """OpenAI tool specs, checked: [{"type": "function", "function": {"name", "description", "parameters"}}].

    A missing `parameters` becomes {"type": "object"} (any arguments object).
    """
    if tools is None:
        return []
    if not isinstance(tools, (list, tuple)):
        raise ValueError("tools must be a list of OpenAI tool specs")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name', 'parameters'}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"tools[{i}].function.name must be 1-64 characters of letters, digits, '_', '-', '.', "
                             f"':'; got {name!r}")
        if name in seen:
            raise ValueError(f"tools[{i}]: duplicate tool name {name!r}")
        seen.add(name)
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object"}
        if not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON Schema object")
        if params.get("type", "object") != "object":
            raise ValueError(f"tools[{i}].function.parameters must describe an object (type 'object')")
        check_schema(params, f"tools[{i}].function.parameters")
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise ValueError(f"tools[{i}].function.description must be a string")
        spec = {"name": name, **({"description": description} if description else {}), "parameters": params}
        out.append({"type": "function", "function": spec})
    return out


def normalize_tool_choice(choice: str | dict | None, names: list[str]) -> tuple[str, str | None]:
    """(mode, tool name): mode "none" | "auto" | "required" | "named".

    choice: None (auto when tools are given), "none", "auto", "required", "any" (= required), a tool name,
    {"type": "function", "function": {"name": ...}} or {"type": "function", "name": ...}.
    """
    if choice is None or choice == "auto":
        return "auto", None
    if choice == "none":
        return "none", None
    if choice in ("required", "any"):
        if not names:
            raise ValueError(f"tool_choice {choice!r} needs at least one tool")
        return "required", None
    name = choice
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else choice.get("name")
        if choice.get("type", "function") != "function" or not isinstance(name, str):
            raise ValueError(f"tool_choice must be 'none', 'auto', 'required', a tool name or "
                             f"{{'type': 'function', 'function': {{'name': ...}}}}; got {choice!r}")
    if not isinstance(name, str):
        raise ValueError(f"tool_choice must be a string or a dict, got {choice!r}")
    if name not in names:
        known = ", ".join(names) or "none given"
        raise ValueError(f"tool_choice names unknown tool {name!r} (tools: {known})")
    return "named", name


def check_schema(schema: Any, where: str) -> None:
    """Refuse JSON Schema keywords the grammar engine would silently ignore. Raises ValueError."""

    def walk(node: Any, path: str) -> None:
        if isinstance(node, bool):
            return
        if not isinstance(node, dict):
            raise ValueError(f"{where}: {path or 'the schema'} must be a JSON Schema object, got {node!r}")
        for key in UNSUPPORTED_KEYWORDS:
            if node.get(key) not in (None, False, [], {}):
                raise ValueError(f"{where}: JSON Schema keyword {key!r} (at {path or '/'}) is not supported by "
                                 "the grammar engine (xgrammar)")
        for key in _SUBSCHEMA_DICTS:
            if isinstance(node.get(key), dict):
                for k, sub in node[key].items():
                    walk(sub, f"{path}/{key}/{k}")
        for key in _SUBSCHEMA_ONE:
            if isinstance(node.get(key), (dict, bool)):
                walk(node[key], f"{path}/{key}")
        for key in _SUBSCHEMA_LISTS:
            if isinstance(node.get(key), list):
                for j, sub in enumerate(node[key]):
                    walk(sub, f"{path}/{key}/{j}")

    walk(schema, "")


# ---- grammars ------------------------------------------------------------------------------------


class GrammarCache:
    """xgrammar compiler for one tokenizer, and compiled grammars cached by the hash of their spec.

    vocab_size: the model's (logits) vocabulary, which may exceed the tokenizer's. stop_ids: the tokens
    that end a generation (the engine's EOS ids); a finished grammar allows only these.
    `compiles` counts compilations (cache misses), `hits` the cache hits.
    """

    def __init__(self, tokenizer, vocab_size: int, stop_ids: set[int], max_entries: int = 256, threads: int = 1):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = sorted(stop_ids)
        self.max_entries = max_entries
        self.threads = threads
        self.compiles = 0
        self.hits = 0
        self._compiler = None
        self._info = None
        self._texts: list[str] | None = None
        self._candidates: Candidates | None = None
        self._grammars: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def compiler(self):
        """The xgrammar GrammarCompiler (built on first use: reads the whole vocabulary, ~3 s at 262k)."""
        if self._compiler is None:
            import xgrammar as xgr

            self._info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                            stop_token_ids=self.stop_ids)
            self._compiler = xgr.GrammarCompiler(self._info, max_threads=self.threads, cache_enabled=False)
        return self._compiler

    @property
    def token_texts(self) -> list[str]:
        """Every token's own text (xgrammar's decoded vocabulary; bytes that are not UTF-8 on their own: U+FFFD)."""
        if self._texts is None:
            _ = self.compiler
            texts = [b.decode("utf-8", errors="replace") for b in self._info.decoded_vocab]
            self._texts = texts + [""] * (self.vocab_size - len(texts))
        return self._texts

    @property
    def closing_candidates(self) -> Candidates:
        """The tokens the budget-aware ending may choose (relay_llm.closing), found once per tokenizer."""
        if self._candidates is None:
            self._candidates = Candidates(self.token_texts)
        return self._candidates

    @staticmethod
    def key(spec: dict) -> str:
        """sha256 of the spec's JSON (key order kept: it is the order properties are generated in)."""
        return hashlib.sha256(json.dumps(spec, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()

    def get(self, spec: dict) -> Grammar:
        """The compiled grammar for {"json_schema": S} or {"structural_tag": T}. Raises ValueError if it
        cannot be compiled, naming xgrammar's reason."""
        key = self.key(spec)
        with self._lock:
            if key in self._grammars:
                self.hits += 1
                self._grammars.move_to_end(key)
                return Grammar(self._grammars[key], self.stop_ids, self.vocab_size, key)
            compiled = self._compile(spec)
            self.compiles += 1
            self._grammars[key] = compiled
            if len(self._grammars) > self.max_entries:
                self._grammars.popitem(last=False)
            return Grammar(compiled, self.stop_ids, self.vocab_size, key)

    def _compile(self, spec: dict):
        compiler = self.compiler
        if "json_schema" in spec:
            try:
                return compiler.compile_json_schema(json.dumps(spec["json_schema"]), **JSON_STYLE)
            except (RuntimeError, ValueError, TypeError) as exc:
                raise ValueError("the response_format JSON schema cannot be compiled by the grammar engine "
                                 f"(xgrammar): {_xgrammar_reason(exc)}") from None
        tag = _compact_json(spec["structural_tag"], "the tool-call grammar")
        try:
            return compiler.compile_structural_tag(json.dumps(tag))
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(f"the tool-call grammar cannot be compiled by the grammar engine (xgrammar): "
                             f"{_xgrammar_reason(exc)}") from None


JSON_STYLE = dict(any_whitespace=False, strict_mode=True)  # compact JSON, ", " / ": "; no unlisted properties


def _compact_json(node: Any, where: str) -> Any:
    """A structural tag with each {"type": "json_schema"} format replaced by the EBNF grammar of compact JSON
    (structural tags would otherwise allow any whitespace inside the JSON). Raises ValueError naming the tool."""
    if isinstance(node, list):
        return [_compact_json(x, where) for x in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "tag" and isinstance(node.get("begin"), str) and node["begin"].startswith(CALL_HEAD):
        where = f"the parameters of tool {node['begin'][len(CALL_HEAD):].split(chr(34))[0]!r}"
    if node.get("type") == "json_schema":
        import xgrammar as xgr

        try:
            grammar = xgr.Grammar.from_json_schema(json.dumps(node["json_schema"]), **JSON_STYLE)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(f"{where}: the JSON schema cannot be compiled by the grammar engine (xgrammar): "
                             f"{_xgrammar_reason(exc)}") from None
        return {"type": "grammar", "grammar": str(grammar)}
    return {k: _compact_json(v, where) for k, v in node.items()}


def _xgrammar_reason(exc: Exception) -> str:
    """xgrammar's message without its C++ source location ("[12:00:00] /project/cpp/x.cc:12: ...")."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return re.sub(r"^\[[\d:]+\]\s*\S+:\d+:\s*", "", text).removeprefix("Check failed: (error.empty()) is false: ")


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar for one engine: `matcher()` starts a per-request `Constraint`."""

    compiled: Any
    stop_ids: list[int]
    vocab_size: int
    key: str

    def matcher(self) -> Constraint:
        return Constraint(self)


class Constraint:
    """Per-request grammar state: masks each step's logits and accepts each sampled token."""

    def __init__(self, grammar: Grammar):
        import xgrammar as xgr

        self._xgr = xgr
        self._matcher = xgr.GrammarMatcher(grammar.compiled, override_stop_tokens=grammar.stop_ids)
        self._bitmask = xgr.allocate_token_bitmask(1, grammar.vocab_size)
        self.vocab_size = grammar.vocab_size

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits [vocab] of tokens the grammar forbids next to -inf, in place."""
        self._matcher.fill_next_token_bitmask(self._bitmask)
        bitmask = self._bitmask if logits.device.type == "cpu" else self._bitmask.to(logits.device, non_blocking=True)
        self._xgr.apply_token_bitmask_inplace(logits.view(1, -1), bitmask, vocab_size=self.vocab_size)

    def accept(self, token: int) -> bool:
        """Advance by one sampled token; False if the grammar does not allow it."""
        return self._matcher.accept_token(token)

    @property
    def bitmask(self) -> torch.Tensor:
        """[1, ceil(vocab / 32)] int32: the tokens allowed at the last `mask` (bit i of word i // 32)."""
        return self._bitmask

    def new_bitmask(self) -> torch.Tensor:
        return self._xgr.allocate_token_bitmask(1, self.vocab_size)

    @property
    def matcher(self):
        """The xgrammar GrammarMatcher (read-only use: `find_jump_forward_string`)."""
        return self._matcher

    def fork(self):
        """An independent copy of the matcher (xgrammar's), for looking ahead."""
        return self._matcher.fork()

    @property
    def terminated(self) -> bool:
        """A stop token was accepted: the output is complete."""
        return self._matcher.is_terminated()


_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CACHES_LOCK = threading.Lock()


def grammar_cache(engine) -> GrammarCache:
    """The engine's GrammarCache (one per engine and so per tokenizer), made on first use."""
    with _CACHES_LOCK:
        cache = _CACHES.get(engine)
        if cache is None:
            cache = GrammarCache(engine.tokenizer, engine.executor.config.vocab_size, set(engine.eos_ids))
            _CACHES[engine] = cache
        return cache


# ---- prompt --------------------------------------------------------------------------------------


def tool_call_text(name: str, arguments: Any) -> str:
    """One call block in the documented format; `arguments`: a dict, or a JSON string (kept as text if
    it is not valid JSON)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            pass
    payload = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{payload}\n</tool_call>"


def tool_calls_text(calls: list[dict]) -> str:
    """OpenAI tool calls ([{"function": {"name", "arguments"}}] or [{"name", "arguments"}]) as call blocks."""
    blocks = []
    for call in calls:
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"a tool call must be {{'function': {{'name', 'arguments'}}}}, got {call!r}")
        blocks.append(tool_call_text(fn["name"], fn.get("arguments") or {}))
    return CALL_SEPARATOR.join(blocks)


def tools_preamble(plan: ToolPlan) -> str:
    """System-prompt text that lists the tools (name, description, parameter schema) and the call format."""
    lines = ["You can call these tools. Each is given as a JSON function signature:", "<tools>"]
    lines += [json.dumps(t, ensure_ascii=False) for t in plan.tools]
    lines += ["</tools>", "To call a tool, reply with one block per call:", "<tool_call>",
              '{"name": "<tool name>", "arguments": <the arguments as a JSON object>}', "</tool_call>"]
    if plan.mode == "named":
        lines.append(f"You must call the tool {plan.allowed[0]!r} now.")
    elif plan.mode == "required":
        lines.append("You must call one or more of the tools now.")
    else:
        lines.append("Call a tool only if it helps; otherwise answer in text.")
    lines.append("A tool's result comes back in a 'tool' turn.")
    return "\n".join(lines)


def template_messages(messages: list[dict], plan: ToolPlan | None = None) -> list[dict]:
    """Messages for the chat template: assistant `tool_calls` appended to the content as call blocks, and
    (when `plan` calls tools) the tools preamble added to the first system message or as a new one."""
    out = []
    for i, m in enumerate(messages):
        calls = m.get("tool_calls")
        if calls:
            if m["role"] != "assistant":
                raise ValueError(f"messages[{i}]: only assistant messages may carry tool_calls")
            text = tool_calls_text(calls)
            m = {**m, "content": f"{m['content']}\n{text}" if m["content"] else text}
        out.append({k: v for k, v in m.items() if k != "tool_calls"})
    if plan is not None and plan.calls_tools:
        preamble = tools_preamble(plan)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{preamble}" if out[0]["content"] else preamble}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out


# ---- output --------------------------------------------------------------------------------------


def call_id(seed: str, index: int, name: str) -> str:
    """A stable id: the same request (prompt and seed) and call position give the same id."""
    return "call_" + hashlib.sha256(f"{seed}|{index}|{name}".encode()).hexdigest()[:24]


def _add_arguments(deltas: list[dict], index: int, text: str) -> None:
    """Append an arguments delta of call `index`, joined to the last delta when that is the same call's."""
    if deltas and deltas[-1]["index"] == index:
        deltas[-1]["arguments"] += text
    else:
        deltas.append({"index": index, "id": None, "name": None, "arguments": text})


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def _held(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (may still become it)."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


@dataclass
class ToolCallParser:
    """Splits generated text into content and tool calls, incrementally.

    feed(full text so far) -> (content delta, tool-call deltas); finish() -> (content delta, calls).
    Deltas: {"index", "id", "name", "arguments"}; id and name are set on a call's first delta only (None
    after), arguments deltas join to the call's final arguments. Content is the text outside call blocks
    with surrounding whitespace removed. names: the tools that may be called (to name a call cut off
    inside its name).
    """

    seed: str = ""
    names: tuple[str, ...] = ()
    calls: list[dict] = field(default_factory=list)
    _pos: int = 0  # parsed up to here
    _content: str = ""  # content text not yet emitted (held: trailing whitespace / a partial "<tool_call>")
    _started: bool = False  # some content was emitted
    _state: str = "text"  # "text" | "head" | "args"
    _args_start: int = 0
    _args_sent: int = 0
    _name: str = ""

    def feed(self, text: str) -> tuple[str, list[dict]]:
        content, deltas = [], []
        while True:
            if self._state == "text":
                i = text.find(CALL_OPEN, self._pos)
                if i < 0:
                    hold = _held(text[self._pos:], CALL_OPEN)
                    end = len(text) - hold
                    content.append(self._take_content(text[self._pos:end]))
                    self._pos = end
                    break
                content.append(self._take_content(text[self._pos:i]))
                self._content = ""  # whitespace before a call is dropped
                self._pos, self._state = i + len(CALL_OPEN), "head"
            elif self._state == "head":
                m = _HEAD_RE.match(text, self._pos)
                if m is None or m.end() == len(text) and not text.endswith(": "):
                    break
                self._name = m.group(1)
                self._state, self._args_start = "args", m.end()
                self._args_sent = self._args_start
                index = len(self.calls)
                deltas.append({"index": index, "id": call_id(self.seed, index, self._name), "name": self._name,
                               "arguments": ""})
            else:
                j = text.find(CALL_CLOSE, self._args_start)
                index = len(self.calls)
                end = j if j >= 0 else len(text) - _held(text[self._args_start:], CALL_CLOSE)
                if end > self._args_sent:
                    _add_arguments(deltas, index, text[self._args_sent:end])
                    self._args_sent = end
                if j < 0:
                    break
                self._close_call(index, text[self._args_start : j])
                self._pos, self._state = j + len(CALL_CLOSE), "text"
        return "".join(content), deltas

    def _close_call(self, index: int, arguments: str) -> None:
        self.calls.append({"id": call_id(self.seed, index, self._name), "type": "function",
                           "function": {"name": self._name, "arguments": arguments}})

    def _take_content(self, piece: str) -> str:
        """Add text outside calls; return what can be emitted (leading and trailing whitespace held back)."""
        self._content += piece
        if not self._started:
            self._content = self._content.lstrip()
        body = self._content.rstrip()
        if body:
            self._started = True
            self._content = self._content[len(body):]
        return body

    def finish(self, text: str) -> tuple[str, list[dict]]:
        """Parse the rest of the final text. A call the output cut off (it hit a limit) is kept with the
        arguments written so far, as OpenAI returns it; one cut inside its name is kept if the name is
        known (a unique prefix of `names`)."""
        content, deltas = self.feed(text)
        if self._state == "text":
            content += self._take_content(text[self._pos:])
            return content, deltas
        index = len(self.calls)
        if self._state == "head":
            m = _PARTIAL_HEAD_RE.match(text, self._pos)
            if m is None:
                return content, deltas
            known = [n for n in self.names if n == m.group(1) or (not m.group(2) and n.startswith(m.group(1)))]
            if len(known) != 1 and not (m.group(2) and not self.names):
                return content, deltas
            self._name = known[0] if known else m.group(1)
            self._args_start = self._args_sent = len(text)
            deltas.append({"index": index, "id": call_id(self.seed, index, self._name), "name": self._name,
                           "arguments": ""})
        rest = text[self._args_start :]
        sent = text[self._args_start : self._args_sent]
        arguments = rest if _is_json(rest) or not _is_json(sent) else sent
        if len(arguments) > len(sent):
            _add_arguments(deltas, index, arguments[len(sent):])
        self._close_call(index, arguments)
        self._state = "text"
        return content, deltas


class ToolCallStream(Iterator):
    """Wraps the engine's raw text chunks (a `ChunkStream`): yields content + tool-call deltas; the last
    chunk gets `tool_calls`, and finish_reason "tool_calls" when calls were made and the output ended
    normally ("length", with the cut call and its partial arguments, when the budget ended it).
    `cancel()` / `close()` pass through (thread-safe)."""

    def __init__(self, chunks: Iterator, seed: str, names: tuple[str, ...] = ()):
        self._chunks = chunks
        self._parser = ToolCallParser(seed=seed, names=tuple(names))
        self._text = ""

    def __next__(self):
        while True:
            chunk = next(self._chunks)
            self._text += chunk.text
            if chunk.finish_reason is None:
                content, deltas = self._parser.feed(self._text)
                if content or deltas:
                    return replace(chunk, text=content, tool_call_deltas=deltas or None)
                continue
            content, deltas = self._parser.finish(self._text)
            calls = list(self._parser.calls)
            finish = "tool_calls" if calls and chunk.finish_reason == "stop" else chunk.finish_reason
            return replace(chunk, text=content, tool_call_deltas=deltas or None, tool_calls=calls,
                           finish_reason=finish)

    def cancel(self) -> None:
        cancel = getattr(self._chunks, "cancel", None)
        if cancel is not None:
            cancel()

    close = cancel
