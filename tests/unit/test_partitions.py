"""Which process owns which partition, and the data-dir layout a count of processes needs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka.partitioner import DefaultPartitioner

from core.errors import ConfigError
from core.settings import load_settings
from stream.partitions import Ownership, check_layout, partition_of


def test_a_key_lands_where_the_producer_sends_it() -> None:
    for partitions in (1, 4, 7, 64):
        for n in range(200):
            key = f"user-{n}".encode()
            assert partition_of(key, partitions) == DefaultPartitioner()(key, list(range(partitions)), [])


def test_processes_split_the_partitions_without_overlap() -> None:
    owners = [Ownership(i, 3, Path("/data")) for i in range(3)]
    shares = [owner.owned(8) for owner in owners]
    assert shares == [[0, 3, 6], [1, 4, 7], [2, 5]]
    key = b"alice"
    assert [owner.owns(partition_of(key, 8)) for owner in owners].count(True) == 1
    assert owners[0].owner_of(key, 8) == partition_of(key, 8) % 3
    with pytest.raises(ConfigError, match="process index 3 is not one of 3"):
        Ownership(3, 3)


def test_each_process_has_its_own_data_dir_and_signal_log(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    assert Ownership().settings_for(settings) is settings
    second = Ownership(1, 2, tmp_path).settings_for(settings)
    assert second.store_path == tmp_path / "processes" / "1" / "store"
    assert second.models_path == settings.models_path  # the models are shared
    assert second.replica == 1
    assert Ownership(1, 2, tmp_path).origin(load_settings(data_dir=tmp_path, replica=3)) == 7
    assert Ownership(0, 2, tmp_path).socket_address() != Ownership(0, 2, tmp_path / "other").socket_address()


def test_a_data_dir_serves_the_process_count_it_was_laid_out_for(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "many")
    check_layout(settings, 2)
    check_layout(settings, 2)
    with pytest.raises(ConfigError, match="holds the state of 2 worker process"):
        check_layout(settings, 3)
    with pytest.raises(ConfigError, match="--processes 2"):
        check_layout(settings, 1)
    single = load_settings(data_dir=tmp_path / "single")
    (single.store_path / "users").mkdir(parents=True)
    check_layout(single, 1)
    with pytest.raises(ConfigError, match="single worker's store"):
        check_layout(single, 2)


def test_a_replica_of_a_group_runs_one_process(tmp_path: Path) -> None:
    from stream.worker import run_worker

    with pytest.raises(ConfigError, match="STREAMREC_REPLICA=0 .* takes --processes 1, not 2"):
        run_worker(load_settings(data_dir=tmp_path, replica=0), processes=2)
    with pytest.raises(ConfigError, match="--processes must be at least 1"):
        run_worker(load_settings(data_dir=tmp_path), processes=0)


def test_a_worker_process_gives_numpy_one_blas_thread() -> None:
    # In a fresh interpreter: the limit holds for the process's life, and this one keeps its own.
    script = (
        "import json, numpy\n"
        "from threadpoolctl import threadpool_info\n"
        "from stream.worker import limit_blas_threads\n"
        "before = [p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas']\n"
        "limit_blas_threads(1)\n"
        "numpy.ones((300, 64)) @ numpy.ones((64, 256))\n"
        "after = [p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas']\n"
        "print(json.dumps([before, after]))\n"
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2"}  # as OpenBLAS starts on 2 cores, wherever this runs
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2], env=env)
    before, after = json.loads(out.stdout)
    assert before and all(n == 2 for n in before)
    assert after == [1] * len(before)
