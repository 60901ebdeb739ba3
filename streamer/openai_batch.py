"""The OpenAI Batch API's file formats, for `streamer batch`: a request line
    {"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}
becomes a native batch request, and its result becomes the output line `vllm run-batch` writes:
    {"id", "custom_id", "response": {"status_code", "request_id", "body": chat.completion | text_completion},
     "error": null}
or, for a request that cannot run, {"id", "custom_id", "response": null, "error": {"code", "message"}}."""
from __future__ import annotations

import time
import uuid

from .errors import StreamerError

URLS = {"/v1/chat/completions": "chat", "/v1/completions": "text"}
# body keys we honour, and those we accept with the values that change nothing here (None: any value)
BODY_KEYS = {"model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
             "n", "logprobs", "top_logprobs"}
HARMLESS = {"user": None, "metadata": None, "store": None, "stream": (False,), "frequency_penalty": (0,),
            "presence_penalty": (0,), "echo": (False,), "best_of": (1,)}


def is_openai(obj) -> bool:
    return isinstance(obj, dict) and "custom_id" in obj and "body" in obj


def to_request(obj: dict) -> dict:
    """The native request (batch.make_request's input) for one OpenAI request line; raises StreamerError
    naming the field at fault."""
    rid = obj["custom_id"]
    if obj.get("method", "POST") != "POST":
        raise StreamerError(f"method must be POST, got {obj.get('method')!r}", param="method")
    url = obj.get("url")
    if url not in URLS:
        raise StreamerError(f"url must be one of {', '.join(URLS)}, got {url!r}", param="url")
    body = obj["body"]
    if not isinstance(body, dict):
        raise StreamerError(f"body must be a JSON object, got {type(body).__name__}", param="body")
    for k, v in body.items():
        if k in BODY_KEYS or (k in HARMLESS and (HARMLESS[k] is None or v is None or v in HARMLESS[k])):
            continue
        raise StreamerError(f"body.{k} = {v!r} is not supported here", param=f"body.{k}")
    req = {"id": rid}
    if URLS[url] == "chat":
        if "messages" not in body:
            raise StreamerError("a chat completion needs body.messages", param="body.messages")
        req["messages"] = body["messages"]
        if body.get("logprobs"):
            req["logprobs"] = body.get("top_logprobs") or 0
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            req["prompt"] = prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            req["prompt_ids"] = prompt
        else:
            raise StreamerError("body.prompt must be a string or a list of token ids (one prompt per request)",
                                param="body.prompt")
        if body.get("logprobs") is not None:
            req["logprobs"] = body["logprobs"]
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        req["max_new_tokens"] = limit
    for k in ("temperature", "top_p", "seed", "stop", "n"):
        if body.get(k) is not None:
            req[k] = body[k]
    return req


def to_output(obj: dict, record: dict, model: str, tok) -> dict:
    """The output line for the result `record` (Engine.batch's) of the OpenAI request line `obj`."""
    line = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": obj.get("custom_id")}
    if "error" in record:
        return {**line, "response": None, "error": {"code": "invalid_request" if record.get("param") else "error",
                                                     "message": record["error"]}}
    chat = URLS.get(obj.get("url")) == "chat"
    want = bool(obj["body"].get("logprobs")) if chat else obj["body"].get("logprobs") is not None
    choices = [_choice(i, c, chat, want, tok) for i, c in enumerate(record.get("choices") or [record])]
    body = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": obj["body"].get("model") or model, "choices": choices,
            "usage": {**record["usage"], "total_tokens": record["usage"]["prompt_tokens"] + record["usage"]["completion_tokens"]}}
    return {**line, "response": {"status_code": 200, "request_id": f"req_{uuid.uuid4().hex}", "body": body}, "error": None}


def _choice(i: int, c: dict, chat: bool, want_logprobs: bool, tok) -> dict:
    text = c["text"] if c["text"] is not None else ""
    logprobs = None
    if want_logprobs:
        piece = (lambda t: tok.decode_bytes([t]).decode("utf-8", errors="replace")) if tok else str
        raw = (lambda t: list(tok.decode_bytes([t]))) if tok else (lambda t: None)
        tops = c.get("top_logprobs") or [[] for _ in c["tokens"]]
        if chat:
            logprobs = {"content": [{"token": piece(t), "logprob": lp, "bytes": raw(t),
                                     "top_logprobs": [{"token": piece(u), "logprob": v, "bytes": raw(u)} for u, v in top]}
                                    for t, lp, top in zip(c["tokens"], c["logprobs"], tops)], "refusal": None}
        else:
            offsets, at = [], 0
            for t in c["tokens"]:
                offsets.append(at)
                at += len(piece(t))
            logprobs = {"tokens": [piece(t) for t in c["tokens"]], "token_logprobs": c["logprobs"],
                        "top_logprobs": [{piece(u): v for u, v in top} for top in tops], "text_offset": offsets}
    if chat:
        return {"index": i, "message": {"role": "assistant", "content": text, "refusal": None}, "logprobs": logprobs,
                "finish_reason": c["finish_reason"]}
    return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": c["finish_reason"]}
