"""The ``streaming-llm`` command, driven through subprocesses on the real embedded model."""

from __future__ import annotations

import json
import signal
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


def test_generate_streams_text_and_reports_a_flat_cache():
    result = run("generate", "Count from one to ten.", "--max-tokens", "40", "--recent-size", "16", "--start-size", "4")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) > 10
    assert "cache memory: flat" in result.stderr
    assert "evicted" in result.stderr


def test_chat_through_a_pipe(tmp_path):
    saved = tmp_path / "chat.safetensors"
    script = (
        f"Hello!\n/stats\n/save {saved}\nSay it again.\n/load {tmp_path / 'missing'}\n/load {saved}\n/stats\n"
        "/reset\n/stats\n/bogus\n/quit\nnever read\n"
    )
    result = run("chat", "--max-tokens", "24", "--recent-size", "300", stdin=script)
    assert result.returncode == 0, result.stderr
    stats = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert stats[0]["turns"] == 1 and stats[1] == stats[0]  # /load restored the state saved after turn 1
    assert stats[2]["turns"] == 0 and stats[2]["seen_tokens"] == 0  # /reset started over
    assert "unknown command /bogus" in result.stderr
    assert saved.exists()
    assert "the current conversation is unchanged" in result.stderr


def test_ingest_then_questions(tmp_path):
    document = tmp_path / "notes.txt"
    document.write_text("The meeting is on Tuesday at the harbour.\n" * 40)
    result = run("ingest", str(document), "-q", "When is the meeting?", "--max-tokens", "20", "--recent-size", "300")
    assert result.returncode == 0, result.stderr
    assert "ingested" in result.stderr
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
