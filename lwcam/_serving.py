"""The MLServer side of ``lwcam serve``: a runtime that answers Open Inference Protocol requests with a torch module.

Kept apart from :mod:`lwcam.study.serve` so that the command can parse its arguments, and say what is
missing, without the ``serve`` extra (``pip install lwcam[serve]``) installed.

Example:
    >>> import torch
    >>> served = ServedModel(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)), "m", image_size=2)
    >>> served.num_classes, served.model_settings().inputs[0].shape
    (3, [-1, 3, 2, 2])
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from mlserver import MLModel, MLServer
from mlserver.errors import MLServerError
from mlserver.settings import ModelParameters, ModelSettings, Settings
from mlserver.types import InferenceRequest, InferenceResponse, MetadataTensor, ResponseOutput
from torch import nn

from .blackbox import module_fingerprint

__all__ = ["ServedModel", "TorchRuntime", "run_server"]

#: The models this process serves, by name (MLServer builds :class:`TorchRuntime` from a name and settings only).
SERVED: dict[str, ServedModel] = {}


@dataclass
class ServedModel:
    """A torch module served under ``name`` for (B,3,image_size,image_size) FP32 images.

    ``returns`` is what it answers: ``"probs"`` (softmax of the module's logits) or ``"logits"``;
    the output tensor carries that name. ``version`` defaults to the module's weight fingerprint.
    With ``any_size`` the input is declared ``[-1, 3, -1, -1]`` and images of any size are taken
    (``image_size`` is then only the size the module is probed at). With ``count_file``, every
    answered request appends its number of images to that file (a line each, flushed and synced
    to disk before the answer is sent), so that a killed server's answers can still be counted.
    """

    module: nn.Module
    name: str
    image_size: int
    returns: Literal["probs", "logits"] = "probs"
    max_batch_size: int = 1024
    any_size: bool = False
    version: str = ""
    count_file: str | os.PathLike | None = None
    num_classes: int = field(init=False)

    def __post_init__(self) -> None:
        self.module.eval()
        with torch.no_grad():
            probe = self.module(torch.zeros(1, 3, self.image_size, self.image_size))
        if probe.dim() != 2 or probe.shape[1] < 2:
            raise ValueError(f"the module answers shape {tuple(probe.shape)} for one {self.image_size}-px image; a "
                             f"classifier answers (1, C) with C >= 2")
        self.num_classes = int(probe.shape[1])
        self.version = self.version or module_fingerprint(self.module)

    def model_settings(self) -> ModelSettings:
        """MLServer's settings: the metadata (name, version, input and output tensors) and the runtime."""
        return ModelSettings(
            name=self.name, implementation=TorchRuntime, platform=f"pytorch-{torch.__version__}",
            versions=[self.version], parameters=ModelParameters(version=self.version),
            inputs=[MetadataTensor(name="images", datatype="FP32", shape=[-1, 3, *self.side_dims])],
            outputs=[MetadataTensor(name=self.returns, datatype="FP32", shape=[-1, self.num_classes])],
        )

    @property
    def side_dims(self) -> list[int]:
        """The declared height and width: ``[-1, -1]`` with ``any_size``."""
        return [-1, -1] if self.any_size else [self.image_size, self.image_size]

    def answer(self, images: np.ndarray) -> np.ndarray:
        """The (B, C) float32 scores of a (B,3,S,S) batch."""
        with torch.no_grad():
            out = self.module(torch.from_numpy(images))
            if self.returns == "probs":
                out = torch.softmax(out, dim=1)
        return out.to(torch.float32).numpy()

    def count(self, images: int) -> None:
        """Append ``images`` to :attr:`count_file`, synced to disk (nothing without a count file)."""
        if self.count_file is None:
            return
        fd = os.open(self.count_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{images}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)


class TorchRuntime(MLModel):
    """MLServer runtime of a :class:`ServedModel` of this process: decodes the images, runs them, encodes scores."""

    async def load(self) -> bool:
        self.served = SERVED[self.name]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        images = self._images(payload)
        scores = self.served.answer(images)
        self.served.count(len(images))
        out = ResponseOutput(name=self.served.returns, shape=list(scores.shape), datatype="FP32",
                             data=scores.reshape(-1).tolist())
        return InferenceResponse(model_name=self.name, model_version=self.served.version, outputs=[out])

    def _images(self, payload: InferenceRequest) -> np.ndarray:
        s = self.served
        given = [(i.name, str(getattr(i.datatype, "value", i.datatype))) for i in payload.inputs]
        if len(given) != 1 or given[0][1] != "FP32":
            raise MLServerError(f"model {s.name!r} takes one FP32 input, 'images', got {given}")
        inp = payload.inputs[0]
        shape = list(inp.shape)
        sides_ok = len(shape) == 4 and (shape[2:] == s.side_dims or (s.any_size and min(shape[2:]) >= 1))
        if not sides_ok or shape[1] != 3 or shape[0] < 1:
            raise MLServerError(f"model {s.name!r} takes images of shape {[-1, 3, *s.side_dims]}, got {shape}")
        if shape[0] > s.max_batch_size:
            raise MLServerError(f"model {s.name!r} takes at most {s.max_batch_size} images a request, got {shape[0]}",
                                status_code=413)
        data = np.asarray(getattr(inp.data, "root", inp.data), dtype=np.float32)
        if data.size != int(np.prod(shape)):
            raise MLServerError(f"model {s.name!r}: {data.size} values for shape {shape}")
        return data.reshape(shape)


class _RestServer(MLServer):
    """MLServer with its REST server only (no gRPC, no metrics), which opens its port once every model has loaded,
    so that a client never meets a started server that does not know its model yet."""

    def _add_signal_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            super()._add_signal_handlers()

    async def start(self, models_settings: list[ModelSettings] | None = None) -> None:
        for settings in models_settings or []:
            await self._model_registry.load(settings)
        await self._rest_server.start()

    async def stop(self, sig: int | None = None) -> None:
        await self._rest_server.stop(sig)


def run_server(served: ServedModel, host: str, port: int) -> None:
    """Serve ``served`` on ``host:port`` until SIGINT or SIGTERM."""
    SERVED[served.name] = served
    settings = Settings(host=host, http_port=port, metrics_endpoint=None, parallel_workers=0, debug=False,
                        load_models_at_startup=False)

    async def main() -> None:
        await _RestServer(settings).start([served.model_settings()])

    asyncio.run(main())
