"""Network exposure: whatever kdtui starts listens on the loopback interface only, if at all.

Sockets are read from /proc (Linux): every TCP socket in LISTEN state and every unconnected UDP
socket owned by the process tree kdtui started, sampled while it runs. `kdtui tensorboard` must
listen on 127.0.0.1 only (the port it announces); a training run (queue supervisor + engine)
must not listen at all; a multi-process CPU job (torchrun, gloo) only on loopback (slow variant).
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.rundir import iter_run_dirs
from tests.conftest import ROOT
from tests.reliability.procs import run_cli
from tui.commands.runs import tensorboard_command


def descendants(pid: int) -> set[int]:
    """pid and every process below it (from /proc/*/stat parent ids)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, p in parents.items() if p == parent and child not in tree]
        tree.update(children)
        frontier += children
    return tree


def _address(hex_address: str) -> tuple[str, int]:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip = ipaddress.IPv4Address(raw[::-1])
    else:  # four little-endian 32-bit words
        ip = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
        ip = ip.ipv4_mapped or ip
    return str(ip), int(port, 16)


def listening(pids: set[int]) -> set[tuple[str, int, str]]:
    """(address, port, protocol) of the TCP listeners and unconnected UDP sockets these processes hold."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:  # the process ended meanwhile
            continue
    found = set()
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
            fields = line.split()
            wanted = "0A" if proto.startswith("tcp") else "07"  # TCP LISTEN; UDP unconnected
            if fields[9] in inodes and fields[3] == wanted:
                found.add((*_address(fields[1]), proto))
    return found


def loopback(sockets: set[tuple[str, int, str]]) -> bool:
    return all(ipaddress.ip_address(address).is_loopback for address, _, _ in sockets)


def test_the_socket_reader_sees_exposed_listeners() -> None:
    """Control: a listener on all interfaces (IPv4 and IPv6) is seen and is not loopback."""
    import socket

    with socket.socket() as v4, socket.socket(socket.AF_INET6) as v6, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for sock, host in ((v4, "0.0.0.0"), (v6, "::"), (udp, "0.0.0.0")):
            sock.bind((host, 0))
        v4.listen()
        v6.listen()
        found = listening({os.getpid()})
        ports = {v4.getsockname()[1], v6.getsockname()[1], udp.getsockname()[1]}
        assert ports <= {port for _, port, _ in found} and not loopback(found)


def test_tensorboard_command_binds_loopback(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    command = tensorboard_command([], runs, 0)
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert "--bind_all" not in command and not any("0.0.0.0" in part for part in command)


def test_kdtui_tensorboard_listens_on_loopback_only(tmp_path: Path) -> None:
    """The real `kdtui tensorboard`: every socket of its process tree is a loopback one."""
    runs = tmp_path / "runs"
    runs.mkdir()
    cli = subprocess.Popen([sys.executable, "-m", "tui", "tensorboard", "--runs-dir", str(runs)], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert cli.stdout is not None
        announced = cli.stdout.readline()
        assert announced.startswith("TensorBoard on http://127.0.0.1:"), announced
        port = int(announced.split("127.0.0.1:")[1].split("/")[0])
        deadline, sockets = time.monotonic() + 180, set()
        while not any(p == port for _, p, _ in sockets):
            assert cli.poll() is None and time.monotonic() < deadline, "tensorboard did not start listening"
            time.sleep(0.2)
            sockets = listening(descendants(cli.pid))
        time.sleep(1.0)  # anything it opens right after the web server (a data server) shows up too
        sockets |= listening(descendants(cli.pid))
        assert loopback(sockets), sockets
        print(f"\nkdtui tensorboard sockets: {sorted(sockets)}")
    finally:
        os.killpg(cli.pid, signal.SIGTERM)
        cli.wait(timeout=30)


def sample_run(args: list[str], runs: Path, timeout: float = 300) -> tuple[set[tuple[str, int, str]], int]:
    """Start `kdtui run ... --detach`, sample the sockets of its queue's process tree until it ends."""
    started = run_cli("run", *args, "--runs-dir", str(runs), "--detach")
    assert started.returncode == 0, started.stderr
    queue_pid = int(started.stdout.split("queue: pid ")[1].split()[0])
    sockets: set[tuple[str, int, str]] = set()
    samples, deadline = 0, time.monotonic() + timeout
    while Path(f"/proc/{queue_pid}").exists() and not _zombie(queue_pid):
        tree = descendants(queue_pid)
        sockets |= listening(tree)
        samples += len(tree) > 1  # the engine (or torchrun) was running
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return sockets, samples


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def test_training_run_listens_nowhere(tiny_recipe: Path, runs_dir: Path) -> None:
    sockets, samples = sample_run([str(tiny_recipe), "--set", "train.epochs=1", "--set", "train.evaluate=false"],
                                  runs_dir)
    assert samples > 0 and sockets == set(), sockets
    (run,) = iter_run_dirs(runs_dir)
    assert run.read_info()["status"] == "finished"


@pytest.mark.slow
def test_multiprocess_cpu_job_listens_on_loopback_only(tiny_recipe: Path, runs_dir: Path) -> None:
    """torchrun + gloo on one machine: rendezvous through files, gloo pairs on the loopback interface."""
    sockets, samples = sample_run([str(tiny_recipe), "--set", "train.epochs=1", "--device", "cpu*2"], runs_dir)
    assert samples > 0 and loopback(sockets), sockets
    (run,) = iter_run_dirs(runs_dir)
    info = run.read_info()
    assert info["status"] == "finished" and info["processes"] == 2, json.dumps(info)[:500]
    print(f"\ncpu*2 job sockets: {sorted(sockets)}")
