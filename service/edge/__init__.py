"""The edge: the wire formats, one module each (`rest`: /predict and TensorFlow Serving REST;
`v2`: the Open Inference Protocol), the ASGI layer that answers them and counts every request
(`inference`), the replies and their framing (`replies`), the other routes (`routes`), and the
optional fast HTTP path on uvicorn (`fast_http`). Adding a protocol means adding one module
beside `rest` and `v2`.
"""
