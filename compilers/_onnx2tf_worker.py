"""Runs onnx2tf in its own process: TensorFlow's import, logging and memory stay out of the compiler process,
and an interrupted conversion dies with its process. Invoked by compilers/tflite.py as
`python -m edgekit.compilers._onnx2tf_worker JOB.json`.

onnx2tf writes the float32 and float16 models. int8 is quantized here, from the Keras model onnx2tf returns, through
a concrete function that keeps the ONNX input and output order: onnx2tf's own int8 path converts its SavedModel,
whose signature sorts inputs and outputs by name (outputs `zeta, alpha` came out as `alpha, zeta`, and two inputs of
one shape were silently swapped), and it calibrates four variants where a build uses one.

Mixed precision: the Keras layers each ONNX node became are recorded while onnx2tf converts it, and the quantizer is
told to leave the TFLite ops built from those layers in float.
"""

import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np

# onnx2tf fetches this calibration sample from the internet unless a file of this name is in the working directory;
# edgekit always passes the user's data, so a placeholder keeps it offline.
ONNX2TF_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    workdir = Path(job["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    np.save(ONNX2TF_SAMPLE, np.zeros((20, 128, 128, 3), np.float32))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import onnx2tf

    int8 = job["int8"]
    layers = record_layers_per_node(job["model"]) if int8 and int8["keep_float"] else {}
    model = onnx2tf.convert(
        input_onnx_file_path=job["model"],
        output_folder_path=job["output"],
        # Inputs keep their ONNX shape, so the bundle's interface does not depend on the backend.
        keep_ncw_or_nchw_or_ncdhw_input_names=job["keep_shape_inputs"] or None,
        not_use_onnxsim=True,
        non_verbose=True,
    )
    output = Path(job["output"])
    if int8:
        feeds = [np.load(path) for path in int8["calibration"]]
        float_nodes = {name: layers.get(name, set()) for name in int8["keep_float"]}
        quantized = quantize(model, feeds, int8["integer_io"], float_nodes, int8["output_producers"])
        (output / int8["file"]).write_bytes(integer_arg_max(quantized))
    write_weight_bytes(output)


def record_layers_per_node(model_path: str) -> dict[str, set[str]]:
    """{ONNX node name: names of the Keras layers onnx2tf built for it}, filled in while onnx2tf converts. Each op
    module's make_node is wrapped: the layers between the node's output tensors and the tensors that existed before
    it ran are the node's own."""
    import onnx

    layers: dict[str, set[str]] = {}
    for op_type in {node.op_type for node in onnx.load(model_path, load_external_data=False).graph.node}:
        try:
            module = importlib.import_module(f"onnx2tf.ops.{op_type}")
        except ModuleNotFoundError:
            continue  # onnx2tf reports the missing op itself
        module.make_node = _recording(module.make_node, layers)
    return layers


def _recording(make_node, layers: dict[str, set[str]]):
    def wrapper(*args, **kwargs):
        node, tensors = kwargs.get("graph_node"), kwargs.get("tf_layers_dict")
        if node is None or tensors is None:  # not a call from onnx2tf's main loop
            return make_node(*args, **kwargs)
        before = {id(entry.get("tf_node")) for entry in tensors.values() if isinstance(entry, dict)}
        result = make_node(*args, **kwargs)
        outputs = [tensors.get(output.name, {}).get("tf_node") for output in node.outputs]
        layers[node.name] = _layers_back_to(outputs, before)
        return result

    return wrapper


def _layers_back_to(outputs: list, known: set[int]) -> set[str]:
    """Names of the Keras layers on the paths from `outputs` back to tensors whose id is in `known`."""
    import tensorflow as tf

    names: set[str] = set()
    pending = [tensor for tensor in outputs if tensor is not None]
    while pending:
        tensor = pending.pop()
        if id(tensor) in known or not hasattr(tensor, "_keras_history"):
            continue
        layer, node_index, _ = tensor._keras_history
        if layer.name not in names:
            names.add(layer.name)
            pending.extend(tf.nest.flatten(layer._inbound_nodes[node_index].keras_inputs))
    return names


def quantize(
    model,
    feeds: list[np.ndarray],
    integer_io: bool,
    float_nodes: dict[str, set[str]],
    output_producers: list[str],
) -> bytes:
    """Full-integer int8 TFLite calibrated on `feeds` (one array per input, feeds along axis 0), with float32 or
    int8 input/output; the ops of `float_nodes` ({ONNX node: its Keras layers}) stay float (between a DEQUANTIZE
    and a QUANTIZE)."""
    import tensorflow as tf

    run = tf.function(
        lambda *inputs: model(inputs),
        input_signature=[tf.TensorSpec(tensor.shape, tensor.dtype, tensor.name) for tensor in model.inputs],
    )
    converter = tf.lite.TFLiteConverter.from_concrete_functions([run.get_concrete_function()])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.SELECT_TF_OPS]
    converter.representative_dataset = lambda: ([array[i] for array in feeds] for i in range(len(feeds[0])))
    if integer_io:
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    if not float_nodes:
        return converter.convert()
    converter._experimental_calibrate_only = True  # the quantizer below takes the denylist the converter lacks
    calibrated = converter.convert()
    denied = _float_op_outputs(calibrated, float_nodes, output_producers)
    from tensorflow.lite.python import convert

    return convert.mlir_quantize(calibrated, denylisted_nodes=denied)


def _float_op_outputs(calibrated: bytes, float_nodes: dict[str, set[str]], output_producers: list[str]) -> list[str]:
    """Output tensor names of the TFLite ops built from the float nodes, which is how the quantizer names ops. A
    fused op's name joins its layers' op names ("model/tf.nn.relu/Relu;model/tf.nn.convolution/convolution"); an op
    that writes a model output is named after the output instead, so it is found by the node that produces it."""
    from tensorflow.lite.tools import flatbuffer_utils

    graph = flatbuffer_utils.convert_bytearray_to_object(calibrated).subgraphs[0]
    names = [tensor.name.decode() for tensor in graph.tensors]
    layers = set().union(*float_nodes.values())
    denied = [name for name in names if any(f"/{layer}/" in f"{name}/" for layer in layers)]
    denied += [names[index] for index, node in zip(graph.outputs, output_producers, strict=True) if node in float_nodes]
    if not denied:
        raise RuntimeError(f"none of the {len(float_nodes)} layers to keep in float has an op in the TFLite graph")
    return denied


def integer_arg_max(tflite: bytes) -> bytes:
    """ARG_MAX/ARG_MIN read the int8 tensor instead of its DEQUANTIZE: the quantizer leaves them float (a forest's
    label from its class scores), and vela refuses a float ARG_MAX outright ("IFM has to be 8bit", then "Failed to
    parse TFLite file") instead of leaving it on the CPU. Exact: dequantizing with one positive scale keeps the order
    and the ties of the values. A DEQUANTIZE left without a consumer is dropped."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(tflite)
    codes = [max(code.builtinCode, code.deprecatedBuiltinCode) for code in model.operatorCodes]
    arg_ops = {schema.BuiltinOperator.ARG_MAX, schema.BuiltinOperator.ARG_MIN}
    dequantize = schema.BuiltinOperator.DEQUANTIZE
    integer = {schema.TensorType.INT8, schema.TensorType.UINT8}
    changed = False
    for graph in model.subgraphs:
        producers = {output: op for op in graph.operators for output in op.outputs}
        rewired = False
        for op in graph.operators:
            source = producers.get(op.inputs[0]) if codes[op.opcodeIndex] in arg_ops else None
            if source is None or codes[source.opcodeIndex] != dequantize:
                continue
            tensor = graph.tensors[source.inputs[0]]
            scale = tensor.quantization.scale if tensor.quantization is not None else None
            if tensor.type in integer and scale is not None and len(scale) == 1 and scale[0] > 0:
                op.inputs = np.array([source.inputs[0], *op.inputs[1:]], np.int32)
                rewired = True
        if rewired:
            used = {index for op in graph.operators for index in op.inputs} | set(graph.outputs)
            graph.operators = [op for op in graph.operators
                               if codes[op.opcodeIndex] != dequantize or op.outputs[0] in used]  # fmt: skip
            changed = True
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)) if changed else tflite


def write_weight_bytes(folder: Path) -> None:
    """Bytes of constant buffers (weights) per .tflite: the file size also counts the graph and metadata."""
    from tensorflow.lite.tools import flatbuffer_utils

    sizes = {}
    for path in folder.glob("*.tflite"):
        model = flatbuffer_utils.read_model(str(path))
        sizes[path.name] = sum(len(buffer.data) for buffer in model.buffers if buffer.data is not None)
    (folder / "weights.json").write_text(json.dumps(sizes))


if __name__ == "__main__":
    main(sys.argv[1])
