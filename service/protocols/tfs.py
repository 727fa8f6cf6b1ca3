"""TensorFlow Serving, its codec: the messages of `tensorflow.serving.PredictionService`
(Predict, GetModelMetadata) and `ModelService` (GetModelStatus) to and from arrays and answers,
with the messages of service.protocols.tfs_messages (no TensorFlow imported). Its REST predict
is the row format (service.protocols.predict). It knows nothing of gRPC: service.rpc.tfs
carries it.

An ensemble has one signature, `serving_default`. A format-1 version's input is `instances`
(the manifest's shape and dtype), its outputs the REST answer as tensors: `predictions` (the
averaged probabilities), `labels` (the top class of each row), `members` (rows x members x
classes), `disagreement`, the uncertainty scores (contract.scores) and, when the version has an
abstention threshold, `abstain`. A format-2 version's inputs are its named inputs (DT_STRING
for a string, DT_BOOL, any numeric type for a number), its outputs those of
service.protocols.named (a regression head's interval at its default level). A Predict without
`output_filter` gets every output, as TensorFlow Serving answers with every output of the
signature.
"""

from __future__ import annotations

import numpy as np

from contract.manifest import Signature
from contract.scores import SCORES
from service.answer import Answer
from service.errors import InvalidInput, ModelNotFound
from service.protocols import named, oip
from service.protocols import tfs_messages as m
from service.protocols.arrays import check_range, narrowed, to_spec

SIGNATURE = "serving_default"
INPUT = "instances"
PREDICT_METHOD = "tensorflow/serving/predict"  # a predict signature's method_name

# DataType -> (numpy dtype, the TensorProto field holding its values when not in tensor_content)
_TYPES = {
    "DT_FLOAT": ("float32", "float_val"), "DT_DOUBLE": ("float64", "double_val"),
    "DT_HALF": ("float16", "half_val"), "DT_INT8": ("int8", "int_val"), "DT_INT16": ("int16", "int_val"),
    "DT_INT32": ("int32", "int_val"), "DT_INT64": ("int64", "int64_val"), "DT_UINT8": ("uint8", "int_val"),
    "DT_UINT16": ("uint16", "int_val"), "DT_UINT32": ("uint32", "uint32_val"),
    "DT_UINT64": ("uint64", "uint64_val"), "DT_BOOL": ("bool", "bool_val"),
}
# The type each field's values arrive in, before the check against the tensor's own dtype.
_WIDE = {"float_val": "float32", "double_val": "float64", "half_val": "int64", "int_val": "int64",
         "int64_val": "int64", "uint32_val": "uint64", "uint64_val": "uint64", "bool_val": "bool"}
_NUMPY = {name: numpy for name, (numpy, _) in _TYPES.items()}
_NUMERIC = {name: numpy for name, numpy in _NUMPY.items() if name != "DT_BOOL"}
_DATATYPE_OF = {numpy: m.DataType.values_by_name[name].number for name, (numpy, _) in _TYPES.items()}
_DT_STRING = m.DataType.values_by_name["DT_STRING"].number
_DATATYPE_OF["string"] = _DT_STRING
_STATE = m.ModelVersionStatus.State
_CODE = m.POOL.FindEnumTypeByName("tensorflow.error.Code")


def outputs_of(ensemble) -> dict[str, tuple[int, tuple[int, ...]]]:
    """The signature's outputs: name -> (DataType, shape with -1 for the rows)."""
    classes, members = len(ensemble.classes), len(ensemble.manifest.members)
    float32 = _DATATYPE_OF["float32"]
    outputs = {"predictions": (float32, (-1, classes)), "labels": (_DT_STRING, (-1,)),
               "members": (float32, (-1, members, classes)), "disagreement": (float32, (-1,)),
               **{score: (float32, (-1,)) for score in SCORES}}
    if ensemble.manifest.abstention is not None:
        outputs["abstain"] = (_DATATYPE_OF["bool"], (-1,))
    return outputs


# -- decode -----------------------------------------------------------------------------------

def model_version(spec) -> str | None:
    """The version a ModelSpec asks for: None for the live one; NOT_FOUND for a label (versions
    here have numbers only) or a number that cannot be one."""
    choice = spec.WhichOneof("version_choice")
    if choice == "version_label":
        raise ModelNotFound(f"version label {spec.version_label[:40]!r}: this server has no version labels; "
                            "name a version number, or none for the live version")
    if choice == "version":
        if spec.version.value <= 0:
            raise ModelNotFound(f"version {spec.version.value} of {spec.name[:64]!r} does not exist")
        return str(spec.version.value)
    return None


def required_name(spec) -> str:
    """A ModelSpec's model name, which TensorFlow Serving requires too."""
    if not spec.name:
        raise InvalidInput("model_spec.name is empty: name the model")
    return spec.name


def model_of(spec) -> tuple[str, str | None]:
    """(name, version or None for the live one) of the ensemble a ModelSpec names, checking its
    signature is the one there is."""
    required_name(spec)
    if spec.signature_name not in ("", SIGNATURE):
        raise InvalidInput(f"signature {spec.signature_name[:64]!r} not found; the model's one signature is "
                           f"{SIGNATURE!r}")
    return spec.name, model_version(spec)


def message_input(request, spec, max_rows: int) -> np.ndarray:
    """The request's `instances` tensor as rows of the model's input spec; InvalidInput (or
    PayloadTooLarge) naming what is wrong. Values come from tensor_content or from the
    dtype's typed field (one value there fills the shape, as in TensorFlow)."""
    if len(request.inputs) != 1 or INPUT not in request.inputs:
        names = ", ".join(repr(k[:40]) for k in list(request.inputs)[:5]) or "none"
        raise InvalidInput(f"inputs must hold exactly one tensor, {INPUT!r} (the signature's input); got {names}")
    tensor = request.inputs[INPUT]
    where = f"inputs[{INPUT!r}]"
    type_name = _type_name(tensor, _TYPES, where)
    shape = _shape(tensor, where)
    dtype, count = oip.check_input(shape, type_name, spec, max_rows, _NUMPY, where)
    return to_spec(_values(tensor, type_name, shape, count, where), spec, where)


def message_named(request, signature: Signature, max_rows: int) -> dict[str, np.ndarray]:
    """A format-2 version's named inputs in a PredictRequest's `inputs`: DT_STRING (`string_val`)
    for a string input, DT_BOOL for a bool one, any numeric type for a number (cast to the
    input's dtype)."""
    given: dict[str, np.ndarray] = {}
    for key, tensor in request.inputs.items():
        where = f"inputs[{key[:64]!r}]"
        spec = named.input_spec(signature, key, "inputs", given)
        allowed = {"string": ("DT_STRING",), "bool": ("DT_BOOL",)}.get(spec.dtype, tuple(_NUMERIC))
        type_name = _type_name(tensor, (*_TYPES, "DT_STRING"), where)
        if type_name not in allowed:
            raise InvalidInput(f"{where}.dtype {type_name}: input {spec.name!r} ({spec.dtype}) takes "
                               f"{', '.join(allowed)}")
        shape = _shape(tensor, where)
        count = named.check_shape(shape, spec, max_rows, where)
        given[spec.name] = named.cast(_values(tensor, type_name, shape, count, where), spec, where)
    return named.check_complete(given, signature)


def _type_name(tensor, allowed, where: str) -> str:
    type_name = m.DataType.values_by_number[tensor.dtype].name if tensor.dtype in m.DataType.values_by_number \
        else str(tensor.dtype)
    if type_name not in allowed:
        raise InvalidInput(f"{where}.dtype {type_name} is not one of {', '.join(allowed)}")
    return type_name


def _shape(tensor, where: str) -> list[int]:
    if tensor.tensor_shape.unknown_rank:
        raise InvalidInput(f"{where}.tensor_shape has an unknown rank; send the tensor's shape")
    return [d.size for d in tensor.tensor_shape.dim]


def _values(tensor, type_name: str, shape: list[int], count: int, where: str) -> np.ndarray:
    """A TensorProto's values in `shape` (checked: `count` values): from tensor_content, or its
    dtype's typed field, where one value fills the shape, as in TensorFlow."""
    if type_name == "DT_STRING":
        values = tensor.string_val
        if len(values) not in (1, count):
            raise InvalidInput(f"{where}.string_val holds {len(values)} values; shape {shape[:10]} needs {count} "
                               "(or one, which fills it)")
        array = np.empty(count, dtype=object)
        array[:] = list(values) * (count if len(values) == 1 else 1)
        return array.reshape(shape)
    numpy_type, field = _TYPES[type_name]
    dtype = np.dtype(numpy_type).newbyteorder("<")
    if tensor.tensor_content:
        if len(tensor.tensor_content) != count * dtype.itemsize:
            raise InvalidInput(f"{where}.tensor_content has {len(tensor.tensor_content)} bytes; shape {shape} of "
                               f"{type_name} needs {count * dtype.itemsize}")
        if type_name == "DT_BOOL":  # one byte each; any but 0 is true, as in TensorFlow
            return (np.frombuffer(tensor.tensor_content, dtype=np.uint8) != 0).reshape(shape)
        return np.frombuffer(tensor.tensor_content, dtype=dtype).reshape(shape)
    values = getattr(tensor, field)
    if len(values) not in (1, count):
        raise InvalidInput(f"{where}.{field} holds {len(values)} values; shape {shape} needs {count} "
                           "(or one, which fills it)")
    array = np.asarray(values, dtype=_WIDE[field])
    if field == "half_val":  # float16 bit patterns in int32s
        check_range(array, np.dtype(np.uint16), f"{where}.{field}")
        array = array.astype(np.uint16).view(np.float16)
    array = narrowed(array, np.dtype(numpy_type), f"{where}.{field}")  # int_val of a narrower type
    return np.broadcast_to(array, shape) if len(values) == 1 else array.reshape(shape)


def wanted(request, ensemble) -> list[str]:
    """The outputs a request asks for (`output_filter`), each once; every output when none."""
    available = outputs_of(ensemble) if ensemble.manifest.format_version == 1 else named.outputs_of(ensemble.signature)
    if not request.output_filter:
        return list(available)
    for name in request.output_filter:
        if name not in available:
            raise InvalidInput(f"output {name[:100]!r} is not in signature {SIGNATURE!r}; its outputs are "
                               f"{', '.join(available)}")
    return list(dict.fromkeys(request.output_filter))


# -- encode -----------------------------------------------------------------------------------

def tensor_proto(array: np.ndarray):
    """A TensorProto of a numeric array (little-endian bytes in tensor_content) or of strings."""
    proto = m.TensorProto()
    for d in array.shape:
        proto.tensor_shape.dim.add(size=d)
    if array.dtype.kind in "UO":
        proto.dtype = _DT_STRING
        proto.string_val.extend(v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1).tolist())
    else:
        proto.dtype = _DATATYPE_OF[array.dtype.name]
        proto.tensor_content = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return proto


def tensor_info(name: str, datatype: int, shape: tuple[int, ...]):
    info = m.TensorInfo(name=f"{name}:0", dtype=datatype)
    for d in shape:
        info.tensor_shape.dim.add(size=d)
    return info


def model_spec(ensemble, signature: str = SIGNATURE):
    spec = m.ModelSpec(name=ensemble.name, signature_name=signature)
    spec.version.value = ensemble.version
    return spec


def signature_def(ensemble):
    """The ensemble's `serving_default` SignatureDef (a variable dimension as -1)."""
    signature = m.SignatureDef(method_name=PREDICT_METHOD)
    if ensemble.manifest.format_version == 1:
        inputs = {INPUT: (_DATATYPE_OF[ensemble.input_spec.dtype], (-1, *ensemble.input_spec.shape))}
        outputs = outputs_of(ensemble)
    else:
        members = len(ensemble.member_names)
        inputs = {spec.name: (_DATATYPE_OF[spec.dtype], (-1, *(-1 if d is None else d for d in spec.shape)))
                  for spec in ensemble.signature.inputs}
        outputs = {name: (_DATATYPE_OF[dtype], named.shape_of(shape, members))
                   for name, (dtype, shape, _) in named.outputs_of(ensemble.signature).items()}
    for name, (datatype, shape) in inputs.items():
        signature.inputs[name].CopyFrom(tensor_info(name, datatype, shape))
    for name, (datatype, shape) in outputs.items():
        signature.outputs[name].CopyFrom(tensor_info(name, datatype, shape))
    return signature


def version_status(entry: dict):
    """A version folder of GET /models (service.lifecycle.status) as a ModelVersionStatus:
    live and previous versions are loaded (AVAILABLE), one being loaded LOADING, one being
    published START, one that failed its checks END with its failure's category, one on disk
    and not loaded END."""
    status = m.ModelVersionStatus(version=entry["version"])
    state = entry["state"]
    status.state = {"live": _STATE.AVAILABLE, "previous": _STATE.AVAILABLE, "loading": _STATE.LOADING,
                    "uncommitted": _STATE.START}.get(state, _STATE.END)
    if state == "failed":
        status.status.error_code = _CODE.values_by_name["UNKNOWN"].number
        status.status.error_message = f"failed its checks ({entry.get('category', 'unknown')})"
    elif state == "uncommitted":
        status.status.error_message = "being published (uncommitted)"
    return status


def predict_response(answer: Answer, ensemble, names: list[str]):
    """The PredictResponse of an answer: the outputs `names` (`wanted`) as TensorProtos."""
    head = answer.head
    reply = m.PredictResponse(model_spec=model_spec(ensemble))
    for name in names:
        if name == "predictions":
            array = head.combined
        elif name == "labels":
            array = np.array(head.top_labels(), dtype=object)
        elif name == "disagreement":
            array = head.disagreement().astype(np.float32)  # the signature's DT_FLOAT
        else:
            array = oip.output(name, answer)
        reply.outputs[name].CopyFrom(tensor_proto(np.asarray(array)))
    return reply


def named_response(answer: Answer, ensemble, names: list[str]):
    """The PredictResponse of a format-2 answer: the outputs `names` (`wanted`) as TensorProtos."""
    catalogue = named.outputs_of(ensemble.signature)
    reply = m.PredictResponse(model_spec=model_spec(ensemble))
    for name in names:
        reply.outputs[name].CopyFrom(tensor_proto(named.output(answer, name, catalogue[name][2])))
    return reply


def metadata_response(ensemble, fields):
    """The GetModelMetadataResponse asking for `fields` (only `signature_def` exists)."""
    if not fields:
        raise InvalidInput("metadata_field is empty: ask for 'signature_def'")
    for field in fields:
        if field != "signature_def":
            raise InvalidInput(f"metadata field {field[:40]!r} is not supported; the one there is is "
                               "'signature_def'")
    signatures = m.SignatureDefMap()
    signatures.signature_def[SIGNATURE].CopyFrom(signature_def(ensemble))
    reply = m.GetModelMetadataResponse(model_spec=model_spec(ensemble, ""))
    reply.metadata["signature_def"].Pack(signatures)  # the pool's own Any
    return reply


def status_response(entries: list[dict], spec):
    """The GetModelStatusResponse of an ensemble's version entries (GET /models'), all of them
    or the one version the ModelSpec names (NOT_FOUND if it is not in the repository)."""
    name, version = required_name(spec), model_version(spec)
    if version is not None:
        entries = [e for e in entries if str(e["version"]) == version]
        if not entries:
            raise ModelNotFound(f"version {version} of {name!r} is not in the repository")
    return m.GetModelStatusResponse(model_version_status=[version_status(e) for e in entries])
