"""A peer's specs: this machine as read, GPUs from a faked list, labels checked against the contract."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from swarmtrain.common.specs import GpuSpec, PeerSpecs
from swarmtrain.peer import specs

H100 = GpuSpec(name="NVIDIA H100 80GB HBM3", memory_bytes=85_045_215_232, compute_capability="9.0")


def two_gpus() -> list[GpuSpec]:
    return [H100, msgspec.structs.replace(H100, name="NVIDIA H100 #2")]


def test_this_machine() -> None:
    found = specs.collect(labels={"region": "eu"}, gpus=list)
    assert found.cpu_cores >= 1
    assert found.memory_bytes > 0
    assert found.gpus == [] and found.device_index is None and found.training_gpu is None
    assert found.torch_version and found.os
    assert found.labels == {"region": "eu"}
    assert msgspec.json.decode(msgspec.json.encode(found), type=PeerSpecs) == found


def test_a_gpu_peer_names_the_gpu_it_trains_on() -> None:
    found = specs.collect(device="cuda:1", gpus=two_gpus)
    assert found.device_index == 1 and found.training_gpu == two_gpus()[1]
    assert specs.collect(device="cuda", gpus=two_gpus).device_index == 0
    assert specs.collect(device="cpu", gpus=two_gpus).training_gpu is None  # has GPUs, trains on the CPU
    with pytest.raises(ValueError, match="2 GPU"):
        specs.collect(device="cuda:2", gpus=two_gpus)


def test_memory_from_meminfo_capped_by_the_cgroup(tmp_path: Path) -> None:
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    proc.mkdir()
    cgroup.mkdir()
    (proc / "meminfo").write_text("MemTotal:       16384000 kB\nMemFree:         1000 kB\n")
    assert specs.memory_bytes(proc, cgroup) == 16384000 * 1024
    (cgroup / "memory.max").write_text("max\n")
    assert specs.memory_bytes(proc, cgroup) == 16384000 * 1024
    (cgroup / "memory.max").write_text(f"{4 << 30}\n")
    assert specs.memory_bytes(proc, cgroup) == 4 << 30


def test_without_meminfo_sysconf_answers(tmp_path: Path) -> None:
    assert specs.memory_bytes(tmp_path / "no-proc", tmp_path / "no-cgroup") > 0


def test_labels_are_parsed_and_checked() -> None:
    assert specs.parse_labels(["region=eu", " tier = gold ", "empty="]) == {
        "region": "eu",
        "tier": "gold",
        "empty": "",
    }
    for bad, why in (
        (["region"], "name=value"),
        (["=eu"], "name=value"),
        (["a=1", "a=2"], "twice"),
        (["bad key=1"], "--label"),
        (["k=a value with spaces"], "--label"),
    ):
        with pytest.raises(ValueError, match=why):
            specs.parse_labels(bad)
    with pytest.raises(ValueError, match="--label"):
        specs.parse_labels([f"k{i}=v" for i in range(33)])
