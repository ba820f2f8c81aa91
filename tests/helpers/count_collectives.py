"""`torchrun ... tests/helpers/count_collectives.py OUT fsl-args...`: runs `python -m fsl fsl-args...` with every
torch.distributed collective and every host sync (fsl.train.opcount.OpCounter) recorded with the outer step it falls in;
rank r writes OUT/rank<r>.json: {"collectives": [[steps done, phase, name], ...], "syncs": [[phase, op], ...]}.
Phases: "step k" (the k-th outer step and the building of its episodes), "boundary" (reading the step window,
validation, checkpoints, the log), "stop-check" (agreeing on a stop request), "host" (describing episodes)."""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: make the repository importable
import torch.distributed as dist  # noqa: E402

from fsl.__main__ import main  # noqa: E402
from fsl.data.episodes import EpisodeDataset, EpisodeMaker  # noqa: E402
from fsl.train import checkpoint
from fsl.train import meta_train as train  # noqa: E402
from fsl.train.opcount import OpCounter  # noqa: E402
from fsl.train.run_log import RunLog  # noqa: E402

out, args = Path(sys.argv[1]), sys.argv[2:]
ops, collectives, steps = OpCounter(), [], [0]


def in_phase(owner, name, phase):
    original = getattr(owner, name)

    def counted(*a, **k):
        previous, ops.current = ops.current, phase
        try:
            return original(*a, **k)
        finally:
            ops.current = previous
    setattr(owner, name, counted)


for owner, name in ((train.StepWindow, "read"), (train.Validation, "__call__"), (checkpoint.Checkpoints, "save"),
                    (RunLog, "write"), (train, "FixedEpisodes")):
    in_phase(owner, name, "boundary")
for owner, name in ((EpisodeDataset, "__getitem__"), (EpisodeMaker, "gather")):
    in_phase(owner, name, "host")
in_phase(train.StopRequest, "requested", "stop-check")

for name in ("all_reduce", "broadcast", "all_gather", "all_gather_object", "broadcast_object_list", "barrier",
             "reduce", "gather_object", "reduce_scatter"):
    def collective(*a, _real=getattr(dist, name), _name=name, **k):
        collectives.append((steps[0], ops.current, _name))
        return _real(*a, **k)
    setattr(dist, name, collective)

real_step = train.meta_train_step


def step(*a, **k):
    result = real_step(*a, **k)
    steps[0] += 1
    ops.current = f"step {steps[0] + 1}"  # what follows (the next episodes) belongs to the next step
    return result


train.meta_train_step = step
try:
    with ops:
        ops.current = "step 1"
        code = main(args)
finally:
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps({"collectives": collectives,
                                                                    "syncs": ops.sync_calls}))
sys.exit(code)
