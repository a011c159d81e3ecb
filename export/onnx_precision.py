"""Reduced-precision variants of an exported fp32 ONNX graph.

* ``fp16`` — onnxruntime's float16 converter (``onnxruntime.transformers.float16``): float
  initializers, constants and intermediate tensors become float16, the graph's inputs and outputs
  stay float32 (``keep_io_types``, a Cast at each end), ops without float16 support in onnxruntime
  (its default block list) stay float32 behind Casts. The runtime and the contracts see the same
  float32 I/O at every precision.
* ``bf16`` — weight storage: every float initializer is stored as bfloat16 and upcast by a Cast
  node in front of its consumers, so the graph computes in float32. onnxruntime has almost no
  bfloat16 kernels on the CPU; a TensorRT build of the graph may still pick bf16 kernels (its
  BF16 builder flag). The file is half the size and the weights are exactly the bf16 ones.

``convert_artifact`` writes the variant next to an fp32 ``OnnxArtifact`` and returns its artifact
(with an exporter sidecar, ``exporter`` naming the conversion); the file passes the same checks.
"""

from __future__ import annotations

import dataclasses
import json
import time
from importlib import metadata
from pathlib import Path

from vist3a_rt.errors import Vist3AInputError

from .onnx_export import EXTERNAL_DATA_THRESHOLD, ExportError, OnnxArtifact, _write_sidecar, check_onnx_file

CONVERSIONS = {"fp16": "onnxruntime.transformers.float16(keep_io_types)", "bf16": "bf16-initializers+cast"}
CONVERSION_FORMAT = 1


def conversion_key(fp32_key: str, precision: str) -> str:
    """The content address of a converted graph: its fp32 source, the conversion and its tool."""
    import hashlib

    recipe = {"format": CONVERSION_FORMAT, "from": fp32_key, "precision": precision,
              "conversion": CONVERSIONS[precision], "onnxruntime": _version("onnxruntime"),
              "onnx": _version("onnx")}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def convert_artifact(source: OnnxArtifact, out_dir: str | Path, precision: str) -> OnnxArtifact:
    """``source`` (an fp32 artifact) converted to ``precision``, saved and checked in ``out_dir``."""
    import onnx

    if precision not in CONVERSIONS:
        raise Vist3AInputError(f"no ONNX conversion to {precision!r}; choose one of {sorted(CONVERSIONS)}")
    if source.precision != "fp32":
        raise Vist3AInputError(f"{source.path.name}: conversions start from an fp32 graph, not {source.precision}")
    start = time.perf_counter()
    model = onnx.load(str(source.path), load_external_data=True)
    model = to_float16(model) if precision == "fp16" else to_bfloat16_storage(model)
    key = conversion_key(source.key, precision)
    path = Path(out_dir) / f"{source.stage}.{precision}.{key[:16]}.onnx"
    data_file = _save(model, path)
    check_onnx_file(path)
    artifact = dataclasses.replace(
        source, path=path, key=key, precision=precision, exporter=f"{source.exporter}+{CONVERSIONS[precision]}",
        export_seconds=source.export_seconds + time.perf_counter() - start,
        external_data=path.with_name(data_file) if data_file else None, skipped=False)
    _write_sidecar(artifact)
    return artifact


def to_float16(model):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(model, keep_io_types=True)
    sort_nodes(model.graph)  # the converter appends the input Casts after their consumers
    return model


def sort_nodes(graph) -> None:
    """Put ``graph``'s nodes in a topological order (stable: ready nodes keep their relative order)."""
    available = {value.name for value in graph.input} | {init.name for init in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [node for node in pending if all(name in available for name in node.input)]
        if not ready:
            missing = sorted({n for node in pending for n in node.input} - available)[:3]
            raise ExportError(f"the converted graph has a cycle or dangling inputs (e.g. {missing})")
        for node in ready:
            available.update(node.output)
        ready_ids = {id(node) for node in ready}
        ordered += ready
        pending = [node for node in pending if id(node) not in ready_ids]
    del graph.node[:]
    graph.node.extend(ordered)


def to_bfloat16_storage(model):
    """Float32 initializers stored as bfloat16, each upcast by a Cast node named after it."""
    import numpy as np
    import onnx
    import torch
    from onnx import helper, numpy_helper

    graph = model.graph
    kept, casts = [], []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            kept.append(init)
            continue
        values = torch.from_numpy(np.array(numpy_helper.to_array(init), copy=True))
        stored = onnx.TensorProto(name=f"{init.name}__bf16", data_type=onnx.TensorProto.BFLOAT16,
                                  dims=list(init.dims))
        stored.raw_data = values.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
        kept.append(stored)
        casts.append(helper.make_node("Cast", [stored.name], [init.name], name=f"{init.name}__upcast",
                                      to=onnx.TensorProto.FLOAT))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def _save(model, path: Path) -> str | None:
    """Save; weights go to ``<name>.data`` when the graph would pass protobuf's 2 GiB limit."""
    import onnx

    if model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path))
        return None
    data_file = f"{path.name}.data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_file, size_threshold=256)
    return data_file


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"
