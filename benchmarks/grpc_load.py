"""A multi-process gRPC load generator for the Open Inference Protocol's ModelInfer, and its own
ceiling on this machine.

`ghz` is not installable here, so the generator is Python: P worker processes (spawned, 2 by
default), each running a grpc.aio client whose share of the N concurrent streams (calls kept in
flight, closed loop, as wrk's connections) go over one or a few channels. Requests are built
once with the service's own generated messages (service.protocols.gen) and sent pre-serialized, with
the input in `raw_input_contents`; replies are not parsed (one is, before the load, to check it).
All workers start together at a shared clock time; each counts the calls that complete inside
the window and keeps their latencies, which are merged for p50/p99.

The ceiling: the same generator against a trivial grpc.aio server in a process of its own that
answers every ModelInfer with one canned reply of the real reply's size without reading the
request. That is the most this generator (sharing the machine with a server that does nothing)
can measure; a figure close to it measures the generator, not the server.

    python benchmarks/grpc_load.py --target 127.0.0.1:8001 --model digits --rows 1 --streams 32
    python benchmarks/grpc_load.py --ceiling --shape 8,8,1 --classes 10 --rows 1 --streams 32
    python benchmarks/grpc_load.py --ceiling --target 127.0.0.1:8001 --model digits  # canned = a real reply

Never import tritonclient in the same process: it registers its own `inference` protos, which
clash with the service's in protobuf's default descriptor pool.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import queue
import socket
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# Large enough for any request the benchmark sends (256 rows of 32x32x3 float32 are 3 MiB).
MAX_MESSAGE = 256 * 1024 * 1024
SERVICE = "inference.GRPCInferenceService"
METHOD = f"/{SERVICE}/ModelInfer"


@dataclass
class GrpcLoad:
    """One load's figures: rates over the window, latency percentiles of the calls completed in
    it, errors, and how busy the generator's processes were (cores)."""

    target: str
    rows: int
    streams: int
    processes: int
    channels: int
    duration: float
    requests: int
    errors: int
    requests_per_second: float
    rows_per_second: float
    p50_ms: float
    p99_ms: float
    client_cpu: float
    first_error: str | None = None

    @property
    def client_cpu_us_per_request(self) -> float:
        """The generator's CPU time per completed call, in microseconds: what it takes from the
        cores a server on the same machine would otherwise have."""
        return self.client_cpu * self.duration / self.requests * 1e6 if self.requests else float("nan")


# -- requests and replies (the service's generated messages; only the parent process) -----------

def _pb():
    from service.protocols.gen import grpc_predict_v2_pb2 as pb

    # The method's path from the protocol's descriptor, not typed twice.
    assert pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name == SERVICE
    return pb


def infer_request(model: str, x: np.ndarray, raw: bool = True, version: str = "",
                  input_name: str = "instances") -> bytes:
    """A serialized ModelInferRequest carrying `x` (rows first) raw or as typed contents."""
    from service.protocols.oip import CONTENTS, datatype

    pb = _pb()
    name = datatype(x.dtype.name)
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    tensor = request.inputs.add(name=input_name, datatype=name, shape=list(x.shape))
    if raw:
        request.raw_input_contents.append(np.ascontiguousarray(x, x.dtype.newbyteorder("<")).tobytes())
    else:
        getattr(tensor.contents, CONTENTS[name]).extend(x.reshape(-1).tolist())
    return request.SerializeToString()


def infer_response(model: str, version: str, rows: int, classes: int) -> bytes:
    """A serialized ModelInferResponse shaped as the service's answer to a raw request of `rows`
    rows (one FP32 `probabilities` output of (rows, classes) in raw_output_contents)."""
    pb = _pb()
    reply = pb.ModelInferResponse(model_name=model, model_version=version)
    reply.outputs.add(name="probabilities", datatype="FP32", shape=[rows, classes])
    reply.raw_output_contents.append(np.full((rows, classes), 1 / classes, "<f4").tobytes())
    return reply.SerializeToString()


def _channel_options(distinct: int | None = None) -> list[tuple[str, int]]:
    options = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
    if distinct is not None:
        # A subchannel pool per channel: each channel is its own TCP connection.
        options += [("grpc.use_local_subchannel_pool", 1), ("benchmark.channel", distinct)]
    return options


def probe(target: str, request: bytes, timeout: float = 60.0) -> bytes:
    """One ModelInfer call with a blocking channel: the serialized reply (grpc.RpcError if the
    server refuses it)."""
    import grpc

    with grpc.insecure_channel(target, options=_channel_options()) as channel:
        return channel.unary_unary(METHOD)(request, timeout=timeout)


def check_reply(reply: bytes, rows: int) -> tuple[list[int], int]:
    """The reply's first output shape and the raw bytes it carries; ValueError unless it has
    one probability row per input row."""
    pb = _pb()
    message = pb.ModelInferResponse.FromString(reply)
    if not message.outputs or list(message.outputs[0].shape)[:1] != [rows]:
        raise ValueError(f"reply has outputs {[list(o.shape) for o in message.outputs]}; expected {rows} rows")
    return list(message.outputs[0].shape), sum(len(b) for b in message.raw_output_contents)


def model_input_shape(target: str, model: str, timeout: float = 30.0) -> tuple[tuple[int, ...], str]:
    """(input shape without the batch dimension, datatype) from the server's ModelMetadata."""
    import grpc

    pb = _pb()
    from service.protocols.gen import grpc_predict_v2_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        meta = pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(pb.ModelMetadataRequest(name=model),
                                                                       timeout=timeout)
    tensor = meta.inputs[0]
    return tuple(int(d) for d in tensor.shape[1:]), tensor.datatype


# -- the worker processes ---------------------------------------------------------------------

def split_streams(streams: int, processes: int) -> list[int]:
    """Streams per worker process, as even as it goes; no process without streams."""
    processes = max(1, min(processes, streams))
    return [streams // processes + (1 if i < streams % processes else 0) for i in range(processes)]


async def _drive(target: str, request: bytes, streams: int, channels: int, duration: float, warmup: float,
                 timeout: float, worker: int, ready, go, start_at) -> dict:
    import grpc

    channels = max(1, min(channels, streams))
    opened = [grpc.aio.insecure_channel(target, options=_channel_options(worker * 1000 + i)) for i in range(channels)]
    calls = [c.unary_unary(METHOD) for c in opened]  # no (de)serializers: bytes in, bytes out
    latencies: list[float] = []
    state = {"errors": 0, "first_error": None}

    async def warm(call) -> None:
        end = time.monotonic() + warmup
        while True:
            await call(request, timeout=timeout)  # any error here ends the worker with it
            if time.monotonic() >= end:
                return

    async def stream(call, start: float, end: float) -> None:
        while True:
            began = time.monotonic()
            if began >= end:
                return
            try:
                await call(request, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                if time.monotonic() <= end:
                    state["errors"] += 1
                    state["first_error"] = state["first_error"] or f"{exc.code().name}: {exc.details()}"
                continue
            done = time.monotonic()
            if done <= end:
                latencies.append(done - began)

    try:
        await asyncio.gather(*(warm(calls[i % channels]) for i in range(streams)))
        ready.put(("ready", worker, None))
        await asyncio.to_thread(go.wait)
        start = start_at.value
        end = start + duration
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        cpu = time.process_time()
        await asyncio.gather(*(stream(calls[i % channels], start, end) for i in range(streams)))
        cpu = time.process_time() - cpu
    finally:
        for c in opened:
            await c.close()
    return {"latencies": np.asarray(latencies, "float64").tobytes(), "errors": state["errors"],
            "first_error": state["first_error"], "cpu": cpu}


def _worker(target, request, streams, channels, duration, warmup, timeout, worker, ready, results, go,
            start_at) -> None:
    try:
        out = asyncio.run(_drive(target, request, streams, channels, duration, warmup, timeout, worker, ready, go,
                                 start_at))
        results.put(("done", worker, out))
    except BaseException as exc:  # said to the parent, which would otherwise wait for this worker
        message = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, Exception) or "AioRpcError" not in type(exc).__name__:
            message += "\n" + traceback.format_exc(limit=3)
        ready.put(("error", worker, message))
        results.put(("error", worker, message))


def _next(messages, procs, timeout: float):
    """The next message from the workers; RuntimeError if none comes in `timeout` seconds or a
    worker died without saying why (a crash before its own error handling, e.g. at import)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return messages.get(timeout=0.5)
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a gRPC load worker exited with {dead[0]} (its stderr says why)") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"gRPC load workers did not answer in {timeout:.0f} s") from None


def run_load(target: str, request: bytes, rows: int, streams: int, duration: float, processes: int = 2,
             channels: int = 1, warmup: float = 1.0, timeout: float = 60.0) -> GrpcLoad:
    """Keep `streams` ModelInfer calls of one pre-serialized `request` (of `rows` rows) in flight
    against `target` for `duration` seconds, from up to `processes` worker processes with
    `channels` channels each (after `warmup` seconds of the same load); the figures."""
    if streams < 1 or duration <= 0:
        raise ValueError("streams must be at least 1 and duration positive")
    ctx = mp.get_context("spawn")  # grpc's threads do not survive fork
    ready, results, go, start_at = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
    shares = split_streams(streams, processes)
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(target, request, share, channels, duration, warmup, timeout, i, ready, results, go,
                               start_at))
             for i, share in enumerate(shares)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            kind, worker, message = _next(ready, procs, 120 + warmup + timeout)
            if kind == "error":
                raise RuntimeError(f"gRPC load worker {worker} failed while warming up: {message}")
        start_at.value = time.monotonic() + 0.1
        go.set()
        outs = []
        for _ in procs:
            kind, worker, out = _next(results, procs, duration + timeout + 60)
            if kind == "error":
                raise RuntimeError(f"gRPC load worker {worker} failed: {out}")
            outs.append(out)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    latencies = np.concatenate([np.frombuffer(o["latencies"], "float64") for o in outs])
    requests = len(latencies)
    p50, p99 = (np.percentile(latencies, [50, 99]) * 1000) if requests else (float("nan"), float("nan"))
    return GrpcLoad(target=target, rows=rows, streams=streams, processes=len(procs), channels=channels,
                    duration=duration, requests=requests, errors=sum(o["errors"] for o in outs),
                    requests_per_second=requests / duration, rows_per_second=requests * rows / duration,
                    p50_ms=float(p50), p99_ms=float(p99), client_cpu=sum(o["cpu"] for o in outs) / duration,
                    first_error=next((o["first_error"] for o in outs if o["first_error"]), None))


# -- the ceiling: a server that does nothing --------------------------------------------------

def _echo_server(port: int, reply: bytes, ready) -> None:
    import grpc

    async def infer(request: bytes, context) -> bytes:
        return reply

    async def serve() -> None:
        server = grpc.aio.server(options=_channel_options())
        # No (de)serializers: the request is never parsed, the reply is sent as built.
        handler = grpc.unary_unary_rpc_method_handler(infer)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"ModelInfer": handler}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(serve())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ceiling(request: bytes, reply: bytes, rows: int, streams: int, duration: float, processes: int = 2,
            channels: int = 1, warmup: float = 1.0, echo_processes: int = 1) -> GrpcLoad:
    """The generator's own maximum: `run_load` against a trivial server (`echo_processes`
    processes of its own on one port, SO_REUSEPORT being gRPC's default on Linux) that answers
    every ModelInfer with `reply` without reading the request."""
    ctx = mp.get_context("spawn")
    port, servers = _free_port(), []
    try:
        for _ in range(echo_processes):
            ready = ctx.Event()
            server = ctx.Process(target=_echo_server, args=(port, reply, ready), daemon=True)
            server.start()
            servers.append(server)
            if not ready.wait(60):
                raise RuntimeError("the echo server did not start in 60 s")
        return run_load(f"127.0.0.1:{port}", request, rows, streams, duration, processes, channels, warmup)
    finally:
        for server in servers:
            server.terminate()
            server.join(10)
            if server.is_alive():
                server.kill()


# -- command line -----------------------------------------------------------------------------

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", help="host:port of the service's gRPC server")
    p.add_argument("--model", default="digits", help="ensemble name. Default: digits")
    p.add_argument("--shape", help="input shape without the batch, e.g. 8,8,1 (default: asked of --target)")
    p.add_argument("--rows", type=int, default=1, help="rows per request. Default: 1")
    p.add_argument("--streams", type=int, default=32, help="calls in flight at once. Default: 32")
    p.add_argument("--processes", type=int, default=2, help="worker processes. Default: 2")
    p.add_argument("--channels", type=int, default=1, help="channels (connections) per process. Default: 1")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load. Default: 10")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of the same load first. Default: 1")
    p.add_argument("--typed", action="store_true", help="send typed contents instead of raw_input_contents")
    p.add_argument("--ceiling", action="store_true",
                   help="measure the generator against a trivial in-process echo server instead; its canned "
                        "reply is a real one from --target if given, else one built for --classes")
    p.add_argument("--classes", type=int, default=10, help="--ceiling without --target: classes per reply row")
    p.add_argument("--echo-processes", type=int, default=1, help="--ceiling: echo server processes. Default: 1")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args()
    if args.target is None and not args.ceiling:
        p.error("give --target (or --ceiling)")
    if args.shape:
        shape = tuple(int(d) for d in args.shape.split(","))
    elif args.target:
        shape, _ = model_input_shape(args.target, args.model)
    else:
        p.error("--ceiling without --target needs --shape")
    x = np.random.default_rng(0).uniform(0, 1, (args.rows, *shape)).astype("float32")
    request = infer_request(args.model, x, raw=not args.typed)
    if args.target:
        reply = probe(args.target, request)
        check_reply(reply, args.rows)
    else:
        reply = infer_response(args.model, "1", args.rows, args.classes)
    if args.ceiling:
        result = ceiling(request, reply, args.rows, args.streams, args.duration, args.processes, args.channels,
                         args.warmup, args.echo_processes)
    else:
        result = run_load(args.target, request, args.rows, args.streams, args.duration, args.processes,
                          args.channels, args.warmup)
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print(f"{'ceiling' if args.ceiling else result.target}: {args.rows}-row requests of {len(request)} bytes "
              f"(replies {len(reply)} bytes), {result.streams} streams over {result.processes} processes x "
              f"{result.channels} channels, {result.duration:g} s: {result.requests_per_second:,.0f} req/s, "
              f"{result.rows_per_second:,.0f} rows/s, p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, "
              f"errors {result.errors}{' (' + result.first_error + ')' if result.first_error else ''}, "
              f"generator CPU {result.client_cpu:.2f} cores ({result.client_cpu_us_per_request:.0f} us per call)")
    return 0


if __name__ == "__main__":
    # Run as a script, the repository root must be importable for service.protocols.gen.
    sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
