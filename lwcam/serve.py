"""``lwcam serve``: a black box on a real model server (MLServer), reachable over the Open Inference Protocol.

The command serves one of:

* ``--profile NAME``: the profile's black-box teacher (trained first if ``runs/NAME`` has none);
* ``--checkpoint PATH``: a lwcam checkpoint (:func:`lwcam.models.save_checkpoint`: architecture and weights);
* ``--module PATH``: any saved torch module, a ``torch.export`` program (``.pt2``) or a TorchScript archive.

Pickled modules are never loaded (unpickling can run any code), and only tensors cross the wire:
FP32 images in, FP32 scores out (``probs``, the default, or ``logits``). The server binds
127.0.0.1; any other host needs ``--allow-remote`` as well. It prints the model's URL, which is
what a profile's ``black_box_url`` or :meth:`lwcam.BlackBox.from_endpoint` takes.

:class:`ServerProcess` runs the command in a subprocess on a free loopback port (tests, benchmarks).

Example:
    >>> main(["serve", "--module", "model.pt2", "--image-size", "32", "--host", "0.0.0.0"])
    Traceback (most recent call last):
    ...
    SystemExit: lwcam serve: --host 0.0.0.0 is not a loopback address; add --allow-remote to serve beyond this machine
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import torch
from torch import nn

from ._checks import check_positive_int, check_real

__all__ = ["main", "load_module", "ServerProcess", "free_port", "DEFAULT_HOST", "DEFAULT_PORT", "DEFAULT_NAME"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_NAME = "blackbox"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_module(path: str | os.PathLike) -> nn.Module:
    """Load a saved module: a ``torch.export`` program (``.pt2``) or a TorchScript archive; never a pickle.

    Example:
        >>> load_module("missing.pt")
        Traceback (most recent call last):
        ...
        FileNotFoundError: --module missing.pt: no such file
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--module {p}: no such file")
    if p.suffix == ".pt2":
        return torch.export.load(p).module()
    if not _is_torchscript(p):
        raise ValueError(f"--module {p} is not a TorchScript archive (torch.jit.save) nor a torch.export program "
                         f"(.pt2, torch.export.save); pickled modules are not loaded, as unpickling can run any code")
    return torch.jit.load(str(p), map_location="cpu")


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip file with the module's code (``<archive>/code/...``) in it."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in name for name in z.namelist())


def _served_module(args: argparse.Namespace) -> tuple[nn.Module, int]:
    """The module to serve and its image size, from ``--profile``, ``--checkpoint`` or ``--module``."""
    if args.profile is not None:
        from .pipeline import RunPaths, get_teacher
        from .profiles import load_profile

        profile = load_profile(args.profile)
        print(f"[lwcam] loading the black box of profile {args.profile!r} (trained first if runs/{args.profile} "
              f"has none)", flush=True)
        teacher, _ = get_teacher(profile, RunPaths.for_profile(args.profile))
        return teacher, profile.image_size
    if args.checkpoint is not None:
        from .models import load_checkpoint

        return load_checkpoint(args.checkpoint)[0], args.image_size
    return load_module(args.module), args.image_size


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lwcam", description="lwcam command line")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve a black box over the Open Inference Protocol (KServe v2) with MLServer")
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--profile", help="serve this profile's black-box teacher (params/NAME.yaml)")
    what.add_argument("--checkpoint", help="a lwcam checkpoint (architecture and weights)")
    what.add_argument("--module", help="a torch.export program (.pt2) or a TorchScript archive")
    s.add_argument("--image-size", type=int, help="side of the square images (the profile's with --profile)")
    s.add_argument("--any-size", action="store_true", help="take images of any height and width (declared -1), "
                   "e.g. the scorecard's 64x128 scenes; --image-size is then the size the module is probed at")
    s.add_argument("--name", default=DEFAULT_NAME, help=f"model name on the server (default {DEFAULT_NAME})")
    s.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    s.add_argument("--allow-remote", action="store_true", help="allow a --host that is not a loopback address")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default {DEFAULT_PORT})")
    s.add_argument("--returns", choices=("probs", "logits"), default="probs", help="what the model answers")
    s.add_argument("--max-batch-size", type=int, default=1024, help="most images a request may carry")
    s.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if not _is_loopback(args.host) and not args.allow_remote:
        raise SystemExit(f"lwcam serve: --host {args.host} is not a loopback address; add --allow-remote to serve "
                         f"beyond this machine")
    if args.profile is None and args.image_size is None:
        raise SystemExit("lwcam serve: --image-size is required with --checkpoint and --module")
    try:
        check_positive_int(args.port, "--port")
        if args.port > 65535:
            raise ValueError(f"--port must be at most 65535, got {args.port}")
        check_positive_int(args.max_batch_size, "--max-batch-size")
        for name, value in (("--image-size", args.image_size), ("--threads", args.threads)):
            if value is not None:
                check_positive_int(value, name)
        if not args.name or "/" in args.name:
            raise ValueError(f"--name must be a non-empty name without '/', got {args.name!r}")
    except ValueError as err:
        raise SystemExit(f"lwcam serve: {err}") from err


def serve(args: argparse.Namespace) -> None:
    """Load the module named by ``args`` and serve it until interrupted."""
    _check_args(args)
    try:
        from ._serving import ServedModel, run_server
    except ImportError as err:
        raise SystemExit(f"lwcam serve needs the serve extra: pip install 'lwcam[serve]' ({err})") from err
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    module, image_size = _served_module(args)
    served = ServedModel(module, args.name, image_size=image_size, returns=args.returns,
                         max_batch_size=args.max_batch_size, any_size=args.any_size)
    print(f"[lwcam] serving {args.name!r} (version {served.version}, {served.num_classes} classes, "
          f"{'any size' if args.any_size else f'{image_size}x{image_size} px'}, answers {args.returns}) at "
          f"http://{args.host}:{args.port}/v2/models/{args.name}", flush=True)
    run_server(served, args.host, args.port)


def main(argv: list[str] | None = None) -> int:
    """The ``lwcam`` command (``lwcam serve --help``)."""
    args = _parser().parse_args(argv)
    if args.cmd == "serve":
        serve(args)
    return 0


def free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port free on ``host`` right now.

    Example:
        >>> 0 < free_port() < 65536
        True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``lwcam serve ARGS`` in a subprocess on a loopback port; a context manager that stops it on exit.

    ``start`` returns once the server answers ``/v2/health/ready`` (its models are loaded by
    then); ``kill`` ends it at once (SIGKILL), as a crash would; ``start`` again restarts it on the
    same port. Its output goes to ``log`` (a file), or is discarded.

    Example:
        >>> ServerProcess(["--module", "m.pt2", "--image-size", "32"], port=8123).url
        'http://127.0.0.1:8123'
    """

    def __init__(self, args: list[str], port: int | None = None, env: dict[str, str] | None = None,
                 log: str | os.PathLike | None = None, startup_timeout: float = 120.0) -> None:
        self.args = list(args)
        self.port = free_port() if port is None else check_positive_int(port, "port")
        self.env = env
        self.log = None if log is None else Path(log)
        self.startup_timeout = check_real(startup_timeout, "startup_timeout (seconds)", 0.0, low_open=True)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{DEFAULT_HOST}:{self.port}"

    def start(self) -> ServerProcess:
        """Start the server and wait until it is ready; ``RuntimeError`` (with its log's tail) if it dies first."""
        command = [sys.executable, "-m", "lwcam.serve", "serve", *self.args, "--port", str(self.port)]
        out: Any = subprocess.DEVNULL if self.log is None else self.log.open("ab")
        self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        if out is not subprocess.DEVNULL:
            out.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text()[-2000:] if self.log is not None and self.log.exists() else ""
                raise RuntimeError(f"lwcam serve {' '.join(self.args)} exited with {self.proc.returncode}:\n{tail}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"lwcam serve {' '.join(self.args)} was not ready within {self.startup_timeout:g} s")

    def kill(self) -> None:
        """End the server at once (SIGKILL), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        """End the server gracefully (SIGTERM; SIGKILL after 10 s)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
