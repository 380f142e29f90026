import json
import os
import subprocess
import sys

import pytest

import reproduce


@pytest.mark.parametrize("machine", ["tiny", "cpu"])
def test_every_command_of_a_plan_parses_with_its_files_own_parser(machine, tmp_path, capsys):
    reproduce.main([machine, "--out", str(tmp_path), "--dry-run"])
    out = capsys.readouterr().out
    rows = reproduce.plan(machine, str(tmp_path))
    assert f"{sum(len(r['runs']) for r in rows)} commands of {len(rows)} rows parse" in out
    assert not os.listdir(tmp_path)  # a dry run writes nothing
    methods = [r["method"] for r in rows]
    assert (
        methods[0].startswith("encoder")
        and "repa.py" in methods
        and "decoupled_latent.py" in methods
    )
    pairs = {r["method"]: r["pair"] for r in rows}
    assert pairs["repa.py"] == ("fd", "fd_control", "lower") and pairs["rcg.py"] == (
        "fd",
        "fd_control",
        "lower",
    )
    assert any("--proj-coeff" in a for a in sum((r["runs"] for r in rows), []))  # REPA's control
    if machine == "cpu":
        # REPA's pair at three seeds, its target the encoder's 4x4 map; RAE on random-vit-s@56
        assert {"repa.py (seed 1)", "repa.py (seed 2)", "rae.py (random-vit-s@56)"} <= set(methods)
        runs = {r["method"]: r["runs"] for r in rows}
        assert str(tmp_path / "enc.pt@32") in runs["repa.py"][0]
        assert not any("--encoder" in argv for argv in runs["rae.py (random-vit-s@56)"])
        assert all("pixels@16" in argv for r in rows for argv in r["runs"] if argv[1] == "eval")
    assert pairs["decoupled_latent.py (swap)"] == ("swap_pattern_B", "swap_pattern_A", "higher")


def test_each_row_reads_its_run_and_its_own_control(tmp_path):
    """The second seed's REPA row reads its own control (sit_s1), not seed 0's."""
    rows = {r["method"]: r for r in reproduce.plan("cpu", str(tmp_path))}
    for name, fd in (("repa", 10.0), ("sit", 20.0), ("repa_s1", 11.0), ("sit_s1", 21.0)):
        os.makedirs(tmp_path / name)
        by_signal = [[s, fd / 100] for s in (0.1, 0.25, 0.5, 0.75, 0.9)]
        r = dict(fd=fd, probe_linear=fd / 100, probe_linear_by_signal=by_signal)
        json.dump(r, open(tmp_path / name / "eval.json", "w"))
    for method, fd, control in (("repa.py", 10.0, 20.0), ("repa.py (seed 1)", 11.0, 21.0)):
        row = rows[method]
        fig = row["read"](json.load(open(row["result"])))
        assert fig["fd"] == fd and fig["fd_control"] == control
        assert fig["probe_linear_control"] == control / 100
        assert len(fig["probe_linear_by_signal"]) == 5 and "probe_linear_by_t" not in fig


def test_a_command_that_does_not_parse_stops_the_plan_before_anything_runs(
    tmp_path, monkeypatch, capsys
):
    real = reproduce.plan
    bad = [["repa.py", "train", "--nope"]]
    monkeypatch.setattr(reproduce, "plan", lambda m, out: [dict(real(m, out)[0], runs=bad)])
    with pytest.raises(SystemExit) as e:
        reproduce.main(["tiny", "--out", str(tmp_path)])
    assert e.value.code == 2 and "--nope" in capsys.readouterr().err and not os.listdir(tmp_path)


def test_held_judges_pairs_by_their_paired_differences():
    """Three seeds of one comparison: the mean of the paired differences against its standard error
    (by hand), and a comparison run once against the standard deviation of those differences."""
    fd = ("fd", "fd_control", "lower")

    def repa(seed, ours, control, probe, probe_control):
        name = "repa.py" if seed == 0 else f"repa.py (seed {seed})"
        return dict(
            method=name,
            pair=fd,
            fd=ours,
            fd_control=control,
            probe_linear=probe,
            probe_linear_control=probe_control,
        )

    rows = [
        repa(0, 9.0, 11.0, 0.30, 0.28),
        repa(1, 10.0, 10.0, 0.32, 0.29),
        repa(2, 9.5, 10.5, 0.31, 0.30),
    ]
    stats = reproduce.paired(rows)["repa.py"]
    # relative differences (control - ours) / mean: 0.2, 0, 0.1
    assert stats["fd"]["differences"] == [0.2, 0.0, 0.1]
    assert stats["fd"]["mean"] == pytest.approx(0.1) and stats["fd"]["sd"] == pytest.approx(0.1)
    assert stats["fd"]["se"] == pytest.approx(0.1 / 3**0.5, abs=1e-4)
    assert stats["fd"]["t"] == pytest.approx(1.73, abs=0.01) and stats["fd"]["t95"] == 2.92
    # the probe's paired differences of the same rows: 0.02, 0.03, 0.01
    assert stats["probe"]["mean"] == pytest.approx(0.02) and stats["probe"]["sd"] == 0.01
    all_stats = reproduce.paired(rows)
    assert not reproduce.held(rows[0], all_stats)  # t = 1.73 < 2.92: not held, at every seed
    consistent = [repa(k, 9.0 + 0.1 * k, 11.0, 0.3, 0.3) for k in range(3)]
    assert all(reproduce.held(r, reproduce.paired(consistent)) for r in consistent)
    # a pair run once: its difference against 2.92 x the sd of the paired differences of its kind
    once = dict(method="rae.py", pair=fd, fd=9.0, fd_control=13.0)  # 4 / 11 = 0.36 > 0.292
    assert reproduce.held(once, all_stats)
    assert not reproduce.held(dict(once, fd_control=11.0), all_stats)  # 0.2 < 0.292
    probe = dict(method="soda.py", pair=("probe_linear", "probe_linear_init", "higher"))
    assert reproduce.held(dict(probe, probe_linear=0.3, probe_linear_init=0.25), all_stats)
    assert not reproduce.held(dict(probe, probe_linear=0.3, probe_linear_init=0.28), all_stats)
    # no measure of its kind: the direction alone
    swap = dict(method="swap", pair=("swap_pattern_B", "swap_pattern_A", "higher"))
    assert reproduce.held(dict(swap, swap_pattern_B=0.5, swap_pattern_A=0.1), all_stats)
    assert reproduce.held(dict(once, error="exit 1"), all_stats) is None
    assert reproduce.best_signal([[0.1, 0.2], [0.5, 0.4], [0.9, 0.3]]) == 0.5


def test_table_and_figure_show_each_pair(tmp_path):
    rows = [
        dict(
            method="repa.py",
            minutes=1.0,
            fd=100.0,
            fd_control=110.0,
            probe_linear=0.3,
            probe_linear_init=0.2,
            probe_linear_control=0.28,
            probe_linear_pixels=0.25,
            probe_knn_pixels=0.2,
            detail_pattern=0.1,
            detail_pattern_init=0.05,
            detail_pattern_pixels=0.72,
            detail_pattern_blurred=0.0,
            detail_amplitude=0.02,
            detail_amplitude_pixels=0.39,
            detail_amplitude_blurred=0.0,
            probe_linear_by_signal=[[0.25, 0.25], [0.75, 0.3]],
            claim="aligned is better",
            pair=("fd", "fd_control", "lower"),
            held=True,
        )
    ]
    swap = {
        name: dict(pattern_A=0.1, pattern_B=0.6, class_A=0.9, class_B=0.1, psnr_A=20.9)
        for name in reproduce.SWAPS
    }
    swap["all"]["psnr_A"] = 25.5
    rows.append(
        dict(
            method="decoupled_latent.py (swap)",
            swap=swap,
            swap_control={name: dict(v, pattern_B=0.2) for name, v in swap.items()},
        )
    )
    stats = {
        "repa.py": {
            "fd": dict(
                seeds=3, differences=[0.1, 0.0, 0.2], mean=0.1, sd=0.1, se=0.0577, t=1.73, t95=2.92
            )
        }
    }
    md = reproduce.table(rows, stats)
    assert "| repa.py | 1 | 100 (110) | 0.3 (0.2) |" in md and "| 0.1 (0.05) | 0.02 |" in md
    assert "| yes |" in md and "repa.py, fd over 3 seeds" in md and "t = 1.73 against 2.92" in md
    # the detail's ceiling and floor
    assert "| raw pixels (probe: floor; detail: ceiling) | | | 0.25 | 0.2 | 0.72 | 0.39 |" in md
    assert "blurred, sigma 1.5 px (detail: floor) | | | | | 0 | 0 |" in md
    # the split's own test: split, then control
    assert "| z_d from B | 0.1 | 0.6 | 0.9 | 0.1 | 0.1 | 0.2 | 0.9 | 0.1 |" in md
    assert "25.5 dB with z_d, 20.9 dB without" in md
    # the signal fraction with the highest probe
    assert "| best signal |" in md and "| 0.75 |" in md
    reproduce.svg(rows, tmp_path / "f.svg")
    svg = open(tmp_path / "f.svg", encoding="utf-8").read()
    assert svg.startswith("<svg") and svg.count("<circle") == 2 and "<polyline" in svg
    assert "A decoded with z_d from B" in svg and svg.count('fill="#1f5fbf"/>') >= 2
    assert "signal a/(a+s) in the input" in svg


def test_tiny_rows_run_and_a_failed_row_runs_again_resuming_its_training(
    tmp_path, capsys, monkeypatch
):
    """One row with a pair (soda.py: its probe against the same encoder at initialisation), run,
    read again, and after a failed eval run again: its training resumed, its eval run (the rerun's
    commands recorded, not run). Every row's commands are parsed by
    test_every_command_of_a_plan_parses."""
    reproduce.main(["tiny", "--out", str(tmp_path), "--only", "soda.py"])
    res = json.load(open(tmp_path / "results.json"))
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["soda.py"] and res["cpus"] >= 1
    r = rows["soda.py"]
    assert "error" not in r and r["command"].startswith("python soda.py train")
    assert (
        r["fd"] is not None
        and r["probe_linear_init"] is not None
        and r["probe_linear_pixels"] is not None
    )
    assert r["held"] in (True, False) and len(r["probe_linear_by_signal"]) == 5
    assert "| soda.py |" in open(tmp_path / "table.md").read()
    capsys.readouterr()
    reproduce.main(["tiny", "--out", str(tmp_path), "--only", "soda.py"])
    assert "$ python" not in capsys.readouterr().out  # a finished row is read again, not rerun
    evaluated = open(tmp_path / "soda" / "eval.json").read()
    os.remove(tmp_path / "soda" / "eval.json")  # as if its eval had failed (an offline download)
    json.dump(dict(res, rows=[dict(r, error="exit 2")]), open(tmp_path / "results.json", "w"))
    ran, real_run = [], subprocess.run

    def rerun(cmd, **kwargs):  # the row's commands recorded, not run again (eval: its file back)
        if cmd[0] != sys.executable:
            return real_run(cmd, **kwargs)
        ran.append(cmd[1:3] + ["--resume"] * ("--resume" in cmd))
        if cmd[2] == "eval":
            open(tmp_path / "soda" / "eval.json", "w").write(evaluated)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", rerun)
    reproduce.main(["tiny", "--out", str(tmp_path), "--only", "soda.py"])
    assert ran == [["soda.py", "train", "--resume"], ["soda.py", "eval"]]
    assert "error" not in json.load(open(tmp_path / "results.json"))["rows"][-1]
    with pytest.raises(SystemExit) as e:
        reproduce.main(["tiny", "--out", str(tmp_path), "--only", "nope.py"])
    assert e.value.code == 2


def test_bench_times_a_files_own_train_command(capsys):
    reproduce.main(
        ["bench", "--files", "jit_xpred.py", "--preset", "tiny", "--steps", "2", "--warmup", "1"]
    )
    row = json.loads(
        [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1]
    )
    assert row["file"] == "jit_xpred.py" and row["img_per_s"] > 0 and row["gflop_per_image"] > 0


def test_bench_data_runs_on_a_cpu(tmp_path, capsys):
    reproduce.main(["bench-data", "--root", str(tmp_path), "--sets", "100x16", "--batches", "3"])
    rows = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")
    ]
    first, later = rows[0], rows[1]
    assert first["start"] == "first" and later["start"] == "later" and first["images"] == 100
    assert (
        later["read_batches_per_s"] > 0 and later["batch_per_s"] > 0 and later["rss_anon_gib"] > 0
    )
    with pytest.raises(SystemExit) as e:
        reproduce.main(["bench-data", "--root", str(tmp_path), "--sets", "300by16"])
    assert e.value.code == 2


def test_paper_runs_print_their_commands_and_estimate(tmp_path, capsys, monkeypatch):
    """`paper --dry-run`: every file's paper preset parses with its file's own parser; the
    estimate is the FLOPs of a step at the run's own batch times its steps over the GPUs' rate."""
    reproduce.main(["paper", "--dry-run", "--no-estimate", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    for file in ("jit_xpred.py", "consistency.py", "repa.py", "soda.py", "rae.py", "rcg.py"):
        assert f"{file} train" in out and "--preset paper" in out, file
    assert "--preset paper-L" in out and "--preset paper-B" in out
    assert not os.listdir(tmp_path)

    # 1 TFLOP a step at batch 2: the run's batch scales it
    monkeypatch.setattr(reproduce, "step_flops", lambda argv, folder, save=True: 1e12)
    argv = ["paper", "--dry-run", "--out", str(tmp_path), "--only", "consistency.py", "--gpus", "4"]
    reproduce.main(argv)
    row = json.loads([line for line in capsys.readouterr().out.splitlines() if "{" in line][-1])
    # consistency.py's paper preset: ECT's batch 128 and 225,000 steps
    assert (row["batch"], row["steps"]) == (128, 225_000)
    seconds = 1e12 * 128 / 2 * 225_000 / (4 * reproduce.MFU * reproduce.PEAK["H100"])
    assert row["tflop_per_step"] == 64.0 and row["minutes"] == round(seconds / 60, 1)
