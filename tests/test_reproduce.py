import json

import pytest
import torch

import common
import reproduce


def test_stripe_r2_reads_the_factors_of_the_probe_subsets():
    spec = "shapes:500"
    cols = [k for k, name in enumerate(common.FACTORS) if "stripe" in name]
    v_tr, v_te = common.shape_factors(spec, "train"), common.shape_factors(spec, "test")
    i, j = common.subset(len(v_tr), 300), common.subset(len(v_te), 100)  # what probe_data draws, any size
    f_tr, f_te = v_tr[i][:, cols] * 3 + 1, v_te[j][:, cols] * 3 + 1  # a representation that holds the stripes
    assert common.stripe_r2(f_tr, f_te, spec) > 0.99
    assert common.stripe_r2(torch.randn(300, 8), torch.randn(100, 8), spec) < 0.1
    res = common.probes(f_tr, torch.zeros(300, dtype=torch.long), f_te, torch.zeros(100, dtype=torch.long), "_x", spec)
    assert res["r2_stripes_x"] > 0.99 and "r2_stripes" not in common.probes(f_tr, torch.zeros(300, dtype=torch.long),
                                                                           f_te, torch.zeros(100, dtype=torch.long))


def test_tiny_plan_runs_every_file_and_writes_the_table(tmp_path, capsys):
    reproduce.main(["tiny", "--out", str(tmp_path)])
    res = json.load(open(tmp_path / "results.json"))
    methods = [r["method"] for r in res["rows"]]
    assert methods == ["jit_xpred.py (toy)", "consistency.py (toy)", "jit_xpred.py", "consistency.py", "soda.py",
                       "repa.py", "rae.py", "rcg.py", "decoupled_latent.py"]
    for r in res["rows"]:
        assert "error" not in r and r["minutes"] > 0 and r["command"].startswith("python ")
        assert set(r) >= {"method", "command", "minutes", "claim", "paper", "held"}
        if "toy" not in r["method"]:
            assert r["probe_linear"] is not None and r["r2_stripes"] is not None, r  # shapes: the detail column
            assert r["fd"] is not None and r["probe_linear_pixels"] is not None  # the pixels' floor in every row
            frozen = r["method"] in ("rae.py", "rcg.py")  # their representation is the frozen encoder: no init floor
            assert frozen or r["probe_linear_init"] is not None
    table = open(tmp_path / "table.md").read()
    assert table.count("\n") == 2 + len(methods) + 1 and "| rcg.py |" in table and "| raw pixels (floor) |" in table
    capsys.readouterr()
    with open(tmp_path / "rae" / "eval.json") as f:
        ev = json.load(f)
    with open(tmp_path / "rae" / "eval.json", "w") as f:
        json.dump({**ev, "probe_linear": 0.5}, f)
    reproduce.main(["tiny", "--out", str(tmp_path), "--only", "rae.py"])
    assert "$ python" not in capsys.readouterr().out  # a finished row is not run again, but read again
    rows = {r["method"]: r for r in json.load(open(tmp_path / "results.json"))["rows"]}
    assert rows["rae.py"]["probe_linear"] == 0.5 and len(rows) == len(methods)
    with pytest.raises(SystemExit) as e:
        reproduce.main(["tiny", "--out", str(tmp_path), "--only", "nope.py"])
    assert e.value.code == 2


def test_bench_runs_on_a_cpu(capsys):
    reproduce.main(["bench", "--batch", "1", "--steps", "1", "--warmup", "0", "--device", "cpu"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["model"] for r in rows] == ["JiT-B/2", "SiT-B/2 + REPA"] and all(r["img_per_s"] > 0 for r in rows)


def test_bench_data_runs_on_a_cpu(tmp_path, capsys):
    reproduce.main(["bench-data", "--root", str(tmp_path), "--sets", "300x16", "--batches", "3"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    first, later = rows[0], rows[1]
    assert first["start"] == "first" and later["start"] == "later" and first["images"] == 300
    assert later["read_batches_per_s"] > 0 and later["batch_per_s"] > 0 and later["rss_anon_gib"] > 0
    assert [r["preset"] for r in rows[2:]] == ["jit_xpred.py default", "repa.py default"]
    assert all(r["h100_steps_per_s_at_peak"] > 0 for r in rows[2:])
    with pytest.raises(SystemExit) as e:
        reproduce.main(["bench-data", "--root", str(tmp_path), "--sets", "300by16"])
    assert e.value.code == 2
