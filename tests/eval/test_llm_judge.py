"""The LLM judge over real HTTP: a local ``medcap serve`` on the tiny model is the judge
(loopback, no network). Its replies are whatever the tiny model says; what is checked is
what reaches it, that each verdict is MedEvalKit's reading of the reply kept beside it,
that a stopped judging resumes without asking again, and the refusals."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from medcap.eval._llm_judge import JUDGE_PROMPT, JudgeClient, JudgeError, needs_judge, verdict  # noqa: E402
from medcap.eval._results import read_csv_rows, write_csv_atomic  # noqa: E402


@pytest.fixture(scope="module")
def judge_server(tmp_path_factory):
    """``medcap serve --config tiny/generate`` set up by its own code, served by uvicorn on a free loopback port."""
    import torch
    import uvicorn

    from medcap.models import medcap_tiny, save_vision_checkpoint
    from medcap.serve._app import create_app
    from medcap.serve._main import _parser, build_state
    from medcap.testing import make_tiny_training_assets

    root = tmp_path_factory.mktemp("judge_server")
    assets = make_tiny_training_assets(root, samples=2)
    torch.manual_seed(3)
    ckpt = root / "meta_model_last.pt"
    save_vision_checkpoint(medcap_tiny(**assets["model_kwargs"], num_image_tokens=4), ckpt)
    args = _parser().parse_args(["--config", "tiny/generate", f"assets_dir={root}", f"vision_checkpoint={ckpt}",
                                 "model.max_seq_len=2048", "--max-context", "2048", "--max-tokens", "64",
                                 "--model-name", "tiny-judge"])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(build_state(args), page=False), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the judge server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    server.should_exit = True
    thread.join(timeout=15)


class Recording(JudgeClient):
    """The real client, recording each conversation it sends."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.sent = []

    def chat(self, messages):
        self.sent.append(messages)
        return super().chat(messages)


@pytest.mark.parametrize("reply, want", [
    ("<think>Same organ.</think>\n<judge>0</judge>", 1), ("<think>No.</think><judge>1</judge>", 0),
    ("0", 1), (" 0 \n", 1), ("<judge> 0 </judge>", 1), ("The answer is correct: 0", 0), ("", 0), ("<judge></judge>", 0),
])
def test_verdict_is_medevalkits_reading(reply, want):
    # MedEvalKit: the <judge> content, or the whole reply when it has none, stripped, equal to "0"
    assert verdict(reply) == want


def _slake_raw(folder: Path) -> Path:
    rows = [("s1", "closed", "Yes", "Yes, there is."), ("s2", "open", "liver", "The hepatic organ"),
            ("s3", "open", "left lung", "left lung"), ("s4", "open", "", "unanswered")]
    raw = folder / "slake-omit-raw-ck.csv"
    write_csv_atomic(raw, ["image", "instruction", "output", "generated", "question", "answer", "answer_type",
                           "question_id"],
                     [{"image": f"{q}.png", "instruction": "p", "output": a, "generated": g, "question": f"Where is {q}?",
                       "answer": a, "answer_type": k, "question_id": q} for q, k, a, g in rows], bom=True)
    return raw


def test_the_judge_scores_a_file_over_http_and_resumes(judge_server, tmp_path, capsys):
    from medcap.eval._benchmarks import score_benchmark
    from medcap.eval._rescore import rescore_main

    raw = _slake_raw(tmp_path)
    client = Recording(judge_server, "tiny-judge", max_tokens=16)
    client.check()
    summary = score_benchmark(None, raw, progress=False, judge=client, judge_concurrency=2)
    # SLAKE: MedEvalKit sends every question with an answer to its judge (s4 has none)
    prompts = sorted(m[0]["content"] for m in client.sent)
    assert prompts == sorted(JUDGE_PROMPT.format(question=f"Where is {q}?", answer=a, reply=g) for q, a, g in [
        ("s1", "Yes", "Yes, there is."), ("s2", "liver", "The hepatic organ"), ("s3", "left lung", "left lung")])
    rows = read_csv_rows(summary["scored_path"])
    for r in rows:
        if r["question_id"] == "s4":
            assert (r["judge_verdict"], r["judge_reply"]) == ("", "")
        else:  # the verdict is the reply's reading, both kept
            assert r["judge_verdict"] == str(verdict(r["judge_reply"]))
    judged = [int(r["judge_verdict"]) for r in rows[:3]]
    assert summary["conventions"]["medevalkit"]["judged_overall"] == pytest.approx(sum(judged) / 3)
    assert summary["judge"] == {"endpoint": judge_server, "model": "tiny-judge"}
    (tmp_path / "slake-omit-raw-ck-summary.json").write_text(json.dumps(summary))
    assert rescore_main([summary["scored_path"]]) == 0
    assert f"judge: tiny-judge at {judge_server}" in capsys.readouterr().out
    # scored again: every reply comes from {raw}-judge.jsonl, nothing is asked
    again = Recording(judge_server, "tiny-judge", max_tokens=16)
    assert read_csv_rows(score_benchmark(None, raw, progress=False, judge=again)["scored_path"]) == rows
    assert again.sent == []


def test_without_a_judge_the_columns_are_empty_and_the_report_says_off(tmp_path):
    from medcap.eval._benchmarks import score_benchmark

    summary = score_benchmark(None, _slake_raw(tmp_path), progress=False)
    assert summary["judge"] == "off" and "judged_overall" not in summary["conventions"]["medevalkit"]
    assert {(r["judge_verdict"], r["judge_reply"]) for r in read_csv_rows(summary["scored_path"])} == {("", "")}


def test_the_whole_suite_with_the_judge(judge_server, scripted, fake_image_loader, tmp_path, capsys):
    from medcap.eval import SuiteRun, run_benchmark
    from medcap.testing import make_slake_layout

    make_slake_layout(tmp_path / "data")
    client = JudgeClient(judge_server, "tiny-judge", max_tokens=8)
    run = SuiteRun(output_dir=tmp_path / "out", ckpt="ck", image_loader=fake_image_loader, progress=False)
    result = run_benchmark(scripted(lambda text, key, budget: "Yes"), "test_slake", run,
                           dataset_source=str(tmp_path / "data"), vqa_type="omit", max_seq_len=500, max_new_tokens=8,
                           judge=client)
    out = capsys.readouterr().out
    assert "SLAKE: q_lang=all: English and Chinese questions: the set MedEvalKit's table scores" in out
    assert f"judge: tiny-judge at {judge_server}" in out
    summary = json.loads(Path(result["summary_path"]).read_text())
    # the layout's 6 questions (English and Chinese) whose image is there: each is judged
    assert summary["conventions"]["medevalkit"]["judged_rows"] == 6 and summary["q_lang"] == "all"


def test_the_judge_refuses_clearly(judge_server):
    with pytest.raises(JudgeError, match="is not served at"):
        JudgeClient(judge_server, "gpt-4.1").check()
    with pytest.raises(JudgeError, match="http"):
        JudgeClient("127.0.0.1:8000/v1", "m")
    with pytest.raises(JudgeError, match="needs judge_model"):
        JudgeClient(judge_server, "")
    port = socket.socket()
    port.bind(("127.0.0.1", 0))  # bound, never listening: the connection is refused
    with pytest.raises(JudgeError, match="cannot be reached"):
        JudgeClient(f"http://127.0.0.1:{port.getsockname()[1]}/v1", "m", timeout_s=5).check()
    port.close()
    with pytest.raises(JudgeError, match="answered HTTP 400"):
        JudgeClient(judge_server, "tiny-judge", max_tokens=100000).chat([{"role": "user", "content": "hi"}])


def test_which_rows_medevalkit_judges():
    rows = {"closed": {"answer_type": "closed", "output": "yes"}, "open": {"answer_type": "open", "output": "liver"},
            "choice": {"answer_type": "choice", "output": "CT"}, "no answer": {"answer_type": "open", "output": ""}}
    assert [k for k, r in rows.items() if needs_judge(r, "slake")] == ["closed", "open"]
    assert [k for k, r in rows.items() if needs_judge(r, "pathvqa")] == ["open"]


def test_tools_judge_with_an_endpoint(judge_server, tmp_path, capsys):
    """tools/judge.py's reference scoring (RIGHT/WRONG), asked of the server instead of a local model."""
    from medcap.eval import judge_main
    from medcap.eval._judge import is_right
    from medcap.eval._rescore import rescore

    raw = tmp_path / "vqarad-omit-raw-ck.csv"
    turn = "<|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    write_csv_atomic(raw, ["image", "instruction", "output", "generated"],
                     [{"image": f"{i}.png", "instruction": turn.format(q=f"Is there a mass {i}?"), "output": "yes",
                       "generated": "Yes."} for i in range(3)], bom=True)
    assert judge_main(["--exp", "eval_vqa", "--csv-path", str(raw), "--endpoint", judge_server, "--judge-model",
                       "tiny-judge", "--max-new-tokens", "8", "--no-progress"]) == 0
    judged = next(tmp_path.glob("vqarad-omit-raw-ck-70B_4bit-*.csv"))
    rows = read_csv_rows(judged)
    assert [r["instruction"].split("Question: ")[1].split("\n")[0] for r in rows] == [f"Is there a mass {i}?" for i in range(3)]
    result = rescore(judged)["scores"]["judge_accuracy"]
    assert result["recomputed"] == pytest.approx(sum(is_right(r["generated"]) for r in rows) / 3)
    with pytest.raises(SystemExit):
        judge_main(["--exp", "eval_vqa", "--csv-path", str(raw), "--endpoint", judge_server])
    assert "--endpoint needs --judge-model" in capsys.readouterr().err


def test_a_busy_judge_is_asked_again(monkeypatch):
    """A server that answers 503 once (a stand-in on loopback: medcap serve is never busy on purpose)."""
    import http.server

    answers = [(503, {"error": "busy"}), (200, {"choices": [{"message": {"content": "<judge>0</judge>"}}]})]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            code, body = answers.pop(0)
            self.send_response(code)
            self.end_headers()
            self.wfile.write(json.dumps(body).encode())

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr("medcap.eval._llm_judge.time.sleep", lambda s: None)
    try:
        reply = JudgeClient(f"http://127.0.0.1:{server.server_port}/v1", "m").ask("q", "a", "r")
    finally:
        server.shutdown()
    assert reply == "<judge>0</judge>" and answers == []
