"""onnxruntime sessions on the right execution provider.

``auto`` uses the CUDA EP only when a session really runs on it: onnxruntime-gpu lists the provider even
on machines without a GPU or without the CUDA 13 / cuDNN 9 libraries, and then logs a loud error and
silently falls back to CPU. So we look for a GPU first, probe with a tiny session while the logger is
quiet, and check ``session.get_providers()``. ``cuda`` is strict: it fails instead of falling back.
TF32 is off on CUDA so that a comparison measures the model, not TF32 rounding. Our sessions log nothing
(severity 4): onnxruntime's multi-line errors would reach stderr before the one-line error that says the
same; the probe takes its reason from what onnxruntime prints on stdout, which is not its log. `summarize`
turns onnxruntime's exceptions into that one line.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import glob
import io
import re
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from lrdeploy.errors import DeviceUnavailable, RuntimeFailure, UsageError
from lrdeploy.spelling import either, option

__all__ = [
    "Device",
    "make_session",
    "probe_provider",
    "release_memory",
    "require_onnxruntime",
    "select_device",
    "summarize",
]

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
#: onnxruntime's FATAL only: what it would log as an error reaches the user as our one-line message.
QUIET = 4


def require_onnxruntime() -> ModuleType:
    try:
        import onnxruntime
    except ImportError:
        raise UsageError(
            "onnxruntime is not installed: pip install 'lrdeploy[cpu]' (or 'lrdeploy[gpu]' for CUDA), "
            f"or pass {either('--no-verify', 'verify=False')}"
        ) from None
    return onnxruntime


@dataclass(frozen=True)
class Device:
    """The providers a session is created with; ``note`` says why it is not what was asked for."""

    name: str  # "cpu", "cuda" or "tensorrt"
    providers: tuple = field(default=((CPU, {}),))
    note: str | None = None

    @property
    def provider(self) -> str:
        return self.providers[0][0]


def _gpu_present() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*")) or shutil.which("nvidia-smi") is not None


@contextlib.contextmanager
def _quiet_logger(ort: ModuleType):
    ort.set_default_logger_severity(4)
    try:
        yield
    finally:
        ort.set_default_logger_severity(2)


def _probe_model() -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model.SerializeToString()


def _fallback_reason(printed: str) -> str:
    """The gist of onnxruntime's printed 'EP Error ...' line, without its C++ source location."""
    line = next((text for text in printed.splitlines() if text.startswith("EP Error")), "")
    text = line.removeprefix("EP Error").split(" when using")[0].strip(" :")
    if "Please install" in text:
        text = text[text.index("Please install") :]
    return text.split(", make sure")[0].split(". ")[0][:200]


#: sys.stdout is one per process: sessions that may print a fallback are created one at a time.
_STDOUT_LOCK = threading.Lock()


def _create_session(ort: ModuleType, source, options, providers: list):
    """(session, why a provider fell back): onnxruntime prints that on stdout; we make it our reason.

    Only a session that can fall back (a provider other than the CPU's) prints, so only that one swaps
    stdout, under a lock: callers creating sessions from several threads keep their own stdout.
    """
    if all(_provider_name(p) == CPU for p in providers):
        return ort.InferenceSession(source, options, providers=providers), ""
    printed = io.StringIO()
    with _STDOUT_LOCK, contextlib.redirect_stdout(printed):
        session = ort.InferenceSession(source, options, providers=providers)
    return session, _fallback_reason(printed.getvalue())


def _provider_name(provider) -> str:
    return provider[0] if isinstance(provider, tuple) else provider


@functools.cache
def probe_provider(provider: str) -> str | None:
    """None when a session really runs on ``provider``, else why not."""
    ort = require_onnxruntime()
    if provider not in ort.get_available_providers():
        return f"this onnxruntime has no {provider} (install lrdeploy[gpu], i.e. onnxruntime-gpu)"
    if not _gpu_present():
        return "no NVIDIA GPU found"
    with contextlib.suppress(Exception):
        ort.preload_dlls()  # finds CUDA/cuDNN from the nvidia-* pip packages when they are installed
    options = _session_options(ort)
    try:
        with _quiet_logger(ort):
            session, fallback = _create_session(ort, _probe_model(), options, [provider, CPU])
    except Exception as error:
        return f"{provider} failed to start ({str(error).splitlines()[0][:160]})"
    if session.get_providers()[0] != provider:
        libraries = "TensorRT" if provider == TENSORRT else "CUDA 13 / cuDNN 9"
        why = fallback or f"{libraries} libraries not found or GPU unusable"
        return f"{provider} did not initialize ({why})"
    return None


def _cuda_options(tf32: bool, cuda_graph: bool, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    options = {"use_tf32": "1" if tf32 else "0", **(extra or {})}
    if cuda_graph:
        options["enable_cuda_graph"] = "1"
    return options


def select_device(
    device: str = "auto",
    *,
    tf32: bool = False,
    cuda_graph: bool = False,
    cuda_options: Mapping[str, str] | None = None,
) -> Device:
    """Resolve ``auto``/``cpu``/``cuda``/``tensorrt`` to providers that actually run here.

    TF32 is off unless asked for (verification compares float32 math); ``cuda_graph`` replays the whole
    run as one CUDA graph (needs fixed input/output buffers, see `lrdeploy.runtime.bench`);
    ``cuda_options`` are more CUDA EP options (``prefer_nhwc``, ``cudnn_conv_algo_search``, ...).
    """
    require_onnxruntime()
    if device == "cpu":
        return Device("cpu")
    if device not in ("auto", "cuda", "tensorrt"):
        raise UsageError(f"{option('device')} must be auto, cpu, cuda or tensorrt, got '{device}'")
    if device == "tensorrt":
        reason = probe_provider(TENSORRT)
        if reason:
            raise DeviceUnavailable(f"{option('device', 'tensorrt')}: {reason}")
        cuda = _cuda_options(tf32, False, cuda_options)
        return Device("tensorrt", ((TENSORRT, {}), (CUDA, cuda), (CPU, {})))
    reason = probe_provider(CUDA)
    if reason is None:
        return Device("cuda", ((CUDA, _cuda_options(tf32, cuda_graph, cuda_options)), (CPU, {})))
    if device == "cuda":
        use = f"{option('device', 'cpu')} or {option('device', 'auto')}"
        raise DeviceUnavailable(f"{option('device', 'cuda')}: {reason}; use {use}")
    quiet = reason.startswith("this onnxruntime has no") or reason == "no NVIDIA GPU found"
    return Device("cpu", note=None if quiet else f"CUDA EP unavailable ({reason}); running on CPU")


_STATUS = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_NODE = re.compile(  # the node that failed at run time
    r"Non-zero status code returned while running (\w+) node\. Name:'([^']*)' Status Message: ?"
)
_SOURCE = re.compile(r"\S+\.(?:h|cc|cpp|cu):\d+ (?:\S+\(.*?\)(?: const)? )?")


def summarize(error: BaseException, limit: int = 300) -> str:
    """onnxruntime's error as one line: its status prefix and C++ source locations dropped, the failing
    node named (``Reshape node 'rs': the input tensor cannot be reshaped ...``)."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    line = _STATUS.sub("", text.splitlines()[0])
    line = _NODE.sub(lambda m: f"{m.group(1)} node '{m.group(2)}': ", line)
    return _SOURCE.sub("", line).strip()[:limit]


def _session_options(ort: ModuleType):
    options = ort.SessionOptions()
    options.log_severity_level = QUIET
    options.logid = "lrdeploy"
    return options


def make_session(
    model: bytes | str | Path,
    device: Device,
    threads: int | None = None,
    *,
    spinning: bool = True,
    label: str = "the model",
):
    """An InferenceSession on ``device``; failures become a one-line RuntimeFailure.

    ``spinning=False`` stops idle CPU worker threads from busy-waiting after a run (see `bench`).
    """
    ort = require_onnxruntime()
    options = _session_options(ort)
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = str(model) if isinstance(model, Path) else model
    try:
        session, fallback = _create_session(ort, source, options, list(device.providers))
    except Exception as error:
        raise RuntimeFailure(f"onnxruntime could not load {label}: {summarize(error)}") from None
    if session.get_providers()[0] != device.provider:
        why = f" ({fallback})" if fallback else ""
        raise DeviceUnavailable(
            f"{device.provider} did not start for this model{why}; ran on {session.get_providers()[0]}"
        )
    return session


def release_memory() -> None:
    """Give freed memory back to the system before a large model is loaded.

    A dropped session or a finished compression frees its arrays, but glibc keeps freed blocks below its
    mmap threshold in its heaps (one per thread that allocated); ``malloc_trim(0)`` returns them, so that
    the next model does not stack on top (after compressing a 0.5 GiB stack: 499 → 232 MiB anonymous).
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
