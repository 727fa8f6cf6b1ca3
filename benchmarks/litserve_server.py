"""(d) A serving framework with its own dynamic batching: LitServe, on the same ensemble and
engine the service runs (TensorFlow Lite when the version converts, else the frozen graph). Installed for the benchmark only (`pip install litserve`).

    python benchmarks/litserve_server.py VERSION_DIR PORT
"""

import sys
from pathlib import Path

import litserve as ls
import numpy as np

VERSION_DIR, PORT = Path(sys.argv[1]), int(sys.argv[2])


class EnsembleAPI(ls.LitAPI):
    def setup(self, device):
        from service.config import Settings
        from service.engines.loader import EngineLoader, ThreadPlan
        from contract.manifest import read_manifest

        # The same engine the service runs: the comparison is of the serving, not the model.
        settings = Settings(isolated_loading=False, warmup_batch_sizes=(1, 32))
        load = EngineLoader(settings, ThreadPlan(inference_threads=1, intra_op=1, inter_op=1))
        self.ensemble = load(read_manifest(VERSION_DIR), VERSION_DIR, lambda: None)
        self.sizes = []

    def decode_request(self, request):
        return np.asarray(request["instances"], dtype="float32")

    def batch(self, inputs):
        # One worker runs batch -> predict -> unbatch in turn, so the sizes can wait here.
        self.sizes = [len(x) for x in inputs]
        return np.concatenate(inputs)

    def predict(self, x):
        return self.ensemble.predict(x)[0]

    def unbatch(self, output):
        return np.split(output, np.cumsum(self.sizes)[:-1])

    def encode_response(self, output):
        return {"predictions": output.tolist()}


if __name__ == "__main__":
    api = EnsembleAPI(max_batch_size=64, batch_timeout=0.001)
    ls.LitServer(api, accelerator="cpu", workers_per_device=1, healthcheck_path="/ready").run(
        port=PORT, host="127.0.0.1", generate_client_file=False, log_level="warning")  # no access log, like the others
