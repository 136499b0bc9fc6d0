"""The benchmark harness's own logic (bench/): the GCIDE parser, the reading of
recall/QPS curves and the ratio cells of the summary. No system is run."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from bench import cli, datasets, report  # noqa: E402

ENTRY = """Abuse \\A*buse"\\, n. [F. abus, L. abusus, fr. abuti. See {Abuse},
   v. t.]
   1. Improper treatment or use; application to a wrong or bad
      purpose; misuse; as, an abuse of our natural powers.
      [1913 Webster]

            Liberty may be endangered by the abuses of liberty,
            as well as by the abuses of power.    --Madison.
      [1913 Webster]

   2. Physical ill treatment; injury. "Rejoice . . . at the
      abuse of Falstaff." --Shak.
      [1913 Webster]

   3. To go:
      (a) To go swiftly; to pass at a swift pace. [Obs.]
          [1913 Webster]

                "Ha, ha, the fox!" and after him they ran.
                                                  --Chaucer.
          [1913 Webster]
      (b) To flee.
          [1913 Webster]

   Syn: Invective; contumely; reproach; scurrility; insult;
        opprobrium.

   {Abuse of distress} (Law), a wrongful using of an animal or
      chattel distrained, by the distrainer.
      [1913 Webster]

Abusion \\A*bu"sion\\, n. [OE. abusion, abusioun, OF. abusion, fr.
   L. abusio misuse of words, f. abuti. See {Abuse}, v. t.]
   Evil or corrupt usage; abuse; wrong; reproach. --Chaucer.
   [1913 Webster]
"""


def test_gcide_entry_definitions_keeps_senses_and_drops_the_rest():
    assert datasets.gcide_entry_definitions(ENTRY) == [
        "Improper treatment or use; application to a wrong or bad purpose; misuse; "
        "as, an abuse of our natural powers.",
        'Physical ill treatment; injury. "Rejoice . . . at the abuse of Falstaff."',
        "To go swiftly; to pass at a swift pace.",
        "Abuse of distress (Law), a wrongful using of an animal or chattel distrained, "
        "by the distrainer.",
        "Evil or corrupt usage; abuse; wrong; reproach.",
    ]


def test_gcide_cuts_long_definitions_at_a_word():
    body = "Word \\Word\\, n.\n   " + " ".join(["abcdefghi"] * 100) + "\n   [PJC]\n"
    (d,) = datasets.gcide_entry_definitions(body)
    assert len(d) == 599 and d.endswith("abcdefghi")


def test_dictd_numbers_are_base64_most_significant_first():
    assert datasets._dictd_number("A") == 0
    assert datasets._dictd_number("BVR") == 1 * 64 * 64 + 21 * 64 + 17


def test_qps_at_interpolates_and_returns_none_when_never_reached():
    pts = [(0.80, 1000.0), (0.92, 500.0), (0.97, 100.0)]
    assert report.qps_at(pts, 0.92) == 500.0
    assert report.qps_at(pts, 0.99) is None
    assert report.qps_at(pts, 0.945) == pytest.approx((500.0 * 100.0) ** 0.5)


def test_ratio_cell_counts_a_peer_that_never_reaches_as_beaten():
    assert report.ratio_cell(300.0, 200.0) == "1.50x"
    assert report.ratio_cell(300.0, None) == "peer not reached (beaten)"
    assert report.ratio_cell(None, 200.0) == "bitshard not reached"
    assert report.ratio_cell(None, None) == "neither reaches"
    # a peer whose sweep the time budget cut was not measured there: not beaten
    assert report.ratio_cell(300.0, None, peer_cut=True) == \
        "peer not measured (sweep cut by the time budget)"
    assert report.ratio_cell(None, 200.0, bs_cut=True) == \
        "bitshard not measured (sweep cut by the time budget)"


def test_targets_per_thread_count():
    assert report._target(report.TARGET_VS_RABITQLIB, 1, 0.99) == 1.3
    assert report._target(report.TARGET_VS_RABITQLIB, 2, 0.95) == 1.2
    assert report._target(report.TARGET_VS_RABITQLIB, 2, 0.99) is None
    assert report._target(report.TARGET_VS_PYLANCE_FAISS, 2, 0.90) is None


def test_median_of_runs():
    assert cli._median([3.0, 1.0, 2.0]) == 2.0
    assert cli._median([4.0, 1.0]) == 2.5
    assert cli._median([None, 5.0]) == 5.0
    assert cli._median([]) is None


def test_a_dataset_that_failed_to_prepare_is_summarized_with_its_reason():
    # Its only row is the failure row bench/cli.py writes (no rows, no dim):
    # the summary used to raise TypeError formatting None and lose every set.
    rows = [{"system": "-", "family": None, "dataset": "wordnet", "recall_at_10": None,
             "notes": ["dataset failed: RuntimeError: wordnet needs torch"]}]
    text, heads = report.summarize(rows)
    assert "== wordnet: not measured: dataset failed: RuntimeError: wordnet needs torch ==" in text
    assert heads == [{"dataset": "wordnet", "dim": None, "rows": None}]


def test_real_is_the_default_and_expands_to_the_three_sets():
    assert cli.parse_args([]).dataset == ["wordnet", "fashion-mnist", "gcide"]
    assert cli.parse_args(["--synthetic"]).dataset == ["synthetic-128", "synthetic-768"]
    a = cli.parse_args(["--dataset", "real,synthetic-384", "--budget-min", "5"])
    assert a.dataset == ["wordnet", "fashion-mnist", "gcide", "synthetic-384"]
    assert a.budget_min == 5.0 and a.runs == 3


def test_embedding_stops_at_its_deadline_with_the_cached_chunks(tmp_path):
    import time

    import numpy as np

    chunk = np.random.default_rng(0).standard_normal((2048, 384)).astype(np.float32)
    np.save(tmp_path / "chunk-0000.npy", chunk)
    texts = [f"text {i}" for i in range(5000)]
    # chunk 1 is missing and the deadline has passed: no model is loaded
    got = datasets.embed_cached(texts, 5000, str(tmp_path), "test texts", log=lambda *a: None,
                                deadline=time.monotonic() - 1)
    assert got.shape == (2048, 384) and np.array_equal(got, chunk)
    # fewer rows wanted than cached: cut to the count
    assert datasets.embed_cached(texts, 100, str(tmp_path), "t").shape == (100, 384)


def test_a_set_cut_short_gets_its_own_name_or_fails_when_too_small(tmp_path):
    path, extra = datasets._cut_short("/c/gcide-n50000-q1000", 6144, 51000, 1000, "gcide", "/c")
    assert (path, extra) == ("/c/gcide-n5144-q1000", {"rows_wanted": 50000})
    assert datasets._cut_short("/c/x", 51000, 51000, 1000, "gcide", "/c") == ("/c/x", {})
    with pytest.raises(RuntimeError, match="after 1500 of 51000 texts"):
        datasets._cut_short("/c/x", 1500, 51000, 1000, "gcide", "/c")


def test_objstore_measure_only_refuses_missing_builds_and_other_parameters(tmp_path):
    from bench import objstore

    with pytest.raises(SystemExit) as e:
        objstore.run([1000], 8, 4, 2, 4, 2, str(tmp_path), pylance=True, measure_only=True)
    assert str(e.value) == (f"--measure-only: {tmp_path} has no data, index, pylance build for "
                            f"1000 rows; make it first with --reuse --build-only")
    state = {"params": {"dim": 8, "partitions": 4, "bits": 4},
             "rows": {"1000": {"data": {}, "index": {"segment_bytes": 1}}}}
    objstore._save_state(str(tmp_path), state)
    with pytest.raises(SystemExit) as e:   # no pylance build kept
        objstore.run([1000], 8, 4, 2, 4, 2, str(tmp_path), pylance=True, measure_only=True)
    assert str(e.value).startswith(f"--measure-only: {tmp_path} has no pylance build for 1000")
    with pytest.raises(SystemExit) as e:
        objstore._load_state(str(tmp_path), {"dim": 8, "partitions": 8, "bits": 4}, True)
    assert str(e.value) == (
        f"{tmp_path}/objstore-state.json was built with {{'dim': 8, 'partitions': 4, 'bits': 4}}"
        f", not {{'dim': 8, 'partitions': 8, 'bits': 4}}: use another --workdir, or leave out "
        f"--reuse to build afresh")
    assert objstore._load_state(str(tmp_path), state["params"], True) == state
    assert objstore._load_state(str(tmp_path), state["params"], False) == {
        "params": state["params"], "rows": {}}


def test_qprofile_refuses_more_queries_than_the_harness_set_has():
    from bench import qprofile

    for bad in (1000, 1001, 0):
        with pytest.raises(SystemExit, match=rf"^--queries {bad}: use 1 to 999 \(the harness's "
                                             r"datasets have 1000 queries and one more warms up\)$"):
            qprofile._dataset("wordnet", bad)


def test_qprofile_total_is_the_dump_summary_not_the_sum_of_its_lines(tmp_path):
    """A dump written after --zero-before can hold cost lines of frames that
    were running at the zeroing: the total is callgrind's summary."""
    from bench import qprofile

    dump = tmp_path / "cg.out.1"
    dump.write_text("version: 1\npositions: line\nevents: Ir\nsummary: 1000\n\n"
                    "fl=(1) x.c\nfn=(1) main\n1 700\n2 500\n"
                    "cfl=(2) search.c\ncfn=(2) bs_search\ncalls=1 10\n3 300\n"
                    "fl=(2)\nfn=(2)\n10 300\n\ntotals: 1500\n")
    assert qprofile.dump_summary(str(dump)) == 1000
    t = qprofile.stage_table(str(dump))
    assert t["total"] == 1000
    assert t["Python + numpy"] == 700


def test_the_run_block_is_written_once_and_the_summary_still_finds_it(tmp_path):
    import json
    import types
    rows = [{"dataset": "d", "dim": 8, "rows": 100, "system": f"s{i}", "family": "bitshard",
             "threads": 1, "recall_at_10": 0.9 + i / 100, "qps": 1000.0 * (i + 1),
             "nprobes": 4} for i in range(3)]
    args = types.SimpleNamespace(command="python -m bench --quick ", runs=3, budget_min=5.0,
                                 out=str(tmp_path / "r.json"))
    budget = types.SimpleNamespace(skipped=["pylance on d"])
    cli._finish(rows, {}, "env note", args, 0.0, budget)
    written = json.load(open(tmp_path / "r.json"))
    assert [("run" in r) for r in written] == [True, False, False]
    assert written[0]["run"]["command"] == "python -m bench --quick"
    assert written[0]["run"]["skipped_by_budget"] == ["pylance on d"]
    assert all(r["env"] == "env note" for r in written)
    text, _ = report.summarize(written)
    assert "python -m bench --quick" in text


def test_scale_merge_plan_and_the_search_calibration_is_long():
    import argparse

    from bench import scale

    # 40 task segments of 21 MB under a 256 MiB bound: one level of five
    # merges of 8, dealt to 2 workers (3 and 2 merges): the level lasts as
    # long as the busiest worker's 3 merges.
    sizes = [21e6] * 40
    assert scale.merge_seconds(sizes, 2, 256 << 20, 1.0) == pytest.approx(3 * 8 * 21e6)
    # One worker: every merge, one after another.
    assert scale.merge_seconds(sizes, 1, 256 << 20, 1.0) == pytest.approx(40 * 21e6)
    a = argparse.Namespace(rows=10_000_000, partitions=1024, calib_rows=300_000,
                           search_calib_rows=None)
    assert scale.search_calib_rows(a) == 2_048_000  # partitions of 2,000 rows
    a.rows = 2_000_000
    assert scale.search_calib_rows(a) == 500_000  # at most a quarter of the big run
    a.search_calib_rows = 123
    assert scale.search_calib_rows(a) == 123
