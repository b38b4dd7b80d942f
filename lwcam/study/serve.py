"""``lwcam serve``: a black box on a real model server (MLServer), reachable over the Open Inference Protocol.

The command serves one of:

* ``--profile NAME``: the profile's black-box teacher (trained first if ``runs/NAME`` has none);
* ``--checkpoint PATH``: a lwcam checkpoint (:func:`lwcam.models.save_checkpoint`: architecture and weights);
* ``--module PATH``: any saved torch module, a ``torch.export`` program (``.pt2``) or a TorchScript archive.

No code runs from a model file: a pickle is never unpickled with arbitrary globals, and a
``.pt2`` archive is inspected before it is loaded (:func:`load_module` says what is refused). Only
tensors cross the wire: FP32 images in, FP32 scores out (``probs``, the default, or ``logits``).
The server binds 127.0.0.1; any other host needs ``--allow-remote`` as well. A port in use is
refused before the module is loaded. It prints the model's URL, which is what a profile's
``black_box_url`` or :meth:`lwcam.BlackBox.from_endpoint` takes.

``--count-file PATH`` appends, for every request answered, its number of images (one line each,
flushed and synced to disk before the answer is sent), so that what a server answered can be
counted even when it is killed.

:class:`ServerProcess` runs the command in a subprocess on a free loopback port (tests, benchmarks).

Example:
    >>> main(["serve", "--module", "model.pt2", "--image-size", "32", "--host", "0.0.0.0"])
    Traceback (most recent call last):
    ...
    SystemExit: lwcam serve: --host 0.0.0.0 is not a loopback address; add --allow-remote to serve beyond this machine
"""

from __future__ import annotations

import argparse
import ast
import io
import ipaddress
import json
import math
import operator
import os
import re
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import torch
from torch import nn

from .._checks import check_positive_int, check_real

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


class ModelFileError(ValueError):
    """A model file that ``lwcam serve`` refuses to load: not what it claims to be, or able to run code."""


class ExportedModule(nn.Module):
    """The module of a ``torch.export`` program, served as exported.

    An exported graph has no train/eval switch (its ``eval()`` raises ``NotImplementedError``):
    dropout and batch-norm behave as they did when it was exported, so export a module in
    ``eval()`` mode. ``train()`` and ``eval()`` only set this wrapper's flag.
    """

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def train(self, mode: bool = True) -> ExportedModule:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)


def load_module(path: str | os.PathLike) -> nn.Module:
    """Load a saved module: a ``torch.export`` program (``.pt2``) or a TorchScript archive; never a pickle.

    The file is read once and checked in memory before anything in it is loaded; what is refused
    raises :class:`ModelFileError` (a ``ValueError``) naming the file:

    * any other file (``torch.save``'s pickles included) unless it is a zip with TorchScript code
      (``torch.jit.save``), which ``torch.jit.load`` reads without Python's unpickler;
    * a ``.pt2`` that is not a valid zip, or holds a member ``torch.export.save`` does not write:
      under one root folder, only ``archive_format`` (``pt2``), ``archive_version``, ``byteorder``,
      ``.data/*``, ``models/NAME.json``, ``data/weights/`` (its config and raw ``weight_N``),
      ``data/constants/`` (its config and raw ``tensor_N``), ``data/sample_inputs/NAME.pt`` and
      ``extra/*`` (so no compiled AOTInductor library, legacy pickled weights, custom or opaque objects);
    * a ``.pt2`` with a payload stored as a pickle (``use_pickle``), or sample inputs that
      ``torch.load(weights_only=True)`` refuses (``torch.export.load`` would then unpickle them with
      arbitrary globals);
    * a ``.pt2`` program whose JSON carries guard code (``torch.export`` runs it as Python), or a
      symbolic expression other than plain sympy constructors (sympy evaluates it as Python);
    * a ``.pt2`` program that takes anything but one tensor, calls anything but torch operators
      (``torch.ops``) and scalar arithmetic, or names a weight with other than ``[A-Za-z0-9_]``
      between its dots (the names become Python code in the module).

    A program is served as :class:`ExportedModule` (as exported: export it in ``eval()`` mode,
    with a dynamic batch dimension).

    Example:
        >>> load_module("missing.pt")
        Traceback (most recent call last):
        ...
        FileNotFoundError: --module missing.pt: no such file
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--module {p}: no such file")
    data = p.read_bytes()
    if p.suffix == ".pt2":
        return _load_program(p, data)
    if not _is_torchscript(p, data):
        raise ModelFileError(f"--module {p} is not a TorchScript archive (torch.jit.save) nor a torch.export "
                             f"program (.pt2, torch.export.save); pickled modules are not loaded, as unpickling can "
                             f"run any code")
    return torch.jit.load(io.BytesIO(data), map_location="cpu")


def _is_torchscript(path: Path, data: bytes) -> bool:
    """A TorchScript archive is a zip file with the module's code (``<archive>/code/...``) in it."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return any("/code/" in name for name in z.namelist())
    except zipfile.BadZipFile:
        return False


def _load_program(path: Path, data: bytes) -> nn.Module:
    """A checked ``.pt2`` archive's program, loaded from the bytes that were checked."""
    _check_archive(path, data)
    program = torch.export.load(io.BytesIO(data))
    _check_program(path, program)
    return ExportedModule(program.module())


#: The members ``torch.export.save`` writes under an archive's root folder (torch 2.x, archive version 0).
_PT2_MEMBER = re.compile(r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                         r"|models/\w+\.json|data/weights/\w+_weights_config\.json|data/weights/weight_\d+"
                         r"|data/constants/\w+_constants_config\.json|data/constants/tensor_\d+"
                         r"|data/sample_inputs/\w+\.pt|extra/[\w.-]+", re.ASCII)
_RAW_PAYLOAD = {"weights": re.compile(r"weight_\d+"), "constants": re.compile(r"tensor_\d+")}


def _check_archive(path: Path, data: bytes) -> None:
    """Refuse a ``.pt2`` that is not a zip of what ``torch.export.save`` writes, or that carries pickles."""
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as err:
        raise ModelFileError(f"--module {path} is not a torch.export program: not a valid zip archive ({err})") from err
    with z:
        names = z.namelist()
        root = names[0].split("/")[0] if names else ""
        _check_members(path, names, root)
        if z.read(f"{root}/archive_format").decode(errors="replace").strip() != "pt2":
            raise ModelFileError(f"--module {path}: {root}/archive_format is not 'pt2'")
        for name in names:
            _check_member(path, z, name, name[len(root) + 1:])


def _check_members(path: Path, names: list[str], root: str) -> None:
    if len(set(names)) != len(names):
        raise ModelFileError(f"--module {path}: the archive holds a member twice; refused")
    for name in names:
        rest = name[len(root) + 1:] if name.startswith(f"{root}/") else ""
        if not _PT2_MEMBER.fullmatch(rest):
            raise ModelFileError(f"--module {path}: the archive holds {name!r}, which torch.export.save does not "
                                 f"write (a pickle, compiled code or another format); refused, so that no code "
                                 f"in the file runs")
    if f"{root}/archive_format" not in names:
        raise ModelFileError(f"--module {path} is not a torch.export program: no {root}/archive_format")


def _check_member(path: Path, z: zipfile.ZipFile, name: str, rest: str) -> None:
    """One member's content: payload configs without pickles, sample inputs that load as weights, safe JSON."""
    kind = rest.split("/")[1] if rest.startswith("data/") else ""
    if kind in _RAW_PAYLOAD and rest.endswith("_config.json"):
        for key, meta in _payload_config(path, z, name).items():
            if meta.get("use_pickle") or not _RAW_PAYLOAD[kind].fullmatch(str(meta.get("path_name"))):
                raise ModelFileError(f"--module {path}: {name} stores {key!r} as a pickle "
                                     f"({meta.get('path_name')!r}), which would be unpickled with arbitrary "
                                     f"globals; refused")
    elif kind == "sample_inputs":
        try:
            torch.load(io.BytesIO(z.read(name)), weights_only=True)
        except Exception as err:
            found = re.search(r"(unsupported|Unsupported global:) GLOBAL [\w.]+", str(err))
            raise ModelFileError(f"--module {path}: {name} is not plain tensor data (torch.load with "
                                 f"weights_only=True refuses it: {found.group(0) if found else type(err).__name__}); "
                                 f"torch.export would unpickle it with arbitrary globals; refused") from err
    elif rest.startswith("models/"):
        _check_program_json(path, name, _json(path, z, name))


def _payload_config(path: Path, z: zipfile.ZipFile, name: str) -> dict[str, dict[str, Any]]:
    """A weights or constants config: ``{name: {"path_name": ..., "use_pickle": ...}}``."""
    doc = _json(path, z, name)
    config = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(config, dict) or not all(isinstance(meta, dict) for meta in config.values()):
        raise ModelFileError(f"--module {path}: {name} is not a payload config ({{'config': {{name: {{...}}}}}})")
    return config


def _json(path: Path, z: zipfile.ZipFile, name: str) -> Any:
    try:
        return json.loads(z.read(name))
    except ValueError as err:
        raise ModelFileError(f"--module {path}: {name} is not valid JSON ({err})") from err


def _check_program_json(path: Path, name: str, program: Any) -> None:
    """No guard code (run as Python) and only plain sympy constructors in symbolic expressions (evaluated)."""
    for key, value in _json_items(program):
        if key == "guards_code" and value:
            raise ModelFileError(f"--module {path}: {name} carries guard code ({str(value)[:120]}...), which "
                                 f"torch.export runs as Python; refused")
        if key == "expr_str" and not (isinstance(value, str) and _plain_sympy(value)):
            raise ModelFileError(f"--module {path}: {name} has the symbolic expression {str(value)[:120]!r}, which "
                                 f"is not made of plain sympy constructors and would be evaluated as Python; refused")


def _json_items(value: Any) -> Iterator[tuple[str, Any]]:
    """Every ``(key, value)`` of every object nested in a JSON value (depth first, without recursion)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            yield from v.items()
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


#: What ``sympy.srepr`` writes for a symbolic shape: these constructors and constants, nothing else.
_SYMPY_CALLS = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs", "floor", "ceiling",
    "Equality", "Unequality", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "And", "Or", "Not",
    "Piecewise", "ExprCondPair", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt",
    "FloorToInt", "CeilDiv", "IntTrueDiv", "FloatTrueDiv", "LShift", "RShift", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "FloatPow", "PowByNatural", "Identity",
})
_SYMPY_CONSTANTS = frozenset({"oo", "zoo", "nan", "int_oo", "true", "false", "pi", "E"})
_SYMPY_STRINGS = {"Symbol": re.compile(r"[A-Za-z][A-Za-z0-9_]*"), "Float": re.compile(r"[-+]?[0-9.eE+-]+|[-+]?inf")}


def _plain_sympy(text: str) -> bool:
    """Whether ``text`` is a sympy constructor expression: calls of :data:`_SYMPY_CALLS` on numbers."""
    try:
        return _plain_sympy_node(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, RecursionError):
        return False


def _plain_sympy_node(node: ast.AST) -> bool:
    if isinstance(node, ast.Call):
        f = node.func.id if isinstance(node.func, ast.Name) else ""
        strings = _SYMPY_STRINGS.get(f)
        first = node.args[0] if node.args else None
        return (f in _SYMPY_CALLS and all(k.arg is not None and _number(k.value) for k in node.keywords)
                and all(_plain_sympy_node(a) or (a is first and strings is not None and isinstance(a, ast.Constant)
                                                 and isinstance(a.value, str) and bool(strings.fullmatch(a.value)))
                        for a in node.args))
    if isinstance(node, ast.Name):
        return node.id in _SYMPY_CONSTANTS
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        return _number(node.operand)
    return _number(node)


def _number(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) in (int, float, bool)


#: Scalar functions an exported graph may call besides torch operators.
_SCALAR_FUNCTIONS: frozenset[Any] = frozenset({
    operator.getitem, operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
    operator.pow, operator.neg, operator.pos, operator.abs, operator.eq, operator.ne, operator.lt, operator.le,
    operator.gt, operator.ge, operator.and_, operator.or_, operator.xor, operator.not_, operator.invert,
    torch.sym_int, torch.sym_float, torch.sym_max, torch.sym_min, torch.sym_not, torch.sym_ite,
    *(f for f in vars(math).values() if callable(f)),
})
_NAME = re.compile(r"\w+(\.\w+)*", re.ASCII)


def _check_program(path: Path, program: torch.export.ExportedProgram) -> None:
    """One tensor in; torch operators and scalar arithmetic only; weight names that are safe as Python code."""
    _, tensor_only = torch.utils._pytree.tree_flatten(((torch.zeros(1),), {}))
    specs = program.graph_signature.user_inputs
    if len(specs) != 1 or program.call_spec.in_spec != tensor_only:
        layout = " ".join(str(program.call_spec.in_spec).split())
        raise ModelFileError(f"--module {path}: the program takes {len(specs)} input(s) (laid out as {layout}); a "
                             f"served classifier takes one tensor of images")
    sig = program.graph_signature
    names = [*program.state_dict, *program.constants, *sig.inputs_to_parameters.values(),
             *sig.inputs_to_buffers.values(), *sig.inputs_to_lifted_tensor_constants.values()]
    for gm in program.graph_module.modules():
        if isinstance(gm, torch.fx.GraphModule):
            names += [str(n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")]
            for node in gm.graph.nodes:
                if node.op == "call_function" and not _allowed_target(node.target):
                    raise ModelFileError(f"--module {path}: the program calls {node.target!r}, which is not a torch "
                                         f"operator (torch.ops) nor scalar arithmetic; refused")
    bad = [n for n in names if not _NAME.fullmatch(n)]
    if bad:
        raise ModelFileError(f"--module {path}: the program names {bad[0]!r}; names of weights and submodules must be "
                             f"made of letters, digits and '_' between dots")


def _allowed_target(target: Any) -> bool:
    if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket | torch._ops.HigherOrderOperator):
        return True
    try:
        return target in _SCALAR_FUNCTIONS
    except TypeError:  # unhashable
        return False


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
        from ..models import load_checkpoint

        return load_checkpoint(args.checkpoint)[0], args.image_size
    return _load_or_exit(args.module), args.image_size


def _load_or_exit(path: str) -> nn.Module:
    """:func:`load_module`, its refusals and failures turned into the command's error message."""
    try:
        return load_module(path)
    except (OSError, ModelFileError) as err:
        raise SystemExit(f"lwcam serve: {err}") from err
    except (RuntimeError, ValueError) as err:
        raise SystemExit(f"lwcam serve: --module {path} could not be loaded: {err}") from err


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
    s.add_argument("--count-file", help="append each answered request's number of images to this file (a line "
                   "each, synced to disk before the answer is sent)")
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


def _check_port_free(host: str, port: int) -> None:
    """Fail at once, naming the port, where the server could not bind ``host:port`` (as it binds: SO_REUSEADDR)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise SystemExit(f"lwcam serve: cannot bind --port {port} on --host {host}: {err.strerror or err} "
                             f"(another server on that port?); choose another --port") from err


def serve(args: argparse.Namespace) -> None:
    """Load the module named by ``args`` and serve it until interrupted."""
    _check_args(args)
    _check_port_free(args.host, args.port)
    try:
        from .._serving import ServedModel, run_server
    except ImportError as err:
        raise SystemExit(f"lwcam serve needs the serve extra: pip install 'lwcam[serve]' ({err})") from err
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    module, image_size = _served_module(args)
    served = ServedModel(module, args.name, image_size=image_size, returns=args.returns,
                         max_batch_size=args.max_batch_size, any_size=args.any_size, count_file=args.count_file)
    print(f"[lwcam] serving {args.name!r} (version {served.version}, {served.num_classes} classes, "
          f"{'any size' if args.any_size else f'{image_size}x{image_size} px'}, answers {args.returns}) at "
          f"http://{args.host}:{args.port}/v2/models/{args.name}", flush=True)
    try:
        run_server(served, args.host, args.port)
    except SystemExit as err:  # uvicorn exits when it cannot bind (the port was taken while the module loaded)
        if err.code in (None, 0):
            raise
        raise SystemExit(f"lwcam serve: the server on --host {args.host} --port {args.port} stopped at start-up "
                         f"(exit {err.code}; the port may have been taken meanwhile)") from err


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
        command = [sys.executable, "-m", "lwcam.study.serve", "serve", *self.args, "--port", str(self.port)]
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
