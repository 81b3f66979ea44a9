"""SIGUSR2: the running daemon starts its binary again, hands it every listening socket (each
worker's, and the admin listener's) and drains once the new process is ready; a new process
that fails leaves the old one serving."""

import ctypes
import os
import re
import signal
import time

import harness
from backends import EchoBackend
from harness import Skip, check, free_loopback_port, tls_roundtrip, wait_until
from test_ops import http_get, start_ops
from test_reload import root_only_copies
from test_signals import RoundTrips, isolate_network
from test_systemd import NotifySocket, activated, listening_inodes, listening_socket, refused


def adopt_orphans():
    """Makes this test's process the one that inherits the daemons' children once their parent
    exits (PR_SET_CHILD_SUBREAPER), so it can wait for the new process and read its exit code."""
    libc = ctypes.CDLL(None, use_errno=True)
    check(libc.prctl(36, 1, 0, 0, 0) == 0, "prctl(PR_SET_CHILD_SUBREAPER) failed")


def wait_child_exit(pid, timeout):
    """Waits for `pid` (adopted: see adopt_orphans) to exit; returns its exit code."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            check(os.WIFEXITED(status), f"the new process ended by signal {os.WTERMSIG(status)}")
            return os.WEXITSTATUS(status)
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still running {timeout}s later")


def stop_new_process(pid):
    """Teardown for a new process the test did not stop itself."""
    try:
        os.kill(pid, signal.SIGTERM)
        wait_child_exit(pid, 15)
    except (ProcessLookupError, ChildProcessError):
        pass


def upgrade_goes_through(t, d, addr):
    """SIGUSR2 to daemon `d`: the new process gets ready, the old one drains to exit 0, the new
    one serves `addr` and, sent SIGTERM, drains to exit 0 too."""
    d.signal(signal.SIGUSR2)
    new_pid = int(d.wait_log(r"upgrade-ready pid=(\d+)", timeout=30).group(1))
    t.defer(lambda: stop_new_process(new_pid))
    check(d.wait_exit(20) == 0, "the old process did not drain to exit 0")
    tls_roundtrip(addr, b"served by the new process")
    os.kill(new_pid, signal.SIGTERM)
    check(wait_child_exit(new_pid, 15) == 0, "the new process did not drain to exit 0")


def test_sigusr2_hands_every_socket_over_and_loses_no_connection(t):
    # In a network namespace with net.ipv4.tcp_migrate_req = 0: the kernel moves nothing here,
    # so a connection lost at the switch would show as a failed round trip.
    isolate_network(migrate=0)
    adopt_orphans()
    echo = t.backend(EchoBackend())
    port = free_loopback_port()
    listener = t.listener(echo, listen=f"127.0.0.1:{port}")
    old, admin = start_ops(t, listener, global_={"workers": 2, "drain_timeout": "10s"})
    addr = ("127.0.0.1", port)
    before = listening_inodes(old.pid)
    check(len(before) == 3, f"expected 2 worker sockets and the admin socket, found {before}")
    load = RoundTrips(addr)
    t.defer(load.stop)
    load.wait_for(100)
    # A connection open across the switch stays with the old process until it ends.
    first, second = b"before the upgrade", b"after the upgrade"
    live = t.client(addr).handshake()
    live.sendall(first)
    check(live.recv_exact(len(first)) == first, "no echo before the upgrade")

    old.signal(signal.SIGUSR2)
    new_pid = int(old.wait_log(r"upgrade-ready pid=(\d+)", timeout=30).group(1))
    t.defer(lambda: stop_new_process(new_pid))
    handed = old.wait_log(r"upgrade-sockets count=3 activated=0 from_pid=(\d+)").group(1)
    check(handed == str(old.pid), "the new process did not report the three sockets from the old one")
    after = listening_inodes(new_pid)
    check(after == before, f"the new process listens on {after}, the old one on {before}")

    live.sendall(second)
    check(live.recv_exact(len(first + second)) == first + second,
          "the live connection stopped echoing at the switch")
    live.close_write_tls()
    live.recv_until_closed(timeout=10)
    check(old.wait_exit(20) == 0, "the old process did not drain to exit 0")

    load.wait_for(100)  # all on the new process now
    load.stop()
    check(not load.failures,
          f"{len(load.failures)} of {load.ok + len(load.failures)} round trips failed, the first: "
          f"{load.failures[:3]}")
    status, _, body = http_get(admin, "/ready")
    check(status == 200, f"/ready on the handed-over admin socket answered {status}: {body!r}")
    tls_roundtrip(addr, b"served by the new process")
    print(f"{load.ok} round trips through the upgrade, none failed; sockets kept: {sorted(after)}")
    os.kill(new_pid, signal.SIGTERM)
    check(wait_child_exit(new_pid, 15) == 0, "the new process did not drain to exit 0")


def test_sigusr2_new_process_that_fails_leaves_the_old_one_serving(t):
    adopt_orphans()
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo), global_={"workers": 2})
    addr = d.addr()
    good = d.config_path.read_text()
    # The new process reads the file again: a configuration it refuses ends it with code 2.
    d.config_path.write_text(good + '\n[[listener]]\nname = "broken"\n')
    d.signal(signal.SIGUSR2)
    d.wait_log(r'upgrade-failed reason="the new process exited with code 2 before it was ready"',
               timeout=30)
    check(d.alive(), "the old process stopped after a failed upgrade")
    tls_roundtrip(addr, b"still served")
    # Repaired, the next SIGUSR2 goes through.
    d.config_path.write_text(good)
    upgrade_goes_through(t, d, addr)


def test_sigusr2_runs_what_the_path_points_to_and_a_new_process_that_hangs_is_stopped(t):
    # sluice started through a symbolic link, as an installed version often is; the link is
    # then pointed at a program that never reports ready. The upgrade runs that program (the
    # path, not the old binary), gives up after global.upgrade_timeout, sends it SIGTERM and
    # reaps it; the old process serves throughout, and once the link points at sluice again
    # the next SIGUSR2 goes through.
    adopt_orphans()
    real = harness.sluice_bin()
    link = t.tmp / "sluice-current"
    link.symlink_to(real)
    harness.sluice_bin = lambda: str(link)  # this test's process only
    hang = t.tmp / "sluice-that-hangs"
    hang.write_text("#!/bin/sh\nexec sleep 60\n")
    hang.chmod(0o755)
    echo = t.backend(EchoBackend())
    d = t.sluice(t.listener(echo), global_={"upgrade_timeout": "1s"})
    addr = d.addr()
    link.unlink()
    link.symlink_to(hang)
    d.signal(signal.SIGUSR2)
    started = d.wait_log(r"upgrade-start program=(\S+) sockets=1").group(1)
    check(started == str(link), f"the upgrade started {started}, not the path {link}")
    d.wait_log(r'upgrade-failed reason="the new process was not ready in time; sent it SIGTERM"',
               timeout=10)
    pid = int(d.wait_log(r'upgrade-process-exited pid=(\d+) reason="it was killed by signal',
                         timeout=10).group(1))
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 5,
               f"the stopped process {pid} to be reaped (not left a zombie)")
    check(d.alive(), "the old process stopped after a failed upgrade")
    tls_roundtrip(addr, b"still served")
    link.unlink()
    link.symlink_to(real)
    upgrade_goes_through(t, d, addr)


def thread_capabilities(pid):
    """{thread name: (uids, effective capabilities)} of each thread of process `pid`."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        status = open(f"/proc/{pid}/task/{tid}/status").read()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        name = "main" if tid == str(pid) else f"{fields['Name'].strip()} {tid}"
        out[name] = (set(fields["Uid"].split()), int(fields["CapEff"].strip(), 16))
    return out


def test_sigusr2_after_dropping_root_passes_on_the_two_capabilities(t):
    # The old process runs as nobody with CAP_NET_BIND_SERVICE and CAP_DAC_READ_SEARCH on its
    # main thread: it passes those two on (ambient), so the new process, started as nobody,
    # reads keys only root may read, and narrows itself to the same two.
    if os.geteuid() != 0:
        raise Skip("needs root to drop privileges")
    adopt_orphans()
    echo = t.backend(EchoBackend())
    keys = root_only_copies(t, ("server-ecdsa",))
    cert = {"cert": str(keys / "server-ecdsa.crt"), "key": str(keys / "server-ecdsa.key")}
    d = t.sluice(t.listener(echo, cert=cert), global_={"user": "nobody", "workers": 2})
    addr = d.addr()
    d.signal(signal.SIGUSR2)
    new_pid = int(d.wait_log(r"upgrade-ready pid=(\d+)", timeout=30).group(1))
    t.defer(lambda: stop_new_process(new_pid))
    check(d.wait_exit(20) == 0, "the old process did not drain to exit 0")
    d.wait_log(r"privileges-dropped user=nobody .* already=yes "
               r"kept=cap_net_bind_service,cap_dac_read_search")
    expected = (1 << 10) | (1 << 2)  # CAP_NET_BIND_SERVICE, CAP_DAC_READ_SEARCH
    threads = thread_capabilities(new_pid)
    for name, (uids, effective) in threads.items():
        check(uids == {"65534"}, f"new process thread {name} runs with uids {uids}")
        if name == "main":
            check(effective == expected, f"the new main thread has capabilities {effective:#x}")
        elif name.startswith("sluice-w"):
            check(effective == 0, f"new worker thread {name} keeps capabilities {effective:#x}")
    check(sum(name.startswith("sluice-w") for name in threads) == 2,
          f"expected 2 worker threads in the new process: {sorted(threads)}")
    ambient = next(line for line in open(f"/proc/{new_pid}/status") if line.startswith("CapAmb:"))
    check(int(ambient.split()[1], 16) == 0, f"the new process keeps ambient capabilities: {ambient}")
    tls_roundtrip(addr, b"served by the new process, as nobody")
    os.kill(new_pid, signal.SIGTERM)
    check(wait_child_exit(new_pid, 15) == 0, "the new process did not drain to exit 0")


def test_sigusr2_under_systemd_hands_the_service_to_the_new_process(t):
    # A fake notify socket that records each sender's pid: the old process, still the main
    # one, names the new process MAINPID once it is ready, and then sends nothing more (no
    # STOPPING=1, no watchdog pings); the new process, started without WATCHDOG_PID, pings.
    adopt_orphans()
    # As systemd starts it: WATCHDOG_PID names the daemon's own pid (a shell that execs it).
    wrapper = t.tmp / "sluice-started-as-systemd-does"
    wrapper.write_text(f'#!/bin/sh\nWATCHDOG_PID=$$ exec {harness.sluice_bin()} "$@"\n')
    wrapper.chmod(0o755)
    harness.sluice_bin = lambda: str(wrapper)  # this test's process only
    echo = t.backend(EchoBackend())
    notify = NotifySocket(t)
    d = t.sluice(t.listener(echo), env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000"})
    i, _ = notify.wait("READY")
    wait_until(lambda: (notify.poll(), any(m.get("WATCHDOG") == "1" and m["_pid"] == d.pid
                                           for m in notify.messages))[1],
               5, "a watchdog ping from the old process")
    d.signal(signal.SIGUSR2)
    j, handover = notify.wait("MAINPID", after=i + 1, timeout=30)
    new_pid = int(handover["MAINPID"])
    t.defer(lambda: stop_new_process(new_pid))
    check(handover["_pid"] == d.pid and handover.get("READY") == "1",
          f"the handover came from pid {handover['_pid']} (the old process is {d.pid}): {handover}")
    check(d.wait_exit(20) == 0, "the old process did not drain to exit 0")
    wait_until(lambda: (notify.poll(), sum(m.get("WATCHDOG") == "1" and m["_pid"] == new_pid
                                           for m in notify.messages[j:]))[1] >= 3,
               5, "three watchdog pings from the new process")
    late = [m for m in notify.messages[j + 1:] if m["_pid"] == d.pid]
    check(not late, f"the old process notified after the handover: {late}")
    before = [m for m in notify.messages[:j] if m["_pid"] == new_pid]
    check(not any("READY" in m for m in before),
          f"the new process said READY itself before it was the main process: {before}")
    tls_roundtrip(d.addr(), b"served by the new process")
    os.kill(new_pid, signal.SIGTERM)
    check(wait_child_exit(new_pid, 15) == 0, "the new process did not drain to exit 0")


def test_sigusr2_with_socket_activation_hands_systemds_sockets_on(t):
    # Socket activation: the listening socket is systemd's. An upgrade hands it on as such
    # (named as systemd named it), the new process matches it to its listener as at a first
    # start and binds nothing, and, keeping it as the old one did, hands it on again at the
    # next upgrade. Round trips run throughout.
    adopt_orphans()
    echo = t.backend(EchoBackend())
    sock = listening_socket()
    t.defer(sock.close)
    addr = sock.getsockname()
    inode = os.fstat(sock.fileno()).st_ino
    spare = listening_socket()
    configured = spare.getsockname()  # a named listener must not bind its configured address
    spare.close()
    d = activated(t, [t.listener(echo, listen=f"127.0.0.1:{configured[1]}")], [sock],
                  names=["web"], global_={"workers": 2, "drain_timeout": "10s"})
    load = RoundTrips(addr)
    t.defer(load.stop)
    load.wait_for(50)

    def ready_pids():
        return [int(pid) for pid in re.findall(r"upgrade-ready pid=(\d+)", d.log())]

    d.signal(signal.SIGUSR2)
    wait_until(lambda: len(ready_pids()) == 1, 30, "the first new process to be ready")
    first = ready_pids()[0]
    t.defer(lambda: stop_new_process(first))
    check(re.search(r'socket-activated fd=\d+ name="web" address=127\.0\.0\.1:%d from_pid=%d'
                    % (addr[1], d.pid), d.log()),
          "the new process did not take systemd's socket from the old one")
    check(d.wait_exit(20) == 0, "the old process did not drain to exit 0")
    check(listening_inodes(first) == {inode},
          f"the new process listens on {listening_inodes(first)}, expected only {inode}")
    check(refused(configured), "the new process bound the configured address")
    load.wait_for(50)

    os.kill(first, signal.SIGUSR2)
    wait_until(lambda: len(ready_pids()) == 2, 30, "the second new process to be ready")
    second = ready_pids()[1]
    t.defer(lambda: stop_new_process(second))
    check(wait_child_exit(first, 20) == 0, "the first new process did not drain to exit 0")
    check(listening_inodes(second) == {inode},
          f"the second new process listens on {listening_inodes(second)}, expected only {inode}")
    load.wait_for(50)
    load.stop()
    check(not load.failures,
          f"{len(load.failures)} of {load.ok + len(load.failures)} round trips failed, the first: "
          f"{load.failures[:3]}")
    tls_roundtrip(addr, b"served by the second new process")
    print(f"{load.ok} round trips through two upgrades, none failed")
    os.kill(second, signal.SIGTERM)
    check(wait_child_exit(second, 15) == 0, "the second new process did not drain to exit 0")
