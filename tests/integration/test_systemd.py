"""systemd integration against the real daemon: socket activation ($LISTEN_FDS, $LISTEN_PID,
$LISTEN_FDNAMES; sockets matched to listeners by name, else by address; with several workers,
dups of the one socket) and the notify protocol seen by a fake $NOTIFY_SOCKET (READY,
RELOADING with MONOTONIC_USEC, STOPPING, WATCHDOG)."""

import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
import time

from backends import EchoBackend
from harness import (
    Sluice,
    check,
    raw_connect,
    scaled,
    sluice_bin,
    tls_roundtrip,
    wait_until,
)
from test_signals import listening_tcp, socket_inodes


# ---------------------------------------------------------------------------------------------
# Socket activation.


EXEC_ACTIVATED = """
import os, sys
for i, fd in enumerate(int(x) for x in sys.argv[1].split(",")):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


class ActivatedSluice(Sluice):
    """A daemon started the way systemd starts an activated service: `sockets` become
    descriptors 3, 4, ... with LISTEN_FDS, LISTEN_FDNAMES (when `names` is given) and LISTEN_PID
    set to the daemon's own pid (a small Python exec wrapper sets it to its own pid, moves the
    sockets to 3, 4, ... and execs sluice, which keeps the pid)."""

    def __init__(self, t, config_text, name, sockets, names=None, env=None):
        super().__init__(t, config_text, name, env)
        self.sockets = sockets
        self.names = names

    def start(self, timeout=None):
        timeout = timeout or scaled(15, 40)
        rfd, wfd = os.pipe()
        # Everything passed sits above the descriptors LISTEN_FDS names, so the shell's
        # redirections cannot clobber one another.
        high_w = fcntl.fcntl(wfd, fcntl.F_DUPFD, 50)
        os.close(wfd)
        highs = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD, 60 + i) for i, s in enumerate(self.sockets)]
        env = dict(os.environ, **(self.env or {}))
        env["LISTEN_FDS"] = str(len(self.sockets))
        env.pop("LISTEN_PID", None)
        env.pop("LISTEN_FDNAMES", None)
        if self.names is not None:
            env["LISTEN_FDNAMES"] = ":".join(self.names)
        self._stderr = open(self.stderr_path, "wb")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", EXEC_ACTIVATED, ",".join(map(str, highs)), sluice_bin(),
                 "--config", str(self.config_path), "--ready-fd", str(high_w)],
                stdin=subprocess.DEVNULL,
                stdout=self._stderr,
                stderr=self._stderr,
                pass_fds=[high_w] + highs,
                cwd=self.t.tmp,
                env=env,
            )
        finally:
            os.close(high_w)
            for h in highs:
                os.close(h)
        try:
            self._read_ready(rfd, timeout)
        finally:
            os.close(rfd)
        return self


def listening_socket(host="127.0.0.1"):
    """A bound, listening TCP socket as systemd would make it (no SO_REUSEPORT: a second bind
    to its address fails)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((host, 0))
    s.listen(128)
    return s


def activated(t, listeners, sockets, names=None, global_=None):
    t._n += 1
    d = ActivatedSluice(t, t.config(listeners, global_), f"sluice{t._n}", sockets, names)
    t.daemons.append(d)
    d.start()
    return d


def listening_inodes(pid):
    """Inodes of the TCP sockets in LISTEN state that process `pid` holds."""
    return {int(inode) for inode in socket_inodes(pid) & listening_tcp().keys()}


def refused(addr):
    try:
        raw_connect(addr, timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_activated_socket_is_served_by_name_and_nothing_else_is_bound(t):
    echo = t.backend(EchoBackend())
    sock = listening_socket()
    t.defer(sock.close)
    address = sock.getsockname()
    # The configured address is a port nobody listens on: a named listener must not bind it.
    spare = listening_socket()
    configured = spare.getsockname()
    spare.close()
    d = activated(t, [t.listener(echo, listen=f"127.0.0.1:{configured[1]}")], [sock],
                  names=["web"], global_={"workers": 2})
    check(d.listeners == {"web": [address]},
          f"announced {d.listeners}, expected the activated socket {address}")
    for _ in range(6):
        tls_roundtrip(address)
    check(refused(configured), f"sluice bound the configured address {configured} as well")
    inode = os.fstat(sock.fileno()).st_ino
    check(listening_inodes(d.pid) == {inode},
          f"the daemon listens on {listening_inodes(d.pid)}, expected only the activated {inode}")
    # Two workers: the activated descriptor plus one dup per worker, all one socket.
    held = [fd for fd, target in d.fds().items() if target == f"socket:[{inode}]"]
    check(len(held) == 3, f"the daemon holds the activated socket as fds {held}, expected 3")
    # A reload keeps it: no socket added or removed, and it still serves.
    d.signal(signal.SIGHUP)
    m = d.wait_log(r"reload-done .*sockets_added=(\d+) sockets_removed=(\d+)", 10)
    check(m.group(1) == "0" and m.group(2) == "0", f"a reload replaced the socket: {m.group(0)}")
    tls_roundtrip(address)
    check(listening_inodes(d.pid) == {inode}, "after the reload the daemon listens elsewhere")
    d.stop(expect=0)
    # systemd's copy (ours here) is still a listening socket: sluice did not shut it down.
    c = raw_connect(address, timeout=5)
    c.close()
    peer, _ = sock.accept()
    peer.close()


def test_unnamed_activated_socket_matches_the_listen_address(t):
    echo = t.backend(EchoBackend())
    sock = listening_socket()
    stray = listening_socket()
    t.defer(sock.close)
    t.defer(stray.close)
    address = sock.getsockname()
    web = t.listener(echo, name="web", listen=f"127.0.0.1:{address[1]}")
    other = t.listener(echo, name="other")  # no activated socket: sluice binds it
    d = activated(t, [web, other], [sock, stray])  # no LISTEN_FDNAMES
    check(d.addr("web") == address, f"web announced {d.addr('web')}, expected {address}")
    check(d.addr("other") != address and d.addr("other")[1] != 0, "other was not bound")
    tls_roundtrip(address)
    tls_roundtrip(d.addr("other"))
    d.wait_log(r"socket-activated-unused fd=4 .*address=127\.0\.0\.1:%d" % stray.getsockname()[1])
    check(os.fstat(sock.fileno()).st_ino in listening_inodes(d.pid), "the socket is not used")


def test_listen_pid_of_another_process_is_ignored(t):
    echo = t.backend(EchoBackend())
    # LISTEN_PID names the test, not the daemon: sluice binds its own sockets.
    d = t.sluice(t.listener(echo), env={"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid()),
                                        "LISTEN_FDNAMES": "web"})
    tls_roundtrip(d.addr())
    d.wait_log(r"socket-activation-ignored")


# ---------------------------------------------------------------------------------------------
# The notify protocol.


class NotifySocket:
    """A fake systemd: an AF_UNIX datagram socket in the test's folder that collects messages,
    each a dict of its KEY=VALUE lines with the sender's pid (SO_PASSCRED) under "_pid"."""

    def __init__(self, t):
        self.path = str(t.tmp / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.path)
        self.messages = []
        t.defer(self.sock.close)

    def poll(self):
        self.sock.setblocking(False)
        credentials = struct.calcsize("3i")
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(credentials))
            except BlockingIOError:
                return
            message = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    message["_pid"] = struct.unpack("3i", payload[:credentials])[0]
            self.messages.append(message)

    def wait(self, key, after=0, timeout=10):
        """The first message from index `after` on that has `key`; returns (index, message)."""
        def found():
            self.poll()
            for i in range(after, len(self.messages)):
                if key in self.messages[i]:
                    return (i, self.messages[i])
            return None
        return wait_until(found, timeout, f"a {key} notification")


def test_notify_ready_reloading_stopping_and_watchdog(t):
    echo = t.backend(EchoBackend())
    notify = NotifySocket(t)
    d = t.sluice(t.listener(echo), env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000"})
    i, ready = notify.wait("READY")
    check(ready["READY"] == "1", f"READY={ready['READY']}")
    # WATCHDOG_USEC=200000: pings every 100 ms, from the loop.
    start = time.monotonic()
    wait_until(lambda: (notify.poll(), sum("WATCHDOG" in m for m in notify.messages))[1] >= 4,
               5, "four watchdog pings")
    check(time.monotonic() - start < 2.0, "watchdog pings are far slower than every 100 ms")
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    d.signal(signal.SIGHUP)
    j, reloading = notify.wait("RELOADING", after=i + 1)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    check(reloading["RELOADING"] == "1", f"RELOADING={reloading['RELOADING']}")
    usec = int(reloading.get("MONOTONIC_USEC", "0"))
    check(before <= usec <= after, f"MONOTONIC_USEC={usec} is not between {before} and {after}")
    k, ready2 = notify.wait("READY", after=j + 1)
    d.wait_log("reload-done", 10)
    # A failed reload also ends with READY=1 and says so in STATUS.
    d.config_path.write_text(d.config_path.read_text().replace("server-ecdsa.crt", "missing.crt"))
    d.signal(signal.SIGHUP)
    j2, _ = notify.wait("RELOADING", after=k + 1)
    k2, ready3 = notify.wait("READY", after=j2 + 1)
    check("failed" in ready3.get("STATUS", ""), f"a failed reload reported {ready3}")
    tls_roundtrip(d.addr())
    d.signal(signal.SIGTERM)
    notify.wait("STOPPING", after=k2 + 1)
    check(d.wait_exit(15) == 0, "the drain did not exit 0")


def test_watchdog_pid_of_another_process_sends_no_pings(t):
    echo = t.backend(EchoBackend())
    notify = NotifySocket(t)
    d = t.sluice(t.listener(echo), env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000",
                                        "WATCHDOG_PID": str(os.getpid())})
    notify.wait("READY")
    tls_roundtrip(d.addr())
    time.sleep(0.5)  # only to show what did not happen: five ping periods without a ping
    notify.poll()
    check(not any("WATCHDOG" in m for m in notify.messages),
          f"pings for a watchdog meant for another process: {notify.messages}")
