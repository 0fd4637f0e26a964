"""Times the dashboard can promise (core.model.cost's counters and price, dashboard.progress, dashboard.state): a
job's work counted in rows as its passes run it, priced by FLOPs and a timed row, a meter that moves with every block
and learns its pace, the wait of a queued job from what is ahead of it, Cancel and Stop. A tiny ViT; no assets."""
import threading
import time

import pytest
import torch

from core.model.cost import RowCost, Work, interference_work, measure_row_cost, scoring_work
from core.model.toy import toy_task
from core.model.watch import watched
from dashboard.progress import Meter, duration


#: A price of 1 s a FLOP, with a row's FLOPs forward, backward and per image as given.
def _price(forward: float, backward: float, embed: float = 0.0) -> RowCost:
    return RowCost(forward, backward, embed, 1.0, "cpu")


def _rows(model, run) -> Work:
    """The rows the hooks of watched() report while ``run()`` runs, per block: the work it did."""
    seen = {"forward": 0, "backward": 0, "embed": 0}

    def tick(info):
        seen[info["pass"]] += info["rows"]

    with watched(model, progress=tick):
        run()
    return Work(seen["forward"] / model.depth, seen["backward"] / model.depth, seen["embed"])


@pytest.mark.parametrize("params", [dict(start="uniform", optimizer="adam", tol=0.0), dict(mixing="task_arithmetic"),
                                    dict(regularizer="interference"), dict(lam=0.0), dict(objective="logme")])
def test_a_fits_work_is_what_its_passes_run_at_most_every_step(model, bank, params):
    from core import HGPromptEnsemble

    ens = HGPromptEnsemble(**{"n_samples": 30, "steps": 3, **params})
    task = toy_task()  # fresh: its sample is embedded by the fit
    did = _rows(model, lambda: ens.fit(model, bank, task=task, callback=lambda info: None))
    planned = ens.work(len(bank), 30, images=30)
    assert did.images == planned.images == 30
    # At most: every step of the cap and the step off a vertex (a fit may converge, or start where it need not step).
    slack = (ens.steps - ens.n_steps_ + 1) * 30
    assert did.forward <= planned.forward <= did.forward + slack
    assert did.backward <= planned.backward <= did.backward + slack


def test_interference_and_scoring_work_are_exactly_their_passes(model, bank):
    from core.analysis.interference import interference, simplex_hscores

    task = toy_task()  # fresh: each job embeds its sample (a sample of a split not embedded is not kept)
    did = _rows(model, lambda: interference(model, bank, task, n_samples=30, points=5))
    assert did == interference_work(len(bank), 30, 5)
    did = _rows(model, lambda: simplex_hscores(model, bank.stack(), task, resolution=4, n_samples=30))
    assert did == scoring_work(15, 30)  # 15 points on a triangle of resolution 4


def test_a_measured_price_scales_to_a_jobs_rows_and_its_blocks_add_up_to_them(model, bank):
    cost = measure_row_cost(model, tuple(bank.stack().shape[1:]))
    assert cost.forward_flops > 0 and cost.backward_flops > 0 and cost.embed_flops > 0 and cost.seconds_per_flop > 0
    w = Work(forward=100, backward=50, images=10)
    assert cost.seconds(w) == pytest.approx(cost.seconds_per_flop * (100 * cost.forward_flops + 50 * cost.backward_flops
                                                                     + 10 * cost.embed_flops))
    assert (2 * w).forward == 200 and (w + w).images == 20
    ticks = []
    with watched(model, progress=ticks.append):  # a job's reports, block by block, add up to its price
        from core.model.features import prompt_features
        from core.model.tokens import embed_images

        tokens = embed_images(model, torch.rand(10, 3, *model.backbone.patch_embed.img_size))
        prompt_features(model, tokens, bank.stack()[:2])
    assert sum(cost.of_tick(t) for t in ticks) == pytest.approx(cost.seconds(Work(forward=20, images=10)))


def test_a_meter_moves_with_every_block_and_its_time_left_follows_the_pace_it_keeps():
    cost = _price(forward=0.02, backward=0.04)
    meter = Meter(cost, Work(forward=100, backward=100), pace=1.0)  # 100 * (0.02 + 0.04) = 6 priced seconds
    assert meter.estimate() == pytest.approx(6.0) and meter.fraction() == 0
    meter.tick({"pass": "forward", "block": 1, "depth": 2, "rows": 100})  # 1 priced second
    assert meter.fraction() == pytest.approx(1 / 6)
    meter.began = time.monotonic() - 4.0  # it took 4 s: four times slower than priced
    assert meter.seconds_left() == pytest.approx(5.0 * 4.0, rel=0.05)
    assert duration(45) == "45 s" and duration(330) == "5.5 min"


def test_a_queued_job_waits_for_what_is_ahead_and_can_be_cancelled(monkeypatch):
    import dashboard.state as state
    from dashboard.state import BackgroundJob

    monkeypatch.setattr(state, "MAX_CONCURRENT_JOBS", 1)
    gate = threading.Event()
    cost = _price(forward=0.01, backward=0.0)
    running = BackgroundJob("tune", lambda job: gate.wait(30), estimate=600.0).start()
    try:
        for _ in range(100):
            if running.status == "running":
                break
            time.sleep(0.05)
        second = BackgroundJob("ensemble", lambda job: None, meter=Meter(cost, Work(forward=12_000), pace=1.0)).start()
        third = BackgroundJob("ensemble", lambda job: None, meter=Meter(cost, Work(forward=6_000), pace=1.0)).start()
        time.sleep(0.5)
        wait, ahead = third.wait_ahead()
        # the running tuning's time left (about 600 s) and the queued fit before it (120 s), not "15 s a run"
        assert ahead == [running, second] and 700 < wait <= 720
        assert third.queue_position == 2
        third.stop.set()  # Cancel
        for _ in range(50):
            if third.finished:
                break
            time.sleep(0.1)
        assert third.status == "stopped" and third.began is None and third.result is None
        assert second.queue_position == 1
    finally:
        gate.set()


def test_a_watched_job_stops_inside_a_pass_and_ends_stopped(model, bank, task):
    from core.analysis.interference import interference
    from dashboard.state import BackgroundJob

    job = BackgroundJob("interference", lambda job: interference(model, bank, task, n_samples=30),
                        model=model, meter=Meter(_price(1e-3, 1e-3, 1e-3), interference_work(len(bank), 30)))
    job.stop.set()  # before its first block: nothing is computed
    job.heavy = False
    job._work()
    assert job.status == "stopped" and job.result is None and job.meter.done == 0
