"""EngineConfig, ServingConfig and deployment profiles: one default per knob, and an unknown key or a
wrong type is an error that names the key (and the file it came from)."""

import dataclasses

import pytest

from baton import LLM, ConfigError, EngineConfig
from baton.backends import paths
from baton.backends.serving.config import NodeConfig, Profile, ServingConfig


def test_engine_config_checks_types_and_ranges():
    with pytest.raises(ConfigError, match="block_size: expected int, got '16'"):
        EngineConfig(block_size="16")
    with pytest.raises(ConfigError, match="enable_prefix_caching: expected bool, got 1"):
        EngineConfig(enable_prefix_caching=1)
    with pytest.raises(ConfigError, match="max_num_seqs: must be >= 1"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ConfigError, match="share_cores_policy: expected 'fair' or 'prefill_first'"):
        ServingConfig(share_cores_policy="greedy")
    assert ServingConfig(share_cores="auto").share_cores == "auto" and ServingConfig(share_cores=2).share_cores == 2
    with pytest.raises(ConfigError, match="share_cores"):
        ServingConfig(share_cores="all")


def test_llm_refuses_unknown_engine_args(qwen3_dir):
    with pytest.raises(ConfigError, match="unknown key 'kv_cache_memory' in LLM()"):
        LLM(qwen3_dir, kv_cache_memory=1 << 20)
    with pytest.raises(ConfigError, match="max_model_len: expected int"):
        LLM(qwen3_dir, max_model_len="256")


def test_shipped_profiles_load_and_extends_merges():
    names = sorted(p.stem for p in paths.profiles().glob("*.toml"))
    assert {"single_node", "single_node_direct"} <= set(names)
    for name in names:
        eng, srv = Profile.load(name).configs("/some/model")
        assert eng.model == "/some/model" and isinstance(srv, ServingConfig)
    direct = Profile.load("single_node_direct")
    assert "llm_front" not in direct.models and "llm_front" not in direct.instances
    assert direct.engine == Profile.load("single_node").engine


def _profile(tmp_path, text):
    f = tmp_path / "p.toml"
    f.write_text('models = ["preprocess", "prefill", "decode", "llm"]\n' + text)
    return str(f)


@pytest.mark.parametrize("text, message", [
    ("[engine]\nmax_model_length = 10\n", "unknown key 'max_model_length'"),
    ("[engine]\nmax_model_len = \"2048\"\n", "max_model_len: expected int, got '2048'"),
    ("[serving]\nshare_cores_policy = \"greedy\"\n", "share_cores_policy: expected"),
    ("[serving]\nthreads = 2\n", "unknown key 'threads'"),                # an [engine] key in [serving]
    ("[instances]\ndecode = \"2\"\n", "instances.decode: expected an integer"),
    ("[instances]\npostprocess = 1\n", "instances.postprocess: not a model"),
    ("engines = 1\n", "unknown key 'engines'"),
    ("engine = 3\n", "engine: expected a table"),
])
def test_profile_errors_name_the_key_and_the_file(tmp_path, text, message):
    path = _profile(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        Profile.load(path)
    assert message in str(e.value) and path in str(e.value), str(e.value)


def test_overrides_go_to_their_table_and_unknown_ones_are_refused(tmp_path):
    prof = Profile.load(_profile(tmp_path, "[engine]\nmax_model_len = 512\n"))
    eng, srv = prof.configs("/m", {"max_model_len": 128, "stream_responses_per_step": 0})
    assert (eng.max_model_len, srv.stream_responses_per_step) == (128, 0)
    with pytest.raises(ConfigError, match="unknown key 'max_model_length'"):
        prof.configs("/m", {"max_model_length": 1})


def test_node_config_round_trips(tmp_path):
    node = NodeConfig(EngineConfig(model="/m", dtype="bfloat16", max_model_len=512), ServingConfig(share_cores=2),
                      "pool", "ipc:///x", "w", str(tmp_path))
    node.save(tmp_path / "node.json")
    assert NodeConfig.load(tmp_path / "node.json") == node
    assert node.max_tokens_limit == 512
    assert dataclasses.replace(node, serving=ServingConfig(max_tokens_limit=7)).max_tokens_limit == 7


def test_cpu_lists_parse_and_a_bad_one_names_its_key():
    from baton.backends.engine.config import ConfigError
    from baton.backends.serving.config import ServingConfig, cpus_list

    assert cpus_list("0,2-3") == [0, 2, 3] and cpus_list("") == []
    for key in ("encode_cpus", "front_cpus", "prefill_cpus", "decode_cpus"):
        with pytest.raises(ConfigError, match=key):
            ServingConfig(**{key: "one"}, share_cores=0)
    for key in ("prefill_cpus", "decode_cpus"):     # apart, they share no cores: share_cores must be off
        with pytest.raises(ConfigError, match=f"{key}: .*share_cores = 0"):
            ServingConfig(**{key: "1"})
        assert getattr(ServingConfig(**{key: "1"}, share_cores=0), key) == "1"
    assert ServingConfig(prefill_cpus="0", decode_cpus="0", share_cores=1).decode_cpus == "0"   # sharing them
    with pytest.raises(ConfigError, match="decode_wait_ms"):
        ServingConfig(decode_wait_ms=-1)
    with pytest.raises(ConfigError, match="draft_threads"):
        ServingConfig(draft_threads=-1)
    for nice in (-1, 20):                           # an OS priority a stage may lower itself to
        with pytest.raises(ConfigError, match="prefill_nice: expected 0 to 19"):
            ServingConfig(prefill_nice=nice, share_cores=0)
    with pytest.raises(ConfigError, match="prefill_nice: needs share_cores = 0"):
        ServingConfig(prefill_nice=10)                # share_cores "auto": decode would wait on it
    assert ServingConfig(prefill_nice=19, share_cores=0).prefill_nice == 19


def test_the_draft_stage_is_called_where_draft_channel_says(tmp_path):
    from baton.backends.engine.config import ConfigError
    from baton.backends.serving.config import ServingConfig
    from baton.backends.serving.launcher import draft_address

    with pytest.raises(ConfigError, match="draft_channel"):
        ServingConfig(draft_channel="tcp")
    models = ["preprocess", "prefill", "decode", "draft", "llm_front"]
    assert draft_address(models, ServingConfig(), tmp_path, "127.0.0.1:9") == f"ipc://{tmp_path}/draft.sock"
    assert draft_address(models, ServingConfig(draft_channel="grpc"), tmp_path, "127.0.0.1:9") == "127.0.0.1:9"
    assert draft_address(models[:3], ServingConfig(), tmp_path, "127.0.0.1:9") == ""
