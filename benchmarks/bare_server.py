"""(b) The HTTP floor: the same stack parses the same body into an array and answers a constant.

    python benchmarks/bare_server.py PORT
"""

import sys

import numpy as np
import orjson
import uvicorn
from fastapi import FastAPI, Request, Response

app = FastAPI()
ANSWER = orjson.dumps({"predictions": [[0.1] * 10]})


@app.post("/predict")
async def predict(request: Request) -> Response:
    np.asarray(orjson.loads(await request.body())["instances"], dtype="float32")
    return Response(ANSWER, media_type="application/json")


@app.get("/ready")
async def ready() -> Response:
    return Response(b'{"ready":true}', media_type="application/json")


uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
