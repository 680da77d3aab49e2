"""One rank of the DDP λ test, started by torchrun: `ddp_lambda_worker.py BASE ASR SER OUT_DIR`.

Each rank writes its own λ to OUT_DIR/rank{N}.json; the test compares them. No collective of our own: a gloo
all_gather at the end raced with process-group teardown (its work object, holding Python tensors, was freed on
gloo's thread while the main thread held the GIL joining that thread), hanging about one run in six.
"""

import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from adaltm_s3prl import compat
from adaltm_upstream import adaltm_wavlm


def main(base: str, asr: str, ser: str, out_dir: str) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    compat.apply_all()
    from s3prl.downstream import runner

    upstream = adaltm_wavlm(model_config={"base": base, "task_vectors": {"asr": asr, "ser": ser},
                                          "merge": {"granularity": "layerwise", "init": 0.5}}).train()
    model = runner.DDP(upstream, device_ids=[rank], find_unused_parameters=True)  # as s3prl's runner does
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    generator = torch.Generator().manual_seed(100 + rank)  # each rank sees different audio
    for _ in range(2):
        wavs = [torch.randn(7000 + 500 * rank, generator=generator)]
        loss = sum(h.pow(2).mean() for h in model(wavs)["hidden_states"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    report = {"lambdas": upstream.lambdas().tolist(), "ignored": sorted(model.parameters_to_ignore),
              "world_size": int(os.environ["WORLD_SIZE"])}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
