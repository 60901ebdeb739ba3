"""`streamer batch` on OpenAI Batch API files: request bodies the `openai` package's own types accept, results
that its types parse back, equal to the Engine's own runs; n completions; errors in OpenAI's format; resume."""
import json

import pytest

from streamer import Engine
from streamer.cli import main as cli_main

openai = pytest.importorskip("openai")
from openai.types import BatchError, Completion  # noqa: E402
from openai.types.chat import ChatCompletion  # noqa: E402
from openai.types.chat.completion_create_params import CompletionCreateParamsNonStreaming as ChatParams  # noqa: E402
from openai.types.completion_create_params import CompletionCreateParamsNonStreaming as TextParams  # noqa: E402
from pydantic import TypeAdapter  # noqa: E402

CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def request(cid, url, body):
    """One input line, its body checked against the openai package's request types."""
    TypeAdapter(ChatParams if url == CHAT else TextParams).validate_python(body)
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def test_openai_batch_file(llama3_tiny, tmp_path, capsys):
    lines = [
        request("chat", CHAT, {"model": "tiny", "messages": MESSAGES, "max_completion_tokens": 6, "temperature": 0,
                               "logprobs": True, "top_logprobs": 2}),
        request("text", TEXT, {"model": "tiny", "prompt": "The answer is", "max_tokens": 5, "temperature": 0,
                               "logprobs": 2, "n": 2}),
        request("sampled", TEXT, {"model": "tiny", "prompt": [128000, 1820, 4320], "max_tokens": 4, "temperature": 0.9,
                                  "seed": 7, "n": 3}),
        request("bad-url", TEXT, {"model": "tiny", "prompt": "x"}).replace(TEXT, "/v1/embeddings"),
        request("penalty", CHAT, {"model": "tiny", "messages": MESSAGES, "frequency_penalty": 0.5}),
        json.dumps({"id": "native", "prompt_ids": [128000, 1820], "max_new_tokens": 3}),
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    args = ["batch", str(llama3_tiny), str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl"), "--dtype",
            "float32", "--quiet"]
    assert cli_main(args) == 1  # two lines failed
    assert "4 done, 2 failed" in capsys.readouterr().err
    out = {r.get("custom_id", r.get("id")): r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert len(out) == 6

    with Engine(llama3_tiny, dtype="float32") as engine:
        chat_want = engine.generate(messages=MESSAGES, max_new_tokens=6, logprobs=2)
        text_want = engine.generate("The answer is", max_new_tokens=5, logprobs=2)
        native_want = engine.generate(prompt_ids=[128000, 1820], max_new_tokens=3)

    chat = ChatCompletion.model_validate(out["chat"]["response"]["body"])
    assert out["chat"]["response"]["status_code"] == 200 and out["chat"]["error"] is None
    assert chat.object == "chat.completion" and chat.model == "tiny" and len(chat.choices) == 1
    assert chat.choices[0].message.content == chat_want.text and chat.choices[0].finish_reason == chat_want.finish_reason
    content = chat.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(chat_want.logprobs, rel=1e-5, abs=1e-6)
    assert all(len(c.top_logprobs) == 2 for c in content)
    assert "".join(c.token for c in content) == chat_want.text
    assert chat.usage.prompt_tokens == len(chat_want.prompt_ids) and chat.usage.completion_tokens == len(chat_want.tokens)

    text = Completion.model_validate(out["text"]["response"]["body"])
    assert text.object == "text_completion" and [c.index for c in text.choices] == [0, 1]
    assert all(c.text == text_want.text for c in text.choices)  # greedy: n equal completions
    assert text.choices[0].logprobs.token_logprobs == pytest.approx(text_want.logprobs, rel=1e-5, abs=1e-6)
    assert [len(t) for t in text.choices[0].logprobs.top_logprobs] == [2] * len(text_want.tokens)
    assert text.usage.completion_tokens == 2 * len(text_want.tokens)
    assert text.usage.total_tokens == text.usage.prompt_tokens + text.usage.completion_tokens

    sampled = Completion.model_validate(out["sampled"]["response"]["body"])
    assert len(sampled.choices) == 3 and sampled.usage.prompt_tokens == 3
    assert len({c.text for c in sampled.choices}) > 1  # seeded apart
    assert sampled.choices[0].logprobs is None

    for cid, words in (("bad-url", "url must be one of"), ("penalty", "body.frequency_penalty = 0.5 is not supported")):
        assert out[cid]["response"] is None
        error = BatchError.model_validate(out[cid]["error"])
        assert words in error.message and "line" in error.message, error.message
    assert out["native"]["tokens"] == native_want.tokens and "custom_id" not in out["native"]

    # the user drops the penalty and fixes the url: a rerun runs those two, keeps the rest
    lines[3] = lines[3].replace("/v1/embeddings", TEXT)
    lines[4] = request("penalty", CHAT, {"model": "tiny", "messages": MESSAGES, "max_tokens": 2})
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    assert cli_main(args) == 0
    assert "2 done, 0 failed, 4 already in" in capsys.readouterr().err
    again = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(again) == 6 and all(r.get("error") is None for r in again)
    fixed = {r.get("custom_id"): r for r in again}
    assert ChatCompletion.model_validate(fixed["penalty"]["response"]["body"]).usage.completion_tokens <= 2
