"""``lwcam serve`` refuses what it must, with a message naming the bad argument, file or port, and runs no code
from a model file.

What must hold: a remote ``--host`` needs ``--allow-remote``; a missing file, a pickle (whatever its
dress) and a ``.pt2`` that is not a zip are refused with a message naming the file, and a pickle's
``__reduce__`` never runs; a ``.pt2`` program saved by ``torch.export.save`` serves and answers as
the eager module within 1e-5, while one carrying a pickle, guard code, a Python expression, a
weight name that would be Python code or a member ``torch.export.save`` does not write is refused
before it can run anything (and each archive with code does run it under a plain
``torch.export.load``); a port in use fails at once, naming the port; ``--count-file`` counts the
images answered.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lwcam.blackbox import BlackBox
from lwcam.study.serve import ExportedModule, ModelFileError, ServerProcess, free_port, load_module, main

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from _distill_worker import NUM_CLASSES, ColourTeacher, make_images  # noqa: E402

SIZE = 16
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


class Marker:
    """A pickle whose ``__reduce__`` creates ``path`` when it is unpickled: code run from a model file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, str]]:
        return open, (self.path, "w")


def export_program(path: Path) -> Path:
    """:class:`ColourTeacher` saved by ``torch.export.save`` with a dynamic batch dimension."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(ColourTeacher().eval(), (torch.zeros(2, 3, SIZE, SIZE),),
                                  dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    return path


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    return export_program(tmp_path_factory.mktemp("program") / "colour.pt2")


def _serve(*argv: str) -> None:
    main(["serve", *argv, "--image-size", str(SIZE), "--port", str(free_port())])


def _rewrite(src: Path, dst: Path, change: Callable[[str, bytes], bytes | None], add: dict[str, bytes] | None = None
             ) -> Path:
    """A copy of the archive ``src`` with each member's bytes through ``change`` (``None`` drops it), plus ``add``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/")[0]
        for name in zin.namelist():
            data = change(name, zin.read(name))
            if data is not None:
                zout.writestr(name, data)
        for name, data in (add or {}).items():
            zout.writestr(f"{root}/{name}", data)
    return dst


def _edit_json(suffix: str, edit: Callable[[dict], None]) -> Callable[[str, bytes], bytes]:
    def change(name: str, data: bytes) -> bytes:
        if not name.endswith(suffix):
            return data
        doc = json.loads(data)
        edit(doc)
        return json.dumps(doc).encode()

    return change


def _torch_save(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_torch_export_save_writes_what_load_module_takes(program):
    with zipfile.ZipFile(program) as z:
        members = sorted(name.split("/", 1)[1] for name in z.namelist())
    assert members == sorted([".data/serialization_id", ".data/version", "archive_format", "archive_version",
                              "byteorder", "data/constants/model_constants_config.json", "data/sample_inputs/model.pt",
                              "data/weights/model_weights_config.json", "data/weights/weight_0", "models/model.json"])
    module = load_module(program)
    assert isinstance(module, ExportedModule) and module.eval() is module  # no NotImplementedError from the graph
    x = make_images(5, seed=0, size=SIZE)[0]
    torch.testing.assert_close(module(x), ColourTeacher()(x), atol=1e-5, rtol=0)


def test_a_remote_host_needs_allow_remote(program):
    with pytest.raises(SystemExit, match=r"--host 0\.0\.0\.0 is not a loopback address; add --allow-remote"):
        _serve("--module", str(program), "--host", "0.0.0.0")


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(SystemExit, match=rf"lwcam serve: --module {tmp_path / 'nope.pt'}: no such file"):
        _serve("--module", str(tmp_path / "nope.pt"))


def _pickles(tmp_path: Path, marker: Path) -> dict[str, Path]:
    """Pickles of an object whose unpickling creates ``marker``, as ``.pt`` files in three dresses."""
    (tmp_path / "torch_save.pt").write_bytes(_torch_save(Marker(marker)))
    (tmp_path / "pickle_dump.pt").write_bytes(pickle.dumps(Marker(marker)))
    # torch.save's zip, with a code/ folder so that it looks like TorchScript
    dressed = tmp_path / "dressed.pt"
    with zipfile.ZipFile(io.BytesIO(_torch_save(Marker(marker)))) as zin, zipfile.ZipFile(dressed, "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, zin.read(name))
        zout.writestr(f"{zin.namelist()[0].split('/')[0]}/code/__torch__.py", "")
    return {p.stem: p for p in (tmp_path / "torch_save.pt", tmp_path / "pickle_dump.pt", dressed)}


@pytest.mark.parametrize("dress", ["torch_save", "pickle_dump", "dressed"])
def test_a_pickle_is_refused_and_runs_nothing(tmp_path, dress):
    marker = tmp_path / "ran"
    path = _pickles(tmp_path, marker)[dress]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated
        with pytest.raises(SystemExit, match=rf"lwcam serve: --module {path} (is not a TorchScript archive .* pickled "
                                             rf"modules are not loaded|could not be loaded)"):
            _serve("--module", str(path))
        assert not marker.exists()
        with pytest.raises(ModelFileError if dress != "dressed" else RuntimeError):  # the API raises too
            load_module(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"not a zip at all", "half"])
def test_a_corrupt_pt2_is_refused(program, tmp_path, content):
    path = tmp_path / "corrupt.pt2"
    path.write_bytes(program.read_bytes()[: len(program.read_bytes()) // 2] if content == "half" else content)
    with pytest.raises(SystemExit, match=rf"--module {path} is not a torch.export program: not a valid zip archive"):
        _serve("--module", str(path))


def _marker_touch(marker: Path) -> str:
    return f"__import__('pathlib').Path({str(marker)!r}).touch() is None"


def _symbol_to_python(marker: Path) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        text = json.dumps(doc)
        symbol = json.dumps("Symbol('")[:-1]
        at = text.index(symbol)
        end = text.index('"', at + 1)
        expr = json.dumps(f"{_marker_touch(marker)} and {json.loads(text[at:end + 1])}")
        doc.clear()
        doc.update(json.loads(text[:at] + expr + text[end + 1:]))

    return edit


def _pickled_weight(marker: Path) -> Callable[[str, bytes], bytes]:
    def change(name: str, data: bytes) -> bytes:
        if name.endswith("weights_config.json"):
            doc = json.loads(data)
            doc["config"]["templates.weight"]["use_pickle"] = True
            return json.dumps(doc).encode()
        return _torch_save(Marker(marker)) if name.endswith("data/weights/weight_0") else data

    return change


#: Ways to make a .pt2 run code when it is loaded (or, for guards, called), each with what the refusal names.
ATTACKS: dict[str, tuple[Callable[[Path], Callable[[str, bytes], bytes | None]], str]] = {
    "pickled sample inputs": (lambda m: lambda n, d: _torch_save(Marker(m)) if n.endswith("sample_inputs/model.pt")
                              else d, r"sample_inputs/model.pt is not plain tensor data .*GLOBAL io\.open"),
    "pickled weight": (_pickled_weight, r"weights_config.json stores 'templates.weight' as a pickle"),
    "guard code": (lambda m: _edit_json("models/model.json", lambda doc: doc.update(guards_code=[_marker_touch(m)])),
                   r"models/model.json carries guard code .* runs as Python"),
    "python expression": (lambda m: _edit_json("models/model.json", _symbol_to_python(m)),
                          r"models/model.json has the symbolic expression .* evaluated as Python"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_pt2_that_would_run_code_is_refused(program, tmp_path, caplog, attack):
    make, message = ATTACKS[attack]
    marker = tmp_path / "ran"
    evil = _rewrite(program, tmp_path / "evil.pt2", make(marker))
    with pytest.raises(SystemExit, match=rf"lwcam serve: --module {evil}: .*{message}"):
        _serve("--module", str(evil))
    assert not marker.exists()
    # the attack is real: torch.export.load (then a call, for guards) runs the code
    caplog.set_level(logging.CRITICAL, logger="torch._export")  # its warning of the pickle's fallback is malformed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.export.load(evil).module()(torch.zeros(2, 3, SIZE, SIZE))
        except Exception:  # noqa: BLE001 - what fails after the code ran does not matter
            pass
    assert marker.exists()


@pytest.mark.parametrize(("member", "data"), [
    ("data/aotinductor/model/model.so", b"\x7fELF"),  # compiled code, which torch.export.load would dlopen
    ("data/weights/model.pt", _torch_save({})),  # the legacy pickled weights
    ("data/constants/opaque_obj_0", pickle.dumps(1)),
])
def test_a_pt2_member_torch_export_save_does_not_write_is_refused(program, tmp_path, member, data):
    evil = _rewrite(program, tmp_path / "extra.pt2", lambda n, d: d, add={member: data})
    with pytest.raises(SystemExit, match=rf"--module {evil}: the archive holds 'colour/{member}', which "
                                         rf"torch.export.save does not write"):
        _serve("--module", str(evil))


def test_a_pt2_whose_weight_names_would_be_code_is_refused(program, tmp_path):
    def change(name: str, data: bytes) -> bytes:  # torch writes weight names into the module's Python code
        return data.replace(b"templates.weight", b'templates.w\\")\\nx = (\\"') if name.endswith(".json") else data

    evil = _rewrite(program, tmp_path / "names.pt2", change)
    with pytest.raises(SystemExit, match=r"the program names 'templates.w\"\)\\nx = \(\"'; names of weights and "
                                         r"submodules must be made of letters, digits and '_' between dots"):
        _serve("--module", str(evil))


def test_a_program_taking_more_than_images_is_refused(tmp_path):
    class Two(torch.nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x + y

    path = tmp_path / "two.pt2"
    torch.export.save(torch.export.export(Two(), (torch.zeros(2, 2), torch.zeros(2, 2))), path)
    with pytest.raises(SystemExit, match=r"the program takes 2 input\(s\) .* takes one tensor of images"):
        _serve("--module", str(path))


def _run_cli(*argv: str, timeout: float = 90) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "lwcam.study.serve", "serve", *argv], capture_output=True, text=True,
                          timeout=timeout, env=ENV, check=False)
    return done, time.monotonic() - t0


@pytest.mark.slow
def test_the_command_writes_its_refusals_on_stderr_and_exits_non_zero(program, tmp_path):
    done, _ = _run_cli("--module", str(program), "--image-size", str(SIZE), "--host", "0.0.0.0")
    assert done.returncode == 1 and "--host 0.0.0.0 is not a loopback address" in done.stderr
    (tmp_path / "p.pt").write_bytes(_torch_save(Marker(tmp_path / "ran")))
    done, _ = _run_cli("--module", str(tmp_path / "p.pt"), "--image-size", str(SIZE), "--port", str(free_port()))
    assert done.returncode == 1 and "pickled modules are not loaded" in done.stderr.splitlines()[-1]
    assert "Traceback" not in done.stderr and not (tmp_path / "ran").exists()


@pytest.mark.slow
def test_a_port_in_use_fails_at_once_naming_the_port(program):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=rf"cannot bind --port {port} on --host 127\.0\.0\.1: .*in use"):
            _serve_on(program, port)
        done, seconds = _run_cli("--module", str(program), "--image-size", str(SIZE), "--port", str(port))
    assert done.returncode == 1 and f"--port {port}" in done.stderr.splitlines()[-1] and seconds < 60


def _serve_on(program: Path, port: int) -> None:
    main(["serve", "--module", str(program), "--image-size", str(SIZE), "--port", str(port)])


@pytest.mark.slow
def test_a_pt2_program_serves_and_answers_as_eager(program, tmp_path):
    count = tmp_path / "answered"
    with ServerProcess(["--module", str(program), "--image-size", str(SIZE), "--name", "colour", "--threads", "1",
                        "--count-file", str(count)], env=ENV, log=tmp_path / "server.log") as server:
        bb = BlackBox.from_endpoint(server.url, "colour", NUM_CLASSES, image_size=SIZE, max_batch_size=8)
        x = make_images(12, seed=3, size=SIZE)[0]
        with torch.no_grad():
            expected = torch.softmax(ColourTeacher()(x), dim=1)
        torch.testing.assert_close(bb(x), expected, atol=1e-5, rtol=0)
    assert count.read_text().split() == ["8", "4"]  # one line per request answered


def test_the_count_file_gets_a_line_per_answered_request(tmp_path):
    from mlserver.types import InferenceRequest

    from lwcam._serving import SERVED, ServedModel, TorchRuntime

    count = tmp_path / "count"
    served = ServedModel(ColourTeacher(), "counted", image_size=8, count_file=count)
    SERVED["counted"] = served
    runtime = TorchRuntime(served.model_settings())
    asyncio.run(runtime.load())
    for n in (3, 1):
        asyncio.run(runtime.predict(InferenceRequest(inputs=[{"name": "images", "datatype": "FP32",
                                                              "shape": [n, 3, 8, 8], "data": [0.5] * (n * 192)}])))
    assert count.read_text() == "3\n1\n"
    assert ServedModel(ColourTeacher(), "uncounted", image_size=8).count_file is None
