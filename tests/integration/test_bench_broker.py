"""``streamrec bench broker`` against a real embedded broker: every record sent is read back."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.broker import main as broker_main
from bench.common import process_cpu_seconds
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
    # The embedded broker's CPU is read from /proc: serving 600 sends and reads took some.
    assert all(segment["broker_cpu_share"] is not None for segment in segments)
    assert sum(segment["broker_cpu_ms_per_record"] for segment in segments) > 0
    assert result["partitions"] == 3 and result["consumer"] is True and result["embedded_broker"] is True
    assert (tmp_path / "broker.log").exists()


def test_impossible_sizes_are_refused() -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        broker_main(["--records", "0"])


def test_the_cpu_reader_sees_a_busy_process_and_an_idle_one() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.process_time() + 0.5\n"
                             "while time.process_time() < end: pass\ninput()"], stdin=subprocess.PIPE)
    idle = subprocess.Popen([sys.executable, "-c", "input()"], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while process_cpu_seconds(busy.pid) < 0.5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_cpu_seconds(busy.pid) >= 0.5
        assert process_cpu_seconds(idle.pid) < 0.5
    finally:
        for child in (busy, idle):
            child.kill()
            child.wait()
