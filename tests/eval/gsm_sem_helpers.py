"""Shared by the GSM-SEM tests: a loopback chat-completions server and small files in the released format."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

JANET = ("Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her "
         "friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck "
         "egg. How much in dollars does she make every day at the farmers' market?")
JANET_SOLUTION = ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every "
                  "day at the farmer’s market.\n#### 18")
JANET_VARIANT = ("Omar’s hens lay 16 eggs per day. He uses three for omelettes every morning and gives his neighbours "
                 "four every day. He sells the rest at the village shop daily for $2 per egg. How much in dollars "
                 "does he make every day at the shop?")


@contextmanager
def chat_server(reply: Callable[[dict], str], status: int = 200) -> Iterator[tuple[str, list[dict]]]:
    """An OpenAI-compatible `/v1/chat/completions` endpoint on 127.0.0.1 (a free port), answering each request
    body with `reply(body)` (or an error `status`). Yields (base URL, the request bodies received)."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append({**body, "authorization": self.headers.get("Authorization")})
            if self.path != "/v1/chat/completions" or status != 200:
                payload = {"error": {"message": "refused by the test server", "type": "invalid_request_error"}}
                code = 404 if status == 200 else status
            else:
                code = 200
                payload = {"id": "cmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": reply(body)}}],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:  # keep pytest's output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def scripted_reply(body: dict) -> str:
    """A well-behaved generator, judge and solver: rewrites give JANET_VARIANT, judges say True, solves 18."""
    prompt = body["messages"][-1]["content"]
    if prompt.startswith("Solve this math word problem"):
        return "He sells 9 eggs at $2. The answer is 18."
    if "Reply with one word: True or False" in prompt:
        return "True"
    return f"New question: {JANET_VARIANT}"


LABELS_MAX = {"none": True, "min": True, "min-med": True, "med": True, "med-max": True, "max": True}


def write_released(directory: Path, rows: dict[str, list[dict]]) -> Path:
    """`rows` as released GSM-SEM files ({file name: rows}) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, items in rows.items():
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in items))
    return directory


def released_row(sem_id: str, variant: str = JANET_VARIANT, final_answer="18", labels: dict | None = None) -> dict:
    return {"SEM_id": sem_id, "question": JANET, "SEM_question": variant, "answer": JANET_SOLUTION,
            "final_answer": final_answer, **(labels or LABELS_MAX)}
