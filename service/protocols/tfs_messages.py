"""TensorFlow Serving's gRPC messages, from the descriptor set compiled from service/protocols/gen/tfs
(`make protos`), in a descriptor pool of their own.

TensorFlow registers its framework messages (tensorflow.TensorProto, ...) in protobuf's default
pool whenever a server process computes with it; messages of the same names defined again there
would be refused. In a pool of their own they never meet: the wire format is all that is shared.
Nothing here imports TensorFlow.
"""

from __future__ import annotations

from importlib import resources

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

DESCRIPTOR_SET = "tensorflow_serving.binpb"


def _pool() -> tuple[descriptor_pool.DescriptorPool, descriptor_pb2.FileDescriptorSet]:
    files = descriptor_pb2.FileDescriptorSet.FromString(
        resources.files("service.protocols.gen").joinpath(DESCRIPTOR_SET).read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return pool, files


POOL, FILES = _pool()


def message(full_name: str):
    """The message class of a full name in this pool ("tensorflow.serving.PredictRequest")."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(full_name))


TensorProto = message("tensorflow.TensorProto")
TensorInfo = message("tensorflow.TensorInfo")
SignatureDef = message("tensorflow.SignatureDef")
ModelSpec = message("tensorflow.serving.ModelSpec")
PredictRequest = message("tensorflow.serving.PredictRequest")
PredictResponse = message("tensorflow.serving.PredictResponse")
SignatureDefMap = message("tensorflow.serving.SignatureDefMap")
GetModelMetadataRequest = message("tensorflow.serving.GetModelMetadataRequest")
GetModelMetadataResponse = message("tensorflow.serving.GetModelMetadataResponse")
GetModelStatusRequest = message("tensorflow.serving.GetModelStatusRequest")
GetModelStatusResponse = message("tensorflow.serving.GetModelStatusResponse")
ModelVersionStatus = message("tensorflow.serving.ModelVersionStatus")

DataType = POOL.FindEnumTypeByName("tensorflow.DataType")
PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"
