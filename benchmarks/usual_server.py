"""(a) The usual way: FastAPI with a pydantic body and `model.predict` per request.

    python benchmarks/usual_server.py VERSION_DIR PORT
"""

import sys
from pathlib import Path

import numpy as np
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from service.engines.keras_members import assemble
from contract.manifest import read_manifest

version_dir, port = Path(sys.argv[1]), int(sys.argv[2])
model = assemble(read_manifest(version_dir), version_dir)
app = FastAPI()


class PredictRequest(BaseModel):
    instances: list[list[list[list[float]]]]


@app.post("/predict")
def predict(request: PredictRequest) -> dict:
    average = model.predict(np.asarray(request.instances, dtype="float32"), verbose=0)[0]  # then members, scores
    return {"predictions": average.tolist()}


@app.get("/ready")
def ready() -> dict:
    return {"ready": True}


uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
