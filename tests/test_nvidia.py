"""NVIDIA's tensor contract beside Baton's names: what perf_analyzer and TensorRT-LLM / vLLM-backend
clients send (stream, stop_words, bad_words, min_length / min_tokens, exclude_input_in_output,
return_num_*_tokens, sampling_parameters) and read (num_input_tokens, num_output_tokens)."""

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from baton import LLM, SamplingParams
from baton.backends.engine.errors import InvalidRequestError
from baton.backends.stages.preprocess import Preprocessor

PERF_ANALYZER = Path(__file__).resolve().parents[1] / ".cache/tools/perf_analyzer"   # `make tools`
NODE_PROFILE = "single_node_trtllm"        # `llm`, and `llm_trtllm` for TensorRT-LLM's shapes


def _openai_frontend_trtllm_request(prompt, stream, max_tokens, seed, stop):
    """The tensors Triton's OpenAI frontend builds for a TensorRT-LLM model (its
    _create_trtllm_inference_request): every input [1, 1] (stop_words [1, n]), seed UINT64."""
    return {"text_input": np.array([[prompt.encode()]], dtype=object), "stream": np.array([[stream]]),
            "max_tokens": np.array([[max_tokens]], np.int32), "stop_words": np.array([[s.encode() for s in stop]], dtype=object),
            "top_p": np.array([[1.0]], np.float32), "frequency_penalty": np.array([[0.0]], np.float32),
            "presence_penalty": np.array([[0.0]], np.float32), "seed": np.array([[seed]], np.uint64),
            "temperature": np.array([[0.0]], np.float32)}


@pytest.mark.parametrize("stream", [True, False])
def test_the_openai_frontends_tensorrt_llm_request_is_served(node, offline, stream):
    want = offline("def fibonacci(n):", max_tokens=16, ignore_eos=False, stop=["\n\n\n\n\n"])
    got = _grpc(node, _openai_frontend_trtllm_request("def fibonacci(n):", stream, 16, 7, ["\n\n\n\n\n"]), "llm_trtllm")
    assert got and not any(isinstance(g, Exception) for g in got), got
    results = [g for g in got if g.as_numpy("text_output") is not None]
    if not stream:
        assert len(results) == 1                          # one final response holding the whole text
    assert all(r.as_numpy("text_output").shape == (1, 1) for r in results)     # the batch dimension is back
    ids = np.concatenate([r.as_numpy("token_ids").reshape(-1) for r in results]).tolist()
    text = b"".join(r.as_numpy("text_output").reshape(-1)[0] for r in results).decode()
    assert ids == want.token_ids and text == want.text


@pytest.mark.slow
def test_perf_analyzer_streams_llm_with_tensorrt_llm_style_inputs(node, tmp_path):
    assert PERF_ANALYZER.is_file(), "run `make tools` (make test does)"
    data = {"data": [{"text_input": ["def fibonacci(n):"], "max_tokens": [16], "stream": [True],
                      "exclude_input_in_output": [True], "return_num_input_tokens": [True],
                      "return_num_output_tokens": [True], "temperature": [0.0], "min_length": [4],
                      "stop_words": {"content": ["\n\n\n\n"], "shape": [1]},
                      "bad_words": {"content": ["lambda"], "shape": [1]},
                      "sampling_parameters": ['{"top_p": "0.9"}']}]}
    (tmp_path / "input.json").write_text(json.dumps(data))
    r = subprocess.run([str(PERF_ANALYZER), "-m", "llm", "-i", "grpc", "-u", node.grpc_url, "--streaming",
                        "--service-kind", "triton", "--input-data", str(tmp_path / "input.json"),
                        "--measurement-mode", "count_windows", "--measurement-request-count", "8",
                        "--concurrency-range", "2",
                        # what is tested is the request format, not the speed: a noisy 2-core box must
                        # not fail "stable measurement" (it did in CI with the default 10% / 10 trials)
                        "--stability-percentage", "100", "--max-trials", "20"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    inferences = int(re.search(r"Inference count: (\d+)", r.stdout).group(1))
    assert inferences >= 8 and f"Successful request count: {inferences}" in r.stdout
    per_request = float(re.search(r"  Throughput: ([\d.]+)", r.stdout).group(1))
    per_response = float(re.search(r"Response Throughput: ([\d.]+)", r.stdout).group(1))
    assert per_response > 4 * per_request > 0            # it streamed: several responses per request


def _grpc(node, arrays, model="llm"):
    import tritonclient.grpc as grpc

    got = []
    c = grpc.InferenceServerClient(node.grpc_url)
    c.start_stream(callback=lambda result, error: got.append(error or result))
    inputs = []
    for name, a in arrays.items():
        dtype = "BYTES" if a.dtype == object else {"int32": "INT32", "float32": "FP32", "bool": "BOOL",
                                                   "uint64": "UINT64"}[str(a.dtype)]
        t = grpc.InferInput(name, list(a.shape), dtype)
        t.set_data_from_numpy(a)
        inputs.append(t)
    c.async_stream_infer(model, inputs)
    c.stop_stream()
    return got


def _s(*xs):
    return np.array([x.encode() for x in xs], dtype=object)


def test_nvidia_inputs_and_outputs_over_grpc(node, offline):
    got = _grpc(node, {"text_input": _s("class LRUCache:"), "max_tokens": np.array([12], np.int32),
                       "exclude_input_in_output": np.array([True]), "return_num_input_tokens": np.array([True]),
                       "return_num_output_tokens": np.array([True]), "stop_words": _s("\n\n\n\n"),
                       "sampling_parameters": _s('{"temperature": "0", "ignore_eos": "true"}')})
    assert got and not any(isinstance(g, Exception) for g in got), got
    ids = [t for g in got for t in g.as_numpy("token_ids").tolist()]
    assert ids == offline("class LRUCache:", max_tokens=12).token_ids
    assert sum(int(g.as_numpy("num_output_tokens")[0]) for g in got) == len(ids) == 12
    assert {int(g.as_numpy("num_input_tokens")[0]) for g in got} == {int(got[-1].as_numpy("prompt_tokens")[0])}
    for arrays, field in [
        ({"exclude_input_in_output": np.array([False])}, "exclude_input_in_output"),
        ({"sampling_parameters": _s('{"temprature": 0.5}')}, "temprature"),
        ({"sampling_parameters": _s('{"top_p": "high"}')}, "sampling_parameters"),
        ({"sampling_parameters": _s('{"max_tokens": 4}'), "max_tokens": np.array([4], np.int32)}, "given twice"),
        ({"min_length": np.array([2], np.int32), "min_tokens": np.array([2], np.int32)}, "given twice"),
        ({"min_tokens": np.array([20], np.int32), "max_tokens": np.array([4], np.int32)}, "min_tokens"),
    ]:
        err = _grpc(node, {"text_input": _s("hi")} | arrays)
        assert len(err) == 1 and isinstance(err[0], Exception) and field in str(err[0]), (field, err)


@pytest.fixture(scope="module")
def engine(qwen3_dir):
    llm = LLM(qwen3_dir, dtype="float32", num_blocks=64, max_model_len=256)
    yield llm
    llm.close()


def test_min_tokens_holds_back_stop_tokens_and_bad_words_are_never_generated(engine):
    greedy = dict(temperature=0.0, max_tokens=8, ignore_eos=True)
    free = engine.generate("def f(x):", SamplingParams(**greedy))[0].token_ids
    first, second = free[0], free[1]
    # the first token as a stop token ends at once, unless min_tokens holds it back
    assert engine.generate("def f(x):", SamplingParams(**greedy, stop_token_ids=[first]))[0].token_ids == [first]
    held = engine.generate("def f(x):", SamplingParams(**greedy, stop_token_ids=[first], min_tokens=3))[0].token_ids
    assert first not in held[:3] and len(held) >= 3
    # a one-token bad word never appears; a two-token one only loses its last token after its first
    banned = engine.generate("def f(x):", SamplingParams(**greedy, bad_words_token_ids=[[first]]))[0].token_ids
    assert first not in banned
    pair = engine.generate("def f(x):", SamplingParams(**greedy, bad_words_token_ids=[[first, second]]))[0].token_ids
    assert pair[0] == first and pair[1] != second


def test_preprocess_maps_nvidia_inputs(qwen3_dir):
    pre = Preprocessor(str(qwen3_dir), max_model_len=256, max_tokens_limit=200)
    req = pre({"text_input": _s("def f():"), "min_length": np.array([3], np.int32), "stop": _s("a"),
               "stop_words": _s("b", "c"), "bad_words": _s("lambda"),
               "sampling_parameters": _s('{"temperature": "0.5", "top_k": 4, "seed": "7"}')})
    p = req.sampling
    assert p.min_tokens == 3 and p.temperature == 0.5 and p.top_k == 4 and p.seed == 7
    assert p.stop == ["a", "b", "c"]
    assert p.bad_words_token_ids and all(isinstance(w, list) for w in p.bad_words_token_ids)
    with pytest.raises(InvalidRequestError, match="sampling_parameters"):
        pre({"text_input": _s("x"), "sampling_parameters": _s("[1]")})
    with pytest.raises(InvalidRequestError, match="stop: given twice"):
        pre({"text_input": _s("x"), "stop": _s("a"), "sampling_parameters": _s('{"stop": "d"}')})
