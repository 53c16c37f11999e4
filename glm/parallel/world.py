"""The ranks of tensor parallelism: how they start, how they talk, and how they fail without hanging.

Rank 0 is the user's process. Either it starts the other N-1 ranks itself, as child processes (`python -m
glm.parallel.worker`, which find it through a TCPStore on a free port of 127.0.0.1), or `torchrun` started all N and
set RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, and every rank joins through those. One world per process, kept
until exit; every tensor-parallel model of the process uses it.

Two process groups: `data` (NCCL on GPUs, gloo on CPUs) for the model's all-reduces and all-gathers, each bounded
by COLLECTIVE_TIMEOUT; and `control` (gloo), on which rank 0 broadcasts each step's call to the others, who may wait
for it as long as the server is idle (rank 0 pings them every HEARTBEAT seconds, within CONTROL_TIMEOUT). A
watchdog thread polls the ranks rank 0 started: one that dies marks the world failed (every later call raises
ParallelError at once; gloo collectives in flight fail as soon as the peer's sockets close), and with
`exit_on_failure()` (the servers and chat CLIs) rank 0 then exits with status 1. The ranks rank 0 started watch it
in turn and exit when it is gone.
"""

from __future__ import annotations

import atexit
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from glm.errors import ParallelError, one_line

COLLECTIVE_TIMEOUT = timedelta(seconds=120)  # one all-reduce waits for the slowest rank's half-layer, not more
CONTROL_TIMEOUT = timedelta(seconds=600)  # a worker waiting for rank 0's next call
HEARTBEAT = 60.0  # seconds: rank 0 pings the workers when it has been idle this long
START_TIMEOUT = 300.0  # seconds for a started rank to import torch and connect
EXIT_GRACE = 2.0  # seconds between a rank's death and rank 0's exit (with `exit_on_failure`): errors reach clients
MESSAGE_HEAD = 4096  # bytes of the one broadcast that carries a call (a decode step's fits)
PARENT_ENV = "GLM_TENSOR_PARALLEL_PARENT"  # set on the ranks rank 0 starts: the pid they watch

_world: World | None = None
_exit_on_failure = False


def exit_on_failure() -> None:
    """When a rank dies, fail what runs, then exit this process with status 1 (for servers and interactive CLIs)."""
    global _exit_on_failure
    _exit_on_failure = True


def under_torchrun() -> bool:
    """Whether this process was started as one rank of several (torchrun, or the same variables set by hand)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def join(size: int, device: torch.device) -> World:
    """This process's world of `size` ranks on `device`'s kind of device: the existing one, or a new one (started
    here, or joined under torchrun). Raises ParallelError in one line."""
    global _world
    kind = device.type
    if _world is not None and not _world.closed:
        if (_world.size, _world.kind) != (size, kind):
            raise ParallelError(f"this process already runs tensor parallel over {_world.size} {_world.kind} ranks; "
                                f"a model over {size} {kind} ranks needs a process of its own")
        _world.check()
        return _world
    if kind not in ("cpu", "cuda"):
        raise ParallelError(f"tensor parallelism runs on CPUs (gloo) and CUDA GPUs (NCCL), not on {kind}")
    if under_torchrun():
        _world = World._torchrun(size, kind)
    else:
        _world = World._spawn(size, kind)
    return _world


def current() -> World | None:
    return _world if _world is not None and not _world.closed else None


class World:
    """The N ranks of this process's tensor parallelism, seen from one of them."""

    def __init__(self, rank: int, size: int, kind: str, procs: list | None = None, logs: list | None = None):
        self.rank, self.size, self.kind = rank, size, kind
        local = int(os.environ.get("LOCAL_RANK", rank))
        self.device = torch.device("cuda", local) if kind == "cuda" else torch.device("cpu")
        self.procs, self.logs = procs or [], logs or []  # the ranks this one started, and their stderr
        self.lock = threading.RLock()  # one call at a time: every rank must meet the collectives in the same order
        self.failed: str | None = None
        self.closed = self._exiting = False
        self.last_call = time.monotonic()
        self.comm_seconds = 0.0  # time spent in the model's collectives (scripts/bench.py reports its share)
        self.timed = False  # on GPUs, wait for each collective to finish, so that comm_seconds is its real time
        self.data = self.control = None
        self._threads: int | None = None  # this process's CPU threads before it joined
        self._next_model = 0
        self._gone: list[int] = []  # models rank 0 no longer holds: the others drop them with its next call

    # -- starting

    @classmethod
    def _spawn(cls, size: int, kind: str) -> World:
        """Rank 0 of a world whose other ranks it starts as child processes."""
        if kind == "cuda" and torch.cuda.device_count() < size:
            raise ParallelError(f"tensor_parallel={size} puts one rank on each GPU, and this machine has "
                                f"{torch.cuda.device_count()}: use at most that many, or --device cpu")
        try:
            store = dist.TCPStore("127.0.0.1", 0, size, True, timedelta(seconds=START_TIMEOUT),
                                  wait_for_workers=False)
        except (RuntimeError, OSError) as e:
            raise ParallelError(f"cannot listen on 127.0.0.1 for the tensor-parallel ranks: {e}") from None
        store.set("backend", _backend(kind))
        procs, logs = [], []
        # The other ranks import the glm this process runs, wherever it was found.
        here = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
        for r in range(1, size):
            env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(size), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(store.port), PYTHONPATH=path, **{PARENT_ENV: str(os.getpid())})
            log = tempfile.TemporaryFile()
            logs.append(log)
            procs.append(subprocess.Popen(worker_command(), env=env, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=log))
        world = cls(0, size, kind, procs, logs)
        try:
            world._wait_started(store)
            world._connect(store)
        except BaseException:
            world._stop_procs()
            raise
        world._start_threads()
        return world

    @classmethod
    def _torchrun(cls, size: int, kind: str) -> World:
        """This process's place in a world torchrun (or the same environment variables) started."""
        rank, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if n != size:
            raise ParallelError(f"started as one of {n} ranks (WORLD_SIZE) but asked for tensor_parallel={size}: "
                                f"start {size} ranks (torchrun --nproc-per-node {size}) or pass {n}")
        addr, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
        taken = ParallelError(f"port {port} on {addr} (MASTER_PORT) is taken: choose a free one, or start with "
                              "torchrun --standalone")
        if rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and _port_taken(addr, port):
            raise taken  # at once: the store would retry for seconds first
        try:
            store, _, _ = next(dist.rendezvous("env://", rank, size, timeout=timedelta(seconds=START_TIMEOUT)))
        except (RuntimeError, ValueError) as e:
            if "address already in use" in str(e).lower():
                raise taken from None
            raise ParallelError(f"rank {rank} cannot reach rank 0 at {addr}:{port} (MASTER_ADDR, MASTER_PORT): "
                                f"{one_line(str(e))[:200]}") from None
        world = cls(rank, size, kind)
        world._connect(store)
        if rank == 0:
            world._start_threads()
        return world

    @classmethod
    def _started(cls) -> World:
        """In a rank that rank 0 started: join it (the variables it set say where)."""
        size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size, False,
                              timedelta(seconds=START_TIMEOUT))
        kind = "cuda" if store.get("backend").decode() == "nccl" else "cpu"
        store.set(f"started/{rank}", "1")
        world = cls(rank, size, kind)
        _watch_parent(int(os.environ[PARENT_ENV]))
        world._connect(store)
        global _world
        _world = world
        return world

    def _wait_started(self, store) -> None:
        """Wait until every started rank has connected, or refuse in one line the first that exited instead."""
        deadline = time.monotonic() + START_TIMEOUT
        waiting = set(range(1, self.size))
        while waiting:
            for r in sorted(waiting):
                if store.check([f"started/{r}"]):
                    waiting.discard(r)
                elif self.procs[r - 1].poll() is not None:
                    raise ParallelError(f"tensor-parallel rank {r} could not start (exit status "
                                        f"{self.procs[r - 1].returncode}): {self._last_words(r)}")
            if time.monotonic() > deadline:
                raise ParallelError(f"tensor-parallel rank {min(waiting)} did not connect within {START_TIMEOUT:.0f} "
                                    "s: the machine may be overloaded")
            time.sleep(0.05)

    def _connect(self, store) -> None:
        if self.kind == "cuda":
            torch.cuda.set_device(self.device)
        elif "OMP_NUM_THREADS" not in os.environ:
            # N ranks on one CPU share its cores: each takes its share, or their threads fight over them (and a
            # collective waits for a rank whose thread is not running). Restored by `close`.
            self._threads = torch.get_num_threads()
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.size))
        dist.init_process_group(_backend(self.kind), store=dist.PrefixStore("glm", store), rank=self.rank,
                                world_size=self.size, timeout=COLLECTIVE_TIMEOUT)
        self.data = dist.group.WORLD
        self.control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        atexit.register(self.close)

    def _start_threads(self) -> None:
        threading.Thread(target=self._heartbeat, name="glm-tp-heartbeat", daemon=True).start()
        if self.procs:
            threading.Thread(target=self._watchdog, name="glm-tp-watchdog", daemon=True).start()

    # -- rank 0: calls

    def new_model_id(self) -> int:
        self._next_model += 1
        return self._next_model

    def forget(self, mid: int) -> None:
        """Model `mid` is gone on rank 0 (safe anywhere, even in a finalizer: it sends nothing by itself)."""
        self._gone.append(mid)

    def check(self) -> None:
        if self.failed is not None:
            raise ParallelError(self.failed)
        if self.closed:
            raise ParallelError("the tensor-parallel ranks have been shut down")

    def call(self, op: str, mid: int, args: tuple, local):
        """Send `op(*args)` of model `mid` to every other rank, then run `local(*args)` here (rank 0)."""
        with self.lock:
            self.check()
            self.last_call = time.monotonic()
            gone, self._gone = self._gone, []
            try:
                self._send((op, mid, args, gone))
                return local(*args)
            except Exception as e:
                # The ranks may be out of step now (one failed in the middle of a forward): nothing can go on.
                self._fail(f"tensor-parallel {op} failed: {type(e).__name__}: {one_line(str(e))[:300]}", wait=True)
                raise ParallelError(self.failed) from None

    def exchange(self, obj) -> list:
        """Every rank's `obj`, on every rank (the control group: small Python objects)."""
        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.control)
        return out

    # -- the other ranks

    def receive(self) -> tuple:
        """(op, model id, args, models gone) of rank 0's next call."""
        head = torch.empty(MESSAGE_HEAD, dtype=torch.uint8)
        dist.broadcast(head, 0, group=self.control)
        n = int.from_bytes(head[:8].numpy().tobytes(), "little")
        data = head[8 : 8 + n].numpy().tobytes()
        if n > MESSAGE_HEAD - 8:  # the rest follows
            rest = torch.empty(n - (MESSAGE_HEAD - 8), dtype=torch.uint8)
            dist.broadcast(rest, 0, group=self.control)
            data += rest.numpy().tobytes()
        return pickle.loads(data)  # from rank 0, which started this process or was started with it

    def _send(self, msg: tuple) -> None:
        """Rank 0: one broadcast for a decode step's call (two for a long prompt's)."""
        data = pickle.dumps(msg)
        head = torch.zeros(MESSAGE_HEAD, dtype=torch.uint8)
        head[:8] = torch.frombuffer(bytearray(len(data).to_bytes(8, "little")), dtype=torch.uint8)
        first = data[: MESSAGE_HEAD - 8]
        if first:
            head[8 : 8 + len(first)] = torch.frombuffer(bytearray(first), dtype=torch.uint8)
        dist.broadcast(head, 0, group=self.control)
        if len(data) > len(first):
            dist.broadcast(torch.frombuffer(bytearray(data[len(first) :]), dtype=torch.uint8), 0, group=self.control)

    # -- the model's collectives

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's `t`, in place."""
        t0 = self._tick()
        dist.all_reduce(t, group=self.data)
        self._tock(t0)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t`, concatenated along the last dimension in rank order."""
        t0 = self._tick()
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t, group=self.data)
        self._tock(t0)
        return torch.cat(parts, dim=-1)

    def _tick(self) -> float:
        if self.timed and self.kind == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _tock(self, t0: float) -> None:
        if self.timed and self.kind == "cuda":
            torch.cuda.synchronize(self.device)
        self.comm_seconds += time.perf_counter() - t0

    # -- failing and closing

    def _fail(self, msg: str, wait: bool = False) -> None:
        """Mark the world failed (the first reason stays): a rank that died explains more than the error it caused."""
        if wait and self.procs:
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and self.failed is None and not self._dead_rank():
                time.sleep(0.05)
            self._note_dead_rank()
        if self.failed is None:
            self.failed = msg
        if _exit_on_failure and self.rank == 0 and not self._exiting:
            self._exiting = True
            threading.Thread(target=self._exit_soon, daemon=True).start()

    def _dead_rank(self) -> int | None:
        return next((i + 1 for i, p in enumerate(self.procs) if p.poll() is not None), None)

    def _note_dead_rank(self) -> None:
        r = self._dead_rank()
        if r is not None and self.failed is None and not self.closed:
            self.failed = (f"tensor-parallel rank {r} died (exit status {self.procs[r - 1].returncode}): "
                           f"{self._last_words(r)}")

    def _last_words(self, r: int) -> str:
        """The last line rank `r` wrote to its stderr (it is not shown otherwise)."""
        log = self.logs[r - 1]
        try:
            log.seek(0)
            lines = [ln for ln in log.read()[-8192:].decode("utf-8", "replace").splitlines() if ln.strip()]
        except (OSError, ValueError):
            lines = []
        return one_line(lines[-1].strip())[:300] if lines else "it printed nothing"

    def _watchdog(self) -> None:
        while not self.closed and self.failed is None:
            if self._dead_rank() is not None:
                self._note_dead_rank()
                self._fail(self.failed or "a tensor-parallel rank died")
                self._stop_procs()
                return
            time.sleep(0.2)

    def _heartbeat(self) -> None:
        while not self.closed and self.failed is None:
            time.sleep(min(5.0, HEARTBEAT))
            if time.monotonic() - self.last_call > HEARTBEAT and self.lock.acquire(blocking=False):
                try:
                    if not self.closed and self.failed is None:
                        self.call("ping", 0, (), lambda: None)
                except ParallelError:
                    return
                finally:
                    self.lock.release()

    def _exit_soon(self) -> None:
        print(f"glm: error: {self.failed}", file=sys.stderr, flush=True)
        time.sleep(EXIT_GRACE)
        os._exit(1)

    def _stop_procs(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL
                pass

    def close(self) -> None:
        """Rank 0: tell the other ranks to exit and wait for those it started; idempotent (also at exit)."""
        global _world
        if self.closed:
            return
        if self.rank == 0 and self.failed is None:
            try:
                with self.lock:
                    self._send(("close", 0, (), []))
            except Exception:  # noqa: BLE001 - closing anyway: the ranks it started are stopped below
                pass
        self.closed = True
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self._stop_procs()
        if dist.is_initialized():
            dist.destroy_process_group()
        if self._threads is not None:
            torch.set_num_threads(self._threads)
        if _world is self:
            _world = None


def _backend(kind: str) -> str:
    return "nccl" if kind == "cuda" else "gloo"


def worker_command() -> list[str]:
    """How rank 0 starts another rank."""
    return [sys.executable, "-m", "glm.parallel.worker"]


def _port_taken(addr: str, port: str) -> bool:
    """Whether rank 0 could not listen on addr:port (as the store does: SO_REUSEADDR)."""
    import errno
    import socket

    try:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((addr, int(port)))
    except OSError as e:
        return e.errno == errno.EADDRINUSE
    except ValueError:  # not a port number: the rendezvous says so
        return False
    return False


def _watch_parent(pid: int) -> None:
    """Exit this (started) rank as soon as rank 0, its parent, is gone: it must never outlive it."""

    def watch():
        while os.getppid() == pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="glm-tp-parent", daemon=True).start()


__all__ = ["COLLECTIVE_TIMEOUT", "World", "current", "exit_on_failure", "join", "under_torchrun", "worker_command"]
