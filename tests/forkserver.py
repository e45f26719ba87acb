"""Python processes that start with torch already imported: forked from a server that imported it once.

Importing torch (and torch._dynamo, which the first optimizer built imports) takes 4-5 s of CPU, more
than most test runs spend training. A server process imports them once; each ``python -m MODULE
ARGS`` or ``python SCRIPT ARGS`` asked for is a fork of it that takes the arguments, working
directory, environment and standard streams it was given and runs the module or script as the
interpreter does (``runpy``, as ``__main__``), exits as the interpreter does (``sys.exit``, an
uncaught exception's traceback and status 1, atexit handlers, ``os._exit``, death by a signal) and is
a process of its own: its pid can be signalled, and its exit status is the one its parent, the
server, reads and passes on.

Only an environment that differs from the server's in variables read while running (the launcher's
RANK, WORLD_SIZE, ..., ``LARGEBATCH_*``, torch's cache folders: RUNTIME_VARS) is served; any other
difference (PATH, PYTHONPATH, OMP_NUM_THREADS, CUDA_VISIBLE_DEVICES, ...) could have changed how
torch was imported, so such a process is started by exec as usual. Each server has its own hash
seed, and the random modules are reseeded in each child; the ranks of one launch come from
different servers, so their hash seeds differ as those of separately started workers do.
``LARGEBATCH_TEST_FORKSERVER=0`` turns the servers off (every process is exec'd).

The server runs this file: ``python forkserver.py FD``.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time

PRELOAD = ("torch", "torch._dynamo", "torch.distributed", "numpy", "yaml", "PIL.Image")
"""What the server imports before it forks; none of it reads the variables a request may change."""

RUNTIME_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
RUNTIME_PREFIXES = ("LARGEBATCH_",)
"""Variables that may differ from the server's: read only while a run runs, never at import (torch
sets the two cache folders in the test process's own environment the first time it asks for them)."""

_MAX_MESSAGE = 1 << 20


# ------------------------------------------------------------------------------------------------
# The server (and, after a fork, the child it becomes)


def _send(sock: socket.socket, message: dict) -> None:
    sock.sendall(json.dumps(message).encode())


def _serve(fd: int) -> dict:
    """Answer requests until the client goes away; in a forked child, return its request."""
    import gc

    for name in PRELOAD:
        __import__(name)
    gc.freeze()  # the children's collections leave the imported objects (and their shared pages) alone
    sock = socket.socket(fileno=fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    _send(sock, {"ready": os.getpid()})
    children: set[int] = set()
    while True:
        for key, _ in sel.select():
            if key.fileobj is sock:
                data, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, 3)
                if not data:  # the client is gone; the children run on, as exec'd ones would
                    os._exit(0)
                request = json.loads(data)
                try:
                    pid = os.fork()
                except OSError as exc:
                    for f in fds:
                        os.close(f)
                    _send(sock, {"id": request["id"], "error": str(exc)})
                    continue
                if pid == 0:
                    try:
                        sel.close()
                        sock.close()
                        os.close(wake_r)
                        os.close(wake_w)
                        signal.set_wakeup_fd(-1)
                        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                        for target, f in enumerate(fds):
                            os.dup2(f, target)
                            os.close(f)
                        if request.get("new_session"):
                            os.setsid()
                        os.chdir(request["cwd"])
                        os.environ.clear()
                        os.environ.update(request["env"])
                    except BaseException:
                        os._exit(126)
                    return request
                for f in fds:
                    os.close(f)
                children.add(pid)
                _send(sock, {"id": request["id"], "pid": pid})
            else:
                try:
                    while os.read(wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                for pid in list(children):
                    done, status, usage = os.wait4(pid, os.WNOHANG)
                    if done:
                        children.discard(pid)
                        _send(sock, {"exited": pid, "returncode": os.waitstatus_to_exitcode(status),
                                     "cpu_s": usage.ru_utime + usage.ru_stime})


def _become(request: dict) -> None:
    """Run the request's module or script as ``python -m`` / ``python SCRIPT`` would."""
    import random
    import runpy

    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    target, args = request["target"], request["args"]
    if request["module"]:
        sys.argv = ["-m", *args]
        sys.path[0] = os.getcwd()
        runpy._run_module_as_main(target, alter_argv=True)
    else:
        sys.argv = [target, *args]
        sys.path[0] = os.path.dirname(os.path.abspath(target))
        runpy.run_path(target, run_name="__main__")


# ------------------------------------------------------------------------------------------------
# The client, in the test process


class Process:
    """A forked child, used like ``subprocess.Popen`` with ``text=True`` and piped stdout/stderr."""

    def __init__(self, server: "Server", pid: int, stdout: int, stderr: int):
        self._server, self.pid, self.returncode = server, pid, None
        self._fds = {"stdout": stdout, "stderr": stderr}
        self._chunks: dict[str, list[bytes]] = {name: [] for name in self._fds}
        """What was read so far: a communicate() that timed out keeps it for the next (as Popen does)."""

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._server.returncode(self.pid, 0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            code = self._server.returncode(self.pid, timeout)
            if code is None:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            self.returncode = code
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Read stdout and stderr to their end, then wait for the exit status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        chunks = self._chunks
        with selectors.DefaultSelector() as sel:
            for name, fd in self._fds.items():
                if fd is not None:
                    sel.register(fd, selectors.EVENT_READ, name)
            while sel.get_map():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
                for key, _ in sel.select(left):
                    data = os.read(key.fd, 65536)
                    if data:
                        chunks[key.data].append(data)
                    else:
                        sel.unregister(key.fd)
                        os.close(key.fd)
                        self._fds[key.data] = None
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        texts = (b"".join(chunks[n]).decode(errors="replace") for n in ("stdout", "stderr"))
        return tuple(t.replace("\r\n", "\n").replace("\r", "\n") for t in texts)  # text=True's newlines

    def __del__(self):
        for fd in self._fds.values():
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass


class Server:
    """One server process and the connection to it: started by launch() or the first spawn()."""

    cpu_s = 0.0
    """CPU seconds of all the children that have exited, for every server of this process."""

    def __init__(self, env: dict):
        self.env = env
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._replies: dict[int, dict] = {}
        self._exits: dict[int, int] = {}
        self._next_id = 0
        self._sock = None
        self._proc = None
        self._reader = None
        self.broken = False

    def launch(self) -> None:
        """Start the server process, without waiting for its imports (servers started together
        import side by side, so that the first workers of a launch start together)."""
        with self._lock:
            if self._proc is not None:
                return
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self._proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(theirs.fileno())],
                                          pass_fds=(theirs.fileno(),), env=self.env, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, cwd=os.path.dirname(os.path.abspath(__file__)))
            theirs.close()
            self._sock = ours

    def _ready(self) -> None:
        if self._reader is None:
            ready = json.loads(self._sock.recv(_MAX_MESSAGE) or b"{}")
            if "ready" not in ready:
                raise RuntimeError("the fork server did not start; its error is above "
                                   "(LARGEBATCH_TEST_FORKSERVER=0 starts every process by exec)")
            self._reader = threading.Thread(target=self._read, daemon=True, name="forkserver-reader")
            self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(_MAX_MESSAGE)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self.broken = True
                    self._cond.notify_all()
                    return
                message = json.loads(data)
                if "exited" in message:
                    self._exits[message["exited"]] = message["returncode"]
                    Server.cpu_s += message["cpu_s"]
                else:
                    self._replies[message["id"]] = message
                self._cond.notify_all()

    def close(self) -> None:
        """Stop the server (its running children carry on) and wait for it."""
        if self._proc is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._proc.wait()
            self._sock.close()
            self._sock = self._proc = self._reader = None

    def returncode(self, pid: int, timeout: float | None) -> int | None:
        with self._cond:
            self._cond.wait_for(lambda: pid in self._exits or self.broken, timeout)
            if pid not in self._exits and self.broken:
                raise RuntimeError(f"the fork server died; the exit status of pid {pid} is lost")
            return self._exits.get(pid)

    def spawn(self, target: str, args: list[str], cwd: str, env: dict, new_session: bool = False) -> Process:
        self.launch()
        with self._lock:
            self._ready()
            self._next_id += 1
            rid = self._next_id
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            null = os.open(os.devnull, os.O_RDONLY)
            request = {"id": rid, "target": target, "module": not target.endswith(".py"), "args": list(args),
                       "cwd": cwd, "env": env, "new_session": new_session}
            try:
                socket.send_fds(self._sock, [json.dumps(request).encode()], [null, out_w, err_w])
            finally:
                for f in (null, out_w, err_w):
                    os.close(f)
            with self._cond:
                self._cond.wait_for(lambda: rid in self._replies or self.broken)
                reply = self._replies.pop(rid, None)
            if reply is None or "error" in reply:
                os.close(out_r)
                os.close(err_r)
                raise RuntimeError(f"the fork server could not start {target}: {reply}")
            return Process(self, reply["pid"], out_r, err_r)


def enabled() -> bool:
    return os.environ.get("LARGEBATCH_TEST_FORKSERVER", "1") != "0" and sys.platform.startswith("linux")


def servable(env: dict, base: dict) -> bool:
    """Whether a process with ``env`` can be forked from a server started with ``base``."""
    for k in env.keys() | base.keys():
        if env.get(k) != base.get(k) and k not in RUNTIME_VARS and not k.startswith(RUNTIME_PREFIXES):
            return False
    return True


if __name__ == "__main__":
    try:
        request = _serve(int(sys.argv[1]))
    except (OSError, KeyboardInterrupt):  # the client went away, or Ctrl-C reached the whole group
        os._exit(0)
    _become(request)
