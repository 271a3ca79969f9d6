"""The demo is never silent while it waits: server start status lines, then a progress bar."""

import io
import time

from sentinel_vllm import demo


def test_start_status_shows_time_and_log_line(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("(APIServer pid=1) INFO 12-02 00:43:13 [model.py:2152] Using max model len 1024\n")
    out = io.StringIO()

    def start():
        time.sleep(1.0)  # ten status periods: two lines even on busy cores
        return "proc"

    assert demo._start_with_status(start, str(log), out, every_s=0.1) == "proc"
    lines = out.getvalue().splitlines()
    assert len([ln for ln in lines if ln.startswith("  server starting:")]) >= 2
    assert lines[0].endswith("Using max model len 1024")
    assert lines[-1].startswith("server ready after")


def test_progress_counts_answers_and_tokens(monkeypatch):
    class P:
        def __init__(self, i):
            self.i = i

        def render(self):
            return f"q{self.i}"

    class S:
        slice = "s"

    def fake_chat(port, model, question, slice_label, max_tokens):
        time.sleep(0.01 * (int(question[1:]) % 3))
        return {"q": question, "usage": {"completion_tokens": 10}}

    monkeypatch.setattr(demo, "chat", fake_chat)
    out = io.StringIO()
    problems = [(S(), P(i)) for i in range(7)]
    resps = demo._ask_with_progress(0, "m", problems, 8, 3, out)
    assert [r["q"] for r in resps] == [f"q{i}" for i in range(7)]  # order kept
    text = out.getvalue()
    assert "7/7" in text and "tokens/s" in text and "answered" in text
