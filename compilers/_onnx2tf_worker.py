"""Runs onnx2tf in its own process: TensorFlow's import, logging and memory stay out of the compiler process,
and an interrupted conversion dies with its process. Invoked by compilers/tflite.py as
`python -m edgekit.compilers._onnx2tf_worker JOB.json`."""

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

    onnx2tf.convert(
        input_onnx_file_path=job["model"],
        output_folder_path=job["output"],
        output_integer_quantized_tflite=bool(job["calibration"]),
        quant_type="per-channel",
        custom_input_op_name_np_data_path=[[name, path, 0.0, 1.0] for name, path in job["calibration"].items()] or None,
        keep_ncw_or_nchw_or_ncdhw_input_names=job["keep_layout_inputs"] or None,
        not_use_onnxsim=True,
        non_verbose=True,
    )
    write_weight_bytes(Path(job["output"]))


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
