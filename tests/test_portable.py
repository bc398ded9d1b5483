"""Portable streams (issue 16): the stream file format, export and import.

Without an engine: the format round-trips, is a standard safetensors file, and refuses truncated,
corrupted, foreign, future and oversized files (and thousands of seeded mutations) with `StreamFileError`
naming the reason, before allocating. With engines (slow, one at a time): a stream exported after 10 clips
(`Stream.export`) and imported beside its original (`LiveVLM.import_stream`) answers three questions token
for token like it, lossless and default configs, while the original goes on independently; a second server
imports the files over HTTP and answers alike (acceptance 1), exports them again, refuses bad files with 400
naming the reason and 250 fuzzed files without a 5xx, and keeps serving (acceptance 3).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import struct

import pytest
import torch

from helpers import Server, async_client, greedy, random_video
from vllm_livevlm.portable import format as fmt
from vllm_livevlm.portable.format import StreamFileError, decode_stream, encode_stream

FINGERPRINT = {"architecture": "LiveVLMLlavaOnevisionForConditionalGeneration", "layers": 2, "kv_heads": 1,
               "head_dim": 64, "dtype": "float32", "weights_sha256": "0" * 64, "tp_size": 1}
MiB = 2**20


def synthetic_tensors(fingerprint: dict = FINGERPRINT, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors of every name, dtype and shape the format holds (3 sinks, 32 long-term tokens in 2 pages, 5
    short-term tokens, 1 pending 8x8 frame, 4 encoded frames), random values."""
    generator = torch.Generator().manual_seed(seed)
    tp = fingerprint["tp_size"]
    dims = {"L": fingerprint["layers"], "H": fingerprint["kv_heads"] // tp, "D": fingerprint["head_dim"],
            "S": 3, "n": 32, "p": 2, "m": 5, "A": 0, "F": 1, "h": 8, "w": 8, "c": 3, "E": 4}
    dtypes = {"kv": fmt.torch_dtype(fingerprint["dtype"]), "float32": torch.float32, "float64": torch.float64,
              "int64": torch.int64, "uint8": torch.uint8}

    def tensor(dtype: str, shape: tuple[str, ...]) -> torch.Tensor:
        size = [dims[d] for d in shape]
        if dtypes[dtype].is_floating_point:
            return torch.randn(size, generator=generator).to(dtypes[dtype])
        return torch.randint(0, 4, size, generator=generator).to(dtypes[dtype])

    tensors = {fmt.shard_name(rank, name): tensor(*spec) for rank in range(tp) for name, spec in fmt.MEMORY_TENSORS.items()}
    return {**tensors, **{name: tensor(*spec) for name, spec in fmt.FRONT_TENSORS.items()}}


def synthetic_file(fingerprint: dict = FINGERPRINT, **header) -> bytes:
    return encode_stream({"model": fingerprint, "stream": {"system_prompt": "é ✓"}, **header},
                         synthetic_tensors(fingerprint))


def refusal(data: bytes, max_bytes: int = 64 * MiB, fingerprint: dict | None = None) -> str:
    with pytest.raises(StreamFileError) as info:
        decode_stream(data, max_bytes, fingerprint)
    return str(info.value)


# ---- the format --------------------------------------------------------------------------------------------
def test_round_trip_is_exact_and_a_standard_safetensors_file():
    from safetensors.torch import load

    tensors = synthetic_tensors()
    data = encode_stream({"model": FINGERPRINT, "stream": {"system_prompt": "é ✓"}}, tensors)
    header, decoded = decode_stream(data, len(data), FINGERPRINT)
    assert header["format"] == "livevlm-stream" and header["version"] == fmt.FORMAT_VERSION == 2
    assert header["model"] == FINGERPRINT and header["stream"] == {"system_prompt": "é ✓"}
    assert decoded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert decoded[name].dtype == tensor.dtype and torch.equal(decoded[name], tensor), name
    # Any safetensors reader opens it: the LiveVLM header and checksum are its metadata.
    assert all(torch.equal(t, tensors[name]) for name, t in load(data).items())
    assert fmt.read_header(data) == header
    assert (8 + struct.unpack_from("<Q", data)[0]) % 8 == 0  # tensor bytes aligned as safetensors writes them


def test_a_truncated_file_is_refused_at_every_cut():
    data = synthetic_file()
    size = struct.unpack_from("<Q", data)[0]
    assert refusal(data[:5]) == "truncated: 5 bytes is not even a safetensors header length"
    assert refusal(data[:8 + size - 1]) == f"truncated: the header declares {size} bytes but the file has {size - 1} after it"
    cut = len(data) - 100
    assert refusal(data[:cut]) == f"truncated: the tensors declare {len(data) - 8 - size} bytes and the file holds " \
                                  f"{cut - 8 - size}"


def test_a_corrupted_byte_fails_the_checksum():
    data = bytearray(synthetic_file())
    data[-3] ^= 0x10
    assert refusal(bytes(data)).startswith("checksum mismatch: the file is corrupted")


def test_a_future_version_is_refused_by_name(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(fmt, "FORMAT_VERSION", 3)
    future = synthetic_file()
    monkeypatch.undo()
    assert refusal(future) == "format version 3 is newer than this server reads (up to 2)"


def test_a_version_1_file_is_read_as_a_1d_stream(monkeypatch: pytest.MonkeyPatch):
    """Files written before position records (checkpoints of a server being upgraded) still restore: their
    records come back zero-wide, as a 1-D model's are; a version-1 file holding records is malformed."""
    tensors = synthetic_tensors()
    old = {name: t for name, t in tensors.items() if not name.endswith(("ltm_pos", "stm_pos"))}
    monkeypatch.setattr(fmt, "FORMAT_VERSION", 1)
    v1 = encode_stream({"model": FINGERPRINT, "stream": {}}, old)
    v1_with_records = encode_stream({"model": FINGERPRINT, "stream": {}}, tensors)
    monkeypatch.undo()
    header, decoded = decode_stream(v1, len(v1), FINGERPRINT)
    assert header["version"] == 1 and decoded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert decoded[name].shape == tensor.shape and torch.equal(decoded[name], tensor), name
    assert decoded[fmt.shard_name(0, "ltm_pos")].shape[-1] == 0 == decoded[fmt.shard_name(0, "stm_pos")].shape[-1]
    assert refusal(v1_with_records) == ("the file's tensors do not match the format: missing [], unexpected "
                                        "[\"'tp0.ltm_pos'\", \"'tp0.stm_pos'\"]")


def test_another_model_or_tensor_parallel_size_is_refused_by_name():
    data = synthetic_file()
    other_weights = {**FINGERPRINT, "weights_sha256": "1" * 64}
    assert refusal(data, fingerprint=other_weights) == (
        f"the file is from another model: its weights_sha256 is {'0' * 64!r}, this engine's is {'1' * 64!r}")
    gqa = {**FINGERPRINT, "kv_heads": 2}
    assert refusal(synthetic_file(gqa), fingerprint=FINGERPRINT) == (
        "the file is from another model: its kv_heads is 2, this engine's is 1")
    sharded = {**FINGERPRINT, "kv_heads": 2, "tp_size": 2}
    header, tensors = decode_stream(synthetic_file(sharded), 64 * MiB)
    assert {"tp0.ltm_k", "tp1.ltm_k"} <= tensors.keys() and tensors["tp1.ltm_k"].shape == (2, 32, 1, 64)
    assert refusal(synthetic_file(sharded), fingerprint={**FINGERPRINT, "kv_heads": 2}) == (
        "the file was written by a tensor-parallel size 2 engine and this one runs 1: import it onto the same "
        "size (no re-sharding)")


def test_shapes_that_disagree_with_the_fingerprint_are_refused():
    tensors = synthetic_tensors()
    tensors["tp0.ltm_v"] = torch.zeros(2, 32, 1, 32)  # head dim 32, the fingerprint says 64
    data = encode_stream({"model": FINGERPRINT, "stream": {}}, tensors)
    assert refusal(data) == ("tensor 'tp0.ltm_v' has shape [2, 32, 1, 32]: its D is 32, the fingerprint or another "
                             "tensor says 64")
    tensors = synthetic_tensors()
    tensors["tp0.stm_ids"] = torch.zeros(6, dtype=torch.int64)  # 6 short-term ids, 5 short-term keys
    assert "its m is 6" in refusal(encode_stream({"model": FINGERPRINT, "stream": {}}, tensors))
    del tensors["tp0.stm_ids"]
    assert "missing ['tp0.stm_ids']" in refusal(encode_stream({"model": FINGERPRINT, "stream": {}}, tensors))


def test_sizes_are_checked_before_anything_is_allocated():
    data = synthetic_file()
    assert refusal(data, max_bytes=len(data) - 1) == f"the file is {len(data)} bytes, over the limit of {len(data) - 1} bytes"
    assert refusal(struct.pack("<Q", 2**62) + b"{}") == f"the header declares {2**62} bytes, over the format's {4 * MiB}"
    # A table declaring a 4 TiB tensor over 16 bytes: refused from the table (allocating would fail).
    text = json.dumps({"format": "livevlm-stream", "version": 1, "model": FINGERPRINT})
    head = json.dumps({"ltm_k": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]},
                       "__metadata__": {"livevlm.stream": text, "livevlm.checksum": "sha256:0"}}).encode()
    assert refusal(struct.pack("<Q", len(head)) + head + bytes(16)) == (
        f"truncated: the tensors declare {2**42} bytes and the file holds 16")


def mutations(data: bytes, seed: int, count: int) -> list[bytes]:
    """Seeded mutations of a valid file: byte flips, cuts, inserted and removed runs, and header edits."""
    rng = random.Random(seed)
    size = struct.unpack_from("<Q", data)[0]
    out = []
    for i in range(count):
        mutated = bytearray(data)
        kind = i % 4
        if kind == 0:
            for _ in range(rng.randint(1, 8)):
                mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            mutated = mutated[:rng.randrange(len(mutated))]
        elif kind == 2:
            at = rng.randrange(len(mutated))
            mutated[at:at + rng.randint(0, 64)] = rng.randbytes(rng.randint(0, 64))
        else:  # inside the JSON header: digits, quotes and brackets
            at = rng.randrange(8, 8 + size)
            mutated[at] = ord(rng.choice('0123456789"{}[],:-e '))
        out.append(bytes(mutated))
    return out


def test_seeded_mutations_are_refused_or_mean_the_same_file():
    data = synthetic_file()
    header, tensors = decode_stream(data, len(data))
    survivors = 0
    for mutated in mutations(data, seed=1, count=2000):
        try:
            decoded_header, decoded = decode_stream(mutated, 64 * MiB, FINGERPRINT)
        except StreamFileError:
            continue
        # Only edits of no meaning survive (padding spaces, whitespace in the table): the same file.
        survivors += 1
        assert decoded_header == header and all(torch.equal(decoded[k], t) for k, t in tensors.items())
    assert survivors < 40


# ---- acceptance 1: export after 10 clips, import beside the original and on a second server -------------------
LOSSLESS = {"clip_frames": 2, "long_term_budget_tokens": None, "retrieve_ratio": 1.0, "encode_context": "all",
            "sample_fps": None}
# The server refuses unbounded streams: lossless there is a budget the stream never reaches (asserted equal).
UNCOMPRESSED = {**LOSSLESS, "long_term_budget_tokens": 8192}
DEFAULT = {"clip_frames": 2, "long_term_budget_tokens": 400, "short_term_frames": 1}  # compresses, retrieves 40%
CONFIGS = {"lossless": LOSSLESS, "uncompressed": UNCOMPRESSED, "default": DEFAULT}
QUESTIONS = ["what is happening in the video?", "what colour is the sky?", "describe the last frame"]
TOKENS = 16
MEMORY_STATS = ("version", "frames", "clips", "tokens_seen", "tokens_kept", "sink_tokens", "long_term_tokens",
                "short_term_tokens", "pages", "bytes", "pending_frames", "frames_received", "frames_encoded",
                "frames_sampled_out", "covered_until")


def feed(stream, name: str) -> None:
    """10 clips and one pending frame; the default config samples 2 fps timestamps down to 1 fps."""
    if name == "default":
        stream.append(random_video(7, 42), timestamps=[0.5 * i for i in range(42)])
    else:
        stream.append(random_video(7, 21))


@pytest.fixture(scope="module")
def originals(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """On a first engine, per config: a stream after 10 clips exported to a file (`Stream.export`), imported
    back beside it (`LiveVLM.import_stream`); both asked the questions; then the original fed more frames and
    closed while the copy answers on. The engine is shut down before the server starts."""
    from vllm_livevlm import LiveVLM

    out = tmp_path_factory.mktemp("portable")
    results: dict[str, dict] = {}
    lv = LiveVLM(tiny_model_dir, dtype="float32", max_model_len=16384)
    try:
        for name, config in CONFIGS.items():
            original = lv.open_stream(config)
            feed(original, name)
            path = out / f"{name}.livevlm"
            size = original.export(path)
            copy = lv.import_stream(path)
            result = {"path": path, "size": size, "stats": original.stats(), "copy_stats": copy.stats(),
                      "kept": original.kept_tokens(), "copy_kept": copy.kept_tokens(), "copy_id": copy.id,
                      "id": original.id}
            result["answers"] = [original.ask(q, greedy(TOKENS)) for q in QUESTIONS]
            result["copy_answers"] = [copy.ask(q, greedy(TOKENS)) for q in QUESTIONS]
            copy_before = copy.stats()
            original.append(random_video(8, 4), timestamps=[21.0 + i for i in range(4)] if name == "default" else None)
            result["original_after"] = original.ask(QUESTIONS[0], greedy(TOKENS))
            original.close()
            result["copy_after"] = (copy_before, copy.stats(), copy.ask(QUESTIONS[0], greedy(TOKENS)))
            copy.close()
            results[name] = result
    finally:
        lv.shutdown()
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_an_imported_copy_holds_the_same_memory_and_answers_alike(originals: dict, name: str):
    result = originals[name]
    assert result["copy_id"] != result["id"]
    assert {k: result["copy_stats"][k] for k in MEMORY_STATS} == {k: result["stats"][k] for k in MEMORY_STATS}
    assert result["stats"]["clips"] == 10 and result["stats"]["frames"] == 20 and result["stats"]["pending_frames"] == 1
    assert result["stats"]["frames_sampled_out"] == (21 if name == "default" else 0)
    assert result["copy_kept"] == result["kept"]
    for original, copy in zip(result["answers"], result["copy_answers"]):
        assert copy.token_ids == original.token_ids and len(copy.token_ids) == TOKENS
        assert copy.frames_covered == original.frames_covered == 21  # the pending frame travelled and was encoded


@pytest.mark.slow
def test_the_uncompressed_config_is_lossless(originals: dict):
    assert originals["uncompressed"]["stats"]["long_term_tokens"] == originals["lossless"]["stats"]["long_term_tokens"]
    assert [a.token_ids for a in originals["uncompressed"]["answers"]] == \
        [a.token_ids for a in originals["lossless"]["answers"]]


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_the_original_goes_on_independently(originals: dict, name: str):
    result = originals[name]
    before, after, answer = result["copy_after"]
    assert result["original_after"].frames_covered == 25  # 4 more frames, encoded in the original only
    assert {k: after[k] for k in MEMORY_STATS} == {k: before[k] for k in MEMORY_STATS}
    assert before["frames"] == 21
    assert answer.token_ids == result["copy_answers"][0].token_ids  # the original was closed meanwhile


# ---- on a second server: import over HTTP, export, bad files, fuzz (acceptance 1 and 3) -------------------------
FILE_LIMIT = 8 * MiB


@pytest.fixture(scope="module")
def server(originals: dict, tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory):
    process = Server(tiny_model_dir, tmp_path_factory.mktemp("portable-server") / "server.log", DEFAULT,
                     {"max_stream_file_bytes": FILE_LIMIT}).wait_ready()
    yield process
    process.stop()


def post_file(client, data: bytes, multipart: bool = False):
    if multipart:
        return client.post("/v1/video/streams/import", files={"file": ("s.livevlm", data, "application/octet-stream")})
    return client.post("/v1/video/streams/import", content=data, headers={"Content-Type": "application/octet-stream"})


async def ask(client, stream_id: str, token: str, question: str) -> dict:
    r = await client.post("/v1/chat/completions", headers={"X-Stream-Token": token, "X-Session-ID": stream_id},
                          json={"model": "m", "messages": [{"role": "user", "content": question}],
                                "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def answer_text(tiny_model_dir: str, token_ids: list[int]) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir).decode(token_ids, skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["uncompressed", "default"])
def test_a_second_server_answers_like_the_original(server, originals: dict, tiny_model_dir: str, name: str):
    async def run() -> None:
        async with async_client(server.url, timeout=300) as client:
            r = await post_file(client, originals[name]["path"].read_bytes(), multipart=name == "default")
            assert r.status_code == 200, r.text
            created = r.json()
            assert created["config"] == {**created["config"], **CONFIGS[name]} and created["token"]
            owner = {"X-Stream-Token": created["token"]}
            stats = (await client.get(f"/v1/video/streams/{created['id']}", headers=owner)).json()["stats"]
            assert {k: stats[k] for k in MEMORY_STATS} == {k: originals[name]["stats"][k] for k in MEMORY_STATS}
            for question, original in zip(QUESTIONS, originals[name]["answers"]):
                answer = await ask(client, created["id"], created["token"], question)
                assert answer["choices"][0]["message"]["content"] == answer_text(tiny_model_dir, original.token_ids)
                assert answer["usage"]["completion_tokens"] == TOKENS
                assert answer["livevlm"]["frames_covered"] == 21
            # Exported by this server and imported again (a move): the copy answers as the stream does now.
            assert (await client.get(f"/v1/video/streams/{created['id']}/export")).status_code == 403
            r = await client.get(f"/v1/video/streams/{created['id']}/export", headers=owner)
            assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
            assert int(r.headers["content-length"]) == len(r.content)
            header = fmt.read_header(r.content)
            assert header["stream"]["counters"]["frames_encoded"] == 21 and header["memory"]["version"] == 12
            moved = (await post_file(client, r.content)).json()
            assert moved["token"] != created["token"] and moved["id"] != created["id"]
            again = await ask(client, created["id"], created["token"], QUESTIONS[0])
            moved_answer = await ask(client, moved["id"], moved["token"], QUESTIONS[0])
            assert moved_answer["choices"][0]["message"] == again["choices"][0]["message"]
            for stream in (created, moved):
                r = await client.delete(f"/v1/video/streams/{stream['id']}", headers={"X-Stream-Token": stream["token"]})
                assert r.status_code == 200

    asyncio.run(run())


def reencoded(data: bytes, edit=None, edit_tensors=None) -> bytes:
    """`data` decoded, its header and tensors edited, encoded again: a file with a valid checksum."""
    header, tensors = decode_stream(data, 64 * MiB)
    header = {k: v for k, v in header.items() if k not in ("format", "version")}
    if edit is not None:
        edit(header)
    if edit_tensors is not None:
        edit_tensors(tensors)
    return encode_stream(header, tensors)


def with_two_kv_heads(data: bytes) -> bytes:
    """The same stream as a model with 2 KV heads would hold it (every head duplicated): a foreign shape."""
    def widen(tensors: dict[str, torch.Tensor]) -> None:
        for name, (_, dims) in fmt.MEMORY_TENSORS.items():
            if "H" in dims:
                tensors[fmt.shard_name(0, name)] = torch.cat([tensors[fmt.shard_name(0, name)]] * 2, dims.index("H"))

    return reencoded(data, lambda h: h["model"].update(kv_heads=2), widen)


def future_version(data: bytes, monkeypatch: pytest.MonkeyPatch) -> bytes:
    monkeypatch.setattr(fmt, "FORMAT_VERSION", 3)
    try:
        return reencoded(data)
    finally:
        monkeypatch.undo()


async def engine_load(client) -> dict:
    return (await client.get("/v1/video/engine")).json()


@pytest.mark.slow
def test_bad_files_get_400_naming_the_reason_and_nothing_is_loaded(server, originals: dict,
                                                                  monkeypatch: pytest.MonkeyPatch):
    from safetensors.torch import save

    data = originals["default"]["path"].read_bytes()
    corrupted = bytearray(data)
    corrupted[-5] ^= 1
    cases = {
        "truncated": (data[:len(data) // 2], "truncated: the tensors declare"),
        "corrupted": (bytes(corrupted), "checksum mismatch: the file is corrupted"),
        "foreign weights": (reencoded(data, lambda h: h["model"].update(weights_sha256="f" * 64)),
                            "the file is from another model: its weights_sha256 is 'f"),
        "foreign shape": (with_two_kv_heads(data), "the file is from another model: its kv_heads is 2, this engine's is 1"),
        "future version": (future_version(data, monkeypatch), "format version 3 is newer than this server reads (up to 2)"),
        "plain safetensors": (save({"x": torch.zeros(3)}), "not a LiveVLM stream file"),
        "config over the limits": (reencoded(data, lambda h: h["stream"]["config"].update(long_term_budget_tokens=10**9)),
                                   "bytes of stream memory, over the per-stream limit"),
        "memory over its budget": (reencoded(data, lambda h: h["stream"]["config"].update(long_term_budget_tokens=100)),
                                   "400 long-term tokens, over the config's long_term_budget_tokens=100"),
        "counters": (reencoded(data, lambda h: h["stream"]["counters"].update(frames_received=43)),
                     "the stream's frame counters disagree with its memory and pending frames"),
        "system prompt": (reencoded(data, lambda h: h["stream"].update(system_prompt="a longer system prompt")),
                          "the memory holds 3 sink tokens; this tokenizer makes the system prompt"),
    }

    async def run() -> None:
        async with async_client(server.url, timeout=300) as client:
            for case, (body, reason) in cases.items():
                r = await post_file(client, body)
                assert r.status_code == 400 and reason in r.json()["error"]["message"], (case, r.text)
                assert r.json()["error"]["message"].startswith("invalid stream file: ") or case == "config over the limits"
            r = await post_file(client, bytes(FILE_LIMIT + 1))
            assert r.status_code == 413 and "over max_stream_file_bytes" in r.json()["error"]["message"]
            r = await client.post("/v1/video/streams/import", content=data, headers={"Content-Type": "text/plain"})
            assert r.status_code == 415
            await one_import_at_a_time(client, data)
            load = await engine_load(client)
            assert (load["streams"], load["store_bytes"], load["reserved_bytes"]) == (0, 0, 0)  # nothing half-loaded

    asyncio.run(run())


async def one_import_at_a_time(client, data: bytes) -> None:
    """While one import's body is still arriving, another import answers 429 (`max_imports_in_flight`)."""
    release = asyncio.Event()

    async def slow_body():
        yield data[:4096]
        await release.wait()
        yield data[4096:]

    first = asyncio.create_task(client.post("/v1/video/streams/import", content=slow_body(),
                                            headers={"Content-Type": "application/octet-stream"}))
    for _ in range(200):  # a bad file: 400 while the slot is free, 429 once the slow import holds it
        r = await post_file(client, b"not a stream file")
        if r.status_code == 429:
            break
        assert r.status_code == 400
        await asyncio.sleep(0.05)
    assert r.status_code == 429 and "max_imports_in_flight" in r.json()["error"]["message"], r.text
    release.set()
    r = await first
    assert r.status_code == 200, r.text
    r = await client.delete(f"/v1/video/streams/{r.json()['id']}", headers={"X-Stream-Token": r.json()["token"]})
    assert r.status_code == 200


def header_edits(data: bytes, seed: int, count: int) -> list[bytes]:
    """Seeded edits of a valid file's header values and tensors, re-encoded with a valid checksum: they get
    past the checksum to the checks behind it (state, config, counters, the engine's memory checks)."""
    import copy

    rng = random.Random(seed)
    header, tensors = decode_stream(data, 64 * MiB)
    base = {k: v for k, v in header.items() if k not in ("format", "version")}
    junk = [None, -1, 0, 1, 2**70, 2**62, 1.5, math.nan, math.inf, "x", [], {}, True, [["q", 1]]]

    def leaves(node, path=()):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        found = [path] if path else []
        for key, value in items:
            found += leaves(value, (*path, key))
        return found

    paths = leaves(base)
    out = []
    for i in range(count):
        edited, edited_tensors = copy.deepcopy(base), dict(tensors)
        if i % 3 < 2:
            *parent, key = rng.choice(paths)
            node = edited
            for step in parent:
                node = node[step]
            if i % 3 == 0 and isinstance(node, dict) and rng.random() < 0.2:
                del node[key]
            else:
                old = node[key]
                node[key] = old + rng.choice([-1, 1]) if isinstance(old, int) and not isinstance(old, bool) \
                    and rng.random() < 0.5 else rng.choice(junk)
        else:
            name = rng.choice(sorted(edited_tensors))
            tensor = edited_tensors[name]
            choice = rng.randrange(3)
            if choice == 0:
                del edited_tensors[name]
            elif choice == 1 and tensor.dim():
                shape = list(tensor.shape)
                shape[rng.randrange(len(shape))] += rng.choice([-1, 1]) if min(shape) > 0 else 1
                edited_tensors[name] = torch.zeros(shape, dtype=tensor.dtype)
            else:
                edited_tensors[name] = tensor.to(rng.choice([torch.float32, torch.int64, torch.uint8, torch.float64]))
        out.append(encode_stream(edited, edited_tensors))
    return out


@pytest.mark.slow
def test_fuzzed_files_never_get_a_5xx_and_the_server_keeps_serving(server, originals: dict):
    data = originals["default"]["path"].read_bytes()
    cases = mutations(data, seed=2, count=160) + header_edits(data, seed=3, count=90)

    async def run() -> None:
        async with async_client(server.url, timeout=300) as client:
            kept = (await post_file(client, data)).json()
            before = await ask(client, kept["id"], kept["token"], QUESTIONS[0])
            load = await engine_load(client)
            statuses: dict[int, int] = {}
            for i, body in enumerate(cases):
                r = await post_file(client, body, multipart=i % 5 == 0)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                assert r.status_code < 500, (i, r.text)
                if r.status_code == 200:  # an edit of no consequence: a working stream, deleted again
                    r = await client.delete(f"/v1/video/streams/{r.json()['id']}",
                                            headers={"X-Stream-Token": r.json()["token"]})
                    assert r.status_code == 200
            assert statuses[400] >= 200 and set(statuses) <= {200, 400}, statuses
            after = await ask(client, kept["id"], kept["token"], QUESTIONS[0])
            assert after["choices"][0]["message"] == before["choices"][0]["message"]
            now = await engine_load(client)  # nothing half-loaded stays behind
            assert (now["streams"], now["store_bytes"], now["reserved_bytes"]) == \
                (load["streams"], load["store_bytes"], load["reserved_bytes"])
            assert (await client.get("/health")).status_code == 200
            await client.delete(f"/v1/video/streams/{kept['id']}", headers={"X-Stream-Token": kept["token"]})

    asyncio.run(run())


def test_wire_bytes_of_a_tensor_with_a_zero_stride_size_1_dim():
    """Such a tensor counts as contiguous yet refuses a byte view (a stream's export failed on one)."""
    from vllm_livevlm.portable.wire import from_wire, to_wire

    tensor = torch.arange(2, dtype=torch.long).as_strided((2, 1), (1, 0))
    assert tensor.is_contiguous() and tensor.stride() == (1, 0)
    assert from_wire(to_wire(tensor)).tolist() == [[0], [1]]
