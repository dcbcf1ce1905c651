"""``streamrec bench broker`` against a real embedded broker: every record sent is read back."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.broker import main as broker_main
from core.errors import ConfigError

pytestmark = pytest.mark.integration


def test_one_record_per_batch_is_measured_and_read_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert broker_main(["--records", "600", "--every", "200", "--partitions", "3",
                        "--work-dir", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    segments = result["segments"]
    assert [segment["sent"] for segment in segments] == [200, 400, 600]
    # The consumer joined before the first send and reads along: never ahead of what was
    # sent, and in the end every record came back.
    assert all(0 <= segment["consumed"] <= segment["sent"] for segment in segments)
    assert segments[-1]["consumed"] > 0
    assert result["consumed"] == 600
    assert all(segment["ms_per_send"] > 0 for segment in segments)
    # The embedded broker's CPU is read from /proc: it did work for every segment.
    for segment in segments:
        assert segment["broker_cpu_share"] is not None and segment["broker_cpu_share"] >= 0
        assert segment["broker_cpu_ms_per_record"] == pytest.approx(
            segment["broker_cpu_share"] * segment["ms_per_send"], abs=1e-3)
    assert result["partitions"] == 3 and result["consumer"] is True and result["embedded_broker"] is True
    assert (tmp_path / "broker.log").exists()


def test_impossible_sizes_are_refused() -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        broker_main(["--records", "0"])
