"""A stand-in for vLLM's OpenAI-compatible server, for tests: the same command line, endpoints and
`prompt_logprobs` answers, computed by transformers on CPU from the same model folder.

Run as `python -m vllm.entrypoints.openai.api_server --model DIR --served-model-name NAME
--max-logprobs K --port P` with this folder's parent on PYTHONPATH. `FAKE_VLLM_FAIL_AFTER=N` makes
it exit after answering N completions (a server that dies mid-run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--max-logprobs", type=int, default=20)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1")
    args, _ = parser.parse_known_args()
    name = args.served_model_name or args.model
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    state = {"served": 0, "fail_after": int(os.environ.get("FAKE_VLLM_FAIL_AFTER", "0"))}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, code: int, body: dict) -> None:
            raw = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:
            if self.path == "/health":
                return self._send(200, {})
            if self.path == "/v1/models":
                return self._send(200, {"data": [{"id": name, "object": "model"}]})
            return self._send(404, {"error": "not found"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/tokenize":
                ids = tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
                return self._send(200, {"tokens": ids["input_ids"]})
            if body.get("model") != name:
                return self._send(404, {"error": f"The model `{body.get('model')}` does not exist."})
            k = body.get("prompt_logprobs") or 0
            if k > args.max_logprobs:
                return self._send(
                    400,
                    {
                        "error": f"Requested prompt logprobs of {k}, which is greater than max allowed: "
                        f"{args.max_logprobs}"
                    },
                )
            self._send(
                200, {"choices": [{"text": "", "prompt_logprobs": _prompt_logprobs(body["prompt"], k)}]}
            )
            state["served"] += 1
            if state["fail_after"] and state["served"] >= state["fail_after"]:
                os._exit(1)

    @torch.inference_mode()
    def _prompt_logprobs(ids: list[int], k: int) -> list:
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        out = [None]
        for p in range(1, len(ids)):
            row = logprobs[p - 1]
            order = row.argsort(descending=True)
            ranks = torch.empty_like(order)
            ranks[order] = torch.arange(1, len(order) + 1)
            wanted = [*order[:k].tolist(), ids[p]]
            out.append(
                {
                    str(t): {"logprob": float(row[t]), "rank": int(ranks[t]), "decoded_token": ""}
                    for t in wanted
                }
            )
        return out

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"fake vLLM serving {name} on port {args.port}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
