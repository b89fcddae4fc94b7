"""The packaged model and the training checkpoint format, shared by the train layer and the registry.

- ``checkpoint``: the checkpoint folder a training run reports (one writer, one reader);
- ``spec``: the model description (``q2l_model.json``) and the checks every field passes before a build;
- ``inputs``: what a packaged model accepts (paths, base64, bytes) and a request's limits;
- ``predictor``: ``Predictor`` (decode → resize → normalise → sigmoid) and building one from checked parts;
- ``checkpoint_model``: a training checkpoint's ``best.pt`` as a ``Predictor``;
- ``mlflow_model``: the MLflow "models from code" pyfunc (``log_model``) and ``load_predictor``;
- ``pyfunc_model.py``: the code file MLflow executes when it loads the pyfunc.
"""

from q2l.packaging.checkpoint_model import checkpoint_spec, predictor_from_checkpoint
from q2l.packaging.inputs import (
    MAX_IMAGES_PER_REQUEST,
    MAX_INPUT_CHARS,
    RequestTooLargeError,
    check_request,
    decode_source,
)
from q2l.packaging.mlflow_model import (
    MODEL_NAME,
    PYFUNC_CODE,
    load_predictor,
    log_model,
    predictor_from_model_dir,
)
from q2l.packaging.predictor import Predictor, build_from_spec, predictor_from_files, save_weights
from q2l.packaging.spec import (
    FORMAT_VERSION,
    MODEL_JSON,
    WEIGHTS_FILE,
    ModelSpec,
    PackagingError,
    architecture_of,
    check_spec_fields,
    model_spec,
)

__all__ = [
    "FORMAT_VERSION",
    "MAX_IMAGES_PER_REQUEST",
    "MAX_INPUT_CHARS",
    "MODEL_JSON",
    "MODEL_NAME",
    "PYFUNC_CODE",
    "WEIGHTS_FILE",
    "ModelSpec",
    "PackagingError",
    "Predictor",
    "RequestTooLargeError",
    "architecture_of",
    "build_from_spec",
    "check_request",
    "check_spec_fields",
    "checkpoint_spec",
    "decode_source",
    "load_predictor",
    "log_model",
    "model_spec",
    "predictor_from_checkpoint",
    "predictor_from_files",
    "predictor_from_model_dir",
    "save_weights",
]
