"""Settings: defaults, the STREAMREC_ environment, and ConfigError naming the variable."""
from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest
from pydantic import ValidationError

from core.errors import ConfigError
from core.settings import TOPIC_KEYS, Settings, load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No STREAMREC_ variable and no .env file from the machine running the tests."""
    for name in list(os.environ):
        if name.startswith("STREAMREC_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def config_error(monkeypatch: pytest.MonkeyPatch, **variables: str) -> str:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    return str(caught.value)


def test_defaults_load() -> None:
    settings = load_settings()
    assert isinstance(settings, Settings)
    assert settings.bootstrap_list == ["127.0.0.1:9092"]
    assert settings.partitions == 4
    assert settings.store_backend == "edge"
    assert settings.heartbeat_interval_s < settings.session_timeout_s
    assert settings.default_k <= settings.max_k
    assert settings.models_path == Path(".streamrec") / "models"
    assert settings.store_path == Path(".streamrec") / "store"
    assert settings.kafka_client_options() == {"security_protocol": "PLAINTEXT"}


def test_environment_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_PARTITIONS", "12")
    monkeypatch.setenv("STREAMREC_BOOTSTRAP_SERVERS", "kafka-a:9092, kafka-b:9093")
    monkeypatch.setenv("STREAMREC_IMAGE_ALLOW_HTTP", "true")
    monkeypatch.setenv("STREAMREC_DATA_DIR", "/var/lib/streamrec")
    monkeypatch.setenv("PARTITIONS", "99")  # without the prefix: ignored
    settings = load_settings()
    assert settings.partitions == 12
    assert settings.bootstrap_list == ["kafka-a:9092", "kafka-b:9093"]
    assert settings.image_allow_http is True
    assert settings.models_path == Path("/var/lib/streamrec/models")


def test_overrides_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_PARTITIONS", "12")
    assert load_settings(partitions=3).partitions == 3


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("STREAMREC_APP_ID=from-dotenv\n")
    assert load_settings().app_id == "from-dotenv"


def test_model_dir_overrides_the_default() -> None:
    assert load_settings(model_dir=Path("/models")).models_path == Path("/models")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("STREAMREC_PARTITIONS", "0"),
        ("STREAMREC_PARTITIONS", "many"),
        ("STREAMREC_BOOTSTRAP_SERVERS", "nohostport"),
        ("STREAMREC_BOOTSTRAP_SERVERS", "kafka:99999"),
        ("STREAMREC_BOOTSTRAP_SERVERS", " , "),
        ("STREAMREC_STORE_BACKEND", "sqlite"),
        ("STREAMREC_TOPIC_PREFIX", "bad prefix!"),
        ("STREAMREC_SECURITY_PROTOCOL", "TLS"),
        ("STREAMREC_DIVERSITY", "1.5"),
        ("STREAMREC_HTTP_PORT", "70000"),
        ("STREAMREC_IMAGE_ALLOW_HTTP", "perhaps"),
    ],
)
def test_a_bad_value_names_its_variable(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    message = config_error(monkeypatch, **{variable: value})
    assert variable in message
    assert repr(value) in message  # the offending value is shown so it can be found


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"STREAMREC_STORE_BACKEND": "qdrant"}, "STREAMREC_QDRANT_URL"),
        (
            {"STREAMREC_HEARTBEAT_INTERVAL_S": "6", "STREAMREC_SESSION_TIMEOUT_S": "6"},
            "STREAMREC_HEARTBEAT_INTERVAL_S",
        ),
        ({"STREAMREC_HEARTBEAT_INTERVAL_S": "30"}, "STREAMREC_SESSION_TIMEOUT_S"),
        ({"STREAMREC_SASL_MECHANISM": "PLAIN"}, "STREAMREC_SASL_USERNAME"),
        ({"STREAMREC_SASL_MECHANISM": "PLAIN", "STREAMREC_SASL_USERNAME": "svc"}, "STREAMREC_SASL_PASSWORD"),
        ({"STREAMREC_DEFAULT_K": "50", "STREAMREC_MAX_K": "20"}, "STREAMREC_MAX_K"),
    ],
)
def test_a_bad_combination_names_the_variables(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], named: str
) -> None:
    assert named in config_error(monkeypatch, **variables)


def test_qdrant_backend_with_a_url_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_STORE_BACKEND", "qdrant")
    monkeypatch.setenv("STREAMREC_QDRANT_URL", "http://qdrant:6333")
    assert load_settings().qdrant_url == "http://qdrant:6333"


def test_every_bad_value_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    message = config_error(monkeypatch, STREAMREC_PARTITIONS="0", STREAMREC_BATCH_SIZE="0")
    assert "STREAMREC_PARTITIONS" in message and "STREAMREC_BATCH_SIZE" in message


def test_a_config_error_never_shows_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    message = config_error(
        monkeypatch,
        STREAMREC_SASL_MECHANISM="PLAIN",
        STREAMREC_SASL_USERNAME="svc",
        STREAMREC_SASL_PASSWORD="hunter2-secret",
        STREAMREC_QDRANT_API_KEY="qdrant-secret-key",
        STREAMREC_HEARTBEAT_INTERVAL_S="30",  # the error: heartbeat above the session timeout
    )
    assert "STREAMREC_HEARTBEAT_INTERVAL_S" in message
    assert "hunter2-secret" not in message
    assert "qdrant-secret-key" not in message


def test_topic_names_carry_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = load_settings()
    assert plain.topic("clicks") == "events.clicks"
    assert plain.topic("catalog") == "catalog.items"
    monkeypatch.setenv("STREAMREC_TOPIC_PREFIX", "test-1.")
    prefixed = load_settings()
    names = [prefixed.topic(key) for key in TOPIC_KEYS]
    assert all(name.startswith("test-1.") for name in names)
    assert len(set(names)) == len(TOPIC_KEYS)
    assert prefixed.topic("deadletter") == "test-1.events.deadletter"


def test_kafka_client_options_carry_sasl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("STREAMREC_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("STREAMREC_SASL_USERNAME", "svc")
    monkeypatch.setenv("STREAMREC_SASL_PASSWORD", "s3cret")
    options = load_settings().kafka_client_options()
    assert options == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "svc",
        "sasl_plain_password": "s3cret",
    }


def test_kafka_client_options_build_a_tls_context(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("STREAMREC_SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("STREAMREC_SASL_USERNAME", "svc")
    monkeypatch.setenv("STREAMREC_SASL_PASSWORD", "s3cret")
    options = load_settings().kafka_client_options()
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "PLAIN"
    assert isinstance(options["ssl_context"], ssl.SSLContext)


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValidationError):
        settings.partitions = 9  # type: ignore[misc]


def test_the_faust_app_keeps_its_folder_under_the_data_dir(tmp_path: Path) -> None:
    """Faust's default is "<app id>-data" in the working directory: a worker started
    in a checkout left one such folder per test run behind."""
    from stream.app import faust_options

    options = faust_options(Settings(data_dir=tmp_path / "state"))
    assert Path(str(options["datadir"])) == tmp_path / "state" / "faust"
