"""The ``streaming-llm`` command, driven through subprocesses on the real embedded model."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

CLI = [sys.executable, "-m", "streaming_llm.cli"]


def run(*args: str, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, timeout=timeout)


def test_help_explains_commands_and_flags():
    out = run("--help").stdout
    for command in ("generate", "chat", "ingest", "demo"):
        assert command in out
    chat = run("chat", "--help").stdout
    for flag in ("--start-size", "--recent-size", "--model", "--device", "--dtype", "/save", "/load"):
        assert flag in chat
    assert "(default: 0.8)" in chat and "--temperature 0 is greedy" in chat  # sampled like llama-cli
    demo = run("demo", "--help").stdout
    assert "(default: 1200)" in demo and "(default: 128)" in demo
    serve = run("serve", "--help").stdout
    assert "(default: 127.0.0.1)" in serve and "(default: 8000)" in serve
    bench = run("bench", "--help").stdout
    assert "``" not in bench and "--tp N" in bench  # plain text, not the module's RST docstring


# Runs the CLI in-process for each argv, then reports which heavy modules got imported.
NO_TORCH = """
import contextlib, io, runpy, sys
for argv in {argvs!r}:
    sys.argv = ["streaming-llm", *argv]
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
        runpy.run_module("streaming_llm.cli", run_name="__main__")
    assert out.getvalue(), argv
print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""


def test_help_and_version_import_neither_torch_nor_transformers():
    argvs = [["--help"], ["--version"]] + [
        [*command.split(), "--help"]
        for command in ("generate", "demo", "chat", "ingest", "eval", "eval ppl", "eval demo", "bench", "serve")
    ]
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH.format(argvs=argvs)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    version = run("--version")
    assert version.stdout.strip().startswith("streaming-llm 0.")


TIMINGS = (
    r"\[prompt: (\d+) tokens, [\d.]+ tok/s \| generated: (\d+) tokens, (?:[\d.]+ tok/s|n/a) \| "
    r"time to first token: [\d.]+ s\]"
)


def test_generate_streams_text_and_reports_a_flat_cache_and_timings(tokenizer):
    result = run("generate", "Count from one to ten.", "--max-tokens", "40", "--recent-size", "16", "--start-size", "4")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) > 10
    assert "cache memory: flat" in result.stderr
    assert "evicted" in result.stderr
    timings = re.search(TIMINGS, result.stderr)
    assert timings, result.stderr
    prompt_tokens = len(tokenizer.apply_chat_template(
        [{"role": "user", "content": "Count from one to ten."}], add_generation_prompt=True, tokenize=True
    )["input_ids"])  # fmt: skip
    assert int(timings[1]) == prompt_tokens
    assert 1 <= int(timings[2]) <= 40


def test_chat_through_a_pipe(tmp_path):
    saved = tmp_path / "chat.safetensors"
    script = (
        f"Hello!\n/stats\n/save {saved}\n/save {tmp_path / 'no' / 'such' / 'dir.safetensors'}\nSay it again.\n"
        f"/load {tmp_path / 'missing'}\n/load {saved}\n/stats\n/reset\n/stats\n/bogus\n/quit\nnever read\n"
    )
    result = run("chat", "--max-tokens", "24", "--recent-size", "300", "--verbose", stdin=script)
    assert result.returncode == 0, result.stderr
    stats = [line for line in result.stdout.splitlines() if line.startswith("[turns")]
    assert stats[0].startswith("[turns 1 |") and stats[1] == stats[0]  # /load restored the state after turn 1
    assert stats[2].startswith("[turns 0 | seen 0 tokens")  # /reset started over
    assert re.search(r"in cache \d+ of 304 \|.* \| cache [\d.]+ MiB\]$", stats[0])  # human-readable, MiB
    assert len(re.findall(TIMINGS, result.stderr)) == 2  # --verbose: after each of the two replies
    assert re.search(TIMINGS, result.stdout)  # /stats shows the last reply's timings
    assert "unknown command /bogus" in result.stderr
    assert saved.exists()
    assert "the folder" in result.stderr and "does not exist" in result.stderr
    assert not (tmp_path / "no").exists()  # /save did not create folders
    assert "the current conversation is unchanged" in result.stderr


def test_serve_refuses_a_busy_port_before_loading_the_model():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = run("serve", "--port", str(busy.getsockname()[1]), timeout=60)
    assert result.returncode == 2
    assert "already in use" in result.stderr and "--port" in result.stderr
    assert "Loading model" not in result.stderr and "Traceback" not in result.stderr


def test_ingest_then_questions(tmp_path):
    document = tmp_path / "notes.txt"
    document.write_text("The meeting is on Tuesday at the harbour.\n" * 40)
    result = run("ingest", str(document), "-q", "When is the meeting?", "--max-tokens", "20", "--recent-size", "300")
    assert result.returncode == 0, result.stderr
    assert "ingested" in result.stderr
    bar = re.search(
        r"ingest: 100%\|[^\r\n]*\| ([\d.]+k)/([\d.]+k) \[[^\]]*B/s, ([\d,]+) chars, ([\d,]+) tokens, ([\d,]+) tok/s\]",
        result.stderr,
    )  # a total (the file's size), the characters and tokens fed and the rate in tokens/s
    assert bar and bar[1] == bar[2] == f"{document.stat().st_size / 1000:.2f}k", result.stderr  # total: file size
    assert int(bar[3].replace(",", "")) == len(document.read_text())
    assert "> When is the meeting?" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "x", "--model", "/nonexistent/model"], "No model at"),
        (["generate", "x", "--recent-size", "0"], "recent_size must be >= 1"),
        (["chat", "--load", "/nonexistent.safetensors"], "No session file"),
    ],
)
def test_bad_input_gives_a_clear_error(args, message):
    result = run(*args, stdin="")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_endless_generation_stops_cleanly_on_ctrl_c():
    process = subprocess.Popen(
        [*CLI, "generate", "Tell a story.", "--max-tokens", "0", "--recent-size", "32", "--stats-every", "16"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    deadline = time.time() + 240
    while time.time() < deadline and sum("tokens |" in line for line in lines) < 4:  # well past the cache
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    reader.join(timeout=10)
    err = "".join(lines)
    assert process.returncode == 0, err
    assert "stopped by Ctrl-C" in err
    assert "cache memory: flat" in err


def test_every_option_states_its_default_the_same_way():
    import argparse

    from streaming_llm.cli import build_parser

    def parsers(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    for parser in parsers(build_parser()):
        text = " ".join(parser.format_help().split())
        assert not re.search(r"\(default [^:]", text), parser.prog  # "(default: X)", never "(default X)"
        assert "default: default" not in text


def test_a_one_token_demo_says_what_it_shows_and_claims_no_flat_memory():
    result = run("demo", "--max-tokens", "1", "--stats-every", "0")
    assert result.returncode == 0, result.stderr
    header = result.stderr[result.stderr.index("== streaming-llm demo") :]
    assert "4 attention sinks + a 256-token window" in header and "prompt: Write a very long story" in header
    assert "seed 0" in header and "Loading weights" not in result.stderr
    final = next(line for line in result.stderr.splitlines() if line.startswith("[1 token |"))
    assert "nothing evicted yet" in final and "flat" not in final


def test_kv_dtype_flag_on_generate_chat_serve_and_eval_ppl():
    for command in (("generate",), ("chat",), ("serve",), ("eval", "ppl")):
        assert "--kv-dtype" in run(*command, "--help").stdout, command
    bad = run("generate", "Hi", "--kv-dtype", "int4")
    assert bad.returncode == 2 and "invalid choice: 'int4'" in bad.stderr
    result = run("generate", "Count from one to ten.", "--max-tokens", "24", "--recent-size", "16", "--kv-dtype",
                 "int8", "--temperature", "0")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "cache memory: flat" in result.stderr
