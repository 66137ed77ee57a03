"""What the rows of a proxy experiment say, in sentences computed from the rows (no number is typed
by hand), and a grouped-bar figure of the behavioural gap. Shared by ``experiments/train_val`` and
``experiments/scale``.

Decision rules (stated in every conclusion):

* behavioural gap: Δ = learned − tuned baseline on the same tasks (seeds-then-tasks 95% CI, the
  ``eval_seeds`` ``final_outer_loss_diff`` rows): *better* if the CI lies below 0, *worse* if above,
  *no detectable difference* otherwise;
* an analysis claim about the population counts the members whose row clears its null
  (``clears_null``) or has the stated sign; a hand-designed control is one row with its own CI.
"""
from __future__ import annotations

from experiments import common


def gap_word(r: dict | None) -> str:
  if r is None or r.get("value") is None or r.get("ci_low") is None:
    return "undefined"
  if r["ci_high"] < 0:
    return "better"
  if r["ci_low"] > 0:
    return "worse"
  return "no detectable difference"


def _pop(rows, variant, split, metric="final_outer_loss"):
  name = common.learned_name(rows)
  return (common.find(rows, variant=variant, split=split, analysis="eval_seeds", optimizer=name,
                      metric=metric)
          or common.find(rows, variant=variant, split=split, analysis="eval", optimizer=name,
                         metric=metric))


def _members(rows, variant, split, analysis, metric):
  name = common.learned_name(rows)
  return [r for r in common.select(rows, variant=variant, split=split, analysis=analysis,
                                   metric=metric, optimizer=name) if r.get("baseline") is None]


def _mean(vals):
  return sum(vals) / len(vals) if vals else None


def gap_sentence(rows, variant, split, baselines=("adam", "sgd", "sgdm")) -> str:
  pop = _pop(rows, variant, split)
  parts = []
  for b in baselines:
    d = common.find(rows, variant=variant, split=split, analysis="eval_seeds",
                    metric="final_outer_loss_diff", baseline=b)
    br = common.find(rows, variant=variant, split=split, analysis="eval", optimizer=b,
                     metric="final_outer_loss")
    if br is None:
      continue
    word = gap_word(d)
    link = {"better": "than", "worse": "than", "undefined": "for"}.get(word, "from")
    div = common.find(rows, variant=variant, split=split, analysis="eval", optimizer=b,
                      metric="diverged_frac")
    note = (f", diverged on {common.fmt(100 * div['value'], 3)}% of tasks"
            if div and div.get("value") else "")
    parts.append(f"{word} {link} tuned {b} ({common.fmt(br['value'])}{note}; "
                 f"Δ = {common.fmt_ci(d)})")
  oracle = common.find(rows, variant=variant, split=split, analysis="eval", optimizer="oracle",
                       metric="final_outer_loss")
  tail = f"; oracle {common.fmt(oracle['value'])}" if oracle else ""
  return (f"`{split}`: learned {common.fmt_ci(pop)} — " + "; ".join(parts) + tail + ".")


def alignment_sentence(rows, variant, split) -> str:
  """Late descent ratio of the members and of the tuned controls on one split."""
  mem = _members(rows, variant, split, "alignment", "descent_ratio_late")
  vals = [r["value"] for r in mem if r.get("value") is not None]
  if not mem:
    return f"`{split}`: not analysed (no alignment rows)."
  if not vals:
    return f"`{split}`: late descent ratio undefined ({mem[0].get('undefined')})."
  neg = sum(v < 0 for v in vals)
  ctrl = []
  for c in ("adam", "sgd"):
    r = common.find(rows, variant=variant, split=split, analysis="alignment",
                    metric="descent_ratio_late", optimizer=c)
    if r is not None:
      ctrl.append(f"tuned {c} {common.fmt(r.get('value'), 3)}")
  return (f"`{split}`: late descent ratio (validation / training progress) of the members "
          f"{common.fmt(_mean(vals), 3)} (range {common.fmt(min(vals), 3)}.."
          f"{common.fmt(max(vals), 3)}; "
          f"{neg}/{len(vals)} below 0, i.e. climbing the validation loss)"
          + (f" against {', '.join(ctrl)}" if ctrl else "") + ".")


def fit_sentence(rows, variant, split) -> str:
  """Objective fit: held-out R², its gain over the training-loss-only fit, and the l2 weight."""
  r2 = [r["value"] for r in _members(rows, variant, split, "objective_fit", "r2_heldout_steps")
        if r.get("value") is not None]
  gain = _members(rows, variant, split, "objective_fit", "r2_gain_heldout_steps")
  clears = sum(bool(r.get("clears_null")) for r in gain)
  wl2 = [r["value"] for r in _members(rows, variant, split, "objective_fit", "w:l2")
         if r.get("value") is not None]
  if not gain:
    return f"`{split}`: not analysed (no objective-fit rows)."
  out = f"`{split}`: held-out-step R² of the fit {common.fmt(_mean(r2), 3)} (mean of members)"
  out += f"; gain over the training loss alone clears its null in {clears}/{len(gain)} members"
  if wl2:
    out += (f"; weight on ½‖θ‖² {common.fmt(_mean(wl2), 3)} "
            f"({sum(v > 0 for v in wl2)}/{len(wl2)} members > 0)")
  return out + "."


def status(rows, expected) -> str:
  """Which ``expected`` variants have evaluation and analysis rows (a partial run says so)."""
  have_eval = {r["variant"] for r in rows if r.get("analysis") == "eval"}
  have_an = {r["variant"] for r in rows if r.get("analysis") == "alignment"}
  missing = [v for v in expected if v not in have_eval]
  unanalysed = [v for v in expected if v in have_eval and v not in have_an]
  if not missing and not unanalysed:
    return ""
  out = "**Status: partial.**"
  if missing:
    out += f" Not run: {', '.join(f'`{v}`' for v in missing)}."
  if unanalysed:
    out += f" Evaluated but not analysed: {', '.join(f'`{v}`' for v in unanalysed)}."
  return out


def conclusion(rows, quick: bool, intro: str = "", expected=()) -> str:
  variants = common.ordered_unique(r["variant"] for r in rows if r.get("analysis") == "eval")
  out = []
  if quick:
    out.append("**--quick run: smoke sizes; these sentences only show that the pipeline runs.**\n")
  elif status(rows, expected):
    out.append(status(rows, expected) + "\n")
  if intro:
    out.append(intro + "\n")
  out.append("Decision rule: *better* / *worse* when the 95% CI of the paired difference "
             "learned − tuned baseline lies below / above 0, else *no detectable difference*.\n")
  for v in variants:
    splits = common.ordered_unique(r["split"] for r in rows if r.get("variant") == v
                                   and r.get("analysis") == "eval")
    out.append(f"**{v}** — final validation loss (mean over seeds and tasks):")
    out += [f"- {gap_sentence(rows, v, s)}" for s in splits]
    out.append("\nAlignment:")
    out += [f"- {alignment_sentence(rows, v, s)}" for s in splits]
    out.append("\nImplicit objective:")
    out += [f"- {fit_sentence(rows, v, s)}" for s in splits]
    out.append("")
  return "\n".join(out)


def loss_bars(rows, path: str, metric: str = "final_outer_loss") -> str | None:
  """Grouped bars, one panel per variant: ``metric`` per split for the learned population (seeds-
  then-tasks CI, member means as dots), each tuned baseline and the oracle (CIs over tasks)."""
  ev = [r for r in rows
        if r.get("analysis") in ("eval", "eval_seeds") and r.get("metric") == metric]
  if not ev:
    return None
  plt = common._plt()
  name = common.learned_name(rows)
  variants = common.ordered_unique(r["variant"] for r in ev)
  others = common.ordered_unique(r["optimizer"] for r in ev
                                 if r.get("role") in ("baseline", "oracle"))
  who = [name, *others]
  fig, axes = plt.subplots(1, len(variants), figsize=(4.6 * len(variants), 3.8), squeeze=False)
  width = 0.8 / len(who)
  for ax, v in zip(axes[0], variants):
    splits = common.ordered_unique(r["split"] for r in ev if r["variant"] == v)
    for k, opt in enumerate(who):
      xs, ys, err = [], [], [[], []]
      for i, s in enumerate(splits):
        r = _pop(rows, v, s, metric) if opt == name else common.find(
            ev, variant=v, split=s, optimizer=opt, analysis="eval")
        if r is None or r.get("value") is None:
          continue
        x = i + (k - (len(who) - 1) / 2) * width
        xs.append(x)
        ys.append(r["value"])
        lo = r["value"] if r.get("ci_low") is None else r["ci_low"]
        hi = r["value"] if r.get("ci_high") is None else r["ci_high"]
        err[0].append(max(r["value"] - lo, 0))
        err[1].append(max(hi - r["value"], 0))
        if opt == name:
          m = [q["value"] for q in common.select(ev, variant=v, split=s, optimizer=name,
                                                   analysis="eval") if q.get("value") is not None]
          ax.plot([x] * len(m), m, "k.", ms=3, alpha=0.6)
      ax.bar(xs, ys, width, yerr=err, capsize=2, label=opt if opt != name else f"{name} (seeds)")
    ax.set_xticks(range(len(splits)))
    ax.set_xticklabels(splits, fontsize=8)
    ax.set_yscale("log")
    ax.set_title(v)
    ax.set_ylabel(metric.replace("_", " "))
  axes[0][0].legend(fontsize=7)
  return common._save(fig, path)
