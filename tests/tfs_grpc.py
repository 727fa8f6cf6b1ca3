"""TensorFlow Serving's gRPC client as the tests use it: named arrays in, one Predict call,
named arrays out (tensorflow-serving-api's messages, TensorFlow's tensor protos)."""

from __future__ import annotations

import numpy as np


def tfs_predict(address: str, model: str, inputs: dict[str, np.ndarray], outputs) -> dict[str, np.ndarray]:
    """The `outputs` (names) of `model` at the gRPC server `address`, asked with `inputs`."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    for key, array in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(array))
    request.output_filter.extend(outputs)
    with grpc.insecure_channel(address) as channel:
        reply = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    return {name: tf.make_ndarray(reply.outputs[name]) for name in outputs}
