"""``cmgnet serve``: a model behind a real NVIDIA Triton Inference Server on this machine.

    cmgnet serve MODEL [--host 127.0.0.1] [--port 8000] [--grpc-port 8001] [--metrics-port 8002]
                       [--max-batch 8] [--queue-delay-us 0] [--instances 1] [--tta | --no-tta [--force]]

The ``tritonserver`` binary, its Python backend and the backend's stub come from the
``nvidia-pytriton`` wheel; they are run directly (not through PyTriton's own runtime) on a
model repository written to a temporary folder (:func:`cmgnet.deploy.triton_repo.serve_config`)
whose only model, ``cmgnet``, is the project's Python-backend model
(:mod:`cmgnet.deploy.triton_model`): it loads ``MODEL`` with the project's predictor. Triton
provides the HTTP and gRPC endpoints (KServe v2 protocol), dynamic batching, health and
readiness (``/v2/health/ready``) and Prometheus metrics (``:8002/metrics``).

The serving environment. The stub embeds the Python of the environment it finds first on
``PATH`` and deserialises BYTES tensors with that environment's numpy, which must be < 2
(numpy 2 changed the C ABI the stub was built against: BYTES inputs arrive garbled and the
stub dies). The environment must also hold this project and its predictor (torch, ONNX
Runtime). It is the first of:

1. ``$CMGNET_SERVE_ENV`` (a virtual environment folder or its ``python``);
2. the environment running ``cmgnet serve``;
3. ``.venv-serve`` beside the source tree (``make setup`` creates it:
   ``pip install -e ".[serve]"``, numpy < 2)

that has ``nvidia-pytriton``, numpy < 2 and ``cmgnet``. So ``cmgnet serve`` works from the
project's main environment (numpy 2) too. The stub's ``libpython`` is the environment's own
(its directory first on ``LD_LIBRARY_PATH``): a system ``libpython3.11`` of another patch
release under this interpreter's standard library is what breaks PyTriton's own runtime on
Python 3.11.7 (pytriton issue #51).

Ctrl-C or SIGTERM stops the server gracefully (in-flight requests finish) and removes the
temporary folder.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cmgnet.errors import CmgnetError, cli_entry
from cmgnet.hardware import physical_cores

SERVE_ENV_VAR = "CMGNET_SERVE_ENV"
SERVE_VENV = ".venv-serve"
EXIT_TIMEOUT_S = 10
"""How long Triton lets in-flight requests finish after a stop signal."""

# Printed by tritonserver on every machine without a GPU: nothing a user can act on.
_CPU_NOISE = re.compile(r"NVML|DCGM|CudaDriverHelper|pinned memory|CUDA memory pool|cuda_memory_manager"
                        r"|libcuda|GPU metrics|Collecting CPU metrics")

_PROBE = r"""
import importlib.util, json, pathlib, sys, sysconfig
out = {"python": sys.executable, "version": "%d.%d" % sys.version_info[:2],
       "libdir": sysconfig.get_config_var("LIBDIR") or "", "ldlibrary": sysconfig.get_config_var("LDLIBRARY") or ""}
spec = importlib.util.find_spec("pytriton")
out["pytriton"] = str(pathlib.Path(spec.origin).parent) if spec and spec.origin else None
out["cmgnet"] = importlib.util.find_spec("cmgnet") is not None
try:
    import numpy
    out["numpy"] = numpy.__version__
except ImportError:
    out["numpy"] = None
print(json.dumps(out))
"""


class ServeError(CmgnetError):
    """``cmgnet serve`` cannot start: no serving environment, a port in use, the model fails to load."""


@dataclass(frozen=True)
class ServingEnv:
    """Where the server comes from.

    Attributes:
        python: the environment's interpreter (its folder goes first on the server's ``PATH``).
        tritonserver: the server binary.
        backend: the Python backend's folder (``libtriton_python.so`` + utilities).
        stub: the backend stub built for the interpreter's Python version.
        library_path: folders the binaries' libraries are in (the wheel's, the interpreter's ``libpython``).
        numpy: the environment's numpy version.
    """

    python: Path
    tritonserver: Path
    backend: Path
    stub: Path
    library_path: tuple[Path, ...]
    numpy: str


def _probe(python: Path) -> ServingEnv:
    """Check one environment.

    Raises:
        ServeError: naming what it lacks.
    """
    if not python.is_file():
        raise ServeError("no Python interpreter here", python)
    try:
        # From a neutral folder: run in a source tree, `-c` would find its cmgnet/ where the server will not.
        done = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=120,
                              cwd=tempfile.gettempdir())
        info = json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as err:
        raise ServeError(f"cannot run this Python ({err.__class__.__name__})", python) from None
    if not info["numpy"] or int(info["numpy"].split(".")[0]) >= 2:
        raise ServeError(f"numpy {info['numpy']}: Triton's Python backend stub needs numpy < 2 "
                         "(pip install 'cmgnet[serve]' in an environment of its own)", python)
    if not info["pytriton"]:
        raise ServeError("nvidia-pytriton is not installed (pip install 'cmgnet[serve]')", python)
    if not info["cmgnet"]:
        raise ServeError("cmgnet is not installed in this environment", python)
    root = Path(info["pytriton"]) / "tritonserver"
    stub = root / "python_backend_stubs" / info["version"] / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServeError(f"nvidia-pytriton has no backend stub for Python {info['version']}", python)
    libs = (Path(info["pytriton"]).parent / "nvidia_pytriton.libs",)
    if ".so" in info["ldlibrary"]:  # a shared-library build: the stub embeds this very libpython
        libs = (Path(info["libdir"]), *libs)
    return ServingEnv(Path(info["python"]), root / "bin" / "tritonserver", root / "backends" / "python", stub, libs,
                      info["numpy"])


def _source_root() -> Path:
    return Path(__file__).resolve().parents[1]


def find_serving_env() -> ServingEnv:
    """The first usable serving environment (see the module docstring).

    Raises:
        ServeError: none is usable; the message says what each candidate lacks and how to make one.
    """
    given = os.environ.get(SERVE_ENV_VAR)
    if given:
        path = Path(given)
        return _probe(path / "bin" / "python" if path.is_dir() else path)
    problems = []
    for python in dict.fromkeys([Path(sys.executable), _source_root() / SERVE_VENV / "bin" / "python"]):
        if not python.exists():
            continue
        try:
            return _probe(python)
        except ServeError as err:
            problems.append(str(err))
    raise ServeError(
        "no serving environment: " + "; ".join(problems or ["none found"]) + f". Create one with `make setup` "
        f"({SERVE_VENV}) or `python -m venv ENV && ENV/bin/pip install torch 'cmgnet[serve]'`, then set "
        f"{SERVE_ENV_VAR}=ENV"
    )


def server_environment(env: ServingEnv) -> dict[str, str]:
    """The server process's environment variables: the serving Python first, its libraries found."""
    variables = dict(os.environ)
    variables["PATH"] = os.pathsep.join([str(env.python.parent), variables.get("PATH", "")])
    libs = [str(p) for p in env.library_path] + [p for p in variables.get("LD_LIBRARY_PATH", "").split(":") if p]
    variables["LD_LIBRARY_PATH"] = ":".join(dict.fromkeys(libs))
    return variables


def write_backends(folder: Path, env: ServingEnv) -> Path:
    """A backends folder for ``--backend-directory``: links into the wheel, and the stub for this Python."""
    backends = folder / "backends" / "python"
    backends.mkdir(parents=True)
    for item in env.backend.iterdir():
        if item.is_file():
            (backends / item.name).symlink_to(item)
    (backends / "triton_python_backend_stub").symlink_to(env.stub)
    return backends.parent


def check_port(host: str, port: int, flag: str) -> None:
    """Refuse a port another process listens on, before the server starts.

    Raises:
        ServeError: naming the flag and the address.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ServeError(f"{host}:{port} is not available ({err.strerror}); choose another {flag}") from None


def model_path(model: str) -> Path:
    """A shipped model's folder, or the given checkpoint / bundle / model file.

    Raises:
        ServeError: nothing there.
    """
    from cmgnet.shipped import resolve_pretrained

    path = resolve_pretrained(model)
    if not path.exists():
        raise ServeError("no such model: give a shipped model name (cmgnet models), a checkpoint, an exported "
                         "bundle or a model file", model)
    return path.resolve()


def served_tta(model: Path, tta: bool | None, force: bool) -> bool | None:
    """``--tta``/``--no-tta`` checked against the model's record before any server starts.

    Raises:
        UsageError: it contradicts the record and ``force`` is off.
    """
    from cmgnet.inference import InferenceRecord, record_path, resolve

    if tta is None:
        return None
    folder = model if model.is_dir() else model.parent
    record = InferenceRecord.load(folder)  # none beside an unrecorded checkpoint: nothing to contradict
    if record is not None:
        resolve(record, {"tta": tta}, record_path(folder), force)
    return tta


def startup_error(lines: Sequence[str]) -> str:
    """Why a server stopped before its model was ready, in one line, from its log.

    The model's own error (``failed to load 'cmgnet' version 1: Internal: CheckpointError: <file>: <what>``)
    wins over Triton's summary (``failed to load all models``); the exception's type and the
    stub's traceback are dropped.
    """
    for line in reversed(lines):
        if match := re.search(r"failed to load '[^']+' version \d+: (?:\w+: )?(.*)", line):
            message = match.group(1).split("\\n")[0].rstrip('"')  # Triton escapes the traceback's newlines
            return re.sub(r"^(\w+\.)*[A-Z]\w*(Error|Exception): ", "", message)
    errors = [line for line in lines if (line.startswith("E") or "rror" in line) and not _CPU_NOISE.search(line)]
    if not errors:
        return "no error logged"
    match = re.match(r'^[IWE]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] "?(.*?)"?$', errors[-1].strip())
    return match.group(1) if match else errors[-1].strip()


class Server:
    """A running ``tritonserver`` with its temporary model repository.

    Args:
        command: the server's command line.
        environment: its environment variables.
        folder: the temporary folder (removed by :meth:`stop`).
        http: ``host:port`` of its HTTP endpoint (polled for readiness).
        verbose: pass every log line through (otherwise lines that only say there is no GPU are dropped).
    """

    def __init__(self, command: list[str], environment: dict[str, str], folder: Path, http: str,
                 verbose: bool = False) -> None:
        self.folder, self.http, self.verbose = folder, http, verbose
        self.log: collections.deque[str] = collections.deque(maxlen=200)
        self.started = False  # until the model is ready the log is kept, not shown: a failure is one line
        # Own session: a terminal's Ctrl-C reaches this process only, which stops the server once.
        self.process = subprocess.Popen(command, env=environment, cwd=folder, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        self._reader = threading.Thread(target=self._forward, daemon=True)
        self._reader.start()

    def _forward(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.log.append(line.rstrip("\n"))
            quiet = _CPU_NOISE.search(line) or line.startswith(("+", "|")) or not line.strip() or not self.started
            if self.verbose or not quiet:
                sys.stderr.write(line)
                sys.stderr.flush()

    def ready(self) -> bool:
        """Whether ``/v2/health/ready`` answers 200."""
        try:
            with urllib.request.urlopen(f"http://{self.http}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the model is ready.

        Raises:
            ServeError: the server exited first (with its last error line), or ``timeout`` passed.
        """
        start = time.monotonic()
        while not self.ready():
            if self.process.poll() is not None:
                self._reader.join(timeout=5)
                raise ServeError(f"the server stopped before the model was ready (exit code "
                                 f"{self.process.returncode}): {startup_error(list(self.log))}")
            if timeout is not None and time.monotonic() - start > timeout:
                raise ServeError(f"the model was not ready after {timeout:.0f} s")
            time.sleep(0.25)
        self.started = True

    def stop(self) -> int:
        """Stop gracefully (SIGTERM; SIGKILL to the server's process group after the exit timeout); remove the folder."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=EXIT_TIMEOUT_S + 10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)  # the server and its backend stubs
                self.process.wait()
        self._reader.join(timeout=5)
        shutil.rmtree(self.folder, ignore_errors=True)
        return self.process.returncode


def launch(models: Path, env: ServingEnv, host: str, ports: dict[str, int], verbose: bool = False,
           folder: Path | None = None) -> Server:
    """Start ``tritonserver`` on a model repository (returns before it is ready).

    Args:
        models: the model repository.
        env: the serving environment.
        host: the address to listen on.
        ports: ``{"--port": http, "--grpc-port": grpc, "--metrics-port": metrics}``.
        verbose: print Triton's info log.
        folder: a temporary folder for the backends (removed by :meth:`Server.stop`; ``None``: a new one).

    Raises:
        ServeError: two ports are equal or one is in use.
    """
    if len(set(ports.values())) < len(ports):
        raise ServeError(f"{', '.join(ports)} must differ, got {sorted(ports.values())}")
    for flag, port in ports.items():
        check_port(host, port, flag)
    folder = folder or Path(tempfile.mkdtemp(prefix="cmgnet-serve-"))
    backends = write_backends(folder, env)
    http, grpc, metrics = ports["--port"], ports["--grpc-port"], ports["--metrics-port"]
    command = [
        str(env.tritonserver), f"--model-repository={models}", f"--backend-directory={backends}",
        f"--http-address={host}", f"--http-port={http}", f"--grpc-address={host}", f"--grpc-port={grpc}",
        f"--metrics-address={host}", f"--metrics-port={metrics}",
        "--allow-metrics=true", "--allow-gpu-metrics=false", "--allow-cpu-metrics=true",
        "--strict-readiness=true", "--disable-auto-complete-config", f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
        # Shared-memory regions per server: several servers on one machine must not collide.
        f"--backend-config=python,shm-region-prefix-name=cmgnet{os.getpid()}_{http}_",
        f"--log-info={str(verbose).lower()}",
    ]
    return Server(command, server_environment(env), folder, f"{_connect_host(host)}:{http}", verbose)


def start_server(args: argparse.Namespace, env: ServingEnv | None = None) -> Server:
    """``cmgnet serve``'s server: the model checked, its repository written, ``tritonserver`` started (not yet ready)."""
    from .triton_repo import SERVED_NAME, Batching, RequestLimits, serve_config, write_model_py

    model = model_path(args.model)
    tta = served_tta(model, args.tta, args.force)
    env = env or find_serving_env()
    # Instances are processes: each gets its share of the physical cores (ONNX Runtime and torch threads).
    threads = max(1, physical_cores() // args.instances)
    limits = RequestLimits(max_pixels=args.max_pixels)
    config = serve_config(model, Batching(args.max_batch, args.queue_delay_us, args.instances), limits,
                          backend=args.backend, threads=threads, tta=tta)
    folder = Path(tempfile.mkdtemp(prefix="cmgnet-serve-"))
    try:
        models = folder / "models"
        write_model_py(models / SERVED_NAME)
        (models / SERVED_NAME / "config.pbtxt").write_text(config)
        ports = {"--port": args.port, "--grpc-port": args.grpc_port, "--metrics-port": args.metrics_port}
        return launch(models, env, args.host, ports, args.verbose, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _connect_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to ``host``."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _parser() -> argparse.ArgumentParser:
    from .cli import serve_parser

    return serve_parser()


class _Stop(Exception):
    """SIGTERM arrived."""


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """``cmgnet serve``; returns 0 after a clean stop.

    Raises:
        ServeError: see :func:`start_server` and :meth:`Server.wait_ready`.
    """
    args = _parser().parse_args(argv)

    def on_term(signum: int, frame: object) -> None:
        raise _Stop

    server = start_server(args)
    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        server.wait_ready()
        http = f"{_connect_host(args.host)}:{args.port}"
        print(f"serving {args.model} as model 'cmgnet' (max batch {args.max_batch}, queue delay "
              f"{args.queue_delay_us} us, {args.instances} instance(s))\n"
              f"  HTTP    http://{http}/v2/models/cmgnet   (ready: /v2/health/ready)\n"
              f"  gRPC    {_connect_host(args.host)}:{args.grpc_port}\n"
              f"  metrics http://{_connect_host(args.host)}:{args.metrics_port}/metrics\n"
              f"  repository {server.folder / 'models'} (temporary: removed at exit)\n"
              "Ctrl-C stops it.", flush=True)
        code = server.process.wait()
        if code:
            raise ServeError(f"tritonserver exited with code {code}")
        return 0
    except (KeyboardInterrupt, _Stop):
        print("stopping the server ...", file=sys.stderr, flush=True)
        return 0 if server.stop() in (0, -signal.SIGTERM) else 1
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)
