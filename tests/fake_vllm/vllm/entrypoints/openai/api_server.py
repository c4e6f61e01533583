"""A stand-in for vLLM's OpenAI-compatible server, for tests: the same command line, endpoints and
`prompt_logprobs` answers, computed by transformers on CPU from the same model folder.

Run as `python -m vllm.entrypoints.openai.api_server --model DIR --served-model-name NAME
--max-logprobs K --port P` with this folder's parent on PYTHONPATH. `FAKE_VLLM_FAIL_AFTER=N` makes
it exit after answering N completions (a server that dies mid-run).

As a student's engine it samples too (`max_tokens` > 1: transformers' generate, seeded by the request's
`seed`, answering `token_ids`), reloads weights (`/collective_rpc` `reload_weights` and
`/reset_prefix_cache`, with `VLLM_SERVER_DEV_MODE=1` as in vLLM) and loads LoRA adapters at run time
(`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`, with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`).
Each reload and adapter (un)load is logged to stderr as `fake vLLM: EVENT ARG`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
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
    models = {name: model}  # the base model, and each LoRA adapter loaded on it
    lock = threading.Lock()  # one generation at a time: the seed is torch's global one
    dev = os.environ.get("VLLM_SERVER_DEV_MODE") == "1"
    lora = os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("1", "true")

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

        def _send_text(self, text: str) -> None:
            raw = text.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
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
            if self.path in ("/collective_rpc", "/reset_prefix_cache") and dev:
                return self._send(200, _rpc(self.path, body))
            if self.path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter") and lora:
                return self._send_text(_adapter(self.path, body))  # vLLM answers these in plain text
            if self.path != "/v1/completions":
                return self._send(404, {"detail": "Not Found"})
            if body.get("model") not in models:
                return self._send(404, {"error": f"The model `{body.get('model')}` does not exist."})
            if (body.get("max_tokens") or 16) > 1 and not body.get("prompt_logprobs"):
                return self._send(200, {"choices": [_sample(models[body["model"]], body)]})
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

    def _rpc(path: str, body: dict) -> dict:
        if path == "/reset_prefix_cache":
            return {"success": True}
        folder = body["kwargs"]["weights_path"]
        with lock:
            fresh = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            model.load_state_dict(fresh.state_dict())
        print(f"fake vLLM: reload_weights {folder}", file=sys.stderr, flush=True)
        return {"results": [None]}

    def _adapter(path: str, body: dict) -> str:
        from peft import PeftModel

        adapter = body["lora_name"]
        with lock:
            if path.endswith("unload_lora_adapter"):
                models.pop(adapter).unload()
            else:  # a fresh copy of the base under each adapter
                base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
                models[adapter] = PeftModel.from_pretrained(base, body["lora_path"]).eval()
        print(f"fake vLLM: {path.rsplit('/', 1)[1]} {adapter}", file=sys.stderr, flush=True)
        return f"Success: LoRA adapter '{adapter}' done."

    @torch.inference_mode()
    def _sample(served: torch.nn.Module, body: dict) -> dict:
        ids = torch.tensor([body["prompt"]])
        stop = body.get("stop_token_ids") or [tokenizer.eos_token_id]
        greedy = not body.get("temperature")
        settings = {} if greedy else {"temperature": body["temperature"], "top_p": body.get("top_p", 1.0)}
        with lock, torch.random.fork_rng():
            torch.manual_seed(body.get("seed") or 0)
            out = served.generate(
                input_ids=ids, do_sample=not greedy, top_k=0, max_new_tokens=body["max_tokens"],
                eos_token_id=stop[0], pad_token_id=stop[0], **settings,
            )  # fmt: skip
        tokens = out[0, ids.shape[1] :].tolist()
        if stop[0] in tokens:
            tokens = tokens[: tokens.index(stop[0]) + 1]
        reason = "stop" if tokens and tokens[-1] == stop[0] else "length"
        ids = tokens if body.get("return_token_ids") else None  # as vLLM: only when asked for
        return {"text": tokenizer.decode(tokens), "token_ids": ids, "finish_reason": reason}

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
