"""Several nodes on one host, one per CPU (DESIGN §11): ``cpu`` pins a node, and its
``reuse_port`` listeners take the connections whose SYN the kernel handled on that CPU
(SO_INCOMING_CPU).  Real daemons sharing a real port; Postfix's smtp-source, pinned with
taskset, opens the connections (on loopback the SYN is handled on the sender's CPU)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.daemon import Daemon
from tests.helpers import free_port, require_tool, wait_for

DOMAIN = "rp.test"


def two_cpus() -> list[int]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.fail(f"these tests need two CPUs to pin two nodes to, this process has {cpus}")
    return cpus[:2]


def node(tmp_path: Path, name: str, port: int, cpu: int | None, host: str = "127.0.0.1") -> Daemon:
    closed = free_port()
    overrides: dict[str, object] = {
        "delivery": {
            "domains": {DOMAIN: {"mx_override": f"127.0.0.1:{closed}"}},
            "base_retry_delay_secs": 600,
        }
    }
    if cpu is not None:
        overrides["cpu"] = cpu
    d = Daemon(tmp_path / name, overrides, listener={"reuse_port": True})
    d.smtp_port = port
    d.config["smtp_controller"]["listeners"][0]["socket"] = f"{host}:{port}"
    return d


def send_from_cpu(cpu: int, port: int, messages: int) -> None:
    """smtp-source on ``cpu``: a new connection per message, 4 at a time."""
    subprocess.run(
        [require_tool("taskset"), "-c", str(cpu), require_tool("smtp-source"),
         "-s", "4", "-m", str(messages), "-f", "a@x.org", "-t", f"x@{DOMAIN}",
         f"127.0.0.1:{port}"],
        check=True, stdout=subprocess.DEVNULL, timeout=60,
    )  # fmt: skip


def received(d: Daemon) -> int:
    return len(d.logs("Message received"))


def threads_cpus(pid: int) -> set[str]:
    """Cpus_allowed_list of every thread of the process."""
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                out.add(line.split()[1])
    return out


@pytest.mark.parametrize("host", ["127.0.0.1", "[::]"])  # the dual-stack socket too
def test_a_connection_goes_to_the_node_pinned_to_the_cpu_that_handled_it(
    tmp_path: Path, host: str
) -> None:
    cpus = two_cpus()
    port = free_port()
    nodes = [node(tmp_path, f"n{cpu}", port, cpu, host) for cpu in cpus]
    try:
        for d in nodes:
            d.start()
        for d, cpu in zip(nodes, cpus, strict=True):
            assert d.pid is not None
            assert threads_cpus(d.pid) == {str(cpu)}, "every thread runs on the node's CPU"
            assert d.logs("Pinned to one CPU", cpu=cpu)
        expected = [0, 0]
        for i in (1, 0, 1):
            send_from_cpu(cpus[i], port, 30)
            expected[i] += 30
            wait_for(lambda: sum(received(d) for d in nodes) == sum(expected))
            assert [received(d) for d in nodes] == expected
    finally:
        for d in nodes:
            d.stop()


def test_without_cpu_the_nodes_sharing_a_port_are_not_steered(tmp_path: Path) -> None:
    """The same traffic from one CPU without ``cpu``: the kernel's hash spreads it."""
    cpus = two_cpus()
    port = free_port()
    nodes = [node(tmp_path, f"n{i}", port, None) for i in range(2)]
    try:
        for d in nodes:
            d.start()
        assert all(d.pid is not None and len(threads_cpus(d.pid)) == 1 for d in nodes)
        assert not any(d.logs("Pinned to one CPU") for d in nodes)
        send_from_cpu(cpus[1], port, 60)
        wait_for(lambda: sum(received(d) for d in nodes) == 60)
        assert all(received(d) > 0 for d in nodes), [received(d) for d in nodes]
    finally:
        for d in nodes:
            d.stop()


def test_a_node_asked_for_a_cpu_it_cannot_use_does_not_start(tmp_path: Path) -> None:
    d = node(tmp_path, "n", free_port(), 4095)
    try:
        with pytest.raises(RuntimeError, match="exited with 1"):
            d.start()
    finally:
        d.stop()
    assert d.logs("Startup failed: cannot run on CPU", cpu=4095)
