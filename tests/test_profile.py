"""trainer.profile=[START,STOP] (trainer/profile.py): a tf.profiler trace of exactly those steps, chunk boundaries
on START and STOP, the trace logged as the run's `profile/` artifacts in TensorBoard's layout, the metrics whole."""

from __future__ import annotations

import mlflow
import pytest

from conftest import run_cli
from trainer.callbacks import Callback
from trainer.config import TrainerError
from trainer.fit import _until


class ChunkEnds(Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_chunk_end(self, ctx, step, arrays) -> None:
        self.steps.append(step)


def test_trace_of_the_steps_asked_for(compose_cfg, tracking_uri, tmp_path):
    from trainer.train import train

    ends = ChunkEnds()
    cfg = compose_cfg(["trainer.max_steps=40", "trainer.steps_per_loop=7", "trainer.profile=[10,23]",
                       "tracking.log_model=false"])  # fmt: skip
    train(cfg, output_dir=tmp_path, callbacks=[ends])
    assert ends.steps == [7, 10, 17, 23, 30, 37, 40]  # calls of 7 steps, cut at START and STOP
    [trace] = (tmp_path / "profile" / "plugins" / "profile").glob("*/*.xplane.pb")
    assert trace.stat().st_size > 1000
    client = mlflow.MlflowClient(tracking_uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    [stamp] = client.list_artifacts(run.info.run_id, "profile/plugins/profile")
    assert stamp.path == f"profile/plugins/profile/{trace.parent.name}"
    [logged] = client.list_artifacts(run.info.run_id, stamp.path)
    assert logged.path.endswith(trace.name) and logged.file_size == trace.stat().st_size
    assert run.data.tags["profile.steps"] == "10..23"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps == list(range(40))  # every step logged once, the traced ones too


def test_stop_past_the_run_is_an_error(compose_cfg, tmp_path):
    from trainer.train import train

    with pytest.raises(TrainerError, match=r"trainer.profile=\[10,50\]: STOP is past the run's 40 steps"):
        train(compose_cfg(["trainer.max_steps=40", "trainer.profile=[10,50]"]), output_dir=tmp_path)


@pytest.mark.parametrize("value", ["[20,10]", "[-1,5]", "[3]"])
def test_bad_ranges_are_one_line(value, tmp_path):
    done = run_cli([f"trainer.profile={value}", f"tracking.uri=sqlite:///{tmp_path}/m.db"], tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("error: trainer.profile=") and len(done.stderr.strip().splitlines()) == 1


def test_until_stops_at_boundaries():
    assert _until(0, None, (10, 23)) == 10
    assert _until(10, None, (10, 23)) == 13
    assert _until(10, 4, (10, 23)) == 2  # the next multiple of 4 comes first
    assert _until(23, None, (10, 23)) == 1 << 62
    assert _until(5, 4) == 3
