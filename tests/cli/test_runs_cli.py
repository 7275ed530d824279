"""`peft runs plot` overlays real runs (one line per run in every panel) and refuses bad input in one line;
`peft runs compare` prints the numbers of the runs' summaries."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib.image import imread

from peftcli.recipe.load import validate_recipe_dict
from peftcli.train.curves import overlay_figure, read_run
from peftcli.train.loop import train

from support import make_recipe, run_cli


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir, copy_data):
    """Two finished tiny runs of different lengths and rates."""
    root = tmp_path_factory.mktemp("runs")
    for name, steps, rate in (("short", 3, 3e-3), ("long", 5, 1e-2)):
        recipe = make_recipe(root, tiny_model_dir, copy_data, output={"dir": str(root / name)},
                             training={"max_steps": steps, "learning_rate": rate, "eval_every": 2})  # fmt: skip
        train(validate_recipe_dict(recipe, "r.yaml"))
    return root / "short", root / "long"


def _records(run_dir, key):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return np.array([[r["step"], r[key]] for r in map(json.loads, lines) if key in r], dtype=float)


def test_the_overlay_draws_one_line_per_run_in_each_panel(two_runs):
    figure = overlay_figure([read_run(run) for run in two_runs])
    panels = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["train loss", "eval loss", "learning rate"]
    for ax, key in zip(panels, ("loss", "eval_loss", "lr"), strict=True):
        assert [line.get_label() for line in ax.lines] == ["short (lora, sft)", "long (lora, sft)"]
        for line, run in zip(ax.lines, two_runs, strict=True):
            np.testing.assert_array_equal(line.get_xydata(), _records(run, key))
        assert ax.get_legend() is not None


def test_runs_plot_writes_a_png_and_never_overwrites_by_accident(two_runs, tmp_path):
    short, long = map(str, two_runs)
    out = tmp_path / "both.png"
    done = run_cli("runs", "plot", short, long, "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert imread(out).shape == (720, 1200, 4)  # three panels, two per row
    before = out.read_bytes()

    again = run_cli("runs", "plot", short, long, "-o", str(out))
    assert again.returncode == 2
    assert again.stderr.strip() == f"error: {out} exists; pass --overwrite to replace it, or -o another file"
    assert out.read_bytes() == before

    one = run_cli("runs", "plot", short, long, "-o", str(out), "--overwrite", "--metric", "loss")
    assert one.returncode == 0, one.stderr
    assert imread(out).shape == (360, 600, 4)  # one panel


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}"], "{tmp}: not a run directory (it has no recipe.yaml); give the output.dir of a peft train run"),
        (["{short}", "--metric", "nope"], "--metric nope: not logged by these runs; they logged eval_loss, eval_ppl"),
        (["{short}", "-o", "{tmp}/x.jpg"], "-o {tmp}/x.jpg: the picture is a PNG; give a file name ending in .png"),
    ],
    ids=["not-a-run", "unknown-metric", "not-png"],
)
def test_runs_plot_refuses_bad_input_in_one_line(two_runs, tmp_path, args, message):
    names = {"tmp": tmp_path, "short": two_runs[0]}
    args = [a.format(**names) for a in args]
    done = run_cli("runs", "plot", *args, *([] if "-o" in args else ["-o", str(tmp_path / "x.png")]))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + message.format(**names)), done.stderr
    assert not list(tmp_path.glob("x.*")) and not list(tmp_path.glob(".x*"))


def test_runs_compare_shows_both_summaries(two_runs):
    summaries = [json.loads((run / "summary.json").read_text()) for run in two_runs]
    done = run_cli("runs", "compare", *map(str, two_runs))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:4] == ["run", "method", "objective", "steps"]
    assert not any(c in done.stdout for c in "━─│")  # plain text in a pipe
    for name, summary in zip(("short", "long"), summaries, strict=True):
        (row,) = [line for line in lines if line.split()[0] == name]
        before, after = summary["eval_before"]["eval_loss"], summary["eval_after"]["eval_loss"]
        rss = summary["peak_host_memory_bytes"] / 2**30
        expected = (
            f"{name} lora sft {summary['steps']} {summary['trainable_params']:,} {summary['final_train_loss']:.4f} "
            f"{before:.4f} -> {after:.4f} - {summary['time_s']:.1f}s {rss:.2f} GiB RSS"
        )
        assert " ".join(row.split()) == expected

    as_json = run_cli("runs", "compare", *map(str, two_runs), "--json")
    rows = json.loads(as_json.stdout)
    for row, summary in zip(rows, summaries, strict=True):
        assert row["steps"] == summary["steps"] and row["final_train_loss"] == summary["final_train_loss"]
        assert row["eval_loss_before"] == summary["eval_before"]["eval_loss"]
        assert row["eval_loss_after"] == summary["eval_after"]["eval_loss"]
        assert row["trainable_params"] == summary["trainable_params"] and row["time_s"] == summary["time_s"]
        assert row["peak_host_memory_bytes"] == summary["peak_host_memory_bytes"] > 0
