"""A worker in its own process, for kill/restart and SIGTERM tests.

Usage: python tests/worker_proc.py '<Settings JSON>' <worker_id> [batch_delay_s]
The test-only model family is registered first; ``batch_delay_s`` slows every engine call
so a test can kill the process while a batch is in flight.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from worker_helpers import register_test_family  # noqa: E402

from linewatch.settings import Settings  # noqa: E402
from workers.engines import TorchEngine  # noqa: E402
from workers.worker import run_worker  # noqa: E402


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    register_test_family()
    settings = Settings(**json.loads(sys.argv[1]))
    worker_id = sys.argv[2]
    delay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0

    class Slow(TorchEngine):
        def run(self, images):
            time.sleep(delay)
            return super().run(images)

    def factory(model, onnx_path, profile):
        return Slow(model, max_batch=settings.worker.max_batch)

    stats = run_worker(settings, worker_id=worker_id, engine_factory=factory, create_topics=False)
    print(json.dumps({"frames": stats.frames, "results": stats.results, "dlq": stats.dlq,
                      "commits": stats.commits, "rejoins": stats.rejoins}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
