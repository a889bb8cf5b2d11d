"""paper_repro and the benchmark's command line: they run, at simulator size, and write what they promise.

The simulated runs check the scripts (sweeps, JSON, plots, the report), not performance: every number
in them is labelled as not a measurement. On a GPU the real runs are `python -m paper_repro`.
"""
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import SIMULATOR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout=900, sim=True):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    if sim:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("module", ["paper_repro", "numba_flash", "numba_flash.bench"])
def test_help_always_works_and_unknown_flags_are_refused(module):
    ok = _run(["-m", module, "--help"], timeout=120, sim=False)
    assert ok.returncode == 0 and "usage:" in ok.stdout, ok.stderr
    bad = _run(["-m", module, "--no-such-flag"], timeout=120, sim=False)
    assert bad.returncode == 2 and "unrecognized arguments" in bad.stderr


def test_tools_help_works_without_a_gpu():
    for tool in ("tune.py", "ptx_report.py", "sanitize.py"):
        r = _run([os.path.join("tools", tool), "--help"], timeout=120)
        assert r.returncode == 0 and "usage:" in r.stdout, (tool, r.stderr)


@pytest.mark.skipif(not SIMULATOR, reason="the simulated run; on a GPU run python -m paper_repro")
def test_paper_repro_simulated_run_writes_json_plots_and_report(tmp_path):
    out = tmp_path / "results" / "simulator"
    r = _run(["-m", "paper_repro", "--quick", "--out", str(out), "--only", "fig3_right", "theorem2",
              "fig2_middle", "table2"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "not measurements" in r.stdout
    for name in ("fig3_right", "theorem2", "fig2_middle", "table2"):
        data = json.loads((out / f"{name}.json").read_text())
        assert data["meta"]["simulated"] is True and "not measurements" in data["meta"]["note"]
        assert data["meta"]["command"].startswith("python -m paper_repro")
        png = (out / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    fits = json.loads((out / "theorem2.json").read_text())["fits"]
    # the analytic model is the theorem's two terms (plus the lse's 4 bytes a row): its own fit is close
    assert fits["numba_flash:model_bytes"]["rel_rms_residual"] < 1e-2
    report = (out / "REPORT.md").read_text()      # with --out, inside it: nothing is written outside it
    assert "## simulator" in report and "not measurements" in report
    assert "![theorem2](theorem2.png)" in report
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and p.parent != out) == []
    losses = [r["losses"] for r in json.loads((out / "table2.json").read_text())["rows"]]
    assert len(losses) == 2 and all(math.isfinite(x) for curve in losses for x in curve)
    assert max(abs(a - b) for a, b in zip(*losses)) < 1e-3    # same init, same data, exact attention


@pytest.mark.skipif(not SIMULATOR, reason="the simulated run")
def test_bench_simulate_prints_a_progress_bar_and_checks_against_float64():
    r = _run(["-m", "numba_flash.bench", "--simulate", "--seqlen", "32", "--causal", "0", "--pass", "fwd"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "SIMULATED" in r.stdout and "simulated configurations" in r.stderr


def test_report_is_built_from_saved_results_and_names_the_paper_numbers(tmp_path):
    from paper_repro import report
    folder = tmp_path / "results" / "some-gpu"
    folder.mkdir(parents=True)
    meta = {"gpu": "Some GPU", "torch": "x", "numba_cuda": "y", "numba_flash": "z", "date_utc": "today",
            "command": "python -m paper_repro", "quick": False, "simulated": False}
    rows = [{"impl": "naive", "status": "ok", "ms": 40.0, "gflops": 824.6, "hbm_gb_model": 43.0, "hbm_gb": 41.0},
            {"impl": "numba_flash", "status": "ok", "ms": 8.0, "gflops": 1237.0, "hbm_gb_model": 3.0,
             "hbm_gb": 1.5}]
    (folder / "fig2_left.json").write_text(json.dumps({"meta": meta, "rows": rows, "paper": {}}))
    text = report.build(tmp_path / "results")
    assert "## some-gpu" in text and "66.6" in text and "5.0x faster" in text and "27.3x fewer" in text


@pytest.mark.parametrize("quick", [True, False])
@pytest.mark.parametrize("path", ["mma", "wgmma"])
def test_fig2_middle_sweeps_tiles_its_path_builds(path, quick, monkeypatch):
    """Every NUMBA_FLASH_FWD_TILES value Figure 2 middle sets parses into tiles of the swept size that the
    path's forward builds its operations for (the simulator fixes tiles, so the GPU run is the first to
    launch them: a value the path refuses must fail here, not there)."""
    from types import SimpleNamespace

    from numba_flash.kernels import configs, tc_tiles, wgmma_tiles
    from paper_repro import fig2_middle

    rows = fig2_middle.sweep(SimpleNamespace(quick=quick, simulate=False), path)
    assert {r[0] for r in rows} == {"query tile Br", "key tile Bc"}
    for series, tile, env, br, bc in rows:
        monkeypatch.setenv("NUMBA_FLASH_FWD_TILES", env)
        t = configs._override(path, "fwd")
        assert (t.br, t.bc) == (br, bc) and tile == (br if series == "query tile Br" else bc), (env, t)
        if path == "wgmma":
            default = configs._wgmma_tiles("fwd", 64)
            assert t.ring == default.ring == 2 and t.pingpong == (t.warps == 8), t   # the d = 64 default's ring
            wgmma_tiles.make_wgmma_ops("fwd", t, 64, "float16", True)
        else:
            tc_tiles.make_tc_ops("fwd", t, 64, "float16", True)
