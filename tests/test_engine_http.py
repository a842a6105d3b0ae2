"""The CPU engine behind its SGLang-compatible HTTP server, through ``HttpEngineClient``.

The raw JSON is checked against SGLang's native ``/generate`` response shape, so the client that
passes here also reads a real SGLang server. Failures (over-long prompt, dead server, a server
that never answers) must surface as ``EngineError`` naming the URL.
"""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest

from relayrl.model import make_tiny_model
from relayrl.rollout.client import HttpEngineClient
from relayrl.rollout.cpu_engine import CpuEngine
from relayrl.rollout.engine import Engine, EngineError, GenerateRequest, SamplingParams
from relayrl.rollout.server import load_tokenizer, start_server_thread


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("http") / "model", seed=3)


@pytest.fixture(scope="module")
def served(tiny_dir):
    """Two engine servers (so round-robin and fan-out are exercised) and a reference engine."""
    handles = [
        start_server_thread(CpuEngine(tiny_dir, max_batch_size=4, max_seq_len=64, seed=i),
                            tokenizer=load_tokenizer(tiny_dir))
        for i in range(2)
    ]
    yield handles
    for h in handles:
        h.shutdown()


def _run(coro):
    return asyncio.run(coro)


def _req(ids, **kw) -> GenerateRequest:
    return GenerateRequest(list(ids), SamplingParams(**kw))


async def _raw(url: str, method: str, path: str, body=None):
    async with aiohttp.ClientSession() as s:
        async with s.request(method, url + path, json=body) as r:
            ctype = r.headers.get("Content-Type", "")
            return r.status, (await r.json() if "json" in ctype else await r.text())


def test_generate_and_score_round_trip(served):
    engine = served[0].server.engine
    reqs = [_req([5, 6, 7 + i], max_new_tokens=6 + i, temperature=1.0, seed=i, ignore_eos=True) for i in range(6)]
    expected = engine.generate_many(reqs)

    async def main():
        client = HttpEngineClient([h.url for h in served], timeout_s=30)
        assert isinstance(client, Engine)
        outs = await asyncio.gather(*(client.generate(r) for r in reqs))
        scores = await client.score([5, 6, 7, 8, 9], temperature=0.5)
        await client.close()
        return outs, scores

    outs, scores = _run(main())
    for got, exp in zip(outs, expected):  # the same seed on either server gives the same tokens
        assert got.output_ids == exp.output_ids
        assert got.output_logprobs == pytest.approx(exp.output_logprobs, abs=1e-5)
        assert (got.finish_reason, got.weight_version, got.prompt_tokens) == ("length", 0, 3)
    assert scores == pytest.approx(engine.submit_score([5, 6, 7, 8, 9], 0.5).result(), abs=1e-6)
    assert scores[0] == 0.0


def test_response_has_sglang_shape(served):
    url = served[0].url
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 4, "temperature": 0.0, "ignore_eos": True},
            "return_logprob": True, "logprob_start_len": 0}
    status, out = _run(_raw(url, "POST", "/generate", body))
    assert status == 200
    meta = out["meta_info"]
    assert set(out) == {"text", "output_ids", "meta_info"} and isinstance(out["text"], str)
    assert meta["finish_reason"] == {"type": "length", "length": 4}
    assert (meta["prompt_tokens"], meta["completion_tokens"], meta["weight_version"]) == (3, 4, "0")
    assert [t[1] for t in meta["output_token_logprobs"]] == out["output_ids"]
    assert all(len(t) == 3 and t[2] is None and t[0] < 0 for t in meta["output_token_logprobs"])
    assert [t[1] for t in meta["input_token_logprobs"]] == [5, 6, 7]
    assert meta["input_token_logprobs"][0][0] is None

    # A batch of prompts answers with a list; a stop token is reported as SGLang's "matched".
    first = out["output_ids"][0]
    batch = {"input_ids": [[5, 6, 7], [8, 9]], "return_logprob": True,
             "sampling_params": {"max_new_tokens": 4, "temperature": 0.0, "stop_token_ids": [first]}}
    status, outs = _run(_raw(url, "POST", "/generate", batch))
    assert status == 200 and isinstance(outs, list) and len(outs) == 2
    assert outs[0]["meta_info"]["finish_reason"] == {"type": "stop", "matched": first}
    assert outs[0]["output_ids"] == [first]
    # A batch that repeats a prompt computes it once; the copies say so as SGLang does.
    group = {"input_ids": [[5, 6, 7, 8]] * 3, "sampling_params": {"max_new_tokens": 2}}
    status, outs = _run(_raw(url, "POST", "/generate", group))
    assert status == 200 and [o["meta_info"]["cached_tokens"] for o in outs] == [0, 4, 4]

    # Scoring: max_new_tokens 0 samples nothing and returns every input logprob.
    score = {"input_ids": [5, 6, 7, 8], "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
             "logprob_start_len": 0}
    status, out = _run(_raw(url, "POST", "/generate", score))
    assert out["output_ids"] == [] and len(out["meta_info"]["input_token_logprobs"]) == 4


def test_info_endpoints(served, tiny_dir):
    url = served[0].url
    assert _run(_raw(url, "GET", "/health"))[0] == 200
    assert _run(_raw(url, "GET", "/health_generate"))[0] == 200
    status, info = _run(_raw(url, "GET", "/get_model_info"))
    assert status == 200 and info["model_path"] == str(tiny_dir) and info["is_generation"] is True
    status, info = _run(_raw(url, "GET", "/get_server_info"))
    assert status == 200 and info["context_length"] == 64 and info["max_running_requests"] == 4
    assert _run(_raw(url, "POST", "/flush_cache"))[0] == 200
    status, out = _run(_raw(url, "POST", "/generate", {"text": "w1 w2 w3", "sampling_params": {"max_new_tokens": 2}}))
    assert status == 200 and out["meta_info"]["prompt_tokens"] == 3 and len(out["output_ids"]) <= 2


def test_weight_update_reaches_every_server(served, tmp_path):
    other = make_tiny_model(tmp_path / "other", seed=11)
    reference = CpuEngine(other, max_batch_size=1, max_seq_len=64)
    r = _req([5, 6, 7], max_new_tokens=5, temperature=1.0, seed=0, ignore_eos=True)
    expected = reference.submit(r).result()
    reference.shutdown()

    async def main():
        client = HttpEngineClient([h.url for h in served], timeout_s=30)
        before = await client.weight_version()
        await client.update_weights(str(other), 4)
        after = await client.weight_version()
        await client.flush_cache()  # what the driver does after an update on SGLang
        outs = [await client.generate(r) for _ in range(2)]  # one per server (round-robin)
        with pytest.raises(EngineError, match="cannot load weights"):
            await client.update_weights(str(tmp_path / "nowhere"), 5)
        await client.close()
        return before, after, outs

    before, after, outs = _run(main())
    assert (before, after) == (0, 4)
    for c in outs:
        assert c.output_ids == expected.output_ids and c.weight_version == 4
        assert c.output_logprobs == pytest.approx(expected.output_logprobs, abs=1e-5)
    status, out = _run(_raw(served[1].url, "GET", "/get_weight_version"))
    assert out == {"weight_version": "4"}


def test_errors_are_engine_errors_naming_the_url(served):
    url = served[0].url

    async def main():
        client = HttpEngineClient([url], timeout_s=30)
        with pytest.raises(EngineError, match="longer than the engine's context") as e:
            await client.generate(_req(list(range(5, 5 + 64)), max_new_tokens=4))
        assert e.value.url == url
        with pytest.raises(EngineError, match="longer than the engine's context"):
            await client.score([5] * 65)
        ok = await client.generate(_req([5, 6], max_new_tokens=2, ignore_eos=True))  # still serving
        await client.close()
        return ok

    assert len(_run(main()).output_ids) == 2
    status, out = _run(_raw(url, "POST", "/generate", {"input_ids": "not ids"}))
    assert status == 400 and "input_ids" in out["error"]["message"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dead_server_is_an_engine_error():
    dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there

    async def main():
        client = HttpEngineClient([dead], timeout_s=5)
        with pytest.raises(EngineError) as e:
            await client.generate(_req([5], max_new_tokens=1))
        assert e.value.url == dead and dead in str(e.value)
        assert await client.health() is False
        await client.close()

    _run(main())


def test_a_server_that_never_answers_times_out():
    # A socket that listens but never reads: the connection opens, no reply ever comes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"

        async def main():
            client = HttpEngineClient([url], timeout_s=0.3)
            with pytest.raises(EngineError, match="timed out after 0.3 s"):
                await client.generate(_req([5], max_new_tokens=1))
            await client.close()

        _run(main())


@pytest.mark.slow
def test_launch_cpu_engines_under_ray(tiny_dir):
    ray = pytest.importorskip("ray")
    from relayrl.config import EngineConfig
    from relayrl.rollout.engine_actor import launch_cpu_engines

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = EngineConfig(num_engines=2, max_batch_size=2, max_seq_len=64)
        actors, urls = launch_cpu_engines(cfg, tiny_dir, num_cpus_per_engine=1)
        assert len(urls) == 2 and len(set(urls)) == 2

        async def main():
            client = HttpEngineClient(urls, timeout_s=60)
            outs = [await client.generate(_req([5, 6], max_new_tokens=3, seed=1, ignore_eos=True)) for _ in urls]
            await client.close()
            return outs

        a, b = _run(main())
        assert a.output_ids == b.output_ids and len(a.output_ids) == 3
        ray.get([x.update_weights.remote(str(tiny_dir), 2) for x in actors])
        assert ray.get([x.weight_version.remote() for x in actors]) == [2, 2]
        ray.get([x.shutdown.remote() for x in actors])
    finally:
        ray.shutdown()
