"""One served model in this process: loading the builder's engine into several instances,
inference through the batcher, and the startup objects moved out of the collector's reach."""

from __future__ import annotations

import asyncio
import gc

import numpy as np
import pytest

from plansmith_runtime.config import BatchingPolicy, ServingConfig
from plansmith_runtime.model import LoadOptions, ServedModel

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_a_loaded_model_runs_two_sessions_answers_like_onnxruntime_and_froze_its_startup_objects(engines):
    policy = BatchingPolicy(max_batch_size=8, enabled=True, max_queue_delay_us=1000)
    model = ServedModel(ServingConfig("mlp", policy, instances=2, warmup_iterations=1))
    gc.unfreeze()
    await model.load(LoadOptions(engines["mlp"].manifest_uri))
    try:
        assert model.ready, model.reason
        assert len(model._executors) == 2
        assert gc.get_freeze_count() > 0
        inputs = [engines["mlp"].model.sample_inputs(batch=1, seed=seed)["input"] for seed in range(4)]
        results = await asyncio.gather(*(model.infer({"input": x}, []) for x in inputs))
        session = engines["mlp"].session()
        for x, result in zip(inputs, results):
            np.testing.assert_allclose(result["logits"], session.run(None, {"input": x})[0], rtol=1e-5, atol=1e-5)
        assert model.metrics.stats.success == 4
    finally:
        await model.stop(1.0)
