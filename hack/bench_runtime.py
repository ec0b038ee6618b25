#!/usr/bin/env python3
"""Benchmark: modelendpoint-runtime against vLLM's own OpenAI server, side by side.

`make bench-runtime` runs this. Same vLLM, model (the embedded SmolLM2) and
engine settings for both. Both servers are started, then driven ONE AT A TIME
by the same load: fixed prompts, streaming text completions with
``ignore_eos`` and a fixed ``max_tokens`` (so every request generates the same
number of tokens), greedy decoding, at concurrency 1, 8 and 32 (closed loop:
each worker sends its next request when the previous one ends). Each
concurrency runs in ``--rounds`` blocks per server, interleaved A B B A A B ...,
so the background load of a shared machine drifts over both servers alike;
the idle server's engine sleeps meanwhile.

Reported per server and concurrency: requests/s, output tokens/s, time to
first token (TTFT) and inter-token latency (ITL) at p50 and p99 (over every
block), the runtime/vLLM ratios against the targets (throughput >= 0.97, TTFT
p50 within 2 ms), and the spread of the per-block throughput ratio. The table
is printed and written into docs/benchmarks.md between the ``bench-runtime``
markers, with the command line that produced it.

Options: ``--requests-scale`` multiplies the request counts per block
(default 1: 16/48/128 requests at concurrency 1/8/32), ``--max-tokens``
(default 32), ``--rounds N`` blocks per server and concurrency (default 4), ``--sessions N``
start-ups of the pair (default 2; which server starts first alternates: on
this machine the one started second measured a few percent faster, whichever
it was), ``--no-write`` leaves the docs alone, ``--control`` runs vLLM's server in
both places (an A/A run: what the same server measures against itself here,
the noise floor of the comparison) and only prints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "hack"))
from localcluster import free_port  # noqa: E402

SERVED = "smollm2-bench"
KEY = "sk-bench"
CONCURRENCY = (1, 8, 32)
BASE_REQUESTS = {1: 16, 8: 48, 32: 128}
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "List some facts about the planet Mars.",
    "Describe a walk through a busy market.",
    "What makes a good cup of tea?",
    "Tell me about the history of paper.",
    "How do bees make honey?",
    "Describe the sound of rain on a roof.",
]
# Engine settings shared by both servers.
ENGINE = {"max_model_len": "2048", "max_num_seqs": "32", "dtype": "float32"}
ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    base_url: str
    ready_url: str
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)


def start(kind: str, model_dir: Path, workdir: Path, slot: str | None = None) -> Server:
    port = free_port()
    env = dict(os.environ, **ENV)
    log = workdir / f"{slot or kind}.log"
    if kind == "runtime":
        env.update(
            MODEL_NAME=str(model_dir), OPENAI_SERVED_MODEL_NAME_OVERRIDE=SERVED, API_KEY=KEY,
            HOST="127.0.0.1", PORT=str(port), MAX_MODEL_LEN=ENGINE["max_model_len"],
            MAX_NUM_SEQS=ENGINE["max_num_seqs"], DTYPE=ENGINE["dtype"], MAX_CONCURRENT_REQUESTS="1024",
        )  # fmt: skip
        cmd = [sys.executable, "-m", "modelendpoint_runtime"]
        base, ready = f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}/ready"
    else:
        from modelendpoint_runtime.settings import generation_overrides, load_settings

        # The runtime's default sampling parameters (the guide's temperature, the
        # max_tokens cap), so both engines are configured alike to the last option.
        defaults = generation_overrides(load_settings({"MODEL_NAME": str(model_dir)}))
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", SERVED, "--api-key", KEY, "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", ENGINE["max_model_len"], "--max-num-seqs", ENGINE["max_num_seqs"],
            "--dtype", ENGINE["dtype"], "--override-generation-config", json.dumps(defaults),
        ]  # fmt: skip
        base, ready = f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}/health"
    print(f"==> starting {kind}: {' '.join(cmd[1:4])} ...", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(kind, proc, base, ready, log)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            raise SystemExit(f"{kind} exited with {proc.returncode} before ready:\n{tail}")
        try:
            # vLLM's /health is 200 slightly before /v1/models answers.
            auth = {"Authorization": f"Bearer {KEY}"}
            if (httpx.get(ready, timeout=2).status_code == 200
                    and httpx.get(base + "/models", headers=auth, timeout=5).status_code == 200):
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    server.stop()
    raise SystemExit(f"{kind} not ready after 600 s")


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    requests: int = 0
    errors: int = 0
    wall: float = 0.0


async def one_request(client: httpx.AsyncClient, base: str, prompt: str, max_tokens: int, res: Result) -> None:
    body = {"model": SERVED, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    last = None
    usage = None
    async with client.stream("POST", base + "/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            res.errors += 1
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                now = time.perf_counter()
                if last is None:
                    res.ttft.append(now - start)
                else:
                    res.itl.append(now - last)
                last = now
    res.requests += 1
    res.tokens += usage["completion_tokens"] if usage else 0


async def run_load(base: str, concurrency: int, total: int, max_tokens: int) -> Result:
    res = Result()
    queue: asyncio.Queue[str] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(PROMPTS[i % len(PROMPTS)])
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits, headers={"Authorization": f"Bearer {KEY}"}) as client:

        async def worker():
            while True:
                try:
                    prompt = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await one_request(client, base, prompt, max_tokens, res)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        res.wall = time.perf_counter() - start
    return res


def merge(a: Result | None, b: Result) -> Result:
    """Two runs of the same load as one sample (walls add up: rates stay rates)."""
    if a is None:
        return b
    return Result(a.ttft + b.ttft, a.itl + b.itl, a.tokens + b.tokens, a.requests + b.requests,
                  a.errors + b.errors, a.wall + b.wall)  # fmt: skip


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def run_blocks(servers: dict[str, Server], rounds: int, scale: float, max_tokens: int
               ) -> tuple[dict[str, dict[int, Result]], dict[int, list[float]]]:
    """Every concurrency, ``rounds`` blocks per server in A B B A order; pooled results
    per server, and the runtime/vLLM throughput ratio of each pair of blocks."""
    pooled: dict[str, dict[int, Result]] = {kind: {} for kind in servers}
    block_ratios: dict[int, list[float]] = {}
    for c in CONCURRENCY:
        total = max(c, int(BASE_REQUESTS[c] * scale))
        for server in servers.values():
            # Not measured: the engine's first batches of a new size are slower (warm-up).
            asyncio.run(run_load(server.base_url, c, 2 * c, max_tokens))
        for round_no in range(rounds):
            order = ("runtime", "vllm") if round_no % 2 == 0 else ("vllm", "runtime")
            block = {}
            for kind in order:
                r = asyncio.run(run_load(servers[kind].base_url, c, total, max_tokens))
                print(f"    c={c} round {round_no + 1}/{rounds} {kind}: {r.requests} req in {r.wall:.1f}s, "
                      f"{r.tokens / r.wall:.1f} tok/s, TTFT p50 {pct(r.ttft, 50) * 1000:.1f} ms, "
                      f"errors {r.errors}", file=sys.stderr, flush=True)  # fmt: skip
                block[kind] = r
                pooled[kind][c] = merge(pooled[kind].get(c), r)
            a, b = block["runtime"], block["vllm"]
            block_ratios.setdefault(c, []).append((a.tokens / a.wall) / (b.tokens / b.wall))
    return pooled, block_ratios


THROUGHPUT_TARGET = 0.97  # runtime / vLLM output tokens per second, at least
TTFT_TARGET_MS = 2.0  # runtime - vLLM TTFT p50, at most


LABELS = {"runtime": "modelendpoint-runtime", "vllm": "vLLM api_server"}
CONTROL_LABELS = {"runtime": "vLLM api_server (in the runtime's place)", "vllm": "vLLM api_server"}


def table(results: dict[str, dict[int, Result]], block_ratios: dict[int, list[float]],
          labels: dict[str, str] = LABELS) -> str:
    ms = 1000
    rows = [
        "| concurrency | server | requests | req/s | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) "
        "| ITL p99 (ms) | errors |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    ratio_rows = [
        "| concurrency | req/s ratio | output tok/s ratio (target >= 0.97) | per-block tok/s ratios, min-max | "
        "TTFT p50 diff (ms) (target <= +2) | TTFT p99 diff (ms) | ITL p50 diff (ms) | targets met |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for c in CONCURRENCY:
        for kind, label in labels.items():
            r = results[kind][c]
            rows.append(
                f"| {c} | {label} | {r.requests} | {r.requests / r.wall:.2f} | {r.tokens / r.wall:.1f} | "
                f"{pct(r.ttft, 50) * ms:.1f} | {pct(r.ttft, 99) * ms:.1f} | {pct(r.itl, 50) * ms:.1f} | "
                f"{pct(r.itl, 99) * ms:.1f} | {r.errors} |"
            )
        a, b = results["runtime"][c], results["vllm"][c]
        tok_ratio = (a.tokens / a.wall) / (b.tokens / b.wall)
        ttft_diff = (pct(a.ttft, 50) - pct(b.ttft, 50)) * ms
        met = "yes" if tok_ratio >= THROUGHPUT_TARGET and ttft_diff <= TTFT_TARGET_MS else "no"
        ratio_rows.append(
            f"| {c} | {(a.requests / a.wall) / (b.requests / b.wall):.3f} | {tok_ratio:.3f} | "
            f"{min(block_ratios[c]):.3f}-{max(block_ratios[c]):.3f} | {ttft_diff:+.1f} | "
            f"{(pct(a.ttft, 99) - pct(b.ttft, 99)) * ms:+.1f} | {(pct(a.itl, 50) - pct(b.itl, 50)) * ms:+.1f} | {met} |"
        )
    return "\n".join(rows) + "\n\nRatios (runtime / vLLM) and differences (runtime - vLLM):\n\n" + "\n".join(ratio_rows)


START, END = "<!-- bench-runtime:start -->", "<!-- bench-runtime:end -->"

NOTES = """How to read it: both servers run the same vLLM engine with the same engine
configuration (the runtime builds vLLM's own serving classes over an engine
created from vLLM's own argument parser), so a difference is the HTTP layer
around it (auth, limits, admission, metrics, the JSON log line, the stream
re-framing) or noise: the engines, both API processes and the load generator
share the machine's cores. The per-block ratios show how far two consecutive
blocks of the same load drift apart. `hack/microbench_runtime.py` measures the
HTTP layer's CPU per request and per chunk without an engine.
"""


def write_doc(section: str) -> None:
    doc = REPO / "docs" / "benchmarks.md"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{START}\n{section}\n{END}"
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests-scale", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--sessions", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--control", action="store_true",
                        help="an A/A run: a second vLLM server in the runtime's place, to see the "
                             "machine's noise floor; prints its table, writes nothing")
    args = parser.parse_args()

    import embedded_model

    model_dir = embedded_model.model_dir()
    if not (model_dir / "config.json").exists():
        raise SystemExit(f"the embedded model is missing at {model_dir}; run `make embedded-model`")
    results: dict[str, dict[int, Result]] = {"runtime": {}, "vllm": {}}
    block_ratios: dict[int, list[float]] = {}
    for session in range(args.sessions):
        # Start order moved the results by a few percent on this machine (the
        # server started second measured faster, either one): each server goes
        # first in half of the sessions.
        start_order = ("runtime", "vllm") if session % 2 == 0 else ("vllm", "runtime")
        print(f"==> session {session + 1}/{args.sessions}: starting {' then '.join(start_order)}",
              file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="bench-runtime-") as tmp:
            servers: dict[str, Server] = {}
            try:
                for slot in start_order:
                    kind = "vllm" if args.control else slot
                    servers[slot] = start(kind, model_dir, Path(tmp), slot)
                pooled, ratios = run_blocks(servers, args.rounds, args.requests_scale, args.max_tokens)
            finally:
                for server in servers.values():
                    server.stop()
        for kind, by_c in pooled.items():
            for c, r in by_c.items():
                results[kind][c] = merge(results[kind].get(c), r)
        for c, rs in ratios.items():
            block_ratios.setdefault(c, []).extend(rs)
    import vllm  # for the version line only

    defaults = (args.requests_scale, args.max_tokens, args.rounds, args.sessions) == (1.0, 32, 4, 2)
    command = "make bench-runtime" if defaults and not args.control else (
        f".venv/bin/python hack/bench_runtime.py --requests-scale {args.requests_scale} "
        f"--max-tokens {args.max_tokens} --rounds {args.rounds} --sessions {args.sessions}"
        + (" --control" if args.control else "")
    )
    counts = ", ".join(
        f"{max(c, int(BASE_REQUESTS[c] * args.requests_scale)) * args.rounds * args.sessions} at concurrency {c}"
        for c in CONCURRENCY
    )
    load = os.getloadavg()
    section = (
        "## Runtime: modelendpoint-runtime vs vLLM's OpenAI server\n\n"
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d', time.gmtime())}: vLLM {vllm.__version__} on the CPU "
        f"({os.cpu_count()} cores, {platform.machine()}), the embedded SmolLM2-135M-Instruct (float32), "
        f"max_model_len {ENGINE['max_model_len']}, max_num_seqs {ENGINE['max_num_seqs']}; both servers up, driven "
        f"one at a time in {args.rounds} interleaved blocks per concurrency (A B B A ...), in {args.sessions} sessions "
        f"(start-ups) alternating which server starts first. Machine shared with other work (load average "
        f"at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores). Load: streaming text "
        f"completions of {args.max_tokens} tokens each (ignore_eos, greedy), fixed prompts, closed loop; {counts} "
        "requests per server, after 2 x concurrency warm-up requests per server and concurrency. TTFT is measured to "
        "the first chunk with text, ITL between chunks with text, on the client.\n\n"
        + table(results, block_ratios, CONTROL_LABELS if args.control else LABELS) + "\n\n" + NOTES
    )
    print(section)
    if not (args.no_write or args.control):
        write_doc(section)


if __name__ == "__main__":
    main()
