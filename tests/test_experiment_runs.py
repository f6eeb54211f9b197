"""The experiment runners end to end at toy size: a sweep run stores what its table and the README read (KD and
GPD, the latter with its dynamic teacher and an exact extraction), the table is rebuilt from the runs, a run cut
off resumes, the convergence table pairs its changes by seed, and the selection experiment's cells (rounds,
views) run and are tabled with their calls-to-match."""

from __future__ import annotations

import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import convergence  # noqa: E402
import select_budget  # noqa: E402
import sweep_budget  # noqa: E402
import sweep_report  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One KD and one GPD run of the CPU protocol shortened to 1 epoch, budget 64 (one step), one cache."""
    tmp = tmp_path_factory.mktemp("sweep")
    cfg = dict(sweep_budget.PROTOCOLS["cpu"], epochs=1, accelerator="cpu", protocol="cpu")
    return tmp, [sweep_budget.run_one(64, m, 0, cfg, tmp / "out", tmp / "cache", 1) for m in ("kd", "gpd")]


def test_a_sweep_run_stores_its_result_and_the_table_is_rebuilt_from_the_runs(runs):
    tmp, (kd, gpd) = runs
    assert kd["new_teacher_calls"] == 64 and gpd["new_teacher_calls"] == 0  # one fill, shared by the seed's runs
    for r in (kd, gpd):
        assert r["steps"] == 1 and r["best_epoch"] == 1 and len(r["val_acc_curve"]) == 1
        assert 0 <= r["test_acc"] <= 1 and r["protocol"]["channels_last"] is True
        assert r["machine"]["torch_threads"] == 1 and r["machine"]["cpu_model"]  # where it ran, for a rerun's gap
        stored = json.loads((tmp / "out" / "runs" / f"64-{r['method']}-0.json").read_text())
        assert stored["test_acc"] == r["test_acc"]
    assert 0 <= gpd["dt_test_acc"] <= 1 and gpd["extracted_max_abs_diff"] <= 1e-5
    table = sweep_report.report(tmp / "out")
    assert "| kd | " in table and "| gpd | " in table and "| gpd/dt | " in table
    assert (tmp / "out" / "accuracy_vs_budget.png").stat().st_size > 0


def test_convergence_changes_are_paired_by_seed():
    def run(seed, acc):
        return {"seed": seed, "test_acc": acc / 100, "best_epoch": 1}

    runs = {("kd", 2000, 100): [run(0, 60.0), run(1, 64.0), run(2, 62.0)],
            ("kd", 2000, 150): [run(0, 61.0), run(2, 62.5)], ("kd", 1000, 150): [run(0, 50.0)]}
    rows = convergence.table(runs).splitlines()
    assert rows[2].startswith("| kd | 1000 | 150 | 50.00 ± 0.00 | 0: 50.00 | – |")  # another budget: no pairing
    assert rows[3].startswith("| kd | 2000 | 100 | 62.00 ± 1.63 | 0: 60.00, 1: 64.00, 2: 62.00 | – |")
    # the means of different seed sets differ by -0.25; paired over seeds 0 and 2 the change is (1.0 + 0.5) / 2
    assert rows[4].startswith("| kd | 2000 | 150 | 61.75 ± 0.75 | 0: 61.00, 2: 62.50 | +0.75 (n=2) |")


def test_a_stored_run_counts_as_done_only_under_the_same_protocol(runs):
    tmp, _ = runs
    cfg = dict(sweep_budget.PROTOCOLS["cpu"], epochs=1, accelerator="cpu", protocol="cpu")
    runs = tmp / "out" / "runs"
    assert sweep_budget._done(runs / "64-kd-0.json", cfg)
    assert not sweep_budget._done(runs / "64-kd-1.json", cfg)  # never run
    with pytest.raises(SystemExit, match=r"another protocol \(epochs: 1 there, 300 now\)"):
        sweep_budget._done(runs / "64-kd-0.json", dict(cfg, epochs=300))
    # how it was computed is not the protocol: another layout, evaluation batch or accelerator is the same run
    assert sweep_budget._done(runs / "64-kd-0.json", dict(cfg, channels_last=False, eval_batch_size=512,
                                                          accelerator="auto"))


def test_a_run_cut_off_after_an_epoch_resumes_from_its_last_checkpoint(runs):
    import subprocess

    import torch

    tmp, _ = runs
    cfg = dict(sweep_budget.PROTOCOLS["cpu"], epochs=3, accelerator="cpu", protocol="cpu")
    out, cache = tmp / "resume", tmp / "cache"
    # The child dies hard (no cleanup, like a kill) right after epoch 2's last checkpoint is written.
    child = f"""
import os, sys
sys.path.insert(0, {str(Path(sweep_budget.__file__).parent)!r})
import sweep_budget
from lightning.pytorch.callbacks import ModelCheckpoint
save = ModelCheckpoint.on_train_epoch_end
def save_then_die(self, trainer, module):
    save(self, trainer, module)
    if trainer.current_epoch == 1 and self.filename == "last":
        os._exit(9)
ModelCheckpoint.on_train_epoch_end = save_then_die
sweep_budget.run_one(64, "kd", 0, {cfg!r}, sweep_budget.Path({str(out)!r}), sweep_budget.Path({str(cache)!r}), 1)
"""
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 9, proc.stderr[-3000:]
    last = out / "ckpt" / "64-kd-0" / "last.ckpt"
    assert not (out / "runs" / "64-kd-0.json").exists()
    cut = next(v for k, v in torch.load(last, weights_only=False)["callbacks"].items() if "ValCurve" in k)
    assert len(cut["acc"]) == 2 and cut["seconds"] > 0

    r = sweep_budget.run_one(64, "kd", 0, cfg, out, cache, 1)
    assert r["resumed_at_epoch"] == 2 and r["steps"] == 3 and r["new_teacher_calls"] == 0
    assert r["val_acc_curve"][:2] == [round(a, 4) for a in cut["acc"]] and len(r["val_acc_curve"]) == 3
    assert r["fit_seconds"] > cut["seconds"]
    assert r["devices"] == [{"device": "cpu", "from_epoch": 1}, {"device": "cpu", "from_epoch": 3}]  # two stretches
    assert not last.parent.exists() and (out / "runs" / "64-kd-0.json").exists()  # checkpoints gone once stored


def test_a_worker_exits_when_its_sweep_is_killed_keeping_its_checkpoint_and_freeing_its_lease(runs, tmp_path):
    """``kill -9`` of a sweep runs no handler: its worker notices the dead parent and exits after its batch (no JSON,
    its lease free, its ``last.ckpt`` kept) instead of training on beside the next sweep."""
    import os
    import subprocess

    tmp, _ = runs
    cfg = dict(sweep_budget.PROTOCOLS["cpu"], epochs=1000, accelerator="cpu", protocol="cpu")
    out, cache = tmp / "orphan", tmp / "cache"
    last = out / "ckpt" / "64-kd-0" / "last.ckpt"
    sweep = tmp_path / "sweep.py"  # a sweep's parent: one spawned worker, killed once the run has a checkpoint
    sweep.write_text(f"""
import os, signal, sys, time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
sys.path.insert(0, {str(Path(sweep_budget.__file__).parent)!r})
import sweep_budget
if __name__ == "__main__":
    pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"))
    pool.submit(sweep_budget.run_one, 64, "kd", 0, {cfg!r}, Path({str(out)!r}), Path({str(cache)!r}), 1)
    while not Path({str(last)!r}).exists():
        time.sleep(0.2)
    print("WORKER", *pool._processes, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")
    log = tmp_path / "sweep.log"  # a file, not a pipe: the worker inherits it and need not exit for us to read it
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, str(sweep)], stdout=f, stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == -9, log.read_text()[-3000:]
    worker = int(log.read_text().split("WORKER", 1)[1].split()[0])

    def running(pid: int) -> bool:  # an exited worker reparented to a PID 1 that does not reap it is a zombie
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 120
    while running(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = running(worker)
    if alive:
        os.kill(worker, 9)
    assert not alive, "the worker went on training after its sweep was killed"
    assert last.exists() and not (out / "runs" / "64-kd-0.json").exists()
    from lightning_kd.cache.lock import WriterLease

    WriterLease(out / "ckpt", "64-kd-0").release()  # free: the next sweep can claim the run and resume it


def test_a_run_stores_its_whole_curve_when_the_best_epoch_is_not_the_last(runs, monkeypatch):
    """Testing at the best checkpoint restores the callbacks' state from it; the stored curve must not shrink to it."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    tmp, _ = runs
    monkeypatch.setattr(ModelCheckpoint, "check_monitor_top_k", lambda self, trainer, current=None:
                        trainer.current_epoch == 0)  # the best checkpoint is epoch 1's, whatever the accuracies
    cfg = dict(sweep_budget.PROTOCOLS["cpu"], epochs=3, accelerator="cpu", protocol="cpu")
    r = sweep_budget.run_one(64, "kd", 0, cfg, tmp / "whole-curve", tmp / "cache", 1)
    assert len(r["val_acc_curve"]) == 3 and r["steps"] == 3
    assert r["devices"] == [{"device": "cpu", "from_epoch": 1}]


def test_two_sweeps_started_at_once_train_a_run_once(runs):
    """Two processes asked for the same run at the same instant (two sweeps over one --out): one trains it and
    stores its JSON, the other skips it (None) or, if it comes after the first finished, returns the stored run."""
    import subprocess
    import time

    tmp, _ = runs
    cfg = dict(sweep_budget.PROTOCOLS["cpu"], epochs=1, accelerator="cpu", protocol="cpu")
    out, cache = tmp / "overlap", tmp / "cache"
    start = time.time() + 15  # both children import Lightning first, then start together
    child = f"""
import json, sys, time
sys.path.insert(0, {str(Path(sweep_budget.__file__).parent)!r})
import sweep_budget
train = sweep_budget._train
def counted(*args):
    print("TRAINED", flush=True)
    return train(*args)
sweep_budget._train = counted
time.sleep(max({start!r} - time.time(), 0))
r = sweep_budget.run_one(64, "kd", 0, {cfg!r}, sweep_budget.Path({str(out)!r}), sweep_budget.Path({str(cache)!r}), 1)
print("RESULT", json.dumps(r))
"""
    procs = [subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outputs]
    assert sum(o.count("TRAINED") for o, _ in outputs) == 1
    stored = json.loads((out / "runs" / "64-kd-0.json").read_text())
    results = [json.loads(o.split("RESULT ", 1)[1]) for o, _ in outputs]
    assert stored in results and all(r in (None, stored) for r in results)
    assert not (out / "ckpt" / "writers" / "64-kd-0.lock").exists() and not (out / "ckpt" / "64-kd-0").exists()


def test_readme_blocks_are_replaced_between_their_markers_and_a_missing_one_is_named(tmp_path):
    import readme

    doc = tmp_path / "README.md"
    doc.write_text("intro\n<!-- t: make.py -->\nold\nrows\n<!-- /t -->\nafter\n<!-- u -->\nx\n<!-- /u -->\n")
    readme.fill("t", "| new |\n", doc)
    assert doc.read_text() == "intro\n<!-- t: make.py -->\n| new |\n<!-- /t -->\nafter\n<!-- u -->\nx\n<!-- /u -->\n"
    with pytest.raises(SystemExit, match="no block <!-- v: ... -->"):
        readme.fill("v", "y", doc)


def test_the_sweep_table_keeps_the_methods_and_budgets_asked_for():
    def run(method, budget, seed, acc, best_epoch=10):
        return {"method": method, "budget": budget, "seed": seed, "test_acc": acc / 100, "fit_seconds": 600.0,
                "best_epoch": best_epoch, "epochs": 20}

    runs = [run("kd", 1000, 0, 50.0), run("kd", 2000, 0, 60.0, 12), run("kd", 2000, 1, 62.0, 17),
            run("ce", 2000, 0, 55.0)]
    text, csv = sweep_report.table(runs, ["kd", "dist"], [2000])
    assert text.splitlines()[:3] == ["| method | budget 2000 |", "|---|---|", "| kd | 61.00 ± 1.00 (n=2, 10 min) |"]
    assert "| ce |" not in text and "| dist |" not in text and "2 runs" in text
    assert csv.splitlines()[1] == "kd,2000,61.000,1.000,2,600.0,1"
    assert "Best-validation epochs (min–max over runs): kd 12–17 of 20." in text
    assert "CPUs:" not in text  # these runs did not record their machine


def test_the_sweep_table_says_which_cpus_its_runs_had():
    def run(seed, cpu, devices=None):
        return {"method": "kd", "budget": 2000, "seed": seed, "test_acc": 0.6, "fit_seconds": 600.0,
                "machine": {"cpu_model": cpu}, "devices": devices or [{"device": "cpu", "from_epoch": 1}]}

    runs = [run(0, "Xeon"), run(1, "EPYC"), run(2, "Xeon"), run(3, "EPYC", [{"device": "cuda:0", "from_epoch": 1}])]
    text, _ = sweep_report.table(runs)
    assert "CPUs: Xeon (2 runs), EPYC (1 runs).\n" in text  # the GPU run's CPU timed nothing


def test_a_cell_with_gpu_epochs_shows_no_cpu_time():
    gpu_then_cpu = [{"device": "cuda:0", "from_epoch": 1}, {"device": "cpu", "from_epoch": 251}]
    runs = [{"method": "kd", "budget": 4000, "seed": s, "test_acc": 0.7, "fit_seconds": 900.0, "devices": devices}
            for s, devices in ((0, gpu_then_cpu), (1, [{"device": "cpu", "from_epoch": 1}]))]
    runs.append({"method": "ce", "budget": 4000, "seed": 0, "test_acc": 0.6, "fit_seconds": 1200.0, "device": "cpu"})
    text, csv = sweep_report.table(runs)
    assert "| ce | 60.00 ± 0.00 (n=1, 20 min) |" in text and "| kd | 70.00 ± 0.00 (n=2, GPU) |" in text
    assert "3 runs, 0.58 h of CPU fit time in all" in text  # 1200 s + 900 s: the GPU run's time is left out
    assert "GPU: 1 runs ran at least partly on a GPU" in text
    assert csv.splitlines()[1:] == ["ce,4000,60.000,0.000,1,1200.0,1", "kd,4000,70.000,0.000,2,900.0,0"]


def test_ckd_is_compared_with_each_method_seed_by_seed():
    def run(method, seed, acc):
        return {"method": method, "budget": 2000, "seed": seed, "test_acc": acc / 100}

    runs = [run("ckd", 0, 68.0), run("ckd", 1, 69.0), run("ckd", 2, 67.0), run("kd", 0, 66.0), run("kd", 1, 66.5),
            run("kd", 2, 68.0), run("ce", 0, 61.0), run("ce", 1, 60.0), run("dist", 3, 60.0)]
    rows = sweep_report.paired(runs, "ckd", ["kd", "ce", "dist"]).splitlines()
    assert rows[0] == "| ckd minus | budget 2000 |"
    assert rows[2] == "| kd | +1.17 (+2.0, +2.5, -1.0; ahead on 2 of 3) |"
    assert rows[3] == "| ce | +8.00 (+7.0, +9.0; ahead on 2 of 2) |"  # seed 2 has no CE run: not paired
    assert len(rows) == 4  # dist shares no seed with ckd: no row


def test_calls_to_match_interpolates_between_the_budgets_run():
    means = {1000: 60.0, 1500: 64.0, 2000: 66.0}
    assert select_budget.calls_to_match(means, 65.0) == "1750"  # halfway from 64 (1,500) to 66 (2,000)
    assert select_budget.calls_to_match(means, 62.0) == "1250"
    assert select_budget.calls_to_match(means, 59.0) == "≤ 1000"
    assert select_budget.calls_to_match(means, 67.0) == "> 2000"


def test_a_retrain_trains_a_new_student_on_what_its_chooser_bought_with_no_teacher_call(runs):
    tmp, _ = runs
    cfg = dict(sweep_budget.PROTOCOLS["cpu"], epochs=1, accelerator="cpu", protocol="cpu")
    chooser = select_budget.Cell(64, "kd", "random", 1)
    retrain = chooser._replace(retrain=True)
    # a lane beside the chooser's must not train on a purchase still being made: the retrain waits for its result
    assert select_budget.run_cell(retrain, 0, cfg, tmp / "select", tmp / "select-cache", 1) is None
    assert not (tmp / "select" / "runs" / f"{retrain.name(0)}.json").exists()
    assert not (tmp / "select-cache" / chooser.name(0)).exists()
    first = sweep_budget.run_one(64, "kd", 0, cfg, tmp / "select", tmp / "cache", 1,
                                 **chooser.run_args(0, tmp / "select-cache"))
    r = sweep_budget.run_one(64, "kd", 0, cfg, tmp / "select", tmp / "cache", 1,
                             **retrain.run_args(0, tmp / "select-cache"))
    assert first["new_teacher_calls"] == 64 and r["new_teacher_calls"] == 0 and r["train_samples"] == 64
    assert r["selection"] == {"selection": "cached"} and select_budget.Cell.of(r) == retrain
    assert retrain.name(0) == "64-kd-random-r1-retrain-0"
    text, csv = select_budget.table([first, r])
    assert "| 64 | kd | random | 1, retrained | 1 |" in text
    assert csv.splitlines()[2].startswith("64,kd,random,1,1,True,1,False,")
    # a chooser that ran on another machine left no cache here: its retrain is skipped, not trained on nothing
    shutil.rmtree(tmp / "select-cache" / chooser.name(0))
    assert select_budget.run_cell(retrain, 0, cfg, tmp / "select", tmp / "select-cache", 1) is None


def test_a_view_cell_runs_and_selection_cells_are_tabled_with_calls_to_match(runs):
    tmp, _ = runs
    cfg = dict(sweep_budget.PROTOCOLS["cpu"], epochs=1, accelerator="cpu", protocol="cpu")
    cell = select_budget.Cell(64, "kd", "random", 1, views=2, matched=True)
    r = sweep_budget.run_one(64, "kd", 0, cfg, tmp / "select", tmp / "cache", 1,
                             **cell.run_args(0, tmp / "select-cache"))
    assert select_budget.Cell.of(r) == cell and r["new_teacher_calls"] == 64 and r["steps"] == 1
    assert r["train_samples"] == 32  # 64 calls = 32 samples x 2 views

    def strategy_run(budget, strategy, seed, acc):  # what a rounds run stores (see run_one)
        log = [{"round": 0, "replayed": False, "score_s": 0.0}, {"round": 1, "replayed": False, "score_s": 3.0}]
        return {"budget": budget, "method": "kd", "seed": seed, "test_acc": acc / 100, "fit_seconds": 60.0,
                "selection": {"selection": strategy, "rounds": 4}, "rounds_log": log}

    def retrained(run, acc):  # what a retrain of that run stores
        return {**run, "test_acc": acc / 100, "selection": {"selection": "cached"}, "rounds_log": [],
                "chosen_by": select_budget.Cell.of(run)._asdict()}

    done = [strategy_run(2000, "class_balanced", 0, 65.0), strategy_run(2000, "class_balanced", 1, 67.0),
            strategy_run(1000, "margin", 0, 62.0), strategy_run(2000, "margin", 0, 68.0), r]
    done += [retrained(done[0], 70.0), retrained(done[2], 66.0), retrained(done[3], 72.0)]
    text, csv = select_budget.table(done)
    assert "| 2000 | kd | class_balanced | 4 | 1 | 66.00 ± 1.00 | 2 | 3.0 | 1 |" in text
    assert "| 2000 | kd | class_balanced | 4, retrained | 1 | 70.00 ± 0.00 | 1 | 0.0 | 1 |" in text
    assert "| 64 | kd | random | 1 | 2 matched |" in text and len(csv.splitlines()) == 8
    # class-balanced at 2,000: 66.0; margin goes 62 -> 68 from 1,000 to 2,000 calls: 66.0 at 1,667
    assert "| margin | kd | 4 | 1000, 2000 | 1667 |" in text
    # retrained students are matched against the retrained reference (70.0): margin 66 -> 72, 70.0 at 1,667 too
    assert "| margin | kd | 4, retrained | 1000, 2000 | 1667 |" in text


def test_the_command_line_plans_each_retrain_after_its_chooser_and_the_view_cells_with_their_reference():
    args = select_budget.parser().parse_args(["--budgets", "2000", "--strategies", "margin", "--buy-within", "0.2",
                                              "--retrain", "--views", "1", "2"])
    chooser = select_budget.Cell(2000, "kd", "margin", 4, buy_within=0.2)
    reference = select_budget.Cell(2000, "kd", "random", 1)  # V = 1, bought before training: no retrain
    assert select_budget.plan(args) == [chooser, chooser._replace(retrain=True), reference,
                                        reference._replace(views=2), reference._replace(views=2, matched=True)]
    only_views = select_budget.parser().parse_args(["--strategies", "--views", "4", "--views-budget", "1000"])
    assert [(c.budget, c.views, c.matched) for c in select_budget.plan(only_views)] == [(1000, 1, False),
                                                                                        (1000, 4, False),
                                                                                        (1000, 4, True)]


def test_a_retrain_starts_only_once_its_chooser_has_returned_even_with_a_worker_free():
    chooser = select_budget.Cell(2000, "kd", "margin", 4, buy_within=0.2)
    done_before = select_budget.Cell(2000, "kd", "badge", 4, buy_within=0.2)  # its chooser is not in this command
    todo = [(chooser, 0), (chooser._replace(retrain=True), 0), (done_before._replace(retrain=True), 0)]
    finished, started = set(), []

    def run(cell, seed):
        started.append((cell.name(seed), cell.chooser() in finished))
        time.sleep(0.05 if cell.retrain else 0.3)
        finished.add(cell)
        return cell.name(seed)

    with ThreadPoolExecutor(2) as pool:  # two workers: the retrain would start beside its chooser
        results = list(select_budget.run_all(todo, pool, run))
    assert sorted(results) == sorted(c.name(seed) for c, seed in todo)
    assert started[0] == (chooser.name(0), False)
    assert (done_before.name(0).replace("-0", "-retrain-0"), False) in started  # not held back: nothing to wait for
    assert started[-1] == (chooser._replace(retrain=True).name(0), True)  # after its chooser returned


def test_evidence_contrasts_pair_by_seed_and_leave_out_pairs_with_no_shared_seed():
    def run(method, seed, acc):
        return {"method": method, "budget": 2000, "seed": seed, "test_acc": acc / 100}

    runs = [run("ckd_hint", 0, 68.0), run("ckd_hint", 1, 66.0), run("hint", 0, 67.0), run("hint", 1, 66.5),
            run("crd", 2, 65.0), run("kd", 1, 64.0)]
    rows = sweep_report.contrasts(runs, (("ckd_hint", "hint"), ("crd", "kd"), ("gpd_ckd", "gpd")), 2000).splitlines()
    assert rows == ["| a minus b, budget 2000 | difference |", "|---|---|",
                    "| ckd_hint minus hint | +0.25 (+1.0, -0.5; ahead on 1 of 2) |"]
    assert sweep_report.contrasts(runs, (("crd", "kd"),), 2000) == "No pair has finished yet.\n"


def test_each_results_folder_fills_only_its_own_readme_blocks_and_every_block_exists():
    readme_text = (Path(sweep_report.__file__).parents[1] / "README.md").read_text()
    names = [b for blocks in sweep_report.README_BLOCKS.values() for b in blocks]
    assert len(names) == len(set(names))  # no block is filled from two folders (two machines)
    for name in names:
        assert f"<!-- {name}: " in readme_text and f"<!-- /{name} -->" in readme_text
    assert set(sweep_report.EVIDENCE) >= {m for pair in sweep_report.EVIDENCE_CONTRASTS for m in pair}
    with pytest.raises(SystemExit, match="no result blocks for the runs in"):
        sweep_report.report(Path("/nonexistent/elsewhere/cpu"), readme=True)


def test_retrained_rows_are_paired_by_seed_with_the_up_front_draws():
    def run(strategy, seed, acc, rounds=4):
        cell = select_budget.Cell(2000, "kd", strategy, rounds, buy_within=0.2 if rounds > 1 else 1.0)
        record = ({"chosen_by": cell._asdict()} if rounds > 1 else
                  {"selection": {"selection": strategy, "rounds": 1}})
        return {"budget": 2000, "method": "kd", "seed": seed, "test_acc": acc / 100, "fit_seconds": 60.0,
                "rounds_log": [], **record}

    runs = [run("class_balanced", 0, 65.0), run("class_balanced", 1, 66.0), run("random", 0, 66.0),
            run("random", 1, 65.0), run("margin", 0, 66.5), run("margin", 1, 65.5), run("margin", 2, 70.0),
            run("random", 2, 64.0, rounds=1)]
    text, _ = select_budget.table(runs)
    lines = text.splitlines()
    assert ("| budget | method | strategy | rounds | minus class_balanced | minus random | minus random, up front |"
            in lines)
    rows = [line for line in lines if "retrained | " in line and "ahead on" in line]
    assert rows == [  # a row is not paired with itself; seed 2 has only the up-front reference
        "| 2000 | kd | random | 4 in first 20%, retrained | +0.00 (+1.0, -1.0; ahead on 1 of 2) | – | – |",
        "| 2000 | kd | class_balanced | 4 in first 20%, retrained | – | +0.00 (-1.0, +1.0; ahead on 1 of 2) | – |",
        "| 2000 | kd | margin | 4 in first 20%, retrained | +0.50 (+1.5, -0.5; ahead on 1 of 2) "
        "| +0.50 (+0.5, +0.5; ahead on 2 of 2) | +6.00 (+6.0; ahead on 1 of 1) |"]


def test_view_rows_are_paired_by_seed_with_one_view_per_sample():
    def run(seed, acc, views=1, matched=False):
        selection = {"selection": "random", "rounds": 1, "views_per_sample": views, "matched_views": matched}
        return {"budget": 2000, "method": "kd", "seed": seed, "test_acc": acc / 100, "fit_seconds": 60.0,
                "rounds_log": [], "selection": selection}

    runs = [run(0, 66.0), run(1, 65.0), run(0, 58.0, views=2), run(1, 59.5, views=2), run(2, 57.0, views=2),
            run(2, 45.0, views=2, matched=True)]
    lines = select_budget.table(runs)[0].splitlines()
    assert "| budget | views | minus 1 view |" in lines
    assert "| 2000 | 2 fresh | -6.75 (-8.0, -5.5; ahead on 0 of 2) |" in lines  # seed 2 has no reference
    assert not [line for line in lines if line.startswith("| 2000 | 2 matched | ")]  # no shared seed: no row
    assert "minus 1 view" not in select_budget.table(runs[2:])[0]  # no reference at all: no block
