"""The claims table's arithmetic and its verdict rules (tools/claims.py), on synthetic runs whose
differences are known by construction."""
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
import claims  # noqa: E402


def run(acc: dict, **train) -> list:
    """Metrics rows: evaluations {step: test_acc}, and per-step training values."""
    rows = [{"step": s, "test_acc": a} for s, a in sorted(acc.items())]
    steps = range(1, 201)
    rows += [{"step": s, **{k: (v(s) if callable(v) else v) for k, v in train.items()}}
             for s in steps]
    return rows


def test_interval_is_the_paired_t_interval():
    d = [0.01, 0.03, 0.02]  # accuracies: +1, +3, +2 points
    m, lo, hi = claims.interval(d)
    sd = 1.0  # stdev of 1, 3, 2
    half = 4.303 * sd / math.sqrt(3)  # t(0.975, 2 df)
    assert m == pytest.approx(2.0) and lo == pytest.approx(2 - half) and hi == pytest.approx(2 + half)
    m, lo, hi = claims.interval([0.05])
    assert m == pytest.approx(5.0) and lo != lo  # one seed: no interval


def test_spearman_of_a_monotone_and_a_reversed_curve():
    assert claims.spearman([0, 1, 2, 3], [0.1, 0.2, 0.5, 0.9]) == pytest.approx(1.0)
    assert claims.spearman([0, 1, 2, 3], [0.9, 0.5, 0.2, 0.1]) == pytest.approx(-1.0)


@pytest.mark.parametrize("gain, verdict", [(+0.05, "reproduced"), (-0.05, "contradicted"),
                                           (0.0, "not reproduced")])
def test_a_gain_claim_follows_the_sign_of_its_interval(gain, verdict):
    seeds = range(5)
    noise = [0.004, -0.003, 0.002, -0.001, -0.002]  # per-seed scatter, mean 0
    g = {s: run({0: 0.3, 200: 0.6}, entropy=0.1) for s in seeds}
    r = {s: run({0: 0.3, 200: 0.6 + gain + noise[s]}, entropy=0.1, rlsd_weight_clip_frac=0.05,
                rlsd_lambda=lambda k: max(0.0, 0.5 - k / 100)) for s in seeds}
    (row,) = [x for x in claims.rows_for({"grpo": g, "rlsd": r}) if x[0].endswith("Table 1")]
    assert row[3].startswith(verdict), row


def test_the_leak_claim_needs_a_rise_and_a_difference():
    steps = (0, 10, 20, 30, 40, 50, 75, 100)
    opsd = {s: run({k: 0.3 for k in steps}) for s in range(3)}
    for s, rows in opsd.items():
        for r in rows:
            if "test_acc" in r:
                r["test_leakage"] = r["step"] / 200 + 0.01 * s  # rises with the step
    grpo = {s: [dict(r, test_leakage=0.0) for r in run({k: 0.3 for k in steps})]
            for s in range(3)}
    rows = claims.rows_for({"grpo": grpo, "opsd": opsd})
    (leak,) = [x for x in rows if x[0].endswith("Fig. 3a")]
    assert leak[3] == "reproduced" and "rho of" in leak[2]


def test_clips_rows_pair_each_arm_with_grpo_and_the_control():
    seeds = range(5)
    noise = [0.004, -0.003, 0.002, -0.001, -0.002]
    runs = {a: {s: run({0: 0.6, 150: 0.6 + d + noise[s]}) for s in seeds}
            for a, d in (("grpo", 0.0), ("omniopsd", 0.05), ("opsd_answer", -0.05),
                         ("rlsd", 0.0), ("omniopsd_unrelated", 0.0))}
    rows = claims.clips_rows(runs)
    verdicts = {r[2].split(":")[0]: r[3] for r in rows}
    assert verdicts["final (clips), OmniOPSD (rationale shown) - GRPO"] == "reproduced"
    assert verdicts["final (clips), OPSD (answer shown) - GRPO"] == "contradicted"
    assert verdicts["final (clips), RLSD - GRPO"].startswith("not reproduced")
    assert verdicts["final (clips), OmniOPSD - control"] == "reproduced"
    assert len(rows) == 4 and all(r[2].endswith("(5 seeds)") for r in rows)


def test_a_claim_whose_arms_did_not_run_is_a_row_not_a_gap():
    """Every claim keeps its row: with no runs each reads 'not run yet' and names its arms."""
    rows = claims.rows_for({}) + claims.clips_rows({})
    papers = " ".join(r[0] for r in rows)
    for name in ("Fig. 3a", "Fig. 3b", "Fig. 3c", "Table 1", "OPSD (arXiv", "SDPO (arXiv",
                 "SRPO", "CSD", "Semi-OPD", "OmniOPSD"):
        assert name in papers, name
    assert all(r[3] in ("not run yet", "not testable here") for r in rows)
    only_grpo = {"grpo": {0: run({0: 0.3, 200: 0.5})}}
    assert any(r[3] == "not run yet" and "rlsd" in r[4] for r in claims.rows_for(only_grpo))


def test_t_quantiles_cover_every_seed_count_up_to_31():
    """No seed count up to 31 falls back to the normal's 1.96 (the table has every df 1-30)."""
    assert set(range(1, 31)) <= set(claims.T95)
    assert all(a > b for a, b in zip([claims.T95[k] for k in range(1, 30)],
                                     [claims.T95[k] for k in range(2, 31)]))


@pytest.mark.parametrize("peak, verdict", [(15, "reproduced"), (50, "partly"),
                                           (0, "not reproduced (no early peak")])
def test_the_early_peak_claim_reads_where_the_peak_is(peak, verdict):
    """Fig. 3b: a peak at 10-20 steps then a decline reproduces it; a later peak then a
    decline is partly; a curve that only falls from step 0 has no early peak at all."""
    steps = (0, 10, 15, 20, 30, 40, 50, 75, 100, 150, 200)
    scatter = [0.004, -0.003, 0.002]
    opsd = {s: run({k: (0.5 if k == peak else 0.3 if k < peak else 0.2) + scatter[s]
                    for k in steps}) for s in range(3)}
    grpo = {s: run({k: 0.3 for k in steps}) for s in range(3)}
    for rows in [*opsd.values(), *grpo.values()]:
        for r in rows:
            if "test_acc" in r:
                r["test_leakage"] = 0.0  # the leak row (Fig. 3a) reads it too
    (row,) = [x for x in claims.rows_for({"grpo": grpo, "opsd": opsd}) if x[0].endswith("3b")]
    assert row[3].startswith(verdict), row
