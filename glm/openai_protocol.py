"""The OpenAI wire protocol of glm-serve, apart from the app: the fields each endpoint understands, errors, the
chat template from messages, and the shapes of logprobs. Pure functions of JSON values (no FastAPI here).
"""

from __future__ import annotations

import json
import uuid

from glm.chat import build_prompt
from glm.errors import GenerationError
from glm.generation import CHAT_DEFAULTS, GenerationConfig

MAX_STOP = 16  # stop strings per request
# The request fields that are GenerationConfig settings of the same name, with the JSON type each must have.
SETTING_FIELDS = (("temperature", (int, float), "a number"), ("top_p", (int, float), "a number"),
                  ("top_k", int, "an integer"), ("repetition_penalty", (int, float), "a number"),
                  ("seed", int, "an integer"), ("presence_penalty", (int, float), "a number"),
                  ("frequency_penalty", (int, float), "a number"), ("min_p", (int, float), "a number"))
MAX_N = 8  # choices per request (and never more than --max-batch: each choice decodes in a cache row of its own)
MAX_LEGACY_LOGPROBS = 5  # /v1/completions' logprobs limit (OpenAI's)
MAX_CHOICES = 64  # prompts x n of one /v1/completions request: each choice waits for a cache row of its own
# The fields each endpoint understands; any other (not null) is a 400 naming it, so that nothing is silently
# ignored. The last group are fields that change nothing here (bookkeeping of OpenAI's own), accepted as such.
_COMMON = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
           "seed", "stop", "n", "presence_penalty", "frequency_penalty", "logit_bias", "min_p", "ignore_eos",
           "logprobs", "user", "metadata", "store", "service_tier"}
CHAT_FIELDS = frozenset(_COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format",
                                   "tools", "tool_choice", "parallel_tool_calls"})
COMPLETION_FIELDS = frozenset(_COMMON | {"prompt", "echo", "response_format"})
MAX_TOOLS = 128  # functions per request (OpenAI's limit)


class APIError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def field(body: dict, name: str, kinds, default=None, check=None, what: str = ""):
    """body[name] if present, of a JSON type in `kinds` and passing `check`; else an APIError naming it."""
    v = body.get(name)
    if v is None:
        return default
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if (isinstance(v, bool) and bool not in kinds) or not isinstance(v, kinds) or (check and not check(v)):
        raise APIError(400, f"'{name}' must be {what}, got {json.dumps(v)[:60]}", param=name)
    return v


# ---------------------------------------------------------------------------------------------------- the app


def check_model(model: str, names: list[str]) -> None:
    """A 404 listing the served models unless `model` is one of them (the base model's name, or an adapter's)."""
    if model not in names:
        raise APIError(404, f"the model {json.dumps(model)[:80]} does not exist: this server serves "
                            f"{', '.join(map(repr, names))}", code="model_not_found", param="model")


def config_error(e: GenerationError, names: dict) -> APIError:
    """GenerationConfig's "<field> must be ..." as a 400 naming the field as the client sent it."""
    field, _, why = str(e).partition(" ")
    param = names.get(field, field)
    return APIError(400, f"'{param}' {why}", param=param)

def check_fields(body: dict, allowed: frozenset, endpoint: str) -> None:
    """A 400 naming the first field this endpoint does not implement (null counts as left out)."""
    for key in sorted(k for k, v in body.items() if v is not None and k not in allowed):
        if key == "best_of":
            raise APIError(400, "'best_of' is not supported: send n for several choices", param=key)
        raise APIError(400, f"'{key}' is not supported by {endpoint} on this server (see docs/serve.md for "
                            "the fields it implements)", param=key)


def response_schema(body: dict) -> dict | None:
    """The JSON Schema of `response_format` (json_object: any object; text: none), or an APIError."""
    fmt = field(body, "response_format", dict, what='an object such as {"type": "json_object"}')
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "object"}
    if fmt.get("type") == "json_schema":
        spec = field(fmt, "json_schema", dict, what="an object with name and schema")
        if spec is None or not isinstance(spec.get("name"), str):
            raise APIError(400, "'response_format.json_schema' must be an object with a 'name' (and a 'schema')",
                           param="response_format")
        schema = spec.get("schema", {})  # none: any JSON value
        if not isinstance(schema, dict) or not isinstance(spec.get("strict", False), (bool, type(None))):
            raise APIError(400, "'response_format.json_schema.schema' must be an object (and 'strict' true or "
                                "false)", param="response_format")
        return schema
    raise APIError(400, f"'response_format' must have a type of text, json_object or json_schema, got "
                        f"{json.dumps(fmt.get('type'))[:40]}", param="response_format")


# ---------------------------------------------------------------------------------------------------- tools


class ToolCall:
    """A reply generated as a call of a function (`tool_choice` naming one, or "required"), in OpenAI's shapes.

    One function: the reply is its arguments, under its `parameters` schema. Several ("required"): the reply is
    `{"name": ..., "arguments": {...}}` under a schema allowing each function's name with its parameters.
    """

    def __init__(self, functions: dict[str, dict], names: list[str]):
        self.functions, self.names, self.rid = functions, names, uuid.uuid4().hex[:24]
        self.started: set[int] = set()  # choices whose call has been opened in a stream

    @property
    def schema(self) -> dict:
        def params(name):
            return self.functions[name].get("parameters") or {"type": "object", "properties": {}}

        if len(self.names) == 1:
            return params(self.names[0])
        return {"anyOf": [{"type": "object", "properties": {"name": {"const": n}, "arguments": params(n)},
                           "required": ["name", "arguments"], "additionalProperties": False} for n in self.names]}

    def call(self, j: int, text: str) -> dict:
        """Choice j's call, from its whole reply (cut short by the length limit, the JSON may be incomplete)."""
        name, args = self.names[0], text
        if len(self.names) > 1:
            try:
                obj = json.loads(text)
                name, args = obj["name"], json.dumps(obj["arguments"], ensure_ascii=False, separators=(",", ":"))
            except (ValueError, KeyError, TypeError):
                name = ""
        return {"id": f"call_{self.rid}_{j}", "type": "function", "function": {"name": name, "arguments": args}}

    def message(self, j: int, text: str) -> dict:
        return {"role": "assistant", "content": None, "tool_calls": [self.call(j, text)]}

    def delta(self, j: int, text: str | None, whole: str) -> dict:
        """A stream's delta: one function's arguments as they come; several's whole call at the end (`whole`
        is the reply so far, `text` the new part, None at the end)."""
        if j in self.started:
            return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if text else {}
        if len(self.names) > 1 and text is not None:  # the name is known once the whole call is
            return {}
        self.started.add(j)
        return {"tool_calls": [{"index": 0, **self.call(j, whole if text is None else text)}]}

    @staticmethod
    def finish_reason(reason: str) -> str:
        return "tool_calls" if reason == "stop" else reason


def tool_call(body: dict) -> ToolCall | None:
    """The call `tools` and `tool_choice` ask for (None: a plain reply), or an APIError saying what works."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise APIError(400, "'tool_choice' needs 'tools'", param="tool_choice")
        return None
    if not isinstance(tools, list) or not 1 <= len(tools) <= MAX_TOOLS:
        raise APIError(400, f"'tools' must be a list of 1 to {MAX_TOOLS} functions", param="tools")
    functions = {}
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"] \
                or not isinstance(f.get("parameters", {}), (dict, type(None))):
            raise APIError(400, f"'tools'[{i}] must be a function: " + '{"type": "function", "function": '
                                '{"name": ..., "parameters": {...}}}', param="tools")
        functions[f["name"]] = f
    if choice == "none":
        return None
    if choice == "required":
        return ToolCall(functions, list(functions))
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(named, str):
        if named not in functions:
            raise APIError(400, f"'tool_choice' names the function {json.dumps(named)[:60]}, which is not in "
                                "'tools'", param="tool_choice")
        return ToolCall(functions, [named])
    got = json.dumps("auto" if choice is None else choice)[:60]
    raise APIError(400, f"'tool_choice' {got} is not supported: ChatGLM-6B has no tool-call format, so it cannot "
                        "decide when to call a function. Send tool_choice \"required\" or {\"type\": \"function\", "
                        "\"function\": {\"name\": ...}} (the arguments are then generated under the function's "
                        "parameters schema), or \"none\"", param="tool_choice")


def _tools_text(call: ToolCall) -> str:
    """What the last message is preceded by when a call is forced: the functions, and what to answer."""
    lines = []
    for n in call.names:
        f = call.functions[n]
        params = json.dumps(f.get("parameters") or {}, ensure_ascii=False, separators=(",", ":"))
        desc = f" {f['description']}" if isinstance(f.get("description"), str) and f["description"] else ""
        lines.append(f"Function {n}:{desc} Parameters: {params}")
    what = (f"the arguments of {call.names[0]}" if len(call.names) == 1 else
            'a function call {"name": ..., "arguments": {...}}')
    return "\n".join(lines + [f"Answer with {what} as JSON."])


def _content(msg: dict, i: int) -> str:
    content = msg.get("content")
    if isinstance(content, list):  # content parts: only text is understood
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise APIError(400, f"messages[{i}]: only text content parts are supported", param="messages")
        content = "".join(p["text"] for p in content)
    if content is None and msg.get("role") == "assistant" and msg.get("tool_calls"):
        return ""
    if not isinstance(content, str):
        raise APIError(400, f"messages[{i}].content must be a string", param="messages")
    return content


def _calls_text(msg: dict, i: int, called: dict) -> list[str]:
    """An assistant's tool_calls as text, one `{"name": ..., "arguments": {...}}` line each; notes their ids."""
    calls = msg.get("tool_calls") or []
    out = []
    for c in calls if isinstance(calls, list) else [None]:
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(f.get("arguments"), str):
            raise APIError(400, f"messages[{i}].tool_calls must be a list of {{id, type, function: {{name, "
                                "arguments}}}", param="messages")
        called[c.get("id")] = f["name"]
        try:
            args = json.loads(f["arguments"])
        except ValueError:
            args = f["arguments"]
        out.append(json.dumps({"name": f["name"], "arguments": args}, ensure_ascii=False, separators=(",", ":")))
    return out


def chat_prompt(body: dict, call: ToolCall | None = None) -> str:
    """The official template from OpenAI messages (see docs/serve.md for what system messages, tool calls and
    tool results become)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    system, turns, called = [], [], {}
    for i, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else None
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise APIError(400, f"messages[{i}] must be an object with a role of system, developer, user or "
                                "assistant (or tool, for a function's result)", param="messages")
        content = _content(msg, i)
        if role in ("system", "developer"):  # OpenAI's newer name of the system role
            if turns:
                raise APIError(400, "system messages must come first", param="messages")
            system.append(content)
        elif role == "tool":  # a function's result: said by the user's side, joined to the turn it follows
            name = called.get(msg.get("tool_call_id"))
            if name is None:
                raise APIError(400, f"messages[{i}]: a tool message's tool_call_id must be the id of an earlier "
                                    "assistant tool call", param="messages")
            text = f"Result of {name}: {content}"
            if turns and turns[-1][0] == "tool":
                turns[-1] = ("tool", turns[-1][1] + "\n" + text)
            else:
                turns.append(("tool", text))
        else:
            if role == "assistant":
                content = "\n".join([content] * bool(content) + _calls_text(msg, i, called))
            if role == "user" and turns and turns[-1][0] == "tool":  # a question after the results: one turn
                turns[-1] = ("user", turns[-1][1] + "\n" + content)
            else:
                turns.append((role, content))
    turns = [("user" if r == "tool" else r, c) for r, c in turns]
    roles = [r for r, _ in turns]
    if not roles or roles != ["user", "assistant"] * (len(roles) // 2) + ["user"]:
        raise APIError(400, "messages must alternate user and assistant turns (after any system message; tool "
                            "results count as the user's) and end with a user message or tool results",
                       param="messages")
    texts = [c for _, c in turns]
    if system:  # ChatGLM-6B has no system role: the system text opens the first user message
        texts[0] = "\n".join(system + [texts[0]])
    if call is not None:  # no tool format either: the functions and the answer asked for precede the last turn
        texts[-1] = _tools_text(call) + "\n" + texts[-1]
    history = list(zip(texts[0:-1:2], texts[1:-1:2]))
    return build_prompt(texts[-1], history)


def completion_prompts(body: dict, cfg) -> list[str | list[int]]:
    """The prompts of a /v1/completions body, in OpenAI's four forms: a string, a list of strings, a list of token
    ids, a list of lists of token ids. Token ids are the model's input as they are, with the `[gMASK] <sop>`
    that the tokenizer appends to text (`cfg`: the model's GLMConfig, for the ids)."""
    p = body.get("prompt")
    is_id = lambda t: isinstance(t, int) and not isinstance(t, bool)  # noqa: E731
    if isinstance(p, str):
        prompts = [p]
    elif isinstance(p, list) and p and all(map(is_id, p)):
        prompts = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        prompts = p
    elif isinstance(p, list) and p and all(isinstance(x, list) and x and all(map(is_id, x)) for x in p):
        prompts = p
    else:
        raise APIError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of lists "
                            "of token ids (none empty)", param="prompt")
    if len(prompts) > MAX_CHOICES:
        raise APIError(400, f"'prompt' holds {len(prompts)} prompts, over {MAX_CHOICES} per request: split them",
                       param="prompt")
    for ids in (x for x in prompts if isinstance(x, list)):
        bad = next((t for t in ids if not 0 <= t < cfg.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"'prompt' holds the token id {bad}, outside this model's vocabulary [0, "
                                f"{cfg.vocab_size})", param="prompt")
        # GLM generates the block of a [gMASK] (or [MASK]) after <sop>: the engine's condition, said for HTTP.
        if cfg.bos_token_id not in ids or cfg.gmask_token_id not in ids and cfg.mask_token_id not in ids:
            raise APIError(400, f"token-id prompts must hold [gMASK] and <sop> (ids {cfg.gmask_token_id} and "
                                f"{cfg.bos_token_id}), as text is encoded with them at its end", param="prompt")
    return prompts


def chat_logprobs(entries: list, token_text) -> dict:
    """OpenAI's chat shape of (id, logprob, [(id, logprob)]) entries; `token_text(id)` is a token's text."""
    def one(i, lp):
        t = token_text(i)
        return {"token": t, "logprob": lp, "bytes": list(t.encode())}

    return {"content": [{**one(i, lp), "top_logprobs": [one(a, b) for a, b in top]} for i, lp, top in entries],
            "refusal": None}

def legacy_logprobs(entries: list, offset: int, token_text) -> tuple[dict, int]:
    """OpenAI's legacy completions shape of entries whose text starts at character `offset`; and the offset
    after them. A None logprob (the first prompt token's, under echo) has None for its alternatives too."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for i, lp, top in entries:
        t = token_text(i)
        out["tokens"].append(t)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append(None if lp is None else {token_text(a): b for a, b in top})
        out["text_offset"].append(offset)
        offset += len(t)
    return out, offset


def request_settings(body: dict, prompt_len: int, chat: bool, *, max_context: int, max_batch: int,
                     prompts: int = 1, call: ToolCall | None = None) -> tuple[GenerationConfig, dict]:
    """(config, options) of a request (of one of its `prompts`), or an APIError; options: stream, include_usage, n,
    echo. With `call`, the reply is generated under the call's schema, as with `response_format` (both at once are
    refused).

    Here the fields' JSON types are checked; their values are GenerationConfig's to judge, whose message is the
    error (naming the field as the client sent it). Fields left out take the official chat's values
    (CHAT_DEFAULTS); temperature 0 is greedy, as OpenAI's.
    """
    given = {}
    for key, kinds, what in SETTING_FIELDS:
        v = field(body, key, kinds, what=what)
        if v is not None:
            given[key] = v
    bias = field(body, "logit_bias", dict, what="an object of token ids (as strings) to numbers")
    if bias is not None:  # JSON keys are strings: OpenAI's token ids are sent as "1234"
        given["logit_bias"] = {}
        for k, v in bias.items():
            try:
                given["logit_bias"][int(k)] = v
            except ValueError:
                raise APIError(400, f"'logit_bias' keys must be token ids (integers as strings), got "
                                    f"{json.dumps(k)[:40]}", param="logit_bias") from None
    top_n = min(MAX_N, max_batch)
    n = field(body, "n", int, 1, lambda v: 1 <= v <= top_n,
               f"an integer in [1, {top_n}] (up to {MAX_N}, and this server's --max-batch)")
    if prompts * n > MAX_CHOICES:
        raise APIError(400, f"{prompts} prompts with n={n} make {prompts * n} choices, over {MAX_CHOICES} per "
                            "request: send fewer prompts per request", param="n")
    names = {"max_new_tokens": "max_tokens", "stop_at_eos": "ignore_eos"}  # GenerationConfig's -> the client's
    echo = False
    if chat:
        if field(body, "logprobs", bool, False, what="true or false"):
            top = field(body, "top_logprobs", int, 0, what="an integer")
            given["logprobs"] = top
            names["logprobs"] = "top_logprobs"
        elif body.get("top_logprobs") is not None:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    else:
        lp = field(body, "logprobs", int, None, lambda v: 0 <= v <= MAX_LEGACY_LOGPROBS,
                    f"an integer in [0, {MAX_LEGACY_LOGPROBS}]")
        if lp is not None:
            given["logprobs"] = lp
        echo = field(body, "echo", bool, False, what="true or false")
    length_key = "max_tokens"  # or its newer name, which wins when both are sent
    max_tokens = field(body, "max_tokens", int, what="an integer")
    if body.get("max_completion_tokens") is not None:
        length_key = names["max_new_tokens"] = "max_completion_tokens"
        max_tokens = field(body, length_key, int, what="an integer")
    stop = body.get("stop")
    # Not a range of the setting: a bound on the work of matching each token against the stop strings.
    if isinstance(stop, list) and len(stop) > MAX_STOP:
        raise APIError(400, f"'stop' may hold up to {MAX_STOP} strings, got {len(stop)}", param="stop")
    ignore_eos = field(body, "ignore_eos", bool, False, what="true or false")  # ours: fixed-length replies
    schema = response_schema(body)
    if call is not None:
        if schema is not None:
            raise APIError(400, "'response_format' applies to a reply's content, and a forced tool call has none: "
                                "send one of them", param="response_format")
        schema = call.schema
    if schema is not None:
        given["json_schema"] = schema
        names["json_schema"] = "tools" if call is not None else "response_format"
        if ignore_eos:
            raise APIError(400, "'ignore_eos' cannot be combined with a JSON reply, which ends where its JSON "
                                "does", param="ignore_eos")
    stream = field(body, "stream", bool, False, what="true or false")
    opts = field(body, "stream_options", dict, {}, what="an object")
    usage = field(opts, "include_usage", bool, False, what="true or false")
    try:
        # max_length None: the length is max_tokens, within the context (CHAT_DEFAULTS' is the chat's 2048).
        config = CHAT_DEFAULTS.replace(max_length=None, max_new_tokens=max_tokens,
                                       stop=stop if stop is not None else (), stop_at_eos=not ignore_eos,
                                       **given)
    except GenerationError as e:
        raise config_error(e, names) from None
    limit = max_context
    if max_tokens is None:
        if prompt_len >= limit:
            raise APIError(400, f"the prompt is {prompt_len} tokens, over the context of {limit} tokens by "
                                f"{prompt_len + 1 - limit}: shorten it", param="messages" if chat else "prompt",
                           code="context_length")
        config = config.replace(max_new_tokens=limit - prompt_len)
    elif prompt_len + max_tokens > limit:
        over = prompt_len + max_tokens - limit
        raise APIError(400, f"the prompt ({prompt_len} tokens) plus {length_key} ({max_tokens}) is over the "
                            f"context of {limit} tokens by {over}: shorten the prompt or lower {length_key}",
                       param=length_key, code="context_length")
    return config, {"stream": stream, "include_usage": usage, "n": n, "echo": echo, "names": names}
