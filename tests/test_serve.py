"""adaptext serve: many adapters on one base, over real HTTP on loopback, in a real server process."""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import adaptext
from adaptext import api
from adaptext.errors import AdaptextError
from adaptext.serve.registry import AdapterExists, AdapterNotFound, PathRefused, Registry
from conftest import assert_labels_agree, assert_probs_close, run_cli, topic_rows
from test_compare import chromium_path

TEXTS = ["goal match team coach", "market price bank", "planet rocket orbit star moon", "league", "profit and a comet"]
TOKEN = "test-token-5f2c"


def _train(model_dir: Path, data_dir: Path, output: Path, **kw):
    settings = dict(data=str(data_dir), model=str(model_dir), output=str(output), epochs=3, batch_size=8,
                    max_length=32, lr=2e-2, seed=3, lora_dropout=0.0)  # fmt: skip
    settings.update(kw)
    return api.train(progress=False, echo=lambda line: None, **settings)


@pytest.fixture(scope="module")
def adapters(tiny_models, topic_dir, tmp_path_factory) -> Path:
    """A folder of adapters: three on one BERT base (3 and 2 labels, LoRA and head-only), one GPT-2, one IA3."""
    two = tmp_path_factory.mktemp("two-classes")
    pd.DataFrame(topic_rows(30, seed=5, classes=("sports", "money"))).to_csv(two / "train.csv", index=False)
    pd.DataFrame(topic_rows(8, seed=6, classes=("sports", "money"))).to_csv(two / "test.csv", index=False)
    root = tmp_path_factory.mktemp("adapters")
    _train(tiny_models["bert"], topic_dir, root / "topics")
    _train(tiny_models["bert"], two, root / "binary", lora_r=4, target_modules=["query", "key", "value"])
    _train(tiny_models["bert"], two, root / "binary-head", method="head")
    _train(tiny_models["gpt2"], topic_dir, root / "gpt2-topics")
    _train(tiny_models["bert"], two, root / "binary-ia3", method="ia3")
    return root


def reference(folder: Path, texts: list[str]) -> np.ndarray:
    return adaptext.load(folder).predict_proba(texts)


def reference_logits(folder: Path, texts: list[str]) -> np.ndarray:
    """What sets the bounds of a comparison in bf16 (conftest.assert_probs_close)."""
    return adaptext.load(folder).logits(texts)


# ---------------------------------------------------------------------- the registry, in process


@pytest.mark.parity
def test_mixed_batches_match_predict_and_share_one_base(adapters):
    registry = Registry([adapters])
    names = ["topics", "binary", "binary-head", "gpt2-topics", "binary-ia3"]
    for name in names:
        registry.load(name)
    bases = registry.describe_bases()
    assert sorted(len(b["adapters"]) for b in bases) == [1, 3]  # bert x3 on one base, gpt2 alone; IA3 standalone
    bert = next(b for b in registry.bases.values() if len(b.names) == 3)
    assert {registry.get(n).runner for n in ("topics", "binary", "binary-head")} == {bert}
    rng = random.Random(0)
    requests = [(rng.choice(names), rng.sample(TEXTS, rng.randint(1, 4))) for _ in range(30)]
    results = registry.probabilities(requests)
    refs = {name: dict(zip(TEXTS, reference(adapters / name, TEXTS))) for name in names}
    ref_logits = {name: reference_logits(adapters / name, TEXTS) for name in names}
    for (name, texts), probs in zip(requests, results):
        assert probs.shape == (len(texts), len(registry.get(name).class_names))
        expected = np.stack([refs[name][t] for t in texts])
        assert_probs_close(probs, expected, ref_logits[name], err_msg=name)
    # The adapters really differ: a mixed batch that ignored per-row adapters would be caught above.
    assert not np.allclose(refs["binary"][TEXTS[0]], refs["binary-head"][TEXTS[0]], atol=1e-3)


@pytest.mark.parity
def test_unload_frees_the_base_with_its_last_adapter_and_reload_matches(adapters):
    registry = Registry([adapters])
    registry.load("binary")
    registry.load("binary-head")
    registry.unload("binary")
    assert_probs_close(
        registry.probabilities([("binary-head", TEXTS)])[0],
        reference(adapters / "binary-head", TEXTS),
        reference_logits(adapters / "binary-head", TEXTS),
    )
    registry.unload("binary-head")
    assert registry.bases == {} and registry.adapters == {}
    registry.load("binary", name="again")
    assert_probs_close(
        registry.probabilities([("again", TEXTS)])[0],
        reference(adapters / "binary", TEXTS),
        reference_logits(adapters / "binary", TEXTS),
    )
    with pytest.raises(AdapterNotFound, match="no adapter named 'binary'"):
        registry.unload("binary")
    with pytest.raises(AdapterExists, match="already loaded"):
        registry.load("topics", name="again")
    assert isinstance(registry.probabilities([("gone", ["x"])])[0], AdapterNotFound)


def test_paths_outside_the_roots_and_pickled_weights_are_refused(adapters, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(adapters / "binary", root / "pickled")
    (root / "pickled" / "pytorch_model.bin").write_bytes(b"not loaded, ever")
    (root / "escape").symlink_to(adapters / "binary", target_is_directory=True)
    registry = Registry([root])
    with pytest.raises(AdaptextError, match="pickled weights .*pytorch_model.bin"):
        registry.load("pickled")
    with pytest.raises(PathRefused, match="outside the directories"):
        registry.load("escape")  # a symlink inside the root pointing outside it
    with pytest.raises(PathRefused, match="outside the directories"):
        registry.load(str(adapters / "binary"))
    with pytest.raises(PathRefused):
        registry.load(os.path.relpath(adapters / "binary", root))  # ../../ out of the root
    with pytest.raises(AdaptextError, match="not found"):
        registry.load("nothing-here")
    with pytest.raises(AdaptextError, match="adapter name"):
        Registry([adapters]).load("binary", name="bad name/with slash")
    assert registry.adapters == {}


def test_bad_serve_options_exit_2_with_one_line(adapters, tmp_path):
    cases = [
        (["--adapters", str(tmp_path / "missing")], "no such directory"),
        (["--adapters", str(tmp_path)], "no adaptext.json found"),
        (["--adapters", f"x={tmp_path}"], "NAME= applies to one adapter directory"),
        (["--adapters", str(adapters / "binary"), "--max-texts", "0"], "--max-texts 0: must be at least 1"),
        (["--adapters", str(adapters / "binary"), "--port", "70000"], "--port 70000"),
        (["--adapters", str(adapters / "binary"), "--allow-dir", str(tmp_path / "nope")], "--allow-dir"),
    ]
    for args, message in cases:
        result = run_cli("serve", *args, "--port", "0") if "--port" not in args else run_cli("serve", *args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)


# ---------------------------------------------------------------------- a real server process


class Server:
    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        command = [sys.executable, "-m", "adaptext", "serve", "--port", "0", *args]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
        )
        self.lines = []
        deadline = time.time() + 120
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()}")
            self.lines.append(line)
            match = re.search(r"at (http://\S+?)/ ", line)
            if match:
                self.url = match.group(1)
                break
        else:
            raise RuntimeError("server did not start")
        while time.time() < deadline:
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.1)
        raise RuntimeError("server never became ready")

    def request(
        self, method: str, path: str, body=None, token: str | None = TOKEN, headers=None, raw: bytes | None = None
    ):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        for key, value in (headers or {}).items():
            request.add_header(key, value)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                payload = response.read()
                status = response.status
                kind = response.headers.get("content-type", "")
        except urllib.error.HTTPError as exc:
            payload, status, kind = exc.read(), exc.code, exc.headers.get("content-type", "")
        return status, (json.loads(payload) if "json" in kind else payload.decode())

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def post(self, path: str, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.communicate(timeout=30)  # drains and closes both pipes (no ResourceWarning, no blocked writer)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture(scope="module")
def server(adapters, tmp_path_factory):
    extra = tmp_path_factory.mktemp("hot")
    shutil.copytree(adapters / "binary", extra / "late")
    srv = Server(
        [
            "--adapters",
            f"topics={adapters / 'topics'}",
            str(adapters / "binary"),
            str(adapters / "binary-head"),
            str(adapters / "binary-ia3"),
            "--allow-dir",
            str(extra),
            "--token",
            TOKEN,
            "--max-texts",
            "8",
            "--max-text-chars",
            "200",
            "--max-body-bytes",
            "4000",
            "--max-wait-ms",
            "20",
        ]  # fmt: skip
    )
    srv.extra = extra
    yield srv
    srv.stop()
    assert srv.proc.returncode == 0, srv.proc.stderr.read()


@pytest.mark.processes
@pytest.mark.parity
def test_classify_answers_equal_predict_with_each_adapters_labels(server, adapters, precision):
    for name, folder in (
        ("topics", "topics"),
        ("binary", "binary"),
        ("binary-head", "binary-head"),
        ("binary-ia3", "binary-ia3"),
    ):
        status, body = server.post("/v1/classify", {"adapter": name, "texts": TEXTS, "top_k": 2})
        assert status == 200, body
        expected = adaptext.load(adapters / folder).predict(TEXTS, top_k=2)
        logits = reference_logits(adapters / folder, TEXTS)
        assert body["labels"] == adaptext.load(adapters / folder).class_names
        assert body["precision"] == precision  # what computed the answers, in every response
        assert_labels_agree([g["label"] for g in body["results"]], [w["label"] for w in expected], logits)
        for got, want, row_logits in zip(body["results"], expected, logits):
            if precision == "fp32":  # in bf16 the second of two close classes may swap: the bound covers it
                assert [t["label"] for t in got["top_k"]] == [t["label"] for t in want["top_k"]]
            assert_probs_close(
                [got["probabilities"][label] for label in want["probabilities"]],
                list(want["probabilities"].values()),
                row_logits,
            )


@pytest.mark.processes
def test_listing_shows_one_shared_base_and_training_metrics(server):
    status, body = server.get("/v1/adapters")
    assert status == 200
    by_name = {a["name"]: a for a in body["adapters"]}
    assert sorted(by_name) == ["binary", "binary-head", "binary-ia3", "topics"]
    assert by_name["topics"]["labels"] == ["money", "space", "sports"] and by_name["binary"]["labels"] == [
        "money",
        "sports",
    ]
    assert by_name["binary"]["shared_base"] and not by_name["binary-ia3"]["shared_base"]
    assert 0 <= by_name["topics"]["metrics"]["accuracy"] <= 1
    # What the server computes in and what the training-time metrics were computed in (the same here).
    assert by_name["topics"]["precision"] == by_name["topics"]["metrics_precision"] == body["bases"][0]["precision"]
    assert len(body["bases"]) == 1 and sorted(body["bases"][0]["adapters"]) == ["binary", "binary-head", "topics"]


@pytest.mark.processes
@pytest.mark.parity
def test_concurrent_requests_share_batches_and_stay_correct(server, adapters):
    names = ["topics", "binary", "binary-head"]
    refs = {n: dict(zip(TEXTS, reference(adapters / n, TEXTS))) for n in names}
    ref_logits = {n: dict(zip(TEXTS, reference_logits(adapters / n, TEXTS))) for n in names}
    jobs = [(names[i % 3], [TEXTS[i % len(TEXTS)], TEXTS[(i + 2) % len(TEXTS)]]) for i in range(48)]
    before = batch_counts(server)

    def one(job):
        return server.post("/v1/classify", {"adapter": job[0], "texts": job[1]})

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, jobs))
    for (name, texts), (status, body) in zip(jobs, answers):
        assert status == 200, body
        labels = body["labels"]
        for text, row in zip(texts, body["results"]):
            assert_probs_close([row["probabilities"][lab] for lab in labels], refs[name][text], ref_logits[name][text])
    after = batch_counts(server)
    batches, requests = after[0] - before[0], after[1] - before[1]
    assert requests == 48 and batches < 48, (batches, requests)  # some forward passes served several requests


def batch_counts(server) -> tuple[float, float]:
    text = server.get("/metrics")[1]
    count = float(re.search(r"^adaptext_batch_requests_count (\S+)$", text, re.M).group(1))
    total = float(re.search(r"^adaptext_batch_requests_sum (\S+)$", text, re.M).group(1))
    return count, total


BAD_REQUESTS = [
    # (method, path, body or raw bytes, token, extra headers, status, words in the error)
    ("POST", "/v1/classify", b'{"adapter": "topics", "texts": ["a"', TOKEN, {}, 400, "not valid JSON"),
    ("POST", "/v1/classify", {"adapter": "topics", "texts": ["a"]}, None, {}, 401, "bearer token"),
    ("POST", "/v1/classify", {"adapter": "topics", "texts": ["a"]}, "wrong", {}, 401, "bearer token"),
    ("GET", "/v1/adapters", None, None, {}, 401, "bearer token"),
    ("POST", "/v1/classify", {"adapter": "nope", "texts": ["a"]}, TOKEN, {}, 404, "no adapter named 'nope'"),
    ("GET", "/v2/nothing", None, TOKEN, {}, 404, "Not Found"),
    ("DELETE", "/v1/adapters/nope", None, TOKEN, {}, 404, "no adapter named 'nope'"),
    ("POST", "/v1/classify", {"adapter": "topics", "texts": ["a"] * 9}, TOKEN, {}, 413, "limit is 8"),
    ("POST", "/v1/classify", {"adapter": "topics", "texts": ["a" * 201]}, TOKEN, {}, 413, "201 characters"),
    ("POST", "/v1/classify", {"adapter": "topics", "texts": ["a" * 190] * 8 * 3}, TOKEN, {}, 413, "over 4,000 bytes"),
    ("POST", "/v1/classify", {"adapter": "topics", "texts": [1]}, TOKEN, {}, 422, "texts.0"),
    ("POST", "/v1/classify", {"adapter": "topics"}, TOKEN, {}, 422, "texts: Field required"),
    ("POST", "/v1/classify", {"adapter": "topics", "texts": []}, TOKEN, {}, 422, "at least one text"),
    ("POST", "/v1/classify", {"adapter": "topics", "texts": ["a"], "top_k": 0}, TOKEN, {}, 422, "top_k"),
    ("POST", "/v1/classify", {"adapter": "topics", "texts": ["a"], "labels": 1}, TOKEN, {}, 422, "labels: Extra"),
    ("POST", "/v1/classify", [1, 2], TOKEN, {}, 422, "must be a JSON object"),
    ("POST", "/v1/classify", b"adapter=topics", TOKEN, {"Content-Type": "text/plain"}, 415, "Content-Type"),
    ("POST", "/v1/adapters", {"path": "/etc"}, TOKEN, {}, 403, "outside the directories"),
    ("POST", "/v1/adapters", {"path": "late", "name": "topics"}, TOKEN, {}, 409, "already loaded"),
    ("POST", "/v1/adapters", {"path": "no-such-adapter"}, TOKEN, {}, 400, "not found"),
    ("POST", "/v1/adapters", {"path": "late"}, None, {}, 401, "bearer token"),
]


@pytest.mark.processes
@pytest.mark.parametrize(
    "method,path,body,token,headers,status,words", BAD_REQUESTS, ids=[f"{c[5]}-{c[6][:20]}" for c in BAD_REQUESTS]
)
def test_bad_requests_get_a_clear_json_error_and_the_right_status(
    server, method, path, body, token, headers, status, words
):
    raw = body if isinstance(body, bytes) else None
    got, answer = server.request(method, path, None if raw else body, token=token, headers=headers, raw=raw)
    assert got == status, answer
    assert isinstance(answer, dict) and answer["status"] == status and words in answer["error"], answer
    assert "\n" not in answer["error"] and "Traceback" not in answer["error"]


@pytest.mark.processes
def test_a_chunked_body_over_the_limit_is_refused_without_a_content_length(server):
    import http.client

    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"adapter": "topics", "texts": ["a" * 190] * 30}).encode()
    conn.putrequest("POST", "/v1/classify")
    for key, value in (("Content-Type", "application/json"), ("Authorization", f"Bearer {TOKEN}"),
                       ("Transfer-Encoding", "chunked")):  # fmt: skip
        conn.putheader(key, value)
    conn.endheaders()
    for i in range(0, len(body), 1000):
        chunk = body[i : i + 1000]
        conn.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
    conn.send(b"0\r\n\r\n")
    response = conn.getresponse()
    assert response.status == 413 and "over 4,000 bytes" in json.loads(response.read())["error"]


@pytest.mark.processes
@pytest.mark.parity
def test_hot_load_and_unload_with_the_admin_token(server, adapters):
    status, body = server.post("/v1/adapters", {"path": "late", "name": "late-binary"})
    assert status == 201 and body["labels"] == ["money", "sports"] and body["shared_base"], body
    status, body = server.post("/v1/classify", {"adapter": "late-binary", "texts": TEXTS})
    assert status == 200
    probs = [[r["probabilities"][lab] for lab in body["labels"]] for r in body["results"]]
    assert_probs_close(probs, reference(adapters / "binary", TEXTS), reference_logits(adapters / "binary", TEXTS))
    assert len(server.get("/v1/adapters")[1]["bases"]) == 1  # hot-loaded onto the base already in memory
    assert server.request("DELETE", "/v1/adapters/late-binary") == (200, {"unloaded": "late-binary"})
    assert server.post("/v1/classify", {"adapter": "late-binary", "texts": ["a"]})[0] == 404


@pytest.mark.processes
def test_operations_endpoints_and_openapi(server):
    assert server.get("/healthz", token=None) == (200, {"status": "ok"})
    status, ready = server.get("/readyz", token=None)
    assert status == 200 and ready["ready"] and "topics" in ready["adapters"]
    status, schema = server.get("/openapi.json", token=None)
    assert status == 200 and {"/v1/classify", "/v1/adapters", "/v1/adapters/{name}"} <= set(schema["paths"])
    status, docs = server.get("/docs", token=None)
    assert status == 200 and "swagger" in docs.lower()
    status, metrics = server.get("/metrics", token=None)
    assert status == 200
    assert re.search(r'adaptext_requests_total\{endpoint="/v1/classify",method="POST",status="200"\} [1-9]', metrics)
    assert re.search(r'adaptext_requests_total\{endpoint="/v1/classify",method="POST",status="413"\} [1-9]', metrics)
    assert 'adaptext_request_seconds_bucket{endpoint="/v1/classify",le="0.1"}' in metrics
    assert re.search(r'adaptext_texts_classified_total\{adapter="topics"\} [1-9]', metrics)
    assert re.search(r"^adaptext_adapters_loaded 4\.0$", metrics, re.M)


@pytest.mark.processes
def test_without_a_token_admin_is_off_and_classify_is_open(adapters):
    srv = Server(["--adapters", str(adapters / "binary")], env={"ADAPTEXT_SERVE_TOKEN": ""})
    try:
        assert srv.post("/v1/classify", {"adapter": "binary", "texts": ["a"]}, token=None)[0] == 200
        status, body = srv.post("/v1/adapters", {"path": str(adapters / "binary"), "name": "x"}, token=None)
        assert status == 403 and "--token" in body["error"]
        assert srv.request("DELETE", "/v1/adapters/binary", token=None)[0] == 403
    finally:
        srv.stop()
    assert srv.proc.returncode == 0


@pytest.mark.processes
def test_the_page_classifies_in_a_browser(server, adapters):
    from playwright.sync_api import sync_playwright

    expected = adaptext.load(adapters / "topics").predict([TEXTS[2]])[0]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_selector("#error:has-text('token')")  # the listing needs the token first
        assert page.get_attribute("#auth", "open") is not None  # the token field opened by itself
        page.fill("#token", TOKEN)
        page.dispatch_event("#token", "change")
        page.wait_for_selector("#adapter option[value='topics']", state="attached")
        page.select_option("#adapter", "topics")
        assert "3 labels: money, space, sports" in page.text_content("#meta")
        page.fill("#text", TEXTS[2])
        page.click("#go")
        page.wait_for_selector("#result .row")
        rows = page.locator("#result .row")
        labels = [rows.nth(i).get_attribute("data-label") for i in range(rows.count())]
        best = page.get_attribute("#result .row.best", "data-label")
        width = page.evaluate("document.querySelector('#result .row.best .bar').getBoundingClientRect().width")
        shown = page.text_content("#result .row.best .pct")
        page.fill("#text", "")
        page.click("#go")
        empty_error = page.text_content("#error")
        browser.close()
    assert sorted(labels) == ["money", "space", "sports"] and best == expected["label"]
    assert shown == f"{100 * expected['score']:.1f}%" and width > 0
    assert "Paste a text" in empty_error
