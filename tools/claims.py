"""The claims table: each claim of the seed papers that this project can test, measured from the
study's runs, with a verdict by a rule fixed before any run was read (`RULES`), and the
external evidence beside it. Nothing in it is typed by hand: `table` computes every number
from the runs' metrics (tools/study.py --report calls it).

A verdict is one of: reproduced; partly (the rule's first half holds, its second not); not
reproduced (no effect that the seeds can tell from noise); contradicted (an effect the other
way); not testable here (and what it would take). Intervals are 95% Student-t intervals of the
paired per-seed difference (each seed's runs share their warm start).
"""
import math
import statistics

# two-sided 95% Student-t quantiles by degrees of freedom (seeds - 1); past 30, the normal's
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
       17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064,
       25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}

# The rules, written before the runs were read (the commit that adds this file predates every
# chains and clips result): how each measurement becomes a verdict.
RULES = {
    "leak": "reproduced if OPSD's leakage at step 100 exceeds GRPO's (paired interval above 0) "
            "and rises with the step (Spearman rho of its mean curve over steps 0-100 >= 0.8); "
            "partly if only the first holds",
    "peak": "reproduced if OPSD's mean test accuracy peaks at step 10-20 and its final accuracy "
            "is below that peak (paired interval below 0); partly if it declines after a later "
            "peak",
    "kl": "reproduced if OPD's teacher KL falls (last 10 steps minus first 10: interval below "
          "0) while OPSD's levels off (its second 100 steps' mean within 10% of its steps "
          "51-100's)",
    "keeps_rising": "reproduced if RLSD's final accuracy exceeds its step-50 accuracy (paired "
                    "interval above 0) while OPSD's final is below its best",
    "entropy": "reproduced if RLSD's entropy over the last 10 steps exceeds GRPO's (paired "
               "interval above 0)",
    "clip": "reproduced if RLSD's weight clip acts on 3-6% of the tokens (mean over seeds "
            "while lambda > 0)",
    "half_steps": "reproduced if RLSD at step 100 is at or above GRPO at step 200 (paired mean "
                  ">= 0 and the interval's lower end above -2 points)",
    "gain": "reproduced if the arm's final accuracy exceeds the baseline's (paired interval "
            "above 0); not reproduced if the interval contains 0; contradicted if below 0",
    "srpo": "reproduced if SRPO at step 50 is at or above SDPO's (mean >= 0) and its final at "
            "or above GRPO's (paired mean >= 0)",
    "context": "reproduced if the right context beats another problem's (paired interval "
               "above 0 for the arm against its control)",
}


def interval(diffs: list) -> tuple:
    """(mean, low, high) of the 95% t interval of paired differences (points)."""
    d = [x * 100 for x in diffs]
    if len(d) < 2:
        return (d[0] if d else float("nan")), float("nan"), float("nan")
    m, sd = statistics.mean(d), statistics.stdev(d)
    half = T95.get(len(d) - 1, 1.96) * sd / math.sqrt(len(d))
    return m, m - half, m + half


def fmt(ci: tuple, seeds: int) -> str:
    """'+1.2 [-0.3, +2.7] points (10 seeds)': the mean and the 95% interval, in points."""
    m, lo, hi = ci
    return (f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}] points ({seeds} seeds)" if lo == lo
            else f"{m:+.1f} points (1 seed)")


def evals(rows: list, key: str = "test_acc") -> dict:
    return {r["step"]: r[key] for r in rows if key in r}


def at(rows: list, step: int, key: str = "test_acc"):
    e = evals(rows, key)
    return e.get(step, e[max(s for s in e if s <= step)] if any(s <= step for s in e) else None)


def final(rows: list, key: str = "test_acc"):
    e = evals(rows, key)
    return e[max(e)] if e else None


def train_mean(rows: list, key: str, lo: int, hi: int):
    vals = [r[key] for r in rows if lo <= r.get("step", 0) <= hi and key in r]
    return statistics.mean(vals) if vals else None


def paired(a: dict, b: dict, fa, fb=None) -> tuple:
    """(differences fa(a[s]) - fb(b[s]) over the seeds both have, number of seeds)."""
    fb = fb or fa
    seeds = sorted(s for s in set(a) & set(b) if fa(a[s]) is not None and fb(b[s]) is not None)
    return [fa(a[s]) - fb(b[s]) for s in seeds], len(seeds)


def spearman(xs: list, ys: list) -> float:
    def rank(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for k, i in enumerate(order):
            r[i] = k
        return r
    rx, ry = rank(xs), rank(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return num / den if den else float("nan")


def mean_curve(per_seed: dict, key: str) -> dict:
    steps = sorted({s for rows in per_seed.values() for s in evals(rows, key)})
    return {s: statistics.mean(evals(rows, key)[s] for rows in per_seed.values()
                               if s in evals(rows, key)) for s in steps}


def verdict_gain(ci: tuple) -> str:
    m, lo, hi = ci
    if lo != lo:
        return "not testable here (one seed)"
    return ("reproduced" if lo > 0 else "contradicted" if hi < 0 else
            "not reproduced (no difference the seeds can tell)")


def not_run(paper: str, claim: str, arms, external: str = "") -> tuple:
    """A claims row whose arms have no finished runs in the archive yet."""
    return (paper, claim, "-", "not run yet", external or f"needs the {', '.join(arms)} runs "
            "(tools/study.py; docs/study.md says how)")


def rows_for(runs: dict) -> list:
    """The claims table's rows (paper, claim, measurement, verdict, external) from the chains
    study's runs {arm: {seed: metrics rows}}; claims whose arms did not run are 'not run'."""
    g, r, o = runs.get("grpo", {}), runs.get("rlsd", {}), runs.get("opsd", {})
    out = []

    def need(*arms):
        return all(runs.get(a) for a in arms)

    P = "RLSD (arXiv 2604.03128)"
    if need("opsd", "grpo"):
        d, n = paired(o, g, lambda x: at(x, 100, "test_leakage"))
        curve = {s: v for s, v in mean_curve(o, "test_leakage").items() if s <= 100}
        rho = spearman(list(curve), list(curve.values()))
        ci = interval(d)
        v = ("reproduced" if ci[1] > 0 and rho >= 0.8 else "partly (leaks, not monotonically)"
             if ci[1] > 0 else "not reproduced")
        out.append((P + " Fig. 3a", "OPSD's student comes to cite the reference it never sees: "
                    "leakage rises over 100 steps",
                    f"OPSD - GRPO leakage at step 100: {fmt(ci, n)}; Spearman rho of "
                    f"OPSD's mean leakage over steps 0-100: {rho:.2f}", v, ""))
        curve = mean_curve(o, "test_acc")
        peak = max(curve, key=curve.get)
        d, n = paired(o, o, final, lambda x: evals(x)[peak])
        ci = interval(d)
        v = ("reproduced" if 10 <= peak <= 20 and ci[2] < 0 else
             "partly (a decline after a later peak)" if peak > 20 and ci[2] < 0 else
             "not reproduced (no early peak: it falls from the start)" if peak < 10 and ci[2] < 0
             else "not reproduced")
        out.append((P + " Fig. 3b", "OPSD's validation accuracy peaks within 10-20 steps, then "
                    "declines", f"OPSD's mean accuracy peaks at step {peak} "
                    f"({curve[peak]:.1%}); final - peak: {fmt(ci, n)}", v, ""))
    else:
        out += [not_run(P + " Fig. 3a", "OPSD's leakage rises over 100 steps", ("opsd", "grpo")),
                not_run(P + " Fig. 3b", "OPSD's accuracy peaks within 10-20 steps, then declines",
                        ("opsd", "grpo"))]
    if need("opd", "opsd"):
        d, n = paired(runs["opd"], runs["opd"], lambda x: train_mean(x, "teacher_kl", 191, 200),
                      lambda x: train_mean(x, "teacher_kl", 1, 10))
        ci = interval([x / 100 for x in d])  # KL in nats, not points
        second = [train_mean(x, "teacher_kl", 101, 200) for x in o.values()]
        first = [train_mean(x, "teacher_kl", 51, 100) for x in o.values()]
        ratio = statistics.mean(second) / max(statistics.mean(first), 1e-12)
        v = ("reproduced" if ci[2] < 0 and abs(ratio - 1) <= 0.1 else
             "partly" if ci[2] < 0 or abs(ratio - 1) <= 0.1 else "not reproduced")
        out.append((P + " Fig. 3c", "the teacher-student KL falls for OPD and levels off for "
                    "OPSD (the mutual-information gap of Theorem 1)",
                    f"OPD's KL, last 10 steps - first 10: {ci[0]:+.3f} nats [{ci[1]:+.3f}, "
                    f"{ci[2]:+.3f}] ({n} seeds); OPSD's steps 101-200 / 51-100: {ratio:.2f}",
                    v, ""))
    else:
        out.append(not_run(P + " Fig. 3c", "the teacher-student KL falls for OPD and levels off "
                           "for OPSD", ("opd", "opsd")))
    if need("rlsd", "opsd"):
        d, n = paired(r, r, final, lambda x: at(x, 50))
        ci = interval(d)
        dd, _ = paired(o, o, final, lambda x: max(evals(x).values()))
        ok_o = interval(dd)[2] < 0
        v = ("reproduced" if ci[1] > 0 and ok_o else "partly" if ci[1] > 0 or ok_o else
             "not reproduced")
        out.append((P + " Fig. 5a", "OPSD peaks early and degrades while RLSD keeps rising",
                    f"RLSD final - step 50: {fmt(ci, n)}; OPSD final - best: "
                    f"{fmt(interval(dd), n)}", v, ""))
    if need("rlsd", "grpo"):
        d, n = paired(r, g, lambda x: train_mean(x, "entropy", 191, 200))
        ci = interval([x / 100 for x in d])
        out.append((P + " Fig. 5b", "GRPO's entropy collapses while RLSD's stays higher",
                    f"RLSD - GRPO entropy, last 10 steps: {ci[0]:+.4f} nats [{ci[1]:+.4f}, "
                    f"{ci[2]:+.4f}] ({n} seeds)", "reproduced" if ci[1] > 0 else
                    "contradicted" if ci[2] < 0 else "not reproduced", ""))
        clips = [statistics.mean(x["rlsd_weight_clip_frac"] for x in rows
                                 if x.get("rlsd_lambda", 0) > 0 and "rlsd_weight_clip_frac" in x)
                 for rows in r.values()]
        m = statistics.mean(clips)
        out.append((P + " Fig. 5c", "RLSD's weight clip is active on 3-6% of the tokens",
                    f"{m:.1%} (per seed {min(clips):.1%} to {max(clips):.1%}, {len(clips)} seeds)",
                    "reproduced" if 0.03 <= m <= 0.06 else "not reproduced", ""))
        d, n = paired(r, g, lambda x: at(x, 100), final)
        ci = interval(d)
        out.append((P + " Fig. 1b", "RLSD in half the steps is at or above GRPO (200 vs 400 "
                    "steps; here 100 vs 200)", f"RLSD at 100 - GRPO at 200: {fmt(ci, n)}",
                    "reproduced" if ci[0] >= 0 and ci[1] > -2 else "not reproduced", ""))
        d, n = paired(r, g, final)
        ci = interval(d)
        out.append((P + " Table 1", "RLSD ends above GRPO", f"final test accuracy, RLSD - GRPO: "
                    f"{fmt(ci, n)}", verdict_gain(ci),
                    "RISE (arXiv 2609.05295, Qwen3-8B, text math, 6 benchmarks): RLSD 59.8, "
                    "GRPO 60.0"))
    else:
        out.append(not_run(P + " Fig. 5b, 5c, 1b, Table 1", "RLSD against GRPO: entropy, clip "
                           "share, half the steps, final accuracy", ("rlsd", "grpo")))
    for arm, paper, claim, ext in (
            ("opsd", "OPSD (arXiv 2601.18734)", "OPSD improves over GRPO",
             "RLSD's Table 1 (Qwen3-VL-8B): OPSD 52.49, GRPO 53.86"),
            ("sdpo", "SDPO (arXiv 2601.20802)", "SDPO improves over GRPO",
             "RLSD's Table 1: SDPO 52.74, GRPO 53.86")):
        if need(arm, "grpo"):
            d, n = paired(runs[arm], g, final)
            ci = interval(d)
            out.append((paper, claim, f"final, {arm.upper()} - GRPO: {fmt(ci, n)}",
                        verdict_gain(ci), ext))
        else:
            out.append(not_run(paper, claim, (arm, "grpo")))
    if need("srpo", "sdpo", "grpo"):
        d1, n1 = paired(runs["srpo"], runs["sdpo"], lambda x: at(x, 50))
        d2, n2 = paired(runs["srpo"], g, final)
        c1, c2 = interval(d1), interval(d2)
        out.append(("SRPO (arXiv 2604.02288)", "SDPO's early speed with GRPO's stability",
                    f"step 50, SRPO - SDPO: {fmt(c1, n1)}; final, SRPO - GRPO: {fmt(c2, n2)}",
                    "reproduced" if c1[0] >= 0 and c2[0] >= 0 else "partly"
                    if c1[0] >= 0 or c2[0] >= 0 else "not reproduced", ""))
    else:
        out.append(not_run("SRPO (arXiv 2604.02288)", "SDPO's early speed with GRPO's "
                           "stability", ("srpo", "sdpo", "grpo")))
    for arm, control, who in (("rlsd", "rlsd_unrelated", "RLSD"), ("opsd", "opsd_unrelated",
                                                                    "OPSD")):
        if need(arm, control):
            d, n = paired(runs[arm], runs[control], final)
            ci = interval(d)
            out.append((f"{who}: the privileged context", f"{who}'s teacher needs the RIGHT "
                        "reference (the control: another problem's)",
                        f"final, {arm} - {control}: {fmt(ci, n)}", verdict_gain(ci),
                        "the hint's content drives the drift (arXiv 2610.07842)"))
        else:
            out.append(not_run(f"{who}: the privileged context", f"{who}'s teacher needs the "
                               "RIGHT reference", (arm, control)))
    if need("csd", "grpo"):
        d, n = paired(runs["csd"], g, final)
        ci = interval(d)
        out.append(("CSD (arXiv 2609.21561)", "attraction and repulsion balanced keep learning "
                    "stable", f"final, CSD - GRPO: {fmt(ci, n)}", verdict_gain(ci), ""))
    else:
        out.append(not_run("CSD (arXiv 2609.21561)", "attraction and repulsion balanced keep "
                           "learning stable", ("csd", "grpo")))
    if need("opd_semi", "opd"):
        d, n = paired(runs["opd_semi"], runs["opd"], final)
        ci = interval(d)
        out.append(("Semi-OPD (arXiv 2610.11291)", "distilling on the initial student's cached "
                    "rollouts beats OPD", f"final, Semi-OPD - OPD: {fmt(ci, n)}",
                    verdict_gain(ci), "the paper: ahead of OPD in 14 of 17 teacher-student pairs"))
    else:
        out.append(not_run("Semi-OPD (arXiv 2610.11291)", "distilling on the initial student's "
                           "cached rollouts beats OPD", ("opd_semi", "opd")))
    out.append(("Critiques (arXiv 2607.05184, 2607.02234)", "privileged self-distillation "
                "degrades thinking models, more so with longer rollouts", "-",
                "not testable here", "needs a thinking model and long rollouts: a GPU"))
    return out


def clips_rows(runs: dict) -> list:
    """The OmniOPSD rows from the clips study {arm: {seed: rows}}."""
    out, g = [], runs.get("grpo", {})
    ext = ("a third-party replication (Qwen2.5-Omni-3B, OmniVideoBench): SFT 35.0, OPSD 34.0, "
           "clue-only OPSD 34.2")
    for arm, what in (("omniopsd", "OmniOPSD (rationale shown) - GRPO"),
                      ("opsd_answer", "OPSD (answer shown) - GRPO"),
                      ("rlsd", "RLSD - GRPO")):
        if runs.get(arm) and g:
            d, n = paired(runs[arm], g, final)
            ci = interval(d)
            out.append(("OmniOPSD (arXiv 2606.15920)" if arm == "omniopsd" else "on clips",
                        "OPSD with a rationale improves an omni model" if arm == "omniopsd"
                        else f"{what.split(' - ')[0]} improves over GRPO on an omni task",
                        f"final (clips), {what}: {fmt(ci, n)}", verdict_gain(ci),
                        ext if arm == "omniopsd" else ""))
    if runs.get("omniopsd") and runs.get("omniopsd_unrelated"):
        d, n = paired(runs["omniopsd"], runs["omniopsd_unrelated"], final)
        ci = interval(d)
        out.append(("OmniOPSD: the rationale", "the RIGHT clip's rationale matters (control: "
                    "another clip's)", f"final (clips), OmniOPSD - control: {fmt(ci, n)}",
                    verdict_gain(ci), ""))
    if not (runs.get("omniopsd") and g):
        out.append(not_run("OmniOPSD (arXiv 2606.15920)", "OPSD with a rationale improves an "
                           "omni model", ("omniopsd", "grpo"), ext))
    return out


def table(rows: list) -> str:
    lines = ["| paper, figure | claim | our measurement (paired, 95% CI) | verdict | external "
             "evidence |", "|---|---|---|---|---|"]
    lines += [f"| {p} | {c} | {m} | {v} | {e} |" for p, c, m, v, e in rows]
    return "\n".join(lines)
