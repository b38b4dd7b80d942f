"""Fast inference for modules the package owns: one function, :func:`accelerate`.

Where no gradient is needed (the black box answering a game or RISE, a student scored on many
masked images), a module's eval-mode forward pass can run on a faster inference engine than
eager PyTorch. :func:`accelerate` exports the module once and returns a :class:`FastForward`, a
callable ``images (B,C,H,W) -> logits (B,classes)`` like the module itself, with no autograd.

Engines (:data:`ENGINES`), fastest first on the default networks at 64 px on 2 CPU cores
(``benchmarks/bench_forward.py``, ``reports/bench_forward.md``):

* ``"onnxruntime"``: the module exported to ONNX (the TorchScript-based exporter, dynamic batch
  axis) and run by ONNX Runtime's CPU provider, with as many intra-op threads as
  ``torch.get_num_threads()`` at each call;
* ``"torchscript"``: the module traced and frozen (``torch.jit.freeze``), fed ``channels_last``;
* ``"eager"``: a frozen copy of the module itself under ``torch.inference_mode()`` (the fallback;
  no speed-up beyond the ``channels_last`` layout).

``engine="auto"`` tries ``onnxruntime`` then ``torchscript`` and takes the first that exports and
passes the check below; if none does, it warns and falls back to ``eager``. A module on a GPU
always runs ``eager`` (the engines here are CPU engines).

Every set-up ends with a check: on a seeded probe batch (and on its first image alone, which
exercises the dynamic batch axis), the engine's softmax probabilities must equal the eager
module's within ``atol`` (default ``1e-5``), or :class:`AccelerationError` is raised. The
measured difference is kept in :attr:`FastForward.max_prob_diff`, and the set-up's wall time
(export, session, check) in :attr:`FastForward.setup_seconds`, so that a pipeline can count it.

What a :class:`FastForward` is and is not:

* It computes the module's **eval-mode** function with the weights it had at set-up: later changes
  to the module are not seen (:attr:`FastForward.weights_fingerprint` names those weights; a
  :class:`~lwcam.blackbox.BlackBox` keys its answer cache with it, exactly as it does for the module).
  A module in training mode is exported in eval mode and given back its train/eval flags.
* Inputs are float tensors of the shape given at set-up (any batch size from 1), on any device;
  outputs are float32 CPU logits. Non-finite pixels are not rejected: they give what the eager
  module gives (non-finite logits), and a BlackBox rejects such images before they reach it.
* It pickles: the exported model travels as bytes and the engine is rebuilt on unpickling.
* ONNX export and TorchScript trace the forward pass once: a module whose computation branches on
  its input's values is recorded along one branch, which the probe check may not catch. Such a
  module runs with ``engine="eager"``; the networks of :mod:`lwcam.models` have no such branch.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
    ...                     nn.Flatten(), nn.Linear(4, 3))
    >>> fast = accelerate(net, (3, 16, 16))
    >>> fast.engine in ENGINES, fast(torch.rand(5, 3, 16, 16)).shape, fast.max_prob_diff <= 1e-5
    (True, torch.Size([5, 3]), True)
"""

from __future__ import annotations

import copy
import importlib.util
import io
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Literal, cast

import torch
from torch import nn

from ._checks import check_bool, check_positive_int, check_real
from ._utils import eval_mode, is_cpu_convnet
from .blackbox import module_fingerprint

__all__ = ["ENGINES", "AUTO_ORDER", "AccelerationError", "FastForward", "accelerate", "onnxruntime_available"]

Engine = Literal["onnxruntime", "torchscript", "eager"]

#: The engines :func:`accelerate` knows.
ENGINES: tuple[Engine, ...] = ("onnxruntime", "torchscript", "eager")
#: The engines ``engine="auto"`` tries, in this order (fastest first in ``benchmarks/bench_forward.py``).
AUTO_ORDER: tuple[Engine, ...] = ("onnxruntime", "torchscript")
#: ONNX opset of the export (ONNX Runtime 1.17 and later run it).
OPSET = 17


class AccelerationError(RuntimeError):
    """An engine could not export the module, or its outputs differ from the eager module's."""


def onnxruntime_available() -> bool:
    """Whether ONNX Runtime and the ONNX exporter's ``onnx`` package can be imported.

    Example:
        >>> isinstance(onnxruntime_available(), bool)
        True
    """
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


# ----------------------------------------------------------------------------- engines
def _export_onnx(module: nn.Module, example: torch.Tensor) -> bytes:
    """The eval-mode module as ONNX bytes, batch axis dynamic (TorchScript-based exporter: it runs offline
    and needs no ``onnxscript``)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice and tracer warnings
        torch.onnx.export(module, (example,), cast(Any, buf), dynamo=False, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=OPSET)
    return buf.getvalue()


def _export_torchscript(module: nn.Module, example: torch.Tensor) -> bytes:
    """The eval-mode module traced, frozen and saved (``torch.jit.save``) as bytes."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings
        frozen = torch.jit.freeze(torch.jit.trace(module, example, check_trace=False))
        torch.jit.save(frozen, buf)
    return buf.getvalue()


class _OnnxRunner:
    """An ONNX Runtime CPU session whose intra-op thread count follows ``torch.get_num_threads()``."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.threads = 0
        self.session: Any = None

    def _session(self) -> Any:
        threads = torch.get_num_threads()
        if self.session is None or threads != self.threads:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # idle threads sleep instead of spinning: the CPU stays free for the work between calls
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.session = ort.InferenceSession(self.payload, opts, providers=["CPUExecutionProvider"])
            self.threads = threads
        return self.session

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float32).contiguous()
        out = self._session().run(["logits"], {"images": x.numpy()})[0]
        return torch.from_numpy(out)


class _TorchScriptRunner:
    """A frozen TorchScript module, fed ``channels_last`` images under ``torch.inference_mode()``."""

    def __init__(self, payload: bytes) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            self.module = torch.jit.load(io.BytesIO(payload), map_location="cpu")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = x.detach().to("cpu", torch.float32).contiguous(memory_format=torch.channels_last)
            return self.module(x).float()


class _EagerRunner:
    """The module itself (a frozen copy) under ``torch.inference_mode()``; ``channels_last`` for a CPU convnet."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        first = next(module.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.channels_last = is_cpu_convnet(module)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = x.detach().to(self.device, torch.float32)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.module(x).float().cpu()


def _runner(engine: Engine, payload: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    if engine == "onnxruntime":
        return _OnnxRunner(payload)
    if engine == "torchscript":
        return _TorchScriptRunner(payload)
    return _EagerRunner(payload)


# ----------------------------------------------------------------------------- the callable
class FastForward:
    """A module's eval-mode forward pass on an inference engine: ``images -> logits``, no gradient.

    Made by :func:`accelerate`; see the module docstring for what it computes.

    Attributes:
        engine: the engine it runs on (one of :data:`ENGINES`).
        image_shape: ``(C,H,W)`` of the images it takes.
        num_classes: the width of its logits.
        weights_fingerprint: :func:`~lwcam.blackbox.module_fingerprint` of the module at set-up.
        setup_seconds: wall time of the set-up (export, engine start, check); 0.0 when ``reused``.
        reused: whether :func:`accelerate` handed back an earlier set-up (``reuse=True``).
        max_prob_diff: the largest absolute difference in softmax probability to the eager module
            on the probe batch.
    """

    def __init__(self, engine: Engine, payload: Any, *, image_shape: tuple[int, int, int], num_classes: int,
                 weights_fingerprint: str, setup_seconds: float = 0.0, max_prob_diff: float = 0.0) -> None:
        self.engine: Engine = engine
        self.image_shape = image_shape
        self.num_classes = num_classes
        self.weights_fingerprint = weights_fingerprint
        self.setup_seconds = setup_seconds
        self.max_prob_diff = max_prob_diff
        self.reused = False
        self._payload = payload
        self._run = _runner(engine, payload)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` (float32, CPU) of a batch ``(B, *image_shape)`` of float images."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor of shape (B,{','.join(map(str, self.image_shape))}), "
                            f"got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor, got dtype {images.dtype}")
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape or images.shape[0] == 0:
            raise ValueError(f"images must have shape (B,{','.join(map(str, self.image_shape))}) with B >= 1 "
                             f"(the shape given at set-up), got {tuple(images.shape)}")
        return self._run(images)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_run"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._run = _runner(self.engine, self._payload)

    def __repr__(self) -> str:
        return (f"FastForward(engine={self.engine!r}, image_shape={self.image_shape}, num_classes={self.num_classes}, "
                f"setup_seconds={self.setup_seconds:.2f}, max_prob_diff={self.max_prob_diff:.2g})")


# ----------------------------------------------------------------------------- set-up
#: Set-ups made with ``reuse=True``: module -> {(fingerprint, image shape, engine, atol): FastForward}.
_MADE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], FastForward]] = weakref.WeakKeyDictionary()


def _earlier(module: nn.Module, key: tuple[Any, ...]) -> FastForward | None:
    """A copy of the set-up made for ``module`` under ``key``, marked reused (no set-up time), if any."""
    made = _MADE.get(module, {}).get(key)
    if made is None:
        return None
    again = copy.copy(made)  # shares the engine, which is safe to call from several places
    again.setup_seconds, again.reused = 0.0, True
    return again


def _check_arguments(module: Any, image_shape: Any, engine: Any, atol: Any, probe: Any) -> tuple[int, int, int]:
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if (not isinstance(image_shape, Sequence) or len(image_shape) != 3
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in image_shape)):
        raise ValueError(f"image_shape must be three positive ints (C,H,W), got {image_shape!r}")
    if engine not in ("auto", *ENGINES):
        raise ValueError(f"engine must be 'auto' or one of {list(ENGINES)}, got {engine!r}")
    check_real(atol, "atol", 0.0, 1.0, low_open=True)
    shape = (int(image_shape[0]), int(image_shape[1]), int(image_shape[2]))
    if probe is not None and (not isinstance(probe, torch.Tensor) or not probe.is_floating_point()
                              or probe.dim() != 4 or tuple(probe.shape[1:]) != shape or probe.shape[0] < 1
                              or not torch.isfinite(probe).all()):
        raise ValueError(f"probe must be a finite float tensor of shape (B,{','.join(map(str, shape))}) with "
                         f"B >= 1, got {probe if not isinstance(probe, torch.Tensor) else tuple(probe.shape)}")
    return shape


def _reference(module: nn.Module, probe: torch.Tensor) -> torch.Tensor:
    """The eager module's logits on the probe batch (checked to be one (B,C) tensor)."""
    with torch.inference_mode():
        out = module(probe)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != probe.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise AccelerationError(f"module must return one (B, classes) logit tensor in eval mode, got {shape}")
    return out.float().cpu()


def _prob_diff(run: Callable[[torch.Tensor], torch.Tensor], probe: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest |softmax difference| to ``reference`` on the probe batch and on its first image alone."""
    diff = 0.0
    for x, ref in ((probe, reference), (probe[:1], reference[:1])):
        out = run(x)
        if tuple(out.shape) != tuple(ref.shape):
            raise AccelerationError(f"the engine returned shape {tuple(out.shape)}, the module {tuple(ref.shape)}")
        gap = (torch.softmax(out.float(), 1) - torch.softmax(ref, 1)).abs().max()
        diff = max(diff, float(gap) if torch.isfinite(gap) else float("inf"))
    return diff


def _build(engine: Engine, frozen: nn.Module, probe: torch.Tensor, reference: torch.Tensor,
           atol: float) -> tuple[Any, float]:
    """Export ``frozen`` for ``engine``; return the payload and the checked probability difference."""
    try:
        if engine == "onnxruntime":
            if not onnxruntime_available():
                raise AccelerationError("onnxruntime (and onnx) are not installed: pip install onnxruntime onnx")
            payload: Any = _export_onnx(frozen, probe[:2])
        elif engine == "torchscript":
            payload = _export_torchscript(frozen, probe[:2])
        else:
            payload = frozen
        diff = _prob_diff(_runner(engine, payload), probe, reference)
    except Exception as err:
        what = str(err) if isinstance(err, AccelerationError) else f"{type(err).__name__}: {err}"
        raise AccelerationError(f"engine {engine!r} cannot run this module: {what}") from err
    if not diff <= atol:
        raise AccelerationError(f"engine {engine!r} differs from the eager module by {diff:.3g} in probability on "
                                f"the probe batch, more than atol={atol:g}")
    return payload, diff


def _choose(engine: str, frozen: nn.Module, probe: torch.Tensor, reference: torch.Tensor,
            atol: float) -> tuple[Engine, Any, float]:
    """The first engine that exports and passes the check: ``engine`` itself, or for ``"auto"`` the
    engines of :data:`AUTO_ORDER`, then ``eager`` (with a warning naming why the others failed)."""
    first = next(frozen.parameters(), None)
    on_cpu = first is None or first.device.type == "cpu"
    if engine != "auto":
        named = cast(Engine, engine)
        if named != "eager" and not on_cpu:
            raise AccelerationError(f"engine {engine!r} runs on CPU, but the module is on "
                                    f"{probe.device}; use engine='auto' or 'eager'")
        payload, diff = _build(named, frozen, probe, reference, atol)
        return named, payload, diff
    failures = []
    for candidate in AUTO_ORDER if on_cpu else ():
        try:
            payload, diff = _build(candidate, frozen, probe, reference, atol)
            return candidate, payload, diff
        except AccelerationError as err:
            failures.append(str(err))
    if failures:
        warnings.warn("no faster engine passed; the module runs eagerly: " + "; ".join(failures), RuntimeWarning,
                      stacklevel=3)
    payload, diff = _build("eager", frozen, probe, reference, atol)
    return "eager", payload, diff


def accelerate(module: nn.Module, image_shape: Sequence[int], *, engine: str = "auto", atol: float = 1e-5,
               probe: torch.Tensor | None = None, probe_batch: int = 8, seed: int = 0,
               reuse: bool = False) -> FastForward:
    """Export ``module``'s eval-mode forward pass to a faster inference engine; return it as a callable.

    Args:
        module: a module returning ``(B, classes)`` logits (the black box, a student). It is not
            changed: its train/eval flags are restored, and the engine works on a copy of its weights.
        image_shape: ``(C,H,W)`` of the images it will be given.
        engine: ``"auto"`` (the first of :data:`AUTO_ORDER` that works, else ``"eager"`` with a
            warning) or one of :data:`ENGINES` (raise if it cannot run the module).
        atol: the largest softmax-probability difference to the eager module allowed on the probe batch.
        probe: images to check the engine on (default ``probe_batch`` standard-normal images drawn
            with ``seed``).
        probe_batch: the size of the default probe batch.
        seed: seed of the default probe batch.
        reuse: hand back the set-up made earlier in this process with ``reuse=True`` for the same
            module object with the same weights, ``image_shape``, ``engine`` and ``atol`` (default probe
            only), marked ``reused`` with ``setup_seconds=0.0``: its set-up is paid, and counted, once.

    Returns:
        A :class:`FastForward`: ``images -> logits`` with ``engine``, ``setup_seconds``,
        ``max_prob_diff`` and ``weights_fingerprint``.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: a bad ``image_shape``, ``engine``, ``atol``, ``probe`` or ``probe_batch``.
        AccelerationError: the module does not return one logit tensor, or (for a named engine) the
            engine cannot export it or its outputs differ from eager's by more than ``atol``.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 4)).train()
        >>> fast = accelerate(net, (3, 8, 8), engine="eager")
        >>> fast.engine, net.training, torch.allclose(fast(torch.ones(2, 3, 8, 8)), net.eval()(torch.ones(2, 3, 8, 8)))
        ('eager', True, True)
    """
    t0 = time.perf_counter()
    shape = _check_arguments(module, image_shape, engine, atol, probe)
    check_positive_int(probe_batch, "probe_batch")
    check_bool(reuse, "reuse")
    with eval_mode(module):
        fingerprint = module_fingerprint(module)
        key = (fingerprint, shape, engine, float(atol), probe_batch, seed) if reuse and probe is None else None
        if key is not None and (earlier := _earlier(module, key)) is not None:
            return earlier
        frozen = copy.deepcopy(module).eval()
    if probe is None:
        probe = torch.randn((probe_batch, *shape), generator=torch.Generator().manual_seed(seed))
    first = next(frozen.parameters(), None)
    probe = probe.detach().to(first.device if first is not None else "cpu", torch.float32)
    for p in frozen.parameters():
        p.requires_grad_(False)
    reference = _reference(frozen, probe)
    chosen, payload, diff = _choose(engine, frozen, probe, reference, float(atol))
    fast = FastForward(chosen, payload, image_shape=shape, num_classes=int(reference.shape[1]),
                       weights_fingerprint=fingerprint, setup_seconds=time.perf_counter() - t0, max_prob_diff=diff)
    if key is not None:
        _MADE.setdefault(module, {})[key] = fast
    return fast
