"""End to end through the command line, as a newcomer meets it: split -> generate, the demo, --version,
--help for every option, one-line errors naming the flag, hints, download failures, and split's no-op."""
import json
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from conftest import GQA
from streamer.cli import build_parser
from streamer.layout import MANIFEST, read_manifest
from streamer.synthetic import write_checkpoint


def cli(*args, check=True, env=None):
    r = subprocess.run([sys.executable, "-m", "streamer", *map(str, args)], capture_output=True, text=True, timeout=300,
                       env=env)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def one_error_line(r, *words):
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_split_output(llama3_tiny):
    manifest, _ = read_manifest(llama3_tiny)
    names = {f["name"] for f in manifest["files"]}
    assert {"embedding.safetensors", "head.safetensors", "params.json", "tokenizer.model", "block_000.safetensors",
            "block_003.safetensors"} <= names
    assert manifest["dtype"] == "bfloat16" and manifest["args"]["n_layers"] == 4
    assert all(len(f["sha256"]) == 64 and f["bytes"] == (llama3_tiny / f["name"]).stat().st_size for f in manifest["files"])


def test_generate_json_from_ids(llama3_tiny):
    r = cli("generate", llama3_tiny, "--prompt-ids", "128000,1820,4320", "--max-new-tokens", "5", "--dtype", "float32",
            "--json", "--logprobs", "3")
    out = json.loads(r.stdout)
    assert out["prompt_ids"] == [128000, 1820, 4320] and len(out["tokens"]) == 5 == len(out["logprobs"])
    assert out["finish_reason"] == "length"
    assert all(len(top) == 3 and top[0][1] >= top[-1][1] for top in out["top_logprobs"])
    assert out["top_logprobs"][0][0] == [out["tokens"][0], out["logprobs"][0]]  # greedy picks the best
    stats = out["stats"]
    assert stats["prefill_s"] > 0 and stats["decode_s_per_token"] > 0 and stats["passes"] == 5
    assert stats["memory"]["peak_rss"] > 0 and stats["memory"]["peak_private"] > 0
    assert "peak rss" in r.stderr


def test_generate_and_batch_with_a_draft(llama3_tiny, tmp_path):
    """--draft: the same tokens as without, and the draft's figures in --json and the summary lines; the
    number of draft tokens is picked from the passes measured unless --draft-tokens sets it."""
    ids = "128000,1820,4320,1820,4320"
    args = ["generate", llama3_tiny, "--prompt-ids", ids, "--max-new-tokens", "12", "--dtype", "float32", "--json"]
    plain = json.loads(cli(*args).stdout)
    r = cli(*args, "--draft", "ngram")
    out = json.loads(r.stdout)
    assert out["tokens"] == plain["tokens"]
    assert out["stats"]["drafted"] > 0 and "proposed tokens kept" in r.stderr and "tokens per pass" in r.stderr
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt_ids": [int(t) for t in ids.split(",")], "max_new_tokens": 12}) + "\n")
    r = cli("batch", llama3_tiny, prompts, "--out", tmp_path / "r.jsonl", "--dtype", "float32", "--quiet",
            "--draft", llama3_tiny, "--draft-tokens", "3", "--draft-branches", "1")
    assert json.loads((tmp_path / "r.jsonl").read_text())["tokens"] == plain["tokens"]
    kept = re.search(r"draft: (\d+) of (\d+) proposed tokens kept", r.stderr)
    assert kept and kept[1] == kept[2] != "0", r.stderr  # the model as its own chain draft: all kept
    one_error_line(cli(*args, "--draft-tokens", "0", check=False), "--draft-tokens", "positive integer")


def test_bytes_read_count_resident_blocks(llama3_tiny):
    """With everything in RAM, what was read is the blocks and head once, plus one embedding row per token."""
    files = {f["name"]: f["bytes"] for f in read_manifest(llama3_tiny)[0]["files"]}
    stats = json.loads(cli("generate", llama3_tiny, "--prompt-ids", "128000,1820,4320", "--max-new-tokens", "4",
                           "--json").stdout)["stats"]
    weights = sum(v for k, v in files.items() if k.startswith("block_") or k == "head.safetensors")
    assert stats["resident_bytes"] == weights
    assert stats["bytes_read"] == weights + stats["tokens_run"] * 128 * 2  # dim 128, bf16 rows
    assert stats["tokens_run"] == 3 + 3


def test_generate_text_prints_as_it_goes(llama3_tiny):
    r = cli("generate", llama3_tiny, "--prompt", "the answer to the ultimate question of life, the universe, and everything is ",
            "--max-new-tokens", "4", "--dtype", "float32", "--memory-report")
    assert r.stdout.strip()
    assert "phase" in r.stderr and "decode" in r.stderr
    assert "Peak RSS can exceed --memory-budget" in r.stderr  # and says why: file-backed pages
    j = json.loads(cli("generate", llama3_tiny, "--prompt", "Hi", "--chat", "--system", "Be brief.", "--max-new-tokens", "2",
                       "--json").stdout)
    assert j["prompt_ids"][:4] == [128000, 128006, 9125, 128007] and j["prompt_ids"][-4:] == [128006, 78191, 128007, 271]


def test_cli_and_engine_agree(llama3_tiny):
    from streamer import Engine
    a = json.loads(cli("generate", llama3_tiny, "--prompt-ids", "128000,1820", "--max-new-tokens", "6", "--dtype", "float32",
                       "--json").stdout)
    with Engine(llama3_tiny, dtype="float32") as engine:
        b = engine.generate(prompt_ids=[128000, 1820], max_new_tokens=6)
    assert a["tokens"] == b.tokens and a["text"] == b.text


def test_demo_tells_the_story(tmp_path):
    r = cli("demo", "--dir", tmp_path / "demo", "--max-new-tokens", "20")
    assert r.stdout.startswith("Once upon a time, there was a little girl named Lily."), r.stdout
    assert "streams its 5 blocks from disk" in r.stderr and "20 passes over the weights" in r.stderr
    read = float(re.search(r"read ([\d.]+) GB", r.stderr).group(1))
    assert read > 0
    flags = {o for a in build_parser()[0]._subparsers._group_actions[0].choices["demo"]._actions for o in a.option_strings}
    assert set(re.findall(r"--[a-z][a-z-]*", r.stderr + r.stdout)) <= flags  # it never names a flag it lacks
    again = cli("demo", "--dir", tmp_path / "demo", "--max-new-tokens", "20")
    assert again.stdout == r.stdout and "already holds this split" in again.stderr


def test_version():
    r = cli("--version")
    assert re.fullmatch(r"streamer \d+\.\d+\.\d+\S*\n", r.stdout)


def test_every_option_of_every_command_has_help():
    parser, _ = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) >= {"split", "download", "generate", "batch", "plan", "verify", "info", "demo", "memcap"}
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help and action.help.strip(), f"streamer {name} {action.option_strings or action.dest}"
        assert sub.format_help()
    top = cli("--help").stdout
    assert all(name in top for name in commands)
    split_help = " ".join(commands["split"].format_help().split())
    assert "Meta checkpoint folder" in split_help and "Hugging Face" in split_help


@pytest.mark.parametrize("args,message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer, got 0"),
    (["--temperature", "-1"], "--temperature must be >= 0 (0 = greedy), got -1.0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--logprobs", "-2"], "--logprobs must be an integer >= 0, got -2"),
    (["--max-seq-len", "2"], "--max-seq-len 2 is too short for a prompt of 3 tokens + 64 new tokens"),
    (["--max-seq-len", "0"], "--max-seq-len must be a positive integer, got 0"),
    (["--dtype", "float64"], "--dtype: invalid choice"),
    (["--max-new-tokens", "many"], "--max-new-tokens: invalid int value"),
    (["--prompt-ids", "1,x"], "--prompt-ids expected comma-separated integers"),
    (["--memory-budget", "lots"], "--memory-budget must be a memory size such as 512M"),
])
def test_errors_name_the_flag(llama3_tiny, args, message, capsys):
    """In process, for speed: the same main() the command runs."""
    from streamer.cli import main
    base = ["generate", str(llama3_tiny)] + ([] if "--prompt-ids" in args else ["--prompt-ids", "128000,1,2"])
    try:
        code = main(base + args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_pointing_at_a_checkpoint_gives_the_split_command(tmp_path):
    meta = write_checkpoint(tmp_path / "meta", GQA, tokenizer=False)
    for command in ("generate", "verify", "info"):
        extra = ["--prompt-ids", "1,2"] if command == "generate" else []
        line = one_error_line(cli(command, meta, *extra, check=False), "holds a Meta checkpoint")
    suggested = re.search(r"`(streamer split [^`]+)`", line).group(1).split()[1:]
    cli(*suggested, "--quiet")  # the hint's command works as written
    assert json.loads(cli("generate", suggested[-1], "--prompt-ids", "1,2", "--max-new-tokens", "2", "--json").stdout)["tokens"]


def test_split_onto_a_finished_split_does_nothing(tmp_path):
    meta = write_checkpoint(tmp_path / "meta", GQA, tokenizer=False)
    out = tmp_path / "out"
    cli("split", meta, out, "--quiet")
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = cli("split", meta, out, "--quiet")
    assert "already holds this split" in r.stderr and "nothing to do" in r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # not one file rewritten
    cli("split", meta, out, "--quiet", "--dtype", "bfloat16")  # other options: a new split
    assert read_manifest(out)[0]["dtype"] == "bfloat16"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Refuse401(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"error": "Invalid credentials in Authorization header"}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *a):
        pass


def test_download_failures_are_one_line(tmp_path):
    import os
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub")}
    env.pop("HF_HUB_OFFLINE", None)
    closed = {**env, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}  # no network: nothing listens there
    one_error_line(cli("download", "meta-llama/Meta-Llama-3-8B", tmp_path / "x", check=False, env=closed),
                   "cannot reach the Hugging Face Hub", "HF_HUB_OFFLINE")
    one_error_line(cli("download", "not a repo!", tmp_path / "x", check=False, env=closed), "not a valid repo id")
    server = HTTPServer(("127.0.0.1", 0), Refuse401)  # a Hub on loopback that refuses every token
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        refusing = {**env, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_TOKEN": "hf_wrong"}
        one_error_line(cli("download", "meta-llama/Meta-Llama-3-8B", tmp_path / "x", check=False, env=refusing),
                       "meta-llama/Meta-Llama-3-8B", "refused the token (401)")
    finally:
        server.shutdown()
    assert not (tmp_path / "x" / MANIFEST).exists()


def test_readme_python_example_runs(llama3_tiny, capsys):
    """The Engine example in the README, as written, on the tiny model instead of the 8B."""
    readme = (__import__("pathlib").Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert "~/llama3-8b-layers" in code
    exec(code.replace("~/llama3-8b-layers", str(llama3_tiny)), {})
    out = capsys.readouterr().out
    assert out.count("\n") >= 4 and "1 " in out and "2 " in out and "3 " in out
